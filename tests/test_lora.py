"""LoRA (invariant 7): the runner's adapters inside the TP linears are PEFT's LoRA on transformers' Gemma4 —
same loss and every adapter gradient at several layouts, base and tied embedding untouched — and they
travel in PEFT's format: init_from a PEFT adapter, export to one, merge as PEFT merges."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from test_checkpoint import hf_tensors, logits, run_worker, stage_files
from transformers import AutoModelForImageTextToText

from runner.checkpoint.native import latest_complete, read_meta
from runner.cli import main as cli
from runner.config import LoraConfig as RunLoraConfig, load_config
from runner.errors import UserError
from runner.lora import base_identity, check_lora_resume, init_adapter, load_adapter, peft_target_modules
from runner.models.gemma4.pipeline import PIPE_INPUT_KEYS
from runner.parallel.tensor_parallel import ColumnParallelLinear, LoraDropout, RowParallelLinear, mark_sharded

from conftest import ROOT, assert_one_line, run, torchrun, torchrun_cmd
from synthetic import global_batch
from test_parity import _assert_matches_transformers, _reference, _run

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_peft_adapter(ckpt: Path, out: Path, *, random_a: bool = True, seed: int = 7, **config) -> Path:
    """PEFT's LoRA on the model at `ckpt` (default r 4, alpha 8, every decoder linear), saved to `out` as PEFT
    saves it. B random (B = 0 would make A's gradient zero and the test compare zeros), A too with `random_a`."""
    config = {"r": 4, "lora_alpha": 8, "target_modules": peft_target_modules(TARGETS), **config}
    model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(**config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or (random_a and "lora_A" in name):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def peft_adapter(tiny_ckpt, tmp_path_factory) -> Path:
    return make_peft_adapter(tiny_ckpt, tmp_path_factory.mktemp("adapter") / "peft")


@pytest.fixture(scope="session")
def vision_adapter(tiny_ckpt, tmp_path_factory) -> Path:
    """As `peft_adapter`, with the vision encoder layers' linears adapted too (r 4, alpha 8, rsLoRA)."""
    return make_peft_adapter(tiny_ckpt, tmp_path_factory.mktemp("vision_adapter") / "peft", seed=11, r=4, lora_alpha=8,
                             use_rslora=True, target_modules=peft_target_modules(TARGETS, vision_tower=True))


# PEFT's per-module settings: every down_proj at rank 6 and one layer's q_proj at 2, the vision tower's v projections
# at 3; o_proj's alpha 3 and one up_proj's 20 (the rest r 4, alpha 8)
PATTERNS = dict(rank_pattern={"mlp.down_proj": 6, "layers.1.self_attn.q_proj": 2, r"vision_tower\..*v_proj\.linear": 3},
                alpha_pattern={"o_proj": 3, "layers.0.mlp.up_proj": 20})


@pytest.fixture(scope="session")
def pattern_adapter(tiny_ckpt, tmp_path_factory) -> Path:
    """As `vision_adapter`, with `PATTERNS` (no rsLoRA)."""
    return make_peft_adapter(tiny_ckpt, tmp_path_factory.mktemp("pattern_adapter") / "peft", seed=13,
                             target_modules=peft_target_modules(TARGETS, vision_tower=True), **PATTERNS)


@pytest.fixture(scope="session")
def model_with_adapter(request, tmp_path_factory) -> Callable[[str], tuple[Path, Path]]:
    """`like` (a `runner make-tiny --like` name) -> (its tiny checkpoint, a PEFT adapter on every decoder linear it
    has, as `make_peft_adapter` makes it); "31b" is `tiny_ckpt` with `peft_adapter`."""
    made: dict[str, tuple[Path, Path]] = {}

    def get(like: str) -> tuple[Path, Path]:
        if like == "31b":
            return request.getfixturevalue("tiny_ckpt"), request.getfixturevalue("peft_adapter")
        if like not in made:
            ckpt = request.getfixturevalue("tiny_like")(like)
            made[like] = ckpt, make_peft_adapter(ckpt, tmp_path_factory.mktemp(f"adapter-{like}") / "peft")
        return made[like]

    return get


SP, RECOMPUTE = ("--sequence-parallel",), ("--activation-checkpointing",)
LAYOUTS = [("31b", (1, 1, 1), ()), ("31b", (2, 1, 1), ()), ("31b", (1, 2, 1), ()), ("31b", (2, 2, 1), ()),
           ("31b", (1, 2, 2), ()), ("31b", (4, 1, 1), ()), pytest.param("31b", (2, 2, 1), SP, marks=pytest.mark.compat),
           ("31b", (2, 2, 1), SP + RECOMPUTE),
           # E2B: the KV-shared layers 3-5 have no k/v projections, so PEFT has no adapter there and neither has the
           # runner; at pp 2 they sit on stage 1 and the producers' (1, 2) adapted k/v on stage 0 get their gradient
           # back through the carried keys/values. The per-layer gate/projection are not of the seven names: frozen.
           ("e2b", (2, 2, 1), SP), ("e2b", (1, 2, 1), ())]


@pytest.mark.parametrize("like,layout,extra", LAYOUTS, ids=str)
def test_lora_loss_and_adapter_gradients_match_peft(tmp_path, model_with_adapter, like, layout, extra):
    """Text and image global batches; tp 4 replicates the KV heads (B's rows follow them); the worker checks
    the frozen base is bit-unchanged and gradient-free. Every adapter PEFT has gets the runner's gradient, and the
    runner has no adapter PEFT lacks."""
    ckpt, adapter = model_with_adapter(like)
    _assert_matches_transformers(tmp_path, ckpt, layout, extra, adapter=str(adapter))


@pytest.mark.parametrize("layout,extra", [((1, 1, 1), ()), ((2, 2, 1), SP)], ids=str)
def test_vision_tower_lora_matches_peft(tmp_path, tiny_ckpt, vision_adapter, layout, extra):
    """lora.vision_tower: adapters on the vision encoder layers' linears too (replicated on every TP rank of the
    first stage): loss and every adapter gradient, the vision tower's included, equal PEFT's."""
    from runner.lora import adopt_adapter_config

    cfg = adopt_adapter_config(RunLoraConfig(enabled=True, init_from=str(vision_adapter)), set(), "test")
    assert cfg.vision_tower and cfg.use_rslora and cfg.target_modules == TARGETS
    _assert_matches_transformers(tmp_path, tiny_ckpt, layout, extra, adapter=str(vision_adapter), vision=True)


@pytest.mark.parametrize("layout,extra", [((2, 1, 2), ()), ((2, 2, 1), SP)], ids=str)
def test_per_module_ranks_and_alphas_match_peft(tmp_path, tiny_ckpt, pattern_adapter, layout, extra):
    """PEFT's rank_pattern / alpha_pattern, as lora.init_from takes them from the adapter: each adapter at its own
    rank and scaling inside the TP linears (and the vision tower's); loss and every adapter gradient equal PEFT's."""
    from runner.lora import adopt_adapter_config

    cfg = adopt_adapter_config(RunLoraConfig(enabled=True, init_from=str(pattern_adapter)), set(), "test")
    assert (cfg.rank_pattern, cfg.alpha_pattern) == (PATTERNS["rank_pattern"], PATTERNS["alpha_pattern"])
    layer = "model.language_model.layers.{}."
    assert [cfg.rank_of(layer.format(i) + "self_attn.q_proj") for i in (0, 1)] == [4, 2]
    assert cfg.rank_of("model.vision_tower.encoder.layers.0.self_attn.v_proj.linear") == 3
    assert cfg.scaling_of(layer.format(0) + "mlp.up_proj") == 20 / 4
    assert cfg.scaling_of(layer.format(1) + "mlp.down_proj") == 8 / 6
    _assert_matches_transformers(tmp_path, tiny_ckpt, layout, extra, adapter=str(pattern_adapter), vision=True)


def test_lora_on_packed_rows_matches_peft_on_the_samples_one_by_one(tmp_path, tiny_ckpt, vision_adapter):
    """LoRA with data.packing (the MedPix LoRA use): two packed steps at (2, 2, 1) with sequence parallelism against
    PEFT on transformers running the same samples one by one, token-weighted: loss and every adapter gradient, the
    vision tower's included (it sees every image of a row at once)."""
    _assert_matches_transformers(tmp_path, tiny_ckpt, (2, 2, 1), SP, kinds="packed,packed2",
                                 ref_kinds="unpacked,unpacked", adapter=str(vision_adapter), vision=True)


DROPOUT_LAYOUTS = [((2, 2, 1), SP + RECOMPUTE, "peft_adapter"), ((2, 1, 2), (), "vision_adapter")]


@pytest.mark.parametrize("layout,extra,adapter", DROPOUT_LAYOUTS, ids=str)
def test_lora_dropout_matches_peft_under_the_same_masks(request, tmp_path, tiny_ckpt, layout, extra, adapter):
    """lora.dropout 0.25: PEFT's own lora_dropout, fed the masks the runner drew (full width, one per module and
    micro-batch; the vision tower's too), gives the runner's loss and adapter gradients: the dropout sits where
    PEFT's does and a TP shard drops its slice of one mask. The worker checks that both TP ranks drew each mask
    from one seed, that the recompute drew its forward's mask again, and that the DP replicas were seeded apart."""
    _assert_matches_transformers(tmp_path, tiny_ckpt, layout, extra, adapter=str(request.getfixturevalue(adapter)),
                                 dropout=0.25)


@pytest.mark.parametrize("kind", [ColumnParallelLinear, RowParallelLinear])
def test_lora_dropout_draws_the_masks_of_pefts_layer(kind):
    """At tp 1 the runner's adapter and PEFT's lora.Linear consume the same random stream: seeded alike, the
    same output bit for bit in training (dropout on the adapter input only), and the undropped one in eval."""
    gen = torch.Generator().manual_seed(0)
    ours = kind(16, 12, None)
    ours.add_lora(4, 2.0, 0.25)
    base = torch.nn.Linear(16, 12, bias=False)
    with torch.no_grad():
        for p in (ours.weight, ours.lora_A.weight, ours.lora_B.weight):
            p.copy_(torch.randn(p.shape, generator=gen))
        base.weight.copy_(ours.weight)
    holder = get_peft_model(torch.nn.ModuleDict({"proj": base}), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.25,
                                                                               target_modules=["proj"]))
    theirs = holder.base_model.model["proj"]
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora_A.weight)
        theirs.lora_B["default"].weight.copy_(ours.lora_B.weight)
    x = torch.randn(3, 5, 16, generator=gen)
    outs = []
    for model in (ours, theirs):
        torch.manual_seed(1)
        outs.append(model(x))
    assert torch.equal(outs[0], outs[1])
    undropped = x @ ours.weight.T + x @ ours.lora_A.weight.T @ ours.lora_B.weight.T * 2.0
    assert not torch.allclose(outs[0], undropped, atol=1e-3)
    ours.eval()
    theirs.eval()
    assert torch.allclose(ours(x), undropped, atol=1e-5) and torch.equal(ours(x), theirs(x))


