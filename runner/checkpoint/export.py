"""Native checkpoint → HF directory that transformers loads unchanged (`runner export`).

One process, no distributed launch: it reads DeepSpeed's per-layer files one layer at a time,
joins each tensor's TP shards as the manifest (`runner_checkpoint.json`) records the model cut
them, casts to the source checkpoint's dtype and appends to a safetensors shard, flushed whenever
the next tensor would push it past the size limit. Memory is one layer plus one shard, never the
model. The tied head is written once, as the embedding (no `lm_head.weight`), as HF expects.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from runner.checkpoint.engine import read_file
from runner.checkpoint.hf_load import INDEX_NAME, HFCheckpoint
from runner.checkpoint.native import (
    LATEST_NAME,
    META_NAME,
    PARTIAL_SUFFIX,
    REPLACED_SUFFIX,
    TAG_RE,
    latest_complete,
    layer_files,
    read_meta,
)
from runner.compat import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, peft_key
from runner.config import LoraConfig
from runner.errors import UserError
from runner.lora import PARTS, base_identity, peft_config
from runner.models.gemma4.per_layer import AUDIO_PREFIXES
from runner.parallel.tensor_parallel import join_shards

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # bytes, as transformers' "5GB"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
# Top-level source files that are weights (written anew here), not config/tokenizer/processor files.
_SHARD_NAME = re.compile(r"^model(-\d+-of-\d+)?\.safetensors$")
_OWN_FILE = re.compile(r"^(.*\.safetensors|model-\d+\.partial)$")  # weights and ShardWriter's unfinished shards
EXPORT_RECORD = ".runner-export.json"  # in an end-of-run export: the names it wrote, which the next one may replace
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".index.json")


def parse_size(text: str | int) -> int:
    """Bytes from an int or a size such as "5GB", "500MB", "2GiB"."""
    match = _SIZE.match(str(text))
    size = int(float(match[1]) * _UNITS[(match[2] or "B").upper()]) if match else 0
    if size < 1:
        raise UserError(f"shard size {text!r} is not a size above 0; write it like 5GB, 500MB or 2GiB")
    return size


def checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint directory from itself or from a checkpoint root that holds `latest`."""
    found = latest_complete(path)
    if found is None:
        raise UserError(f"{path}: not a runner checkpoint (no `{LATEST_NAME}`, no {META_NAME}); pass a checkpoint "
                        f"root such as OUTPUT_DIR/checkpoints or one of its step_* directories")
    return found


