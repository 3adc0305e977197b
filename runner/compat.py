"""Every transformers and PEFT internal the runner reads, in one place (and the few DeepSpeed ones, at the end).

transformers renames module attributes and private helpers between minor releases (5.25 renamed
`Gemma4RMSNorm.eps` to `variance_epsilon`); the runner reaches them only through this module, so
the next rename is a one-place fix. The range tested against is declared in pyproject.toml
(`transformers>=5.17,<5.26`, `peft>=0.18,<0.22`; `runner/requirements.py` checks it at start); `tests/test_compat.py` checks each seam on the installed
release.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import peft
import torch
from peft.utils import CONFIG_NAME as ADAPTER_CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME as ADAPTER_WEIGHTS_NAME
from peft.utils.other import get_pattern_key
from torch import nn
from transformers import AttentionInterface, Gemma4Config, Gemma4ForConditionalGeneration, PretrainedConfig
from transformers.integrations.flex_attention import flex_attention_forward
from transformers.masking_utils import (
    and_masks,
    blockwise_overlay,
    create_causal_mask,
    packed_sequence_mask_function,
    sliding_window_overlay,
)
from transformers.models.gemma4.modeling_gemma4 import (
    Gemma4MultimodalEmbedder,
    Gemma4RMSNorm,
    Gemma4TextAttention,
    Gemma4TextDecoderLayer,
    Gemma4TextRotaryEmbedding,
    Gemma4TextRouter,
    Gemma4VisionModel,
    get_block_sequence_ids_for_mask,
)

__all__ = [
    "ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "peft_key", "peft_lora_config", "peft_pattern_value",
    "read_peft_lora_config",
    "Gemma4MultimodalEmbedder", "Gemma4RMSNorm", "Gemma4TextAttention", "Gemma4TextDecoderLayer",
    "Gemma4TextRotaryEmbedding", "Gemma4TextRouter", "Gemma4VisionModel", "attn_implementation", "build_masks", "build_packed_masks",
    "decoder_layer_forward", "deepspeed_prints_dropped", "flex_attention_forward", "is_kv_shared_layer",
    "kv_sharing_modes",
    "process_groups", "register_attention", "rms_norm_eps", "set_attn_implementation", "skip_deepspeed_shm_comm",
]


def rms_norm_eps(norm: Gemma4RMSNorm) -> float:
    """The epsilon of a transformers RMSNorm: `variance_epsilon` from 5.25, `eps` before."""
    for name in ("variance_epsilon", "eps"):
        value = getattr(norm, name, None)
        if isinstance(value, float):
            return value
    raise AttributeError(f"{type(norm).__name__} has neither variance_epsilon nor eps: a transformers release "
                         f"outside the tested range renamed it (runner/compat.py)")


def attn_implementation(config: PretrainedConfig) -> str | None:
    """The attention backend a (text) config selects."""
    return config._attn_implementation


def set_attn_implementation(config: PretrainedConfig, name: str) -> None:
    """Select the attention backend of one (text) config object only, the way transformers' modules read it."""
    config._attn_implementation = name


def register_attention(name: str, fn: Any) -> None:
    """Add an attention function under `name` to transformers' attention registry."""
    AttentionInterface.register(name, fn)


def build_masks(config: Gemma4Config, hidden: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, mm_token_type_ids: torch.Tensor) -> dict:
    """The full and sliding masks exactly as transformers builds them for training (no cache):
    causal; on sliding layers also the window, OR bidirectional within each image when
    `use_bidirectional_attention == "vision"`. (The cache argument is positional: it was renamed
    from `past_key_values` to `cache` in 5.25.)"""
    return Gemma4ForConditionalGeneration.create_masks_for_generate(
        config, hidden, attention_mask, None, position_ids, mm_token_type_ids
    )


def build_packed_masks(config: Gemma4Config, hidden: torch.Tensor, document_ids: torch.Tensor,
                       mm_token_type_ids: torch.Tensor) -> dict:
    """`build_masks` for packed rows (`runner/data/packing.py`), ANDed with "same document id": the
    full layers causal, the sliding ones the window OR (under `use_bidirectional_attention ==
    "vision"`) bidirectional within each image, as Gemma4's `create_masks_for_vision_model`; a
    BlockMask under FlexAttention. transformers' own packed path (positions restarting, no 2-D mask)
    is not used: in 5.25 it looks the image overlay up by position within the sample, so one sample's
    image would open bidirectional attention at the same positions of the next. Here every function
    sees row indices; a window within one sample is the same counted either way."""
    tc = config.get_text_config()
    same_document = packed_sequence_mask_function(document_ids)
    args = (tc, hidden, None, None)  # config, embeddings, attention mask, cache (positional: renamed in 5.25)
    images = None
    if tc.use_bidirectional_attention == "vision":
        images = blockwise_overlay(get_block_sequence_ids_for_mask(mm_token_type_ids, hidden.device))
    return {
        "full_attention": create_causal_mask(*args, and_mask_function=same_document),
        "sliding_attention": create_causal_mask(
            *args, or_mask_function=images, and_mask_function=and_masks(sliding_window_overlay(tc.sliding_window),
                                                                            same_document)),
    }


def decoder_layer_forward(layer: Gemma4TextDecoderLayer, hidden: torch.Tensor, position_embeddings: Any,
                          attention_mask: Any, position_ids: torch.Tensor, per_layer_input: torch.Tensor | None = None,
                          shared_kv_states: dict | None = None, **kwargs: Any) -> torch.Tensor:
    """transformers' decoder-layer forward for training, no cache (positional: its keyword was renamed
    in 5.25). `per_layer_input`: this layer's slice of the per-layer inputs (E2B/E4B; None without);
    `shared_kv_states`: layer type -> (keys, values), read by KV-shared layers and written by the layer
    that stores them (a plain dict on every release; 5.25 wraps it in KVSharingDict only in its model)."""
    shared = {} if shared_kv_states is None else shared_kv_states
    return Gemma4TextDecoderLayer.forward(layer, hidden, per_layer_input, shared, position_embeddings, attention_mask,
                                          position_ids, **kwargs)