def test_lora_dropout_of_a_column_shard_is_its_slice_of_the_whole_mask():
    """A row-parallel shard (columns 8-15 of 16) drops exactly the elements the unsharded input loses under the
    same seed, and about p of them: the tp-2 ranks together drop what tp 1 drops."""
    x = torch.randn(64, 32, 16)
    torch.manual_seed(3)
    whole = LoraDropout(0.25, 16)(x)
    torch.manual_seed(3)
    shard = LoraDropout(0.25, 16, slice(8, 16))(x[..., 8:])
    assert torch.equal(shard, whole[..., 8:])
    assert abs(float((whole == 0).float().mean()) - 0.25) < 0.02
    assert torch.allclose(whole[whole != 0], (x / 0.75)[whole != 0])


@pytest.mark.parametrize("ds_config", ["gpu_bf16_zero1.json", "gpu_bf16_zero1_fp32_grads.json"])
def test_lora_under_the_gpu_deepspeed_configs(tmp_path, tiny_ckpt, peft_adapter, ds_config):
    """bf16 under ZeRO-1 and the BF16 optimizer, TP2 x PP2 with sequence parallelism, two AdamW steps: the
    once-per-step sums of the adapters' partial gradients reach the optimizer (the worker checks the replicated
    adapter halves stay bit-identical over TP and the base does not move), and they and the losses are
    PEFT's fp32 ones up to bf16 noise (measured: norm ratio 0.974 / 0.977, cosine 0.987 / 0.988; a missing sum
    halves the column-parallel A gradients at tp 2)."""
    kinds = "image,text"
    stages = _run(tmp_path, tiny_ckpt, 2, 2, 1, kinds, 1e-3, extra=(*SP, "--lora", str(peft_adapter), "--ds-config",
                                                                    str(ROOT / "ds_configs" / ds_config)))
    ref = _reference(str(tiny_ckpt), kinds, 1e-3, str(peft_adapter))
    for got, want in zip(stages[-1]["losses"], ref["losses"]):
        assert abs(got - want) <= 2e-2 * abs(want), (got, want)
    sums = {name: g for stage in stages for name, g in stage["grads"][1].items()}
    assert any("q_proj.lora_A" in n for n in sums) and any("o_proj.lora_B" in n for n in sums), sorted(sums)
    got = torch.cat([g.double().flatten() for g in sums.values()])
    want = torch.cat([ref["grads"][1][n].double().flatten() for n in sums])
    ratio, cosine = float(got.norm() / want.norm()), float(torch.nn.functional.cosine_similarity(got, want, dim=0))
    print(f"{ds_config}: {len(sums)} summed adapter gradients, norm ratio {ratio:.4f}, cosine {cosine:.4f}")
    assert 0.95 <= ratio <= 1.05 and cosine >= 0.97, (ratio, cosine)


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, tiny_ckpt, peft_adapter) -> SimpleNamespace:
    """LoRA at (2,2,1) from the PEFT adapter: run A trains 4 steps saving at 2; run B resumes from it in fresh
    processes, trains steps 3-4 and saves at 4."""
    a = run_worker(tiny_ckpt, (2, 2, 1), tmp_path_factory.mktemp("lora_a"), "--steps", "4", "--save-at", "2",
                   "--lora", str(peft_adapter))
    b = tmp_path_factory.mktemp("lora_b")
    shutil.copytree(a / "root", b / "root")
    run_worker(tiny_ckpt, (2, 2, 1), b, "--resume", "--steps", "4", "--save-at", "4", "--lora", str(peft_adapter))
    return SimpleNamespace(a=a, b=b)


