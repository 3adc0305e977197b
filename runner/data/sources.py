"""Dataset formats → `Sample`s: MedPix-VQA rows and chat conversations, from the hub or local files.

Accepted specs (`load_source(spec, split)`):
- a hub id (`mmoukouba/MedPix-VQA`) or a local folder of parquet/arrow files → `datasets.load_dataset`
- a folder written by `save_to_disk` → `datasets.load_from_disk`
- a `.parquet` / `.arrow` file
- a `.jsonl` file of `{"messages": [...]}` chats; image parts (`image`, or OpenAI's `image_url`) reference a
  path relative to the file, a `file:` URL, a `data:` URI or base64 `bytes` (web URLs are bad samples);
  conversations without images are text-only samples. A malformed line (not UTF-8, not JSON, no `messages`)
  is a bad row of its own; a file with no chat line is refused.
Splits take `datasets`' slicing syntax (`train[:1000]`, `validation[10%:]`) for every spec.
A table is read as MedPix-VQA if it has `image_id`, `question`, `answer` columns, or as chat if it has
`messages` (plus an optional `images` column that `{"type": "image"}` parts without payload draw from).
Structural problems of one row surface as `BadSample` when that row is read, never at load time; so does
a relative image path with `..` (relative paths stay inside the dataset's folder; absolute ones are allowed).
"""

from __future__ import annotations

import base64
import bisect
import json
import os
import re
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse
from urllib.request import url2pathname

from PIL import Image

from runner.data.sample import BadSample, Sample, load_image, to_rgb
from runner.errors import UserError

VQA_COLUMNS = ("image_id", "question", "answer")
ROLES = ("system", "user", "assistant")


class SampleSource(Protocol):
    """Random access to samples; `__getitem__` may raise `BadSample`."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Sample: ...

    def text_and_images(self, index: int) -> tuple[str, int]:
        """All text of a sample and its image count, without decoding images (for length grouping)."""
        ...


# where an image dict (datasets' value, a chat part) keeps it; OpenAI's `image_url` holds a URL string or {"url": ...}
IMAGE_FIELDS = ("bytes", "image", "path", "url", "image_url")
IMAGE_PARTS = ("image", "image_url")  # chat content part types that carry an image
AUDIO_PARTS = ("audio", "input_audio", "audio_url")  # refused: the audio tower is not built
_WEB_URL = re.compile(r"^(https?|ftp)://", re.IGNORECASE)


def _decode_payload(payload: Any, root: Path | None, key: str) -> Image.Image:
    """Any image payload a row may carry → RGB PIL image (BadSample if it cannot be read)."""
    name = None  # the file bytes came from, where the row says (datasets' Image value keeps it beside them)
    while isinstance(payload, dict):  # datasets' Image(decode=False) value, a chat image part, image_url's {"url"}
        name = payload.get("path") if isinstance(payload.get("path"), str) else name
        field = next((f for f in IMAGE_FIELDS if payload.get(f)), None)
        payload = None if field is None else payload[field]
        if field == "bytes" and isinstance(payload, str):  # base64 in JSON
            payload = _b64(payload, key)
    if isinstance(payload, Image.Image):
        return to_rgb(payload)
    if isinstance(payload, str) and payload.startswith("data:"):  # data:image/png;base64,....
        payload = _b64(payload.partition(",")[2], key)
    if isinstance(payload, str):
        return load_image(_image_path(_url_path(payload, key), root, key), key)
    if isinstance(payload, bytes):
        return load_image(payload, key, name)
    raise BadSample("unreadable image", f"{key}: no image payload")


def _url_path(url: str, key: str) -> str:
    """A `file:` URL → its path (`file:///abs/a.png`, `file:img/a.png`); a web URL is refused as a bad sample:
    training reads local files only; any other string is a path already."""
    if _WEB_URL.match(url):
        raise BadSample("image URL not local", f"{key}: image {url[:80]!r} is a web URL; training fetches nothing from "
                                               f"the network: download it and give a path")
    if not url.lower().startswith("file:"):
        return url
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise BadSample("image URL not local", f"{key}: image {url[:80]!r} names host {parsed.netloc!r}; a file URL "
                                               f"must be local (file:///path or file:relative/path)")
    return url2pathname(parsed.path)


def _image_path(path: str, root: Path | None, key: str) -> Path:
    """A row's image path: absolute as given (the user's choice), relative inside the dataset's folder
    (the working directory for a hub dataset). A row may not climb out with `..`: a table from elsewhere
    must not make the job read, and train on, any file of the host (no `..` at all, so a linked subfolder
    cannot be climbed out of either). Links are not resolved: a folder that links its images elsewhere
    (the hub cache's snapshots link to blobs) is its owner's choice."""
    relative = Path(path)
    if relative.is_absolute():
        return relative
    if ".." in relative.parts:
        raise BadSample("image path outside the dataset", f"{key}: image path {path!r} has a '..' part; relative "
                                                           f"paths stay inside the dataset's folder: give one without "
                                                           f"'..', or an absolute path")
    return relative if root is None else root / relative


def _b64(data: bytes | str, key: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except ValueError:
        raise BadSample("unreadable image", f"{key}: invalid base64") from None


def _messages(messages: Any, key: str) -> list[tuple[str, list[dict]]]:
    """Validate a raw chat's structure → (role, parts) pairs; string contents become one text part."""
    if not isinstance(messages, list) or not messages:
        raise BadSample("malformed chat", f"{key}: `messages` must be a non-empty list")
    out = []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise BadSample("malformed chat", f"{key}: every message needs a role among {ROLES}")
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list) or not all(isinstance(part, dict) for part in parts):
            raise BadSample("malformed chat", f"{key}: content must be a string or a list of parts")
        out.append((message["role"], parts))
    return out


