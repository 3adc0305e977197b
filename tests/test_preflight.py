"""Invariant 5 before the model is built: a bad output dir, model dir, data path, layout, resume
checkpoint or too little disk is one `error: ` line with exit code 2 from `runner train --check`
(launch.sh runs it before starting processes) and from `runner train` itself, printed once per job;
a user error inside the job makes `./launch.sh train` exit 2 too."""

from __future__ import annotations

import errno
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from runner.cli import main as cli
from runner.errors import UserError

from conftest import ROOT, assert_one_error_line, assert_one_line, free_port, run, torchrun_cmd

DEMO = ROOT / "recipes" / "tiny_demo.yaml"
SHARD = "model-00002-of-00004.safetensors"


@pytest.fixture(scope="module")
def medpix(tmp_path_factory) -> Path:
    from runner.data.synthetic import make_data

    return make_data(tmp_path_factory.mktemp("data") / "medpix", n=16, seed=0)


def _sets(model: Path, medpix: Path, out: Path, *extra: str) -> list[str]:
    pairs = [f"model.path={model}", f"data.train={medpix}", "data.eval=", f"output.dir={out}", "train.max_steps=1",
             "eval.every_steps=0", "checkpoint.every_steps=0", "checkpoint.export=false", "logging.tensorboard=false",
             "logging.progress_bar=false", *extra]
    return [a for p in pairs for a in ("--set", p)]


def _check(capsys, *args: str) -> SimpleNamespace:
    """`runner train DEMO --check ARGS` in this process: its exit code and stderr."""
    code = cli(["train", str(DEMO), "--check", *args])
    return SimpleNamespace(returncode=code, stderr=capsys.readouterr().err)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_ckpt, medpix) -> Path:
    """The output dir of a one-step, one-process run that saved a checkpoint at its end."""
    out = tmp_path_factory.mktemp("saved") / "out"
    sets = _sets(tiny_ckpt, medpix, out, "parallel.tp=1", "parallel.pp=1", "parallel.dp=1")
    run(["env", "RANK=0", "LOCAL_RANK=0", "WORLD_SIZE=1", "MASTER_ADDR=127.0.0.1", f"MASTER_PORT={free_port()}",
         sys.executable, "-m", "runner", "train", str(DEMO), *sets])
    return out


def _damaged_model(tiny_ckpt: Path, tmp_path: Path, damage: str) -> Path:
    model = Path(shutil.copytree(tiny_ckpt, tmp_path / "model"))
    if damage == "other-model-type":
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    elif damage == "no-tokenizer":
        (model / "tokenizer.json").unlink()
        (model / "tokenizer_config.json").unlink()
    elif damage == "truncated-shard":
        data = (model / SHARD).read_bytes()
        (model / SHARD).write_bytes(data[: len(data) - 1000])
    elif damage == "bad-header":
        (model / SHARD).write_bytes(b"\xff" * 64)
    return model


@pytest.mark.parametrize("damage,words", [
    ("other-model-type", ["config.json: model_type is 'llama'", "point model.path at a Gemma4 checkpoint"]),
    ("no-tokenizer", ["tokenizer/processor does not load", "tokenizer.json"]),
    ("truncated-shard", [SHARD, "the file holds", "re-download it"]),
    ("bad-header", [SHARD, "header length", "re-download it"]),
])
def test_a_damaged_model_dir_is_one_line(capsys, tmp_path, tiny_ckpt, medpix, damage, words):
    model = _damaged_model(tiny_ckpt, tmp_path, damage)
    assert_one_error_line(_check(capsys, *_sets(model, medpix, tmp_path / "out")), words)


@pytest.mark.parametrize("where,flags,extra,words", [
    ("file", [], [], ["output.dir", "is a file, not a directory"]),
    ("under-file", [], [], ["output.dir", "is a file, not a directory"]),
    ("out", [], ["data.train=/nonexistent/medpix"], ["/nonexistent/medpix"]),
    ("out", [], ["parallel.tp=3"], ["num_attention_heads=4", "parallel.tp=3"]),
    ("out", ["--world-size", "3"], [], ["3 processes cannot be split into tp*pp = 2*2"]),
])
def test_check_refuses_what_the_run_would(capsys, tmp_path, tiny_ckpt, medpix, where, flags, extra, words):
    (tmp_path / "file").write_text("not a directory")
    out = {"file": tmp_path / "file", "under-file": tmp_path / "file" / "out", "out": tmp_path / "out"}[where]
    assert_one_error_line(_check(capsys, *flags, *_sets(tiny_ckpt, medpix, out, *extra)), words)


