"""Gemma4ForConditionalGeneration as a DeepSpeed `PipelineModule`: the architecture as a list.

    vision tower + embed_vision        (first stage)
    token embedding + image scatter    (first stage, tied with the head)
    decoder layer 0 … N-1              (split over the stages evenly, or by `stage_layers`)
    final norm                         (last stage)
    LM head = the embedding, tied      (last stage) → softcapped vocab-parallel logits

`loss_fn` turns the head's logits into the global-batch token-weighted loss (see `TokenWeightedLoss`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.activation_checkpointing import checkpointing as ds_checkpointing
from deepspeed.runtime.utils import partition_balanced
from torch import nn
from transformers import Gemma4Config

from runner.compat import Gemma4TextAttention, deepspeed_prints_dropped
from runner.errors import UserError
from runner.models.gemma4.moe import validate_moe_layout
from runner.models.gemma4.per_layer import (
    Gemma4PerLayerDecoderLayerPipe,
    Gemma4PerLayerEmbedding,
    StageExit,
    first_stage_specs,
    uses_per_layer_stages,
)
from runner.models.gemma4.stages import (
    Gemma4DecoderLayerPipe,
    Gemma4FinalNorm,
    Gemma4LMHead,
    Gemma4TokenEmbedding,
    Gemma4VisionStage,
    MaskCache,
)
from runner.parallel.tensor_parallel import vocab_parallel_cross_entropy
from runner.parallel.topology import ParallelDims, ParallelState, validate_model_split

IGNORE_INDEX = -100
# What the first stage reads from a micro-batch, in order; the last stage reads `labels`.
PIPE_INPUT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_position_ids")


def to_pipe_batch(micro_batch: dict[str, torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """A collated micro-batch as DeepSpeed's pipeline takes it: (first-stage inputs, labels)."""
    return tuple(micro_batch[k] for k in PIPE_INPUT_KEYS), micro_batch["labels"]


def check_supported(config: Gemma4Config) -> None:
    """Refuse config features the stages do not implement, rather than mis-compute them."""
    tc = config.text_config
    unsupported = {
        "text_config.use_bidirectional_attention='all'": tc.use_bidirectional_attention == "all",
        "vision_config missing (text-only Gemma4)": config.vision_config is None,
    }
    for feature, present in unsupported.items():
        if present:
            raise UserError(
                f"model config uses {feature}, which the pipeline stages do not implement yet; "
                f"use a supported Gemma4 (31B, 26B-A4B, E2B, E4B; README, Not supported)"
            )


def attention_shapes(text_config) -> dict[str, tuple[int, int, int]]:
    """(q heads, kv heads, head dim) per layer type, read off the attention transformers builds
    (on the meta device), so `per_layer_config` and `global_head_dim` config styles both work."""
    shapes = {}
    for i, layer_type in enumerate(text_config.layer_types):
        if layer_type not in shapes:
            with torch.device("meta"):
                attn = Gemma4TextAttention(text_config, i)
            shapes[layer_type] = (
                attn.q_proj.out_features // attn.head_dim, attn.k_proj.out_features // attn.head_dim, attn.head_dim
            )
    return shapes


def validate_layout(config: Gemma4Config, dims: ParallelDims) -> None:
    """One clear error if this model cannot run at (tp, pp)."""
    tc = config.text_config
    shapes = attention_shapes(tc)
    validate_model_split(
        dims,
        tc.num_hidden_layers,
        {
            "text_config.num_attention_heads": tc.num_attention_heads,
            "text_config.vocab_size": tc.vocab_size,
            "text_config.intermediate_size": tc.intermediate_size,
            **({"text_config.vocab_size_per_layer_input": tc.vocab_size_per_layer_input}
               if tc.hidden_size_per_layer_input else {}),
        },
        {kv for _, kv, _ in shapes.values()},
    )
    validate_moe_layout(config, dims)


def gemma4_layer_specs(config: Gemma4Config, ps: ParallelState | None, fused_rms_norm: bool = True,
                       gemm_backward: bool = False) -> list[LayerSpec]:
    """The model as DeepSpeed layer specs, in forward order (`ps=None`: only to list them, as
    `runner plan` does; nothing is built)."""
    pp = ps.dims.pp if ps is not None else 1
    masks = MaskCache(config, capacity=2 * pp + 2)  # one per stage process, shared by its layers
    tied = config.tie_word_embeddings or config.text_config.tie_word_embeddings
    if tied:
        embed = TiedLayerSpec("embed", Gemma4TokenEmbedding, config, ps)
        head = TiedLayerSpec("embed", Gemma4TokenEmbedding, config, ps, forward_fn=Gemma4TokenEmbedding.head)
    else:
        embed = LayerSpec(Gemma4TokenEmbedding, config, ps)
        head = LayerSpec(Gemma4LMHead, config, ps)
    before, after = first_stage_specs(config, ps, fused_rms_norm)  # per-layer inputs (E2B/E4B)
    decoder = Gemma4PerLayerDecoderLayerPipe if uses_per_layer_stages(config) else Gemma4DecoderLayerPipe
    return [
        LayerSpec(Gemma4VisionStage, config, ps),
        *before,
        embed,
        *after,
        *[LayerSpec(decoder, config, i, ps, masks, fused_rms_norm, gemm_backward)
          for i in range(config.text_config.num_hidden_layers)],
        LayerSpec(Gemma4FinalNorm, config, ps, fused_rms_norm),
        head,
    ]


