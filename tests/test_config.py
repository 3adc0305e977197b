"""Recipes: defaults, `--set` overrides, and one clear line for every bad key or value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from runner.config import load_config
from runner.errors import UserError

from conftest import ROOT, assert_one_line


def _recipe(tmp_path: Path, **sections) -> Path:
    data = {"model": {"path": "m"}, "data": {"train": "d"}, **sections}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_bundled_recipes_load():
    for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
        load_config(recipe)


def test_set_overrides_parse_values_as_yaml(tmp_path):
    cfg = load_config(_recipe(tmp_path), ["optim.lr=2e-5", "checkpoint.export=true", "parallel.dp=2",
                                          "optim.betas=[0.8, 0.9]", "train.max_steps=7"])
    assert cfg.optim.lr == 2e-5 and cfg.checkpoint.export is True and cfg.parallel.dp == 2
    assert cfg.optim.betas == [0.8, 0.9] and cfg.train.max_steps == 7


@pytest.mark.parametrize(
    "overrides,words",
    [
        (["train.bogus=1"], ["r.yaml with --set: unknown key 'train.bogus'", "max_steps"]),
        (["data.max_length=512", "data.buckets=[128,256]"], ["data.buckets [128, 256]", ">= data.max_length 512"]),
        (["nosuchsection.x=1"], ["unknown key 'nosuchsection'"]),
        (["parallel.tp=two"], ["parallel.tp", "expected int"]),
        (["model.dtype=fp8"], ["model.dtype", "'bfloat16'"]),
        (["optim.lr=0"], ["optim.lr must be > 0"]),
        (["optim.betas=[0.9]"], ["optim.betas"]),
        (["train.global_batch_size=7", "train.micro_batch_size=2"], ["global_batch_size=7", "multiple"]),
        (["data.train="], ["data.train is empty"]),
        (["train.max_steps"], ["expected key=value"]),
        (["train.activation_checkpointing=false", "train.recompute_num_layers=2"],
         ["train.recompute_num_layers needs train.activation_checkpointing: true"]),
        (["train.activation_checkpointing=true", "train.recompute_num_layers=-1"], ["train.recompute_num_layers", ">= 0"]),
        (["optim.lr=.inf"], ["optim.lr = inf is not a finite number"]),
        (["optim.betas=[0.9, .nan]"], ["optim.betas[1] = nan is not a finite number"]),
        (["train.grad_clip=-inf"], ["train.grad_clip", "not a finite number"]),
        (["data.train=.inf"], ["data.train = inf is not a finite number"]),
        (["output.dir="], ["output.dir is empty"]),
        (["model.path="], ["model.path is empty", "Gemma4 HF directory or Hub id"]),
        (["checkpoint.resume=sometimes"], ["checkpoint.resume = 'sometimes' is neither auto, none nor an existing path"]),
        (["parallel.tp=4", "parallel.ep=3"], ["parallel.ep=3 must be >= 1 and divide parallel.tp=4", "1, 2 or 4"]),
        (["parallel.tp=2", "parallel.ep=-2"], ["parallel.ep=-2 must be >= 1", "choose ep from 1 or 2"]),
        (["moe.aux_loss_coef=-0.01"], ["moe.aux_loss_coef=-0.01 must be >= 0"]),
        (["lora.target_modules=[q_proj, per_layer_input_gate]"],
         ["LoRA does not adapt per_layer_input_gate (only q_proj", "per-layer gate", "remove it"]),
        (["lora.target_modules=[]"], ["lora.target_modules is empty"]),
    ],
)
def test_bad_values_give_one_line(tmp_path, overrides, words):
    with pytest.raises(UserError) as err:
        load_config(_recipe(tmp_path), overrides)
    assert_one_line(str(err.value), words)


def test_missing_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("change,words", [
    ({"zero_optimization": {"stage": 2}}, ["ZeRO stage 2", "gpu_bf16_zero1.json"]),
    ({"pipeline": {"activation_checkpoint_interval": 2}}, ["pipeline.activation_checkpoint_interval",
                                                           "train.recompute_num_layers"]),
    ({"data_types": {"grad_accum_dtype": "fp32"}, "zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}},
     ["grad_accum_dtype", "offload_optimizer"]),
])
def test_deepspeed_configs_the_pipeline_cannot_take_give_one_line(tmp_path, change, words):
    """DeepSpeed settings that would break the pipeline or silently override the recipe are refused."""
    from runner.parallel.topology import ParallelDims
    from runner.train import deepspeed_config

    ds = {**json.loads((ROOT / "ds_configs/gpu_bf16_zero1.json").read_text()), **change}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    with pytest.raises(UserError) as err:
        deepspeed_config(load_config(_recipe(tmp_path)), ParallelDims(1, 1, 1), 1, str(tmp_path / "ds.json"))
    assert_one_line(str(err.value), words)
