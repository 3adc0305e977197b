"""`runner plan RECIPE`: where every layer goes and what every GPU must hold, before a GPU is touched.

No weights and no processes. The model config comes from a local `config.json`, or for a hub id
from the built-in google/gemma-4-31B-it shape; stage → decoder layers comes from the layer-spec list
`Gemma4Pipeline` builds, cut by the same `stage_boundaries` it uses (even, or
`parallel.stage_layers`); parameters per GPU come from transformers' modules built
on the meta device, sharded by the runner's TP plan; memory is arithmetic (`MemoryModel`).

Every TP rank and DP replica of a stage holds the same amounts, so there is one row per stage.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from deepspeed.pipe import TiedLayerSpec
from torch import nn
from transformers import AutoConfig, Gemma4Config, Gemma4TextConfig

from runner.compat import Gemma4MultimodalEmbedder, Gemma4TextDecoderLayer, Gemma4VisionModel, kv_sharing_modes
from runner.config import (
    FreezeConfig,
    LoraConfig,
    RunConfig,
    fp32_grad_accum,
    is_fp32_name,
    load_deepspeed_json,
    micro_batches_per_step,
    runs_zero_optimizer,
)
from runner.errors import UserError
from runner.metrics import forward_flops_per_token
from runner.models.gemma4.attention import ROW_BLOCKS, WIDE_HEAD_DIM
from runner.models.gemma4.moe import is_moe
from runner.models.gemma4.per_layer import Gemma4PerLayerEmbedding, Gemma4PerLayerProjection, KVSharing
from runner.models.gemma4.pipeline import (
    attention_shapes,
    check_supported,
    gemma4_layer_specs,
    is_decoder_spec,
    stage_boundaries,
    validate_layout,
)
from runner.models.gemma4.presets import GEMMA4_31B_ID, GEMMA4_31B_IMAGE_SOFT_TOKENS, PRESETS, gemma4_31b_config
from runner.models.gemma4.stages import (
    DECODER_TP_PLAN,
    Gemma4DecoderLayerPipe,
    Gemma4FinalNorm,
    Gemma4LMHead,
    Gemma4TokenEmbedding,
    Gemma4VisionStage,
    decoder_prefix,
    vision_linears,
)
from runner.optim import FREEZE_FIX, matrix_group_count
from runner.parallel.topology import ParallelDims

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
# CUDA context, cuBLAS workspaces and the NCCL communicators' buffers (TP, PP, DP and KV-replica
# groups): on the card but outside torch's allocator, so absent from torch.cuda.max_memory_allocated.
OVERHEAD_GIB = 2.5
IMAGES_PER_SAMPLE = 1  # MedPix-VQA: one image per question
DTYPE_BYTES = {"bfloat16": 2, "float32": 4}
ADAM_STATE_BYTES = 8  # exp_avg and exp_avg_sq, fp32
MASTER_BYTES = 4  # fp32 master weights
# suggestions keep 10% of the card free: the plan's own error (-4% .. +1% on measured peaks) and the
# allocator's fragmentation (8-11 GiB reserved but unused near the limit without expandable segments)
SUGGESTION_HEADROOM = 0.9
# Largest head dim PyTorch's fused SDPA (memory-efficient kernel: it takes the arbitrary masks the
# stages pass) is assumed to run without materializing scores; `--fused-attn-max-head-dim 256`
# models a fallback to the math kernel on the 31B's 512-dim full layers.
FUSED_ATTN_MAX_HEAD_DIM = 512
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def model_config(path: str) -> tuple[Gemma4Config, str]:
    """The model's config and where it came from: a local HF directory, or the built-in 31B shape for
    a hub id (nothing here reaches the Hub)."""
    local = Path(path)
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise UserError(f"model.path {path} has no config.json; point it at a Hugging Face model directory")
        return AutoConfig.from_pretrained(local), "its config.json"
    if _HUB_ID.match(path) and not local.exists():
        if path in PRESETS:
            return PRESETS[path](), "built-in shape"
        return gemma4_31b_config(), f"assumed {GEMMA4_31B_ID} shape"
    raise UserError(f"model.path {path} is neither a local model directory nor a hub id like {GEMMA4_31B_ID}")


def cluster_world_size(path: str) -> tuple[int, str | None]:
    """(processes, DeepSpeed config file) of an accelerate config YAML."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"--cluster {path}: cannot read it as YAML ({err})") from None
    procs, machines = data.get("num_processes"), data.get("num_machines", 1)
    if not isinstance(procs, int) or not isinstance(machines, int) or procs < 1 or machines < 1 or procs % machines:
        raise UserError(f"--cluster {path}: num_processes={procs} must be a positive multiple of num_machines={machines}")
    return procs, (data.get("deepspeed_config") or {}).get("deepspeed_config_file")


@dataclass(frozen=True)
class DeepSpeedSettings:
    """What of the DeepSpeed config changes memory."""

    zero_stage: int
    bucket: int  # ZeRO reduce bucket, elements
    fp32_grad_accum: bool  # data_types.grad_accum_dtype fp32: DeepSpeed's BF16 optimizer, fp32 gradients
    immediate_grad_update: bool  # bf16.immediate_grad_update: bf16 gradients freed as they are accumulated
    fp32_communication: bool  # communication_data_type fp32: gradients reduced in place, not via a bf16 copy
    contiguous_gradients: bool  # ZeRO copies the partition's gradients into one flat buffer (DeepSpeed's default)
    zero_optimizer: bool  # DeepSpeed steps with its ZeRO optimizer (config.runs_zero_optimizer)
    grad_hooks: bool  # that optimizer reduces through per-parameter hooks and a bucket during backward
    two_buckets: bool  # overlap_comm with contiguous_gradients: one bucket reduces while the other fills


def deepspeed_settings(ds_config: str | None, bf16: bool) -> DeepSpeedSettings:

    """The memory-relevant settings of the DeepSpeed config the run will use: the cluster's, else
    the one `runner train` takes on GPUs."""
    path = Path(ds_config) if ds_config else ROOT / "ds_configs" / "gpu_bf16_zero1.json"
    if not path.is_absolute() and not path.exists():
        path = ROOT / path
    ds = load_deepspeed_json(path)
    zero = ds.get("zero_optimization", {})
    contiguous, overlap = bool(zero.get("contiguous_gradients", True)), bool(zero.get("overlap_comm", False))
    return DeepSpeedSettings(
        zero_stage=int(zero.get("stage", 0)),
        bucket=int(float(zero.get("reduce_bucket_size", 5e8))),
        fp32_grad_accum=fp32_grad_accum(ds),
        immediate_grad_update=bool(ds.get("bf16", ds.get("bfloat16", {})).get("immediate_grad_update", False)),
        fp32_communication=is_fp32_name(ds.get("communication_data_type", "")),
        contiguous_gradients=contiguous,
        zero_optimizer=runs_zero_optimizer(ds, bf16),
        grad_hooks=contiguous or overlap,
        two_buckets=contiguous and overlap,
    )