class ShardWriter:
    """Safetensors shards of at most `max_bytes` (a bigger tensor gets a shard alone), named
    model-XXXXX-of-NNNNN.safetensors once their count is known, plus the index."""

    def __init__(self, out_dir: Path, max_bytes: int) -> None:
        self.out_dir = out_dir
        self.max_bytes = max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0
        self.total_params = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size
        self.total_params += tensor.numel()

    def _flush(self) -> None:
        save_file(self.pending, self.out_dir / f"model-{len(self.shards) + 1:05d}.partial", metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending:
            self._flush()
        weight_map = {}
        for i, names in enumerate(self.shards, start=1):
            final = f"model-{i:05d}-of-{len(self.shards):05d}.safetensors"
            (self.out_dir / f"model-{i:05d}.partial").rename(self.out_dir / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_parameters": self.total_params, "total_size": self.total_bytes},
                 "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _join_shards(parts: list[dict[str, torch.Tensor]], entry: dict, tp: int) -> torch.Tensor:
    """The full tensor from the TP ranks' layer files, joined as the manifest records the cut
    (`tp_cuts`; a manifest from before it has only `tp_dim`: one cut into tp / tp_replicas shards)."""
    cuts = entry.get("tp_cuts")
    if cuts is None:
        cuts = [] if entry["tp_dim"] is None else [[entry["tp_dim"], tp // entry["tp_replicas"], 1]]
    return join_shards([part[entry["key"]] for part in parts], [tuple(c) for c in cuts], entry["tp_replicas"])


def checkpoint_tensors(ckpt: Path, meta: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) of everything a native checkpoint holds, TP shards joined, one layer's
    files in memory at a time."""
    by_layer: dict[int, list[tuple[str, dict]]] = defaultdict(list)
    for name, entry in meta["tensors"].items():
        by_layer[entry["layer"]].append((name, entry))
    tp = meta["layout"]["tp"]
    for layer in sorted(by_layer):
        files = layer_files(ckpt, layer)
        if len(files) != tp:
            raise UserError(f"{ckpt}: layer {layer} has {len(files)} files, the checkpoint was saved at tp={tp}; "
                            f"it is damaged — export an older checkpoint")
        parts = [read_file(f, map_location="cpu", weights_only=True) for f in files]
        for name, entry in by_layer[layer]:
            yield name, _join_shards(parts, entry, tp)


def check_export_place(out_dir: Path) -> None:
    """Not a place a checkpoint save deletes or writes: a checkpoint (a folder with its manifest), a step_*,
    *.partial or *.old folder of a checkpoints root (pruning removes those), or the root itself."""
    path = out_dir.absolute()
    if (path / LATEST_NAME).is_file():
        raise UserError(f"{out_dir} is a checkpoints directory; export elsewhere, e.g. OUTPUT_DIR/export")
    for folder in (path, *path.parents):
        pruned = TAG_RE.match(folder.name) or folder.name.endswith((PARTIAL_SUFFIX, REPLACED_SUFFIX))
        if (folder / META_NAME).is_file() or (pruned and (folder.parent / LATEST_NAME).is_file()):
            raise UserError(f"{out_dir} lies in the checkpoint folder {folder}, which pruning old checkpoints "
                            f"deletes; export elsewhere, e.g. OUTPUT_DIR/export")


def _empty_out_dir(out_dir: str | Path, writes: set[str]) -> tuple[Path, list[Path]]:
    """`out_dir`, created, holding no weights nor any file of `writes` (the export overwrites none of a user's
    files), and outside any checkpoint root (whose pruning would delete it); with the folders this created."""
    out_dir = Path(out_dir)
    check_export_place(out_dir)
    created = [p for p in (out_dir, *out_dir.parents) if not p.exists()]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"{out_dir}: it or a folder above it is a file; export into a directory") from None
    if any(out_dir.glob("*.safetensors")) or (out_dir / INDEX_NAME).exists():
        raise UserError(f"{out_dir} already holds safetensors weights (a model or an adapter); export into an empty "
                        f"directory")
    taken = sorted(name for name in writes if (out_dir / name).exists())
    if taken:
        more = f" and {len(taken) - 1} more" if len(taken) > 1 else ""
        raise UserError(f"{out_dir} already holds {taken[0]}{more}, which the export would overwrite; move it "
                        f"elsewhere or export into an empty directory")
    return out_dir, created


@contextlib.contextmanager
def _removed_on_failure(out_dir: Path, writes: set[str], created: list[Path]) -> Iterator[None]:
    """An export that fails (a full disk, a damaged checkpoint, Ctrl-C) takes back what it wrote: the files it
    writes (`writes`, weights, index, unfinished shards), then each folder it created while that is empty.
    Entered after `_empty_out_dir`'s checks, so none of those names was a user's file."""
    try:
        yield
    except BaseException:
        if out_dir.is_dir():
            for path in out_dir.iterdir():
                if path.name in writes or path.name == INDEX_NAME or _OWN_FILE.match(path.name):
                    path.unlink(missing_ok=True)
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # refused while anything is in it
        raise


def export_hf(checkpoint: str | Path, out_dir: str | Path, *, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
              source: str | Path | None = None, merge: bool = False) -> Path:
    """Write the HF directory of a native checkpoint (a step_* dir, or a root holding `latest`).

    Weights: sharded safetensors + `model.safetensors.index.json`, every tensor in the dtype the
    source HF checkpoint stores it in; the source's audio tower (not trained here) copied unchanged. config.json, tokenizer, processor and chat-template files are
    copied from the source HF model recorded at save time, or from `source` if given (the source
    moved, or the checkpoint came from elsewhere). A LoRA checkpoint becomes a PEFT adapter
    directory, or with `merge` the source's weights with the adapters merged in.
    """
    ckpt = checkpoint_dir(checkpoint)
    meta = read_meta(ckpt)
    lora = meta.get("lora")
    if merge and not lora:
        raise UserError(f"{ckpt}: --merge merges LoRA adapters, but this checkpoint is a full fine-tune; export it "
                        f"without --merge")
    base = str(source or (lora["base"]["path"] if lora else meta["source"]))
    try:
        src = HFCheckpoint(base)
    except UserError as err:
        if source:
            raise
        raise UserError(f"{err}; {ckpt} records it as the model it was trained from: if that moved, pass it with "
                        f"--source DIR") from None
    if lora and base_identity(src.path, base)["fingerprint"] != lora["base"]["fingerprint"]:
        raise UserError(f"{ckpt} holds adapters for the base model {lora['base']['path']}, but {base} has another "
                        f"config or weight index; pass that base with --source")
    if not lora:
        check_same_tensors(ckpt, meta, src, base)
    copied = [f for f in src.path.iterdir() if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES)]
    adapter = lora and not merge
    writes = {ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME} if adapter else {f.name for f in copied}
    out_dir, created = _empty_out_dir(out_dir, writes)
    with _removed_on_failure(out_dir, writes, created):
        if adapter:
            return export_adapter(dict(checkpoint_tensors(ckpt, meta)), lora, base, out_dir)
        writer = ShardWriter(out_dir, max_shard_size)
        if lora:
            merge_adapters(dict(checkpoint_tensors(ckpt, meta)), lora, src, writer)
        else:
            written = set()
            for name, tensor in checkpoint_tensors(ckpt, meta):
                writer.add(name, tensor.to(src.dtype(name) if name in src else tensor.dtype))
                written.add(name)
            for name in src.weight_map:  # the audio tower (E2B/E4B): never built nor trained, copied as it is
                if name.startswith(AUDIO_PREFIXES) and name not in written:
                    writer.add(name, src.read_full(name))
        writer.close()
        for f in copied:
            shutil.copy(f, out_dir / f.name)
    return out_dir


def check_same_tensors(ckpt: Path, meta: dict, src: HFCheckpoint, base: str) -> None:
    """A full fine-tune's tensors are the source model's (its never-built audio tower aside): another
    model as `--source` (another family member or size) is refused before anything is written."""
    held = set(meta["tensors"])
    expected = {name for name in src.weight_map if not name.startswith(AUDIO_PREFIXES)}
    for names, where in ((held - expected, f"{ckpt}, not in {base}"), (expected - held, f"{base}, not in {ckpt}")):
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            raise UserError(f"{ckpt} was not trained from {base}: {sorted(names)[0]}{more} is in {where}; pass the HF "
                            f"model the run started from with --source (recorded at save: {meta['source']})")


def export_after_training(checkpoint: str | Path, out_dir: str | Path) -> Path | None:
    """`checkpoint.export: true`: every rank calls it after the last `native.save`; rank 0 writes
    the export (one streaming reader needs no collectives), the other ranks return at once rather
    than wait in a barrier that a long export would time out. It is written beside `out_dir` and
    then takes its place, so a continued or repeated run replaces its export, and an export that
    dies leaves the previous one."""
    if dist.get_rank() != 0:
        return None
    out_dir = Path(out_dir)
    meta = read_meta(checkpoint_dir(checkpoint))
    lora = meta.get("lora")
    # checked before training too; a user may have put files there since
    check_export_dir(out_dir, Path(lora["base"]["path"] if lora else meta["source"]), bool(lora))
    partial, replaced = out_dir.with_name(out_dir.name + ".partial"), out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(partial, ignore_errors=True)
    if lora:  # the PEFT adapter and the merged model; the merged one is what serves (and eval.generate answers)
        export_hf(checkpoint, partial / "adapter")
        export_hf(checkpoint, partial / "merged", merge=True)
    else:
        export_hf(checkpoint, partial)
    (partial / EXPORT_RECORD).write_text(json.dumps({"files": _files(partial)}))
    if out_dir.exists():
        shutil.rmtree(replaced, ignore_errors=True)
        out_dir.rename(replaced)
    partial.rename(out_dir)
    shutil.rmtree(replaced, ignore_errors=True)
    return out_dir / "merged" if lora else out_dir


def _files(folder: Path) -> list[str]:
    """Every file under `folder`, as paths relative to it."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())


def _written_before_records(names: list[str], source: Path, lora: bool) -> set[str]:
    """Of an export with no EXPORT_RECORD (written before it existed), what an end-of-run export wrote: a LoRA
    run's adapter/ and merged/, a full run's weights, index and the source model's other top-level files."""
    if lora:
        return {n for n in names if n.split("/", 1)[0] in ("adapter", "merged")}
    copied = {f.name for f in source.iterdir() if f.is_file()} if source.is_dir() else set()
    return {n for n in names if "/" not in n and (n in copied or n == INDEX_NAME or _SHARD_NAME.match(n))}


def foreign_files(out_dir: Path, source: Path, lora: bool) -> list[str]:
    """Files in an existing export directory that no end-of-run export wrote (EXPORT_RECORD lists what one did):
    a model exported by hand, a user's notes. Replacing the directory would delete them."""
    if not out_dir.is_dir():
        return []
    names = [n for n in _files(out_dir) if n != EXPORT_RECORD]
    try:
        written = set(json.loads((out_dir / EXPORT_RECORD).read_text())["files"])
    except FileNotFoundError:
        written = _written_before_records(names, source, lora)
    except (OSError, ValueError, KeyError, TypeError):
        written = set()
    return [n for n in names if n not in written]


def check_export_dir(out_dir: Path, source: Path, lora: bool) -> None:
    """`checkpoint.export` replaces OUTPUT_DIR/export whole: refuse while it holds files it did not write."""
    check_export_place(out_dir)
    foreign = foreign_files(out_dir, source, lora)
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise UserError(f"{out_dir} holds {', '.join(foreign[:3])}{more}, which no end-of-run export wrote, and "
                        f"checkpoint.export replaces that directory; move them elsewhere, or set checkpoint.export: "
                        f"false and export by hand: runner export {out_dir.parent / 'checkpoints'} OUT",
                        on_every_rank=True)


def _adapters(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """transformers module name → {"lora_A": …, "lora_B": …} from a LoRA checkpoint's tensors."""
    out: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for name, tensor in tensors.items():
        module, part, _ = name.rsplit(".", 2)
        if part in PARTS:
            out[module][part] = tensor
    return out


def export_adapter(tensors: dict[str, torch.Tensor], lora: dict, base: str, out_dir: Path) -> Path:
    """A PEFT adapter directory (adapter_config.json, adapter_model.safetensors under PEFT's key names) that
    `PeftModel.from_pretrained(base, out_dir)` loads; `base` (a directory or Hub id) is its base_model_name_or_path."""
    adapters = _adapters(tensors)
    save_file({peft_key(module, part): t.contiguous() for module, parts in adapters.items()
               for part, t in parts.items()},
              out_dir / ADAPTER_WEIGHTS_NAME, metadata={"format": "pt"})
    peft_config(LoraConfig(**lora["config"]), base).save_pretrained(str(out_dir))
    return out_dir


def merge_adapters(tensors: dict[str, torch.Tensor], lora: dict, src: HFCheckpoint, writer: ShardWriter) -> None:
    """Every weight of the base `src`, with W + scaling · B A on the adapted linears (PEFT's `merge_and_unload`),
    in the base's dtypes; one tensor in memory at a time besides the adapters."""
    cfg = LoraConfig(**lora["config"])
    adapters = _adapters(tensors)
    for name in src.weight_map:
        tensor = src.read_full(name)
        module = name.removesuffix(".weight")
        parts = adapters.get(module)
        if parts:
            delta = parts["lora_B"].float() @ parts["lora_A"].float() * cfg.scaling_of(module)
            tensor = (tensor.float() + delta).to(tensor.dtype)
        writer.add(name, tensor)
