"""`runner train` end to end on CPU: the same step under three layouts and both launchers, and one
clear line for configs that cannot run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import (
    ROOT,
    TESTS,
    assert_one_error_line,
    assert_one_line,
    free_port,
    run,
    subprocess_env,
    torchrun,
    torchrun_cmd,
)

DEMO = ROOT / "recipes" / "tiny_demo.yaml"
TRAIN = ["-m", "runner", "train", str(DEMO)]


@pytest.fixture(scope="module")
def medpix(tmp_path_factory) -> Path:
    from runner.data.synthetic import make_data

    return make_data(tmp_path_factory.mktemp("data") / "medpix", n=64, seed=0)


def _sets(tiny_ckpt: Path, medpix: Path, out: Path, *extra: str) -> list[str]:
    pairs = [f"model.path={tiny_ckpt}", f"data.train={medpix}", f"data.eval={medpix}", f"output.dir={out}",
             "train.max_steps=1", "eval.every_steps=0", "checkpoint.every_steps=0", "checkpoint.export=false",
             "logging.tensorboard=false", *extra]
    return [a for p in pairs for a in ("--set", p)]


def _single_process() -> list[str]:
    """`runner train` as one process without a launcher: the rank variables a launcher would set."""
    return ["env", "RANK=0", "LOCAL_RANK=0", "WORLD_SIZE=1", "MASTER_ADDR=127.0.0.1", f"MASTER_PORT={free_port()}",
            sys.executable, *TRAIN]


ONE_BATCH_OF_4 = ("parallel.tp=1", "parallel.pp=1", "parallel.dp=1", "train.micro_batch_size=4",
                  "train.global_batch_size=4")


def _vqa_table(path: Path, good: int, bad: int) -> Path:
    """A MedPix-VQA parquet of `good` rows, then `bad` ones (empty answers, long questions: length
    grouping puts them together)."""
    import io

    import datasets
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (40, 32), (120, 30, 200)).save(png, format="PNG")
    features = datasets.Features({"image_id": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    rows = {"image_id": [{"bytes": png.getvalue(), "path": None}] * (good + bad),
            "question": ["What is shown?"] * good + ["word " * 150] * bad,
            "answer": ["A square."] * good + [""] * bad}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return path


def _first_step(out: Path) -> dict:
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])


@pytest.mark.compat
def test_same_first_step_for_every_layout_and_launcher(tmp_path, tiny_ckpt, medpix):
    """(1,1,1) under torchrun, (2,2,1) with sequence parallelism under accelerate launch, (1,2,2) under
    the deepspeed launcher: one global batch, so loss and grad norm must agree."""
    runs = {
        (1, 1, 1): torchrun_cmd(1, *TRAIN),
        (2, 2, 1): [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    "accelerate_configs/cpu_4proc.yaml", "--main_process_port", str(free_port()), *TRAIN],
        (1, 2, 2): ["./launch.sh", "train", str(DEMO), "--launcher", "deepspeed", "--port", str(free_port())],
    }
    firsts = {}
    for (tp, pp, dp), cmd in runs.items():
        out = tmp_path / f"run_{tp}{pp}{dp}"
        profile = "logging.profile_step=1" if tp * pp * dp == 1 else "logging.profile_step=0"
        sp = f"parallel.sequence_parallel={tp > 1}"
        proc = run(cmd + _sets(tiny_ckpt, medpix, out, f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.dp={dp}",
                               profile, sp))
        assert ("with sequence parallelism" in proc.stdout) == (tp > 1)
        firsts[(tp, pp, dp)] = _first_step(out)
    profiled = tmp_path / "run_111"  # the profiled step is the same step, with its reports beside it
    assert "train_batch" in (profiled / "profile_rank0_python.txt").read_text()
    assert "aten::" in (profiled / "profile_rank0.txt").read_text()
    base = firsts[(1, 1, 1)]
    for layout, rec in firsts.items():
        for key in ("loss", "grad_norm"):
            assert abs(rec[key] - base[key]) <= 1e-5 * abs(base[key]), (layout, key, rec[key], base[key])
        assert rec["label_tokens"] == base["label_tokens"]
        for key in ("step", "loss", "grad_norm", "lr", "tokens_per_sec_per_gpu", "mem_gib"):
            assert key in rec


@pytest.mark.parametrize(
    "extra,words",
    [
        (["parallel.tp=2", "parallel.dp=1"], ["parallel.tp*pp*dp = 2*2*1 = 4", "1 processes"]),
        (["parallel.pp=7"], ["parallel.pp=7", "6 decoder layers"]),
        (["parallel.tp=3"], ["num_attention_heads=4", "parallel.tp=3"]),
        (["data.train=/nonexistent/medpix"], ["/nonexistent/medpix"]),
        (["model.attn_implementation=flex_attention"], ["flex_attention needs CUDA GPUs", "use sdpa"]),
        (["parallel.stage_layers=[4,1]"], ["parallel.stage_layers=[4, 1]", "sum to the model's 6", "[3, 3]"]),
        (["parallel.tp=1", "parallel.pp=1", "parallel.dp=1", "train.global_batch_size=128"],
         ["data.train: the dataset has 64 samples, fewer than one global batch"]),
    ],
)
def test_runtime_config_errors_are_one_line(tmp_path, tiny_ckpt, medpix, extra, words):
    proc = run(_single_process() + _sets(tiny_ckpt, medpix, tmp_path / "out", *extra), ok=False)
    assert_one_error_line(proc, words)


@pytest.mark.parametrize("layout,extra", [
    ((1, 1, 1), ()),  # 6 samples in micro-batches of 2 under a global batch of 8: 2, 2, 2 and an empty one
    ((1, 2, 2), ("train.micro_batch_size=4", "data.eval_split=validation[:2]")),  # DP rank 1 gets only an empty one
    # sequence parallelism; micro-batches of 4, 2, 0 and 0 samples
    ((2, 1, 1), ("train.micro_batch_size=4", "train.global_batch_size=16", "parallel.sequence_parallel=true")),
], ids=str)
def test_eval_is_transformers_loss_over_the_whole_split(tmp_path, tiny_ckpt, medpix, layout, extra):
    """`eval.max_batches: 0` evaluates every sample of the split, its last partial global batch too
    (micro-batches with fewer samples or none): the loss and label count are transformers'
    token-weighted loss of the checkpoint over the split (lr 1e-30: step 1 moves no fp32 weight)."""
    import torch
    from transformers import AutoProcessor

    from runner.config import load_config
    from runner.data.collate import Gemma4Collator
    from runner.data.sources import load_source

    from reference import global_loss, load_reference

    tp, pp, dp = layout
    out = tmp_path / "out"
    sets = _sets(tiny_ckpt, medpix, out, f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.dp={dp}",
                 "eval.every_steps=1", "eval.max_batches=0", "optim.lr=1e-30", "logging.profile_step=0", *extra)
    run((_single_process() if tp * pp * dp == 1 else torchrun_cmd(tp * pp * dp, *TRAIN)) + sets)
    rows = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    [evaluated] = [r for r in rows if r.get("split") == "eval"]

    data = load_config(DEMO, [s for s in sets if s != "--set"]).data
    collator = Gemma4Collator(AutoProcessor.from_pretrained(tiny_ckpt), max_length=data.max_length)
    source = load_source(str(medpix), data.eval_split)
    samples = [collator.collate([collator.encode(source[i])]) for i in range(len(source))]
    with torch.no_grad():
        expected = float(global_loss(load_reference(str(tiny_ckpt)), samples))
    assert evaluated["label_tokens"] == sum(int((s["labels"][:, 1:] != -100).sum()) for s in samples)
    assert abs(evaluated["loss"] - expected) <= 1e-5 * expected, (evaluated, expected)


def test_a_global_batch_of_bad_samples_is_skipped_not_fatal(tmp_path, tiny_ckpt, medpix):
    """data.on_bad_sample: skip also covers a global batch whose samples are all bad: no update, the
    next one takes the step. Length grouping puts the 4 bad rows (empty answers, long questions) in
    one global batch of 4 in every epoch. Data with nothing but bad samples stops after an epoch."""
    out = tmp_path / "half"
    proc = run(_single_process() + _sets(tiny_ckpt, medpix, out, *ONE_BATCH_OF_4, "train.max_steps=2",
                                         f"data.train={_vqa_table(tmp_path / 'half.parquet', 4, 4)}"))
    assert "every sample of this global batch was skipped as bad; no update" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["label_tokens"] > 0 for r in rows)
    proc = run(_single_process() + _sets(tiny_ckpt, medpix, tmp_path / "bad", *ONE_BATCH_OF_4,
                                         f"data.train={_vqa_table(tmp_path / 'bad.parquet', 0, 8)}"), ok=False)
    assert_one_error_line(proc, ["a whole epoch of global batches had no label tokens", "skipped as bad"])


def test_epochs_count_global_batches_whose_samples_were_all_skipped(tmp_path, tiny_ckpt, medpix):
    """`train.epochs: 1` ends when the sampler has delivered one epoch of global batches, not after
    steps_per_epoch optimizer steps: the 4 bad rows fill epoch 0's second global batch (seed 42, length
    grouping), which takes no step, so the run takes one step and ends there, its end checkpoint holding
    the epoch's end as data position. Nothing but bad samples is one line after that epoch."""
    import torch

    out = tmp_path / "epoch"
    epoch = (*ONE_BATCH_OF_4, "train.max_steps=0", "train.epochs=1")
    run(_single_process() + _sets(tiny_ckpt, medpix, out, *epoch,
                                  f"data.train={_vqa_table(tmp_path / 'half.parquet', 4, 4)}"))
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    [end] = (out / "checkpoints").glob("step_*")
    client = torch.load(end / "mp_rank_00_model_states.pt", weights_only=False)["runner"]
    assert end.name == "step_00000001" and client["step"] == 1
    data = client["data"]
    assert (data["epoch"], data["position"], data["skipped"]) == (0, 2, {"empty answer": 4})
    proc = run(_single_process() + _sets(tiny_ckpt, medpix, tmp_path / "bad", *epoch,
                                         f"data.train={_vqa_table(tmp_path / 'bad.parquet', 0, 8)}"), ok=False)
    assert_one_error_line(proc, ["a whole epoch of global batches had no label tokens", "skipped as bad"])


