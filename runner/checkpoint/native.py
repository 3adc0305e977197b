"""Native checkpoints: DeepSpeed's per-rank files, made complete-or-invisible, plus exact resume.

The trainer's API (every rank calls each, after `deepspeed.initialize`):

    save(engine, root, step, client_state, source=model_path, keep=K) -> Path
    resume(engine, root) -> client_state | None
    latest_complete(root) -> Path | None

Under a checkpoint root (e.g. OUTPUT_DIR/checkpoints):

    latest                        tag of the newest complete checkpoint (DeepSpeed's format, written
                                  atomically by rank 0 after every rank finished writing)
    step_00000100/                one complete checkpoint
        layer_LL-model_TT-model_states.pt    layer LL, TP shard TT (DeepSpeed, DP rank 0 writes)
        mp_rank_MM_model_states.pt           DeepSpeed engine state: optimizer, LR scheduler, step,
                                             and the trainer's client_state (data position)
        rng/rank_RRRRR.pt                    python / numpy / torch (/ cuda) RNG of global rank R
        runner_checkpoint.json               layout, source HF model, HF tensor → layer file map,
                                             and every other file's size as written (`files`)
    step_00000200.partial/        a save in progress, or one that died: never read, pruned later
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
import stat
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from runner.checkpoint.engine import DAMAGED, install, read_file, stage_layers
from runner.errors import UserError
from runner.guard import weights_finite
from runner.parallel.topology import ParallelDims

META_NAME = "runner_checkpoint.json"
LATEST_NAME = "latest"
PARTIAL_SUFFIX = ".partial"
REPLACED_SUFFIX = ".old"  # a checkpoint of the same step, moved aside while its successor is published
TAG_RE = re.compile(r"^step_(\d+)$")
CLIENT_KEY = "runner"  # the trainer's client_state, one key among DeepSpeed's own in mp_rank_* files


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def tensor_manifest(model) -> dict[str, dict]:
    """HF name → {layer, key, tp_cuts, tp_replicas} for the tensors this rank's layer files hold:
    which `layer_LL-*` files, which key inside them, and how TP cut them (what export undoes;
    `tp_dim` also, for readers of checkpoints that predate `tp_cuts`)."""
    layer_of = {id(module): index for index, module in stage_layers(model).items()}
    manifest = {}
    for name, tensor, module in model.hf_tensors():
        if id(module) in layer_of and model.checkpointed(tensor):  # the tied head on the last stage has no file
            manifest[name] = {
                "layer": layer_of[id(module)],
                "key": name[len(module.hf_prefix):],
                "tp_dim": getattr(tensor, "tp_dim", None),
                "tp_cuts": [list(cut) for cut in getattr(tensor, "tp_cuts", ())],
                "tp_replicas": getattr(tensor, "tp_replicas", 1),
            }
    return manifest


def _gather_manifest(model) -> dict[str, dict]:
    """The whole model's manifest on rank 0 (one TP/DP rank per stage contributes); {} elsewhere."""
    ps = model.ps
    local = tensor_manifest(model) if ps.tp_rank == 0 and ps.dp_rank == 0 else {}
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local, parts, dst=0)
    return {k: v for part in parts or [] for k, v in part.items()}


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# 2: the optimizer's matrices in several groups per stage (runner/optim.py); format 1 had one group
FORMAT = 2


def read_meta(ckpt: Path) -> dict:
    meta = Path(ckpt) / META_NAME
    if not meta.is_file():
        raise UserError(f"{ckpt}: no {META_NAME}; not a complete runner checkpoint (pass a checkpoint root with "
                        f"`{LATEST_NAME}` or one of its step_* directories)")
    try:
        return json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{meta}: not valid JSON ({err}); {DAMAGED}") from None


def layer_files(ckpt: Path, layer: int) -> list[Path]:
    """A layer's files, one per TP shard, in shard order."""
    return sorted(ckpt.glob(f"layer_{layer:02d}-*model_states.pt"))


