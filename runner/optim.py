"""AdamW, the LR schedule, and a gradient norm that is right for every tp × pp × dp layout.

DeepSpeed's bf16/ZeRO optimizers compute the global norm correctly for TP + PP (each TP shard once,
replicated parameters once, tied copies once). Its plain fp32 path (the CPU tests and demo) clips
with a norm that counts replicated parameters only on the first stage and never reports it; there
`GlobalNormAdamW` computes the norm over the whole model-parallel slice itself, clips, and exposes it
as `_global_grad_norm`, which DeepSpeed's engine reads after every step.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from torch import nn

from runner.config import OptimConfig
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
    """AdamW that measures (and with `max_grad_norm > 0` clips to) the true global gradient norm."""

    def __init__(self, params, ps: ParallelState, max_grad_norm: float = 0.0, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.ps = ps
        self.max_grad_norm = max_grad_norm
        self._global_grad_norm: float | None = None

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"]]
        norm = global_grad_norm(params, self.ps)
        self._global_grad_norm = float(norm)
        if self.max_grad_norm > 0:
            coef = self.max_grad_norm / (norm + 1e-6)
            if coef < 1:
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(coef.to(p.grad.dtype))
        return super().step(closure)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; spare norms and biases (1-D), as transformers' Trainer does.

    The matrices form one group per top-level module (a pipeline layer): DeepSpeed's ZeRO-1 step
    turns a whole group's gradients into a flat fp32 partition at once, 6 bytes per parameter beside
    the bf16 gradients, so one group per layer bounds that spike by a layer instead of the stage.
    """
    decay: dict[str, list[nn.Parameter]] = {}
    no_decay = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            if p.ndim >= 2:
                decay.setdefault(name.split(".")[0], []).append(p)
            else:
                no_decay.append(p)
    return ([{"params": params, "weight_decay": weight_decay} for params in decay.values()]
            + [{"params": no_decay, "weight_decay": 0.0}])


def build_optimizer(model: nn.Module, cfg: OptimConfig, ps: ParallelState, *, fp32_path: bool,
                    max_grad_norm: float) -> torch.optim.Optimizer:
    """On DeepSpeed's plain fp32 path our optimizer measures and clips the norm; under bf16/ZeRO
    DeepSpeed wraps a plain AdamW and does both itself (fused on GPU)."""
    groups = param_groups(model, cfg.weight_decay)
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