def test_a_whole_epoch_of_empty_global_batches_is_one_that_holds_every_batch_of_an_epoch():
    """A run of empty global batches is fatal only when it holds every batch of some epoch: an epoch's
    last batches and the next epoch's first ones, as many as an epoch has, are not all the data."""
    from types import SimpleNamespace

    from runner.train import spans_an_epoch

    def spans(delivered: int, empty_in_a_row: int) -> bool:
        loader = SimpleNamespace(steps_delivered=delivered, sampler=SimpleNamespace(steps_per_epoch=3))
        return spans_an_epoch(loader, empty_in_a_row)

    assert spans(3, 3) and spans(7, 4) and spans(9, 6)
    assert not spans(2, 2) and not spans(5, 3) and not spans(7, 3) and not spans(8, 4)


def test_freeze_settings_that_leave_a_stage_too_little_to_train(tmp_path, tiny_ckpt, medpix):
    """A frozen language model at pp=2. On the fp32 path each stage trains what it holds (the
    embedding, its tied head copy). Under DeepSpeed ZeRO every stage needs the same number of
    optimizer groups (it all-reduces each group's norm over the stages): with a trainable vision
    tower stage 0 has norms to spare from decay and stage 1 (the head only) has not, so every rank
    stops with the same line instead of hanging or crashing in DeepSpeed. At pp=3 the middle stage
    trains nothing: one line too. An error of every process is printed once (rank 0, or before the
    process group exists each node's local rank 0), e.g. a bad recipe value."""
    frozen = ("parallel.tp=1", "parallel.dp=1", "train.global_batch_size=4", "freeze.language_model=true",
              "freeze.embeddings=false")
    run(torchrun_cmd(2, *TRAIN) + _sets(tiny_ckpt, medpix, tmp_path / "fp32", *frozen, "parallel.pp=2"))
    zero = ["--ds-config", str(ROOT / "ds_configs" / "gpu_bf16_zero1.json")]
    for nproc, extra, words in [
        (2, zero + _sets(tiny_ckpt, medpix, tmp_path / "zero", *frozen, "parallel.pp=2", "model.dtype=bfloat16",
                         "freeze.vision_tower=false"), ["same number of optimizer groups", "[2, 1]"]),
        (3, _sets(tiny_ckpt, medpix, tmp_path / "pp3", *frozen, "parallel.pp=3"), ["pipeline stage 1 trains nothing"]),
        (2, _sets(tiny_ckpt, medpix, tmp_path / "bad", "train.grad_clip=-1"), ["train.grad_clip must be >= 0"]),
        (2, _sets(tiny_ckpt, medpix, tmp_path / "world", "parallel.tp=1", "parallel.pp=1", "parallel.dp=1"),
         ["parallel.tp*pp*dp = 1*1*1 = 1", "2 processes"]),
    ]:
        proc = run(torchrun_cmd(nproc, *TRAIN, *extra), ok=False)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
        assert_one_line(errors[0], words)


