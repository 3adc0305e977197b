"""Preflight: everything a run can check before its model is built (minutes on the 31B).

`runner train` runs it on every process before joining the process group, and `runner train
--check` (which launch.sh runs before starting processes) runs the same checks. Every process reads
the same recipe and files, so each failure is one `UserError` marked `on_every_rank`: one line per
job naming the path or key and the fix.

Order: the model directory's config, the recipe against the model (layout, split), the weights'
headers, tokenizer and processor, the data, the process count, the output directory, the checkpoint
to resume, the free disk.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.checkpoint import native
from runner.checkpoint.hf_load import INDEX_NAME, resolve_model_dir
from runner.config import RunConfig
from runner.data.sources import SampleSource, hold_out, load_source, same_rows
from runner.errors import UserError, from_the_recipe
from runner.parallel.topology import ParallelDims

MODEL_TYPE = "gemma4"
HEADER_LIMIT = 100 * 2**20  # safetensors refuses JSON headers larger than 100 MB


@dataclass
class Checked:
    """What the checks loaded, for the run to use instead of loading it again."""

    model_dir: Path
    config: Any  # transformers' Gemma4Config
    processor: Any
    train_source: SampleSource
    eval_source: SampleSource | None
    resume_from: Path | None  # the complete checkpoint to continue from
    resume_sizes: dict[str, int] | None = None  # its files' sizes, as checked (not stat'ed again)


def preflight(cfg: RunConfig, world_size: int | None) -> Checked:
    """All checks; `world_size`: the launcher's process count where known (tp·pp must divide it)."""
    with from_the_recipe():
        model_dir = resolve_model_dir(cfg.model.path)
        check_model_config(model_dir)
        config = model_checks(cfg, model_dir)
        check_weight_files(model_dir)
        processor = load_processor(model_dir)
        train_source, eval_source = data_sources(cfg)
        if world_size is not None:
            from runner.train import parallel_dims  # the rule `runner train` applies once processes exist

            parallel_dims(cfg, world_size)
        out_dir = Path(cfg.output.dir)
        check_writable_dir(out_dir, "output.dir")
        if (out_dir / "checkpoints").exists():
            check_writable_dir(out_dir / "checkpoints", "output.dir's checkpoints")
        check_output_dir(cfg, out_dir, model_dir)
        resume_from, resume_sizes = resume_checkpoint(cfg, out_dir / "checkpoints", model_dir)
        if cfg.checkpoint.every_steps or cfg.checkpoint.at_end:  # else only a SIGTERM saves (ENOSPC: one line)
            need = sum(resume_sizes.values()) if resume_from is not None else checkpoint_bytes(cfg, config)
            check_free_disk(out_dir, need)
    return Checked(model_dir, config, processor, train_source, eval_source, resume_from, resume_sizes)


def data_sources(cfg: RunConfig) -> tuple[SampleSource, SampleSource | None]:
    """The rows to train on and those to evaluate (None: no eval): data.eval's split, or without it the last
    data.eval_fraction of data.train's split, held out of training whether or not eval runs."""
    train = load_source(cfg.data.train, cfg.data.train_split)
    held_out = None
    if cfg.data.eval_fraction and not cfg.data.eval:
        name = f"data.train {cfg.data.train} [{cfg.data.train_split}]"
        train, held_out = hold_out(train, cfg.data.eval_fraction, name)
    if not cfg.eval.every_steps:
        return train, None
    return train, load_source(cfg.data.eval, cfg.data.eval_split) if cfg.data.eval else held_out


def check_model_config(model_dir: Path) -> None:
    """config.json is there, is JSON, and describes a Gemma4 model (another family fails far later)."""
    path = model_dir / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing; point model.path at a Hugging Face model directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not readable JSON ({err}); re-download the model's config.json") from None
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if model_type != MODEL_TYPE:
        raise UserError(f"{path}: model_type is {model_type!r}, this runner trains {MODEL_TYPE!r} "
                        f"(Gemma4ForConditionalGeneration); point model.path at a Gemma4 checkpoint")


