"""The fused RMSNorm is transformers' Gemma4 RMSNorm, forward and backward (the whole model with
either is checked against transformers in test_parity.py)."""

from __future__ import annotations

import pytest
import torch
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