def chat_sample(messages: Any, key: str, root: Path | None = None, images: Sequence[Any] = ()) -> Sample:
    """Normalize one chat (string or part-list contents, inline or referenced images) into a Sample."""
    pool = iter(images)
    out_messages, out_images = [], []
    for role, parts in _messages(messages, key):
        out_parts = []
        for part in parts:
            if part.get("type") == "text" and isinstance(part.get("text"), str):
                out_parts.append({"type": "text", "text": part["text"]})
            elif part.get("type") in IMAGE_PARTS:
                # a bare {"type": "image"} takes the sample's next image from its images list (a table
                # merges the parts' schemas: a field a part lacks comes as None); an image_url part its own
                own = part["type"] == "image_url" or any(part.get(f) for f in IMAGE_FIELDS)
                out_images.append(_decode_payload(part if own else next(pool, None), root, key))
                out_parts.append({"type": "image"})
            elif part.get("type") in AUDIO_PARTS:
                raise BadSample("audio input", f"{key}: audio parts are not trained (the runner does not build "
                                               f"Gemma4's audio tower); remove them from the sample")
            else:
                raise BadSample("malformed chat", f"{key}: unsupported content part {str(part)[:60]!r}")
        out_messages.append({"role": role, "content": out_parts})
    return Sample(out_messages, out_images, key)


def vqa_sample(image: Any, question: str, answer: str, key: str, root: Path | None = None) -> Sample:
    """A MedPix-VQA row as one user turn (image, question) and one assistant turn (answer)."""
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question or ""}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer or ""}]},
    ]
    Sample(messages, [], key)  # validate the answer before paying for the image decode
    return Sample(messages, [_decode_payload(image, root, key)], key)


def _chat_text(messages: Any) -> tuple[str, int]:
    """Text and image count of a raw chat without decoding images; a malformed chat counts as empty
    here (it is skipped when read)."""
    try:
        parts = [part for _, message_parts in _messages(messages, "") for part in message_parts]
    except BadSample:
        return "", 0
    text = " ".join(part["text"] for part in parts if isinstance(part.get("text"), str))
    return text, sum(part.get("type") in IMAGE_PARTS for part in parts)


class TableSource:
    """A `datasets.Dataset` in MedPix-VQA or chat layout."""

    def __init__(self, table: Any, name: str, root: Path | None = None) -> None:
        from datasets import Image as ImageFeature

        columns = set(table.column_names)
        self.name, self.root = name, root  # relative image paths resolve against the dataset's folder
        if set(VQA_COLUMNS) <= columns:
            self.layout = "vqa"
            if isinstance(table.features["image_id"], ImageFeature):  # decode ourselves: corrupt → BadSample
                table = table.cast_column("image_id", ImageFeature(decode=False))
        elif "messages" in columns:
            self.layout = "chat"
            if "images" in columns:
                table = table.cast_column("images", _undecoded(table.features["images"]))
        else:
            raise UserError(
                f"dataset {name} has columns {sorted(columns)}; expected MedPix-VQA {list(VQA_COLUMNS)} or chat ['messages']"
            )
        self.table = table
        self._text_columns: Any = None  # built on first use, for length grouping only

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> Sample:
        row = self.table[index]
        key = f"{self.name} row {index}"
        if self.layout == "vqa":
            return vqa_sample(row["image_id"], row["question"], row["answer"], key, self.root)
        return chat_sample(row["messages"], key, self.root, images=row.get("images") or ())

    def text_and_images(self, index: int) -> tuple[str, int]:
        if self._text_columns is None:
            self._text_columns = self.table.select_columns(["question", "answer"] if self.layout == "vqa" else ["messages"])
        row = self._text_columns[index]
        if self.layout == "vqa":
            return f"{row['question']} {row['answer']}", 1
        return _chat_text(row["messages"])


