"""Packing (data.packing): packed rows are the same function as their samples run one by one through
transformers — loss, every gradient — at several layouts; masks keep samples apart on every backend;
the packed order and a resumed packed run are exact."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from runner.compat import build_masks, build_packed_masks
from runner.config import load_config
from runner.data.packing import document_positions, first_fit
from runner.errors import UserError
from runner.models.gemma4.tiny import tiny_config

from conftest import ROOT, assert_one_line, run, torchrun_cmd
from synthetic import PACK_LENGTH, PACK_MULTIPLE, PACKED_SAMPLES, global_batch
from test_parity import _assert_matches_transformers
from test_train import TRAIN, _sets, medpix  # noqa: F401 (medpix: the fixture)


def test_first_fit_keeps_order_and_capacity():
    assert first_fit([30, 19, 19, 32, 26, 36, 13, 55], 64) == [[0, 1, 6], [2, 3], [4, 5], [7]]
    assert first_fit([64, 1], 64) == [[0], [1]]
    with pytest.raises(ValueError):
        first_fit([65], 64)


def test_document_positions_restart_per_sample():
    docs = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]])
    assert document_positions(docs).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 0, 1, 2]]


def _packed_masks(attn: str) -> tuple[dict, dict, list]:
    """Masks of the packed micro-batches (one row each) under `attn`, and the samples' own (sdpa)."""
    config = tiny_config()
    packed, alone = global_batch(config, "packed"), global_batch(config, "unpacked")
    hidden = config.text_config.hidden_size
    got = []
    config.text_config._attn_implementation = attn
    for mb in packed:
        docs = mb["attention_mask"]
        got.append(build_packed_masks(config, torch.zeros(*docs.shape, hidden), docs, mb["mm_token_type_ids"]))
    config.text_config._attn_implementation = "sdpa"
    want = [build_masks(config, torch.zeros(*mb["input_ids"].shape, hidden), mb["attention_mask"],
                        document_positions(mb["attention_mask"]), mb["mm_token_type_ids"]) for mb in alone]
    return packed, got, want


def _dense(mask: torch.Tensor | None, n: int, kind: str) -> torch.Tensor:
    """sdpa's mask of one sample; None is the plain causal one (sdpa's is_causal), windowed on sliding layers."""
    if mask is not None:
        return mask[0, 0]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return causal.triu(-15) if kind == "sliding_attention" else causal  # the tiny model's window: 16


@pytest.mark.compat
def test_packed_dense_masks_are_each_samples_own():
    """Each sample's block of the packed mask is the mask transformers builds for it alone (causal,
    the window counted from the sample's start, bidirectional within its images); nothing crosses."""
    packed, got, want = _packed_masks("sdpa")
    lengths = [int(mb["attention_mask"].sum()) for mb in global_batch(tiny_config(), "unpacked")]
    alone = iter([want[i] for row in first_fit(lengths, PACK_LENGTH) for i in row])  # row order
    for mb, masks in zip(packed, got):
        docs = mb["attention_mask"][0]
        for doc in docs.unique().tolist():
            span = (docs == doc).nonzero().flatten()
            a, b = int(span[0]), int(span[-1]) + 1
            own = next(alone) if doc else None
            for kind, mask in masks.items():
                assert not mask[0, 0, a:b, :a].any() and not mask[0, 0, a:b, b:].any(), (kind, doc)
                if own is not None:
                    assert torch.equal(mask[0, 0, a:b, a:b], _dense(own[kind], b - a, kind)), (kind, doc)
                    if kind == "sliding_attention" and b - a > 16:  # the window is the sample's, not the row's
                        assert not mask[0, 0, b - 1, a].item()
    assert next(alone, None) is None


def test_flex_block_mask_matches_dense_mask():
    """The FlexAttention BlockMask's mask_mod (what FlexAttention and the wide-head GEMM backward's
    `dense_mask` evaluate) materialised by `create_mask` is the dense packed mask."""
    _, flex, _ = _packed_masks("flex_attention")
    _, dense, _ = _packed_masks("sdpa")
    for f, d in zip(flex, dense):
        for kind in d:
            q, kv = d[kind].shape[-2:]  # the micro-batch's own length (its longest row, rounded up)
            assert torch.equal(create_mask(f[kind].mask_mod, 1, 1, q, kv, device="cpu"), d[kind])


def test_packed_batches_hold_every_sample_once():
    config = tiny_config()
    # a micro-batch is its longest row rounded up to PACK_MULTIPLE (rows of 62, 51, 62 and 55 tokens)
    for kind, shapes in (("packed", [(1, 64), (1, 56), (1, 64), (1, 56)]), ("packed2", [(2, 64), (2, 64)])):
        batch = global_batch(config, kind)
        assert [tuple(mb["input_ids"].shape) for mb in batch] == shapes
        for mb in batch:  # padding only after the row's last sample, and no more than the rounding adds
            real = (mb["attention_mask"] > 0).sum(1)
            assert int(real.max()) > mb["input_ids"].shape[1] - PACK_MULTIPLE
        assert sum(int(mb["attention_mask"].amax(1).sum()) for mb in batch) == len(PACKED_SAMPLES)
        images = sum(len(s.get("images", [])) for s in PACKED_SAMPLES)
        assert sum(mb["pixel_values"].shape[0] for mb in batch) == images


