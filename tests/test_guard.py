"""Run safety end to end on CPU: inf/NaN steps never reach a checkpoint (stop and skip), one job per
output directory (a second one is refused untouched, a stale lock is reported with its fix), a frozen
rank is one timeout line, and a resume after kill -9 or of a finished run keeps the logs right."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from runner.errors import UserError

from conftest import ROOT, TESTS, assert_one_error_line, assert_one_line, run, subprocess_env, torchrun_cmd
from test_train import DEMO, TRAIN, _sets, _single_process, medpix  # noqa: F401 (medpix: test_train's data fixture)

ONE = ("parallel.tp=1", "parallel.pp=1", "parallel.dp=1")


def _records(out: Path, split: str = "train") -> list[int]:
    """The steps of metrics.jsonl's `split` records, in file order (complete lines only: the run may be writing)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().split("\n")[:-1]]
    return [r["step"] for r in rows if r.get("split", "train") == split]


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    """`cmd` in the background, its output in `log`."""
    return subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait_for_step(proc: subprocess.Popen, out: Path, step: int, log: Path) -> None:
    """Until metrics.jsonl holds a train record of `step` or later."""
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").is_file() and max(_records(out), default=0) >= step):
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)


def _one_error_line_of_the_job(proc: subprocess.CompletedProcess, words: list[str]) -> None:
    """A torchrun job whose worker stopped on a user error: nonzero, one `error: ` line naming `words`."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
    assert_one_line(errors[0], words)


@pytest.mark.parametrize("mode,words", [
    ("stop", ["step 3: loss nan, grad norm nan not finite", "stopped without saving",  # the default
              "the last good checkpoint is", "step_00000002", "train.on_nonfinite: skip"]),
    ("skip", ["step 3: 2 steps in a row with a non-finite loss or grad norm", "train.max_nonfinite_steps",
              "the last good checkpoint is", "step_00000002"]),
])
def test_a_nonfinite_step_never_reaches_a_checkpoint(tmp_path, tiny_ckpt, medpix, mode, words):  # noqa: F811
    """optim.lr=1e6 on the tiny model: losses 9.2, 35, then NaN from step 3 on (it exited 0 with `latest`
    on NaN weights). stop: one line at step 3; skip: step 3's update is dropped, the next global batch is
    step 3 again and also NaN, so max_nonfinite_steps=2 stops there. Either way nothing is saved after
    step 2, and keep=1 leaves step 2, finite, as the only checkpoint."""
    out = tmp_path / "out"
    skip = ("train.on_nonfinite=skip", "train.max_nonfinite_steps=2") if mode == "skip" else ()
    proc = run(_single_process() + _sets(tiny_ckpt, medpix, out, *ONE, "optim.lr=1e6", "train.max_steps=6",
                                         "checkpoint.every_steps=1", "checkpoint.keep=1", *skip), ok=False)
    assert_one_error_line(proc, words)
    skipped = "step 3: loss nan, grad norm nan not finite; update skipped (1 in a row, train.max_nonfinite_steps=2)"
    assert (skipped in proc.stdout) == (mode == "skip"), proc.stdout[-3000:]
    assert _records(out) == [1, 2]
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000002"]
    assert (ckpts / "latest").read_text() == "step_00000002"
    for path in (ckpts / "step_00000002").glob("layer_*.pt"):
        assert all(torch.isfinite(t).all() for t in torch.load(path, weights_only=True).values()), path
    assert not (out / ".lock").exists()


def test_the_optimizer_skips_a_nonfinite_step_untouched():
    """GlobalNormAdamW (the fp32 path) on an inf/NaN gradient: weights and Adam state stay as they
    were and `overflow` tells DeepSpeed's engine not to step the LR scheduler; the next finite step
    updates again."""
    from runner.optim import GlobalNormAdamW

    model = torch.nn.Linear(4, 3)
    ps = SimpleNamespace(dims=SimpleNamespace(tp=1, pp=1), tp_rank=0)
    opt = GlobalNormAdamW(model.parameters(), ps, max_grad_norm=1.0, lr=0.1)

    def step(grad: float) -> None:
        for p in model.parameters():
            p.grad = torch.full_like(p, grad)
        opt.step()

    step(1.0)
    weights = [p.detach().clone() for p in model.parameters()]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()]
    for bad in (float("nan"), float("inf")):
        step(bad)
        assert opt.overflow
        assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
        for p, saved in zip(model.parameters(), state):
            assert all(torch.equal(opt.state[p][k], v) for k, v in saved.items())
    step(1.0)
    assert not opt.overflow and not torch.equal(next(model.parameters()), weights[0])
    assert float(opt.state[next(model.parameters())]["step"]) == 2


def test_weights_with_nan_on_one_rank_are_never_published(tmp_path, tiny_ckpt):
    """At pp=2 a NaN in a weight of rank 1 only: the save of step 1 is refused on every rank before a
    file is written, with one line; keep=1 does not prune step 0, still `latest`."""
    root = tmp_path / "root"
    proc = run(torchrun_cmd(2, str(TESTS / "guard_worker.py"), "--ckpt", str(tiny_ckpt), "--pp", "2",
                            "--root", str(root)), ok=False)
    _one_error_line_of_the_job(proc, ["step 1: the weights hold inf/NaN values, not saved as a checkpoint",
                                      f"{root / 'step_00000000'} stays the latest"])
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000000"]


def test_a_stopped_rank_of_a_training_job_is_one_timeout_line(tmp_path, tiny_ckpt, medpix):  # noqa: F811
    """`runner train` at dp=2 with parallel.timeout_minutes=0.1: SIGSTOP rank 1 after step 1 and rank 0's
    next collective ends the job with one line naming rank 0 and the step."""
    import psutil

    out, log = tmp_path / "out", tmp_path / "job.log"
    job = _start(torchrun_cmd(2, *TRAIN) + _sets(tiny_ckpt, medpix, out, "parallel.tp=1", "parallel.pp=1",
                                                 "parallel.dp=2", "train.max_steps=100", "parallel.timeout_minutes=0.1"),
                 log)
    try:
        _wait_for_step(job, out, 1, log)
        [rank1] = [p for p in psutil.Process(job.pid).children(recursive=True) if p.environ().get("RANK") == "1"]
        rank1.suspend()
        deadline = time.time() + 120
        while "error: " not in log.read_text():
            assert job.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        rank1.kill()  # what the launcher's SIGKILL does to a frozen process, without its 30 s grace period
        assert job.wait(timeout=120) != 0
    finally:
        job.kill()
    errors = [line for line in log.read_text().splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, log.read_text()[-3000:]
    assert_one_line(errors[0], ["rank 0: collective", "in step", "timed out after 0.1 min", "a rank is frozen or dead",
                                "raise parallel.timeout_minutes"])


@pytest.mark.parametrize("key,value,words", [
    ("parallel.timeout_minutes", "0", ["parallel.timeout_minutes must be > 0"]),
    ("train.max_nonfinite_steps", "0", ["train.max_nonfinite_steps must be >= 1"]),
    ("train.on_nonfinite", "ignore", ["train.on_nonfinite = 'ignore' is not one of 'stop', 'skip'"]),
])
def test_run_safety_keys_are_validated(key, value, words):
    from runner.config import load_config

    with pytest.raises(UserError) as err:
        load_config(DEMO, [f"{key}={value}"])
    assert_one_line(str(err.value), words)


def test_a_lock_left_behind_is_reported_with_its_fix_not_taken(tmp_path):
    """A dead pid on this host: stale, remove the file. Another host: in use (its pid cannot be checked
    here). The lock is left as it was; release removes only this process's own lock."""
    from runner.guard import LOCK_NAME, release_lock, take_lock

    dead = subprocess.Popen(["true"])
    dead.wait()
    lock = tmp_path / LOCK_NAME
    for host, pid, words in [
        (socket.gethostname(), dead.pid, ["stale lock", f"pid {dead.pid}", "no longer running", f"remove {lock}"]),
        ("node-b", os.getpid(), [f"{tmp_path} is in use by another job (host node-b, pid {os.getpid()}",
                                 "another output.dir", f"remove {lock}"]),
    ]:
        holder = json.dumps({"host": host, "pid": pid, "started": "2026-12-01T10:00:00+0000"})
        lock.write_text(holder)
        with pytest.raises(UserError) as err:
            take_lock(tmp_path)
        assert_one_line(str(err.value), words + ["started 2026-12-01T10:00:00+0000"])
        release_lock(lock)
        assert lock.read_text() == holder
    lock.unlink()
    release_lock(take_lock(tmp_path))
    assert not lock.exists()


