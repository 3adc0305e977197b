"""RMSNorm at the 31B's shapes on one GPU (one TP2 rank's heads): bf16 straight into the fused kernel
(`FusedRMSNorm` now) against an fp32 copy in and a cast back (`FusedRMSNorm` before) and
transformers' op-by-op `Gemma4RMSNorm`; forward and forward+backward time and the difference
from the fp32-copy path.

    python -m benchmarks.norm_bench --out norm.json [--seq 4224]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm

from benchmarks.kernel_timing import add_record, fwd_bwd_ms
from runner.models.gemma4.stages import FusedRMSNorm

# (what, trailing shape, with_scale, calls per decoder layer and micro-batch in forward) at TP2
SHAPES = [
    ("hidden (input, post-attention, pre/post-feedforward norms)", (5376,), True, 4),
    ("q_norm, sliding layer (16 heads x 256)", (16, 256), True, 1),
    ("k_norm, sliding layer (8 KV heads x 256)", (8, 256), True, 1),
    ("v_norm, sliding layer (no scale)", (8, 256), False, 1),
    ("q_norm, full layer (16 heads x 512)", (16, 512), True, 1),
]


def fp32_copy_path(norm: FusedRMSNorm):
    """The norm as this runner computed it before: fp32 copy in, fused kernel, cast back."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        scale = norm.weight.float() if norm.with_scale else None
        return F.rms_norm(x.float(), x.shape[-1:], scale, norm.eps).type_as(x)
    return fn


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seq", type=int, default=4224)
    ap.add_argument("--iters", type=int, default=30)
    args = ap.parse_args()
    torch.manual_seed(0)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "seq": args.seq, "runs": []}
    for what, shape, with_scale, per_layer in SHAPES:
        fused = FusedRMSNorm(shape[-1], eps=1e-6, with_scale=with_scale)
        ref = Gemma4RMSNorm(shape[-1], eps=1e-6, with_scale=with_scale)
        if with_scale:
            with torch.no_grad():
                fused.weight.normal_()
                ref.weight.copy_(fused.weight)
        fused, ref = fused.cuda().bfloat16(), ref.cuda().bfloat16()
        x0 = 3 * torch.randn(1, args.seq, *shape, device="cuda", dtype=torch.bfloat16)
        grad = torch.randn_like(x0)
        record = {"norm": what, "shape": [1, args.seq, *shape], "calls_per_layer_forward": per_layer}
        outs = {}
        for name, fn in (("bf16 into the kernel (now)", fused), ("fp32 copy + cast back (before)", fp32_copy_path(fused)),
                         ("transformers Gemma4RMSNorm", ref)):
            x = x0.clone().requires_grad_()
            for module in (fused, ref):
                module.zero_grad(set_to_none=True)
            y = fn(x)
            y.backward(grad)
            weight_grad = (fused if fn is not ref else ref).weight.grad.clone() if with_scale else None
            outs[name] = (y.detach(), x.grad.clone(), weight_grad)  # (the timed calls below accumulate into .grad)
            x.grad = None
            fwd, both = fwd_bwd_ms(fn, (x,), grad, args.iters)
            record[name] = {"fwd_ms": round(fwd, 4), "bwd_ms": round(both - fwd, 4)}
        now, before = outs["bf16 into the kernel (now)"], outs["fp32 copy + cast back (before)"]
        record["now_vs_before_max_abs_diff_out_dx_dw"] = [
            None if a is None else (a.float() - b.float()).abs().max().item() for a, b in zip(now, before)]
        record["now_vs_before_out_equal"] = bool(torch.equal(now[0], before[0]))
        add_record(results, record, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
