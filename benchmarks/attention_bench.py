"""Attention kernels for the 31B's two layer types, one GPU, one TP rank's heads: time and error.

Why: the full-depth profile (TP2×PP2, FlexAttention) puts FlexAttention's backward at 16% of a stage's GPU
time, 4.3× its forward. PyTorch's default backward tiles for head_dim > 256 are 16×16 with one
pipeline stage; this script times those against larger tiles, transformers' eager attention and
SDPA on the full layers (head_dim 512, 2 KV heads per rank at TP2, causal) and the sliding layers
(head_dim 256, 8 KV heads per rank, window 1024), each checked against an fp32 reference; and the
runner's `model.wide_head_backward: gemm` (FlexAttention forward, a backward of batched GEMMs).

    python -m benchmarks.attention_bench --out results.json [--tp 2] [--seq 4224] [--budget-s 300] [--pack 390]

`--pack N`: the row holds samples of N tokens packed end to end (`data.packing`), each attending only
within itself (the rest of the row: one more sample).

Writes one JSON record per variant as it goes (a killed run keeps what it measured).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from transformers.models.gemma4.modeling_gemma4 import Gemma4TextAttention

from benchmarks.kernel_timing import add_record, fwd_bwd_ms
from runner.models.gemma4.attention import WIDE_HEAD_FWD_TILES, FlexForwardGemmBackward
from runner.models.gemma4.presets import gemma4_31b_config

FWD = {f"fwd_{k}": v for k, v in WIDE_HEAD_FWD_TILES.items()}  # the runner's forward tiles for head_dim 512


def _bwd_tiles(m1: int, n1: int, m2: int, n2: int, warps: int) -> dict:
    return {**FWD, "bwd_BLOCK_M1": m1, "bwd_BLOCK_N1": n1, "bwd_BLOCK_M2": m2, "bwd_BLOCK_N2": n2,
            "bwd_num_stages": 1, "bwd_num_warps": warps}


# kernel_options per FlexAttention variant on the full layers (the runner's is the first)
FULL_FLEX = {
    "flex default bwd (16x16x16x16, 1 stage, 4 warps)": FWD,
    "flex bwd 32x32x32x32, 1 stage, 4 warps": _bwd_tiles(32, 32, 32, 32, 4),
    "flex bwd 32x64x64x32, 1 stage, 8 warps": _bwd_tiles(32, 64, 64, 32, 8),
    "flex bwd 64x64x64x64, 1 stage, 8 warps": _bwd_tiles(64, 64, 64, 64, 8),
    "flex unprefixed BLOCK_M1..N2 32, 1 stage, 4 warps": {**WIDE_HEAD_FWD_TILES, "BLOCK_M1": 32, "BLOCK_N1": 32,
                                                         "BLOCK_M2": 32, "BLOCK_N2": 32, "num_stages": 1,
                                                         "num_warps": 4},
}
GEMM = "flex forward + GEMM backward (wide_head_backward: gemm)"


def shapes(tp: int) -> dict[str, dict]:
    """One TP rank's attention shapes for each layer type of the 31B, read off the attention modules
    transformers builds (on meta) for its first layer of each type, as the pipeline stages do."""
    tc = gemma4_31b_config(6).text_config
    out = {}
    for layer in ("full_attention", "sliding_attention"):
        with torch.device("meta"):
            attn = Gemma4TextAttention(tc, tc.layer_types.index(layer))
        heads, kv = attn.q_proj.out_features // attn.head_dim, attn.k_proj.out_features // attn.head_dim
        out[layer] = {"heads": heads // tp, "kv_heads": max(kv // tp, 1), "head_dim": attn.head_dim,
                      "window": tc.sliding_window if layer == "sliding_attention" else None}
    return out


def bool_mask(seq: int, window: int | None, device, pack: int = 0) -> torch.Tensor:
    """True where a query may attend: causal, within `window` keys on sliding layers, within its own sample
    of `pack` tokens when packed."""
    q = torch.arange(seq, device=device)[:, None]
    k = torch.arange(seq, device=device)[None, :]
    allowed = k <= q
    if pack:
        allowed &= q // pack == k // pack
    return allowed & (q - k < window) if window else allowed


def eager(q, k, v, mask, groups: int) -> torch.Tensor:
    """transformers' eager attention (Gemma4: scaling 1.0, softmax in fp32)."""
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = torch.matmul(q, k.transpose(2, 3)).masked_fill(~mask, torch.finfo(q.dtype).min)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def variants(layer: str, shape: dict, seq: int, mask: torch.Tensor, device, pack: int = 0) -> dict:
    groups = shape["heads"] // shape["kv_heads"]
    window = shape["window"]

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = kv_idx <= q_idx
        if pack:
            allowed = allowed & (q_idx // pack == kv_idx // pack)
        return allowed & (q_idx - kv_idx < window) if window else allowed

    block = create_block_mask(mask_mod, 1, 1, seq, seq, device=device)
    compiled = torch.compile(flex_attention)
    out: dict = {}
    for name, opts in (FULL_FLEX if layer == "full_attention" else {"flex default": {}}).items():
        out[name] = lambda q, k, v, o=opts: compiled(q, k, v, block_mask=block, scale=1.0, enable_gqa=True,
                                                     kernel_options=o or None)
        if layer == "full_attention" and GEMM not in out:  # the runner's option, timed right after flex's default
            out[GEMM] = lambda q, k, v: FlexForwardGemmBackward.apply(q, k, v, block, 1.0, WIDE_HEAD_FWD_TILES)
    out["eager (transformers)"] = lambda q, k, v: eager(q, k, v, mask, groups)
    out["sdpa, bool mask (transformers: KV repeated)"] = lambda q, k, v: F.scaled_dot_product_attention(
        q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), attn_mask=mask, scale=1.0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--seq", type=int, default=4224)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=300, help="skip the variants left after this long")
    ap.add_argument("--pack", type=int, default=0, help="samples of this many tokens packed into the row (0: one)")
    args = ap.parse_args()
    torch._dynamo.config.cache_size_limit = 64  # one compile per kernel_options variant
    device = torch.device("cuda")
    t0 = time.time()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tp": args.tp, "seq": args.seq,
               "pack": args.pack, "runs": []}
    for layer, shape in shapes(args.tp).items():
        gen = torch.Generator(device=device).manual_seed(0)
        h, kv, d = shape["heads"], shape["kv_heads"], shape["head_dim"]
        # [B, S, heads, D] seen as [B, heads, S, D], the layout transformers' attention hands over
        q0, k0, v0 = (torch.randn(1, args.seq, n, d, device=device, generator=gen).transpose(1, 2) / d**0.25
                      for n in (h, kv, kv))
        grad = torch.randn(1, h, args.seq, d, device=device, generator=gen, dtype=torch.bfloat16)
        mask = bool_mask(args.seq, shape["window"], device, args.pack)
        leaves = [x.clone().requires_grad_() for x in (q0, k0, v0)]  # fp32 reference
        ref = eager(*leaves, mask, h // kv)
        ref.backward(grad.float())
        refs = [ref.detach()] + [x.grad for x in leaves]
        del leaves, ref
        pairs = int(mask.sum())
        flops_fwd = 4 * pairs * d * h  # QK^T and PV over the allowed pairs
        for name, fn in variants(layer, shape, args.seq, mask, device, args.pack).items():
            record = {"layer": layer, **shape, "variant": name}
            if time.time() - t0 > args.budget_s:
                record["skipped"] = "time budget"
            else:
                q, k, v = (x.to(torch.bfloat16).requires_grad_() for x in (q0, k0, v0))
                try:
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    c0 = time.time()
                    o = fn(q, k, v)
                    o.backward(grad)
                    record["first_call_s"] = round(time.time() - c0, 1)  # compile, for flex
                    errs = [(a.float() - b).abs().max().item() / b.abs().max().item()
                            for a, b in zip((o, q.grad, k.grad, v.grad), refs)]
                    record["max_rel_err_out_dq_dk_dv"] = [float(f"{e:.2e}") for e in errs]
                    q.grad = k.grad = v.grad = None
                    del o
                    fwd_ms, both_ms = fwd_bwd_ms(fn, (q, k, v), grad, args.iters)
                    record.update(fwd_ms=round(fwd_ms, 3), bwd_ms=round(both_ms - fwd_ms, 3),
                                  fwd_tflops=round(flops_fwd / fwd_ms / 1e9, 1),
                                  bwd_tflops=round(2.5 * flops_fwd / (both_ms - fwd_ms) / 1e9, 1),
                                  peak_extra_gib=round((torch.cuda.max_memory_allocated() - base) / 2**30, 2))
                except Exception as e:  # a variant the kernel refuses (shared memory, tile rules) is a result too
                    record["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            add_record(results, record, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
