"""The full layers' 512-wide heads under FlexAttention: FlexAttention's forward, a backward of GEMMs.

Why: above head_dim 256 PyTorch's FlexAttention backward runs 16×16 tiles (larger ones are slower or
do not fit an SM's shared memory): 15.4 ms per full layer and micro-batch of 4224 tokens at TP2 on
an H100, against 2.6 ms forward (`benchmarks/attention_bench.py`). This backward recomputes the
probabilities from the forward's log-sum-exp, as flash attention's does, and runs attention's
backward products as cuBLAS batched GEMMs over blocks of query rows, one KV head at a time with its
query heads stacked (fp32 scratch of G x S x S/8 per block, for the span of one layer's backward).

transformers calls it through its attention-function registry: the full layers' attention module
gets `WIDE_HEAD_ATTENTION` as its implementation; masks stay FlexAttention's BlockMasks.
"""

from __future__ import annotations

import functools
import weakref

import torch
from torch.autograd.function import once_differentiable
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, create_mask, flex_attention

from runner.compat import flex_attention_forward, register_attention

WIDE_HEAD_ATTENTION = "gemma4_flex_gemm_backward"
WIDE_HEAD_DIM = 256  # heads wider than this get FlexAttention's slow tiles (both ways: see flex_kernel_options)
WIDE_HEAD_FWD_TILES = {"BLOCK_M": 32, "BLOCK_N": 32}  # FlexAttention's default forward tiles there overflow an SM
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


def _bmm_f32(a: torch.Tensor, b: torch.Tensor, add: torch.Tensor | None = None, alpha: float = 1.0) -> torch.Tensor:
    """add + alpha · a @ b in fp32: scores for exp() need more than bf16's 8 bits (cuBLAS accumulates in
    fp32 either way); `add` broadcasts over the columns, so a per-row offset costs no extra pass."""
    half = a.is_cuda and a.dtype in (torch.bfloat16, torch.float16)
    if add is None:
        c = torch.bmm(a, b, out_dtype=torch.float32) if half else torch.bmm(a.float(), b.float())
        return c if alpha == 1.0 else c.mul_(alpha)
    if half:
        return torch.baddbmm(add.expand(a.shape[0], a.shape[1], b.shape[2]), a, b, alpha=alpha, out_dtype=torch.float32)
    return torch.baddbmm(add.float(), a.float(), b.float(), alpha=alpha)