# ----------------------------------------------------------------------------------------------
# Parameters


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.3f}M"


@dataclass(frozen=True)
class LayerParams:
    """One decoder layer's parameters: full, on one TP rank, and how many of those every TP rank holds whole."""

    full: int
    local: int
    replicated: int
    # LoRA: (module path in the layer, adapter parameters per unit of rank on one TP rank) of each adapted linear
    adapter_widths: tuple[tuple[str, int], ...] = ()


def decoder_layer_params(text_config: Gemma4TextConfig, layer_idx: int, tp: int,
                         lora: LoraConfig | None = None) -> LayerParams:
    """The runner's TP plan applied to the layer transformers builds (meta device): column/row-parallel
    linears split tp ways, K/V split or — with fewer KV heads than tp — replicated over tp/kv ranks,
    norms whole on every rank; experts 1/tp of them per rank whatever the ep (num_experts / ep experts,
    each 1/(tp / ep) of its width); with `lora`, the adapters' shards (column: A whole, B split as the
    weight; row: A split, B whole)."""
    with torch.device("meta"):
        layer = Gemma4TextDecoderLayer(text_config, layer_idx)
    attn = layer.self_attn
    kv_heads = text_config.num_attention_heads // attn.num_key_value_groups  # also on KV-shared layers (no k/v)
    replicas = tp // kv_heads if kv_heads < tp else 1
    adapter = []
    for path, style in DECODER_TP_PLAN.items() if lora else ():
        parent, attr = path.split(".")
        linear = getattr(getattr(layer, parent), attr, None)
        if linear is not None and attr in lora.target_modules:
            rows = linear.out_features * (replicas if attr in ("k_proj", "v_proj") else 1) // tp
            adapter.append((path, linear.in_features // tp + linear.out_features if style == "rowwise"
                            else linear.in_features + rows))
    full = local = replicated = 0
    for name, p in layer.named_parameters():
        module, _, _ = name.rpartition(".")
        full += p.numel()
        if module == "experts":
            local += p.numel() // tp
        elif module not in DECODER_TP_PLAN:
            local += p.numel()
            replicated += p.numel()
        elif module.endswith(("k_proj", "v_proj")):
            local += p.numel() * replicas // tp
        else:
            local += p.numel() // tp
    return LayerParams(full, local, replicated, tuple(adapter))


@dataclass(frozen=True)
class SpecParams:
    """What one layer spec puts on one GPU of its stage."""

    label: str  # for the "holds" column; "" for decoder layers
    local: int
    replicated: int
    trainable: int
    layer: int | None = None  # decoder layer index
    vision: str | None = None  # "trainable" / "frozen" for the vision stage


@dataclass(frozen=True)
class ModelParams:
    """Parameter counts of the model's parts at one tp."""

    per_type: dict[str, LayerParams]  # decoder layer kind (`layer_kind`) -> counts
    vision_tower: int
    embed_vision: int
    embed_local: int  # vocab / tp rows of the (tied) embedding
    total: int  # the HF model's, each tensor once (the audio tower included)
    per_layer_embed_local: int = 0  # E2B/E4B: vocab_size_per_layer_input / tp rows of the per-layer table
    per_layer_projection: int = 0  # E2B/E4B: its projection and norm, replicated
    audio: int = 0  # E2B/E4B: the audio tower and its embedder (not built, passed through to exports)
    # LoRA with lora.vision_tower: (module name, adapter parameters per unit of rank) of each adapted vision linear
    vision_adapters: tuple[tuple[str, int], ...] = ()


def layer_kind(text_config: Gemma4TextConfig, layer_idx: int) -> str:
    """What a decoder layer's size depends on: its type and whether it is KV-shared (no k/v projections,
    E2B's MLP double-wide)."""
    shared = kv_sharing_modes(text_config)[layer_idx] == "reuse"
    return text_config.layer_types[layer_idx] + (" shared" if shared else "")