def model_checks(cfg: RunConfig, model_dir: Path) -> Any:
    """The recipe against the model's config; returns the config."""
    from deepspeed.accelerator import get_accelerator
    from transformers import AutoConfig

    from runner.compat import set_attn_implementation
    from runner.models.gemma4.pipeline import check_supported, gemma4_layer_specs, stage_boundaries, validate_layout

    config = AutoConfig.from_pretrained(model_dir)
    set_attn_implementation(config.text_config, cfg.model.attn_implementation)
    if cfg.model.attn_implementation == "flex_attention" and get_accelerator().device_name() == "cpu":
        raise UserError("model.attn_implementation: flex_attention needs CUDA GPUs (PyTorch has no CPU "
                        "FlexAttention backward); use sdpa on CPU")
    check_supported(config)
    validate_layout(config, ParallelDims(cfg.parallel.tp, cfg.parallel.pp, ep=cfg.parallel.ep))  # the model's limits first
    stage_boundaries(gemma4_layer_specs(config, None), cfg.parallel.pp, cfg.parallel.stage_layers)  # a bad split
    from runner.lora import check_patterns

    check_patterns(cfg.lora, config)
    if cfg.moe.aux_loss_coef and not getattr(config.get_text_config(), "enable_moe_block", False):
        raise UserError(f"moe.aux_loss_coef={cfg.moe.aux_loss_coef} needs a mixture-of-experts model "
                        f"(text_config.enable_moe_block); this model is dense: remove moe.aux_loss_coef")
    if cfg.data.eval and same_rows((cfg.data.train, cfg.data.train_split), (cfg.data.eval, cfg.data.eval_split)):
        raise UserError(f"data.eval reads data.train's rows ({cfg.data.train} has one split, its name is ignored); "
                        f"give disjoint slices, e.g. data.train_split: 'train[:90%]' and data.eval_split: "
                        f"'train[90%:]', or another eval file")
    return config


def check_weight_files(model_dir: Path) -> None:
    """Every shard the index names exists, and every `*.safetensors` header parses with data offsets
    that end exactly at the file's end: a truncated download is found without reading a tensor."""
    index = model_dir / INDEX_NAME
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise UserError(f"{index}: not a safetensors index ({type(err).__name__}: {err}); "
                            f"re-download it with the model") from None
        missing = sorted(name for name in shards if not (model_dir / name).is_file())
        if missing:
            raise UserError(f"{model_dir / missing[0]}: shard file listed in {INDEX_NAME} is missing; "
                            f"re-download the model")
    for path in sorted(model_dir.glob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem:
            raise UserError(f"{path}: {problem}; the file is damaged or cut short, re-download it")


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's framing (None: nothing); reads only its header."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than a safetensors header"
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, HEADER_LIMIT):
            return f"header length {length} does not fit the file's {size} bytes"
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            return f"header is not valid JSON ({err})"
    if not isinstance(header, dict):
        return "header is not a JSON object"
    data = size - 8 - length
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and 0 <= offsets[0] <= offsets[1]):
            return f"tensor {name} has no valid data_offsets"
        end = max(end, offsets[1])
    if end != data:
        return f"tensors need {end} data bytes, the file holds {data}"
    return None


def load_processor(model_dir: Path) -> Any:
    """The tokenizer and processor; a missing or broken file is one line instead of transformers' trace."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(model_dir)
    except Exception as err:  # transformers raises OSError, ValueError, KeyError, … for missing or bad files
        reason = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise UserError(f"{model_dir}: the tokenizer/processor does not load ({reason}); it needs tokenizer.json, "
                        f"tokenizer_config.json and processor_config.json: copy them from the model's Hub repo") from None


def check_writable_dir(path: Path, key: str) -> None:
    """`path` is a directory this process may write into, or can be created as one."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{key} {path}: {existing} is a file, not a directory; point {key} at a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{key} {path}: {existing} is not writable by this user; fix its permissions or point "
                        f"{key} at a writable directory")


def check_not_locked(out_dir: Path) -> None:
    """No other job holds output.dir: `--check` only (launch.sh runs it before any process). A run's own ranks
    must not look, since rank 0 may have taken the job's lock while another rank still runs its preflight."""
    from runner.guard import LOCK_NAME, holder_error

    if (out_dir / LOCK_NAME).exists():
        raise holder_error(out_dir / LOCK_NAME)


def check_output_dir(cfg: RunConfig, out_dir: Path, model_dir: Path) -> None:
    """The end-of-run export would replace nothing a user put in OUTPUT_DIR/export, the adapter to start from
    included."""
    from runner.checkpoint.export import check_export_dir

    if not cfg.checkpoint.export:
        return
    export = out_dir / "export"
    check_export_dir(export, model_dir, cfg.lora.enabled)
    start = Path(cfg.lora.init_from).expanduser().resolve() if cfg.lora.init_from else None
    if start is not None and start.is_relative_to(export.resolve()):
        raise UserError(f"lora.init_from {cfg.lora.init_from} lies in {export}, which this run's checkpoint.export "
                        f"replaces when it ends; copy the adapter elsewhere and point lora.init_from there")