@pytest.mark.parametrize("inside,words", [
    ("lock", ["is in use by another job", "use another output.dir"]),
    ("notes", ["export holds MY_NOTES.txt", "no end-of-run export wrote", "checkpoint.export: false"]),
])
def test_check_refuses_an_output_dir_in_use_or_an_export_it_would_delete(capsys, tmp_path, tiny_ckpt, medpix, inside,
                                                                         words):
    """Another job's lock, and files a user put in OUTPUT_DIR/export (which the end-of-run export replaces whole):
    one line before any process starts, nothing of theirs touched."""
    import os
    import socket

    out = tmp_path / "out"
    (out / "export").mkdir(parents=True)
    if inside == "lock":
        (out / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": "now"}))
    else:
        (out / "export" / "MY_NOTES.txt").write_text("mine")
    assert_one_error_line(_check(capsys, *_sets(tiny_ckpt, medpix, out, "checkpoint.export=true")), words)
    assert inside == "lock" or (out / "export" / "MY_NOTES.txt").read_text() == "mine"


def test_an_export_is_replaced_but_not_the_files_a_user_added(tmp_path, tiny_ckpt):
    """What an end-of-run export wrote (its record, or for an export from before records: a LoRA run's adapter/
    and merged/, a full run's weights and the source model's files) may be replaced; anything else is the user's."""
    from runner.checkpoint.export import EXPORT_RECORD, foreign_files

    full = tmp_path / "full"
    full.mkdir()
    for name in ("config.json", "tokenizer.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json"):
        (full / name).write_text("x")
    assert foreign_files(full, tiny_ckpt, lora=False) == []
    (full / "MY_NOTES.txt").write_text("mine")
    assert foreign_files(full, tiny_ckpt, lora=False) == ["MY_NOTES.txt"]
    lora = tmp_path / "lora"
    for name in ("adapter/adapter_config.json", "merged/config.json"):
        (lora / name).parent.mkdir(parents=True, exist_ok=True)
        (lora / name).write_text("{}")
    assert foreign_files(lora, tiny_ckpt, lora=True) == []
    assert foreign_files(lora, tiny_ckpt, lora=False) == ["adapter/adapter_config.json", "merged/config.json"]
    (lora / EXPORT_RECORD).write_text(json.dumps({"files": ["adapter/adapter_config.json"]}))
    assert foreign_files(lora, tiny_ckpt, lora=True) == ["merged/config.json"]


def test_too_little_disk_for_one_checkpoint(capsys, monkeypatch, tmp_path, tiny_ckpt, medpix):
    from runner import preflight

    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: SimpleNamespace(free=2**20))
    proc = _check(capsys, *_sets(tiny_ckpt, medpix, tmp_path / "out"))
    assert_one_error_line(proc, ["output.dir", "1.0 MiB free, one checkpoint needs about", "larger disk"])
    # a run that saves only on SIGTERM (no cadence, no save at the end: a benchmark) is not held to it
    proc = _check(capsys, *_sets(tiny_ckpt, medpix, tmp_path / "out"), "--set", "checkpoint.every_steps=0",
                  "--set", "checkpoint.at_end=false")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("installed, words", [
    ({"deepspeed": "0.19.2"}, ["deepspeed 0.19.2 is installed, older than the tested range", "divides the gradients",
                               "pip install 'deepspeed<0.20,>=0.19.8'"]),
    ({"transformers": "5.10.0"}, ["transformers 5.10.0 is installed, older than the tested range",
                                  "pip install 'transformers<5.26,>=5.17'"]),
    ({"peft": "0.17.0"}, ["peft 0.17.0 is installed, older than the tested range", "pip install 'peft<0.22,>=0.18'"]),
])
def test_a_library_below_its_tested_range_is_one_line(capsys, monkeypatch, tmp_path, tiny_ckpt, medpix, installed,
                                                      words):
    """Every command first reads the installed releases (metadata, no import): one below pyproject's range
    (DeepSpeed before 0.19.3 trains earlier pipeline stages on gradients divided by the accumulation steps
    twice; transformers 5.10 and PEFT 0.17 lack what the runner imports) is one line before anything loads."""
    import importlib.metadata

    proc = _check(capsys, *_sets(tiny_ckpt, medpix, tmp_path / "out"))
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: installed.get(name) or real(name))
    assert_one_error_line(_check(capsys, *_sets(tiny_ckpt, medpix, tmp_path / "out")), words)


