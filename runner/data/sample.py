"""The one sample representation every dataset format is converted into, and the bad-sample signal.

A sample is a chat (HF messages with content parts) plus its decoded PIL images, in the order their
`{"type": "image"}` parts appear. Collate only ever sees this shape, whatever the source format.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image


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


def load_image(data: bytes | str | Path, key: str) -> Image.Image:
    """Decode bytes or a file to an RGB image now, so a corrupt file is a BadSample here rather than an
    exception deep inside the processor."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise BadSample("unreadable image", f"{key}: {err}") from None
