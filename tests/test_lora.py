"""LoRA (invariant 7): the runner's adapters inside the TP linears are PEFT's LoRA on transformers' Gemma4 —
same loss and every adapter gradient at several layouts, base and tied embedding untouched — and they
travel in PEFT's format: init_from a PEFT adapter, export to one, merge as PEFT merges."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForImageTextToText

from runner.lora import peft_target_modules
from test_parity import _assert_matches_transformers

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="session")
def peft_adapter(tiny_ckpt, tmp_path_factory) -> Path:
    """PEFT's LoRA (r 4, alpha 8) on every decoder linear of the tiny model, A and B random (B = 0 would make
    A's gradient zero and the test compare zeros), saved as PEFT saves it."""
    model = AutoModelForImageTextToText.from_pretrained(tiny_ckpt, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=peft_target_modules(TARGETS)))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    out = tmp_path_factory.mktemp("adapter") / "peft"
    model.save_pretrained(out)
    return out


LAYOUTS = [(1, 1, 1, False), (2, 1, 1, False), (1, 2, 1, False), (2, 2, 1, False), (1, 2, 2, False),
           (4, 1, 1, False), (2, 2, 1, True)]


@pytest.mark.parametrize("tp,pp,dp,sp", LAYOUTS, ids=str)
def test_lora_loss_and_adapter_gradients_match_peft(tmp_path, tiny_ckpt, peft_adapter, tp, pp, dp, sp):
    """Text and image global batches; tp 4 replicates the KV heads (B's rows follow them); the worker checks
    the frozen base is bit-unchanged and gradient-free."""
    _assert_matches_transformers(tmp_path, tiny_ckpt, (tp, pp, dp), ("--sequence-parallel",) if sp else (),
                                 adapter=str(peft_adapter))