def test_a_library_above_its_tested_range_is_one_warning(capsys, monkeypatch, tmp_path, tiny_ckpt, medpix):
    """A release newer than the range (e.g. after `pip install -U transformers`) may work: one warning line naming
    the range, and the command goes on; a torch build's local version (+cu130) is in range, a vendor's version
    string that is no release number is left alone."""
    import importlib.metadata

    real = importlib.metadata.version
    newer = {"transformers": "5.26.0", "torch": "2.14.1+cu130", "peft": "vendor-build"}  # not PEP 440: not compared
    monkeypatch.setattr(importlib.metadata, "version", lambda name: newer.get(name) or real(name))
    proc = _check(capsys, *_sets(tiny_ckpt, medpix, tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: transformers 5.26.0 is newer than the tested range <5.26,>=5.17; if something "
                        "fails, pip install 'transformers<5.26,>=5.17'"], proc.stderr


def test_a_save_records_every_file_size_and_the_estimate_is_close(saved, tiny_ckpt):
    from transformers import AutoConfig

    from runner.checkpoint.native import file_sizes, latest_complete, read_meta
    from runner.config import load_config
    from runner.preflight import checkpoint_bytes

    ckpt = latest_complete(saved / "checkpoints")
    recorded = read_meta(ckpt)["files"]
    assert recorded == file_sizes(ckpt) and any(name.startswith("layer_") for name in recorded)
    cfg = load_config(DEMO, [f"model.path={tiny_ckpt}"])
    estimate, actual = checkpoint_bytes(cfg, AutoConfig.from_pretrained(tiny_ckpt)), sum(recorded.values())
    assert 0.8 * actual < estimate < 1.25 * actual, (estimate, actual)


@pytest.mark.parametrize("damage,words", [
    ("latest-bytes", ["checkpoints/latest: cannot be read as text", "damaged"]),
    ("truncated-layer", ["layer_01-model_00-model_states.pt has 100 bytes, the save wrote", "damaged"]),
    ("empty-mp-rank-unrecorded", ["mp_rank_00_model_states.pt is empty", "damaged"]),
])
def test_a_damaged_resume_checkpoint_is_one_line(capsys, tmp_path, saved, tiny_ckpt, medpix, damage, words):
    out = Path(shutil.copytree(saved, tmp_path / "out"))
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text()
    if damage == "latest-bytes":
        (out / "checkpoints" / "latest").write_bytes(b"\x93\xff\x00\xfe garbage")
    elif damage == "truncated-layer":
        layer = ckpt / "layer_01-model_00-model_states.pt"
        layer.write_bytes(layer.read_bytes()[:100])
    else:  # a checkpoint saved before sizes were recorded
        meta = json.loads((ckpt / "runner_checkpoint.json").read_text())
        del meta["files"]
        (ckpt / "runner_checkpoint.json").write_text(json.dumps(meta))
        (ckpt / "mp_rank_00_model_states.pt").write_bytes(b"")
    sets = _sets(tiny_ckpt, medpix, out, "parallel.tp=1", "parallel.pp=1", "parallel.dp=1", "train.max_steps=2")
    assert_one_error_line(_check(capsys, *sets), words)


def test_a_resume_at_another_layout_is_refused_by_the_check(capsys, saved, tiny_ckpt, medpix):
    """`--check` compares the recipe's tp and pp with the checkpoint's before any process starts."""
    sets = _sets(tiny_ckpt, medpix, saved, "parallel.tp=2", "parallel.pp=1", "train.max_steps=2")
    assert_one_error_line(_check(capsys, *sets, "--world-size", "2"),
                          ["was saved at tp=1, pp=1 but this run uses tp=2, pp=1", "runner export"])


def test_a_resume_stats_each_checkpoint_file_once(monkeypatch, saved, tiny_ckpt, medpix):
    """The preflight's size check, its free-disk need and `check_resumable` before the model is built read
    each file's size once between them; a truncated file is still found (test above)."""
    from collections import Counter

    from runner.checkpoint import native
    from runner.config import load_config
    from runner.parallel.topology import ParallelDims
    from runner.preflight import preflight

    sets = _sets(tiny_ckpt, medpix, saved, "parallel.tp=1", "parallel.pp=1", "parallel.dp=1", "train.max_steps=2")
    cfg = load_config(DEMO, [s for s in sets if s != "--set"])
    ckpt = native.latest_complete(saved / "checkpoints")
    stats: Counter[str] = Counter()
    real_stat = Path.stat

    def counting_stat(self, *args, **kwargs):
        if self.parent == ckpt or self.parent.parent == ckpt:
            stats[self.relative_to(ckpt).as_posix()] += 1
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", counting_stat)
    checked = preflight(cfg, 1)
    native.check_resumable(checked.resume_from, ParallelDims(1, 1, 1), zero=False, sizes=checked.resume_sizes)
    files = native.read_meta(ckpt)["files"]
    assert checked.resume_from == ckpt and checked.resume_sizes == files
    assert {name: stats[name] for name in files} == dict.fromkeys(files, 1), stats


def test_running_out_of_disk_while_saving_is_one_line(tmp_path):
    from runner.checkpoint.native import _disk_full_is_one_line

    with pytest.raises(UserError) as err, _disk_full_is_one_line(tmp_path / "step_00000002.partial"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert_one_line(str(err.value), ["step_00000002.partial: the disk ran out of space", "checkpoint.resume=auto"])


def test_two_processes_print_the_line_once_before_building_the_model(tmp_path, tiny_ckpt, medpix):
    """`runner train` itself (not only --check) stops before the model is built: one line from one
    process, no worker traceback (the only one is torchrun's own report of the failed child)."""
    model = _damaged_model(tiny_ckpt, tmp_path, "truncated-shard")
    sets = _sets(model, medpix, tmp_path / "out", "parallel.tp=2", "parallel.pp=1", "parallel.dp=1")
    proc = run(torchrun_cmd(2, "-m", "runner", "train", str(DEMO), *sets), ok=False, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
    assert_one_line(errors[0], [SHARD, "the file holds"])
    assert proc.stderr.count("Traceback") == proc.stderr.count("raise ChildFailedError("), proc.stderr[-3000:]
    assert "training " not in proc.stdout


def test_launch_sh_exits_2_on_a_user_error(tmp_path, tiny_ckpt, medpix):
    """Before processes (--check with the cluster's process count) and inside the job (a dataset
    smaller than one global batch is found only once the processes exist): exit 2, one line."""
    sets = _sets(tiny_ckpt, medpix, tmp_path / "out")
    launch = ["env", f"PYTHON={sys.executable}", "./launch.sh", "train", str(DEMO), "--port", str(free_port())]
    proc = run(launch + ["--cluster", "accelerate_configs/cpu_2proc.yaml", *sets], ok=False, timeout=300)
    assert_one_error_line(proc, ["2 processes cannot be split into tp*pp = 2*2"])
    sets = _sets(tiny_ckpt, medpix, tmp_path / "out", "parallel.tp=1", "parallel.pp=1", "train.global_batch_size=32",
                 "train.micro_batch_size=1")
    proc = run(launch + ["--cluster", "accelerate_configs/cpu_1proc.yaml", *sets], ok=False, timeout=300)
    assert_one_error_line(proc, ["data.train: the dataset has", "samples, fewer than one global batch"])
