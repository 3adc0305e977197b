"""`logging.profile_step: N`: where step N's time goes, written by the first rank.

Three views of the same step, because a host-bound step hides from a kernel table alone:
- `profile_rank0.txt`: torch.profiler's operator table (CUDA time first on GPUs);
- `profile_rank0_python.txt`: cProfile's Python functions by cumulative time (what the host does
  between kernels: the schedule, mask building, hooks);
- `profile_rank0_syncs.txt` (GPU only): every call that made the host wait for the GPU, counted by
  where it came from (`torch.cuda.set_sync_debug_mode`), since each one stops the host running ahead.
  Syncs inside autograd's backward (recompute included) are reported at the `backward()` call.
"""

from __future__ import annotations

import collections
import contextlib
import cProfile
import io
import pstats
import traceback
import warnings
from pathlib import Path
from typing import Iterator

import torch


@contextlib.contextmanager
def profile_step(out_dir: Path, write: bool) -> Iterator[None]:
    cuda = torch.cuda.is_available()
    syncs: collections.Counter = collections.Counter()
    show = warnings.showwarning

    def record_sync(message, category, filename, lineno, file=None, line=None) -> None:
        if "synchronizing" not in str(message):
            show(message, category, filename, lineno, file, line)  # other warnings as usual
            return
        frames = [f for f in traceback.extract_stack()[:-1] if "/warnings.py" not in f.filename][-6:]
        syncs["".join(traceback.format_list(frames))] += 1

    python = cProfile.Profile()
    with torch.profiler.profile() as prof, warnings.catch_warnings():
        if cuda:
            warnings.simplefilter("always")
            warnings.showwarning = record_sync
            torch.cuda.set_sync_debug_mode("warn")
        python.enable()
        try:
            yield
        finally:
            python.disable()
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    if not write:
        return
    sort = "cuda_time_total" if cuda else "cpu_time_total"
    (out_dir / "profile_rank0.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=40))
    text = io.StringIO()
    pstats.Stats(python, stream=text).sort_stats("cumulative").print_stats(60)
    (out_dir / "profile_rank0_python.txt").write_text(text.getvalue())
    if cuda:
        lines = [f"{sum(syncs.values())} host-GPU syncs in the step, by call site (most frequent first)\n"]
        lines += [f"--- {count}x\n{stack}" for stack, count in syncs.most_common(30)]
        (out_dir / "profile_rank0_syncs.txt").write_text("".join(lines))