def is_kv_shared_layer(attn: nn.Module) -> bool:
    """Whether an attention module reuses an earlier layer's keys/values (E2B/E4B's last layers)."""
    return bool(getattr(attn, "is_kv_shared_layer", False))


def kv_sharing_modes(text_config: PretrainedConfig) -> list[str | None]:
    """Per decoder layer: "reuse" (a KV-shared layer: no k/v projections, it reads the stored keys and
    values of its type), "store" (the last non-shared layer of its type, whose keys/values those reuse)
    or None. 5.25 has the config property `kv_sharing_modes`; 5.17 computes the same in each attention
    module (`is_kv_shared_layer`, `store_full_length_kv`), by the rule repeated here."""
    modes = getattr(text_config, "kv_sharing_modes", None)
    if modes is not None:
        return list(modes)
    n = text_config.num_hidden_layers
    first_shared = n - (getattr(text_config, "num_kv_shared_layers", 0) or 0)
    modes = [None if i < first_shared else "reuse" for i in range(n)]
    earlier = text_config.layer_types[:first_shared]
    for layer_type in set(earlier):
        modes[first_shared - 1 - earlier[::-1].index(layer_type)] = "store"
    return modes


# A saved PEFT adapter names a LoRA weight by the wrapped model's module path: PeftModel.base_model (LoraModel)
# .model (the transformers model), without the adapter name ("default") that the live modules carry.
PEFT_KEY_PREFIX = "base_model.model."


def peft_key(module_name: str, part: str) -> str:
    """The key of `part` ("lora_A" / "lora_B") of the adapter on transformers module `module_name` in
    adapter_model.safetensors."""
    return f"{PEFT_KEY_PREFIX}{module_name}.{part}.weight"


def peft_lora_config(**kwargs: Any) -> peft.LoraConfig:
    """PEFT's LoraConfig (written as adapter_config.json by its `save_pretrained`)."""
    return peft.LoraConfig(**kwargs)


def peft_pattern_value(pattern: dict[str, Any], module_name: str, default: Any) -> Any:
    """The value `rank_pattern` / `alpha_pattern` gives transformers module `module_name`, as PEFT's
    LoraModel picks it when it adds the adapter: the first key that, as a regex, matches the name's end after
    a dot (or the whole name), else `default`."""
    return pattern.get(get_pattern_key(list(pattern), module_name), default)


def read_peft_lora_config(path: str | Path) -> peft.LoraConfig:
    """The LoraConfig of a PEFT adapter directory (its adapter_config.json)."""
    config = peft.PeftConfig.from_pretrained(str(path))
    if not isinstance(config, peft.LoraConfig):
        raise TypeError(f"{path} holds a {type(config).__name__}, not a LoraConfig")
    return config


def process_groups() -> list:
    """Every process group this rank belongs to: torch's own registry (private; DeepSpeed creates its
    pipeline groups without a timeout, so the runner sets one on each after they exist)."""
    return list(torch.distributed.distributed_c10d._world.pg_map)


def set_group_timeout(timeout, group) -> None:
    """Set a process group's collective timeout: `torch.distributed.set_timeout` from torch 2.12 on, the
    private `distributed_c10d._set_pg_timeout` (deprecated since) on torch 2.11."""
    set_timeout = getattr(torch.distributed, "set_timeout", None)
    if set_timeout is None:
        set_timeout = torch.distributed.distributed_c10d._set_pg_timeout
    set_timeout(timeout, group)


def skip_deepspeed_shm_comm() -> bool:
    """On CPU (DS_ACCELERATOR=cpu): mark DeepSpeed's shared-memory comm op (`deepspeed_shm_comm`)
    incompatible, so that its comm backend, when `deepspeed.init_distributed` (or `deepspeed.initialize`)
    starts it, uses plain gloo collectives instead of compiling the op with a C++ compiler first
    (minutes on a fresh TORCH_EXTENSIONS_DIR, silently, then once per process). The op serves only
    DeepSpeed's `inference_all_reduce` (inference TP), which training never calls. DeepSpeed probes
    `deepspeed.ops.__compatible_ops__` once and keeps the dict in the module: the edit persists.
    Call before DeepSpeed's comm backend starts; returns whether the op was marked."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return False
    builder = accelerator.get_op_builder("ShareMemCommBuilder")
    if builder is None:
        return False
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[builder.NAME] = False
    return True


# DeepSpeed's print() calls on rank 0 that no logger level reaches: PipelineParallelGrid's topology dump
# (the runner's grid and PipelineModule's own) and PipelineModule's layer-seed settings
DEEPSPEED_PRINTS = ("Using topology:", "SEED_LAYERS=")


@contextlib.contextmanager
def deepspeed_prints_dropped() -> Iterator[None]:
    """Run DeepSpeed's constructors with their `DEEPSPEED_PRINTS` lines dropped from stdout (kept under
    `runner train --verbose`); every other line is written when the block ends."""
    from runner.quiet import verbose

    if verbose():
        yield
        return
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        kept = [line for line in buffer.getvalue().splitlines(keepends=True) if not line.startswith(DEEPSPEED_PRINTS)]
        if kept:
            sys.stdout.write("".join(kept))
            sys.stdout.flush()
