"""Invariant 5 for checkpoints: a checkpoint that disagrees with its config — a shard file gone, a
tensor missing from the index, a shape or dtype the config does not produce — and a layer file that
does not fit its layer are one line naming file and tensor. Single process, no weights built."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, Gemma4ForConditionalGeneration

from runner.checkpoint.engine import check_layer_state
from runner.checkpoint.export import parse_size
from runner.checkpoint.hf_load import INDEX_NAME, HFCheckpoint, resolve_model_dir
from runner.errors import UserError

from conftest import assert_one_line

NAME = "model.language_model.layers.1.mlp.up_proj.weight"


@pytest.fixture
def ckpt(tmp_path, tiny_ckpt) -> Path:
    """A private copy of the tiny checkpoint to damage."""
    return Path(shutil.copytree(tiny_ckpt, tmp_path / "ckpt"))


def expected(ckpt: Path, name: str) -> torch.Tensor:
    """The tensor the config produces for `name` (meta device, unsharded)."""
    with torch.device("meta"):
        model = Gemma4ForConditionalGeneration(AutoConfig.from_pretrained(ckpt))
    return model.state_dict()[name]


def shard_of(ckpt: Path, name: str) -> Path:
    return ckpt / json.loads((ckpt / INDEX_NAME).read_text())["weight_map"][name]


def rewrite(ckpt: Path, name: str, tensor: torch.Tensor) -> Path:
    shard = shard_of(ckpt, name)
    tensors = load_file(shard)
    tensors[name] = tensor
    save_file(tensors, shard, metadata={"format": "pt"})
    return shard


def one_line_error(ckpt: Path, name: str) -> str:
    with pytest.raises(UserError) as err:
        HFCheckpoint(ckpt).read_shard(name, expected(ckpt, name))
    return assert_one_line(str(err.value), [name])


def test_reads_a_tensor_bit_identical(ckpt):
    got = HFCheckpoint(ckpt).read_shard(NAME, expected(ckpt, NAME))
    assert torch.equal(got, load_file(shard_of(ckpt, NAME))[NAME])


def test_missing_shard_file(ckpt):
    shard = shard_of(ckpt, NAME)
    shard.unlink()
    message = one_line_error(ckpt, NAME)
    assert str(shard) in message and "missing" in message


def test_missing_index_entry(ckpt):
    index = json.loads((ckpt / INDEX_NAME).read_text())
    del index["weight_map"][NAME]
    (ckpt / INDEX_NAME).write_text(json.dumps(index))
    assert "not in the checkpoint index" in one_line_error(ckpt, NAME)


def test_shape_not_matching_the_config(ckpt):
    shape = expected(ckpt, NAME).shape
    shard = rewrite(ckpt, NAME, torch.zeros(shape[0] // 2, shape[1]))
    message = one_line_error(ckpt, NAME)
    assert str(shard) in message and f"{[shape[0] // 2, shape[1]]}" in message and f"{list(shape)}" in message


@pytest.mark.parametrize("dtype", [torch.float16, torch.int8])
def test_dtype_not_matching_the_config(ckpt, dtype):
    shard = rewrite(ckpt, NAME, torch.zeros(expected(ckpt, NAME).shape, dtype=dtype))
    message = one_line_error(ckpt, NAME)
    assert str(shard) in message, message


def test_hub_id_without_network_is_one_line():
    with pytest.raises(UserError) as err:  # conftest sets HF_HUB_OFFLINE=1
        resolve_model_dir("google/gemma-4-no-such-model")
    assert_one_line(str(err.value), ["google/gemma-4-no-such-model"])


def test_layer_file_not_fitting_its_layer():
    layer = nn.Linear(4, 8, bias=False)
    layer.hf_prefix = "lm_head."
    with pytest.raises(UserError, match=r"^f\.pt: lm_head\.weight is missing"):
        check_layer_state(layer, {}, "f.pt")
    with pytest.raises(UserError, match=r"^f\.pt: lm_head\.weight has shape \[4, 4\], this rank expects \[8, 4\]"):
        check_layer_state(layer, {"weight": torch.zeros(4, 4)}, "f.pt")


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("300kb") == 300_000
    assert parse_size(1234) == 1234
    with pytest.raises(UserError):
        parse_size("five gigs")