def model_params(config: Gemma4Config, tp: int, lora: LoraConfig | None = None) -> ModelParams:
    tc, vc = config.text_config, config.vision_config
    kinds = [layer_kind(tc, i) for i in range(tc.num_hidden_layers)]
    per_type = {k: decoder_layer_params(tc, kinds.index(k), tp, lora) for k in set(kinds)}
    with torch.device("meta"):
        vision_model = Gemma4VisionModel(vc)
        vision_tower = _numel(vision_model)
        embed_vision = _numel(Gemma4MultimodalEmbedder(vc, tc))
        audio = 0
        if getattr(config, "audio_config", None) is not None:
            from transformers import AutoModel

            audio = _numel(AutoModel.from_config(config.audio_config)) + _numel(
                Gemma4MultimodalEmbedder(config.audio_config, tc))
    embed = tc.vocab_size * tc.hidden_size
    heads = 1 if config.tie_word_embeddings or tc.tie_word_embeddings else 2
    layers = sum(per_type[k].full for k in kinds)
    width = tc.num_hidden_layers * (tc.hidden_size_per_layer_input or 0)
    projection = tc.hidden_size * width + (tc.hidden_size_per_layer_input or 0)
    ple_table = tc.vocab_size_per_layer_input * width
    total = vision_tower + embed_vision + embed * heads + layers + tc.hidden_size + ple_table + projection + audio
    vision_adapters = tuple((name, linear.in_features + linear.out_features) for name, linear in
                            vision_linears(vision_model, lora.target_modules if lora and lora.vision_tower else ()))
    return ModelParams(per_type, vision_tower, embed_vision, tc.vocab_size // tp * tc.hidden_size, total,
                       ple_table // tp, projection, audio, vision_adapters)


def adapted_modules(config: Gemma4Config, lora: LoraConfig) -> list[str]:
    """The transformers names of every linear `lora` adapts in this model, over all stages (`apply_lora`'s)."""
    counts, tc = model_params(config, 1, lora), config.text_config
    return [decoder_prefix(i) + path for i in range(tc.num_hidden_layers)
            for path, _ in counts.per_type[layer_kind(tc, i)].adapter_widths] + [n for n, _ in counts.vision_adapters]


@dataclass(frozen=True)
class ParamCounter:
    """Parameters per GPU of each kind of layer spec `gemma4_layer_specs` lists, under the freeze flags."""

    text_config: Gemma4TextConfig
    counts: ModelParams
    freeze: FreezeConfig
    lora: LoraConfig | None = None  # the whole base frozen, embed_vision too; only the adapters train

    def count(self, specs: list) -> list[SpecParams]:
        """One stage's specs; a tied module listed twice on one stage (pp = 1) is built, and counted, once."""
        out, tied_built = [], set()
        for spec in specs:
            duplicate = isinstance(spec, TiedLayerSpec) and spec.key in tied_built
            if isinstance(spec, TiedLayerSpec):
                tied_built.add(spec.key)
            out.append(self._one(spec, duplicate))
        return out

    def _adapters(self, widths: Iterable[tuple[str, int]]) -> int:
        """LoRA adapter parameters of these (module name, parameters per unit of rank), each at its rank."""
        return sum(self.lora.rank_of(name) * width for name, width in widths)

    def _one(self, spec, duplicate: bool) -> SpecParams:
        kind, tc, c, frozen = spec.typename, self.text_config, self.counts, self.freeze
        if issubclass(kind, Gemma4DecoderLayerPipe):
            idx = spec.module_args[1]
            lp = c.per_type[layer_kind(tc, idx)]
            adapter = self._adapters((decoder_prefix(idx) + path, width) for path, width in lp.adapter_widths)
            trainable = adapter + (0 if frozen.language_model else lp.local)
            return SpecParams("", lp.local + adapter, lp.replicated, trainable, layer=idx)
        if kind is Gemma4VisionStage:
            n, adapter = c.vision_tower + c.embed_vision, self._adapters(c.vision_adapters)  # adapters replicated
            trainable = adapter if self.lora else c.embed_vision + (0 if frozen.vision_tower else c.vision_tower)
            return SpecParams("vision", n + adapter, n + adapter, trainable,
                              vision="frozen" if frozen.vision_tower else "trainable")
        if kind is Gemma4PerLayerEmbedding:
            n = c.per_layer_embed_local
            return SpecParams("per-layer embedding", n, 0, 0 if frozen.embeddings or self.lora else n)
        if kind is Gemma4PerLayerProjection:
            n = c.per_layer_projection
            return SpecParams("per-layer projection", n, n, 0 if self.lora else n)
        if kind is Gemma4FinalNorm:
            n = tc.hidden_size
            return SpecParams("final norm", n, n, 0 if frozen.language_model else n)
        tied = isinstance(spec, TiedLayerSpec)
        is_head = kind is Gemma4LMHead or (tied and spec.forward_fn is Gemma4TokenEmbedding.head)
        label = ("head" if is_head else "embedding") + (" (tied)" if tied else "")
        n = 0 if duplicate else c.embed_local
        return SpecParams(label, n, 0, 0 if frozen.embeddings else n)


@dataclass
class StagePlan:
    """One pipeline stage, as one of its GPUs sees it."""

    stage: int
    decoder_layers: list[int]
    holds: list[str]
    params: int  # on one GPU
    replicated_params: int  # of `params`, held whole by every TP rank (norms, vision)
    trainable_params: int
    in_flight: int  # micro-batches whose activations the stage keeps at once
    memory_gib: dict[str, float]
    activations_gib: dict[str, float]  # the parts of memory_gib["activations"]

    @property
    def layer_range(self) -> str:
        if not self.decoder_layers:
            return "-"
        return f"{self.decoder_layers[0]}-{self.decoder_layers[-1]} ({len(self.decoder_layers)})"


@dataclass
class Plan:
    model: str
    source: str
    dims: ParallelDims
    micro_batch_size: int
    max_length: int
    micro_batches: int  # per step and DP replica
    activation_checkpointing: bool
    recompute_num_layers: int | None  # decoder layers per stage that recompute; None: all
    attn_implementation: str
    dtype: str
    zero_stage: int
    total_params: int  # the HF model's, each tensor once
    vision_params: int
    gpu_mem_gib: float
    stages: list[StagePlan]
    assumptions: dict[str, Any]
    # model TFLOP per micro-batch and GPU, per stage (forward, recompute, backward; the head on the
    # last stage), and the split of the decoder layers that evens them out (`parallel.stage_layers`)
    stage_tflop: list[float]
    balanced_stage_layers: list[int]
    balanced_stage_tflop: list[float]
    # the fewest decoder layers per stage that must recompute for every stage to fit 90% of gpu_mem_gib (None:
    # not even with all), with the largest total and the per-stage compute it gives
    least_recompute: int | None
    least_recompute_gib: float | None
    least_recompute_tflop: list[float] | None
    moe: dict[str, Any] | None = None  # `moe_summary`: experts per EP rank, their memory, the MoE all-reduce

    @property
    def checkpointing_label(self) -> str:
        if not self.activation_checkpointing or self.recompute_num_layers == 0:
            return "off"
        if self.recompute_num_layers is None:
            return "on"
        return f"on for the first {self.recompute_num_layers} decoder layers per stage"

    @property
    def fits(self) -> bool:
        """Whether every stage fits the card."""
        return all(s.memory_gib["total"] <= self.gpu_mem_gib for s in self.stages)

    @property
    def warnings(self) -> list[str]:
        if not self.activation_checkpointing:
            fixes = "turn on train.activation_checkpointing, "
        else:
            fixes = "" if self.recompute_num_layers is None else "raise train.recompute_num_layers, "
        fixes += "lower data.max_length or train.micro_batch_size, or raise parallel.pp, parallel.tp or parallel.dp"
        return [
            f"WARNING: stage {s.stage} needs {s.memory_gib['total']:.1f} GiB per GPU, more than the card's "
            f"{self.gpu_mem_gib:g} GiB (cluster.gpu_mem_gib, --gpu-mem-gib); {fixes}"
            for s in self.stages
            if s.memory_gib["total"] > self.gpu_mem_gib
        ] + [
            f"WARNING: stage {s.stage} trains nothing (the freeze settings freeze all it holds), which runner train "
            f"refuses; {FREEZE_FIX}"
            for s in self.stages
            if s.trainable_params == 0
        ]

    def to_json(self) -> dict[str, Any]:
        """Everything, plus the headline numbers: `max_gib_per_gpu` is the torch allocator's peak (what
        torch.cuda.max_memory_allocated measures), `max_total_gib_per_gpu` adds the overhead outside it."""
        out = asdict(self)
        out["dims"] = {**asdict(self.dims), "world_size": self.dims.world_size}
        out["params_all_gpus"] = sum(s.params for s in self.stages) * self.dims.tp * self.dims.dp
        out["max_gib_per_gpu"] = max(s.memory_gib["allocated"] for s in self.stages)
        out["max_total_gib_per_gpu"] = max(s.memory_gib["total"] for s in self.stages)
        out["fits"] = self.fits and not self.warnings
        out["warnings"] = self.warnings
        return out

    def table(self) -> str:
        d = self.dims
        lines = [
            f"model   {self.model} ({self.source}): {_count(self.total_params)} parameters "
            f"({_count(self.total_params - self.vision_params)} text + {_count(self.vision_params)} vision)",
            f"layout  tp {d.tp} x pp {d.pp} x dp {d.dp} = {d.world_size} GPUs of {self.gpu_mem_gib:g} GiB"
            f"{' (sequence parallel)' if d.sequence_parallel and d.tp > 1 else ''}; {self.micro_batches} micro-batches of "
            f"{self.micro_batch_size} x {self.max_length} tokens per step and DP replica; {self.dtype}, "
            f"ZeRO-{self.zero_stage}, {self.attn_implementation}, "
            f"activation checkpointing {self.checkpointing_label}",
            "",
            f"{'stage':>5}  {'decoder layers':<15} {'holds':<28} {'params/GPU':>11} {'trainable':>10} {'in-flight':>9}"
            f"  {'weights':>7} {'grads':>6} {'optim':>6} {'bucket':>6} {'activ':>6} {'reduce':>6} {'step':>6} {'overhd':>6}"
            f" {'total':>6}",
        ]
        for s in self.stages:
            m = s.memory_gib
            lines.append(
                f"{s.stage:>5}  {s.layer_range:<15} {', '.join(s.holds) or '-':<28} {_count(s.params):>11} "
                f"{_count(s.trainable_params):>10} {s.in_flight:>9}  {m['weights']:>7.2f} {m['grads']:>6.2f} "
                f"{m['optimizer']:>6.2f} {m['zero_bucket']:>6.2f} {m['activations']:>6.2f} {m['reduce']:>6.2f} "
                f"{m['step']:>6.2f} {m['overhead']:>6.2f} {m['total']:>6.2f}"
            )
        if self.moe:
            m = self.moe
            lines.append(
                f"experts {m['experts']} per layer over ep {m['ep']} (expert-TP {m['etp']}): {m['experts_per_rank']} per "
                f"GPU, {m['expert_gib_per_layer']:.3f} GiB of weights per layer and GPU; MoE all-reduce per layer and "
                f"micro-batch: {m['allreduce_mib_per_layer']:.1f} MiB forward, as much backward"
            )
        current = recomputed_layers(self.activation_checkpointing, self.recompute_num_layers,
                                    max(len(s.decoder_layers) for s in self.stages))
        if self.least_recompute is not None and self.least_recompute < current:
            setting = ("train.activation_checkpointing: false" if self.least_recompute == 0
                       else f"train.recompute_num_layers: {self.least_recompute}")
            lines.append(
                f"fits {SUGGESTION_HEADROOM:.0%} of the card's {self.gpu_mem_gib:g} GiB with less recompute: {setting} "
                f"({self.least_recompute_gib:.1f} GiB; compute per micro-batch and GPU "
                f"{' / '.join(f'{t:.1f}' for t in self.least_recompute_tflop)} TFLOP; plan figures, not measured)"
            )
        if d.pp > 1:
            lines.append(
                f"compute per micro-batch and GPU, by stage: {' / '.join(f'{t:.1f}' for t in self.stage_tflop)} "
                f"TFLOP; most even split: parallel.stage_layers: {self.balanced_stage_layers} "
                f"({' / '.join(f'{t:.1f}' for t in self.balanced_stage_tflop)})"
            )
        lines += [
            "",
            f"GiB per GPU. weights {self.dtype}; grads {self.assumptions['grad_bytes_per_trainable_param']} bytes per "
            f"trainable param; optim = "
            f"{'fp32 master + ' if self.zero_stage >= 1 or self.dtype == 'bfloat16' else ''}Adam m, v of trainable params"
            f"{' / dp (ZeRO-1)' if self.zero_stage >= 1 else ''}; bucket = what the gradient reduction holds during "
            f"backward; reduce = ZeRO's reduce after the last backward (with contiguous_gradients a flat copy of the "
            f"gradients); step = the ZeRO step's fp32 copy of one optimizer group's gradients (activations are gone "
            f"for these two: total counts the largest of bucket + activ, reduce and step); overhd = CUDA context + NCCL ({OVERHEAD_GIB} GiB, not in "
            f"torch.cuda.max_memory_allocated, which is total - overhd).",
        ]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Memory


@dataclass(frozen=True)
class LayerShape:
    """One attention+MLP layer's widths on one TP rank."""

    hidden: int
    q_heads: int
    kv_heads: int  # after replication
    head_dim: int
    mlp: int
    moe: int = 0  # bytes per token the MoE block saves (`moe_saved_per_token`)


def moe_saved_per_token(config: Gemma4Config, dims: ParallelDims, seq_slices: int) -> int:
    """Bytes per token an MoE block keeps for backward on one TP rank: four more RMSNorms (fp32 input and
    output, on the slice under sequence parallelism), the router's fp32 scores and probabilities, the
    experts' gathered bf16 input, and per routed choice of a local expert (top_k / ep per token on
    average) its input rows, gate_up output, activation, product and output."""
    if not is_moe(config):
        return 0
    tc = config.text_config
    h, inter = tc.hidden_size, tc.moe_intermediate_size // dims.etp_size
    choices = tc.top_k_experts / dims.ep_size
    return int((32 * h + 8 * tc.num_experts) // seq_slices + 2 * h + choices * (4 * h + 8 * inter))


def layer_saved_bytes(s: LayerShape, batch: int, seq: int, materialized_scores: bool, seq_slices: int = 1) -> int:
    """Bytes a decoder layer keeps for backward, one micro-batch on one TP rank.

    What autograd saves in transformers' Gemma4TextDecoderLayer with the runner's TP linears (the
    test checks it against saved-tensor hooks), per token; h hidden, q = local query heads x head_dim,
    k = local KV heads x head_dim, m = intermediate / tp; bf16 activations, RMSNorm in fp32:
      hidden     4 RMSNorms x (fp32 input copy + fp32 normalized) = 32h, plus the bf16 outputs of the
                 input and pre-FFN norms that the column-parallel linears read = 4h; under sequence
                 parallelism (`seq_slices` = tp) the norms run on 1/tp of the tokens (32h / tp) and the
                 linears read the gathered sequence (4h)
      q, k, v    q_norm 8q, k_norm 8k (the same two fp32 tensors), v_norm's fp32 input copy 4k; each
                 norm row's mean square and rsqrt, 8 bytes x (4 + q heads + 2 x KV heads) rows; RoPE
                 keeps cos and sin (4 x head_dim), not its input
      attention  Q 2q and o_proj's input 2q, plus
                 fused SDPA (flash / memory-efficient): K and V as the kernel sees them, 2 x 2k, or
                   2 x 2q where transformers' repeat_kv copies them up to the query heads (it does
                   whenever a mask is passed, i.e. with an image or padding in the batch, and has
                   more than one local KV head; with one it is a view); the fp32 logsumexp, 4 per
                   local head; the mask as a bf16 bias, 2 x seq^2 per sequence
                 materialized scores (eager, SDPA math): K and V copied to the query heads, 2 x 2q;
                   the fp32 softmax and its bf16 copy, 6 bytes x local heads x seq^2 per sequence
                   (the full seq^2 even on sliding layers, whose window is only a mask)
      MLP        gate, gelu(gate), up, gelu(gate) * up = 8m
      MoE        `moe_saved_per_token` (s.moe; an estimate, not yet checked against saved-tensor hooks)
    """
    h, q, k, m = s.hidden, s.q_heads * s.head_dim, s.kv_heads * s.head_dim, s.mlp
    norm_rows = 4 + s.q_heads + 2 * s.kv_heads
    common = (32 * h // seq_slices + 4 * h + 8 * q + 12 * k + 2 * q + 2 * q + 8 * m + 4 * s.head_dim + 8 * norm_rows
              + s.moe)
    if materialized_scores:
        return batch * seq * (common + 4 * q) + 6 * s.q_heads * batch * seq * seq
    seen_kv = q if s.q_heads > s.kv_heads > 1 else k
    return batch * seq * (common + 4 * seen_kv + 4 * s.q_heads) + 2 * batch * seq * seq


def gemm_backward_bytes(s: LayerShape, batch: int, seq: int) -> int:
    """Scratch of `model.wide_head_backward: gemm` while one layer's attention runs backward: for one
    block of seq / ROW_BLOCKS query rows and one KV head, its G = q/kv query heads' probabilities and
    dP in fp32 (4 + 4) and their bf16 copies for the GEMMs (2 + 2) against every key (the last block
    sees them all): 12 bytes x G x rows x seq, the block's mask (rows x seq); the micro-batch's dense
    mask (seq^2 bools, kept while its BlockMask lives); the fp32 dK and dV accumulators."""
    rows = -(-seq // ROW_BLOCKS)
    per_block = 12 * (s.q_heads // s.kv_heads) * rows * seq + rows * seq
    return batch * (per_block + seq * seq + 8 * s.kv_heads * seq * s.head_dim)


def layer_grad_bytes(s: LayerShape, tokens: int) -> int:
    """Gradient temporaries while one layer runs backward (bf16): the hidden gradient in and out,
    the MLP's two intermediate gradients, and the q/k/v gradients (at query width)."""
    return tokens * 2 * (2 * s.hidden + 2 * s.mlp + 3 * s.q_heads * s.head_dim)


@dataclass(frozen=True)
class MemoryModel:
    """Peak activation bytes per GPU of one stage. T = micro_batch x max_length tokens; A = T x hidden
    x 2 bytes / seq_slices, one bf16 hidden state (this rank's 1/tp slice of the sequence under
    sequence parallelism, where also the norms' saved tensors shrink tp-fold); in_flight = min(pp - stage, micro-batches per step), the
    micro-batches DeepSpeed's 1F1B TrainSchedule keeps forward-done-backward-pending on a stage.

      R of the stage's L decoder layers checkpointed (R = L with activation checkpointing, fewer
      with train.recompute_num_layers, 0 without):
        in_flight x (R x A  [each checkpointed layer's input]
                     + the other L - R layers' saved tensors + A [stage input, when R = 0 and not
                     on the first stage] + A [stage output, not on the last stage]
                     + trainable vision tower's saved tensors)
        + max(one checkpointed layer's saved tensors (if R > 0) + a layer's gradient temporaries
              [recompute during backward] + the GEMM backward's scratch on wide heads
              (`gemm_backward_bytes`, with model.wide_head_backward: gemm), head peak, frozen vision
              tower working set)
      + DeepSpeed's p2p receive buffers where pp > 1: one A for activations, one A for gradients.

    head peak (last stage, which has one micro-batch in flight): the final norm's fp32 copies and
    bf16 output (10 x hidden per token, / seq_slices) + the vocab-parallel logits working set per token x vocab/tp:
    bf16 logits kept by tanh, bf16 softcapped logits, and inside the cross entropy the fp32 upcast,
    the max-shifted copy and exp/softmax (fp32, kept for backward) = 2 + 2 + 4 + 4 + 4 = 16 bytes
    (14 without softcapping). No rank ever holds full-vocab logits.
    vision tower: images x layers x `layer_saved_bytes` at its widths, patches = soft tokens x
    pooling^2 per image (an approximation: its layers differ in detail; replicated, no TP). Frozen,
    it keeps nothing and costs one layer's working set.
    Not counted: the int tensors riding with the hidden state (mask, positions, token types:
    24 bytes per token), pixel values, and allocator fragmentation (reserved > allocated).
    """

    tokens: int
    batch: int
    seq: int
    hidden: int
    vocab_local: int
    softcap: bool
    materialized: dict[str, bool]  # `layer_kind` -> attention scores materialized
    backward_scratch: dict[str, int]  # `layer_kind` -> bytes the attention's backward adds for itself
    shapes: dict[str, LayerShape]  # `layer_kind` -> local shape
    vision_shape: LayerShape
    vision_layers: int
    patches: int
    images: int
    seq_slices: int = 1  # tp under sequence parallelism

    def layer_saved(self, kind: str) -> int:
        return layer_saved_bytes(self.shapes[kind], self.batch, self.seq, self.materialized[kind],
                                 self.seq_slices)

    def vision_saved(self) -> int:
        return self.images * self.vision_layers * layer_saved_bytes(self.vision_shape, 1, self.patches, False)

    def head_peak(self) -> int:
        return self.tokens * (10 * self.hidden // self.seq_slices + (16 if self.softcap else 14) * self.vocab_local)

    def activations(self, kinds: list[str], first: bool, last: bool, in_flight: int,
                    recomputed: int, vision: str | None, pp: int, carried: tuple[int, int, int] = (0, 0, 0)
                    ) -> dict[str, int]:
        """The parts of a stage's peak, in bytes. `recomputed`: how many of the stage's first decoder
        layers are checkpointed; `vision`: None (not on this stage), 'trainable' or 'frozen';
        `carried` (E2B/E4B, `carried_bytes`): what travels in beside the hidden state, what travels out,
        and the first stage's per-layer-input activations (per micro-batch)."""
        carried_in, carried_out, per_layer_saved = carried
        a = self.tokens * self.hidden * 2 // self.seq_slices
        grads = max((layer_grad_bytes(self.shapes[t], self.tokens) for t in set(kinds)), default=0)
        checkpointed, kept = kinds[:recomputed], kinds[recomputed:]
        stored = len(checkpointed) * a + sum(self.layer_saved(t) for t in kept) + (0 if first or checkpointed else a)
        transient = max(((self.layer_saved(t) if t in checkpointed else 0) + self.backward_scratch[t]
                         for t in set(kinds)), default=0) + grads
        stored += (0 if last else a + carried_out) + (self.vision_saved() if vision == "trainable" else 0)
        stored += per_layer_saved
        candidates = [transient]
        if vision == "frozen":
            candidates.append(self.vision_saved() // self.vision_layers)
        if last:
            candidates.append(self.head_peak())
        return {
            "stored_per_micro_batch": stored,
            "stored": in_flight * stored,
            "working_set": max(candidates),
            "p2p_buffers": 2 * a + carried_in + carried_out if pp > 1 else 0,
        }


def carried_bytes(text_config: Gemma4TextConfig, layer_idx: int, batch: int, seq: int, tp: int,
                  seq_slices: int) -> int:
    """bf16 bytes a per-layer model (E2B/E4B) carries into decoder layer `layer_idx` beside the hidden
    state: the per-layer inputs of that layer and the later ones (this rank's sequence slice), and the
    stored keys and values that a later KV-shared layer still reuses (this rank's KV heads, whole sequence)."""
    tc = text_config
    per_layer = batch * seq // seq_slices * (tc.num_hidden_layers - layer_idx) * (tc.hidden_size_per_layer_input or 0)
    shapes = attention_shapes(tc)
    kv = sum(2 * batch * seq * max(shapes[t][1] // tp, 1) * shapes[t][2] for t in KVSharing.of(tc).live(layer_idx))
    return 2 * (per_layer + kv)


def per_layer_input_saved(text_config: Gemma4TextConfig, tokens: int, seq_slices: int) -> int:
    """What the first stage keeps for backward of the per-layer inputs (E2B/E4B), per micro-batch: the
    table lookup and the projection (bf16), the projection norm's fp32 input and output, per token
    and layer·P: 2 + 2 + 8 bytes."""
    return tokens // seq_slices * text_config.num_hidden_layers * (text_config.hidden_size_per_layer_input or 0) * 12


def recomputed_layers(checkpointing: bool, recompute_num_layers: int | None, layers: int) -> int:
    """How many of a stage's `layers` decoder layers activation checkpointing recomputes (its first ones)."""
    if not checkpointing:
        return 0
    return layers if recompute_num_layers is None else min(recompute_num_layers, layers)


def memory_model(cfg: RunConfig, config: Gemma4Config, tp: int, fused_attn_max_head_dim: int,
                 dims: ParallelDims | None = None) -> MemoryModel:
    """The recipe's micro-batch on this model at this tp (`dims`: its ep, for MoE models)."""
    tc, vc = config.text_config, config.vision_config
    moe = moe_saved_per_token(config, dims or ParallelDims(tp=tp), cfg.parallel.seq_slices)
    attention = attention_shapes(tc)
    double_wide = getattr(tc, "use_double_wide_mlp", False)  # E2B: the KV-shared layers' MLP is twice as wide
    shapes = {}  # by `layer_kind`
    for kind in {layer_kind(tc, i) for i in range(tc.num_hidden_layers)}:
        q, kv, d = attention[kind.split()[0]]
        inter = tc.intermediate_size * (2 if double_wide and kind.endswith(" shared") else 1)
        shapes[kind] = LayerShape(tc.hidden_size, q // tp, max(kv // tp, 1), d, inter // tp, moe)
    eager = cfg.model.attn_implementation == "eager"
    gemm = cfg.model.wide_head_gemm
    return MemoryModel(
        tokens=cfg.train.micro_batch_size * cfg.data.row_length,
        batch=cfg.train.micro_batch_size,
        seq=cfg.data.row_length,
        hidden=tc.hidden_size,
        vocab_local=tc.vocab_size // tp,
        softcap=tc.final_logit_softcapping is not None,
        materialized={t: eager or s.head_dim > fused_attn_max_head_dim for t, s in shapes.items()},
        backward_scratch={t: gemm_backward_bytes(s, cfg.train.micro_batch_size, cfg.data.row_length)
                          if gemm and s.head_dim > WIDE_HEAD_DIM else 0 for t, s in shapes.items()},
        shapes=shapes,
        vision_shape=LayerShape(
            vc.hidden_size, vc.num_attention_heads, vc.num_key_value_heads, vc.head_dim, vc.intermediate_size
        ),
        vision_layers=vc.num_hidden_layers,
        patches=_soft_tokens(config) * vc.pooling_kernel_size**2,
        images=cfg.train.micro_batch_size * images_per_row(cfg, config),
        seq_slices=cfg.parallel.seq_slices,
    )


def images_per_row(cfg: RunConfig, config: Gemma4Config) -> int:
    """Images one micro-batch row brings to the vision tower: a padded sample's `IMAGES_PER_SAMPLE`; a packed
    row as many as its length holds at the processor's full soft-token count each (every sample of a row with
    its image; smaller images take fewer soft tokens, so a row of them brings more)."""
    if not cfg.data.packing:
        return IMAGES_PER_SAMPLE
    return max(IMAGES_PER_SAMPLE, cfg.data.pack_length // _soft_tokens(config))


def moe_summary(config: Gemma4Config, dims: ParallelDims, tokens: int, dtype_bytes: int) -> dict[str, Any] | None:
    """What `runner plan` shows of the experts: per GPU (= EP rank, 1/etp of each of its experts' width)
    their count and weight GiB per layer, and the one all-reduce (reduce-scatter under sequence
    parallelism: the same bytes) of a micro-batch's tokens x hidden that joins the partial outputs."""
    if not is_moe(config):
        return None
    tc = config.text_config
    params = (tc.num_experts // dims.ep_size) * 3 * tc.hidden_size * (tc.moe_intermediate_size // dims.etp_size)
    return {
        "experts": tc.num_experts, "ep": dims.ep_size, "etp": dims.etp_size, "top_k": tc.top_k_experts,
        "experts_per_rank": tc.num_experts // dims.ep_size,
        "expert_params_per_layer": params,
        "expert_gib_per_layer": params * dtype_bytes / GIB,
        "allreduce_mib_per_layer": tokens * tc.hidden_size * dtype_bytes / 2**20,
    }


def _soft_tokens(config: Gemma4Config) -> int:
    """Soft tokens per image: the vision config's budget as the 31B's config.json states it."""
    return int(
        getattr(config.vision_config, "default_output_length", None)
        or getattr(config, "vision_soft_tokens_per_image", None)
        or GEMMA4_31B_IMAGE_SOFT_TOKENS
    )


# ----------------------------------------------------------------------------------------------
# The plan


def resolve_dims(cfg: RunConfig, world_size: int | None) -> ParallelDims:
    if world_size is None:
        if cfg.parallel.dp == "auto":
            raise UserError("parallel.dp is 'auto': pass --cluster ACCELERATE_CONFIG.yaml or --world-size N to resolve it")
        return ParallelDims(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.dp, cfg.parallel.sequence_parallel, cfg.parallel.ep)
    from runner.train import parallel_dims  # the same rule `runner train` applies

    return parallel_dims(cfg, world_size)


def stage_specs(config: Gemma4Config, pp: int, stage_layers: Sequence[int] = ()) -> list[list]:
    """The layer specs each stage builds: `Gemma4Pipeline`'s list, cut by its `stage_boundaries`.
    LayerSpec only stores its arguments, so no ParallelState is needed to list them."""
    specs = gemma4_layer_specs(config, None)
    parts = stage_boundaries(specs, pp, stage_layers)
    return [specs[parts[s]:parts[s + 1]] for s in range(pp)]


def _activations_gib(parts: dict[str, int]) -> float:
    """A stage's activation memory from `MemoryModel.activations`' parts."""
    return (parts["stored"] + parts["working_set"] + parts["p2p_buffers"]) / GIB


def _range_cost(layer_fwd: Sequence[float], recompute: int) -> Callable[[int, int], float]:
    """Compute of a stage running decoder layers a..b-1: forward + backward (3 forwards) of each, and
    one more forward of its first `recompute` layers (activation checkpointing)."""
    prefix = [0.0, *itertools.accumulate(layer_fwd)]
    return lambda a, b: 3 * (prefix[b] - prefix[a]) + prefix[min(b, a + recompute)] - prefix[a]


def split_cost(layer_fwd: Sequence[float], head_cost: float, counts: Sequence[int], recompute: int = 0) -> list[float]:
    """Each stage's compute when stage s runs the next `counts[s]` decoder layers, the last also the head."""
    cost = _range_cost(layer_fwd, recompute)
    bounds = [0, *itertools.accumulate(counts)]
    costs = [cost(a, b) for a, b in zip(bounds, bounds[1:])]
    costs[-1] += head_cost
    return [round(c, 2) for c in costs]


def balanced_stage_layers(layer_fwd: Sequence[float], head_cost: float, pp: int, recompute: int = 0) -> list[int]:
    """Decoder layers per stage (contiguous, at least one each) that make the slowest stage fastest:
    a 1F1B pipeline steps at its slowest stage's pace. The last stage also runs the LM head; the
    frozen vision tower's forward on the first stage and the elementwise softcap/cross-entropy work
    are not counted (FLOPs only)."""
    cost = _range_cost(layer_fwd, recompute)
    n = len(layer_fwd)

    @functools.cache
    def best(end: int, stages: int) -> tuple[float, tuple[int, ...]]:
        """The first `end` layers over `stages` stages: (slowest stage, layers per stage)."""
        head = head_cost if end == n else 0.0
        if stages == 1:
            return cost(0, end) + head, (end,)
        options = []
        for start in range(stages - 1, end):
            slowest, counts = best(start, stages - 1)
            options.append((max(slowest, cost(start, end) + head), (*counts, end - start)))
        return min(options)

    return list(best(n, pp)[1])


def make_plan(cfg: RunConfig, *, world_size: int | None = None, ds_config: str | None = None,
              gpu_mem_gib: float | None = None, fused_attn_max_head_dim: int = FUSED_ATTN_MAX_HEAD_DIM) -> Plan:
    """Layers, parameters and memory per GPU for a recipe, without a GPU; the card holds `gpu_mem_gib` GiB
    (default: the recipe's cluster.gpu_mem_gib)."""
    if gpu_mem_gib is None:
        gpu_mem_gib = cfg.cluster.gpu_mem_gib
    config, source = model_config(cfg.model.path)
    check_supported(config)
    dims = resolve_dims(cfg, world_size)
    validate_layout(config, dims)
    gas = micro_batches_per_step(cfg.train, dims.dp)
    ds = deepspeed_settings(ds_config, bf16=cfg.model.dtype == "bfloat16")
    zero_stage = ds.zero_stage
    # bf16 + ZeRO-1 with fp32 accumulation is DeepSpeed's BF16 optimizer: fp32 gradients beside the
    # bf16 ones (freed per parameter with immediate_grad_update), reduced in place without the ZeRO
    # bucket — or, unless communication_data_type is fp32, through a bf16 copy of all of them at once
    fp32_accum = ds.fp32_grad_accum and cfg.model.dtype == "bfloat16" and zero_stage == 1
    grad_bytes = DTYPE_BYTES[cfg.model.dtype]
    if fp32_accum:
        grad_bytes = 4 if ds.immediate_grad_update else 4 + grad_bytes
    bucket = ds.bucket if ds.zero_optimizer else 0
    comm_copy = fp32_accum and not ds.fp32_communication
    tc = config.text_config
    from runner.lora import check_patterns  # (runner.lora imports this module)

    check_patterns(cfg.lora, config)
    counts = model_params(config, dims.tp, cfg.lora if cfg.lora.enabled else None)
    memory = memory_model(cfg, config, dims.tp, fused_attn_max_head_dim, dims)
    # LoRA freezes the whole base (bf16 weights only: no gradient, master copy or Adam state); adapters train
    freeze = FreezeConfig(embeddings=True, vision_tower=True, language_model=True) if cfg.lora.enabled else cfg.freeze
    counter = ParamCounter(tc, counts, freeze, cfg.lora if cfg.lora.enabled else None)
    dtype_bytes = DTYPE_BYTES[cfg.model.dtype]
    # ZeRO keeps an fp32 copy of its partition even of fp32 weights; without ZeRO only bf16 needs one
    master = MASTER_BYTES if zero_stage >= 1 or cfg.model.dtype == "bfloat16" else 0
    optim_bytes = master + ADAM_STATE_BYTES
    optim_shards = dims.dp if zero_stage >= 1 else 1

    all_specs = stage_specs(config, dims.pp, cfg.parallel.stage_layers)
    groups = matrix_group_count([sum(map(is_decoder_spec, specs)) for specs in all_specs],
                                cfg.lora.enabled or not freeze.language_model)
    stages, totals = [], []  # totals: per stage, GiB on the card as a function of the layers recomputed
    for stage, specs in enumerate(all_specs):
        parts = counter.count(specs)
        params = sum(p.local for p in parts)
        trainable = sum(p.trainable for p in parts)
        layers = [p.layer for p in parts if p.layer is not None]
        in_flight = min(dims.pp - stage, gas)
        carry = functools.partial(carried_bytes, tc, batch=memory.batch, seq=memory.seq, tp=dims.tp,
                                  seq_slices=memory.seq_slices)
        carried = (carry(layers[0]) if stage else 0, carry(layers[-1] + 1) if stage < dims.pp - 1 else 0,
                   per_layer_input_saved(tc, memory.tokens, memory.seq_slices) if stage == 0 else 0)
        stage_activations = functools.partial(
            memory.activations, [layer_kind(tc, i) for i in layers], stage == 0, stage == dims.pp - 1, in_flight,
            vision=next((p.vision for p in parts if p.vision), None), pp=dims.pp, carried=carried)
        recomputed = recomputed_layers(cfg.train.activation_checkpointing, cfg.train.recompute_num_layers, len(layers))
        activations = stage_activations(recomputed)
        # DeepSpeed's ZeRO step flattens one optimizer group's gradient partition and converts it to
        # fp32 (bf16: 2 + 4 bytes per parameter; fp32: 4, no conversion) while the gradients still
        # exist and the activations are gone; runner/optim.py cuts a stage's matrices into `groups`
        largest_group = trainable / groups
        step_bytes = grad_bytes + (4 if grad_bytes != 4 else 0)
        step = step_bytes * largest_group / optim_shards if ds.zero_optimizer else 0
        # its reduce after the last backward (activations gone): with contiguous_gradients a flat copy
        # of the partition's gradients (freed again by the step) beside the hooks' bucket and one more;
        # without, one bucket-sized flat chunk at a time
        reduce = 0
        if ds.zero_optimizer:
            reduce = trainable * grad_bytes / optim_shards + 2 * bucket * dtype_bytes if ds.contiguous_gradients \
                else bucket * dtype_bytes
        gib = {
            "weights": params * dtype_bytes / GIB,
            "grads": trainable * grad_bytes / GIB,
            "optimizer": trainable * optim_bytes / optim_shards / GIB,
            # beside the activations: the ZeRO hooks' bucket, or the BF16 optimizer's bf16 copy of the gradients
            "zero_bucket": (trainable if comm_copy else bucket * ds.grad_hooks * (1 + ds.two_buckets)) * dtype_bytes / GIB,
            "activations": _activations_gib(activations),
            "reduce": reduce / GIB,
            "step": step / GIB,
        }

        def total(recomputed: int, gib: dict[str, float] = gib, stage_activations=stage_activations) -> float:
            activ = _activations_gib(stage_activations(recomputed))
            return (gib["weights"] + gib["grads"] + gib["optimizer"] + OVERHEAD_GIB
                    + max(gib["zero_bucket"] + activ, gib["reduce"], gib["step"]))

        totals.append(total)
        gib["overhead"] = OVERHEAD_GIB
        gib["total"] = total(recomputed)
        gib["allocated"] = gib["total"] - OVERHEAD_GIB
        stages.append(StagePlan(
            stage=stage,
            decoder_layers=layers,
            holds=[p.label for p in parts if p.label],
            params=params,
            replicated_params=sum(p.replicated for p in parts),
            trainable_params=trainable,
            in_flight=in_flight,
            memory_gib={k: round(v, 3) for k, v in gib.items()},
            activations_gib={k: round(v / GIB, 3) for k, v in activations.items()},
        ))

    tokens = cfg.train.micro_batch_size * cfg.data.row_length
    layer_fwd, head_fwd = forward_flops_per_token(tc, cfg.data.row_length)
    layer_cost = [f * tokens / dims.tp / 1e12 for f in layer_fwd]  # forward; split_cost adds backward, recompute
    recompute = recomputed_layers(cfg.train.activation_checkpointing, cfg.train.recompute_num_layers, len(layer_fwd))
    head_passes = 3 if not freeze.embeddings else 2  # the tied weight's gradient only when trained
    head_cost = head_fwd * head_passes * tokens / dims.tp / 1e12
    balanced = balanced_stage_layers(layer_cost, head_cost, dims.pp, recompute)
    layer_counts = [len(st.decoder_layers) for st in stages]
    room = SUGGESTION_HEADROOM * gpu_mem_gib
    least = next((r for r in range(max(layer_counts) + 1) if all(t(r) <= room for t in totals)), None)
    return Plan(
        model=cfg.model.path,
        source=source,
        dims=dims,
        micro_batch_size=cfg.train.micro_batch_size,
        max_length=cfg.data.row_length,
        micro_batches=gas,
        activation_checkpointing=cfg.train.activation_checkpointing,
        recompute_num_layers=cfg.train.recompute_num_layers,
        attn_implementation=cfg.model.attn_implementation + (
            " (GEMM backward on wide heads)" if any(memory.backward_scratch.values()) else ""),
        dtype=cfg.model.dtype,
        zero_stage=zero_stage,
        total_params=counts.total,
        vision_params=counts.vision_tower + counts.embed_vision,
        gpu_mem_gib=gpu_mem_gib,
        stages=stages,
        stage_tflop=split_cost(layer_cost, head_cost, layer_counts, recompute),
        balanced_stage_layers=balanced,
        balanced_stage_tflop=split_cost(layer_cost, head_cost, balanced, recompute),
        least_recompute=least,
        least_recompute_gib=None if least is None else round(max(t(least) for t in totals), 2),
        least_recompute_tflop=None if least is None else split_cost(layer_cost, head_cost, layer_counts, least),
        moe=moe_summary(config, dims, tokens, dtype_bytes),
        assumptions={
            "overhead_gib": OVERHEAD_GIB,
            "images_per_sample": IMAGES_PER_SAMPLE,
            "images_per_row": memory.images // cfg.train.micro_batch_size,
            "patches_per_image": memory.patches,
            "attention_scores_materialized": memory.materialized,
            "fused_attn_max_head_dim": fused_attn_max_head_dim,
            "zero_reduce_bucket_elements": bucket,
            "grad_bytes_per_trainable_param": grad_bytes,
        },
    )


PROPOSED_SIZES = (1, 2, 4, 8)  # tp and pp sizes tried by `smallest_fitting_layout`


def smallest_fitting_layout(cfg: RunConfig, *, ds_config: str | None = None, gpu_mem_gib: float | None = None,
                            fused_attn_max_head_dim: int = FUSED_ATTN_MAX_HEAD_DIM) -> Plan | None:
    """The plan of the layout with the fewest GPUs (dp 1, tp and pp up to 8; at equal count tp before pp, TP
    with sequence parallelism) whose every stage fits the card, the recipe otherwise unchanged; None if
    none does. What `runner plan` proposes when the recipe's own layout does not fit."""
    for tp, pp in sorted(itertools.product(PROPOSED_SIZES, PROPOSED_SIZES), key=lambda tp_pp: (tp_pp[0] * tp_pp[1],
                                                                                             tp_pp[1])):
        parallel = replace(cfg.parallel, tp=tp, pp=pp, dp=1, sequence_parallel=tp > 1, stage_layers=[], ep=None)
        try:
            plan = make_plan(replace(cfg, parallel=parallel), ds_config=ds_config, gpu_mem_gib=gpu_mem_gib,
                             fused_attn_max_head_dim=fused_attn_max_head_dim)
        except UserError:  # a size the model cannot be cut into (heads, vocabulary, layers)
            continue
        if plan.fits:
            return plan
    return None


def layout_proposal(plan: Plan | None, gpu_mem_gib: float) -> str:
    """One line naming the proposed layout (`smallest_fitting_layout`), or that none fits."""
    if plan is None:
        return (f"no layout of up to {max(PROPOSED_SIZES)} x {max(PROPOSED_SIZES)} GPUs (tp x pp) fits {gpu_mem_gib:g} "
                f"GiB cards as the recipe stands; lower data.max_length or train.micro_batch_size, freeze more or use LoRA")
    d = plan.dims
    worst = max(s.memory_gib["total"] for s in plan.stages)
    return (f"smallest layout that fits {gpu_mem_gib:g} GiB cards: parallel: {{tp: {d.tp}, pp: {d.pp}, dp: 1"
            + (", sequence_parallel: true" if d.sequence_parallel else "")
            + f"}} on {d.world_size} GPU{'s' if d.world_size > 1 else ''}, {worst:.1f} GiB per GPU (plan figures; "
            f"more DP replicas split the optimizer state further)")
