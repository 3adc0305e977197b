"""The test workers' launcher: tests/*_worker.py on N CPU processes without paying each process's imports.

A fresh Python process spends ~5 s of CPU importing torch, DeepSpeed, transformers' Gemma4 and PEFT; a
worker job of 4 ranks on a 2-core machine pays that 4 times, plus torchrun's own start, before its first
step. This server imports them once, then forks each job's ranks from that state with the environment
torchrun gives them (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and the job's environment,
so every job still runs in fresh processes that share nothing with earlier jobs; each rank reseeds
torch's, numpy's and Python's generators from the OS as a new interpreter would (else every rank would draw
alike and the tests that ranks were seeded alike on purpose could not fail). Python's string-hash seed is the
server's on every rank. When a rank fails, the others are killed and the job's exit code is the first
failure's, as under torchrun; ranks die with the server. conftest's `torchrun_worker` sends a job as one
JSON line on stdin and reads its `RESULT {...}` line back. The runner's own launches (`runner train`
under torchrun, accelerate and deepspeed) are tested with the real launchers.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import runpy
import signal
import sys
import time
import traceback

import numpy as np
import torch

torch.set_num_threads(1)

import deepspeed  # noqa: E402, F401
import deepspeed.pipe  # noqa: E402, F401
import peft  # noqa: E402, F401
import safetensors.torch  # noqa: E402, F401
import transformers.models.gemma4.modeling_gemma4  # noqa: E402, F401


def run_rank(job: dict, rank: int) -> None:
    """In a forked child: become rank `rank` of `job` and run its script as `__main__`; never returns."""
    code = 1
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: end with the server
        os.environ.clear()
        os.environ.update(job["env"], RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(job["nproc"]),
                          LOCAL_WORLD_SIZE=str(job["nproc"]), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(job["port"]))
        torch.seed()
        np.random.seed()
        random.seed()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644), fd)
        os.chdir(job["cwd"])
        sys.argv = [job["script"], *job["args"]]
        sys.path[0] = os.path.dirname(job["script"])
        try:
            runpy.run_path(job["script"], run_name="__main__")
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            if isinstance(stop.code, str):
                print(stop.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 — a rank's failure is its exit code, its traceback on stderr
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_job(job: dict) -> int:
    """Fork the job's ranks, wait for all; the first non-zero exit code (a signal as -N) kills the rest."""
    sys.stdout.flush()
    pids = []
    for rank in range(job["nproc"]):
        pid = os.fork()
        if pid == 0:
            run_rank(job, rank)
        pids.append(pid)
    live, code, deadline = set(pids), 0, time.monotonic() + job["timeout"]
    while live:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            if time.monotonic() > deadline and not code:
                code = -signal.SIGKILL
                with open(job["stderr"], "a") as log:
                    print(f"fork_launcher: the job ran past {job['timeout']} s; its ranks were killed", file=log)
                for other in live:
                    os.kill(other, signal.SIGKILL)
            time.sleep(0.02)
            continue
        live.discard(pid)
        exit_code = os.waitstatus_to_exitcode(status)
        if exit_code and not code:
            code = exit_code
            for other in live:
                os.kill(other, signal.SIGKILL)
    return code


def main() -> None:
    for line in sys.stdin:
        job = json.loads(line)
        print("RESULT " + json.dumps({"id": job["id"], "returncode": run_job(job)}), flush=True)


if __name__ == "__main__":
    main()
