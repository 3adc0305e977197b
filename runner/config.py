"""The recipe schema: typed sections, YAML loading, `--set a.b=c` overrides, one-line errors.

A recipe is one YAML file (see recipes/). Every key has a default here, so a recipe states only
what differs. Unknown keys, wrong types and impossible values stop the run before any process
group or model is built, with one line naming the file, the key and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from runner.errors import UserError


@dataclass
class ModelConfig:
    path: str = "google/gemma-4-31B-it"  # hub id or local HF directory
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    # flex_attention: PyTorch's FlexAttention (block-sparse sliding windows, 512-wide full-layer heads);
    # CUDA only, compiled on first use
    attn_implementation: Literal["sdpa", "eager", "flex_attention"] = "sdpa"
    fused_rms_norm: bool = True  # PyTorch's fused RMSNorm kernel; false: transformers' op-by-op RMSNorm
    # under flex_attention, the backward of heads wider than 256 (the 31B's full layers): batched GEMMs from
    # FlexAttention's log-sum-exp (runner/models/gemma4/attention.py; 2x faster on an H100) or FlexAttention's
    # own kernel. auto: gemm under flex_attention (other attention implementations have their own backward)
    wide_head_backward: Literal["auto", "flex", "gemm"] = "auto"

    @property
    def wide_head_gemm(self) -> bool:
        """Whether the wide heads' backward runs as GEMMs (config validation ties `gemm` to flex_attention)."""
        return self.attn_implementation == "flex_attention" and self.wide_head_backward != "flex"


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    dp: int | Literal["auto"] = "auto"  # auto: world size / (tp * pp)
    # Megatron's sequence parallelism: between the TP blocks each TP rank keeps 1/tp of the sequence
    # (norms, residuals and the activations sent between stages); needs sequences in multiples of tp
    sequence_parallel: bool = False
    # decoder layers per pipeline stage, first to last (empty: even split); e.g. [7, 5]
    stage_layers: list[int] = field(default_factory=list)
    # how long a collective waits for every rank before the job stops with one line naming the rank and
    # the operation (fractions allowed); a frozen or dead rank otherwise hangs the job forever
    timeout_minutes: float = 30.0
    # mixture-of-experts models: expert-parallel size inside the TP group (null: tp). TP rank r holds the
    # experts of EP rank r // (tp / ep), each expert's width split over the tp / ep ranks of its EP group
    ep: int | None = None

    @property
    def seq_slices(self) -> int:
        """Into how many slices each sequence is cut between the TP blocks (tp under sequence parallelism)."""
        return self.tp if self.sequence_parallel else 1


@dataclass
class TrainConfig:
    micro_batch_size: int = 1
    global_batch_size: int = 8
    max_steps: int = 0  # 0: run `epochs` epochs
    epochs: int = 1
    seed: int = 42
    grad_clip: float = 1.0  # 0 disables clipping
    activation_checkpointing: bool = False
    # with activation_checkpointing: how many decoder layers per pipeline stage recompute their forward
    # in backward (the first ones of the stage, Megatron's "block" method); the rest keep their
    # activations, trading memory (runner plan shows it) for less recompute. None: all of them
    recompute_num_layers: int | None = None
    # a step whose loss or grad norm is inf/NaN never updates the weights; stop: end the run there
    # (exit 2, nothing saved); skip: drop that global batch and go on, stopping after
    # max_nonfinite_steps such steps in a row
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_nonfinite_steps: int = 5


@dataclass
class FreezeConfig:
    embeddings: bool = False
    vision_tower: bool = False
    language_model: bool = False


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraConfig:
    """LoRA adapters in the decoder layers' linears (and the vision encoder's); the base model frozen. Keys and
    defaults are PEFT's `LoraConfig` (r, lora_alpha, lora_dropout, target_modules, use_rslora, init_lora_weights)."""

    enabled: bool = False
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    vision_tower: bool = False  # adapters on the same target_modules of the vision encoder's layers too
    init: Literal["peft_default", "gaussian"] = "peft_default"  # A Kaiming-uniform (gaussian: N(0, 1/r)), B zeros
    use_rslora: bool = False  # scaling alpha / sqrt(rank) instead of alpha / rank
    # PEFT's per-module settings: module-name regex -> rank / alpha, matched at the name's end
    # ({"mlp.down_proj": 32, "layers.0.self_attn.q_proj": 4}); other adapted linears take rank / alpha
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    init_from: str = ""  # a PEFT adapter directory to continue; its settings (r, alpha, patterns, …) are taken

    def rank_of(self, module: str) -> int:
        """The rank of the adapter on transformers module `module` (rank_pattern, matched as PEFT matches it)."""
        from runner.compat import peft_pattern_value

        return peft_pattern_value(self.rank_pattern, module, self.rank)

    def scaling_of(self, module: str) -> float:
        """The scaling of the adapter on `module`: its alpha / rank (or / sqrt(rank) with use_rslora)."""
        from runner.compat import peft_pattern_value

        rank, alpha = self.rank_of(module), peft_pattern_value(self.alpha_pattern, module, self.alpha)
        return alpha / (rank**0.5 if self.use_rslora else rank)


