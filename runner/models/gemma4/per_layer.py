"""Gemma4 E2B / E4B: per-layer input embeddings (PLE) and KV-shared layers as pipeline layers.

Between stages of these models travels
`(hidden, attention_mask, position_ids, mm_token_type_ids, per_layer_inputs, k_a, v_a, k_b, v_b, …)`:

- `per_layer_inputs` [batch, seq (/ tp under sequence parallelism), layers left, P]: transformers'
  per-layer inputs, the slices of the decoder layers on this and later stages only (each stage
  drops the ones it consumed before sending). They are computed once, on the first stage, and
  carried rather than recomputed per stage: recomputing needs the token ids, the vocab-parallel
  `embed_tokens_per_layer` table (E2B: 262144 x 35·256 = 2.35 B parameters, 4.7 GB in bf16 plus
  its gradient, master copy and Adam state) and the image-merged input embeddings (the token
  embedding and the vision tower) on every stage; carrying costs 2 bytes x layers left x P per
  token and boundary (E2B at pp 2: 17 x 256 x 2 = 8.5 KB per token, under 3 hidden states; its
  keys/values add 3 KB), sent once per micro-batch each way.
- `k_t, v_t`: the keys and values (this rank's KV heads, whole sequence, after norm and RoPE) that
  the storing layer of layer type t produced, for as long as a later KV-shared layer of type t
  still needs them. They are ordinary tensors of the tuple, not shared state: activation-
  checkpoint recompute just recomputes them, and their gradient reaches the producer's k/v
  projections through DeepSpeed's pipeline (it sends a gradient for every float tensor).

Models without PLE or KV sharing (31B, 26B-A4B) do not use this module: their tuple is unchanged.
The audio tower (E2B/E4B's `audio_config`) is not built; its weights are skipped on load and copied
unchanged into exports (`AUDIO_PREFIXES`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from deepspeed.pipe import LayerSpec
from torch import nn
from transformers import Gemma4Config, Gemma4TextConfig

from runner.compat import kv_sharing_modes
from runner.models.gemma4.stages import FusedRMSNorm, Gemma4DecoderLayerPipe, MaskCache, _mark_replicated
from runner.parallel.tensor_parallel import VocabParallelEmbedding, sum_grad_over
from runner.parallel.topology import ParallelState

# HF tensors of the audio tower: not built, not trained, passed through to exports unchanged.
AUDIO_PREFIXES = ("model.audio_tower.", "model.embed_audio.")
SIDE = 4  # hidden, attention_mask, position_ids, mm_token_type_ids: what every stage tuple starts with


def uses_per_layer_stages(config: Gemma4Config) -> bool:
    """Whether the model needs this module's stages: per-layer inputs or KV-shared layers."""
    tc = config.text_config
    return bool(tc.hidden_size_per_layer_input) or bool(getattr(tc, "num_kv_shared_layers", 0))


@dataclass(frozen=True)
class KVSharing:
    """Which layer stores each layer type's keys/values and which layers reuse them, as transformers
    decides (`compat.kv_sharing_modes`); types that no layer reuses are left out (nothing travels)."""

    producer: dict[str, int]  # layer type -> the layer that stores its keys/values
    last_consumer: dict[str, int]  # layer type -> the last layer that reuses them

    @classmethod
    def of(cls, text_config: Gemma4TextConfig) -> KVSharing:
        modes, types = kv_sharing_modes(text_config), text_config.layer_types
        producer = {types[i]: i for i, m in enumerate(modes) if m == "store"}
        last = {types[i]: i for i, m in enumerate(modes) if m == "reuse"}
        return cls({t: i for t, i in producer.items() if t in last}, last)

    def live(self, layer_idx: int) -> tuple[str, ...]:
        """Layer types whose (keys, values) travel into decoder layer `layer_idx`, in a fixed order."""
        return tuple(t for t in sorted(self.producer) if self.producer[t] < layer_idx <= self.last_consumer[t])


