"""Gemma4ForConditionalGeneration cut into pipeline layers, with tensor-parallel linears inside.

Each class is one entry of the layer-spec list in `pipeline.py`. Between layers travels one tuple of
tensors only (never None); between stages that tuple is
`(hidden, attention_mask, position_ids, mm_token_type_ids)`: the small integer tensors ride along
so every stage rebuilds its own attention masks and RoPE tables locally. Under packing
(`runner/data/packing.py`) `attention_mask` holds each token's document id (0 on padding).

transformers' own modules are reused wherever they fit — the vision tower, the multimodal
embedder, the decoder layer, RMSNorm, rotary embedding and mask builders — only the decoder
layer's linears are swapped for column/row-parallel ones.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Collection, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import Gemma4Config, Gemma4TextConfig

from runner.compat import (
    Gemma4MultimodalEmbedder,
    Gemma4RMSNorm,
    Gemma4TextDecoderLayer,
    Gemma4TextRotaryEmbedding,
    Gemma4VisionModel,
    attn_implementation,
    build_masks,
    build_packed_masks,
    decoder_layer_forward,
    is_kv_shared_layer,
    rms_norm_eps,
    set_attn_implementation,
)
from runner.data.packing import document_positions
from runner.errors import UserError
from runner.models.gemma4.attention import WIDE_HEAD_ATTENTION, WIDE_HEAD_DIM, WIDE_HEAD_FWD_TILES
from runner.models.gemma4.moe import shard_moe_block
from runner.parallel.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_group,
    gather_seq,
    mark_sharded,
    split_seq,
    sum_grad_over,
)
from runner.parallel.topology import ParallelState

# transformers' Gemma4 TP plan, as this runner applies it to each decoder layer.
DECODER_TP_PLAN = {
    "self_attn.q_proj": "colwise",
    "self_attn.k_proj": "colwise",  # replicated over tp / kv_heads ranks when kv_heads < tp
    "self_attn.v_proj": "colwise",  # absent on full layers with attention_k_eq_v (v = k)
    "self_attn.o_proj": "rowwise",
    "mlp.gate_proj": "colwise",
    "mlp.up_proj": "colwise",
    "mlp.down_proj": "rowwise",
}

# a vision encoder linear inside Gemma4VisionModel, whose clippable linears hold the nn.Linear as `.linear`: (its
# name among q_proj … down_proj)
_VISION_LINEAR = re.compile(r"^encoder\.layers\.\d+\.(?:self_attn|mlp)\.(\w+)\.linear$")


def decoder_prefix(layer_idx: int) -> str:
    """transformers' module name of decoder layer `layer_idx`, with its trailing dot (PEFT's names build on it)."""
    return f"model.language_model.layers.{layer_idx}."


# The norms whose outputs feed only column-parallel linears (transformers' decoder layer forward), or
# the experts of an MoE layer (`moe.py`).
BLOCK_INPUT_NORMS = ("input_layernorm", "pre_feedforward_layernorm", "pre_feedforward_layernorm_2")


def _mark_replicated(module: nn.Module, ps: ParallelState) -> None:
    for p in module.parameters():
        if not hasattr(p, "tp_dim"):
            mark_sharded(p, None, ps.dims.tp, ps.tp_rank)


def vision_linears(vision_tower: nn.Module, names: Collection[str]) -> Iterator[tuple[str, nn.Linear]]:
    """(transformers module name, nn.Linear) of the vision encoder layers' linears called one of `names`
    (q_proj … down_proj) in this Gemma4VisionModel — what lora.vision_tower adapts."""
    for name, linear in vision_tower.named_modules():
        match = _VISION_LINEAR.match(name)
        if match and match[1] in names and isinstance(linear, nn.Linear):
            yield f"{Gemma4VisionStage.hf_prefix}vision_tower.{name}", linear


class Gemma4VisionStage(nn.Module):
    """Pixels → image soft tokens in the language model's width (vision tower + embed_vision).

    Replicated on every TP rank of the first stage: it is small next to the decoder (the 31B's
    tower is SigLIP-so400m size) and usually frozen.
    In:  (input_ids, attention_mask, mm_token_type_ids, pixel_values, image_position_ids)
    Out: (input_ids, attention_mask, mm_token_type_ids, image_features[n_soft_tokens, hidden])
    """

    hf_prefix = "model."

    def __init__(self, config: Gemma4Config, ps: ParallelState) -> None:
        super().__init__()
        self.vision_tower = Gemma4VisionModel(config.vision_config)
        self.embed_vision = Gemma4MultimodalEmbedder(config.vision_config, config.text_config)
        self.hidden_size = config.text_config.hidden_size
        _mark_replicated(self, ps)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        input_ids, attention_mask, mm_token_type_ids, pixel_values, image_position_ids = inputs
        if pixel_values.shape[0] == 0:  # text-only micro-batch
            dtype = self.embed_vision.embedding_projection.weight.dtype
            features = torch.zeros(0, self.hidden_size, dtype=dtype, device=input_ids.device)
        else:
            soft = self.vision_tower(pixel_values=pixel_values, pixel_position_ids=image_position_ids)
            features = self.embed_vision(inputs_embeds=soft.last_hidden_state)
        return input_ids, attention_mask, mm_token_type_ids, features


class Gemma4TokenEmbedding(VocabParallelEmbedding):
    """The vocab-parallel token embedding; tied, the same module is the LM head on the last stage.

    `forward` is the first-stage role: embed the text tokens (image/video/audio placeholders looked
    up as the pad token, as transformers does) and scatter the image soft tokens into their rows.
    `head` is the last-stage role: this rank's vocabulary slice of the softcapped logits.
    """

    hf_prefix = "model.language_model.embed_tokens."

    def __init__(self, config: Gemma4Config, ps: ParallelState) -> None:
        tc = config.text_config
        super().__init__(
            tc.vocab_size, tc.hidden_size, ps.tp_group, padding_idx=tc.pad_token_id, embed_scale=tc.hidden_size**0.5,
            sequence_parallel=ps.dims.sequence_parallel,
        )
        self.image_token_id = config.image_token_id
        self.placeholder_ids = [i for i in (config.image_token_id, config.video_token_id, config.audio_token_id) if i is not None]
        self.pad_token_id = tc.pad_token_id
        self.softcap = tc.final_logit_softcapping

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        # `extra`: what the first stage adds for per-layer-input models (runner/models/gemma4/per_layer.py)
        input_ids, attention_mask, mm_token_type_ids, image_features, *extra = inputs
        placeholders = torch.isin(input_ids, torch.tensor(self.placeholder_ids, device=input_ids.device))
        hidden = self.embed(input_ids.masked_fill(placeholders, self.pad_token_id))
        image_rows = input_ids == self.image_token_id
        n_rows = int(image_rows.sum())
        if n_rows != image_features.shape[0]:
            raise UserError(
                f"micro-batch has {n_rows} image tokens but its images give {image_features.shape[0]} soft tokens; "
                f"build samples with the model's processor so every image gets exactly its soft tokens"
            )
        if n_rows:
            mask = image_rows.unsqueeze(-1).expand_as(hidden)
            hidden = hidden.masked_scatter(mask, image_features.to(hidden.dtype))
        if self.sequence_parallel:  # the decoder layers take this rank's slice of the sequence
            hidden = split_seq(hidden, self.tp_group)
        position_ids = document_positions(attention_mask)  # 0… per packed sample (a padded row: 0…n-1)
        return hidden, attention_mask, position_ids, mm_token_type_ids, *extra

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.logits(hidden)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


class Gemma4LMHead(Gemma4TokenEmbedding):
    """An untied LM head (`tie_word_embeddings: false`): its own `lm_head.weight`."""

    hf_prefix = "lm_head."

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)


def _alias_key(t: torch.Tensor) -> tuple:
    """What identifies a tensor's values without reading them: its memory, layout and in-place
    version (shared by `detach()` aliases, bumped by every in-place write)."""
    return t.data_ptr(), t.shape, t.stride(), t.dtype, t.device, t._version


class MaskCache:
    """The masks of the last few micro-batches, shared by all decoder layers of a stage.

    transformers' mask builder is host-heavy (vmap over index functions; a third of a CPU step
    when every layer called it, and again under activation-checkpoint recompute). The masks depend
    only on the micro-batch's small integer tensors, so a stage builds them once per micro-batch.
    Lookups never read tensor values (that would stall the host on the GPU once per layer): an
    entry keeps its integer tensors alive, so no other tensor can take their memory, and matches a
    tensor that aliases the same memory unchanged — the layers of a stage pass the same tensors on,
    and activation-checkpoint recompute gets `detach()`ed aliases of them. `capacity` covers the
    micro-batches a 1F1B schedule keeps in flight on one stage (at most pp) plus their recomputes.
    """

    def __init__(self, config: Gemma4Config, capacity: int) -> None:
        self.config = config
        self.capacity = capacity
        self.entries: list[tuple[tuple, tuple[torch.Tensor, ...], dict]] = []

    def get(self, hidden: torch.Tensor, attention_mask, position_ids, mm_token_type_ids) -> dict:
        ints = (attention_mask, position_ids, mm_token_type_ids)
        key = (tuple(hidden.shape[:2]), hidden.dtype, hidden.device, *(_alias_key(t) for t in ints))
        for i in range(len(self.entries) - 1, -1, -1):  # newest first: the usual hit
            if self.entries[i][0] == key:
                self.entries.append(self.entries.pop(i))  # most recently used last
                return self.entries[-1][2]
        if bool((attention_mask > 1).any()):  # document ids of packed rows, not a 0/1 padding mask
            masks = build_packed_masks(self.config, hidden, attention_mask, mm_token_type_ids)
        else:
            masks = build_masks(self.config, hidden, attention_mask, position_ids, mm_token_type_ids)
        self.entries.append((key, ints, masks))
        del self.entries[: max(0, len(self.entries) - self.capacity)]
        return masks


def flex_kernel_options(text_config: Gemma4TextConfig, head_dim: int) -> dict[str, dict[str, int]]:
    """FlexAttention's default forward tiles for head_dim 512 (the full layers) need more shared
    memory than an H100/H200 SM has; 32×32 forward tiles fit (the backward picks its own)."""
    if attn_implementation(text_config) != "flex_attention" or head_dim <= WIDE_HEAD_DIM:
        return {}
    return {"kernel_options": dict(WIDE_HEAD_FWD_TILES)}


class Gemma4DecoderLayerPipe(Gemma4TextDecoderLayer):
    """transformers' `Gemma4TextDecoderLayer` with column/row-parallel linears, as a pipeline layer.

    Shapes come from the layer transformers builds for `layer_idx` (so both the `per_layer_config`
    and the `global_head_dim` config styles work): sliding layers use head_dim and
    num_key_value_heads, full layers the global head dim, global KV heads and k_eq_v. It is built on
    the meta device first, so the full-size linears are never allocated.
    """

    def __init__(
        self, config: Gemma4Config, layer_idx: int, ps: ParallelState, masks: MaskCache, fused_rms_norm: bool = True,
        gemm_backward: bool = False,
    ) -> None:
        with torch.device("meta"):
            super().__init__(config.text_config, layer_idx)
        _shard_decoder_layer(self, config, ps, fused_rms_norm)
        self.masks = masks
        self.layer_type = config.text_config.layer_types[layer_idx]
        self.hf_prefix = decoder_prefix(layer_idx)
        self.rotary_emb = Gemma4TextRotaryEmbedding(config.text_config)
        self.attn_kwargs = flex_kernel_options(config.text_config, self.self_attn.head_dim)
        self.flex = attn_implementation(config.text_config) == "flex_attention"
        self.sequence_parallel = ps.dims.sequence_parallel
        if self.flex and gemm_backward and self.self_attn.head_dim > WIDE_HEAD_DIM:
            # this layer's attention alone calls `wide_head_attention` (masks stay FlexAttention's)
            self.self_attn.config = copy.copy(config.text_config)
            set_attn_implementation(self.self_attn.config, WIDE_HEAD_ATTENTION)
        _mark_replicated(self, ps)

    def train(self, mode: bool = True) -> Gemma4DecoderLayerPipe:
        """Under flex_attention the attention module stays in training mode: transformers builds a new
        torch.compile of FlexAttention whenever `module.training` flips (every DeepSpeed eval_batch)
        and, past torch's recompile limit, falls back to its unfused path. The flag only switches
        attention dropout there, which FlexAttention refuses in any mode (Gemma4's is 0)."""
        super().train(mode)
        if self.flex:
            self.self_attn.training = True
        return self

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        hidden, attention_mask, position_ids, mm_token_type_ids = inputs
        return self.run(hidden, attention_mask, position_ids, mm_token_type_ids), attention_mask, position_ids, \
            mm_token_type_ids

    def run(self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
            mm_token_type_ids: torch.Tensor, **layer_inputs) -> torch.Tensor:
        """transformers' layer forward with this stage's masks and RoPE; `layer_inputs`: per-layer input and
        shared keys/values (`decoder_layer_forward`)."""
        # under sequence parallelism `hidden` is this rank's slice; the masks span the whole sequence
        whole = hidden[:, :1].expand(-1, position_ids.shape[1], -1) if self.sequence_parallel else hidden
        masks = self.masks.get(whole, attention_mask, position_ids, mm_token_type_ids)
        if self.enable_moe_block:  # the router's load and balance loss count real tokens only
            self.router.real_tokens = attention_mask > 0
        return decoder_layer_forward(self, hidden, self.rotary_emb(hidden, position_ids, self.layer_type),
                                     masks[self.layer_type], position_ids, **layer_inputs, **self.attn_kwargs)


class FusedRMSNorm(Gemma4RMSNorm):
    """Gemma4's RMSNorm through PyTorch's fused kernel: the same fp32 math (x · (mean x² + eps)^-½ · w,
    one cast back) in one kernel each way instead of about eight elementwise ones — a tenth of a
    step's GPU time went to those at the 31B's width. The kernel reads bf16 and computes in fp32
    inside, so bf16 activations go in as they are: an fp32 copy in and a cast back per norm were 8% of
    a full-31B stage's GPU time. `fused=False` runs transformers' own ops."""

    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True, fused: bool = True) -> None:
        super().__init__(dim, eps=eps, with_scale=with_scale)
        self.fused = fused
        self.norm_eps = eps  # the runner's own attribute: transformers renames its (compat.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.with_scale else None
        if self.fused:  # the runner's weights and activations share one dtype (model.dtype)
            return F.rms_norm(hidden_states, hidden_states.shape[-1:], weight, self.norm_eps)
        normed = self._norm(hidden_states.float())
        return (normed if weight is None else normed * weight.float()).type_as(hidden_states)