def resume_checkpoint(cfg: RunConfig, ckpt_root: Path, model_dir: Path) -> tuple[Path | None, dict[str, int]]:
    """The complete checkpoint the run continues from (None: a fresh start), its files whole, and their
    sizes (each file stat'ed once for the whole resume)."""
    resume_root = {"auto": ckpt_root, "none": None}.get(cfg.checkpoint.resume, Path(cfg.checkpoint.resume))
    if resume_root is None:
        if native.has_checkpoints(ckpt_root):  # saving would overwrite and prune them
            raise UserError(f"{ckpt_root} holds an earlier run's checkpoints and checkpoint.resume is none; continue "
                            f"that run with checkpoint.resume=auto, or start afresh in a new output.dir")
        return None, {}
    resume_from = native.latest_complete(resume_root)
    if resume_from is None:
        if resume_root != ckpt_root:
            raise UserError(f"checkpoint.resume={cfg.checkpoint.resume} holds no complete checkpoint; "
                            f"point it at a checkpoints directory with `latest`, or use auto / none")
        return None, {}
    from runner.lora import check_lora_resume

    meta = native.read_meta(resume_from)
    native.check_layout(resume_from, meta, ParallelDims(cfg.parallel.tp, cfg.parallel.pp, ep=cfg.parallel.ep))
    check_lora_resume(meta, cfg.lora, model_dir, cfg.model.path, resume_from)
    if cfg.train.max_steps:  # train.epochs' step count needs the data's DP split: checked again in train
        check_not_past_end(resume_from, meta["step"], cfg.train.max_steps)
    return resume_from, native.check_files(resume_from, meta)


def check_not_past_end(ckpt: Path, step: int, total_steps: int) -> None:
    """A checkpoint beyond the run's last step would train nothing, its LR schedule past its end."""
    if step > total_steps:
        raise UserError(f"{ckpt} is at step {step}, past this run's {total_steps} steps; set train.max_steps above "
                        f"{step} (or more train.epochs), or train afresh in a new output.dir", on_every_rank=True)


def checkpoint_bytes(cfg: RunConfig, config: Any) -> int:
    """About what one checkpoint of this run takes on disk: every weight in the recipe's dtype, plus
    Adam's two fp32 states (and an fp32 master copy under bf16) of every trainable weight."""
    from runner.plan import ADAM_STATE_BYTES, DTYPE_BYTES, MASTER_BYTES, model_params

    params = model_params(config, tp=1)
    layers = sum(params.per_type[t].full for t in config.text_config.layer_types)
    frozen = ((params.vision_tower if cfg.freeze.vision_tower else 0)
              + (params.embed_local if cfg.freeze.embeddings else 0)
              + (layers if cfg.freeze.language_model else 0))
    state = ADAM_STATE_BYTES + (MASTER_BYTES if cfg.model.dtype == "bfloat16" else 0)
    return params.total * DTYPE_BYTES[cfg.model.dtype] + (params.total - frozen) * state


def check_free_disk(out_dir: Path, need: int) -> None:
    """Room for one more checkpoint where output.dir is (older ones are pruned only after it is saved)."""
    existing = out_dir
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < need:
        raise UserError(f"output.dir {out_dir}: {_size(free)} free, one checkpoint needs about {_size(need)}; "
                        f"free space or point output.dir at a larger disk")


def summary(cfg: RunConfig, checked: Checked, world_size: int | None) -> str:
    """What the checks found, for `runner train --check` to print on success."""
    data = f"data {cfg.data.train} [{cfg.data.train_split}]: {len(checked.train_source)} samples"
    if checked.eval_source is not None:
        held = f"{cfg.data.eval} [{cfg.data.eval_split}]" if cfg.data.eval else f"held out ({cfg.data.eval_fraction:g})"
        data += f", eval {held}: {len(checked.eval_source)} samples"
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    layout = f"tp*pp={tp}*{pp}={tp * pp}" + (f" of {world_size} processes" if world_size is not None else "")
    out_dir = existing = Path(cfg.output.dir)
    while not existing.exists():
        existing = existing.parent
    resume = f", resumes {checked.resume_from}" if checked.resume_from is not None else ""
    return (f"model {checked.model_dir}, {data}, {layout}, output.dir {out_dir} writable{resume}, "
            f"free disk {_size(shutil.disk_usage(existing).free)}")


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