class TokenWeightedLoss:
    """Sum of token losses over the number of label tokens in the whole global batch.

    DeepSpeed's pipeline averages the per-micro-batch losses over micro-batches (÷ gas) and the
    gradients over DP ranks (÷ dp). Each micro-batch therefore returns
    `sum(token losses) · gas · dp / N_global`, which makes both the reported loss and the gradient
    equal transformers' loss on the same global batch even when micro-batches carry different
    numbers of label tokens. `set_label_count` must be called before every step.
    """

    def __init__(self, ps: ParallelState, vocab_size: int) -> None:
        self.ps = ps
        self.vocab_start = ps.tp_rank * (vocab_size // ps.dims.tp)
        self.scale: float | None = None

    def set_label_count(self, global_label_tokens: int, micro_batches: int) -> None:
        if global_label_tokens <= 0:
            raise UserError("the global batch has no label tokens (all labels are -100: its samples were all masked or "
                            "skipped as bad); check the data's masking and the skipped-sample warnings")
        self.scale = micro_batches * self.ps.dims.dp / global_label_tokens

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            raise RuntimeError("TokenWeightedLoss.set_label_count was not called before the step")
        token_loss = vocab_parallel_cross_entropy(
            logits[:, :-1], labels[:, 1:].to(logits.device), self.vocab_start, self.ps.tp_group, IGNORE_INDEX
        )
        return token_loss.sum() * self.scale


def count_label_tokens(labels: torch.Tensor) -> int:
    """Label tokens after the one shift (position t predicts t+1)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def is_decoder_spec(spec) -> bool:
    """Whether a layer spec builds a decoder layer (what stages are split by)."""
    typename = getattr(spec, "typename", None)
    return isinstance(typename, type) and issubclass(typename, Gemma4DecoderLayerPipe)


def stage_boundaries(specs: Sequence, pp: int, stage_layers: Sequence[int] = ()) -> list[int]:
    """Where each stage's slice of the layer-spec list starts, plus the end. Decoder layers are split
    evenly (DeepSpeed's `partition_method="type:…"`: binary weights, `partition_balanced`) or, with
    `stage_layers`, stage s gets `stage_layers[s]` of them (Megatron's uneven split: the last stage
    also runs the 262144-vocabulary head, so it can take fewer). Vision and embedding go with the
    first stage, the final norm and head with the last."""
    is_layer = [int(is_decoder_spec(spec)) for spec in specs]
    if not stage_layers:
        return partition_balanced(weights=is_layer, num_parts=pp)
    n_layers, given = sum(is_layer), list(stage_layers)
    if len(given) != pp:
        raise UserError(f"parallel.stage_layers={given} has {len(given)} entries for parallel.pp={pp} stages; "
                        f"give one decoder-layer count per stage")
    if min(given) < 1 or sum(given) != n_layers:
        raise UserError(f"parallel.stage_layers={given} must give every stage at least one decoder layer and sum "
                        f"to the model's {n_layers}; e.g. {[n_layers // pp + (s < n_layers % pp) for s in range(pp)]}")
    positions = [i for i, w in enumerate(is_layer) if w]
    firsts = [positions[sum(given[:s])] for s in range(1, pp)]  # each later stage starts at its first layer
    return [0, *firsts, len(specs)]


class Gemma4Pipeline(PipelineModule):
    """The pipeline module plus what the runner needs around it: HF names and the loss."""

    def __init__(
        self,
        config: Gemma4Config,
        ps: ParallelState,
        *,
        activation_checkpoint_interval: int = 0,
        fused_rms_norm: bool = True,
        gemm_backward: bool = False,
        stage_layers: Sequence[int] = (),
        recompute_num_layers: int | None = None,
    ) -> None:
        check_supported(config)
        validate_layout(config, ps.dims)
        self.config = config
        self.ps = ps
        self.stage_layers = tuple(stage_layers)
        loss = TokenWeightedLoss(ps, config.text_config.vocab_size)
        with deepspeed_prints_dropped():  # its topology and seed settings
            super().__init__(
                layers=gemma4_layer_specs(config, ps, fused_rms_norm, gemm_backward),
                topology=ps.topology,
                loss_fn=loss,
                activation_checkpoint_interval=activation_checkpoint_interval,
                # non-reentrant: a frozen embedding or vision tower feeds checkpointed layers inputs that
                # need no grad, which the reentrant function would cut off from autograd. DeepSpeed's own
                # function, because the engine recognizes only it as non-reentrant; with any other it
                # marks pixel_values requires_grad and backpropagates through a frozen vision tower.
                activation_checkpoint_func=ds_checkpointing.non_reentrant_checkpoint,
                checkpointable_layers=[Gemma4DecoderLayerPipe.__name__, Gemma4PerLayerDecoderLayerPipe.__name__],
                dynamic_shape=True,
            )
        self.token_loss = loss
        self.lora: dict | None = None  # set by runner.lora.apply_lora: checkpoints then hold only the adapters
        decoder = [f for f in self.forward_funcs if isinstance(f, Gemma4DecoderLayerPipe)]
        self.recomputed = decoder if recompute_num_layers is None else decoder[:recompute_num_layers]
        self.stage_exit = (StageExit(config, decoder[-1].layer_idx)
                           if uses_per_layer_stages(config) and not ps.is_last_stage else None)

    def forward(self, forward_input):
        """The stage's layers; a non-last stage of a per-layer model then prepares what it sends
        (`per_layer.StageExit`)."""
        outputs = super().forward(forward_input)
        return outputs if self.stage_exit is None else self.stage_exit(outputs)

    def _is_checkpointable(self, funcs: list) -> bool:
        """DeepSpeed's hook that decides, per chunk of `activation_checkpoint_interval` layers,
        whether to checkpoint it: only the stage's first `recompute_num_layers` decoder layers."""
        return super()._is_checkpointable(funcs) and all(any(f is r for r in self.recomputed) for f in funcs)

    def _partition_layers(self, method: str = "uniform") -> None:
        """DeepSpeed's hook that cuts the spec list into stages (`self.parts`); `method`
        (`partition_method`) is replaced by `stage_boundaries`, the rule `runner plan` reports."""
        self.parts = stage_boundaries(self._layer_specs, self.num_stages, self.stage_layers)
        if self.global_rank == 0:
            counts = self.stage_layer_counts()
            for stage in range(self.num_stages):
                first = sum(counts[:stage])
                others = [spec.typename.__name__ for spec in self._layer_specs[self.parts[stage]:self.parts[stage + 1]]
                          if not is_decoder_spec(spec)]
                print(f"stage {stage}: decoder layers {first}-{first + counts[stage] - 1} ({counts[stage]})"
                      + "".join(f", {name}" for name in others), flush=True)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    def freeze(self, *, embeddings: bool = False, vision_tower: bool = False, language_model: bool = False) -> None:
        """Stop training parts of the model (call before building the optimizer).

        embeddings: the token embedding and with it the tied head, and the per-layer embedding table;
        vision_tower: the SigLIP tower (`embed_vision`, the projector into the text width, stays
        trainable); language_model: the decoder layers and the final norm.
        """
        for module in self.modules():
            frozen = (
                (embeddings and isinstance(module, (Gemma4TokenEmbedding, Gemma4PerLayerEmbedding)))
                or (vision_tower and isinstance(module, Gemma4VisionStage))
                or (language_model and isinstance(module, (Gemma4DecoderLayerPipe, Gemma4FinalNorm)))
            )
            if frozen:
                target = module.vision_tower if isinstance(module, Gemma4VisionStage) else module
                for p in target.parameters():
                    p.requires_grad_(False)

    def get_tied_weights_and_groups(self) -> list[tuple[torch.nn.Parameter, object]]:
        """The weights whose gradients DeepSpeed sums over a group once per step, after the last
        micro-batch's backward: the tied embedding/head over their stages, and the replicated weights
        whose TP copies each hold part of the gradient (`sum_grad_over`: q/k norm scales, norms under
        sequence parallelism, replicated KV heads). Frozen ones have no gradient (and under bf16 no
        `_hp_grad`) to sum."""
        tied = list(super().get_tied_weights_and_groups())
        partial = [(p, p.grad_sum_group) for p in self.parameters() if hasattr(p, "grad_sum_group")]
        return [(w, g) for w, g in tied + partial if w.requires_grad]

    def hf_tensors(self) -> Iterator[tuple[str, torch.Tensor, nn.Module]]:
        """(HF name, local tensor, owning stage module) for every parameter and persistent buffer
        on this rank. Tied copies on several stages map to the same HF name."""
        for module in self.modules():
            prefix = getattr(module, "hf_prefix", None)
            if prefix is None:
                continue
            for name, tensor in module.state_dict(keep_vars=True).items():
                yield prefix + name, tensor, module

    def checkpointed(self, tensor: torch.Tensor) -> bool:
        """Whether native checkpoints hold `tensor`: everything, except the frozen base of a LoRA run."""
        return not (self.lora and isinstance(tensor, nn.Parameter) and not tensor.requires_grad)

    def stage_layer_counts(self) -> list[int]:
        """Decoder layers per stage, first to last (what `parallel.stage_layers` sets)."""
        return [sum(map(is_decoder_spec, self._layer_specs[a:b])) for a, b in zip(self.parts, self.parts[1:])]

    def decoder_layers(self) -> list[int]:
        """Indices of the decoder layers this rank's stage holds."""
        return [m.layer_idx for m in self.modules() if isinstance(m, Gemma4DecoderLayerPipe)]
