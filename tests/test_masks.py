"""The per-stage mask cache returns exactly transformers' masks, builds once per micro-batch and
never serves one micro-batch's masks to another."""

from __future__ import annotations

import torch

from runner.models.gemma4 import stages
from runner.models.gemma4.stages import MaskCache, build_masks
from runner.models.gemma4.tiny import tiny_config

from synthetic import global_batch


def _args(mb: dict, hidden_size: int) -> tuple:
    b, s = mb["input_ids"].shape
    hidden = torch.zeros(b, s, hidden_size)
    return hidden, mb["attention_mask"], torch.arange(s).repeat(b, 1), mb["mm_token_type_ids"]


def test_cache_matches_transformers_and_builds_once(monkeypatch):
    config = tiny_config()
    config.text_config._attn_implementation = "sdpa"
    calls = []
    monkeypatch.setattr(stages, "build_masks", lambda *a: calls.append(1) or build_masks(*a))
    cache = MaskCache(config, capacity=2)
    batches = global_batch(config, "image")[:3]
    for mb in batches:  # every layer of a stage, forward and recompute: one build per micro-batch
        args = _args(mb, config.text_config.hidden_size)
        want = build_masks(config, *args)
        for _ in range(4):
            got = cache.get(*args)
            for kind in ("full_attention", "sliding_attention"):
                assert (got[kind] is None) == (want[kind] is None)
                if want[kind] is not None:
                    assert torch.equal(got[kind], want[kind])
    assert len(calls) == 3
    # same shapes, different image layout → a new entry, not a stale hit
    first = _args(batches[0], config.text_config.hidden_size)
    other = list(first)
    other[3] = torch.zeros_like(first[3])
    cache.get(*other)
    assert len(calls) == 4 and len(cache.entries) == 2


def test_cache_hits_aliases_and_misses_in_place_writes(monkeypatch):
    """Recompute passes `detach()`ed aliases (a hit, no rebuild); an in-place write to a cached
    tensor, or equal values in other memory, build afresh — the cache never reads values."""
    config = tiny_config()
    config.text_config._attn_implementation = "sdpa"
    calls = []
    monkeypatch.setattr(stages, "build_masks", lambda *a: calls.append(1) or build_masks(*a))
    cache = MaskCache(config, capacity=4)
    args = _args(global_batch(config, "image")[0], config.text_config.hidden_size)
    first = cache.get(*args)
    assert cache.get(*(t.detach() for t in args)) is first and len(calls) == 1
    cache.get(*(t.clone() for t in args))
    assert len(calls) == 2
    args[1][0, -1] = 0  # the cached attention mask, written in place: its masks are stale
    got = cache.get(*args)
    assert len(calls) == 3 and torch.equal(got["full_attention"], build_masks(config, *args)["full_attention"])