def test_lora_checkpoint_holds_only_adapters_and_the_base_identity(lora_runs, tiny_ckpt):
    ckpt = latest_complete(lora_runs.b / "root")
    meta = read_meta(ckpt)
    assert meta["lora"]["base"] == base_identity(tiny_ckpt, str(tiny_ckpt))
    assert meta["tensors"] and all(".lora_" in n or n.endswith("layer_scalar") for n in meta["tensors"])
    for f in ckpt.glob("layer_*-model_states.pt"):
        assert all(".lora_" in k or k == "layer_scalar" for k in torch.load(f, weights_only=True)), f
    # the optimizer of stage 0 (layers 0-2) holds Adam moments of exactly its adapters
    optim = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)["optimizer"]["state"]
    stage0 = [n for n in meta["tensors"] if ".lora_" in n and int(n.split(".layers.")[1].split(".")[0]) < 3]
    assert len(optim) == len(stage0) == 3 * 7 * 2, (len(optim), len(stage0))


def test_lora_resume_in_fresh_processes_is_exact(lora_runs):
    unbroken = json.loads((lora_runs.a / "out" / "losses.json").read_text())
    resumed = json.loads((lora_runs.b / "out" / "losses.json").read_text())
    assert list(resumed) == ["3", "4"] and all(resumed[s] == unbroken[s] for s in resumed), (resumed, unbroken)


def test_lora_training_leaves_the_base_and_tied_embedding_bit_unchanged(lora_runs, tiny_ckpt):
    base = hf_tensors(tiny_ckpt)
    final = {k: v for stage in stage_files(lora_runs.b / "out", "final") for k, v in stage.items()}
    for name, tensor in base.items():
        assert torch.equal(final[name], tensor), name
    assert any(".lora_" in n for n in final)


def _peft_model(tiny_ckpt: Path, adapter: Path):
    base = AutoModelForImageTextToText.from_pretrained(tiny_ckpt, dtype=torch.float32, attn_implementation="eager")
    return PeftModel.from_pretrained(base, adapter).eval()


