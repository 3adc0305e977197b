"""What the FlexAttention option changes in a decoder layer, checked without a GPU (PyTorch's CPU
FlexAttention does not compile here; the kernels themselves are compared with sdpa in gpu_bench)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from runner.models.gemma4.stages import Gemma4DecoderLayerPipe, MaskCache, flex_kernel_options
from runner.models.gemma4.tiny import tiny_config
from runner.parallel.topology import ParallelDims


def _layer(attn: str, layer_idx: int) -> Gemma4DecoderLayerPipe:
    config = tiny_config()
    config.text_config._attn_implementation = attn
    ps = SimpleNamespace(dims=ParallelDims(), tp_group=None, tp_rank=0, replica_groups={})
    return Gemma4DecoderLayerPipe(config, layer_idx, ps, MaskCache(config, 2))


@pytest.mark.parametrize("attn", ["flex_attention", "sdpa"])
def test_eval_keeps_flex_attention_in_training_mode(attn):
    """transformers recompiles FlexAttention when `module.training` flips: under flex the attention
    module stays in training mode through eval (Gemma4 has no attention dropout); the rest follows."""
    layer = _layer(attn, 0)
    assert layer.self_attn.attention_dropout == 0
    layer.eval()
    assert not layer.training and not layer.mlp.training
    assert layer.self_attn.training == (attn == "flex_attention")
    layer.train()
    assert layer.self_attn.training


def test_flex_tiles_only_on_wide_heads():
    """32×32 forward tiles where head_dim exceeds 256 (the 31B's 512-wide full layers), nothing on
    narrower heads, nothing under sdpa."""
    config = tiny_config().text_config
    config._attn_implementation = "flex_attention"
    assert flex_kernel_options(config, 512) == {"kernel_options": {"BLOCK_M": 32, "BLOCK_N": 32}}
    assert flex_kernel_options(config, 256) == {}
    config._attn_implementation = "sdpa"
    assert flex_kernel_options(config, 512) == {}