def has_checkpoints(root: Path) -> bool:
    """Whether a checkpoint root already holds a run's checkpoints (`latest` or a step_* dir)."""
    return (root / LATEST_NAME).is_file() or (root.is_dir() and any(TAG_RE.match(p.name) for p in root.iterdir()))


def check_layout(path: Path, meta: dict, dims: ParallelDims) -> str:
    """The checkpoint's format, tp, pp and experts' split against this run's (what the recipe alone
    decides, so `runner train --check` runs it too); returns the fix for another layout."""
    fresh = f"export it (`runner export {path} OUT_DIR`), then train with model.path=OUT_DIR and a new output.dir"
    if meta.get("format", 1) != FORMAT:
        raise UserError(f"{path} has checkpoint format {meta.get('format', 1)}, this runner resumes format {FORMAT} "
                        f"(its optimizer groups changed); {fresh}", on_every_rank=True)
    saved = meta["layout"]
    if (saved["tp"], saved["pp"]) != (dims.tp, dims.pp):
        raise UserError(f"{path} was saved at tp={saved['tp']}, pp={saved['pp']} but this run uses tp={dims.tp}, "
                        f"pp={dims.pp}; resume at that layout, or {fresh} (optimizer state is not carried over)",
                        on_every_rank=True)
    saved_ep = saved.get("ep") or saved["tp"]  # unset: ep = tp (dense models: always)
    if saved_ep != dims.ep_size:
        raise UserError(f"{path} was saved at parallel.ep={saved_ep} but this run uses parallel.ep={dims.ep_size} "
                        f"(experts split another way); set parallel.ep: {saved_ep} to resume, or {fresh}",
                        on_every_rank=True)
    return fresh


def check_resumable(path: Path, dims: ParallelDims, zero: bool, sizes: dict[str, int] | None = None) -> dict:
    """The checks a resume needs from the checkpoint's files alone — format, layout, every file there —
    run before the model is built (minutes on the 31B); returns the checkpoint's metadata. Every
    process reads the same files, so each error is one line per job. `sizes`: what `check_files` found
    on this checkpoint in this process already (the preflight): its files are not stat'ed again."""
    meta = read_meta(path)
    fresh = check_layout(path, meta, dims)
    saved = meta["layout"]
    if saved["dp"] != dims.dp and zero:
        raise UserError(f"{path} was saved at dp={saved['dp']} but this run uses dp={dims.dp}; ZeRO's partitioned "
                        f"optimizer state cannot be re-split: resume at dp={saved['dp']}, or {fresh}", on_every_rank=True)
    wanted = {f"mp_rank_{i:02d}_model_states.pt" for i in range(dims.tp * dims.pp)}
    wanted |= {f"rng/rank_{i:05d}.pt" for i in range(dims.tp * dims.pp * saved["dp"])}
    missing = sorted(name for name in wanted if (name not in sizes if sizes is not None else not (path / name).is_file()))
    found = {layer: len(layer_files(path, layer)) for layer in sorted({e["layer"] for e in meta["tensors"].values()})}
    missing += [f"layer {layer}: {n} of {dims.tp} files" for layer, n in found.items() if n != dims.tp]
    if missing:
        raise UserError(f"{path}: {missing[0]} missing{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; "
                        f"{DAMAGED}", on_every_rank=True)
    if sizes is None:
        check_files(path, meta)
    return meta


def latest_complete(root: str | Path) -> Path | None:
    """The checkpoint to continue from at `root`: the one its `latest` names, `root` itself when it
    is a checkpoint directory itself, None when nothing was saved there yet."""
    root = Path(root)
    if (root / META_NAME).is_file() and not root.name.endswith(PARTIAL_SUFFIX):
        return root
    latest = root / LATEST_NAME
    if not latest.is_file():
        return None
    try:
        tag = latest.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{latest}: cannot be read as text ({err}); {DAMAGED}") from None
    if not TAG_RE.match(tag):
        raise UserError(f"{latest}: names {tag[:40]!r}, not a step_N checkpoint of this directory; {DAMAGED}")
    path = root / tag
    read_meta(path)
    return path


