"""The one sample representation every dataset format is converted into, and the bad-sample signal.

A sample is a chat (HF messages with content parts) plus its decoded PIL images, in the order their
`{"type": "image"}` parts appear. Collate only ever sees this shape, whatever the source format.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

_BUFFER = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")  # how PIL names an in-memory file


class BadSample(Exception):
    """A sample that cannot be trained on (unreadable image, empty answer, too long). Loaders skip and
    count it — or stop with a UserError when configured to — instead of crashing a worker."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class Sample:
    """Chat messages (roles system/user/assistant, content a list of parts) and their images."""

    messages: list[dict]
    images: list[Image.Image] = field(default_factory=list)
    key: str = ""  # where it came from ("train row 17", "chat.jsonl:3"), for warnings

    def __post_init__(self) -> None:
        answers = [_text_of(m) for m in self.messages if m["role"] == "assistant"]
        if not answers:
            raise BadSample("no assistant turn", self.key)
        if not all(a.strip() for a in answers):
            raise BadSample("empty answer", self.key)


def _text_of(message: dict) -> str:
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def load_image(data: bytes | str | Path, key: str, name: str | None = None) -> Image.Image:
    """Decode bytes or a file to an RGB image now, so a corrupt file is a BadSample here rather than an
    exception deep inside the processor; its message names the sample (`key`) and the image (`name`, the
    path, or the byte count), never PIL's in-memory buffer. As transformers' and datasets' loaders do: the
    EXIF orientation applied, transparency composited onto white. 16-bit and float grayscale (DICOM-derived
    PNGs) is scaled to its own range: PIL's conversion would clip everything above 255 to white."""
    what = name or (f"of {len(data)} bytes" if isinstance(data, bytes) else str(data))
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            return to_rgb(img)
    except UnidentifiedImageError:
        reason = "not in an image format PIL reads"
    except (FileNotFoundError, IsADirectoryError, PermissionError) as err:
        raise BadSample("unreadable image", f"{key}: image {what} could not be read ({err.strerror})") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        reason = _BUFFER.sub("the image", str(err)) or type(err).__name__
    raise BadSample("unreadable image", f"{key}: image {what} could not be decoded ({reason})")


def to_rgb(img: Image.Image) -> Image.Image:
    """A decoded image as the RGB the processor takes (see `load_image`)."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        pixels = np.asarray(img, dtype=np.float64)
        low, high = float(pixels.min()), float(pixels.max())
        scaled = (pixels - low) * (255.0 / (high - low)) if high > low else np.zeros_like(pixels)
        img = Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")
