"""Checkpoints end to end on CPU processes: HF → TP×PP shards → HF export bit-identical; the tied
head on the last stage is the embedding, an untied head its own; exact resume in fresh processes
(invariant 4); a save that dies leaves `latest` on the last complete checkpoint (invariant 3);
keep-K; `runner export` of a trained checkpoint; another layout refused on resume with the fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText

from runner.checkpoint.hf_load import INDEX_NAME
from runner.checkpoint.native import latest_complete, resume
from runner.cli import main as cli
from runner.errors import UserError
from runner.models.gemma4.tiny import make_tiny
from runner.parallel.topology import ParallelDims

from conftest import assert_one_line, torchrun_worker
from synthetic import global_batch

EMBED = "model.language_model.embed_tokens.weight"
HEAD = "lm_head.weight"


def run_worker(ckpt: Path, layout: tuple[int, int, int], base: Path, *args: str) -> Path:
    (base / "out").mkdir(parents=True, exist_ok=True)
    torchrun_worker("checkpoint_worker.py", ckpt, layout, "--root", str(base / "root"), "--out", str(base / "out"),
                    *args)
    return base


def hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF checkpoint directory, as stored."""
    weight_map = json.loads((path / INDEX_NAME).read_text())["weight_map"]
    out = {}
    for name, fname in weight_map.items():
        with safe_open(path / fname, framework="pt") as f:
            out[name] = f.get_tensor(name)
    return out


def stage_files(out: Path, kind: str) -> list[dict[str, torch.Tensor]]:
    return [torch.load(p, weights_only=True) for p in sorted(out.glob(f"{kind}_stage*.pt"))]


def logits(path: Path) -> torch.Tensor:
    model = AutoModelForImageTextToText.from_pretrained(path, dtype="auto", attn_implementation="eager").eval()
    mb = global_batch(model.config, "image")[0]
    with torch.no_grad():
        return model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                     mm_token_type_ids=mb["mm_token_type_ids"], pixel_values=mb["pixel_values"].to(model.dtype),
                     image_position_ids=mb["image_position_ids"]).logits


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, tiny_ckpt) -> Path:
    """(2,2,1), fp32, tied: save at step 0 and export it at once, train to step 6 saving at 2 and 3, keep 2."""
    return run_worker(tiny_ckpt, (2, 2, 1), tmp_path_factory.mktemp("run_a"), "--steps", "6", "--save-at", "0,2,3",
                      "--keep", "2", "--export", str(tmp_path_factory.getbasetemp() / "run_a_export"))


@pytest.fixture(scope="module")
def run_b(tmp_path_factory, tiny_ckpt, run_a) -> Path:
    """Fresh processes resume from run A's latest (step 3) and train steps 4-6; at the save of step 6,
    rank 1 dies after writing its first file, which fails the job."""
    base = tmp_path_factory.mktemp("run_b")
    shutil.copytree(run_a / "root", base / "root")
    with pytest.raises(pytest.fail.Exception):
        run_worker(tiny_ckpt, (2, 2, 1), base, "--resume", "--steps", "6", "--save-at", "6", "--fail-save", "6:1")
    assert "step_00000006.partial" in (base / "out" / "injected_failure.txt").read_text(), "failed for another reason"
    return base


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny_bf16") / "gemma4-tiny", seed=0, dtype="bfloat16")


@pytest.fixture(scope="module")
def tiny_untied(tmp_path_factory, tiny_ckpt) -> Path:
    """The tiny checkpoint with tie_word_embeddings false and its own random lm_head.weight."""
    path = Path(shutil.copytree(tiny_ckpt, tmp_path_factory.mktemp("tiny_untied") / "gemma4-tiny"))
    config = json.loads((path / "config.json").read_text())
    config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = False
    (path / "config.json").write_text(json.dumps(config, indent=2))
    embed = hf_tensors(tiny_ckpt)[EMBED]
    save_file({HEAD: torch.randn(embed.shape, generator=torch.Generator().manual_seed(1)) * 0.25},
              path / "model-lm-head.safetensors", metadata={"format": "pt"})
    index = json.loads((path / INDEX_NAME).read_text())
    index["weight_map"][HEAD] = "model-lm-head.safetensors"
    (path / INDEX_NAME).write_text(json.dumps(index, indent=2))
    return path


