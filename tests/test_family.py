"""Gemma4 E2B / E4B beyond parity (tests/test_parity.py): the tiny e2b checkpoint (per-layer inputs,
KV-shared layers without k/v weights, an audio tower) loads into a pp-2 pipeline, exports back to what
transformers loads with all its weights and the same logits, and resumes bit-exactly after kill -9."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_checkpoint import hf_tensors, logits, run_worker
from transformers import AutoModelForImageTextToText

from runner.cli import main as cli
from runner.config import load_config
from runner.data.sample import BadSample
from runner.data.sources import chat_sample
from runner.errors import UserError
from runner.models.gemma4.per_layer import AUDIO_PREFIXES
from runner.models.gemma4.presets import PRESETS
from runner.plan import (
    FUSED_ATTN_MAX_HEAD_DIM,
    carried_bytes,
    layer_kind,
    make_plan,
    memory_model,
    per_layer_input_saved,
)

from conftest import ROOT, assert_one_line

LAYOUT = (1, 2, 1)  # stage 0 stores both layer types' keys/values, stage 1 reuses them


@pytest.fixture(scope="module")
def e2b(tiny_like) -> Path:
    return tiny_like("e2b")


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory, e2b) -> Path:
    """Steps 1-4 in one run; saved and exported at step 0, saved at step 2."""
    base = tmp_path_factory.mktemp("e2b_unbroken")
    return run_worker(e2b, LAYOUT, base, "--steps", "4", "--save-at", "0,2", "--export", str(base / "export"))


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, e2b) -> Path:
    """A run killed with SIGKILL after step 3 (saved at 2), then resumed from step 2 in fresh processes."""
    base = tmp_path_factory.mktemp("e2b_killed")
    with pytest.raises(pytest.fail.Exception):
        run_worker(e2b, LAYOUT, base, "--steps", "4", "--save-at", "2", "--kill-after", "3")
    assert json.loads((base / "out" / "losses.json").read_text()).keys() == {"1", "2", "3"}
    assert (base / "root" / "latest").read_text() == "step_00000002"
    return run_worker(e2b, LAYOUT, base, "--resume", "--steps", "4")


def test_export_loads_in_transformers_with_every_weight_and_equal_logits(e2b, unbroken):
    export = unbroken / "export"
    got, source = hf_tensors(export), hf_tensors(e2b)
    assert got.keys() == source.keys(), sorted(got.keys() ^ source.keys())[:5]
    assert any(n.startswith(AUDIO_PREFIXES) for n in got)  # passed through, never built
    assert not any("layers.3.self_attn.k_proj" in n for n in got)  # KV-shared layers have no k/v weights
    for name, tensor in source.items():
        assert torch.equal(got[name], tensor), name
    _, info = AutoModelForImageTextToText.from_pretrained(export, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert torch.equal(logits(export), logits(e2b))


def test_resume_after_kill_9_is_exact(unbroken, resumed, tmp_path):
    """Steps 3-4 after the resume give the unbroken run's losses bit for bit; the trained checkpoint (step 2)
    exports to a model transformers loads completely."""
    want = json.loads((unbroken / "out" / "losses.json").read_text())
    got = json.loads((resumed / "out" / "losses.json").read_text())
    assert list(got) == ["3", "4"]
    for step, loss in got.items():
        assert loss == want[step], (step, loss, want[step])
    assert cli(["export", str(resumed / "root"), str(tmp_path / "export")]) == 0
    _, info = AutoModelForImageTextToText.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_audio_parts_are_refused_at_data_time():
    """One line naming the sample, before any model work: the audio tower is not built."""
    chat = [{"role": "user", "content": [{"type": "audio", "path": "a.wav"}, {"type": "text", "text": "what?"}]},
            {"role": "assistant", "content": "a cough"}]
    with pytest.raises(BadSample) as err:
        chat_sample(chat, "train.jsonl:7")
    assert_one_line(str(err.value), ["audio input", "train.jsonl:7", "audio tower"])


@pytest.mark.parametrize("recipe,table", [("gemma4_e2b_1x1", 262144 * 35 * 256), ("gemma4_e4b_tp2", 262144 * 42 * 256 // 2)])
def test_recipes_plan_with_the_per_layer_table(recipe, table):
    """The E recipes fit their cards; the first stage holds this rank's share of the per-layer table."""
    plan = make_plan(load_config(ROOT / "recipes" / f"{recipe}.yaml"))
    assert not plan.warnings, plan.warnings
    first = plan.stages[0]
    assert "per-layer embedding" in first.holds and first.params > table
    assert plan.source == "built-in shape"


def test_plan_at_pp2_counts_what_travels_between_stages():
    """E2B at pp 2 (layers 0-17 | 18-34): into layer 18 travel the per-layer inputs of layers 18-34 and the
    keys/values stored by layers 13 (sliding, 1 x 256) and 14 (full, 1 x 512), in bf16."""
    cfg = load_config(ROOT / "recipes" / "gemma4_e2b_1x1.yaml", ["parallel.pp=2"])
    plan = make_plan(cfg, world_size=2)
    assert [s.decoder_layers[0] for s in plan.stages] == [0, 18]
    tokens = cfg.train.micro_batch_size * cfg.data.row_length
    carried = 2 * tokens * (17 * 256 + 2 * (256 + 512))
    assert carried_bytes(PRESETS["google/gemma-4-E2B-it"]().text_config, 18, cfg.train.micro_batch_size,
                         cfg.data.row_length, 1, 1) == carried
    hidden = 2 * tokens * 1536
    assert plan.stages[1].activations_gib["p2p_buffers"] == round((2 * hidden + carried) / 2**30, 3)


def test_unsupported_layout_is_one_line():
    cfg = load_config(ROOT / "recipes" / "gemma4_e4b_tp2.yaml", ["parallel.tp=3"])
    with pytest.raises(UserError) as err:
        make_plan(cfg, world_size=3)
    assert_one_line(str(err.value), ["parallel.tp=3"])


def test_plan_counts_the_double_wide_mlp_of_the_kv_shared_layers():
    """E2B's 20 KV-shared layers run an MLP twice as wide (`use_double_wide_mlp`): without activation
    checkpointing the stage keeps each layer's own activations, the shared ones at that width."""
    cfg = load_config(ROOT / "recipes" / "gemma4_e2b_1x1.yaml", ["train.activation_checkpointing=false"])
    tc = PRESETS["google/gemma-4-E2B-it"]().text_config
    memory = memory_model(cfg, PRESETS["google/gemma-4-E2B-it"](), 1, FUSED_ATTN_MAX_HEAD_DIM)
    assert memory.shapes["sliding_attention shared"].mlp == 2 * memory.shapes["sliding_attention"].mlp == 2 * 6144
    kinds = [layer_kind(tc, i) for i in range(tc.num_hidden_layers)]
    assert kinds.count("sliding_attention shared") + kinds.count("full_attention shared") == 20
    stored = sum(memory.layer_saved(k) for k in kinds) + per_layer_input_saved(tc, memory.tokens, 1)
    [stage] = make_plan(cfg).stages
    assert stage.activations_gib["stored_per_micro_batch"] == round(stored / 2**30, 3), stage.activations_gib