def _placeholders_as_pad(config: Gemma4Config, input_ids: torch.Tensor) -> torch.Tensor:
    """Image/video/audio placeholder ids replaced by the pad id, as transformers looks them up."""
    ids = [i for i in (config.image_token_id, config.video_token_id, config.audio_token_id) if i is not None]
    placeholders = torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))
    return input_ids.masked_fill(placeholders, config.text_config.pad_token_id)


class Gemma4PerLayerEmbedding(VocabParallelEmbedding):
    """`embed_tokens_per_layer`, vocab-parallel like the token embedding (E2B's table is larger than
    all its decoder layers together). First stage, before the token embedding, which passes its
    output on: the token-identity part of the per-layer inputs, [batch, seq, layers·P], under
    sequence parallelism only this rank's slice (reduce-scattered, not all-reduced).
    In:  (input_ids, attention_mask, mm_token_type_ids, image_features)
    Out: (input_ids, attention_mask, mm_token_type_ids, image_features, per_layer_tokens)
    """

    hf_prefix = "model.language_model.embed_tokens_per_layer."

    def __init__(self, config: Gemma4Config, ps: ParallelState) -> None:
        tc = config.text_config
        super().__init__(tc.vocab_size_per_layer_input, tc.num_hidden_layers * tc.hidden_size_per_layer_input,
                         ps.tp_group, padding_idx=tc.pad_token_id, embed_scale=tc.hidden_size_per_layer_input**0.5,
                         sequence_parallel=ps.dims.sequence_parallel)
        self.config = config

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        input_ids = inputs[0]
        tokens = self.embed(_placeholders_as_pad(self.config, input_ids), scatter_seq=self.sequence_parallel)
        return (*inputs, tokens)


class Gemma4PerLayerProjection(nn.Module):
    """The context part of the per-layer inputs and their sum with the token part (transformers'
    `project_per_layer_inputs`): the projection of the input embeddings *after* the image soft
    tokens are scattered in, as Gemma4Model does. First stage, after the token embedding.

    Replicated on every TP rank rather than column-parallel: every rank needs every layer's slice,
    so a column-parallel projection would need an all-gather of [tokens, layers·P] (larger than
    the hidden state) where the replicated one costs about a third of one decoder layer's FLOPs; under
    sequence parallelism it runs on this rank's slice only (its gradients summed over TP).
    In:  (hidden, attention_mask, position_ids, mm_token_type_ids, per_layer_tokens)
    Out: (hidden, attention_mask, position_ids, mm_token_type_ids, per_layer_inputs[batch, seq, layers, P])
    """

    hf_prefix = "model.language_model."

    def __init__(self, config: Gemma4Config, ps: ParallelState, fused_rms_norm: bool = True) -> None:
        super().__init__()
        tc = config.text_config
        self.layers, self.width = tc.num_hidden_layers, tc.hidden_size_per_layer_input
        self.scale = tc.hidden_size**-0.5
        self.per_layer_model_projection = nn.Linear(tc.hidden_size, self.layers * self.width, bias=False)
        self.per_layer_projection_norm = FusedRMSNorm(self.width, eps=tc.rms_norm_eps, fused=fused_rms_norm)
        _mark_replicated(self, ps)
        if ps.dims.sequence_parallel:
            for p in self.parameters():
                sum_grad_over(p, ps.tp_group)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        hidden, attention_mask, position_ids, mm_token_type_ids, tokens = inputs
        shape = (*hidden.shape[:2], self.layers, self.width)
        context = self.per_layer_projection_norm((self.per_layer_model_projection(hidden) * self.scale).reshape(shape))
        per_layer_inputs = (context + tokens.reshape(shape)) * 2.0**-0.5
        return hidden, attention_mask, position_ids, mm_token_type_ids, per_layer_inputs