def test_a_second_job_in_the_same_output_dir_is_refused_untouched(tmp_path, tiny_ckpt, medpix):  # noqa: F811
    """While a job trains, a second one (2 processes) in its output.dir stops on every rank with one line
    naming the holder and writes nothing there; the first goes on and ends (SIGTERM: save, exit 0) with each step logged once and its
    lock gone."""
    out, log = tmp_path / "out", tmp_path / "first.log"
    first = _start(_single_process() + _sets(tiny_ckpt, medpix, out, *ONE, "train.max_steps=100"), log)
    try:
        _wait_for_step(first, out, 1, log)
        config_written = (out / "config.json").stat().st_mtime_ns
        proc = run(torchrun_cmd(2, *TRAIN) + _sets(tiny_ckpt, medpix, out, "parallel.tp=1", "parallel.pp=1",
                                                   "parallel.dp=2"), ok=False)
        _one_error_line_of_the_job(proc, [f"{out} is in use by another job (host {socket.gethostname()}, "
                                          f"pid {first.pid}", "use another output.dir"])
        assert (out / "config.json").stat().st_mtime_ns == config_written
        assert json.loads((out / ".lock").read_text())["pid"] == first.pid
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        first.kill()
    steps = _records(out)
    assert steps == list(range(1, len(steps) + 1)) and "SIGTERM: saved" in log.read_text()
    assert (out / "checkpoints" / "latest").read_text() == f"step_{steps[-1]:08d}"
    assert not (out / ".lock").exists()