def lora_run(request, like: str) -> tuple[Path, Path]:
    """(base checkpoint, a LoRA run's directory) for the model `like`: the 31B-like `lora_runs.b` (2,2,1); E2B-like
    (1,2,1), producers of the shared keys/values on stage 0, the KV-shared layers on stage 1: 2 steps, saved at 2."""
    if like == "31b":
        return request.getfixturevalue("tiny_ckpt"), request.getfixturevalue("lora_runs").b
    if like == "patterns":  # the 31B-like model with `pattern_adapter`: every adapter at its own rank and scaling
        ckpt, adapter = request.getfixturevalue("tiny_ckpt"), request.getfixturevalue("pattern_adapter")
    else:
        ckpt, adapter = request.getfixturevalue("model_with_adapter")(like)
    base = request.getfixturevalue("tmp_path_factory").mktemp(f"lora_{like}")
    return ckpt, run_worker(ckpt, (1, 2, 1), base, "--steps", "2", "--save-at", "2", "--lora", str(adapter))


@pytest.mark.parametrize("like", [pytest.param("31b", marks=pytest.mark.compat), "e2b", "patterns"])
def test_lora_export_is_a_peft_adapter_and_merge_equals_peft(request, like, tmp_path):
    """`runner export` writes what PeftModel loads unchanged (every trained adapter value, TP shards
    joined, PEFT's key names; on E2B none on the KV-shared layers' missing k/v projections; PEFT's rank_pattern and
    alpha_pattern); `--merge` equals PEFT's merge_and_unload and gives the adapter model's logits."""
    tiny_ckpt, run = lora_run(request, like)
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    assert cli(["export", str(run / "root"), str(adapter)]) == 0
    assert cli(["export", str(run / "root"), str(merged), "--merge"]) == 0
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert (saved["rank_pattern"], saved["alpha_pattern"]) == ((PATTERNS["rank_pattern"], PATTERNS["alpha_pattern"])
                                                              if like == "patterns" else ({}, {}))
    final = {k: v for stage in stage_files(run / "out", "final") for k, v in stage.items()}
    model = _peft_model(tiny_ckpt, adapter)
    loaded = {n.removeprefix("base_model.model.").replace(".default.", "."): p for n, p in model.named_parameters()
              if "lora_" in n}
    assert loaded.keys() == {n for n in final if ".lora_" in n}
    for name, p in loaded.items():
        assert torch.equal(p, final[name]), name
    ours, peft_merged = hf_tensors(merged), model.merge_and_unload().state_dict()
    assert ours.keys() == hf_tensors(tiny_ckpt).keys()
    # equal values differ by 0 (the E models' audio clip bounds are ±inf: inf - inf would be nan)
    worst = max(float((ours[n] - peft_merged[n]).abs().masked_fill(ours[n] == peft_merged[n], 0).max()) for n in ours)
    print(f"merged vs PEFT merge_and_unload: max abs diff {worst:.2e}")
    assert worst <= 1e-6
    with_adapter = _peft_model(tiny_ckpt, adapter)
    mb = global_batch(with_adapter.config, "image")[0]
    with torch.no_grad():
        want = with_adapter(**{k: mb[k] for k in PIPE_INPUT_KEYS}).logits
    got = logits(merged)
    print(f"merged logits vs PEFT adapter model: max abs diff {float((got - want).abs().max()):.2e}")
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


def test_lora_resume_and_export_refuse_another_base_or_kind(lora_runs, tiny_ckpt, tmp_path, capsys):
    ckpt = latest_complete(lora_runs.b / "root")
    meta = read_meta(ckpt)
    cfg = RunLoraConfig(**meta["lora"]["config"])
    check_lora_resume(meta, cfg, tiny_ckpt, str(tiny_ckpt), ckpt)
    other = Path(shutil.copytree(tiny_ckpt, tmp_path / "other"))
    (other / "config.json").write_text((other / "config.json").read_text().replace("}", ' }', 1))
    with pytest.raises(UserError) as err:
        check_lora_resume(meta, cfg, other, str(other), ckpt)
    assert_one_line(str(err.value), ["holds adapters for the base model", "model.path"])
    with pytest.raises(UserError) as err:
        check_lora_resume(meta, RunLoraConfig(), tiny_ckpt, str(tiny_ckpt), ckpt)
    assert_one_line(str(err.value), ["holds LoRA adapters", "lora.enabled: false"])
    assert cli(["export", str(ckpt), str(tmp_path / "export"), "--source", str(other)]) == 2
    assert_one_line(capsys.readouterr().err.removeprefix("error: ").strip(), ["adapters for the base", "--source"])


@pytest.mark.parametrize("change,words", [({"rank": 8}, ["was trained with lora.rank = 4"]),
                                          ({"rank_pattern": {"q_proj": 2}}, ["was trained with lora.rank_pattern = {}",
                                                                             "sets {'q_proj': 2}"])], ids=str)
def test_check_refuses_a_lora_resume_with_other_adapter_settings(lora_runs, tiny_ckpt, tmp_path, change, words):
    """The preflight (`runner train --check`, run by launch.sh before any process) compares the recipe's LoRA
    settings with the checkpoint's, as the run would."""
    from runner.preflight import resume_checkpoint

    root = lora_runs.b / "root"
    cfg = load_config(_lora_recipe(tmp_path), [f"checkpoint.resume={root}", "parallel.tp=2", "parallel.pp=2"])
    cfg.lora = RunLoraConfig(**{**read_meta(latest_complete(root))["lora"]["config"], **change})
    with pytest.raises(UserError) as err:
        resume_checkpoint(cfg, tmp_path / "checkpoints", tiny_ckpt)
    assert_one_line(str(err.value), [*words, "set it back to resume"])