SP = ("--sequence-parallel",)
PACKED_LAYOUTS = [("31b", (1, 1, 1), ()), pytest.param("31b", (2, 2, 1), SP, marks=pytest.mark.compat),
                  ("31b", (1, 2, 2), ()), ("31b", (2, 1, 1), SP),
                  # E2B: per-layer inputs per token; the KV-shared layers 3-5 (stage 1 at pp 2) attend to the carried
                  # keys/values of layers 1 and 2 through the packed block masks
                  ("e2b", (2, 2, 1), SP), ("e2b", (1, 2, 1), ()),
                  # MoE: routing is per token; whole experts per rank (ep 2)
                  ("26b-a4b", (2, 2, 1), SP), ("26b-a4b", (2, 1, 1), ("--ep", "2"))]


@pytest.mark.parametrize("like,layout,extra", PACKED_LAYOUTS, ids=str)
def test_packed_loss_and_every_gradient_match_samples_one_by_one(request, tmp_path, like, layout, extra):
    """Two packed steps (micro-batches of one row, then of two rows: the micro-batch count changes
    between steps) against the same samples run one by one through transformers, token-weighted; on the
    31B-like, E2B-like and 26B-A4B-like tiny models."""
    ckpt = request.getfixturevalue("tiny_ckpt") if like == "31b" else request.getfixturevalue("tiny_like")(like)
    _assert_matches_transformers(tmp_path, ckpt, layout, extra, kinds="packed,packed2", ref_kinds="unpacked,unpacked")


@pytest.mark.parametrize("layout,extra", [((1, 2, 1), ("--activation-checkpointing",)),
                                          ((2, 2, 1), ("--sequence-parallel", "--activation-checkpointing"))], ids=str)
def test_packed_rows_under_activation_checkpointing_match_samples_one_by_one(tmp_path, tiny_ckpt, layout, extra):
    """Recompute rebuilds each packed row's masks and positions from its document ids (the worker checks every
    decoder layer ran its forward twice per micro-batch): loss and every gradient as without it."""
    _assert_matches_transformers(tmp_path, tiny_ckpt, layout, extra, kinds="packed,packed2",
                                 ref_kinds="unpacked,unpacked")


def test_dp_replicas_with_different_packed_row_counts_match_samples_one_by_one(tmp_path, tiny_ckpt):
    """Packing gives each DP replica as many micro-batches as its samples fill: here replica 0 trains three
    packed rows (7 samples, 2 of 3 images) and replica 1 one row (1 sample), each through its own pipeline
    schedule of 3 and 1 micro-batches; the token-weighted loss and every gradient are still transformers' on
    the 8 samples one by one."""
    packed = global_batch(tiny_config(), "packed")
    assert [int(mb["attention_mask"].amax()) for mb in packed] == [3, 2, 2, 1]  # samples per row
    _assert_matches_transformers(tmp_path, tiny_ckpt, (1, 2, 2), ("--dp-counts", "3,1"), kinds="packed,packed",
                                 ref_kinds="unpacked,unpacked")


PACKED_RUN = ("parallel.tp=1", "parallel.pp=1", "parallel.dp=2", "train.micro_batch_size=1",
              "train.global_batch_size=8", "data.packing=true", "data.pack_length=512", "data.group_by_length=false",
              "eval.every_steps=2", "eval.max_batches=2", "checkpoint.every_steps=2", "checkpoint.keep=3")


def test_packed_run_resumes_bit_exact(tmp_path, tiny_ckpt, medpix):  # noqa: F811 (the imported fixture)
    """`runner train` with packing at dp 2 (each replica packs its own 4 samples per step, the
    micro-batch count varying per step): stopped at step 2 and resumed in fresh processes, steps 3-4
    give the same loss and grad norm bit for bit as the unbroken run; packed eval runs; the fill ratio
    and non-pad tokens per second are logged."""
    first, second = tmp_path / "a", tmp_path / "b"
    run(torchrun_cmd(2, *TRAIN) + _sets(tiny_ckpt, medpix, first, *PACKED_RUN, "train.max_steps=4"))
    run(torchrun_cmd(2, *TRAIN) + _sets(tiny_ckpt, medpix, second, *PACKED_RUN, "train.max_steps=4",
                                        f"checkpoint.resume={first / 'checkpoints' / 'step_00000002'}"))
    unbroken, resumed = ([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                         for out in (first, second))
    train = {r["step"]: r for r in unbroken if "split" not in r}
    assert any(r.get("split") == "eval" for r in unbroken)
    assert [r["step"] for r in resumed if "split" not in r] == [3, 4]
    for r in resumed:
        if "split" not in r:
            assert (r["loss"], r["grad_norm"]) == (train[r["step"]]["loss"], train[r["step"]]["grad_norm"])
    assert all(0 < r["fill"] <= 1 and r["tokens_per_sec"] > 0 for r in train.values())
    print({step: (r["tokens"], round(r["fill"], 3)) for step, r in train.items()})


@pytest.mark.parametrize("sets,words", [
    (["data.pack_length=1024", "data.max_length=2048"], ["data.pack_length 1024", "data.max_length 2048"]),
    (["parallel.tp=2", "parallel.sequence_parallel=true", "data.pack_length=4097", "data.max_length=16"],
     ["data.pack_length", "multiple of 2"]),
    (["data.buckets=[4096]", "data.max_length=4096"], ["remove data.buckets"]),
])
def test_packing_settings_are_checked_in_one_line(sets, words):
    with pytest.raises(UserError) as err:
        load_config(ROOT / "recipes" / "tiny_demo.yaml", ["data.packing=true", *sets])
    assert_one_line(str(err.value), words)