def _undecoded(feature: Any) -> Any:
    """The same feature with images left as bytes, so decoding errors happen under our control."""
    from datasets import Image as ImageFeature, List

    if isinstance(feature, ImageFeature):
        return ImageFeature(decode=False)
    if isinstance(feature, List):
        return List(_undecoded(feature.feature))
    return feature


class JsonlSource:
    """A JSONL file of `{"messages": [...]}` chats, one sample per non-blank line; relative image paths
    resolve against its folder.

    Only each line's byte span is kept: a line is decoded when its sample is read, so a malformed line
    (not UTF-8, not JSON, no `messages`) is a BadSample of its own, as any row's problem is, and the
    other rows keep their indices (the sampler, length grouping and resume positions rely on them).
    A file without a single chat line is refused at load: it is not a chat JSONL.
    """

    def __init__(self, path: Path, split: str) -> None:
        self.path = path
        self.starts, self.ends, self.linenos = array("q"), array("q"), array("q")  # of the non-blank lines
        first_problem: BadSample | None = None
        found_chat = False
        with path.open("rb") as fh:
            offset = 0
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    self.starts.append(offset)
                    self.ends.append(offset + len(line))
                    self.linenos.append(lineno)
                    if not found_chat:  # parse lines only until one is a chat
                        try:
                            _parse_line(line, self._key(len(self.linenos) - 1))
                            found_chat = True
                        except BadSample as bad:
                            first_problem = first_problem or bad
                offset += len(line)
        if first_problem is not None and not found_chat:
            first = str(first_problem).partition(": ")[2]  # without the reason
            raise UserError(f'{path}: no line is a chat object ({first}); expected one {{"messages": [...]}} JSON '
                            f"object per line, UTF-8")
        rows = _slice(split, len(self.linenos), str(path))
        self.starts, self.ends, self.linenos = self.starts[rows], self.ends[rows], self.linenos[rows]
        self._fd: int | None = None  # opened on first read, in each process that reads

    def __getstate__(self) -> dict[str, Any]:
        """Loader worker processes open the file themselves."""
        return {**self.__dict__, "_fd": None}

    def close(self) -> None:
        """Close the descriptor this process reads lines through; a later read opens it again. A forked loader
        worker holds its own copy of the descriptor: closing either leaves the other readable."""
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> JsonlSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # a source dropped without close() (a --check, an eval pass) leaks no descriptor
        self.close()

    def _key(self, index: int) -> str:
        return f"{self.path.name}:{self.linenos[index]}"

    def _raw_chat(self, index: int) -> Any:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        # pread: no shared file position, so forked loader workers may read through the same descriptor
        line = os.pread(self._fd, self.ends[index] - self.starts[index], self.starts[index])
        return _parse_line(line, self._key(index))

    def __len__(self) -> int:
        return len(self.linenos)

    def __getitem__(self, index: int) -> Sample:
        return chat_sample(self._raw_chat(index), self._key(index), root=self.path.parent)

    def text_and_images(self, index: int) -> tuple[str, int]:
        try:
            return _chat_text(self._raw_chat(index))
        except BadSample:  # skipped when read
            return "", 0


def _parse_line(line: bytes, key: str) -> Any:
    """One JSONL line → its `messages` (BadSample naming file and line number if it has none)."""
    try:
        row = json.loads(line.decode("utf-8-sig"))  # -sig: a BOM the file's editor put before line 1
    except UnicodeDecodeError as err:
        raise BadSample("malformed line", f"{key}: not UTF-8 ({line[err.start:err.start + 1]!r} at byte "
                                          f"{err.start + 1} of the line); save the file as UTF-8") from None
    except json.JSONDecodeError as err:
        raise BadSample("malformed line", f"{key}: not valid JSON ({err.msg})") from None
    if not isinstance(row, dict) or "messages" not in row:
        raise BadSample("malformed line", f'{key}: expected an object with a "messages" list')
    return row["messages"]