class Gemma4PerLayerDecoderLayerPipe(Gemma4DecoderLayerPipe):
    """A decoder layer of a model with per-layer inputs and/or KV-shared layers: it takes its slice
    of the carried per-layer inputs, hands the carried (keys, values) to transformers' layer as its
    `shared_kv_states`, and passes on the ones later layers still need (`KVSharing.live`), plus those
    it stores itself. Its per-layer gate and projection are replicated (P is small), and per token:
    under sequence parallelism they run on this rank's slice, gradients summed over TP."""

    def __init__(self, config: Gemma4Config, layer_idx: int, ps: ParallelState, masks: MaskCache,
                 fused_rms_norm: bool = True, gemm_backward: bool = False) -> None:
        super().__init__(config, layer_idx, ps, masks, fused_rms_norm, gemm_backward)
        tc = config.text_config
        sharing = KVSharing.of(tc)
        self.live_in, self.live_out = sharing.live(layer_idx), sharing.live(layer_idx + 1)
        self.per_layer = bool(tc.hidden_size_per_layer_input)
        self.num_layers = tc.num_hidden_layers
        if self.per_layer and ps.dims.sequence_parallel:
            for p in (*self.per_layer_input_gate.parameters(), *self.per_layer_projection.parameters()):
                sum_grad_over(p, ps.tp_group)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        side, rest = inputs[:SIDE], list(inputs[SIDE:])
        per_layer_inputs = rest.pop(0) if self.per_layer else None
        shared = {t: (rest[2 * j], rest[2 * j + 1]) for j, t in enumerate(self.live_in)}
        mine = None
        if per_layer_inputs is not None:  # it holds the slices of layers num_layers - n … num_layers - 1
            mine = per_layer_inputs[:, :, self.layer_idx - (self.num_layers - per_layer_inputs.shape[2])]
        hidden = self.run(*side, per_layer_input=mine, shared_kv_states=shared)
        carried = [t for layer_type in self.live_out for t in shared[layer_type]]
        return hidden, *side[1:], *([per_layer_inputs] if self.per_layer else []), *carried


class _StageExit(torch.autograd.Function):
    """Identity (made contiguous, for sending) on a stage's float outputs, with one backward for all.

    DeepSpeed's pipeline engine backpropagates each float output of a stage on its own
    (`out.backward(grad, retain_graph=True)` per tensor). Carried keys/values reach back through every
    layer before their producer, so each such call would run the backward of most of the stage
    again (the sum is right, the work doubled). This node keeps the gradients until every output
    has one (or all arrive in one call), then releases them together: one backward traversal.
    """

    @staticmethod
    def forward(ctx, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.set_materialize_grads(False)
        ctx.pending = [None] * len(tensors)
        return tuple(t.contiguous() for t in tensors)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        for i, g in enumerate(grads):
            if g is not None:
                ctx.pending[i] = g if ctx.pending[i] is None else ctx.pending[i] + g
        if any(g is None for g in ctx.pending):
            return (None,) * len(grads)
        out, ctx.pending = tuple(ctx.pending), [None] * len(grads)
        return out


class StageExit:
    """What a non-last stage of a per-layer model does to its last layer's output before sending it:
    drop the per-layer inputs it consumed, make everything contiguous, join the float tensors'
    backward (`_StageExit`)."""

    def __init__(self, config: Gemma4Config, last_layer: int) -> None:
        tc = config.text_config
        self.per_layer = bool(tc.hidden_size_per_layer_input)
        self.num_layers, self.last_layer = tc.num_hidden_layers, last_layer

    def __call__(self, outputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        outputs = list(outputs)
        if self.per_layer:
            pli = outputs[SIDE]
            outputs[SIDE] = pli[:, :, self.last_layer + 1 - (self.num_layers - pli.shape[2]):]
        floats = [i for i, t in enumerate(outputs) if t.is_floating_point()]
        for i, t in zip(floats, _StageExit.apply(*(outputs[i] for i in floats))):
            outputs[i] = t
        return tuple(outputs)


def first_stage_specs(config: Gemma4Config, ps: ParallelState | None, fused_rms_norm: bool) -> tuple[list, list]:
    """The layer specs a per-layer-input model adds around the token embedding: (before, after)."""
    if not config.text_config.hidden_size_per_layer_input:
        return [], []
    return ([LayerSpec(Gemma4PerLayerEmbedding, config, ps)],
            [LayerSpec(Gemma4PerLayerProjection, config, ps, fused_rms_norm)])