def _file_size(path: Path) -> int | None:
    """Bytes of a regular file (one stat), None when there is none."""
    try:
        found = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return found.st_size if stat.S_ISREG(found.st_mode) else None


def file_sizes(ckpt: Path) -> dict[str, int]:
    """Every file of a checkpoint directory but its metadata: relative name → bytes."""
    sizes = {p.relative_to(ckpt).as_posix(): _file_size(p) for p in sorted(ckpt.rglob("*")) if p.name != META_NAME}
    return {name: size for name, size in sizes.items() if size is not None}


def check_files(ckpt: Path, meta: dict) -> dict[str, int]:
    """Every file the save recorded is there with the size it was written at (checkpoints from before
    the size record: no file is empty), so a truncated file is found before the model is built.
    Returns the files' sizes (what a resume needs free on disk, and `check_resumable` reads)."""
    recorded = meta.get("files")
    if recorded is None:
        sizes = file_sizes(ckpt)
        bad = [f"{name} is empty" for name, size in sizes.items() if size == 0]
    else:
        bad, sizes = [], {}
        for name, size in recorded.items():
            found = _file_size(ckpt / name)
            if found is None:
                bad.append(f"{name} missing")
            elif found != size:
                bad.append(f"{name} has {found} bytes, the save wrote {size}")
            else:
                sizes[name] = found
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise UserError(f"{ckpt}: {bad[0]}{more}; {DAMAGED}", on_every_rank=True)
    return sizes


def _prune(root: Path, keep: int, latest: Path) -> None:
    """Keep the newest `keep` complete checkpoints (and always `latest`); drop the leftovers of
    saves that died (`*.partial`) and of replaced checkpoints."""
    complete = sorted((p for p in root.iterdir() if p.is_dir() and TAG_RE.match(p.name)),
                      key=lambda p: int(TAG_RE.match(p.name)[1]))
    doomed = [p for p in complete[:-keep] if p != latest]
    doomed += [p for p in root.iterdir() if p.is_dir() and p.name.endswith((PARTIAL_SUFFIX, REPLACED_SUFFIX))]
    for path in doomed:
        shutil.rmtree(path)


def _publish(root: Path, partial: Path, final: Path, keep: int) -> None:
    """Rank 0, after every rank finished writing: make the checkpoint visible, then prune."""
    replaced = final.with_name(final.name + REPLACED_SUFFIX)
    if final.exists():  # the same step saved again (e.g. the end-of-training save after a periodic one)
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(partial, final)
    _write_atomic(root / LATEST_NAME, final.name)
    _prune(root, keep, final)