class ConcatSource:
    """Several sources as one index space, e.g. MedPix-VQA plus a text-only chat file."""

    def __init__(self, sources: Sequence[SampleSource]) -> None:
        self.sources = list(sources)
        self.offsets = [0]
        for source in self.sources:
            self.offsets.append(self.offsets[-1] + len(source))

    def __len__(self) -> int:
        return self.offsets[-1]

    def _locate(self, index: int) -> tuple[SampleSource, int]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        k = bisect.bisect_right(self.offsets, index) - 1
        return self.sources[k], index - self.offsets[k]

    def __getitem__(self, index: int) -> Sample:
        source, local = self._locate(index)
        return source[local]

    def text_and_images(self, index: int) -> tuple[str, int]:
        source, local = self._locate(index)
        return source.text_and_images(local)

    def close(self) -> None:
        """Close the files of the sources that keep one open (JSONL)."""
        for source in self.sources:
            getattr(source, "close", lambda: None)()


class RowRange:
    """Consecutive rows of a source, by their own indices (`hold_out`'s two parts)."""

    def __init__(self, source: SampleSource, rows: range) -> None:
        self.source, self.rows = source, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Sample:
        return self.source[self.rows[index]]

    def text_and_images(self, index: int) -> tuple[str, int]:
        return self.source.text_and_images(self.rows[index])


def hold_out(source: SampleSource, fraction: float, name: str) -> tuple[RowRange, RowRange]:
    """(the first rows, the last `fraction` of them) of a source, cut as `datasets` cuts `train[:90%]` and
    `train[90%:]`: the same rows every run, so resume positions and their fingerprints hold."""
    n = len(source)
    cut = round(n * (1 - fraction))
    if cut == n:
        raise UserError(f"{name}: data.eval_fraction {fraction:g} of its {n} rows holds out none; raise it, or set "
                        f"data.eval")
    return RowRange(source, range(cut)), RowRange(source, range(cut, n))


_SPLIT = re.compile(r"^([\w.-]+)(?:\[(-?\d+%?)?:(-?\d+%?)?\])?$")


def _slice(split: str, n: int, name: str) -> slice:
    """`name[a:b]` (ints or percents, as in `datasets`) → a slice over n rows."""
    match = _SPLIT.match(split.replace(" ", ""))
    if match is None:
        raise UserError(f"{name}: bad split {split!r}; use e.g. 'train', 'train[:1000]' or 'train[10%:]'")

    def bound(text: str | None) -> int | None:
        if text is None:
            return None
        return round(n * int(text[:-1]) / 100) if text.endswith("%") else int(text)

    return slice(bound(match.group(2)), bound(match.group(3)))


def _load_table(spec: str, split: str) -> Any:
    """Whatever `datasets` understands (hub id, data folder, save_to_disk folder, single file)."""
    import datasets

    path = Path(spec)
    split_name = split.partition("[")[0].strip()
    builder = {".parquet": "parquet", ".arrow": "arrow"}.get(path.suffix)
    if path.is_file() and builder is None:
        raise UserError(f"{spec}: unsupported file type; use .jsonl, .parquet, .arrow or a folder")
    try:
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            loaded = datasets.load_from_disk(str(path))
            table = loaded[split_name] if isinstance(loaded, datasets.DatasetDict) else loaded
            return table.select(range(len(table))[_slice(split, len(table), spec)])
        if path.is_file():
            return datasets.load_dataset(builder, data_files={split_name: str(path)}, split=split)
        return datasets.load_dataset(spec, split=split)
    except UserError:
        raise
    except (KeyError, ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load dataset {spec!r} split {split!r}: {first}") from None


def load_source(spec: str, split: str = "train") -> SampleSource:
    """One dataset spec (see module doc) → a SampleSource."""
    path = Path(spec)
    if path.suffix in (".jsonl", ".json") and path.is_file():
        return JsonlSource(path, split)
    root = path if path.is_dir() else path.parent if path.is_file() else None  # None: a hub dataset
    return TableSource(_load_table(spec, split), f"{spec}[{split}]", root)


def same_rows(train: tuple[str, str], evaluation: tuple[str, str]) -> bool:
    """Whether two (spec, split) entries read the same rows: a single file or a save_to_disk Dataset
    has one split, so its split name is ignored and only the slices tell them apart."""
    (spec, split), (other, other_split) = train, evaluation
    path = Path(spec)
    single = path.is_file() or (path / "state.json").exists()
    return single and Path(other) == path and split.partition("[")[2] == other_split.partition("[")[2]


def load_sources(entries: Sequence[tuple[str, str]]) -> SampleSource:
    """Several (spec, split) entries mixed into one stream (concatenated; the sampler shuffles)."""
    sources = [load_source(spec, split) for spec, split in entries]
    return sources[0] if len(sources) == 1 else ConcatSource(sources)