@pytest.mark.compat
def test_sigterm_leaves_a_complete_resumable_checkpoint(tmp_path, tiny_ckpt, medpix):
    """SIGTERM (as a scheduler sends it to every process) finishes the step, saves, exits 0; the next
    run resumes from that step."""
    import signal
    import time

    import psutil

    from runner.checkpoint.native import latest_complete

    out = tmp_path / "run"
    cmd = torchrun_cmd(4, *TRAIN) + _sets(tiny_ckpt, medpix, out, "train.max_steps=100")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, "training did not reach step 2"
        time.sleep(0.5)
    for child in psutil.Process(proc.pid).children(recursive=True):
        child.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-4000:]
    ckpt = latest_complete(out / "checkpoints")
    assert ckpt is not None and "SIGTERM: saved" in log
    stopped = int(ckpt.name.split("_")[-1])
    assert stopped >= 2 and not list((out / "checkpoints").glob("*.partial"))
    run(cmd[:-2] + ["--set", f"train.max_steps={stopped + 1}"])
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps[-1] == stopped + 1 and steps.count(stopped + 1) == 1


def test_a_finished_run_continues_and_an_earlier_one_is_never_overwritten(tmp_path, tiny_ckpt, medpix):
    """A finished run with checkpoint.export continues to more steps (resume: auto) and its export is
    replaced; checkpoint.resume=none in an output.dir that holds checkpoints, or a train.max_steps below
    the checkpoint's step, is refused with one line and leaves them as they were."""
    out = tmp_path / "out"
    one = _sets(tiny_ckpt, medpix, out, "parallel.tp=1", "parallel.pp=1", "parallel.dp=1", "checkpoint.export=true")
    run(_single_process() + one)
    first = (out / "export" / "model.safetensors.index.json").stat().st_mtime_ns
    run(_single_process() + one + ["--set", "train.max_steps=2"])
    assert (out / "export" / "model.safetensors.index.json").stat().st_mtime_ns != first
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_00000001", "step_00000002"]
    assert not list(tmp_path.glob("out/export.*"))
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (out / "checkpoints").rglob("*"))
    proc = run(_single_process() + one + ["--set", "checkpoint.resume=none"], ok=False)
    assert_one_error_line(proc, ["holds an earlier run's checkpoints", "checkpoint.resume=auto", "new output.dir"])
    for check in (["--check"], []):  # a checkpoint past the run's last step: --check sees it, and the run, unbuilt
        proc = run(_single_process() + one + ["--set", "train.max_steps=1", *check], ok=False)
        assert_one_error_line(proc, ["step_00000002 is at step 2", "past this run's 1 steps", "train.max_steps"])
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (out / "checkpoints").rglob("*")) == before