def test_export_refuses_a_place_pruning_deletes_or_a_file_and_names_source_when_the_base_moved(lora_runs, tiny_ckpt,
                                                                                               tmp_path, capsys):
    ckpt = latest_complete(lora_runs.b / "root")
    (tmp_path / "file").write_text("x")
    moved = tmp_path / "checkpoints"
    shutil.copytree(lora_runs.b / "root", moved)
    meta = json.loads((moved / ckpt.name / "runner_checkpoint.json").read_text())
    meta["lora"]["base"]["path"] = str(tmp_path / "gone")
    (moved / ckpt.name / "runner_checkpoint.json").write_text(json.dumps(meta))
    for args, words in (([str(ckpt), str(ckpt / "adapter")], ["lies in the checkpoint folder", "export elsewhere"]),
                        ([str(ckpt.parent), str(tmp_path / "c")], []),  # a checkpoint root is an input, fine
                        ([str(ckpt), str(ckpt.parent)], ["is a checkpoints directory", "export elsewhere"]),
                        ([str(ckpt), str(ckpt.parent / "step_00000099")], ["lies in the checkpoint folder",
                                                                            "step_00000099", "pruning"]),
                        ([str(ckpt), str(tmp_path / "file" / "out")], ["is a file", "export into a directory"]),
                        ([str(ckpt), str(tmp_path / "a"), "--max-shard-size", "0"], ["shard size '0'", "above 0"]),
                        ([str(moved), str(tmp_path / "b")], [str(tmp_path / "gone"), "pass it with --source DIR"])):
        assert cli(["export", *args]) == (2 if words else 0), args
        if words:
            assert_one_line(capsys.readouterr().err.removeprefix("error: ").strip(), words)
    capsys.readouterr()
    assert not (ckpt / "adapter").exists() and not (tmp_path / "a").exists()
    assert not (ckpt.parent / "step_00000099").exists()
    assert cli(["export", str(moved), str(tmp_path / "b"), "--source", str(tiny_ckpt)]) == 0


def test_export_overwrites_no_file_of_the_users_and_a_failed_export_leaves_the_place_as_it_was(lora_runs, tmp_path,
                                                                                                 capsys, monkeypatch):
    from runner.checkpoint import export as export_module

    ckpt = latest_complete(lora_runs.b / "root")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "adapter_config.json").write_text("mine")
    assert cli(["export", str(ckpt), str(taken)]) == 2
    assert_one_line(capsys.readouterr().err.removeprefix("error: ").strip(),
                    ["already holds adapter_config.json", "would overwrite", "empty directory"])
    assert [(f.name, f.read_text()) for f in taken.iterdir()] == [("adapter_config.json", "mine")]
    beside = tmp_path / "beside"  # a file the export does not write stays, and the adapter goes in beside it
    beside.mkdir()
    (beside / "NOTES.txt").write_text("n")
    assert cli(["export", str(ckpt), str(beside)]) == 0
    assert {f.name for f in beside.iterdir()} == {"NOTES.txt", "adapter_config.json", "adapter_model.safetensors"}

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module.shutil, "copy", disk_full)  # after the merged weights are written
    with pytest.raises(OSError, match="No space"):
        export_module.export_hf(ckpt, tmp_path / "new" / "merged", merge=True)
    assert not (tmp_path / "new").exists()  # the folders the export created, removed with what it wrote
    with pytest.raises(OSError, match="No space"):
        export_module.export_hf(ckpt, beside / "merged", merge=True)
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "NOTES.txt").write_text("n")
    (kept / "mine").mkdir()
    with pytest.raises(OSError, match="No space"):
        export_module.export_hf(ckpt, kept, merge=True)
    assert sorted(f.name for f in kept.iterdir()) == ["NOTES.txt", "mine"] and not (beside / "merged").exists()


def test_lora_init_from_inside_the_export_it_would_replace_is_refused_by_the_check(tmp_path, tiny_ckpt, peft_adapter,
                                                                                  capsys):
    from runner.data.synthetic import make_data

    out = tmp_path / "out"
    adapter = Path(shutil.copytree(peft_adapter, out / "export" / "adapter"))
    files = [p.relative_to(out / "export").as_posix() for p in adapter.rglob("*")]
    (out / "export" / ".runner-export.json").write_text(json.dumps({"files": files}))  # as an end-of-run export
    sets = [f"model.path={tiny_ckpt}", f"data.train={make_data(tmp_path / 'data', n=8, seed=0)}",
            f"output.dir={out}", "checkpoint.export=true", "eval.every_steps=0"]
    assert cli(["train", str(_lora_recipe(tmp_path, init_from=str(adapter))), "--check",
                *[a for s in sets for a in ("--set", s)]]) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert_one_line(line, ["lora.init_from", "lies in", "checkpoint.export replaces", "copy the adapter elsewhere"])


