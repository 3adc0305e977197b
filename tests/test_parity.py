"""Invariant 1 and 2: for every (tp, pp, dp) the pipeline is transformers' Gemma4 — same loss, same
gradient for every parameter, tied embedding/head identical — on CPU in fp32."""

from __future__ import annotations

import functools

import pytest
import torch

from conftest import ROOT, torchrun_worker
from reference import reference_run

LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4

LAYOUTS = [  # (tp, pp, dp)
    (1, 1, 1),
    (2, 1, 1),
    (1, 2, 1),  # 6 layers → 3 + 3: the split lands mid-period (the full layer is on stage 1)
    (2, 2, 1),
    (1, 2, 2),
    (1, 3, 1),  # 2 + 2 + 2: the middle stage holds only sliding layers
    (4, 1, 1),  # tp 4 > KV heads (2 sliding, 1 full): KV heads replicated over 2 and 4 ranks
]


@functools.cache
def _reference(ckpt: str, kinds: str, lr: float, adapter: str = "", balance_coef: float = 0.0) -> dict:
    return reference_run(ckpt, kinds.split(","), lr, adapter, balance_coef=balance_coef)


def _run(tmp_path, ckpt, tp: int, pp: int, dp: int, kinds: str, lr: float = 0.0, freeze: str = "",
         extra: tuple[str, ...] = ()) -> list[dict]:
    torchrun_worker("parity_worker.py", ckpt, (tp, pp, dp), "--batches", kinds, "--lr", str(lr), "--freeze", freeze,
                    "--out", str(tmp_path), *extra)
    return [torch.load(tmp_path / f"stage{s}.pt", weights_only=False) for s in range(pp)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# every layout with the fused RMSNorm (the default) and the even split; one with transformers' own
# RMSNorm; one uneven split (parallel.stage_layers): 5 + 1, the last stage holds only the full layer;
# sequence parallelism where TP > 1 (micro-batches padded to a multiple of tp, as the config demands)
CASES = ([pytest.param(*layout, True, "", False, marks=[pytest.mark.compat] if layout == (2, 2, 1) else [])
          for layout in LAYOUTS] + [(2, 2, 1, False, "", False), (2, 2, 1, True, "5,1", False)]
         + [(2, 1, 1, True, "", True), (2, 2, 1, True, "", True), (4, 1, 1, True, "", True)])


@pytest.mark.parametrize("tp,pp,dp,fused,stage_layers,sp", CASES, ids=lambda v: str(v))
def test_loss_and_every_gradient_match_transformers(tmp_path, tiny_ckpt, tp, pp, dp, fused, stage_layers, sp):
    extra = (("--stage-layers", stage_layers) + (() if fused else ("--no-fused-rms-norm",))
             + (("--sequence-parallel",) if sp else ()))
    _assert_matches_transformers(tmp_path, tiny_ckpt, (tp, pp, dp), extra)


# E2B / E4B (`make-tiny --like`): per-layer inputs and KV-shared layers; at pp 2 the stored keys/values
# cross the stage boundary (e2b: both layer types, e4b: the full one). e2b has 1 KV head: replicated at tp 2.
FAMILY_CASES = [
    ("e2b", (1, 1, 1), ()),
    pytest.param("e2b", (2, 2, 1), ("--sequence-parallel",), marks=pytest.mark.compat),
    ("e2b", (1, 2, 2), ("--recompute-num-layers", "1")),  # partial recompute: one layer per stage
    ("e2b", (2, 1, 1), ("--sequence-parallel",)),
    ("e2b", (1, 2, 1), ("--activation-checkpointing",)),
    ("e4b", (1, 2, 1), ()),
]


@pytest.mark.parametrize("like,layout,extra", FAMILY_CASES, ids=str)
def test_family_member_matches_transformers(tmp_path, tiny_like, like, layout, extra):
    """Loss and every gradient — the per-layer embedding table, its projection, each layer's gate, the
    producers' k/v projections fed back from the KV-shared layers — equal transformers'."""
    _assert_matches_transformers(tmp_path, tiny_like(like), layout, extra)


@pytest.mark.parametrize("layout,sp", [((1, 2, 1), ()), ((2, 2, 1), ("--sequence-parallel",))], ids=str)
def test_partial_recompute_matches_transformers(tmp_path, tiny_ckpt, layout, sp):
    """Activation checkpointing on the first decoder layer of each stage only
    (train.recompute_num_layers: 1), also under sequence parallelism (the recompute repeats its
    collectives): the worker checks that exactly that layer runs its forward twice per micro-batch
    and the others once; loss and gradients still equal transformers'."""
    _assert_matches_transformers(tmp_path, tiny_ckpt, layout, ("--recompute-num-layers", "1", *sp))


def _dropout_masks(out, steps: int, pp: int, dp: int) -> dict[str, list[torch.Tensor]]:
    """The LoRA dropout masks the workers drew: module → one per micro-batch of the global batches, in order
    (step, DP replica, micro-batch)."""
    files = {(s, d): torch.load(out / f"masks_stage{s}_dp{d}.pt", weights_only=False) for s in range(pp)
             for d in range(dp)}
    masks: dict[str, list[torch.Tensor]] = {}
    for step in range(steps):
        for d in range(dp):
            for s in range(pp):
                for name, drawn in files[s, d][step].items():
                    masks.setdefault(name, []).extend(drawn)
    return masks


def _assert_matches_transformers(tmp_path, tiny_ckpt, layout: tuple[int, int, int], extra: tuple[str, ...],
                                 kinds: str = "text,image", ref_kinds: str = "", adapter: str = "",
                                 dropout: float = 0.0, vision: bool = False, balance_coef: float = 0.0) -> None:
    """Loss and every trainable parameter's gradient of each step (by default a text and an image step) against
    transformers' on `ref_kinds` (default: the same global batches); with `adapter`, PEFT's LoRA model with
    that adapter against the runner's LoRA started from it, with `dropout` PEFT's dropout replaying the masks
    the runner drew; with `balance_coef` (an MoE model), that times the load-balancing loss joins both objectives
    and the runner's logged balance loss must equal transformers'."""
    tp, pp, dp = layout
    lora = ("--lora", adapter, "--lora-dropout", str(dropout)) if adapter else ()
    stages = _run(tmp_path, tiny_ckpt, tp, pp, dp, kinds, extra=extra + lora + ("--aux-loss-coef", str(balance_coef)))
    masks = _dropout_masks(tmp_path, len(kinds.split(",")), pp, dp) if dropout else None
    ref = (reference_run(str(tiny_ckpt), (ref_kinds or kinds).split(","), 0.0, adapter, dropout, masks) if dropout
           else _reference(str(tiny_ckpt), ref_kinds or kinds, 0.0, adapter, balance_coef))
    for step, kind in enumerate(kinds.split(",")):
        loss = stages[-1]["losses"][step]
        assert abs(loss - ref["losses"][step]) <= LOSS_RTOL * abs(ref["losses"][step]), (kind, loss, ref["losses"][step])
        if ref["balances"] and not ref_kinds:  # MoE, same micro-batches: the logged balance loss is transformers'
            # (also when not trained; a packed row's differs from its samples' one by one, by definition)
            balance = stages[-1]["routing"][step]["moe_balance_loss"]
            assert abs(balance - ref["balances"][step]) <= LOSS_RTOL * ref["balances"][step], (balance, ref["balances"])
        got: dict[str, torch.Tensor] = {}
        for st in stages:
            for name, grad in st["grads"][step].items():
                if name in got:  # the tied embedding on first and last stage: one logical tensor
                    assert torch.equal(got[name], grad), f"tied copies of {name} differ"
                got[name] = grad
        expected = {n: g for n, g in ref["grads"][step].items() if n != "lm_head.weight"}  # tied: same tensor
        # transformers leaves unused parameters' grads at None (the vision tower on text-only
        # batches) where DeepSpeed holds zeros: both mean zero
        for name in set(got) - set(expected):
            assert not got[name].any(), f"{name} has a gradient but no use in transformers"
        missing = set(expected) - set(got)
        assert not missing, f"no gradient for {sorted(missing)[:5]}"
        if vision:  # the vision tower's adapters are compared, and trained on the image step
            assert any(".vision_tower." in n and ".lora_" in n for n in expected) or kind == "text", sorted(expected)
        errors = {n: _rel(got[n], g) for n, g in expected.items()}
        worst = max(errors, key=errors.get)
        print(f"{(tp, pp, dp)} {kind}: loss rel {abs(loss - ref['losses'][step]) / ref['losses'][step]:.2e}, "
              f"worst grad rel {errors[worst]:.2e} ({worst})")
        assert errors[worst] <= GRAD_RTOL, (kind, worst, errors[worst])


@pytest.mark.parametrize("ds_config", ["gpu_bf16_zero1_fp32_grads.json", "gpu_bf16_zero1.json"])
def test_gpu_deepspeed_configs_sum_partial_gradients(tmp_path, tiny_ckpt, ds_config):
    """Under both GPU DeepSpeed configs (the BF16 optimizer's fp32 `_hp_grad`, ZeRO-1's bf16 `.grad`)
    the once-per-step sums of partial gradients (q/k norm scales, sequence-parallel norms) reach
    the optimizer: after two AdamW steps at TP2 x PP2 with sequence parallelism every replicated
    weight is still bit-identical across TP ranks (the worker checks), and the losses are the fp32
    reference's up to bf16 rounding. The sums themselves, read where the engine hands gradients to
    its DP reduce, are the fp32 reference's gradients up to bf16 noise on the text step (a missing sum
    halves them, a doubled one doubles them; the image step's bf16 noise is as large at TP1 x PP2)."""
    kinds = "image,text"
    stages = _run(tmp_path, tiny_ckpt, 2, 2, 1, kinds, 1e-3,
                  extra=("--sequence-parallel", "--ds-config", str(ROOT / "ds_configs" / ds_config)))
    ref = _reference(str(tiny_ckpt), kinds, 1e-3)
    for got, want in zip(stages[-1]["losses"], ref["losses"]):
        assert abs(got - want) <= 2e-2 * abs(want), (got, want)
    sums = {name: g for stage in stages for name, g in stage["grads"][1].items()}
    assert any("q_norm" in n for n in sums) and any("layernorm" in n for n in sums), sorted(sums)
    def agree(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
        got, want = got.double().flatten(), want.double().flatten()
        return float(got.norm() / want.norm()), float(torch.nn.functional.cosine_similarity(got, want, dim=0))

    for name, got in sums.items():  # per tensor, bf16 noise on the tiny model: ratio 0.90-1.08, cosine >= 0.94
        ratio, cosine = agree(got, ref["grads"][1][name])
        assert 0.8 <= ratio <= 1.25 and cosine >= 0.9, (name, ratio, cosine)
    ratio, cosine = agree(torch.cat([g.flatten() for g in sums.values()]),
                          torch.cat([ref["grads"][1][n].flatten() for n in sums]))
    print(f"{ds_config}: {len(sums)} summed gradients, norm ratio {ratio:.4f}, cosine {cosine:.4f}")
    assert 0.97 <= ratio <= 1.03 and cosine >= 0.97, (ratio, cosine)


def test_tied_embedding_and_head_stay_identical_after_adamw_steps(tmp_path, tiny_ckpt):
    kinds, lr = "image,text", 1e-3
    first, last = _run(tmp_path, tiny_ckpt, 2, 2, 1, kinds, lr)
    assert torch.equal(first["embed_weight"], last["embed_weight"]), "embedding and head copies diverged"
    ref = _reference(str(tiny_ckpt), kinds, lr)
    err = _rel(first["embed_weight"], ref["embed_weight"])
    print(f"embedding after 2 AdamW steps: rel err {err:.2e}")
    assert err <= 1e-5


def test_frozen_embeddings_and_vision_tower_with_activation_checkpointing(tmp_path, tiny_ckpt):
    """Frozen parts get no gradient and do not move; the rest — recomputed under activation
    checkpointing, fed by frozen layers — still equals transformers."""
    from safetensors.torch import load_file

    first, last = _run(tmp_path, tiny_ckpt, 2, 2, 1, "image", 1e-3, freeze="embeddings,vision_tower",
                       extra=("--activation-checkpointing",))
    grads = {**first["grads"][0], **last["grads"][0]}
    assert not any(n.startswith("model.vision_tower.") or "embed_tokens" in n for n in grads)
    assert "model.embed_vision.embedding_projection.weight" in grads
    original = {}
    for f in tiny_ckpt.glob("model-*.safetensors"):
        original.update(load_file(f))
    assert torch.equal(first["embed_weight"], original["model.language_model.embed_tokens.weight"])
    assert torch.equal(last["embed_weight"], first["embed_weight"])
    ref = _reference(str(tiny_ckpt), "image", 0.0)["grads"][0]
    worst = max(_rel(g, ref[n]) for n, g in grads.items())
    assert worst <= GRAD_RTOL


# The mixture-of-experts model (26B-A4B's block, `tiny_moe_ckpt`) through the same harness: ep = tp by
# default (whole experts per rank), pure expert-TP (ep 1: each expert's width split), EP beside DP, and
# sequence parallelism (router on the slice, its choices all-gathered).
MOE_CASES = [
    pytest.param((1, 1, 1), (), id="moe-1x1x1"),
    pytest.param((2, 2, 1), (), marks=pytest.mark.compat, id="moe-tp2-pp2-ep2"),
    pytest.param((1, 2, 2), (), id="moe-pp2-dp2"),
    pytest.param((2, 1, 2), ("--ep", "2"), id="moe-tp2-dp2-ep2"),
    pytest.param((2, 1, 1), ("--ep", "1"), id="moe-tp2-ep1"),
    pytest.param((2, 1, 1), ("--sequence-parallel",), id="moe-tp2-ep2-sp"),
]


@pytest.mark.parametrize("layout,extra", MOE_CASES)
def test_moe_loss_and_every_gradient_match_transformers(tmp_path, tiny_moe_ckpt, layout, extra):
    _assert_matches_transformers(tmp_path, tiny_moe_ckpt, layout, extra)


# moe.aux_loss_coef: transformers' load-balancing loss of every layer, a gradient injected on whichever stage
# holds it (pp 2), summed over TP slices under sequence parallelism, averaged over uneven DP shares, recorded
# once per micro-batch under activation checkpointing (the forward runs twice)
BALANCE_LAYOUTS = [
    pytest.param((1, 1, 1), (), id="balance-1x1x1"),
    pytest.param((2, 2, 1), ("--activation-checkpointing",), id="balance-tp2-pp2-ep2-ac"),
    pytest.param((1, 2, 2), ("--dp-counts", "3,1"), id="balance-pp2-dp2-uneven"),
    pytest.param((2, 1, 1), ("--sequence-parallel",), id="balance-tp2-sp"),
]


@pytest.mark.parametrize("layout,extra", BALANCE_LAYOUTS)
def test_moe_load_balancing_loss_matches_transformers(tmp_path, tiny_moe_ckpt, layout, extra):
    """Every gradient of CE + 0.5 × the balance loss (large, so that a wrong scale shows) equals transformers'."""
    _assert_matches_transformers(tmp_path, tiny_moe_ckpt, layout, extra, balance_coef=0.5)
