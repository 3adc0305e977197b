"""The tp × pp × dp grid, in one place.

Ranks are laid out by DeepSpeed's `PipeModelDataParallelTopology` (axes pipe, data, model; the
model = tensor-parallel axis varies fastest, so a TP group sits inside one node). Every group the
model needs — TP, DP, PP and the KV-head replica groups — is created here, by every rank in the same
order, before any stage module is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.pipe.topology import PipelineParallelGrid, PipeModelDataParallelTopology

from runner.compat import deepspeed_prints_dropped
from runner.config import divisors
from runner.errors import UserError


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of tensor, pipeline and data parallelism, whether the TP group also splits the
    sequence between its blocks (Megatron's sequence parallelism), and the expert-parallel size
    inside the TP group (`ep`, None: tp; see `runner/models/gemma4/moe.py`)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    ep: int | None = None

    @property
    def ep_size(self) -> int:
        """Expert-parallel ranks of a TP group (each holds num_experts / ep_size experts)."""
        return self.ep or self.tp

    @property
    def etp_size(self) -> int:
        """Expert-tensor-parallel ranks: how many TP ranks split each expert's intermediate width."""
        return self.tp // self.ep_size

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def validate(self, world_size: int) -> None:
        """Refuse impossible layouts with one line that says how to fix them."""
        for name in ("tp", "pp", "dp"):
            if getattr(self, name) < 1:
                raise UserError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.ep is not None and (self.ep < 1 or self.tp % self.ep):
            raise UserError(f"parallel.ep={self.ep} must be >= 1 and divide parallel.tp={self.tp} (experts are split "
                            f"inside the TP group); choose ep from {divisors(self.tp)}, or leave it unset (= tp)")
        if self.world_size != world_size:
            raise UserError(
                f"parallel.tp*pp*dp = {self.tp}*{self.pp}*{self.dp} = {self.world_size} but the job has "
                f"{world_size} processes; make the product equal the number of processes (GPUs)"
            )


def validate_model_split(dims: ParallelDims, num_layers: int, tp_divisible: dict[str, int], kv_heads: set[int]) -> None:
    """Check a model can be cut pp-ways across stages and tp-ways inside them.

    `tp_divisible` names the sizes tp must divide (heads, vocab, MLP width); `kv_heads` the distinct
    key/value head counts, which tp must divide or be a multiple of (then heads are replicated).
    """
    if dims.pp > num_layers:
        raise UserError(f"parallel.pp={dims.pp} exceeds the model's {num_layers} decoder layers; use pp <= {num_layers}")
    for key, value in tp_divisible.items():
        if value % dims.tp:
            raise UserError(f"{key}={value} is not divisible by parallel.tp={dims.tp}; choose tp dividing {value}")
    for kv in sorted(kv_heads):
        if kv % dims.tp and dims.tp % kv:
            raise UserError(
                f"{kv} key/value heads cannot be split or replicated over parallel.tp={dims.tp}; "
                f"choose tp dividing {kv} or a multiple of it"
            )


@dataclass
class ParallelState:
    """This rank's coordinates and process groups, built once per job."""

    dims: ParallelDims
    grid: PipelineParallelGrid
    topology: PipeModelDataParallelTopology
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: object
    dp_group: object
    # replicas -> this rank's group of `replicas` consecutive TP ranks that hold the same KV head
    replica_groups: dict[int, object] = field(default_factory=dict)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.dims.pp - 1


def build_parallel_state(dims: ParallelDims) -> ParallelState:
    """Create the grid and every group; call on all ranks after `init_distributed`."""
    dims.validate(dist.get_world_size())
    topo = PipeModelDataParallelTopology(num_pp=dims.pp, num_mp=dims.tp, num_dp=dims.dp)
    with deepspeed_prints_dropped():  # its topology dump
        grid = PipelineParallelGrid(topology=topo)
    coord = topo.get_coord(dist.get_rank())
    replica_groups: dict[int, object] = {}
    # KV heads fewer than tp are replicated over `r` consecutive TP ranks; their weight gradients are
    # summed over that group. Groups for every divisor r of tp are made here so all ranks agree.
    for r in (d for d in range(2, dims.tp + 1) if dims.tp % d == 0):
        for tp_ranks in topo.get_axis_comm_lists("model"):
            for start in range(0, dims.tp, r):
                ranks = tp_ranks[start:start + r]
                group = dist.new_group(ranks=ranks)
                if dist.get_rank() in ranks:
                    replica_groups[r] = group
    return ParallelState(
        dims=dims,
        grid=grid,
        topology=topo,
        tp_rank=coord.model,
        pp_rank=coord.pipe,
        dp_rank=coord.data,
        tp_group=grid.get_slice_parallel_group(),
        dp_group=grid.get_data_parallel_group(),
        replica_groups=replica_groups,
    )


def comm_device() -> str:
    """Where small tensors for collectives live: NCCL reduces only accelerator tensors."""
    return get_accelerator().current_device_name()
