"""`model.wide_head_backward: gemm`: FlexAttention's forward with a backward of GEMMs on the full
layers' wide heads, against autograd through transformers' eager attention (CPU, fp32; PyTorch's
unfused FlexAttention stands in for the GPU kernel)."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from runner.config import ModelConfig, load_config
from runner.errors import UserError
from runner.models.gemma4 import stages
from runner.models.gemma4.attention import WIDE_HEAD_ATTENTION, FlexForwardGemmBackward, attention_backward, row_blocks
from runner.models.gemma4.stages import Gemma4DecoderLayerPipe, MaskCache
from runner.models.gemma4.tiny import tiny_config
from runner.parallel.topology import ParallelDims


def _eager(q, k, v, allowed, scale):
    """Masked softmax attention; a row that may see no key gives zeros (as FlexAttention does)."""
    g = q.shape[1] // k.shape[1]
    scores = (q @ k.repeat_interleave(g, 1).transpose(-1, -2)) * scale
    probs = scores.masked_fill(~allowed, -1e30).softmax(-1) * allowed.any(-1, keepdim=True)
    return probs @ v.repeat_interleave(g, 1)


def _mask(b: int, s: int) -> torch.Tensor:
    """Causal; sequence 0 with a bidirectional span (keys past a row block's end), sequence 1 with its
    last 10 tokens padding and one query row that may see no key at all (LSE -inf)."""
    allowed = torch.ones(s, s, dtype=torch.bool).tril().expand(b, 1, s, s).clone()
    allowed[0, :, 8:14, 8:14] = True
    allowed[1, :, :, 30:] = False
    allowed[1, :, 30:, 0] = True  # pad queries still see a real key, as transformers' masks do...
    allowed[1, :, 35] = False  # ...except this one
    return allowed


def _packed_mask(b: int, s: int) -> torch.Tensor:
    """Packed rows (`runner/data/packing.py`): samples causal within themselves, padding (document 0) a causal
    run of its own; the two sequences' samples end at different rows."""
    lengths = ([7, 12, 9, 5], [15, 3, 11])
    doc = torch.zeros(b, s, dtype=torch.long)
    for i, row in enumerate(lengths[:b]):
        doc[i, :sum(row)] = torch.repeat_interleave(torch.arange(1, len(row) + 1), torch.tensor(row))
    idx = torch.arange(s)
    return ((doc[:, :, None] == doc[:, None, :]) & (idx[:, None] >= idx[None, :]))[:, None]


@pytest.mark.parametrize("masks", [_mask, _packed_mask])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_gemm_backward_equals_autograd(kv_heads, masks):
    """dq, dk, dv from the output and LSE equal autograd's, GQA groups of 4, 2 and 1; row blocks of 5
    and of all 40 rows; causal and packed masks."""
    torch.manual_seed(0)
    b, hq, s, d, scale = 2, 4, 40, 16, 0.7
    q = torch.randn(b, hq, s, d, requires_grad=True)
    k, v = (torch.randn(b, kv_heads, s, d, requires_grad=True) for _ in range(2))
    allowed = masks(b, s)
    out = _eager(q, k, v, allowed, scale)
    grad = torch.randn_like(out)
    out.backward(grad)
    scores = (q @ k.repeat_interleave(hq // kv_heads, 1).transpose(-1, -2)) * scale
    lse = scores.masked_fill(~allowed, float("-inf")).logsumexp(-1).detach()
    for chunks in (8, 1):
        dq, dk, dv = attention_backward(q.detach(), k.detach(), v.detach(), out.detach(), lse, grad, allowed, scale,
                                        row_blocks(allowed, chunks))
        for mine, ref in ((dq, q.grad), (dk, k.grad), (dv, v.grad)):
            torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)


def test_a_packed_rows_blocks_meet_only_their_samples_keys():
    """On one packed row the backward's blocks follow the samples: each block's keys are its own sample's
    (1× its square), where blocks of S/8 rows from key 0 would meet the whole causal triangle; a plain causal
    row keeps its 8 blocks from key 0."""
    allowed = _packed_mask(1, 40)
    blocks = row_blocks(allowed, chunks=2)
    assert [(r, n, k0, kend) for r, n, k0, kend in blocks] == [
        (0, 7, 0, 7), (7, 12, 7, 19), (19, 9, 19, 28), (28, 5, 28, 33), (33, 7, 33, 40)]
    products = sum(n * (kend - k0) for _, n, k0, kend in blocks)
    assert products == 7 * 7 + 12 * 12 + 9 * 9 + 5 * 5 + 7 * 7 < allowed.sum() * 2
    causal = torch.ones(40, 40, dtype=torch.bool).tril()[None, None]
    assert row_blocks(causal) == [(r, 5, 0, r + 5) for r in range(0, 40, 5)]


@pytest.mark.parametrize("masks", [_mask, _packed_mask])
def test_function_with_a_per_sequence_block_mask(masks):
    """The autograd Function end to end on a BlockMask whose mask depends on the sequence (as
    transformers' padding and packed masks do): FlexAttention's forward and LSE, the dense mask rebuilt per
    sequence, against autograd through the eager reference."""
    torch.manual_seed(0)
    b, hq, hkv, s, d = 2, 4, 1, 256, 16
    allowed = masks(b, s)
    block = create_block_mask(lambda bi, h, qi, ki: allowed[bi, 0, qi, ki], b, 1, s, s, device="cpu")
    q = torch.randn(b, hq, s, d, requires_grad=True)
    k, v = (torch.randn(b, hkv, s, d, requires_grad=True) for _ in range(2))
    grad = torch.randn(b, hq, s, d)
    results = []
    for run in (lambda: FlexForwardGemmBackward.apply(q, k, v, block, 1.0, None), lambda: _eager(q, k, v, allowed, 1.0)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PyTorch: FlexAttention uncompiled on CPU
            out = run()
        out.backward(grad)
        results.append([out.detach()] + [x.grad.clone() for x in (q, k, v)])
        q.grad = k.grad = v.grad = None
    for mine, ref in zip(*results):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def _tiny_full_heads_are_wide(monkeypatch):
    """The tiny model's full layers (32-wide heads) stand in for the 31B's 512-wide ones."""
    monkeypatch.setattr(stages, "WIDE_HEAD_DIM", 16)


def _layer(attn: str, layer_idx: int, gemm_backward: bool = False) -> Gemma4DecoderLayerPipe:
    config = tiny_config()
    config.text_config._attn_implementation = attn
    ps = SimpleNamespace(dims=ParallelDims(), tp_group=None, tp_rank=0, replica_groups={})
    return Gemma4DecoderLayerPipe(config, layer_idx, ps, MaskCache(config, 2), gemm_backward=gemm_backward)


def test_only_wide_flex_layers_switch():
    """Only the wide-head (full) layer's attention switches, on its own copy of the config: the shared
    config and a sliding layer built from it stay on flex_attention."""
    config = tiny_config()
    config.text_config._attn_implementation = "flex_attention"
    ps = SimpleNamespace(dims=ParallelDims(), tp_group=None, tp_rank=0, replica_groups={})
    types = config.text_config.layer_types
    layers = {t: Gemma4DecoderLayerPipe(config, types.index(t), ps, MaskCache(config, 2), gemm_backward=True)
              for t in ("full_attention", "sliding_attention")}
    assert layers["full_attention"].self_attn.config._attn_implementation == WIDE_HEAD_ATTENTION
    assert layers["sliding_attention"].self_attn.config._attn_implementation == "flex_attention"
    assert config.text_config._attn_implementation == "flex_attention"
    assert _layer("flex_attention", types.index("full_attention")).self_attn.config._attn_implementation == "flex_attention"


def test_full_layer_equals_eager():
    """A whole full-attention decoder layer with the GEMM backward
    gives transformers' eager layer's output and every gradient, with padding in the micro-batch (to
    fp32 noise: the largest error is 8e-7 of a tensor's largest entry, as for sdpa against eager)."""
    torch.manual_seed(0)
    full = tiny_config().text_config.layer_types.index("full_attention")
    wide, eager = _layer("flex_attention", full, gemm_backward=True), _layer("eager", full)
    eager.load_state_dict(wide.state_dict())
    s = 48
    attention_mask = torch.ones(1, s, dtype=torch.long)
    attention_mask[0, 40:] = 0
    side = (attention_mask, torch.arange(s)[None], torch.zeros(1, s, dtype=torch.long))
    results = []
    for layer in (wide, eager):
        hidden = torch.randn(1, s, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PyTorch: FlexAttention uncompiled on CPU
            out = layer((hidden, *side))[0]
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(2)))
        results.append([out, hidden.grad] + [p.grad for p in layer.parameters()])
    for mine, ref in zip(*results):  # errors relative to each tensor's largest entry (sdpa vs eager: <= 9e-7)
        assert (mine - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_gemm_backward_needs_flex(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {attn_implementation: sdpa, wide_head_backward: gemm}\n")
    with pytest.raises(UserError, match="wide_head_backward: gemm needs model.attn_implementation: flex_attention"):
        load_config(recipe)


@pytest.mark.parametrize("attn, choice, gemm", [
    ("flex_attention", "auto", True), ("flex_attention", "gemm", True), ("flex_attention", "flex", False),
    ("sdpa", "auto", False), ("eager", "flex", False),
])
def test_wide_head_backward_choice(tmp_path, attn, choice, gemm):
    """auto (the default) takes the GEMM backward wherever FlexAttention runs; `flex` keeps its kernel."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{attn_implementation: {attn}, wide_head_backward: {choice}}}\ndata: {{train: t.jsonl}}\n")
    assert load_config(recipe).model.wide_head_gemm is gemm
    assert ModelConfig().wide_head_backward == "auto"