def row_blocks(allowed: torch.Tensor, chunks: int = ROW_BLOCKS) -> list[tuple[int, int, int, int]]:
    """(first row, rows, first key, end key) per block of query rows. A block is a run of rows whose first
    visible key is the same (a packed row's samples, each causal from its own start; the whole sequence
    under one causal mask), cut into pieces of at most S / `chunks` rows; it meets the keys from that first
    key to the last one any of its rows sees under `allowed` [B, 1, S, S] (end 0: no row sees a key). So a
    row of ten ~400-token samples costs each sample's square, not the causal triangle of the whole row (6×
    fewer products at 4096). One host read."""
    s, keys = allowed.shape[-2], allowed.shape[-1]
    seen = allowed.any(dim=(0, 1))  # [S, keys]: what any sequence of the batch sees
    some, seen = seen.any(-1), seen.to(torch.uint8)  # argmax takes no bool
    first = torch.where(some, seen.argmax(-1), keys)  # argmax: the first of equal maxima
    last = torch.where(some, keys - 1 - seen.flip(-1).argmax(-1), -1)
    first, last = torch.stack([first, last]).tolist()
    cap, blocks, r = -(-s // chunks), [], 0
    while r < s:
        end = r + 1
        while end < s and end - r < cap and first[end] == first[r]:
            end += 1
        blocks.append((r, end - r, first[r], max(last[r:end]) + 1))
        r = end
    return blocks


def attention_backward(query, key, value, out, lse, grad_out, allowed: torch.Tensor, scale: float,
                       blocks: list[tuple[int, int, int, int]]):
    """dq, dk, dv of softmax(scale · q kᵀ, masked to `allowed`) v, from the forward's output and
    natural-log LSE. q, out, grad_out: [B, Hq, S, D]; k, v: [B, Hkv, S, D]; lse: [B, Hq, S] fp32;
    allowed: bool [B, 1, S, S]; `blocks` from `row_blocks(allowed)`.

    Each block of query rows meets only the span of keys it may see (causal: about half the products of
    the full square; packed: each sample's own). A KV head's G query heads are stacked along rows, so
    each product is one bmm over the batch and the sums over the group come out of the GEMM; dk and dv
    add up over the blocks in fp32.
    P = exp(scale · q kᵀ − lse) and dP − rowsum(dO ∘ O) come out of the GEMMs with their row offsets;
    the softmax scale goes on dq and dk afterwards, on D-wide rows instead of S-wide ones."""
    b, hq, _, d = query.shape
    hkv = key.shape[1]
    g = hq // hkv
    dq = torch.zeros_like(query)
    dk, dv = (torch.zeros(b, hkv, key.shape[2], d, dtype=torch.float32, device=query.device) for _ in range(2))
    for r0, n, k0, kend in blocks:
        if kend <= k0:  # rows that may see no key: their gradients stay zero
            continue
        rows, span = slice(r0, r0 + n), slice(k0, kend)
        hidden = ~allowed[:, :, rows, span]  # [B, 1, n, keys], broadcast over the group's heads
        for h in range(hkv):
            heads = slice(h * g, (h + 1) * g)
            q_h = query[:, heads, rows].reshape(b, g * n, d)
            o_h, do_h = out[:, heads, rows], grad_out[:, heads, rows]
            delta = (do_h.float() * o_h.float()).sum(-1).reshape(b, g * n, 1)  # rowsum(dO ∘ O) = rowsum(P ∘ dP)
            do_h = do_h.reshape(b, g * n, d)
            k_h, v_h = key[:, h, span], value[:, h, span]
            p = _bmm_f32(q_h, k_h.transpose(1, 2), add=-lse[:, heads, rows].reshape(b, g * n, 1), alpha=scale)
            p.exp_().view(b, g, n, kend - k0).masked_fill_(hidden, 0)
            dv[:, h, span] += _bmm_f32(p.to(value.dtype).transpose(1, 2), do_h)
            ds = p.mul_(_bmm_f32(do_h, v_h.transpose(1, 2), add=-delta)).to(query.dtype)  # dS / scale
            dq[:, heads, rows] = _bmm_f32(ds, k_h, alpha=scale).view(b, g, n, d)
            dk[:, h, span] += _bmm_f32(ds.transpose(1, 2), q_h, alpha=scale)
    return dq, dk.to(key.dtype), dv.to(value.dtype)


_DENSE_MASKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def dense_mask(block_mask: BlockMask, batch: int, device) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """The element mask FlexAttention applied (its mask_mod, evaluated at every batch index) and its
    row blocks, once per BlockMask: a stage's full layers share one per micro-batch (MaskCache)."""
    if block_mask not in _DENSE_MASKS:
        q_len, kv_len = block_mask.seq_lengths
        allowed = create_mask(block_mask.mask_mod, batch, 1, q_len, kv_len, device=device)
        _DENSE_MASKS[block_mask] = allowed, row_blocks(allowed)
    return _DENSE_MASKS[block_mask]


class FlexForwardGemmBackward(torch.autograd.Function):
    """FlexAttention forward (its LSE kept), `attention_backward` backward."""

    @staticmethod
    def forward(ctx, query, key, value, block_mask: BlockMask, scale: float, kernel_options: dict | None):
        out, lse = _flex_with_lse(query.detach(), key.detach(), value.detach(), block_mask, scale, kernel_options)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.block_mask, ctx.scale = block_mask, scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        query, key, value, out, lse = ctx.saved_tensors
        allowed, blocks = dense_mask(ctx.block_mask, query.shape[0], query.device)
        dq, dk, dv = attention_backward(query, key, value, out, lse, grad_out, allowed, ctx.scale, blocks)
        return dq, dk, dv, None, None, None


def wide_head_attention(module, query, key, value, attention_mask, scaling=None, softcap=None, **kwargs):
    """transformers' attention-function signature; anything but a plain BlockMask-masked attention
    (logit softcapping, attention sinks, a tensor mask, dropout) goes to transformers' own FlexAttention."""
    plain = (isinstance(attention_mask, BlockMask) and attention_mask.shape[1] == 1  # no per-head mask
             and query.shape[2] == key.shape[2] and softcap is None and kwargs.get("s_aux") is None
             and kwargs.get("position_bias") is None and not kwargs.get("dropout"))
    if not plain:
        return flex_attention_forward(module, query, key, value, attention_mask, scaling=scaling, softcap=softcap,
                                      **kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = FlexForwardGemmBackward.apply(query, key, value, attention_mask, scale, kwargs.get("kernel_options"))
    return out.transpose(1, 2).contiguous(), None


register_attention(WIDE_HEAD_ATTENTION, wide_head_attention)