@dataclass
class MoeConfig:
    # weight of the Switch-style load-balancing loss (transformers' `load_balancing_loss_func`, per layer and
    # micro-batch, averaged); 0 trains transformers' Gemma4 objective exactly
    aux_loss_coef: float = 0.0


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine decays lr to lr * min_lr_ratio at the last step
    schedule: Literal["cosine", "constant"] = "cosine"


@dataclass
class DataConfig:
    train: str = ""  # hub id, local dataset dir/file, or chat JSONL
    train_split: str = "train"
    eval: str = ""  # empty: no eval, or data.eval_fraction's held-out rows
    eval_split: str = "validation"
    # > 0 with data.eval empty: the last fraction of data.train's split is held out, evaluated and not trained
    # on (cut as `train[:90%]` / `train[90%:]` cut); ignored when data.eval names an eval set
    eval_fraction: float = 0.0
    max_length: int = 2048
    thinking_prefix: bool = False
    on_bad_sample: Literal["skip", "raise"] = "skip"
    num_workers: int = 0
    group_by_length: bool = True
    pad_to_multiple_of: int = 8  # dynamic padding granularity: fewer distinct shapes, more padding
    buckets: list[int] = field(default_factory=list)  # fixed lengths to pad up to (empty: dynamic)
    # whole samples packed first-fit into rows of at most pack_length tokens, each blind to the others
    # (runner/data/packing.py): a step keeps train.global_batch_size samples, in as few micro-batches of
    # train.micro_batch_size rows as they fill, each padded to its longest row (pad_to_multiple_of)
    packing: bool = False
    pack_length: int = 4096

    @property
    def row_length(self) -> int:
        """The longest row a micro-batch holds: a packed row, or a padded sample."""
        return self.pack_length if self.packing else self.max_length


@dataclass
class EvalConfig:
    every_steps: int = 0  # 0: never
    max_batches: int = 0  # global batches per eval; 0: the whole split
    # after the export, rank 0 answers data.eval with it (greedy, runner/evaluate.py; max_batches global
    # batches of questions) and logs exact match / F1 / yes-no accuracy as a {"split": "generate"} line
    generate: bool = False


@dataclass
class OutputConfig:
    dir: str = "runs/default"


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0: only at the end and on SIGTERM
    keep: int = 2
    resume: str = "auto"  # auto: newest complete checkpoint in output.dir; none; or a checkpoint path
    export: bool = False  # HF export to OUTPUT_DIR/export at the end
    at_end: bool = True  # save when training ends (benchmarks turn it off; SIGTERM always saves)


@dataclass
class LoggingConfig:
    every_steps: int = 1
    tensorboard: bool = True
    progress_bar: bool = True
    profile_step: int = 0  # >0: torch.profiler around that step; kernel table in OUTPUT_DIR/profile_rank0.txt