@pytest.mark.parametrize("ds_config", ["gpu_bf16_zero1_fp32_grads.json", "gpu_bf16_zero1.json"])
def test_bf16_deepspeed_configs_train_at_tp_and_pp(tmp_path, tiny_ckpt, medpix, ds_config):
    """Both GPU DeepSpeed configs — the BF16 optimizer (fp32 gradients accumulated as each
    micro-batch's backward ends) and ZeRO-1 with bf16 accumulation (several optimizer groups per
    stage, whose norms it all-reduces across stages) — train at tp=2, pp=2 with the tied embedding
    trainable, and the first step is the single-process bf16 step up to bf16 rounding (the tiny
    model's bf16 and fp32 grad norms differ by ~10%, so fp32 is not the yardstick here; between the
    two bf16 layouts the loss agrees to 1% and the grad norm to 3% — 1.8% measured with torch 2.14,
    Pillow 13 — while a missing or doubled partial-gradient sum moves it by tens of percent)."""
    config = ["--ds-config", str(ROOT / "ds_configs" / ds_config)]
    one, tp_pp = tmp_path / "one", tmp_path / "tp_pp"
    run(_single_process() + config
        + _sets(tiny_ckpt, medpix, one, "parallel.tp=1", "parallel.pp=1", "parallel.dp=1", "model.dtype=bfloat16"))
    run(torchrun_cmd(4, *TRAIN, *config)
        + _sets(tiny_ckpt, medpix, tp_pp, "parallel.tp=2", "parallel.pp=2", "parallel.dp=1", "model.dtype=bfloat16"))
    want, got = _first_step(one), _first_step(tp_pp)
    for key, rtol in (("loss", 1e-2), ("grad_norm", 3e-2)):
        assert abs(got[key] - want[key]) <= rtol * want[key], (key, got[key], want[key])


