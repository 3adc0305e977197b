"""The full layers' 512-wide heads under FlexAttention: FlexAttention's forward, a backward of GEMMs.

Why: above head_dim 256 PyTorch's FlexAttention backward runs 16×16 tiles (larger ones are slower or
do not fit an SM's shared memory): 15.4 ms per full layer and micro-batch of 4224 tokens at TP2 on
an H100, against 2.6 ms forward (`benchmarks/attention_bench.py`). This backward recomputes the
probabilities from the forward's log-sum-exp, as flash attention's does, and runs attention's
backward products as cuBLAS batched GEMMs over blocks of query rows, one KV head at a time with its
query heads stacked (fp32 scratch of G x S²/8 per block, for the span of one layer's backward).

transformers calls it through its attention-function registry: the full layers' attention module
gets `WIDE_HEAD_ATTENTION` as its implementation; masks stay FlexAttention's BlockMasks.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, create_mask, flex_attention
from transformers import AttentionInterface
from transformers.integrations.flex_attention import flex_attention_forward

WIDE_HEAD_ATTENTION = "gemma4_flex_gemm_backward"
WIDE_HEAD_DIM = 256  # heads wider than this get FlexAttention's slow tiles (both ways: see flex_kernel_options)
ROW_BLOCKS = 8  # query-row blocks of the backward: scratch and wasted (masked) products shrink with more


@functools.cache
def _compiled_flex():
    """FlexAttention compiled once per process (forward only: a Function's forward runs without autograd)."""
    return torch.compile(flex_attention)


def _flex_with_lse(query, key, value, block_mask: BlockMask, scale: float, kernel_options: dict | None):
    fn = _compiled_flex() if query.is_cuda else flex_attention  # CPU: PyTorch's unfused reference (tests)
    out, aux = fn(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=True,
                  kernel_options=kernel_options, return_aux=AuxRequest(lse=True))
    return out, aux.lse


def _bmm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in fp32: scores for exp() need more than bf16's 8 bits (cuBLAS accumulates in fp32 either way)."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())


def attention_backward(query, key, value, out, lse, grad_out, allowed: torch.Tensor, scale: float,
                       chunks: int = ROW_BLOCKS):
    """dq, dk, dv of softmax(scale · q kᵀ, masked to `allowed`) v, from the forward's output and
    natural-log LSE. q, out, grad_out: [B, Hq, S, D]; k, v: [B, Hkv, S, D]; lse: [B, Hq, S] fp32;
    allowed: bool, broadcastable to [B, 1, S, S].

    Query rows go in `chunks` blocks, each against the keys up to the last one any of its rows may see
    (causal: about half the products of the full square; one host read per call finds the ends). A KV
    head's G query heads are stacked along rows, so each product is one bmm over the batch and the
    sums over the group come out of the GEMM; dk and dv add up over the row blocks in fp32."""
    b, hq, s, d = query.shape
    hkv = key.shape[1]
    g = hq // hkv
    allowed = allowed.expand(b, 1, s, s)
    rows = -(-s // chunks)
    starts = range(0, s, rows)
    cols = torch.arange(s, device=allowed.device)
    reach = torch.where(allowed, cols, -1).amax(dim=(0, 1, 3))  # per query row, the last key it may see
    ends = [int(end) + 1 for end in torch.stack([reach[r:r + rows].max() for r in starts]).tolist()]
    delta = (grad_out.float() * out.float()).sum(-1)  # rowsum(dO ∘ O) = rowsum(P ∘ dP)
    dq = torch.zeros_like(query)
    dk, dv = (torch.zeros(b, hkv, s, d, dtype=torch.float32, device=query.device) for _ in range(2))
    for r0, kend in zip(starts, ends):
        n = min(r0 + rows, s) - r0
        if kend == 0:  # rows that may see no key: their gradients stay zero
            continue
        keep = allowed[:, :, r0:r0 + n, :kend].expand(b, g, n, kend).reshape(b, g * n, kend)
        for h in range(hkv):
            heads = slice(h * g, (h + 1) * g)
            q_h = query[:, heads, r0:r0 + n].reshape(b, g * n, d)
            do_h = grad_out[:, heads, r0:r0 + n].reshape(b, g * n, d)
            k_h, v_h = key[:, h, :kend], value[:, h, :kend]
            p = _bmm_f32(q_h, k_h.transpose(1, 2)).mul_(scale)
            p.sub_(lse[:, heads, r0:r0 + n].reshape(b, g * n, 1)).exp_().masked_fill_(~keep, 0)
            dv[:, h, :kend] += _bmm_f32(p.to(value.dtype).transpose(1, 2), do_h)
            dp = _bmm_f32(do_h, v_h.transpose(1, 2))
            ds = p.mul_(dp.sub_(delta[:, heads, r0:r0 + n].reshape(b, g * n, 1))).mul_(scale).to(query.dtype)
            del dp
            dq[:, heads, r0:r0 + n] = torch.bmm(ds, k_h).view(b, g, n, d)
            dk[:, h, :kend] += _bmm_f32(ds.transpose(1, 2), q_h)
    return dq, dk.to(key.dtype), dv.to(value.dtype)


class FlexForwardGemmBackward(torch.autograd.Function):
    """FlexAttention forward (its LSE kept), `attention_backward` backward."""

    @staticmethod
    def forward(ctx, query, key, value, block_mask: BlockMask, scale: float, kernel_options: dict | None):
        out, lse = _flex_with_lse(query.detach(), key.detach(), value.detach(), block_mask, scale, kernel_options)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.block_mask, ctx.scale = block_mask, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse = ctx.saved_tensors
        q_len, kv_len = ctx.block_mask.seq_lengths
        allowed = create_mask(ctx.block_mask.mask_mod, ctx.block_mask.shape[0], 1, q_len, kv_len, device=query.device)
        dq, dk, dv = attention_backward(query, key, value, out, lse, grad_out.contiguous(), allowed, ctx.scale)
        return dq, dk, dv, None, None, None


def wide_head_attention(module, query, key, value, attention_mask, scaling=None, softcap=None, **kwargs):
    """transformers' attention-function signature; anything but a plain BlockMask-masked attention
    (logit softcapping, attention sinks, a tensor mask, dropout) goes to transformers' own FlexAttention."""
    plain = (isinstance(attention_mask, BlockMask) and softcap is None and kwargs.get("s_aux") is None
             and kwargs.get("position_bias") is None and not kwargs.get("dropout"))
    if not plain:
        return flex_attention_forward(module, query, key, value, attention_mask, scaling=scaling, softcap=softcap,
                                      **kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = FlexForwardGemmBackward.apply(query, key, value, attention_mask, scale, kwargs.get("kernel_options"))
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(WIDE_HEAD_ATTENTION, wide_head_attention)