def save(engine, root: str | Path, step: int, client_state: dict, *, source: str | Path, keep: int = 2) -> Path:
    """Save a native checkpoint of `step` under `root`; every rank calls it. Returns its directory.

    DeepSpeed writes model (per layer and TP shard), optimizer, LR scheduler and step under a
    temporary `step_N.partial` tag; each rank adds its RNG states; rank 0 adds the manifest (layout,
    `source` — the HF model dir or Hub id the run started from, whose config, tokenizer and
    processor export copies — and every HF tensor's layer file and TP cut). Only after a barrier
    does rank 0 rename it to `step_N`, point `latest` at it (atomic replace) and delete all but the
    newest `keep`: a save that dies on any rank leaves `latest` on the previous complete checkpoint.
    Weights with an inf or NaN on any rank are refused before anything is written, so every
    published checkpoint is finite and keep-K never prunes the last finite one for a broken one.
    `client_state` (e.g. {"step": …, "sampler": {…}}) comes back from `resume`.
    """
    if keep < 1:
        raise UserError(f"checkpoint.keep must be >= 1, got {keep}")
    root = Path(root)
    if not weights_finite(engine.module):
        latest = root / LATEST_NAME
        kept = f"{root / latest.read_text().strip()} stays the latest" if latest.is_file() else "none was saved before"
        raise UserError(f"step {step}: the weights hold inf/NaN values, not saved as a checkpoint ({kept}); the run "
                        f"diverged: start afresh with a lower optim.lr or more optim.warmup_steps", on_every_rank=True)
    install(engine)
    final = root / tag_for(step)
    partial = root / (final.name + PARTIAL_SUFFIX)
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)  # an earlier save of this step that died
    dist.barrier()
    with _disk_full_is_one_line(partial):
        engine.save_checkpoint(str(root), tag=partial.name, client_state={CLIENT_KEY: client_state}, save_latest=False,
                               exclude_frozen_parameters=bool(engine.module.lora))
        rng_dir = partial / "rng"
        rng_dir.mkdir(exist_ok=True)
        torch.save(_rng_state(), rng_dir / f"rank_{rank:05d}.pt")
    manifest = _gather_manifest(engine.module)
    dist.barrier()  # every rank's files are on disk
    if rank == 0:
        source_path = Path(source).expanduser()
        meta = {
            "format": FORMAT,
            "step": step,
            "layout": asdict(engine.module.ps.dims),
            "stage_layers": engine.module.stage_layer_counts(),
            "source": str(source_path.resolve()) if source_path.is_dir() else str(source),
            "tensors": manifest,
            "files": file_sizes(partial),  # what resume checks before building the model
            **({"lora": engine.module.lora} if engine.module.lora else {}),  # adapters only, and the base they need
        }
        with _disk_full_is_one_line(partial):
            (partial / META_NAME).write_text(json.dumps(meta, indent=1))
        _publish(root, partial, final, keep)
    dist.barrier()
    return final


@contextlib.contextmanager
def _disk_full_is_one_line(partial: Path) -> Iterator[None]:
    """A write that runs out of space (torch.save reports it as a RuntimeError) is one line naming
    the checkpoint; `latest` stays on the previous one."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        full = getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "file write failed" in str(err)
        if not full:
            raise
        free = shutil.disk_usage(partial.parent).free / 2**30
        raise UserError(f"{partial}: the disk ran out of space while saving ({free:.1f} GiB free now); free space "
                        f"or point output.dir at a larger disk, then resume (checkpoint.resume=auto) from the "
                        f"last complete checkpoint") from None


def resume(engine, root: str | Path) -> dict | None:
    """Load the latest complete checkpoint under `root` into `engine` — model, optimizer, LR
    scheduler, DeepSpeed's step counters — restore this rank's RNG states and return the trainer's
    client_state; None (nothing loaded) when `root` holds no checkpoint yet. Every rank calls it.

    The checkpoint must have been saved at the same tp and pp (another layout goes through
    `runner export` and a fresh start from the export), and at the same dp under ZeRO. RNG states
    are restored only when dp is the same too; with another dp the data order changes anyway.
    """
    path = latest_complete(root)
    if path is None:
        return None
    dims = engine.module.ps.dims
    meta = check_resumable(path, dims, engine.zero_optimization())
    saved_split, split = meta.get("stage_layers"), engine.module.stage_layer_counts()
    if saved_split is not None and saved_split != split:
        raise UserError(f"{path} was saved with {saved_split} decoder layers per stage but this run splits {split}; "
                        f"set parallel.stage_layers: {saved_split} to resume, or export and start fresh", on_every_rank=True)
    install(engine)
    # a LoRA checkpoint holds no frozen base weights (check_layer_state checks what it holds)
    _, client = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=not engine.module.lora)
    if meta["layout"]["dp"] == dims.dp:  # (tp and pp are equal: checked above)
        _set_rng_state(read_file(path / "rng" / f"rank_{dist.get_rank():05d}.pt", weights_only=False))
    return client[CLIENT_KEY]
