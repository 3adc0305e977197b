"""The mixture-of-experts model (26B-A4B's block) beyond gradient parity (tests/test_parity.py): the
expert cut descriptor, the grouped GEMM against the loop, one-line layout errors, exact resume after
kill -9 at TP2 with EP2, `runner export` of the trained model loading in transformers with the
runner's eval loss, and `runner plan` of the 26B-A4B (its shape, its recipes, experts counted once)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
from checkpoint_worker import EVAL_SEED
from test_lora import make_peft_adapter
from transformers import AutoModelForImageTextToText, Gemma4ForConditionalGeneration

from runner.cli import main as cli
from runner.config import load_config
from runner.errors import UserError
from runner.models.gemma4.moe import Gemma4MoEExperts
from runner.models.gemma4.pipeline import validate_layout
from runner.models.gemma4.presets import gemma4_26b_a4b_config
from runner.models.gemma4.tiny import tiny_config, tiny_moe_config
from runner.parallel.tensor_parallel import join_shards, mark_cuts, take_shard
from runner.parallel.topology import ParallelDims
from runner.plan import make_plan

from conftest import (
    ROOT,
    TESTS,
    assert_one_error_line,
    assert_one_line,
    run,
    subprocess_env,
    torchrun_cmd,
    torchrun_worker,
)
from reference import global_loss
from synthetic import global_batch
from test_parity import _assert_matches_transformers


@pytest.mark.parametrize("tp,ep", [(1, 1), (2, 1), (2, 2), (4, 2), (4, 4)])
def test_expert_shards_read_and_join_back(tp, ep):
    """Every rank's gate_up (gate and up rows of its width slice) and down shard, joined in rank order, is the full tensor."""
    etp = tp // ep
    full = {"gate_up": torch.randn(8, 2 * 32, 16), "down": torch.randn(8, 16, 32)}
    cuts = {"gate_up": ((0, ep, 1), (1, etp, 2)), "down": ((0, ep, 1), (2, etp, 1))}
    for name, tensor in full.items():
        shards = []
        for rank in range(tp):
            like = torch.nn.Parameter(torch.empty(0))
            mark_cuts(like, cuts[name], tp, rank)
            shards.append(take_shard(tensor, like))
        assert torch.equal(join_shards(shards, cuts[name]), tensor), name
    rank1 = torch.nn.Parameter(torch.empty(0))
    mark_cuts(rank1, cuts["gate_up"], tp, tp - 1)
    gate, up = take_shard(full["gate_up"], rank1).chunk(2, dim=1)  # the last rank: last experts, last width slice
    assert torch.equal(gate, full["gate_up"][8 - 8 // ep:, 32 - 32 // etp:32])
    assert torch.equal(up, full["gate_up"][8 - 8 // ep:, 64 - 32 // etp:])


def test_grouped_gemm_equals_the_loop():
    """`torch._grouped_mm` (what CUDA bf16 runs) gives the loop's output and gradients (fp32, CPU)."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    ps = SimpleNamespace(dims=ParallelDims(), tp_rank=0, tp_group=None)
    experts = Gemma4MoEExperts(tiny_moe_config(), ps)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 64, generator=gen)
    index = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(40)])
    weights = torch.rand(40, 2, generator=gen)
    upstream = torch.randn(40, 64, generator=gen)
    results = []
    for forward in (experts.forward_loop, experts.forward_grouped):
        experts.zero_grad()
        xi, wi = x.clone().requires_grad_(), weights.clone().requires_grad_()
        out = forward(xi, index, wi)
        out.backward(upstream)
        results.append([out, xi.grad, wi.grad, experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config,dims,words", [
    (tiny_moe_config(), ParallelDims(tp=4, ep=8), ["parallel.ep=8", "parallel.tp=4", "divide"]),
    (tiny_moe_config(), ParallelDims(tp=4, ep=3), ["parallel.ep=3", "divide"]),
    (tiny_config(), ParallelDims(tp=2, ep=2), ["parallel.ep=2", "dense", "remove parallel.ep"]),
])
def test_bad_expert_layouts_are_one_line(config, dims, words):
    with pytest.raises(UserError) as err:
        dims.validate(dims.world_size)
        validate_layout(config, dims)
    assert_one_line(str(err.value), words)


def test_experts_not_splitting_are_one_line():
    config = tiny_moe_config()
    config.text_config.num_experts = 6
    with pytest.raises(UserError) as err:
        validate_layout(config, ParallelDims(tp=4, ep=4))
    assert_one_line(str(err.value), ["num_experts=6", "parallel.ep=4"])
    config = tiny_moe_config()
    config.text_config.moe_intermediate_size = 30
    with pytest.raises(UserError) as err:
        validate_layout(config, ParallelDims(tp=4, ep=1))
    assert_one_line(str(err.value), ["moe_intermediate_size=30", "tp / ep", "4"])
    validate_layout(tiny_moe_config(), ParallelDims(tp=4, ep=2))  # 4 experts per EP rank, width 32 / 2


def _run(ckpt: Path, base: Path, *args: str) -> None:
    torchrun_worker("checkpoint_worker.py", ckpt, (2, 1, 1), "--ep", "2", "--root", str(base / "root"),
                    "--out", str(base / "out"), *args)


def _losses(base: Path) -> dict[str, float]:
    return json.loads((base / "out" / "losses.json").read_text())


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory, tiny_moe_ckpt) -> Path:
    """TP2 x EP2: 5 steps saving at 2 and 5, then the eval loss on a fixed batch."""
    base = tmp_path_factory.mktemp("moe_unbroken")
    (base / "out").mkdir()
    _run(tiny_moe_ckpt, base, "--steps", "5", "--save-at", "2,5", "--eval-loss")
    return base


def test_resume_after_kill_9_is_exact(tmp_path, tiny_moe_ckpt, unbroken):
    """The same run killed with SIGKILL after step 3 (its step-2 checkpoint complete), resumed in fresh
    processes: steps 3-5 give the unbroken run's losses bit for bit."""
    (tmp_path / "out").mkdir()
    cmd = torchrun_cmd(2, str(TESTS / "checkpoint_worker.py"), "--ckpt", str(tiny_moe_ckpt), "--tp", "2", "--ep", "2",
                       "--root", str(tmp_path / "root"), "--out", str(tmp_path / "out"), "--steps", "100",
                       "--save-at", "2")
    job = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ranks = []
    try:
        deadline = time.time() + 300
        while not (tmp_path / "out" / "losses.json").exists() or "3" not in _losses(tmp_path):
            assert job.poll() is None and time.time() < deadline, "the job ended before step 3"
            time.sleep(0.05)
    finally:
        ranks = psutil.Process(job.pid).children(recursive=True)  # torchrun setsid()s each rank: kill them one by one
        for rank in ranks:
            rank.kill()  # SIGKILL
        job.kill()
        job.wait()
        psutil.wait_procs(ranks, timeout=30)
    assert ranks, "no rank was killed"
    assert (tmp_path / "root" / "latest").read_text() == "step_00000002"
    _run(tiny_moe_ckpt, tmp_path, "--resume", "--steps", "5")
    resumed, want = _losses(tmp_path), _losses(unbroken)
    assert list(resumed) == ["3", "4", "5"]
    assert all(resumed[s] == want[s] for s in resumed), (resumed, want)


def test_export_loads_in_transformers_with_the_runners_eval_loss(tmp_path, unbroken):
    """`runner export` joins the expert shards into transformers' layout: the trained weights exactly, and
    transformers' loss on the export equals the runner's eval loss up to fp32 noise."""
    out = tmp_path / "export"
    assert cli(["export", str(unbroken / "root"), str(out)]) == 0
    model, info = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32, attn_implementation="eager",
                                                              output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    trained = torch.load(unbroken / "out" / "final_stage0.pt", weights_only=True)
    state = model.state_dict()
    assert any("experts.gate_up_proj" in n for n in trained)
    for name, tensor in trained.items():
        assert torch.equal(state[name], tensor), name
    model.eval()
    with torch.no_grad():
        loss = float(global_loss(model, global_batch(model.config, "image", seed=EVAL_SEED)))
    runner_loss = json.loads((unbroken / "out" / "eval_loss.json").read_text())
    assert abs(loss - runner_loss) <= 1e-5 * abs(loss), (loss, runner_loss)


@pytest.mark.parametrize("other", ["e2b", "31b"])
def test_export_with_another_model_as_source_is_one_line(capsys, tmp_path, unbroken, tiny_like, other):
    """An E2B's or the dense model's files as --source would pair their config with the experts: refused first."""
    out = tmp_path / "export"
    assert cli(["export", str(unbroken / "root"), str(out), "--source", str(tiny_like(other))]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, errors
    assert_one_line(errors[0], ["was not trained from", "experts.down_proj", "pass the HF model the run started from "
                          "with --source"])
    assert not out.exists()


# google/gemma-4-26B-A4B-it, counted by transformers on the meta device (tied head once); 128 experts of
# 3 x 704 x 2816 in each of the 30 layers
PARAMS_26B_A4B = 25_805_933_872
EXPERTS_26B_A4B = 30 * 128 * 3 * 704 * 2816
MOE_RECIPES = {"tp4_pp2": (ROOT / "recipes/gemma4_26b_a4b_tp4_pp2.yaml", 80),
               "tp2_pp2": (ROOT / "recipes/gemma4_26b_a4b_tp2_pp2.yaml", 140)}


def test_26b_a4b_preset_matches_the_published_shape():
    with torch.device("meta"):
        model = Gemma4ForConditionalGeneration(gemma4_26b_a4b_config())
    assert sum(p.numel() for p in model.parameters()) == PARAMS_26B_A4B
    assert sum(p.numel() for n, p in model.named_parameters() if ".experts." in n) == EXPERTS_26B_A4B
    layers = model.model.language_model.layers
    full = layers[5].self_attn
    assert (full.q_proj.out_features, full.k_proj.out_features, full.v_proj) == (16 * 512, 2 * 512, None)
    assert layers[0].self_attn.k_proj.out_features == 8 * 256 and layers[0].router.proj.out_features == 128


@pytest.mark.parametrize("name", sorted(MOE_RECIPES))
def test_26b_a4b_recipes_plan_and_count_experts_once(name):
    """The recipes fit their cards; summed over all GPUs the parameters are the model's plus the knowingly
    replicated (norms, router, vision on every TP rank; the tied head's copy): experts counted exactly once."""
    recipe, card = MOE_RECIPES[name]
    cfg = load_config(recipe)
    plan = make_plan(cfg)
    assert plan.gpu_mem_gib == card and not plan.warnings, plan.table()
    tp, pp, ep = plan.dims.tp, plan.dims.pp, plan.dims.ep_size
    assert plan.total_params == PARAMS_26B_A4B
    with torch.device("meta"):
        model = Gemma4ForConditionalGeneration(gemma4_26b_a4b_config())
    lm = model.model.language_model
    replicated = sum(p.numel() for m in (model.model.vision_tower, model.model.embed_vision) for p in m.parameters())
    replicated += sum(p.numel() for n, p in lm.named_parameters() if p.ndim == 1 or ".router." in n)
    kv_extra = sum(layer.self_attn.k_proj.weight.numel() * (tp // 2 - 1) for layer in lm.layers
                   if layer.self_attn.v_proj is None and tp > 2)  # the full layers' 2 KV heads
    expected = PARAMS_26B_A4B + (tp - 1) * replicated + kv_extra + (lm.embed_tokens.weight.numel() if pp > 1 else 0)
    assert sum(s.params for s in plan.stages) * tp == expected
    moe = plan.moe
    assert (moe["experts_per_rank"], moe["etp"]) == (128 // ep, tp // ep)
    assert moe["expert_params_per_layer"] * 30 * tp == EXPERTS_26B_A4B
    assert moe["allreduce_mib_per_layer"] == cfg.train.micro_batch_size * cfg.data.row_length * 2816 * 2 / 2**20
    assert f"{128 // ep} per GPU" in plan.table()


def test_expert_parallel_size_moves_experts_not_memory():
    """ep 1 (every expert's width split 4 ways) and ep 4 (32 whole experts per GPU) hold the same bytes."""
    recipe = MOE_RECIPES["tp4_pp2"][0]
    by_ep = {ep: make_plan(load_config(recipe, [f"parallel.ep={ep}"])) for ep in (1, 4)}
    assert by_ep[1].stages[0].params == by_ep[4].stages[0].params
    assert (by_ep[1].moe["experts_per_rank"], by_ep[4].moe["experts_per_rank"]) == (128, 32)
    with pytest.raises(UserError) as err:
        load_config(recipe, ["parallel.ep=3"])
    assert_one_line(str(err.value), ["parallel.ep=3", "parallel.tp=4"])


def test_lora_on_an_moe_model_adapts_attention_and_dense_mlp(tmp_path, tiny_moe_ckpt):
    """LoRA on the MoE model at TP2 x EP2: adapter gradients equal PEFT's on the same targets; the experts and
    router stay frozen (the worker checks the base is bit-unchanged and gradient-free)."""
    adapter = make_peft_adapter(tiny_moe_ckpt, tmp_path / "peft")
    _assert_matches_transformers(tmp_path, tiny_moe_ckpt, (2, 1, 1), (), adapter=str(adapter))


def test_runner_train_logs_the_expert_load_and_refuses_a_balance_loss_on_a_dense_model(tmp_path, tiny_moe_ckpt,
                                                                                       tiny_ckpt):
    """`runner train` of the MoE model with moe.aux_loss_coef logs, every step, the balance loss and the expert
    load (an expert's share of its layer's routed slots × experts: 1 = even) over the whole model; on a dense
    model the coefficient is one line before anything is built."""
    from runner.data.synthetic import make_data

    from test_train import ONE_BATCH_OF_4, _sets, _single_process

    data = make_data(tmp_path / "medpix", n=16, seed=0)
    out = tmp_path / "out"
    coef = "moe.aux_loss_coef=0.01"
    run(_single_process() + _sets(tiny_moe_ckpt, data, out, *ONE_BATCH_OF_4, "train.max_steps=2", coef))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    text = json.loads((tiny_moe_ckpt / "config.json").read_text())["text_config"]
    experts, layers = text["num_experts"], text["num_hidden_layers"]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 0 <= r["moe_load_min"] <= 1 <= r["moe_load_max"] <= experts, r
        assert 0 <= r["moe_idle_experts"] < layers * experts and r["moe_balance_loss"] > 0, r
    proc = run(_single_process() + _sets(tiny_ckpt, data, tmp_path / "dense", *ONE_BATCH_OF_4, coef) + ["--check"],
               ok=False)
    assert_one_error_line(proc, ["moe.aux_loss_coef=0.01", "mixture-of-experts", "dense"])