def test_lora_recipe_trains_resumes_and_exports_both_forms(tmp_path, tiny_ckpt):
    """`runner train` on the tiny LoRA recipe at tp 2 with sequence parallelism, vision tower adapters on, the down
    projections at rank 12 and the o projections at alpha 4: 2 steps, then a continued run to step 3 (base from
    model.path, adapters and Adam moments from the checkpoint); export/adapter loads in PEFT (vision tower adapters
    trained, the patterns' ranks), export/merged in transformers, and they agree."""
    from runner.data.synthetic import make_data

    data = make_data(tmp_path / "data", n=16, seed=0)
    sets = [f"model.path={tiny_ckpt}", f"data.train={data}", f"data.eval={data}", f"output.dir={tmp_path / 'out'}",
            "parallel.tp=2", "parallel.pp=1", "parallel.sequence_parallel=true", "eval.every_steps=0",
            "logging.tensorboard=false", "train.global_batch_size=4", "checkpoint.every_steps=0",
            "lora.vision_tower=true", "lora.rank_pattern={mlp.down_proj: 12}", "lora.alpha_pattern={o_proj: 4}"]
    for steps in (2, 3):
        proc = torchrun(ROOT / "runner" / "__main__.py", 2, "train", str(ROOT / "recipes" / "tiny_lora_demo.yaml"),
                        *[a for s in [*sets, f"train.max_steps={steps}"] for a in ("--set", s)])
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3], lines
    export = tmp_path / "out" / "export"
    assert f"exported PEFT adapter to {export / 'adapter'} and merged HF model to {export / 'merged'}" in proc.stdout
    with_adapter = _peft_model(tiny_ckpt, export / "adapter")
    mb = global_batch(with_adapter.config, "image")[0]
    with torch.no_grad():
        want = with_adapter(**{k: mb[k] for k in PIPE_INPUT_KEYS}).logits
    assert torch.allclose(logits(export / "merged"), want, rtol=1e-4, atol=1e-4)
    trained = {n for n, p in with_adapter.named_parameters() if "lora_B" in n and p.any()}
    assert any(".vision_tower." in n for n in trained) and any(".language_model." in n for n in trained), trained
    ranks = {n: p.shape[0] for n, p in with_adapter.named_parameters() if "lora_A" in n}
    # PEFT matches a key at the module name's end: the vision tower's `….mlp.down_proj.linear` keeps rank 8
    assert all(r == (12 if n.endswith("mlp.down_proj.lora_A.default.weight") else 8) for n, r in ranks.items()), ranks


def test_lora_init_is_peft_default_and_the_same_at_every_layout():
    """B zeros; A Kaiming-uniform as PEFT draws it (bound 1/sqrt(in)), drawn whole from (seed, module name), so
    a TP shard is exactly its slice of the tp-1 adapter."""
    cfg = RunLoraConfig(enabled=True, rank=4)
    whole = RowParallelLinear(16, 8, None)
    whole.add_lora(cfg.rank, cfg.scaling_of("model.language_model.layers.0.mlp.down_proj"), 0.0)
    init_adapter("model.language_model.layers.0.mlp.down_proj", whole, cfg, seed=42)
    a = whole.lora_A.weight
    assert not whole.lora_B.weight.any() and a.std() > 0 and a.abs().max() <= 1 / 16**0.5
    for rank in range(2):
        shard = torch.nn.Parameter(torch.empty(4, 8))
        mark_sharded(shard, 1, 2, rank)
        holder = SimpleNamespace(lora_A=SimpleNamespace(weight=shard))
        init_adapter("model.language_model.layers.0.mlp.down_proj", holder, cfg, seed=42)
        assert torch.equal(shard, a[:, rank * 8:(rank + 1) * 8])
    gaussian = RunLoraConfig(enabled=True, rank=4, init="gaussian", rank_pattern={"down_proj": 64})  # PEFT: N(0, 1/r)
    wide = RowParallelLinear(4096, 8, None)
    wide.add_lora(64, gaussian.scaling_of("x.down_proj"), 0.0)
    init_adapter("model.language_model.layers.0.mlp.down_proj", wide, gaussian, seed=42)
    assert abs(float(wide.lora_A.weight.std()) * 64 - 1) < 0.02


def _lora_recipe(tmp_path: Path, **lora) -> Path:
    recipe = tmp_path / "lora.yaml"
    recipe.write_text(json.dumps({"data": {"train": "x"}, "lora": {"enabled": True, **lora}}))
    return recipe


def test_lora_init_from_takes_the_adapters_settings(tmp_path, tiny_ckpt, peft_adapter):
    """As PeftModel.from_pretrained: r, lora_alpha, use_rslora, lora_dropout from adapter_config.json, the targets
    from the decoder linears its weights adapt; a recipe's own lora.dropout wins, equal values may be restated."""
    small = make_peft_adapter(tiny_ckpt, tmp_path / "small", random_a=False, seed=11, r=2, lora_alpha=3,
                              use_rslora=True, lora_dropout=0.1, target_modules=peft_target_modules(["q_proj", "v_proj"]))
    cfg = load_config(_lora_recipe(tmp_path, init_from=str(small))).lora
    assert (cfg.rank, cfg.alpha, cfg.use_rslora, cfg.dropout, cfg.target_modules) == (2, 3, True, 0.1, ["q_proj", "v_proj"])
    assert cfg.scaling_of("model.language_model.layers.0.self_attn.q_proj") == 3 / 2**0.5
    cfg = load_config(_lora_recipe(tmp_path, init_from=str(small), rank=2, dropout=0.3,
                                   target_modules=["v_proj", "q_proj"])).lora
    assert (cfg.rank, cfg.dropout, cfg.use_rslora) == (2, 0.3, True)
    cfg = load_config(_lora_recipe(tmp_path, init_from=str(peft_adapter))).lora
    assert (cfg.rank, cfg.alpha, cfg.use_rslora, cfg.dropout, cfg.target_modules) == (4, 8, False, 0.0, TARGETS)


def test_lora_init_from_needs_lora_enabled(tmp_path, peft_adapter):
    """An adapter to continue in a recipe that trains every weight is a mistake, not a silent full fine-tune."""
    recipe = tmp_path / "full.yaml"
    recipe.write_text(json.dumps({"data": {"train": "x"}, "lora": {"init_from": str(peft_adapter)}}))
    with pytest.raises(UserError) as err:
        load_config(recipe)
    assert_one_line(str(err.value), ["lora.init_from", "lora.enabled is false", "set lora.enabled: true"])


