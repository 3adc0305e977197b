"""Timing and recording for the one-GPU kernel benchmarks (attention_bench.py, norm_bench.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch


def fwd_bwd_ms(fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], grad: torch.Tensor,
               iters: int) -> tuple[float, float]:
    """Median forward and forward+backward milliseconds of `fn(*inputs)` (CUDA events), the inputs'
    gradients dropped between calls."""
    fwd, both = [], []
    for _ in range(iters):
        start, mid, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        start.record()
        out = fn(*inputs)
        mid.record()
        out.backward(grad)
        end.record()
        torch.cuda.synchronize()
        fwd.append(start.elapsed_time(mid))
        both.append(start.elapsed_time(end))
        for x in inputs:
            x.grad = None
    return sorted(fwd)[iters // 2], sorted(both)[iters // 2]


def add_record(results: dict, record: dict, out: str | Path) -> None:
    """Print one record and rewrite the results file with it: a run killed later keeps what it measured."""
    print(json.dumps(record), flush=True)
    results["runs"].append(record)
    Path(out).write_text(json.dumps(results, indent=1))