class SequenceSliceRMSNorm(FusedRMSNorm):
    """A per-token norm between the TP blocks (the layer's own norms, the final norm). Under sequence
    parallelism it runs on this rank's slice of the sequence, so its scale's gradient is summed over
    TP (Megatron's `sequence_parallel` parameters)."""

    def __init__(self, dim: int, eps: float, tp_group: dist.ProcessGroup | None, fused: bool,
                 with_scale: bool = True, sequence_parallel: bool = False) -> None:
        super().__init__(dim, eps=eps, with_scale=with_scale, fused=fused)
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel
        if sequence_parallel and with_scale:
            sum_grad_over(self.weight, tp_group)


class HeadSharedRMSNorm(FusedRMSNorm):
    """q_norm / k_norm: one scale shared by all heads, while each TP rank sees only its own heads, so
    each rank's gradient covers its heads only and they are summed over TP (`sum_grad_over`;
    transformers' plan calls this `replicated_with_grad_allreduce`)."""

    def __init__(self, dim: int, eps: float, tp_group: dist.ProcessGroup | None, fused: bool) -> None:
        super().__init__(dim, eps=eps, fused=fused)
        sum_grad_over(self.weight, tp_group)


class BlockInputRMSNorm(SequenceSliceRMSNorm):
    """The norm in front of the attention block or the MLP: its output enters the TP group here, once,
    for all the block's column-parallel linears (built with `copy_input=False`), so backward
    all-reduces one input gradient per block instead of one per linear (q, k, v; gate, up). Under
    sequence parallelism it normalizes this rank's slice and all-gathers the sequence; a flat
    [tokens, hidden] input (the MoE block's) is gathered along its tokens, in rank order."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        normed = super().forward(hidden_states)
        if not self.sequence_parallel:
            return copy_to_group(normed, self.tp_group)
        if normed.dim() == 2:
            return gather_seq(normed.unsqueeze(0), self.tp_group).squeeze(0)
        return gather_seq(normed, self.tp_group)


def _shard_decoder_layer(layer: Gemma4TextDecoderLayer, config: Gemma4Config, ps: ParallelState,
                         fused_rms_norm: bool) -> None:
    """Swap the (meta) linears of a transformers decoder layer for TP ones and its RMSNorms for
    ones that run fused or transformers' ops (`fused_rms_norm`); materialize the rest."""
    tp, sp = ps.dims.tp, ps.dims.sequence_parallel
    attn = layer.self_attn
    head_dim = attn.head_dim
    q_heads = attn.q_proj.out_features // head_dim
    kv_heads = q_heads // attn.num_key_value_groups  # also on KV-shared layers, which have no k/v projections
    replicas = tp // kv_heads if kv_heads < tp else 1
    kv_group = ps.replica_groups.get(replicas)
    for name, style in DECODER_TP_PLAN.items():
        parent_name, attr = name.split(".")
        parent = getattr(layer, parent_name)
        old = getattr(parent, attr, None)  # v_proj is None under k_eq_v; KV-shared layers have no k/v_proj
        if old is None:
            continue
        bias = old.bias is not None
        if style == "rowwise":
            new = RowParallelLinear(old.in_features, old.out_features, ps.tp_group, bias=bias, sequence_parallel=sp)
        elif attr in ("k_proj", "v_proj"):
            new = ColumnParallelLinear(old.in_features, old.out_features, ps.tp_group, replicas=replicas,
                                       replica_group=kv_group, bias=bias, copy_input=False)
        else:
            new = ColumnParallelLinear(old.in_features, old.out_features, ps.tp_group, bias=bias, copy_input=False)
        setattr(parent, attr, new)
    if layer.enable_moe_block:
        shard_moe_block(layer, config, ps)
    for name, old in list(layer.named_modules()):
        if type(old) is Gemma4RMSNorm:
            parent_name, _, attr = name.rpartition(".")
            eps = rms_norm_eps(old)
            dim = old.weight.shape[0] if old.with_scale else 1
            if name in BLOCK_INPUT_NORMS:
                norm = BlockInputRMSNorm(dim, eps, ps.tp_group, fused_rms_norm, old.with_scale, sp)
            elif sp and "." not in name:  # the layer's own norms: per token, between the TP blocks
                norm = SequenceSliceRMSNorm(dim, eps, ps.tp_group, fused_rms_norm, old.with_scale, sp)
            else:
                norm = FusedRMSNorm(dim, eps, with_scale=old.with_scale, fused=fused_rms_norm)
            setattr(layer.get_submodule(parent_name), attr, norm)
    if tp > 1:
        for name in ("q_norm", "k_norm") if not is_kv_shared_layer(attn) else ("q_norm",):
            old = getattr(attn, name)
            setattr(attn, name, HeadSharedRMSNorm(old.weight.shape[0], rms_norm_eps(old), ps.tp_group, fused_rms_norm))
    # Local heads: q heads split tp ways, KV heads split or replicated (rank r holds KV head r // replicas).
    attn.num_key_value_groups = (q_heads // tp) // max(kv_heads // tp, 1)
    # What is still on meta is RMSNorm scales and the layer_scalar buffer; transformers initializes
    # both to 1, and checkpoint loading overwrites them.
    for module in layer.modules():
        for pname, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                setattr(module, pname, nn.Parameter(torch.ones(p.shape, dtype=p.dtype), requires_grad=p.requires_grad))
        for bname, b in list(module.named_buffers(recurse=False)):
            if b.is_meta:
                module.register_buffer(bname, torch.ones(b.shape, dtype=b.dtype))


class Gemma4FinalNorm(SequenceSliceRMSNorm):
    """The language model's final RMSNorm; drops the side tensors the head does not need."""

    hf_prefix = "model.language_model.norm."

    def __init__(self, config: Gemma4Config, ps: ParallelState, fused_rms_norm: bool = True) -> None:
        super().__init__(config.text_config.hidden_size, config.text_config.rms_norm_eps, ps.tp_group, fused_rms_norm,
                         sequence_parallel=ps.dims.sequence_parallel)
        _mark_replicated(self, ps)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return super().forward(inputs[0])