@pytest.fixture(scope="module", params=["221-float32", "121-bfloat16", "121-untied"])
def loaded(request, tmp_path_factory) -> SimpleNamespace:
    """An HF checkpoint loaded at a layout, saved at step 0 and exported right away."""
    if request.param == "221-float32":
        base = request.getfixturevalue("run_a")
        return SimpleNamespace(source=request.getfixturevalue("tiny_ckpt"), out=base / "out",
                               export=tmp_path_factory.getbasetemp() / "run_a_export", tied=True)
    source = request.getfixturevalue("tiny_untied" if request.param.endswith("untied") else "tiny_bf16")
    base = tmp_path_factory.mktemp(request.param)
    run_worker(source, (1, 2, 1), base, "--save-at", "0", "--export", str(base / "export"))
    return SimpleNamespace(source=source, out=base / "out", export=base / "export", tied="untied" not in request.param)


def test_export_right_after_load_is_the_input(loaded):
    expected, got = hf_tensors(loaded.source), hf_tensors(loaded.export)
    assert (HEAD in got) == (not loaded.tied), "a tied export must have no lm_head.weight, an untied one its own"
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    copied = {f.name for f in loaded.source.iterdir() if not f.name.startswith("model")}
    assert copied <= {f.name for f in loaded.export.iterdir()}, "config/tokenizer/processor files not copied"
    assert torch.equal(logits(loaded.export), logits(loaded.source))


def test_last_stage_head_after_load(loaded):
    source = hf_tensors(loaded.source)
    first, last = stage_files(loaded.out, "load")
    if loaded.tied:  # the head on the last stage is the embedding, read from the embedding's bytes
        assert torch.equal(last[EMBED], source[EMBED].to(last[EMBED].dtype))
        assert torch.equal(last[EMBED], first[EMBED])
    else:
        assert EMBED not in last and torch.equal(last[HEAD], source[HEAD].to(last[HEAD].dtype))
        assert not torch.equal(last[HEAD], first[EMBED])


@pytest.mark.compat
def test_resume_in_fresh_processes_is_exact(run_a, run_b):
    unbroken = json.loads((run_a / "out" / "losses.json").read_text())
    resumed = json.loads((run_b / "out" / "losses.json").read_text())
    assert list(resumed) == ["4", "5", "6"]
    for step, loss in resumed.items():
        assert loss == unbroken[step], (step, loss, unbroken[step])


def test_tied_head_is_the_embedding_after_resume_and_training(run_a, run_b):
    for out, kind in ((run_b / "out", "resume"), (run_a / "out", "final")):
        first, last = stage_files(out, kind)
        assert torch.equal(first[EMBED], last[EMBED]), kind


def test_failed_save_leaves_latest_on_the_previous_checkpoint(run_b):
    root = run_b / "root"
    assert (root / "latest").read_text() == "step_00000003"
    assert latest_complete(root) == root / "step_00000003"
    assert (root / "step_00000006.partial").is_dir() and not (root / "step_00000006").exists()


def test_keeps_the_last_k_complete_checkpoints(run_a):
    assert sorted(p.name for p in (run_a / "root").iterdir()) == ["latest", "step_00000002", "step_00000003"]


def test_cli_export_of_a_trained_checkpoint(run_b, tmp_path, capsys):
    """`runner export ROOT OUT` with small shards: the export is exactly what a resume loaded."""
    out = tmp_path / "export"
    assert cli(["export", str(run_b / "root"), str(out), "--max-shard-size", "200KB"]) == 0
    got = hf_tensors(out)
    resumed = {k: v for stage in stage_files(run_b / "out", "resume") for k, v in stage.items()}
    assert HEAD not in got and got.keys() == resumed.keys()
    for name, tensor in resumed.items():
        assert torch.equal(got[name], tensor), name
    shards = set(json.loads((out / INDEX_NAME).read_text())["weight_map"].values())
    assert len(shards) > 3
    for shard in shards:
        with safe_open(out / shard, framework="pt") as f:
            assert (out / shard).stat().st_size <= 200_000 + 4096 or len(list(f.keys())) == 1, shard
    model, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    capsys.readouterr()
    assert cli(["export", str(run_b / "root"), str(out)]) == 2  # nothing exported is overwritten
    assert "already holds safetensors weights" in capsys.readouterr().err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == before


