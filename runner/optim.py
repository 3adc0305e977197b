"""AdamW, the LR schedule, and a gradient norm that is right for every tp × pp × dp layout.

DeepSpeed's bf16/ZeRO optimizers compute the global norm correctly for TP + PP (each TP shard once,
replicated parameters once, tied copies once). Its plain fp32 path (the CPU tests and demo) clips
with a norm that counts replicated parameters only on the first stage and never reports it; there
`GlobalNormAdamW` computes the norm over the whole model-parallel slice itself, clips, and exposes it
as `_global_grad_norm`, which DeepSpeed's engine reads after every step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from torch import nn

from runner.config import OptimConfig
from runner.errors import UserError
from runner.parallel.topology import ParallelState


def counts_once(param: nn.Parameter, tp_rank: int) -> bool:
    """Whether this rank's copy of `param` enters the global norm (each logical value once)."""
    if getattr(param, "ds_pipe_replicated", False):  # tied copy on a non-owner stage
        return False
    return bool(getattr(param, "tensor_model_parallel", False)) or tp_rank == 0


def global_grad_norm(params: list[nn.Parameter], ps: ParallelState) -> torch.Tensor:
    """L2 norm of the full model's gradient (after DP averaging), equal on every rank."""
    device = params[0].device if params else get_accelerator().current_device_name()  # NCCL needs it on the GPU
    sq = torch.zeros((), dtype=torch.float64, device=device)
    for p in params:
        if p.grad is not None and counts_once(p, ps.tp_rank):
            sq += p.grad.detach().double().pow(2).sum()
    if ps.dims.tp * ps.dims.pp > 1:
        dist.all_reduce(sq, group=ps.grid.get_model_parallel_group())
    return sq.sqrt()


class GlobalNormAdamW(torch.optim.AdamW):
    """AdamW that measures (and with `max_grad_norm > 0` clips to) the true global gradient norm.

    A non-finite norm skips the update the way DeepSpeed's bf16 and ZeRO optimizers do: no change to
    weights or Adam state, and `overflow` set, which tells DeepSpeed's engine not to step the LR
    scheduler (it zeroes the gradients either way). The norm is equal on every rank, so all skip."""

    def __init__(self, params, ps: ParallelState, max_grad_norm: float = 0.0, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.ps = ps
        self.max_grad_norm = max_grad_norm
        self._global_grad_norm: float | None = None
        self.overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"]]
        norm = global_grad_norm(params, self.ps)
        self._global_grad_norm = float(norm)
        self.overflow = not math.isfinite(self._global_grad_norm)
        if self.overflow:
            return None
        if self.max_grad_norm > 0:
            coef = self.max_grad_norm / (norm + 1e-6)
            if coef < 1:
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(coef.to(p.grad.dtype))
        return super().step(closure)


def param_groups(model: nn.Module, weight_decay: float, chunks: int = 1) -> list[dict]:
    """Decay matrices; spare norms and biases (1-D), as transformers' Trainer does.

    The matrices are cut, in model order, into `chunks` groups of about equal size: DeepSpeed's ZeRO-1
    step turns a whole group's gradients into a flat fp32 partition at once (6 bytes per parameter
    beside the bf16 gradients), so smaller groups lower that spike. No group is empty: DeepSpeed
    would drop it behind the LR scheduler's back.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    chunks = max(1, min(chunks, len(decay)))
    sizes = [p.numel() for p in decay]
    total, bounds, acc = sum(sizes), [0], 0
    for i, size in enumerate(sizes):  # close chunk j once it holds its share, leaving one param per later chunk
        acc += size
        j = len(bounds)
        if j < chunks and (acc >= total * j / chunks or len(decay) - (i + 1) == chunks - j):
            bounds.append(i + 1)
    bounds.append(len(decay))
    return ([{"params": decay[a:b], "weight_decay": weight_decay} for a, b in zip(bounds, bounds[1:]) if b > a]
            + ([{"params": no_decay, "weight_decay": 0.0}] if no_decay else []))


def matrix_group_count(stage_layers: Sequence[int], layers_trained: bool) -> int:
    """How many groups `param_groups` cuts each stage's matrices into: as many as the stage with the
    fewest decoder layers has layers (the same count on every stage), or one when the decoder layers
    are frozen (a stage may then hold a single trainable matrix)."""
    return min(stage_layers) if layers_trained else 1


FREEZE_FIX = "lower parallel.pp, or unfreeze more (freeze.language_model, freeze.embeddings)"


def check_stage_groups(groups: list[dict], ps: ParallelState, device: str, *, same_count: bool) -> None:
    """Every stage must train something, and under DeepSpeed's ZeRO optimizer (`same_count`) every
    stage needs the same number of groups: it all-reduces each group's gradient norm over the
    stages, so a stage with one group fewer hangs the job. Collective: every rank stops with the
    same line."""
    counts = torch.zeros(ps.dims.pp, device=device)
    counts[ps.pp_rank] = len(groups)
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)  # a stage's ranks hold the same parameters
    counts = [int(n) for n in counts.tolist()]
    if 0 in counts:
        raise UserError(f"pipeline stage {counts.index(0)} trains nothing (the freeze settings freeze all it "
                        f"holds): {FREEZE_FIX}", on_every_rank=True)
    if same_count and len(set(counts)) > 1:
        raise UserError(f"DeepSpeed's ZeRO optimizer needs the same number of optimizer groups on every pipeline "
                        f"stage, but the freeze settings give the stages {counts} (a stage without a trainable "
                        f"norm or bias has no no-decay group): {FREEZE_FIX}", on_every_rank=True)


def build_optimizer(model: nn.Module, cfg: OptimConfig, ps: ParallelState, *, fp32_path: bool, zero_optimizer: bool,
                    max_grad_norm: float, matrix_groups: int, device: str) -> torch.optim.Optimizer:
    """On DeepSpeed's plain fp32 path our optimizer measures and clips the norm; under bf16/ZeRO
    DeepSpeed wraps a plain AdamW and does both itself (fused on GPU). Call on every rank."""
    groups = param_groups(model, cfg.weight_decay, chunks=matrix_groups)
    check_stage_groups(groups, ps, device, same_count=zero_optimizer)
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if fp32_path:
        return GlobalNormAdamW(groups, ps, max_grad_norm=max_grad_norm, **kwargs)
    return torch.optim.AdamW(groups, fused=torch.cuda.is_available(), **kwargs)


def lr_lambda(cfg: OptimConfig, total_steps: int):
    """Linear warmup to `lr`, then cosine to `lr * min_lr_ratio` at `total_steps` (or constant)."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
