"""Invariant 5 for the model: unsupported configs and impossible layouts fail with one clear line."""

from __future__ import annotations

import pytest

from runner.errors import UserError
from runner.models.gemma4.pipeline import check_supported, validate_layout
from runner.models.gemma4.tiny import TINY_LIKE, tiny_config
from runner.parallel.topology import ParallelDims

from conftest import assert_one_line


def _config(**text):
    config = tiny_config()
    for key, value in text.items():
        setattr(config.text_config, key, value)
    return config


@pytest.mark.parametrize(
    "text,words",
    [
        ({"use_bidirectional_attention": "all"}, ["use_bidirectional_attention"]),
    ],
)
def test_unsupported_text_features_are_refused(text, words):
    with pytest.raises(UserError) as err:
        check_supported(_config(**text))
    assert_one_line(str(err.value), words)


def test_the_tiny_31b_and_e_structures_are_supported():
    """E2B/E4B's audio_config is accepted: the tower is not built (audio inputs are refused at data time)."""
    for like in TINY_LIKE.values():
        check_supported(like())


@pytest.mark.parametrize(
    "dims,text,words",
    [
        (ParallelDims(tp=3), {}, ["num_attention_heads=4", "parallel.tp=3"]),
        (ParallelDims(pp=7), {}, ["parallel.pp=7", "6 decoder layers"]),
        (ParallelDims(tp=4), {"vocab_size": 510}, ["vocab_size=510"]),
        (ParallelDims(tp=4), {"intermediate_size": 130}, ["intermediate_size=130"]),
    ],
)
def test_impossible_layouts_are_refused(dims, text, words):
    with pytest.raises(UserError) as err:
        validate_layout(_config(**text), dims)
    assert_one_line(str(err.value), words)


def test_kv_heads_neither_split_nor_replicable():
    config = tiny_config()
    tc = config.text_config
    tc.num_attention_heads, tc.intermediate_size, tc.vocab_size = 12, 120, 516
    tc.num_key_value_heads = 4  # sliding layers: 4 KV heads, tp 6 neither divides nor is a multiple
    with pytest.raises(UserError) as err:
        validate_layout(config, ParallelDims(tp=6))
    assert_one_line(str(err.value), ["4 key/value heads", "parallel.tp=6"])


def test_kv_heads_fewer_than_tp_are_replicated_not_refused():
    validate_layout(tiny_config(), ParallelDims(tp=4))  # 2 sliding and 1 full KV heads, tp 4


def test_world_size_must_match():
    with pytest.raises(UserError) as err:
        ParallelDims(tp=2, pp=2, dp=1).validate(8)
    assert_one_line(str(err.value), ["2*2*1 = 4", "8 processes"])