@pytest.mark.parametrize("override,words", [
    ("lora.rank=8", ["lora.init_from", "r = 4", "lora.rank: 8", "remove lora.rank"]),
    ("lora.alpha=16", ["lora_alpha = 8", "lora.alpha: 16"]),
    ("lora.use_rslora=true", ["use_rslora = False", "lora.use_rslora: True"]),
    ("lora.target_modules=[q_proj]", ["target_modules = ['q_proj', 'k_proj'", "remove lora.target_modules"]),
])
def test_lora_init_from_refuses_a_recipe_that_sets_other_values(tmp_path, peft_adapter, override, words):
    with pytest.raises(UserError) as err:
        load_config(_lora_recipe(tmp_path, init_from=str(peft_adapter)), [override])
    assert_one_line(str(err.value), words)


@pytest.mark.parametrize("config,words", [
    (dict(target_modules=r".*vision_tower.*\.q_proj\.linear"), ["['q_proj'] in the vision tower but [] in the "
                                                                  "decoder", "continue it with PEFT"]),
    (dict(target_modules=r".*vision_tower\.patch_embedder\.input_proj"), ["vision_tower.patch_embedder.input_proj",
                                                                          "continue it with PEFT"]),
    (dict(target_modules=peft_target_modules(["q_proj"]), use_dora=True), ["DoRA", "continue it with PEFT"]),
    (dict(target_modules=peft_target_modules(["q_proj"]), modules_to_save=["lm_head"]), ["modules_to_save"]),
])
def test_lora_init_from_refuses_adapters_it_cannot_continue(tmp_path, tiny_ckpt, config, words):
    adapter = make_peft_adapter(tiny_ckpt, tmp_path / "adapter", random_a=False, seed=11, r=4, **config)
    with pytest.raises(UserError) as err:
        load_config(_lora_recipe(tmp_path, init_from=str(adapter)))
    assert_one_line(str(err.value), ["lora.init_from", *words])


def test_lora_init_from_refuses_an_adapter_on_the_per_layer_linears(tmp_path, tiny_like):
    """E2B's per-layer gate and projection are not among PEFT's seven attention/MLP names, so neither PEFT nor the
    runner adapts them by default; an adapter naming them is refused in one line, not half loaded."""
    adapter = make_peft_adapter(tiny_like("e2b"), tmp_path / "adapter", random_a=False, target_modules=(
        r".*\.language_model\.layers\.\d+\.(per_layer_input_gate|per_layer_projection|self_attn\.q_proj)"))
    with pytest.raises(UserError) as err:
        load_config(_lora_recipe(tmp_path, init_from=str(adapter)))
    assert_one_line(str(err.value), ["lora.init_from", ".per_layer_", "continue it with PEFT"])


def _damaged_adapter(adapter: Path, out: Path, damage: str) -> Path:
    out = Path(shutil.copytree(adapter, out))
    weights, config = out / "adapter_model.safetensors", out / "adapter_config.json"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:7])
    elif damage == "no-weights":
        save_file({}, weights)
    elif damage == "weights-of-another-rank":
        save_file({k: (v[:2] if ".lora_A." in k else v[:, :2]).contiguous() for k, v in load_file(weights).items()}, weights)
    else:  # r or a pattern's value written as another value
        key, value = {"r0": ("r", 0), "r-string": ("r", "4"), "pattern-rank0": ("rank_pattern", {"q_proj": 0}),
                      "pattern-regex": ("alpha_pattern", {"q_proj[": 2}), "pattern-list": ("rank_pattern", ["q_proj"])
                      }[damage]
        config.write_text(json.dumps({**json.loads(config.read_text()), key: value}))
    return out


@pytest.mark.parametrize("damage,words", [
    ("truncated", ["readable adapter_model.safetensors", "PeftModel.save_pretrained"]),
    ("no-weights", ["holds no LoRA weights"]),
    ("weights-of-another-rank", ["has shape [2, ", "r = 4", "different adapters"]),
    ("r0", ["r = 0", "an integer >= 1"]),
    ("r-string", ["r = '4'", "an integer >= 1"]),
    ("pattern-rank0", ["adapter_config.json's rank_pattern['q_proj'] = 0 must be an integer >= 1"]),
    ("pattern-regex", ["adapter_config.json's alpha_pattern key 'q_proj['", "not a regular expression"]),
    ("pattern-list", ["adapter_config.json's rank_pattern = ['q_proj'] must be a mapping"]),
])
def test_a_damaged_adapter_to_continue_is_one_line_when_the_recipe_loads(tmp_path, peft_adapter, damage, words):
    """Caught with the recipe (so by `--check`, before any process starts), not as a traceback inside the run."""
    adapter = _damaged_adapter(peft_adapter, tmp_path / "adapter", damage)
    with pytest.raises(UserError) as err:
        load_config(_lora_recipe(tmp_path, init_from=str(adapter)))
    assert_one_line(str(err.value), ["lora.init_from", *words])