@dataclass
class ClusterConfig:
    # memory of one GPU in GiB (nvidia-smi's MiB / 1024: 80 for H100/A100 80 GB, 140 for H200 141 GB): `runner plan`
    # warns above it and fits its suggestions in 90% of it (`--gpu-mem-gib` overrides)
    gpu_mem_gib: float = 80.0


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    moe: MoeConfig = field(default_factory=MoeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """`value` as type `tp`, or a UserError naming the key."""
    if isinstance(value, float) and not math.isfinite(value):  # YAML's .inf / .nan, wherever they are
        raise UserError(f"{source}: {key} = {value!r} is not a finite number; give a finite value")
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(a) for a in typing.get_args(tp))
            raise UserError(f"{source}: {key} = {value!r} is not one of {choices}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key, source)
            except UserError:
                continue
        raise UserError(f"{source}: {key} = {value!r} has the wrong type; expected {_type_name(tp)}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise UserError(f"{source}: {key} = {value!r} must be a list of {_type_name(item)}")
        return [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        keys, values = typing.get_args(tp)
        if not isinstance(value, dict):
            raise UserError(f"{source}: {key} = {value!r} must be a mapping of {_type_name(keys)} to "
                            f"{_type_name(values)}")
        for k, v in value.items():
            if isinstance(v, dict):  # --set lora.rank_pattern.mlp.down_proj=4 splits the key at its dots
                raise UserError(f"{source}: {key}[{k!r}] = {v!r} must be {_type_name(values)}; a key with dots goes "
                                f"in braces: --set '{key}={{{k}.{next(iter(v), '')}: …}}'")
        return {_coerce(k, keys, f"{key} key {k!r}", source): _coerce(v, values, f"{key}[{k!r}]", source)
                for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads 1e-5 (no dot) as a string
        try:
            number = float(value)
        except ValueError:
            pass
        else:
            return _coerce(number, tp, key, source)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise UserError(f"{source}: {key} = {value!r} has the wrong type; expected {_type_name(tp)}")
    return value


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping of {} to {}".format(*map(_type_name, typing.get_args(tp)))
    return getattr(tp, "__name__", str(tp))


def _build(cls: type, data: dict[str, Any], prefix: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise UserError(f"{source}: {prefix.rstrip('.') or 'the recipe'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise UserError(f"{source}: unknown key '{prefix}{key}'; known keys here: {', '.join(sorted(known))}")
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{prefix}{key}.", source)
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}", source)
    return cls(**kwargs)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`a.b=c` pairs into the nested recipe dict; values are parsed as YAML (`lr=2e-5`, `export=true`)."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key=value, e.g. --set train.max_steps=10")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw else ""
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {item!r}: {part} is not a section")
        node[parts[-1]] = value
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a recipe, apply `--set` overrides, check types and values."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe {path} does not exist; pass a YAML file such as recipes/tiny_demo.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    data = apply_overrides(data, overrides or [])
    source = f"{path} with --set" if overrides else str(path)  # a bad key or value may come from either
    cfg = _build(RunConfig, data, "", source)
    validate(cfg, source)
    if cfg.lora.enabled and cfg.lora.init_from:  # continue a PEFT adapter: its settings, as PEFT would load it
        from runner.lora import adopt_adapter_config

        cfg.lora = adopt_adapter_config(cfg.lora, set(data.get("lora") or {}), source)
    return cfg


def divisors(n: int) -> str:
    """The divisors of n >= 1 in words ("1, 2 or 4"), for messages that ask for one."""
    found = [str(d) for d in range(1, max(n, 1) + 1) if n % d == 0]
    return found[0] if len(found) == 1 else f"{', '.join(found[:-1])} or {found[-1]}"


def lora_pattern_problem(rank_pattern: dict, alpha_pattern: dict, prefix: str) -> str:
    """What is wrong with these rank / alpha patterns (empty when nothing): each key a regex, each rank an
    integer >= 1, each alpha a number > 0. `prefix` names where they come from in the message."""
    for name, pattern, ok, want in (
            ("rank_pattern", rank_pattern, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
             "an integer >= 1"),
            ("alpha_pattern", alpha_pattern, lambda v: isinstance(v, int | float) and not isinstance(v, bool)
             and math.isfinite(v) and v > 0, "a number > 0")):
        if not isinstance(pattern, dict):
            return f"{prefix}{name} = {pattern!r} must be a mapping of module-name regex to {want}"
        for key, value in pattern.items():
            try:
                re.compile(rf"(.*\.)?({key})$")
            except (re.error, TypeError) as err:
                return (f"{prefix}{name} key {key!r} is not a regular expression ({err}); give the end of a module "
                        f"name such as mlp.down_proj")
            if not ok(value):
                return f"{prefix}{name}[{key!r}] = {value!r} must be {want}"
    return ""


def validate(cfg: RunConfig, source: str) -> None:
    """Value checks that need no model and no processes."""
    slices = max(cfg.parallel.seq_slices, 1)  # (tp < 1 is refused below)
    split = f"parallel.sequence_parallel splits every sequence into tp={cfg.parallel.tp} slices"
    unknown_targets = [name for name in cfg.lora.target_modules if name not in LORA_TARGETS]
    pattern_problem = lora_pattern_problem(cfg.lora.rank_pattern, cfg.lora.alpha_pattern, "lora.")
    checks = [
        (cfg.parallel.tp >= 1, "parallel.tp must be >= 1"),
        (cfg.parallel.pp >= 1, "parallel.pp must be >= 1"),
        (cfg.parallel.dp == "auto" or cfg.parallel.dp >= 1, "parallel.dp must be >= 1 or 'auto'"),
        (cfg.train.micro_batch_size >= 1, "train.micro_batch_size must be >= 1"),
        (cfg.train.global_batch_size >= 1, "train.global_batch_size must be >= 1"),
        (cfg.train.max_steps >= 0, "train.max_steps must be >= 0 (0: train for train.epochs epochs)"),
        (cfg.train.epochs >= 1, "train.epochs must be >= 1"),
        (cfg.train.grad_clip >= 0, "train.grad_clip must be >= 0 (0 disables clipping)"),
        (cfg.train.recompute_num_layers is None or cfg.train.recompute_num_layers >= 0,
         "train.recompute_num_layers must be >= 0, or null to recompute every decoder layer"),
        (cfg.train.recompute_num_layers is None or cfg.train.activation_checkpointing,
         "train.recompute_num_layers needs train.activation_checkpointing: true"),
        (cfg.train.max_nonfinite_steps >= 1, "train.max_nonfinite_steps must be >= 1"),
        (cfg.parallel.ep is None or (cfg.parallel.ep >= 1 and cfg.parallel.tp % cfg.parallel.ep == 0),
         f"parallel.ep={cfg.parallel.ep} must be >= 1 and divide parallel.tp={cfg.parallel.tp} (experts are split "
         f"inside the TP group); choose ep from {divisors(cfg.parallel.tp)}, or leave it unset (= tp)"),
        (cfg.moe.aux_loss_coef >= 0, f"moe.aux_loss_coef={cfg.moe.aux_loss_coef} must be >= 0 (0: no load-balancing "
         f"loss, transformers' objective; Mixtral's default is 0.001)"),
        (cfg.parallel.timeout_minutes > 0, "parallel.timeout_minutes must be > 0 (fractions allowed, e.g. 0.5)"),
        (cfg.model.wide_head_backward != "gemm" or cfg.model.attn_implementation == "flex_attention",
         "model.wide_head_backward: gemm needs model.attn_implementation: flex_attention"),
        (cfg.optim.lr > 0, "optim.lr must be > 0"),
        (len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas), "optim.betas must be two numbers in [0, 1)"),
        (cfg.optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
        (cfg.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0"),
        (0 <= cfg.optim.min_lr_ratio <= 1, "optim.min_lr_ratio must be in [0, 1]"),
        (cfg.data.max_length >= 16, "data.max_length must be >= 16"),
        (cfg.data.pad_to_multiple_of >= 1, "data.pad_to_multiple_of must be >= 1"),
        (cfg.data.pad_to_multiple_of % slices == 0,
         f"{split}: set data.pad_to_multiple_of to a multiple of {slices} (now {cfg.data.pad_to_multiple_of})"),
        (bool(cfg.data.buckets) or cfg.data.max_length % slices == 0,
         f"{split} and samples are padded up to data.max_length at most: set it to a multiple of {slices} "
         f"(now {cfg.data.max_length})"),
        (not cfg.data.buckets or max(cfg.data.buckets) >= cfg.data.max_length,
         f"data.buckets {cfg.data.buckets} must include a length >= data.max_length {cfg.data.max_length}"),
        (all(b % slices == 0 for b in cfg.data.buckets),
         f"{split}: make every data.buckets length a multiple of {slices} (now {cfg.data.buckets})"),
        (not cfg.data.packing or cfg.data.pack_length >= cfg.data.max_length,
         f"data.pack_length {cfg.data.pack_length} is below data.max_length {cfg.data.max_length}: a sample may not "
         f"fit a row; raise data.pack_length or lower data.max_length"),
        (not cfg.data.packing or cfg.data.pack_length % slices == 0,
         f"{split}: set data.pack_length to a multiple of {slices} (now {cfg.data.pack_length})"),
        (not (cfg.data.packing and cfg.data.buckets),
         "data.buckets pads unpacked micro-batches; packed ones are padded to their longest row: remove data.buckets"),
        (bool(cfg.data.train), "data.train is empty; set it to a dataset (hub id, local dir or JSONL file)"),
        (cfg.checkpoint.keep >= 1, "checkpoint.keep must be >= 1"),
        (cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps must be >= 0"),
        (cfg.eval.every_steps >= 0, "eval.every_steps must be >= 0"),
        (cfg.eval.max_batches >= 0, "eval.max_batches must be >= 0 (0: the whole eval split)"),
        (not cfg.eval.generate or (cfg.checkpoint.export and bool(cfg.data.eval)),
         "eval.generate answers data.eval with the export: set checkpoint.export: true and data.eval "
         "(data.eval_fraction's held-out rows get the loss only)"),
        (0 <= cfg.data.eval_fraction < 1, "data.eval_fraction must be in [0, 1) (0: no held-out rows, e.g. 0.1)"),
        (cfg.data.num_workers >= 0, "data.num_workers must be >= 0"),
        (cfg.logging.every_steps >= 1, "logging.every_steps must be >= 1"),
        (cfg.logging.profile_step >= 0, "logging.profile_step must be >= 0"),
        (cfg.cluster.gpu_mem_gib > 0, "cluster.gpu_mem_gib must be > 0 (one GPU's memory in GiB, e.g. 80 or 140)"),
        (cfg.checkpoint.at_end or not cfg.checkpoint.export, "checkpoint.export needs checkpoint.at_end: true"),
        (bool(cfg.output.dir.strip()), "output.dir is empty; set it to the directory for metrics and checkpoints"),
        (bool(cfg.model.path.strip()), "model.path is empty; set it to a Gemma4 HF directory or Hub id "
         "(e.g. google/gemma-4-31B-it)"),
        (cfg.lora.rank >= 1, "lora.rank must be >= 1"),
        (cfg.lora.alpha > 0, f"lora.alpha = {cfg.lora.alpha} must be > 0 (the update is scaled by alpha / rank)"),
        (0 <= cfg.lora.dropout < 1, "lora.dropout must be in [0, 1)"),
        (not pattern_problem, pattern_problem),
        (bool(cfg.lora.target_modules), f"lora.target_modules is empty; list some of {', '.join(LORA_TARGETS)}"),
        (not unknown_targets, f"lora.target_modules: LoRA does not adapt {', '.join(unknown_targets)} (only "
         f"{', '.join(LORA_TARGETS)}; the E models' per-layer gate and projection and the 26B-A4B's experts and "
         f"router stay frozen: docs/models.md); remove {'it' if len(unknown_targets) == 1 else 'them'}"),
        (cfg.lora.enabled or not cfg.lora.init_from, f"lora.init_from = {cfg.lora.init_from!r} continues a PEFT "
         f"adapter, but lora.enabled is false (a full fine-tune); set lora.enabled: true, or remove lora.init_from"),
        (not cfg.lora.init_from or Path(cfg.lora.init_from).expanduser().is_dir(),
         f"lora.init_from = {cfg.lora.init_from!r} is not a directory; give a PEFT adapter directory "
         f"(adapter_config.json, adapter_model.safetensors) or leave it empty"),
        (cfg.checkpoint.resume in ("auto", "none") or Path(cfg.checkpoint.resume).expanduser().exists(),
         f"checkpoint.resume = {cfg.checkpoint.resume!r} is neither auto, none nor an existing path; use auto "
         f"(continue the run in output.dir), none (start afresh) or a checkpoint directory"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(f"{source}: {message}")
    try:
        micro_batches_per_step(cfg.train, 1 if cfg.parallel.dp == "auto" else cfg.parallel.dp)
    except UserError as err:
        raise UserError(f"{source}: {err}") from None


def micro_batches_per_step(train: TrainConfig, dp: int) -> int:
    """Gradient accumulation steps: the global batch over micro-batch size × dp."""
    per_step = train.micro_batch_size * dp
    if train.global_batch_size % per_step:
        raise UserError(f"train.global_batch_size={train.global_batch_size} is not a multiple of "
                        f"micro_batch_size * dp = {per_step}")
    return train.global_batch_size // per_step


def load_deepspeed_json(path: str | Path) -> dict[str, Any]:
    """A DeepSpeed config file as a dict, or one error line naming the file and what is wrong."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"DeepSpeed config {path}: {err}") from None


def runs_zero_optimizer(ds: dict[str, Any], bf16: bool) -> bool:
    """Whether DeepSpeed steps with its ZeRO optimizer (zero/stage_1_and_2.py) under this config: ZeRO
    stage >= 1, except bf16 with fp32 gradient accumulation at stage 1, which is its BF16 optimizer
    (engine._do_optimizer_sanity_check). Only the ZeRO optimizer all-reduces each optimizer group's
    gradient norm over the pipeline stages, and only it has ZeRO's gradient buckets."""
    zero_cfg = ds.get("zero_optimization", {})
    zero = int(zero_cfg.get("stage", 0))
    cpu_offload = (zero_cfg.get("offload_optimizer") or {}).get("device") == "cpu"
    return zero >= 1 and not (bf16 and fp32_grad_accum(ds) and zero == 1 and not cpu_offload)


def fp32_grad_accum(ds: dict[str, Any]) -> bool:
    """data_types.grad_accum_dtype is fp32."""
    return is_fp32_name(ds.get("data_types", {}).get("grad_accum_dtype", ""))


def is_fp32_name(name: object) -> bool:
    """A DeepSpeed config's dtype value names fp32 (any spelling DeepSpeed takes)."""
    return str(name).lower().removeprefix("torch.") in ("fp32", "float32", "float")
