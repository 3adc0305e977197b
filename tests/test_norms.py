"""The fused RMSNorm is transformers' Gemma4 RMSNorm, forward and backward (the whole model with
either is checked against transformers in test_parity.py)."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm

from runner.models.gemma4.stages import FusedRMSNorm


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("with_scale", [True, False])
def test_fused_rms_norm_equals_transformers(dtype, tol, with_scale):
    torch.manual_seed(0)
    ref, fused = Gemma4RMSNorm(48, eps=1e-6, with_scale=with_scale), FusedRMSNorm(48, eps=1e-6, with_scale=with_scale)
    if with_scale:
        with torch.no_grad():
            ref.weight.copy_(torch.randn(48))
            fused.weight.copy_(ref.weight)
    ref, fused = ref.to(dtype), fused.to(dtype)
    x = (3 * torch.randn(2, 5, 48)).to(dtype)
    grad = torch.randn(2, 5, 48).to(dtype)
    outs = []
    for norm in (ref, fused):
        xi = x.clone().requires_grad_()
        y = norm(xi)
        y.backward(grad)
        outs.append((y, xi.grad, norm.weight.grad if with_scale else None))
    for a, b in zip(*outs):
        if a is not None:
            assert a.dtype == b.dtype
            torch.testing.assert_close(b.float(), a.float(), rtol=tol, atol=tol)


class _Calls(TorchFunctionMode):
    """Records the torch functions and tensor methods called under it, with their first argument."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, object]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append((getattr(func, "__name__", str(func)), args[0] if args else None))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("with_scale", [True, False])
def test_fused_rms_norm_bf16_rounds_once_without_fp32_copies(with_scale):
    """bf16 activations go into the kernel as they are (no fp32 copy of them, no cast back) and come
    out as the fp32 computation rounded once: bit for bit on CPU."""
    torch.manual_seed(0)
    norm = FusedRMSNorm(256, eps=1e-6, with_scale=with_scale)
    if with_scale:
        with torch.no_grad():
            norm.weight.copy_(torch.randn(256))
    norm = norm.to(torch.bfloat16)
    x = (3 * torch.randn(3, 7, 256)).to(torch.bfloat16).requires_grad_()
    grad = torch.randn(3, 7, 256).to(torch.bfloat16)
    with _Calls() as seen:
        y = norm(x)
    assert [(name, arg.dtype) for name, arg in seen.calls if name == "rms_norm"] == [("rms_norm", torch.bfloat16)]
    assert not [name for name, _ in seen.calls if name in ("float", "to", "type_as")], seen.calls
    y.backward(grad)
    xf = x.detach().float().requires_grad_()
    wf = norm.weight.detach().float().requires_grad_() if with_scale else None
    yf = torch.nn.functional.rms_norm(xf, (256,), wf, 1e-6)
    yf.to(torch.bfloat16).float().backward(grad.float())
    assert torch.equal(y, yf.to(torch.bfloat16))
    assert torch.equal(x.grad, xf.grad.to(torch.bfloat16))
    if with_scale:
        torch.testing.assert_close(norm.weight.grad.float(), wf.grad, rtol=8e-3, atol=0)  # one bf16 rounding