def _engine(dims: ParallelDims, split: list[int] | None = None) -> SimpleNamespace:
    """What `resume` reads of a DeepSpeed engine before it loads anything."""
    module = SimpleNamespace(ps=SimpleNamespace(dims=dims), stage_layer_counts=lambda: split)
    return SimpleNamespace(module=module, zero_optimization=lambda: False)


def test_resume_at_another_layout_is_refused_with_the_fix(run_a):
    with pytest.raises(UserError, match=r"saved at tp=2, pp=2 but this run uses tp=1, pp=2; resume at that layout, "
                                        r"or export it \(`runner export .*\), then train with model.path=OUT_DIR "
                                        r"and a new output.dir"):
        resume(_engine(ParallelDims(tp=1, pp=2, dp=1)), run_a / "root")


@pytest.mark.parametrize("saved_ep,run_ep,refused", [(2, 1, True), (None, 1, True), (2, None, False), (1, 1, False)])
def test_resume_with_another_expert_split_is_refused_with_the_fix(tmp_path, saved_ep, run_ep, refused):
    from runner.checkpoint.native import FORMAT, check_layout

    meta = {"format": FORMAT, "layout": {"tp": 2, "pp": 1, "dp": 1, "sequence_parallel": False, "ep": saved_ep}}
    dims = ParallelDims(tp=2, pp=1, dp=1, ep=run_ep)
    if not refused:  # unset ep is tp
        check_layout(tmp_path, meta, dims)
        return
    with pytest.raises(UserError, match=r"saved at parallel.ep=2 but this run uses parallel.ep=1 \(experts split "
                                        r"another way\); set parallel.ep: 2 to resume, or export it"):
        check_layout(tmp_path, meta, dims)


def test_resume_with_another_stage_split_is_refused_with_the_fix(run_a):
    with pytest.raises(UserError, match=r"saved with \[3, 3\] decoder layers per stage but this run splits \[5, 1\]; "
                                        r"set parallel.stage_layers: \[3, 3\]"):
        resume(_engine(ParallelDims(tp=2, pp=2, dp=1), [5, 1]), run_a / "root")


def test_resume_of_an_older_checkpoint_format_is_refused_with_the_fix(run_a, monkeypatch):
    from runner.checkpoint import native

    real = native.read_meta
    monkeypatch.setattr(native, "read_meta", lambda path: {**real(path), "format": 1})
    with pytest.raises(UserError, match=r"checkpoint format 1, this runner resumes format 2 .* export it \(`runner export"):
        resume(_engine(ParallelDims(tp=2, pp=2, dp=1), [3, 3]), run_a / "root")


@pytest.mark.parametrize("damage,words", [
    ("meta", ["runner_checkpoint.json: not valid JSON", "damaged"]),
    ("delete-layer", ["layer 4: 1 of 2 files missing", "damaged"]),
    ("delete-rng", ["rng/rank_00003.pt missing", "damaged"]),
    ("truncate-layer", ["layer_03-model_01-model_states.pt: cannot be read", "damaged"]),
])
def test_a_damaged_checkpoint_is_one_line_and_stays(run_a, tmp_path, capsys, damage, words):
    """Resume (before the model is built, and on load) and export name the damaged file in one line;
    nothing is deleted."""
    from runner.checkpoint.engine import read_file
    from runner.checkpoint.native import check_resumable

    root = Path(shutil.copytree(run_a / "root", tmp_path / "root"))
    ckpt = latest_complete(root)
    target = {"meta": ckpt / "runner_checkpoint.json", "delete-layer": ckpt / "layer_04-model_01-model_states.pt",
              "delete-rng": ckpt / "rng" / "rank_00003.pt",
              "truncate-layer": ckpt / "layer_03-model_01-model_states.pt"}[damage]
    if damage.startswith("delete"):
        target.unlink()
    else:
        target.write_bytes(target.read_bytes()[:100])
    files = sorted(p.relative_to(root) for p in root.rglob("*"))
    if damage == "truncate-layer":  # whole, but unreadable: found where it is loaded
        with pytest.raises(UserError) as err:
            read_file(target, weights_only=True)
    else:
        with pytest.raises(UserError) as err:
            check_resumable(ckpt, ParallelDims(tp=2, pp=2, dp=1), zero=False)
    assert_one_line(str(err.value), words)
    if damage != "delete-rng":  # export reads no RNG states
        assert cli(["export", str(root), str(tmp_path / "export")]) == 2
        assert_one_line(capsys.readouterr().err.removeprefix("error: ").strip(), words[-1:])
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == files
