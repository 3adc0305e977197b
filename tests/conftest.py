"""Shared fixtures and helpers: one tiny Gemma4 checkpoint per test session, subprocesses on CPU (gloo,
one thread per process) under torchrun or, for the test workers, forked by tests/fork_launcher.py, and the
checks for a one-line user error."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# DeepSpeed's CPU op builds into the project's own cache, not the one other checkouts' venvs share
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    from runner.models.gemma4.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "gemma4-tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_like(tmp_path_factory) -> Callable[[str], Path]:
    """`like` (a `runner make-tiny --like` name) -> that member's tiny checkpoint, made once per session."""
    from runner.models.gemma4.tiny import make_tiny

    made: dict[str, Path] = {}

    def get(like: str) -> Path:
        if like not in made:
            made[like] = make_tiny(tmp_path_factory.mktemp(f"tiny-{like}") / f"gemma4-tiny-{like}", seed=0, like=like)
        return made[like]

    return get


@pytest.fixture(scope="session")
def tiny_moe_ckpt(tiny_like) -> Path:
    """The tiny model with 26B-A4B's mixture-of-experts block (8 experts, top-2)."""
    return tiny_like("26b-a4b")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict[str, str]:
    """What a test's subprocesses run with: CPU, one thread, offline, the repo and tests/ importable."""
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")]))


def run(cmd: list[str], ok: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run `cmd` in the repo root; unless `ok` is false, fail the test with the tail of the log on error."""
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    if ok:
        fail_on_error(proc, " ".join(cmd))
    return proc


def fail_on_error(proc: subprocess.CompletedProcess, what: str) -> None:
    """Fail the test with the tail of `proc`'s output when it exited non-zero."""
    if proc.returncode:
        pytest.fail(f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")


def torchrun_cmd(nproc: int, *target: str) -> list[str]:
    """The command line that launches `target` (a script or `-m module`, and its arguments) on `nproc` processes."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
            *target]


def torchrun(script: Path, nproc: int, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `script` on `nproc` CPU processes; fail the test with the tail of the log on error."""
    return run(torchrun_cmd(nproc, str(script), *args), timeout=timeout)


class ForkLauncher:
    """The session's tests/fork_launcher.py server (started on first use, ended with the session)."""

    proc: subprocess.Popen | None = None
    jobs = 0

    @classmethod
    def run(cls, script: Path, nproc: int, args: list[str], timeout: int) -> subprocess.CompletedProcess:
        """`script` with `args` on `nproc` ranks, as torchrun would run it; its output and exit code."""
        if cls.proc is None or cls.proc.poll() is not None:
            cls.proc = subprocess.Popen([sys.executable, str(TESTS / "fork_launcher.py")], cwd=ROOT,
                                        env=subprocess_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        with tempfile.TemporaryDirectory() as logs:
            out, err = Path(logs) / "stdout", Path(logs) / "stderr"
            cls.jobs += 1  # a result of a job whose test was interrupted is skipped
            job = dict(id=cls.jobs, script=str(script), args=args, nproc=nproc, port=free_port(), cwd=str(ROOT),
                       env=subprocess_env(), timeout=timeout, stdout=str(out), stderr=str(err))
            cls.proc.stdin.write(json.dumps(job) + "\n")
            cls.proc.stdin.flush()
            result: dict = {}
            while result.get("id") != job["id"]:
                line = cls.proc.stdout.readline()
                assert line, ("tests/fork_launcher.py ended without a result (its own errors go to the output of "
                              "the test that started it)")
                result = json.loads(line[7:]) if line.startswith("RESULT ") else {}
            read = lambda path: path.read_text() if path.exists() else ""  # noqa: E731
            return subprocess.CompletedProcess([str(script), *args], result["returncode"], read(out), read(err))


@pytest.fixture(scope="session", autouse=True)
def _end_fork_launcher() -> Iterator[None]:
    yield
    if ForkLauncher.proc is not None:
        ForkLauncher.proc.stdin.close()
        try:
            ForkLauncher.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:  # still running an interrupted test's job: its ranks die with it
            ForkLauncher.proc.kill()
            ForkLauncher.proc.wait()


def torchrun_worker(script: str, ckpt: Path, layout: tuple[int, int, int], *args: str,
                    timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the test worker tests/`script` (its arguments: synthetic.worker_parser) on tp*pp*dp processes forked
    by tests/fork_launcher.py; fail the test with the tail of its log on error."""
    tp, pp, dp = layout
    args = ["--ckpt", str(ckpt), "--tp", str(tp), "--pp", str(pp), "--dp", str(dp), *args]
    proc = ForkLauncher.run(TESTS / script, tp * pp * dp, args, timeout)
    fail_on_error(proc, f"{script} {' '.join(args)} on {tp * pp * dp} processes")
    return proc


def assert_one_line(message: str, words: Iterable[str]) -> str:
    """A user error is one line that names every one of `words`; returns the message."""
    assert "\n" not in message, message
    for w in words:
        assert w in message, (w, message)
    return message


def assert_one_error_line(proc: subprocess.CompletedProcess, words: Iterable[str]) -> str:
    """The command exited 2 with exactly one `error: ` line on stderr, naming every one of `words`;
    returns that line."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return assert_one_line(errors[0], words)
