"""`runner plan`: the 31B recipes load and plan on CPU, the stage split is DeepSpeed's, parameters per
GPU add up to the model, the activation formula matches what autograd saves, the memory warning fires."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
import torch
from deepspeed.runtime.utils import partition_balanced
from transformers import Gemma4ForConditionalGeneration

from runner.cli import main
from runner.compat import (
    Gemma4TextDecoderLayer,
    Gemma4TextRotaryEmbedding,
    build_masks,
    decoder_layer_forward,
    set_attn_implementation,
)
from runner.config import load_config
from runner.errors import UserError
from runner.models.gemma4.pipeline import attention_shapes
from runner.models.gemma4.presets import gemma4_31b_config
from runner.models.gemma4.tiny import tiny_config
from runner.optim import matrix_group_count, param_groups
from runner.plan import (
    GIB,
    OVERHEAD_GIB,
    LayerShape,
    balanced_stage_layers,
    cluster_world_size,
    gemm_backward_bytes,
    layer_saved_bytes,
    make_plan,
    split_cost,
)

from conftest import ROOT, assert_one_line

RECIPES = {"tp4_pp2": ROOT / "recipes/gemma4_31b_tp4_pp2.yaml", "tp4_pp4_dp2": ROOT / "recipes/gemma4_31b_tp4_pp4_dp2.yaml",
           "tp2_pp2": ROOT / "recipes/gemma4_31b_tp2_pp2.yaml"}  # the last for 141 GB cards
# google/gemma-4-31B-it, counted by transformers on the meta device (tied head counted once)
PARAMS_31B = 31_273_086_512
VISION_31B = 569_548_080 + 6_193_152  # vision tower + embed_vision (the projector into the text width)


@pytest.fixture(scope="module")
def meta_31b() -> Gemma4ForConditionalGeneration:
    with torch.device("meta"):
        return Gemma4ForConditionalGeneration(gemma4_31b_config())


def test_31b_preset_matches_the_published_shape(meta_31b):
    assert sum(p.numel() for p in meta_31b.parameters()) == PARAMS_31B
    vision = meta_31b.model.vision_tower, meta_31b.model.embed_vision
    assert sum(p.numel() for m in vision for p in m.parameters()) == VISION_31B
    attn = meta_31b.model.language_model.layers[5].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj) == (32 * 512, 4 * 512, None)
    sliced = gemma4_31b_config(depth=12).text_config
    assert sliced.hidden_size == 5376 and sliced.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 2
    with pytest.raises(UserError, match="multiple of 6"):
        gemma4_31b_config(depth=10)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_31b_recipes_plan_like_deepspeed_partitions(name):
    cfg = load_config(RECIPES[name])
    plan = make_plan(cfg)  # on the recipe's cards (cluster.gpu_mem_gib)
    assert plan.gpu_mem_gib == (140 if name == "tp2_pp2" else 80)
    tp, pp, dp = cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.dp
    assert (plan.dims.tp, plan.dims.pp, plan.dims.dp) == (tp, pp, dp)
    assert plan.micro_batches >= 2 * pp  # enough micro-batches to fill the pipeline (bubble <= 27% at pp 4)
    assert cfg.train.micro_batch_size > 1  # short MedPix samples: micro 1 is weight-read bound (benchmarks/RESULTS.md, 2026-11-28)
    assert plan.total_params == PARAMS_31B
    # [vision, embedding, 60 decoder layers, final norm, head], cut by counting decoder layers
    weights = [0, 0] + [1] * 60 + [0, 0]
    parts = partition_balanced(weights=weights, num_parts=pp)
    assert [len(s.decoder_layers) for s in plan.stages] == [sum(weights[a:b]) for a, b in zip(parts, parts[1:])]
    assert [i for s in plan.stages for i in s.decoder_layers] == list(range(60))
    assert "vision" in plan.stages[0].holds and "head (tied)" in plan.stages[-1].holds
    assert [s.in_flight for s in plan.stages] == [pp - i for i in range(pp)]
    assert not plan.warnings, plan.table()


def test_stage_layers_split_the_decoder_unevenly():
    plan = make_plan(load_config(RECIPES["tp4_pp4_dp2"], ["parallel.stage_layers=[16,16,16,12]"]))
    assert [s.decoder_layers for s in plan.stages] == [list(range(a, b)) for a, b in [(0, 16), (16, 32), (32, 48), (48, 60)]]
    assert "vision" in plan.stages[0].holds and "head (tied)" in plan.stages[-1].holds
    assert plan.stages[-1].params < plan.stages[1].params  # 4 layers fewer, the head is the tied embedding's size
    for bad, words in [("[30,30]", ["2 entries", "parallel.pp=4"]), ("[20,20,20,0]", ["at least one", "60"])]:
        with pytest.raises(UserError) as err:
            make_plan(load_config(RECIPES["tp4_pp4_dp2"], [f"parallel.stage_layers={bad}"]))
        assert_one_line(str(err.value), words)


def test_balanced_stage_layers_is_the_best_contiguous_split():
    """Against brute force over every split with at least one layer per stage, with no, partial
    (train.recompute_num_layers: each stage's first 2) and full recompute."""
    gen = torch.Generator().manual_seed(0)
    for (n, pp), recompute in itertools.product([(6, 2), (7, 3), (9, 4), (5, 5)], [0, 2, 99]):
        cost = torch.rand(n, generator=gen).tolist()
        head = float(torch.rand(1, generator=gen)) * 3
        splits = [c for c in itertools.product(range(1, n + 1), repeat=pp) if sum(c) == n]
        best = min(max(split_cost(cost, head, c, recompute)) for c in splits)
        got = balanced_stage_layers(cost, head, pp, recompute)
        assert sum(got) == n and min(got) >= 1 and max(split_cost(cost, head, got, recompute)) == best, (n, pp, got)
    # a stage pays one more forward for each of its first `recompute` layers, and only those
    assert split_cost([1.0, 2.0, 4.0], 0.0, [3], 2) == [3 * 7 + 3] and split_cost([1.0, 2.0], 1.0, [1, 1], 0) == [3, 7]


def test_plan_suggests_a_split_that_unloads_the_head_stage():
    plan = make_plan(load_config(RECIPES["tp4_pp2"]))
    assert sum(plan.balanced_stage_layers) == 60 and plan.balanced_stage_layers[-1] < 30
    assert max(plan.balanced_stage_tflop) < max(plan.stage_tflop) and plan.stage_tflop[-1] > plan.stage_tflop[0]
    assert f"parallel.stage_layers: {plan.balanced_stage_layers}" in plan.table()


@pytest.mark.parametrize(
    "name,overrides", [("tp4_pp2", []), ("tp4_pp4_dp2", []), ("tp4_pp2", ["parallel.tp=8", "parallel.pp=1"])]
)
def test_params_per_gpu_add_up_to_the_model(meta_31b, name, overrides):
    """Sum over every GPU = the model + what is knowingly held more than once: replicated tensors
    (norms, vision) on every TP rank, KV heads replicated over tp / kv ranks, the tied head's copy."""
    plan = make_plan(load_config(RECIPES[name], overrides))
    tp, pp, dp = plan.dims.tp, plan.dims.pp, plan.dims.dp
    lm = meta_31b.model.language_model
    replicated = sum(p.numel() for m in (meta_31b.model.vision_tower, meta_31b.model.embed_vision) for p in m.parameters())
    replicated += sum(p.numel() for p in lm.parameters() if p.ndim == 1)
    kv_extra = 0
    for layer in lm.layers:
        attn = layer.self_attn
        kv_heads = attn.k_proj.out_features // attn.head_dim
        replicas = tp // kv_heads if kv_heads < tp else 1
        kv_weights = [attn.k_proj] + ([attn.v_proj] if attn.v_proj is not None else [])
        kv_extra += sum(m.weight.numel() for m in kv_weights) * (replicas - 1)
    tied_copy = lm.embed_tokens.weight.numel() if pp > 1 else 0
    expected = PARAMS_31B + (tp - 1) * replicated + kv_extra + tied_copy
    assert sum(s.params for s in plan.stages) * tp == expected
    assert plan.to_json()["params_all_gpus"] == expected * dp
    if tp == 8:
        assert kv_extra > 0  # the full layers' 4 KV heads, each on 2 TP ranks


def _saved_tensor_bytes(layer: torch.nn.Module, config, layer_idx: int, batch: int, seq: int) -> int:
    """Bytes autograd keeps for one forward of `layer` (storages counted once, weights excluded)."""
    tc = config.text_config
    x = torch.randn(batch, seq, tc.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(seq).repeat(batch, 1)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[-1, :5] = 0  # padding: both layer types get a mask, as with images in the batch
    masks = build_masks(config, x, attention_mask, pos, torch.zeros(batch, seq, dtype=torch.long))
    layer_type = tc.layer_types[layer_idx]
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    rope = Gemma4TextRotaryEmbedding(tc)(x, pos, layer_type)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        decoder_layer_forward(layer, x, rope, masks[layer_type], pos)
    weights = {p.untyped_storage().data_ptr() for p in layer.parameters()} | {x.untyped_storage().data_ptr()}
    return sum(n for ptr, n in saved.items() if ptr not in weights)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_layer_activation_formula_matches_autograd(attn):
    config = tiny_config()
    tc = config.text_config
    set_attn_implementation(tc, attn)
    torch.manual_seed(0)
    for layer_idx in (0, 5):  # sliding, full (head_dim 2x, one KV head, k_eq_v)
        layer = Gemma4TextDecoderLayer(tc, layer_idx).to(torch.bfloat16)
        q, kv, d = attention_shapes(tc)[tc.layer_types[layer_idx]]
        estimate = layer_saved_bytes(LayerShape(tc.hidden_size, q, kv, d, tc.intermediate_size), 2, 64, attn == "eager")
        measured = _saved_tensor_bytes(layer, config, layer_idx, 2, 64)
        assert estimate == pytest.approx(measured, rel=0.01), (attn, layer_idx)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-config")
    tiny_config().save_pretrained(out)  # plan reads config.json only
    return out


def test_tiny_model_memory_is_sane(tiny_dir):
    world_size, ds_config = cluster_world_size(str(ROOT / "accelerate_configs/cpu_4proc.yaml"))

    def plan(*overrides: str):
        cfg = load_config(ROOT / "recipes/tiny_demo.yaml", [f"model.path={tiny_dir}", *overrides])
        return make_plan(cfg, world_size=world_size, ds_config=ds_config)

    base = plan("train.activation_checkpointing=false")
    assert (base.dims.tp, base.dims.pp, base.dims.dp) == (2, 2, 1) and base.zero_stage == 0
    for s in base.stages:
        m = s.memory_gib
        assert m["weights"] == pytest.approx(s.params * 4 / GIB, abs=1e-3)  # fp32
        assert m["optimizer"] == pytest.approx(s.trainable_params * 8 / GIB, abs=1e-3)  # Adam m, v; no master
        assert m["zero_bucket"] == 0
        assert 0 < m["activations"] < 0.1
        assert m["total"] == pytest.approx(m["allocated"] + OVERHEAD_GIB, abs=1e-3)
    activations = lambda p: [s.memory_gib["activations"] for s in p.stages]  # noqa: E731
    longer = plan("train.activation_checkpointing=false", "data.max_length=1024")
    assert all(a < b for a, b in zip(activations(base), activations(longer)))
    checkpointed = plan("train.activation_checkpointing=true", "data.max_length=1024")
    assert all(a < b for a, b in zip(activations(checkpointed), activations(longer)))
    # train.recompute_num_layers: 0 keeps every layer's activations, 3 (all of a stage's) recomputes all
    recompute = lambda n: plan("train.activation_checkpointing=true", "data.max_length=1024",  # noqa: E731
                               f"train.recompute_num_layers={n}")
    assert activations(recompute(0)) == activations(longer) and activations(recompute(3)) == activations(checkpointed)
    assert all(a < b < c for a, b, c in zip(activations(checkpointed), activations(recompute(1)), activations(longer)))
    idle = plan("freeze.language_model=true", "freeze.embeddings=true", "parallel.tp=1")
    assert [w.split(" trains nothing")[0] for w in idle.warnings] == ["WARNING: stage 1"]
    fewer, every = (make_plan(load_config(RECIPES["tp4_pp2"], extra)).stage_tflop
                    for extra in (["train.recompute_num_layers=10"], []))
    assert all(a < b for a, b in zip(fewer, every))  # less recompute


def test_cli_warns_when_a_gpu_does_not_fit(capsys):
    recipe = str(RECIPES["tp4_pp2"])
    assert main(["plan", recipe]) == 0
    out, err = capsys.readouterr()
    assert "WARNING: stage" not in err
    assert "0-29 (30)" in out and "30-59 (30)" in out
    assert main(["plan", recipe, "--gpu-mem-gib", "40", "--json"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert not report["fits"] and [s["stage"] for s in report["stages"]] == [0, 1]
    assert report["max_total_gib_per_gpu"] == pytest.approx(report["max_gib_per_gpu"] + OVERHEAD_GIB, abs=1e-3)
    assert err.count("WARNING: stage") == 2
    assert "more than the card's 40 GiB (cluster.gpu_mem_gib, --gpu-mem-gib)" in err
    # without checkpointing, 4k tokens: the stored activations alone overflow 80 GiB
    assert main(["plan", recipe, "--set", "train.activation_checkpointing=false", "--set", "data.max_length=4096"]) == 0
    assert "WARNING: stage 0" in capsys.readouterr().err


def test_cli_plans_on_the_recipes_cards_unless_told_otherwise(capsys):
    """The 4x H200 recipe states its cards (cluster.gpu_mem_gib: 140): its plan fits them without a flag;
    --gpu-mem-gib and --set cluster.gpu_mem_gib override it."""
    recipe = str(RECIPES["tp2_pp2"])
    assert main(["plan", recipe]) == 0
    out, err = capsys.readouterr()
    assert "= 4 GPUs of 140 GiB" in out and "WARNING" not in err, err
    for override in (["--gpu-mem-gib", "80"], ["--set", "cluster.gpu_mem_gib=80"]):
        assert main(["plan", recipe, *override]) == 0
        out, err = capsys.readouterr()
        assert "= 4 GPUs of 80 GiB" in out and err.count("more than the card's 80 GiB") == 2, err
    assert main(["plan", recipe, "--set", "cluster.gpu_mem_gib=0"]) == 2
    assert_one_line(capsys.readouterr().err.strip(), ["cluster.gpu_mem_gib must be > 0"])


def test_plan_help_explains_every_column(capsys):
    recipe = str(RECIPES["tp4_pp2"])
    assert main(["plan", recipe]) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("stage"))
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    explained = set(re.findall(r"^  (\S+(?: \S+)?) {2,}", capsys.readouterr().out, re.MULTILINE))
    columns = [c.replace("_", " ") for c in header.replace("decoder layers", "decoder_layers").split()]
    assert len(columns) == 15 and [c for c in columns if c not in explained] == [], explained


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_docs_quote_the_plan_as_printed(capsys, name):
    """README.md and benchmarks/RESULTS.md quote `runner plan RECIPE` line for line (from its layout line to the
    compute line), so a change to the plan or a recipe that changes the figures shows here."""
    recipe = RECIPES[name].relative_to(ROOT)
    assert main(["plan", str(ROOT / recipe)]) == 0
    printed = capsys.readouterr().out.splitlines()
    quote = "\n".join([f"$ runner plan {recipe}", *printed[1:printed.index("", 3)]])  # to the blank before the note
    docs = ["benchmarks/RESULTS.md"] + (["README.md"] if name == "tp2_pp2" else [])
    for doc in docs:
        assert quote in (ROOT / doc).read_text(), (doc, quote)


def test_cli_resolves_dp_from_the_cluster_and_refuses_bad_input(capsys, tmp_path):
    recipe = str(RECIPES["tp4_pp4_dp2"])
    cluster = str(ROOT / "accelerate_configs/4x8_gpu.yaml")
    assert main(["plan", recipe, "--cluster", cluster, "--set", "parallel.dp=auto", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dims"] == {"tp": 4, "pp": 4, "dp": 2, "sequence_parallel": False, "ep": None,
                                                                 "world_size": 32}
    for args, message in [
        (["--set", "parallel.dp=auto"], "pass --cluster"),
        (["--set", f"model.path={tmp_path}/missing/model"], "neither a local model directory nor a hub id"),
        (["--cluster", str(ROOT / "accelerate_configs/1x8_gpu.yaml")], "make the product equal"),
        (["--set", "parallel.tp=3"], "not divisible by parallel.tp=3"),
    ]:
        assert main(["plan", recipe, *args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("immediate,grad_bytes", [(False, 6), (True, 4)])
def test_fp32_gradient_accumulation_counts_fp32_grads(tmp_path, immediate, grad_bytes):
    """bf16 with data_types.grad_accum_dtype fp32: fp32 gradients beside the bf16 ones (or instead of
    them with immediate_grad_update), no ZeRO bucket; the 31B at TP4 x PP2 still fits 80 GB cards."""
    base = json.loads((ROOT / "ds_configs/gpu_bf16_zero1.json").read_text())
    fp32 = {**base, "bf16": {"enabled": True, "immediate_grad_update": immediate}, "data_types": {"grad_accum_dtype": "fp32"},
            "communication_data_type": "fp32"}
    (tmp_path / "ds.json").write_text(json.dumps(fp32))
    cfg = load_config(RECIPES["tp4_pp2"])
    bf16_accum, fp32_accum = make_plan(cfg), make_plan(cfg, ds_config=str(tmp_path / "ds.json"))
    for a, b in zip(bf16_accum.stages, fp32_accum.stages):
        assert b.memory_gib["grads"] == pytest.approx(a.memory_gib["grads"] * grad_bytes / 2, abs=2e-3)  # GiB to 3 places
        assert b.memory_gib["zero_bucket"] == b.memory_gib["reduce"] == 0 < a.memory_gib["reduce"]
    assert fp32_accum.assumptions["grad_bytes_per_trainable_param"] == grad_bytes
    (tmp_path / "torch.json").write_text(json.dumps({**fp32, "data_types": {"grad_accum_dtype": "torch.float32"}}))
    spelled = make_plan(cfg, ds_config=str(tmp_path / "torch.json"))  # DeepSpeed takes this spelling too
    assert [s.memory_gib for s in spelled.stages] == [s.memory_gib for s in fp32_accum.stages]
    shipped = make_plan(cfg, ds_config=str(ROOT / "ds_configs/gpu_bf16_zero1_fp32_grads.json"))
    assert shipped.assumptions["grad_bytes_per_trainable_param"] == 4 and not shipped.warnings
    # reduced in bf16 (DeepSpeed's default), all gradients pass through one bf16 copy
    del fp32["communication_data_type"]
    (tmp_path / "ds.json").write_text(json.dumps(fp32))
    for s, st in zip(make_plan(cfg, ds_config=str(tmp_path / "ds.json")).stages, fp32_accum.stages):
        assert s.memory_gib["zero_bucket"] == pytest.approx(st.memory_gib["grads"] * 2 / grad_bytes, abs=2e-3)


def test_contiguous_gradients_counts_a_flat_copy_at_the_reduce(tmp_path):
    """DeepSpeed's ZeRO optimizer with contiguous_gradients (its default) reduces through a bucket
    held during backward, and after the last backward copies the partition's gradients into one flat
    buffer beside that bucket and one more (freed again by the step). Without it (the shipped config:
    the copy OOMed the full 31B at TP2 x PP2 on 4x H200) nothing is held during backward and the
    reduce flattens one bucket at a time."""
    base = json.loads((ROOT / "ds_configs/gpu_bf16_zero1.json").read_text())
    assert base["zero_optimization"]["contiguous_gradients"] is False
    on = {**base, "zero_optimization": {**base["zero_optimization"], "contiguous_gradients": True}}
    (tmp_path / "ds.json").write_text(json.dumps(on))
    cfg = load_config(RECIPES["tp4_pp2"])
    off_plan, on_plan = make_plan(cfg), make_plan(cfg, ds_config=str(tmp_path / "ds.json"))
    bucket = base["zero_optimization"]["reduce_bucket_size"] * 2 / GIB
    for off, with_copy in zip(off_plan.stages, on_plan.stages):
        a, b = off.memory_gib, with_copy.memory_gib
        assert a["zero_bucket"] == 0 and a["reduce"] == pytest.approx(bucket, abs=2e-3)
        assert b["zero_bucket"] == pytest.approx(bucket, abs=2e-3)
        assert b["reduce"] == pytest.approx(b["grads"] + 2 * bucket, abs=3e-3)
        for m in (a, b):
            assert m["allocated"] == pytest.approx(m["weights"] + m["grads"] + m["optimizer"] + max(
                m["zero_bucket"] + m["activations"], m["reduce"], m["step"]), abs=4e-3)


def test_zero_step_spike_counts_one_optimizer_group():
    """The ZeRO step turns one optimizer group's gradients into fp32 (6 bytes per parameter) after the
    activations are gone: with one group per pipeline layer the spike is one layer, and the peak is the
    larger of (bucket + activations) and it. No spike on the BF16 optimizer path (fp32 gradients kept)."""
    cfg = load_config(RECIPES["tp4_pp2"])
    plan = make_plan(cfg)
    for s in plan.stages:
        m = s.memory_gib
        mean_layer = s.trainable_params / len(s.decoder_layers)  # decoder layers hold nearly all of it
        assert 6 * 0.5 * mean_layer / GIB < m["step"] < 6 * 2 * mean_layer / GIB
        assert m["allocated"] == pytest.approx(m["weights"] + m["grads"] + m["optimizer"] + max(
            m["zero_bucket"] + m["activations"], m["reduce"], m["step"]), abs=4e-3)
    fp32 = make_plan(cfg, ds_config=str(ROOT / "ds_configs/gpu_bf16_zero1_fp32_grads.json"))
    assert all(s.memory_gib["step"] == 0 for s in fp32.stages)


def test_matrices_are_cut_into_equal_groups_of_at_least_one():
    """Every trainable matrix in exactly one of `chunks` non-empty groups, in model order and about
    equal in size; 1-D parameters in the no-decay group; no group is ever empty (DeepSpeed would drop
    it behind the LR scheduler's back)."""
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(7)], torch.nn.LayerNorm(8))
    model[6].weight.requires_grad_(False)
    for chunks, want in [(1, [6]), (2, [3, 3]), (4, [2, 1, 2, 1]), (6, [1] * 6), (9, [1] * 6)]:
        groups = param_groups(model, weight_decay=0.1, chunks=chunks)
        assert [len(g["params"]) for g in groups[:-1]] == want, chunks
        assert [p for g in groups[:-1] for p in g["params"]] == [model[i].weight for i in range(6)]
        assert groups[-1]["weight_decay"] == 0.0 and all(p.ndim == 1 for p in groups[-1]["params"])
        assert all(g["weight_decay"] == 0.1 for g in groups[:-1])
    for p in model.parameters():
        if p.ndim == 1:
            p.requires_grad_(False)
    no_norms = param_groups(model, weight_decay=0.1, chunks=3)  # no empty no-decay group
    assert [len(g["params"]) for g in no_norms] == [2, 2, 2] and all(g["weight_decay"] == 0.1 for g in no_norms)
    for p in model.parameters():
        p.requires_grad_(p.ndim == 1)
    only_norms = param_groups(model, weight_decay=0.1, chunks=3)  # no empty matrix group
    assert [(len(g["params"]), g["weight_decay"]) for g in only_norms] == [(9, 0.0)]
    assert matrix_group_count([3, 2, 4], layers_trained=True) == 2
    assert matrix_group_count([3, 2, 4], layers_trained=False) == 1


def test_plan_suggests_the_least_recompute_that_fits():
    """`least_recompute` is the fewest decoder layers per stage that must recompute for the plan to
    fit 90% of the card: the plan of that setting fits, one layer fewer does not, and it costs less
    compute than recomputing every layer."""
    recipe = RECIPES["tp4_pp2"]
    full = make_plan(load_config(recipe))
    least = full.least_recompute
    assert least is not None and 0 < least < 30, least
    total = lambda n: max(s.memory_gib["total"] for s in make_plan(  # noqa: E731
        load_config(recipe, [f"train.recompute_num_layers={n}"])).stages)
    assert total(least) <= 0.9 * 80 < total(least - 1)
    assert total(least) == pytest.approx(full.least_recompute_gib, abs=0.01)
    assert all(a < b for a, b in zip(full.least_recompute_tflop, full.stage_tflop))
    assert f"train.recompute_num_layers: {least}" in full.table()


def test_gemm_wide_head_backward_counts_its_scratch():
    """The GEMM backward (flex_attention's default, `model.wide_head_backward: auto`) adds its scratch (one row block of one KV head's group, and the
    fp32 dK/dV) to the working set of a stage whose peak is a full layer's backward, and nothing where
    the head's logits set the peak (the last stage)."""
    base = ["model.attn_implementation=flex_attention", "data.max_length=4224", "train.micro_batch_size=1"]
    flex = make_plan(load_config(RECIPES["tp2_pp2"], [*base, "model.wide_head_backward=flex"]), gpu_mem_gib=140)
    gemm = make_plan(load_config(RECIPES["tp2_pp2"], base), gpu_mem_gib=140)
    scratch = gemm_backward_bytes(LayerShape(5376, 16, 2, 512, 21504 // 2), 1, 4224) / 2**30  # 31B, TP2
    assert scratch == pytest.approx((12 * 8 * 528 * 4224 + 528 * 4224 + 4224**2 + 8 * 2 * 4224 * 512) / 2**30)  # 0.25
    first = [plan.stages[0].memory_gib["activations"] for plan in (flex, gemm)]
    assert first[1] - first[0] == pytest.approx(scratch, abs=0.01)
    assert gemm.stages[1].memory_gib == flex.stages[1].memory_gib
    assert "GEMM backward on wide heads" in gemm.table() and "GEMM" not in flex.table()


def test_sequence_parallel_slices_what_lies_between_blocks():
    """parallel.sequence_parallel at TP2: with every layer recomputed, a stage keeps only hidden states
    between blocks (each layer's input, the stage output) and DeepSpeed's p2p buffers; all are this
    rank's half of the sequence, so they halve exactly; the last stage's working set (the logits)
    does not."""
    base = ["model.attn_implementation=flex_attention", "data.max_length=4224", "data.pad_to_multiple_of=4224"]
    plain = make_plan(load_config(RECIPES["tp2_pp2"], base), gpu_mem_gib=140)
    sp = make_plan(load_config(RECIPES["tp2_pp2"], [*base, "parallel.sequence_parallel=true"]), gpu_mem_gib=140)
    for a, b in zip(plain.stages, sp.stages):
        for part in ("stored", "p2p_buffers"):
            assert b.activations_gib[part] == pytest.approx(a.activations_gib[part] / 2, abs=1e-3), part  # (rounded)
        assert b.memory_gib["total"] < a.memory_gib["total"]
    assert sp.stages[0].activations_gib["working_set"] < plain.stages[0].activations_gib["working_set"]
    assert "(sequence parallel)" in sp.table() and "(sequence parallel)" not in plain.table()
    with pytest.raises(UserError, match="pad_to_multiple_of to a multiple of 2"):
        load_config(RECIPES["tp2_pp2"], ["parallel.sequence_parallel=true", "data.pad_to_multiple_of=7"])
    with pytest.raises(UserError, match="padded up to data.max_length at most: set it to a multiple of 2"):
        load_config(RECIPES["tp2_pp2"], ["parallel.sequence_parallel=true", "data.max_length=1001"])
    load_config(RECIPES["tp2_pp2"], ["parallel.sequence_parallel=true", "data.max_length=1001", "data.buckets=[512,1024]"])


def test_a_packed_row_brings_the_images_it_can_hold_to_the_vision_tower():
    """Packed into 4096-token rows, one micro-batch row can bring up to 4096 // 280 = 14 of the 31B's images (280
    soft tokens each): what a trained vision tower adds to the first stage's stored activations is 14 images'
    worth per row where a padded sample adds one."""
    def vision_share(*sets: str) -> tuple[int, float]:
        stored = {}
        for frozen in ("true", "false"):
            plan = make_plan(load_config(RECIPES["tp2_pp2"], [*sets, f"freeze.vision_tower={frozen}"]), gpu_mem_gib=140)
            stored[frozen] = plan.stages[0].activations_gib["stored"]
        return plan.assumptions["images_per_row"], stored["false"] - stored["true"]

    padded = vision_share("train.micro_batch_size=1")
    packed = vision_share("train.micro_batch_size=1", "data.packing=true", "data.pack_length=4096")
    assert (padded[0], packed[0]) == (1, 14)
    assert padded[1] > 1 and packed[1] == pytest.approx(14 * padded[1], rel=1e-3), (padded, packed)


@pytest.mark.parametrize("patterns", [[], ["lora.rank_pattern={mlp.down_proj: 32, layers.7.self_attn.q_proj: 4, "
                                        "'vision_tower\\..*q_proj\\.linear': 2}", "lora.alpha_pattern={o_proj: 8}",
                                        "lora.vision_tower=true"]], ids=["uniform", "patterns-and-vision"])
def test_plan_of_a_lora_recipe_trains_exactly_peft_adapters(patterns):
    """The 31B LoRA recipe at tp 1 (and with PEFT's per-module ranks, vision tower adapters on): the plan's
    trainable parameters are what PEFT's get_peft_model makes trainable on transformers' 31B (built on the meta
    device) with the same LoraConfig; at tp 2 each GPU holds about half (A of column-parallel and B of row-parallel
    linears are whole on each)."""
    from peft import get_peft_model

    from runner.config import LORA_TARGETS
    from runner.lora import peft_config

    recipe = ROOT / "recipes" / "gemma4_31b_lora_1x1.yaml"
    plan = make_plan(load_config(recipe, patterns), world_size=1)
    with torch.device("meta"):
        model = Gemma4ForConditionalGeneration(gemma4_31b_config(60))
    cfg = load_config(recipe, patterns).lora
    assert cfg.target_modules == list(LORA_TARGETS)
    peft = get_peft_model(model, peft_config(cfg, "base"))
    assert plan.stages[0].trainable_params == sum(p.numel() for p in peft.parameters() if p.requires_grad)
    tp2 = make_plan(load_config(ROOT / "recipes" / "gemma4_31b_lora_tp2.yaml", patterns), world_size=2).stages[0]
    assert 0.5 < tp2.trainable_params / plan.stages[0].trainable_params < 0.75
    assert plan.stages[0].memory_gib["optimizer"] < 2 and plan.stages[0].memory_gib["grads"] < 0.5


def test_plan_proposes_the_smallest_layout_that_fits_the_card(capsys):
    """The 31B with LoRA fits one 141 GB H200 as its recipe says (no proposal); on 80 GiB cards the plan
    names the fewest GPUs that hold it — TP2 with sequence parallelism — and that layout's own plan fits
    while every 1-GPU layout does not."""
    from runner.plan import smallest_fitting_layout

    recipe = str(ROOT / "recipes" / "gemma4_31b_lora_1x1.yaml")
    assert main(["plan", recipe]) == 0
    out, err = capsys.readouterr()
    assert "= 1 GPUs of 140 GiB" in out and "WARNING" not in err and "smallest layout" not in err, err
    assert main(["plan", recipe, "--gpu-mem-gib", "80"]) == 0
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("smallest layout"))
    assert "{tp: 2, pp: 1, dp: 1, sequence_parallel: true} on 2 GPUs" in line, err
    proposed = smallest_fitting_layout(load_config(recipe), gpu_mem_gib=80)
    assert proposed.fits and proposed.dims.world_size == 2
    assert not make_plan(load_config(recipe), world_size=1, gpu_mem_gib=80).fits