def test_resume_after_kill_9_logs_each_step_once(tmp_path, tiny_ckpt, medpix):  # noqa: F811
    """kill -9 after step 4 with a checkpoint every 3 steps: the lock it leaves is reported as stale with
    its fix; once removed, the resume from step 3 cuts metrics.jsonl back to step 3 and every train and
    eval step appears once."""
    out, log = tmp_path / "out", tmp_path / "killed.log"
    sets = _sets(tiny_ckpt, medpix, out, *ONE, "checkpoint.every_steps=3", "eval.every_steps=1",
                 "eval.max_batches=1", "data.eval_split=validation[:2]")
    job = _start(_single_process() + sets + ["--set", "train.max_steps=100"], log)
    try:
        _wait_for_step(job, out, 4, log)
    finally:
        job.kill()
        job.wait()
    resumed = int((out / "checkpoints" / "latest").read_text().removeprefix("step_"))
    assert max(_records(out)) > resumed, "nothing logged after the checkpoint: the test proves nothing"
    again = _single_process() + sets + ["--set", f"train.max_steps={resumed + 2}"]
    proc = run(again, ok=False)
    assert_one_error_line(proc, ["stale lock", f"pid {job.pid}", f"remove {out / '.lock'}"])
    (out / ".lock").unlink()
    run(again)
    want = list(range(1, resumed + 3))
    assert _records(out) == want and _records(out, "eval") == want


def test_sigterm_during_a_save_stops_right_after_it(tmp_path, tiny_ckpt, medpix):  # noqa: F811
    """SIGTERM while step 2's checkpoint is being written (its .partial directory exists): the job exits 0
    right after that save instead of training and saving one more step."""
    out, log = tmp_path / "out", tmp_path / "job.log"
    job = _start(_single_process() + _sets(tiny_ckpt, medpix, out, *ONE, "train.max_steps=100",
                                           "checkpoint.every_steps=2"), log)
    partial = out / "checkpoints" / "step_00000002.partial"
    try:
        deadline = time.time() + 300
        while not partial.exists():
            assert job.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.005)
        job.send_signal(signal.SIGTERM)
        assert job.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        job.kill()
    assert f"SIGTERM: saved {out / 'checkpoints' / 'step_00000002'} after step 2" in log.read_text()
    assert _records(out) == [1, 2]


def test_resuming_a_finished_run_says_so(tmp_path, tiny_ckpt, medpix):  # noqa: F811
    """The same command again after the last step: one line that the run is finished and where its export
    is, exit 0, nothing trained or logged."""
    out = tmp_path / "out"
    cmd = _single_process() + _sets(tiny_ckpt, medpix, out, *ONE, "checkpoint.export=true")
    run(cmd)
    logged = (out / "metrics.jsonl").read_text()
    proc = run(cmd)
    assert f"the run in {out} is finished" in proc.stdout and f"its export is {out / 'export'}" in proc.stdout
    assert "training " not in proc.stdout and "step 1/1" not in proc.stdout
    assert (out / "metrics.jsonl").read_text() == logged