def test_an_adapter_missing_a_stages_layer_is_one_line_for_the_job(tmp_path, tiny_ckpt, peft_adapter):
    """Found while the adapters load, by the two TP ranks of the stage that holds that layer only (tp 2, pp 2):
    every rank raises the same line (one_error_for_the_job), printed once; the other stage does not wait."""
    from runner.data.synthetic import make_data

    adapter = Path(shutil.copytree(peft_adapter, tmp_path / "adapter"))
    weights = adapter / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if ".layers.1." not in k}, weights)
    sets = [f"model.path={tiny_ckpt}", f"data.train={make_data(tmp_path / 'data', n=8, seed=0)}", "data.eval=",
            f"output.dir={tmp_path / 'out'}", "parallel.tp=2", "parallel.pp=2", "train.max_steps=1",
            "eval.every_steps=0", "checkpoint.export=false"]
    proc = run(torchrun_cmd(4, "-m", "runner", "train", str(_lora_recipe(tmp_path, init_from=str(adapter))),
                            *[a for s in sets for a in ("--set", s)]), ok=False, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
    assert_one_line(errors[0], ["lora.init_from", "layers.1.", "the adapter does not adapt"])


def test_an_adapter_with_nan_weights_is_one_line(tmp_path, peft_adapter):
    """Not loaded into the run (where the guard would stop at the first step and blame the learning rate)."""
    adapter = Path(shutil.copytree(peft_adapter, tmp_path / "adapter"))
    weights, name = adapter / "adapter_model.safetensors", "model.language_model.layers.0.self_attn.q_proj"
    tensors = load_file(weights)
    tensors[f"base_model.model.{name}.lora_B.weight"][0, 0] = float("nan")
    save_file(tensors, weights)
    rank, in_features = tensors[f"base_model.model.{name}.lora_A.weight"].shape
    linear = ColumnParallelLinear(in_features, tensors[f"base_model.model.{name}.lora_B.weight"].shape[0], None)
    linear.add_lora(rank, 2.0, 0.0)
    with pytest.raises(UserError) as err:
        load_adapter([(name, linear)], RunLoraConfig(enabled=True, rank=rank, alpha=8, init_from=str(adapter)))
    assert_one_line(str(err.value), ["lora.init_from", "q_proj.lora_B.weight holds NaN or infinite values"])


def test_lora_init_from_an_adapter_of_another_rank_is_one_line(peft_adapter):
    with pytest.raises(UserError) as err:
        load_adapter([], RunLoraConfig(enabled=True, rank=8, alpha=8, init_from=str(peft_adapter)))
    assert_one_line(str(err.value), ["lora.init_from", "lora.rank = 4", "set lora.rank: 4"])


@pytest.mark.parametrize("override,words", [
    ("lora.target_modules=[q_proj, qkv]", ["lora.target_modules", "q_proj, k_proj"]),
    ("lora.rank=0", ["lora.rank must be >= 1"]),
    ("lora.alpha=0", ["lora.alpha = 0.0 must be > 0"]),
    ("lora.init_from=/nonexistent/adapter", ["lora.init_from", "PEFT adapter directory"]),
    ("lora.rank_pattern={mlp.down_proj: 0}", ["lora.rank_pattern['mlp.down_proj'] = 0 must be an integer >= 1"]),
    ("lora.rank_pattern={mlp.down_proj: 2.5}", ["lora.rank_pattern['mlp.down_proj'] = 2.5", "expected int"]),
    ("lora.alpha_pattern={'(o_proj': 4}", ["lora.alpha_pattern key '(o_proj'", "not a regular expression"]),
    ("lora.rank_pattern=[mlp.down_proj]", ["lora.rank_pattern", "must be a mapping of str to int"]),
    ("lora.rank_pattern.mlp.down_proj=4", ["lora.rank_pattern['mlp']",
                                           "--set 'lora.rank_pattern={mlp.down_proj: …}'"]),
])
def test_lora_recipe_errors_are_one_line(override, words):
    with pytest.raises(UserError) as err:
        load_config(ROOT / "recipes" / "tiny_lora_demo.yaml", ["data.train=x", override])
    assert_one_line(str(err.value), words)


@pytest.mark.parametrize("lora,words", [
    (["lora.rank_pattern={down_prj: 8}"], ["lora.rank_pattern key 'down_prj' matches none", "fix the key"]),
    (["lora.target_modules=[q_proj]", "lora.alpha_pattern={mlp.down_proj: 4}"],
     ["lora.alpha_pattern key 'mlp.down_proj' matches none"]),
    (["lora.rank_pattern={layers.99.mlp.down_proj: 8}"], ["'layers.99.mlp.down_proj' matches none"]),
    # layer 5 is a full-attention layer with attention_k_eq_v: it has no v_proj to adapt
    (["lora.rank_pattern={layers.5.self_attn.v_proj: 8}"], ["'layers.5.self_attn.v_proj' matches none"]),
    (["lora.rank_pattern={linear: 8}"], ["'linear' matches none", "vision tower", "set lora.vision_tower: true"]),
    (["lora.alpha_pattern={o_proj: 32, layers.0.self_attn.o_proj: 2}"],
     ["keys 'o_proj' and 'layers.0.self_attn.o_proj' both match model.language_model.layers.0.self_attn.o_proj",
      "sorted", "disjoint"]),
])
def test_pattern_keys_that_match_no_linear_or_overlap_are_one_line(tiny_ckpt, lora, words):
    """PEFT skips a rank_pattern / alpha_pattern key that names no adapted module (a typo would train the default
    rank silently), and saves overlapping keys sorted (the saved adapter would not be the trained one): `--check` and
    `runner plan` refuse both. Keys that match disjoint linears, or overlap with one value, are accepted."""
    from runner.plan import make_plan
    from runner.preflight import model_checks

    recipe, base = ROOT / "recipes" / "tiny_lora_demo.yaml", ["data.train=x", f"model.path={tiny_ckpt}"]
    good = [*base, "lora.rank_pattern={mlp.down_proj: 8, layers.1.self_attn.q_proj: 2, layers.1.mlp.down_proj: 8}",
            "lora.alpha_pattern={o_proj: 4}"]
    model_checks(load_config(recipe, good), tiny_ckpt)
    for check in (lambda cfg: model_checks(cfg, tiny_ckpt), lambda cfg: make_plan(cfg, world_size=4)):
        with pytest.raises(UserError) as err:
            check(load_config(recipe, [*base, *lora]))
        assert_one_line(str(err.value), words)
