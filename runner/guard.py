"""Run safety: one job per output directory, non-finite steps and weights, collective timeouts.

Output-dir lock. Global rank 0 creates `OUTPUT_DIR/.lock` exclusively (O_CREAT | O_EXCL) before
anything is written there, holding {host, pid, started} as JSON, and removes it when the job ends
(normally or through an error). Every other rank learns the outcome by a broadcast, so a second job
in the same directory stops on every rank with one line naming the holder, before it touches
anything of the first job. Multi-node: only rank 0 takes the lock, so `output.dir` must live on a
filesystem every node shares (as the checkpoints do) whose O_EXCL create is atomic (local disks,
NFSv3+, Lustre, GPFS); a per-node scratch directory would give every node a lock of its own.

A lock left behind by a job that died hard (kill -9, node crash) is never taken over silently: a
pid that is dead on this same host is reported as stale with the one command that clears it, a
lock from another host names that host (its pid cannot be checked from here). A user on a shared
cluster can then check that no job of theirs still writes there before removing it; stealing a
lock whose holder only looks dead (another container, pid namespace) would let two jobs prune
each other's checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from torch import nn

from runner.compat import process_groups, set_group_timeout
from runner.errors import UserError

LOCK_NAME = ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def holder_error(path: Path) -> UserError:
    """Why `path` (an existing lock) keeps this job out: held, stale, or unreadable."""
    try:
        holder = json.loads(path.read_text())
        host, pid, started = holder["host"], int(holder["pid"]), holder["started"]
    except (OSError, ValueError, KeyError, TypeError):
        return UserError(f"{path} exists but is not a readable lock; if no job uses {path.parent}, remove {path}")
    if host == socket.gethostname() and not _pid_alive(pid):
        return UserError(f"stale lock {path}: its job (host {host}, pid {pid}, started {started}) is no longer "
                         f"running; if no other job writes to {path.parent}, remove {path} and start again")
    return UserError(f"{path.parent} is in use by another job (host {host}, pid {pid}, started {started}); wait for "
                     f"it to end or use another output.dir (if that job is gone, remove {path})")


def take_lock(out_dir: Path) -> Path:
    """Create the output dir's lock for this process, or raise the line naming its holder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        raise holder_error(path) from None
    with os.fdopen(fd, "w") as f:
        json.dump({"host": socket.gethostname(), "pid": os.getpid(),
                   "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, f)
    return path


def release_lock(path: Path) -> None:
    """Remove the lock if it is still this process's (a user may have cleared and reused it)."""
    with contextlib.suppress(OSError, ValueError, KeyError):
        holder = json.loads(path.read_text())
        if holder["host"] == socket.gethostname() and holder["pid"] == os.getpid():
            path.unlink()


@contextlib.contextmanager
def output_lock(out_dir: Path) -> Iterator[None]:
    """Hold the output dir's lock for the job: rank 0 takes it, every rank raises the same line when
    it is held. Collective (a broadcast); call on every rank after the process group exists."""
    path, refusal = None, [None]
    if dist.get_rank() == 0:
        try:
            path = take_lock(out_dir)
        except UserError as err:
            refusal = [str(err)]
    dist.broadcast_object_list(refusal, src=0)
    if refusal[0] is not None:
        raise UserError(refusal[0], on_every_rank=True)
    try:
        yield
    finally:
        if path is not None:
            release_lock(path)


@contextlib.contextmanager
def one_error_for_the_job() -> Iterator[None]:
    """A setup step where a user error may strike some ranks only (a stage's adapter keys or weights): every rank
    learns the lowest failing rank's line (a collective) and raises it, so the job prints it once and no rank waits
    in a later collective for a peer that is gone. Call on every rank."""
    mine: tuple[str, str] | None = None
    crash: BaseException | None = None
    try:
        yield
    except UserError as err:
        mine = ("error", str(err))
    except BaseException as err:  # not a user error: raised here once the others know, so none waits for this rank
        crash, mine = err, ("crash", f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")
    every: list[tuple[str, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if crash is not None:
        raise crash
    errors = [text for kind, text in filter(None, every) if kind == "error"]
    if errors:
        raise UserError(errors[0], on_every_rank=True)
    crashed = next(((rank, got[1]) for rank, got in enumerate(every) if got), None)
    if crashed is not None:
        print(f"stopped: rank {crashed[0]} failed ({crashed[1]})", file=sys.stderr, flush=True)
        raise SystemExit(1)


def _device() -> str:
    """Where flags for collectives live: NCCL reduces only accelerator tensors."""
    return get_accelerator().current_device_name()


def any_rank(flag: bool) -> bool:
    """Whether `flag` holds on any rank of the job (one MAX all-reduce)."""
    t = torch.tensor([float(flag)], device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t[0])


def weights_finite(module: nn.Module) -> bool:
    """Whether every rank's parameters are all finite. Collective."""
    flags = [torch.isfinite(p.detach()).all() for p in module.parameters()]
    local = bool(torch.stack(flags).all()) if flags else True  # one device sync, not one per tensor
    return not any_rank(not local)


def is_finite(*values: float | torch.Tensor | None) -> bool:
    """Whether every value (a loss, a grad norm; None: not measured) is finite."""
    return all(v is None or math.isfinite(float(v)) for v in values)


def nonfinite_error(step: int, loss: float, grad_norm: float | None, in_a_row: int, mode: str,
                    last_good: Path | None) -> UserError:
    """The line that stops a run on non-finite steps: which step, why, what was kept, the fix."""
    kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was saved before it"
    if mode == "stop":
        return UserError(f"step {step}: loss {loss:.4g}, grad norm {float(grad_norm or 0):.4g} not finite; stopped "
                         f"without saving ({kept}); resume with train.on_nonfinite: skip to drop such global batches, "
                         f"or start afresh with a lower optim.lr or more optim.warmup_steps", on_every_rank=True)
    return UserError(f"step {step}: {in_a_row} steps in a row with a non-finite loss or grad norm "
                     f"(train.max_nonfinite_steps); stopped without saving ({kept}); the run diverged: start afresh "
                     f"with a lower optim.lr or more optim.warmup_steps", on_every_rank=True)


def set_collective_timeout(minutes: float) -> None:
    """`minutes` for every process group of this rank: torch gives groups made after the first one (TP,
    DP, pipeline, tied-weight groups) its own default (30 min, NCCL 10) instead of the job's timeout."""
    for group in process_groups():
        set_group_timeout(timedelta(minutes=minutes), group)


class Where:
    """What the job is doing, for the timeout line (setup, step N, export)."""

    def __init__(self) -> None:
        self.at = "during setup"


def _op(message: str) -> str:
    """The operation a backend's timeout message names (gloo: `for recv operation`, NCCL: `OpType=ALLREDUCE`)."""
    found = re.search(r"for (\w+) operation|OpType=(\w+)", message)
    return next((g for g in found.groups() if g), "") if found else ""


@contextlib.contextmanager
def collective_timeout(minutes: float) -> Iterator[Where]:
    """Turn a collective that timed out (gloo raises RuntimeError "Timed out ...") into one line naming
    this rank, the operation and where the job was. NCCL's watchdog aborts the process instead unless
    TORCH_NCCL_ASYNC_ERROR_HANDLING is 0; its own log line names the operation then."""
    where = Where()
    try:
        yield where
    except RuntimeError as err:
        if "timed out" not in str(err).lower():
            raise
        op = _op(str(err))
        line = (f"rank {dist.get_rank()}: collective {op + ' ' if op else ''}{where.at} timed out after "
                f"{minutes:g} min: a rank is frozen or dead (look for one that logged nothing or was killed); "
                f"raise parallel.timeout_minutes if a step, save or eval legitimately takes longer")
        raise UserError(line) from None