@pytest.mark.parametrize("config,fp32_grads", [("gpu_bf16_zero1_fp32_grads.json", True), ("gpu_bf16_zero1.json", False)])
def test_which_deepspeed_config_accumulates_gradients_in_fp32(tmp_path, config, fp32_grads):
    """The fp32-grads config hands the optimizer gradients with more than bf16 precision (accumulated
    and reduced in fp32); the default ZeRO-1 config hands it bf16-accumulated ones."""
    out = tmp_path / "result.json"
    torchrun(TESTS / "grad_accum_worker.py", 1, "--ds-config", str(ROOT / "ds_configs" / config), "--out", str(out))
    result = json.loads(out.read_text())
    assert result["finer_than_bf16"], result
    assert all(result["finer_than_bf16"]) if fp32_grads else not any(result["finer_than_bf16"]), result


def test_expandable_segments_unless_the_user_chose_an_allocator_setting(monkeypatch):
    """runner train asks PyTorch for expandable segments (the full 31B OOMed with 8-11 GiB fragmented
    without them); an allocator setting of the user's own, under either variable name, wins."""
    import os

    from runner.train import use_expandable_segments

    for env, want in [({}, "expandable_segments:True"),
                      ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:64"}, "max_split_size_mb:64"),
                      ({"PYTORCH_ALLOC_CONF": "max_split_size_mb:64"}, None)]:
        for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        use_expandable_segments()
        assert os.environ.get("PYTORCH_CUDA_ALLOC_CONF") == want, env


def test_quiet_by_default_and_everything_under_verbose(tmp_path, tiny_ckpt, medpix):
    """A 2-process run (pp=2: both processes read the same samples) over 8 good and 4 bad rows: one
    line per bad sample and one epoch summary, no DeepSpeed INFO logging or prints, no torch warning
    about the tied-weight broadcast, and a last line saying the run finished. `--verbose` keeps all
    of it: DeepSpeed's INFO lines, its topology print, the torch warning, each process's lines."""
    sets = ("parallel.tp=1", "parallel.pp=2", "parallel.dp=1", "train.micro_batch_size=2", "train.global_batch_size=4",
            "train.max_steps=0", "train.epochs=1", f"data.train={_vqa_table(tmp_path / 'half.parquet', 8, 4)}")
    proc = run(torchrun_cmd(2, *TRAIN) + _sets(tiny_ckpt, medpix, tmp_path / "quiet", *sets))
    log = proc.stdout + proc.stderr
    bad = [line for line in log.splitlines() if line.startswith("skipping bad sample")]
    assert len(bad) == len(set(bad)) == 4 and all("empty answer" in line for line in bad), log[-3000:]
    summaries = [line for line in log.splitlines() if line.startswith("data.train epoch 0: ")]
    assert summaries == ["data.train epoch 0: skipped 4 of 12 samples as bad (empty answer 4)"], log[-3000:]
    for noise in ("[INFO]", "Using topology", "SEED_LAYERS", "autograd kernel was not registered", "built successfully"):
        assert noise not in log, (noise, log[-3000:])
    assert proc.stdout.splitlines()[-1].startswith("finished: step 3 of 3; last checkpoint ")

    proc = run(torchrun_cmd(2, *TRAIN, "--verbose") + _sets(tiny_ckpt, medpix, tmp_path / "verbose", *sets))
    log = proc.stdout + proc.stderr
    assert len([line for line in log.splitlines() if line.startswith("skipping bad sample")]) == 8, log[-3000:]
    for shown in ("[INFO]", "Using topology", "autograd kernel was not registered"):
        assert shown in log, (shown, log[-3000:])
