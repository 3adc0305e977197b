"""Two-rank check of the TP kernel pieces the parity tests do not isolate: gather_last_dim forward
and backward, the sequence-parallel ops (split, gather, reduce-scatter over the sequence; micro-batch
of 3 so the sequence-first views are real copies), and vocab-parallel cross entropy (loss and
gradient, ignore_index) against the full-vocabulary computation."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

torch.set_num_threads(1)

from runner.errors import UserError  # noqa: E402
from runner.models.gemma4.stages import HeadSharedRMSNorm  # noqa: E402
from runner.parallel.tensor_parallel import (  # noqa: E402
    ColumnParallelLinear,
    gather_last_dim,
    gather_seq,
    reduce_scatter_seq,
    split_seq,
    vocab_parallel_cross_entropy,
)


def check_partial_gradients_stay_local(group, rank: int) -> None:
    """A q/k-norm scale and a replicated KV projection keep this rank's part of their gradient through
    backward (no all-reduce per use); they are marked for the pipeline's once-per-step sum."""
    norm = HeadSharedRMSNorm(4, 1e-6, group, fused=True)
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(rank))
    norm(x).sum().backward()
    expected = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).sum((0, 1))
    assert torch.allclose(norm.weight.grad, expected, atol=1e-5) and norm.weight.grad_sum_group is group
    kv = ColumnParallelLinear(4, 3, group, replicas=2, replica_group=group)
    kv(x).sum().backward()
    assert torch.allclose(kv.weight.grad, x.sum((0, 1)).expand(3, 4)) and kv.weight.grad_sum_group is group


def check_sequence_ops(group, rank: int, world: int) -> None:
    """Each op and its backward against the whole-sequence arithmetic: rank r's upstream gradient
    is (r + 1) · w, so every sum over ranks is visible."""
    gen = torch.Generator().manual_seed(1)
    full = torch.randn(3, 4 * world, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(full.shape, generator=gen, dtype=torch.float64)
    mine = slice(4 * rank, 4 * (rank + 1))
    ranks_sum = sum(range(1, world + 1))

    x = full.clone().requires_grad_(True)
    part = split_seq(x, group)
    assert torch.equal(part, full[:, mine])
    (part * (rank + 1) * w[:, mine]).sum().backward()
    assert torch.equal(x.grad, torch.cat([(r + 1) * w[:, 4 * r:4 * (r + 1)] for r in range(world)], dim=1))

    sliced = full[:, mine].clone().requires_grad_(True)
    whole = gather_seq(sliced, group)
    assert torch.equal(whole, full)
    (whole * (rank + 1) * w).sum().backward()
    assert torch.allclose(sliced.grad, ranks_sum * w[:, mine])

    partial = ((rank + 1) * full).requires_grad_(True)
    reduced = reduce_scatter_seq(partial, group)
    assert torch.allclose(reduced, ranks_sum * full[:, mine])
    (reduced * (rank + 1) * w[:, mine]).sum().backward()
    assert torch.allclose(partial.grad, torch.cat([(r + 1) * w[:, 4 * r:4 * (r + 1)] for r in range(world)], dim=1))

    try:
        split_seq(full[:, :4 * world - 1], group)
    except UserError as e:
        assert "data.pad_to_multiple_of" in str(e)
    else:
        raise AssertionError("an odd sequence length split without an error")


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(world)))
    check_sequence_ops(group, rank, world)
    check_partial_gradients_stay_local(group, rank)
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(3, 5, 8 * world, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 8 * world, (3, 5), generator=gen)
    target[0, :2] = -100
    shard = full.chunk(world, dim=-1)[rank].clone().requires_grad_(True)

    gathered = gather_last_dim(shard, group)
    assert torch.equal(gathered, full)
    (gathered * torch.arange(gathered.numel(), dtype=full.dtype).view_as(gathered)).sum().backward()
    weights = torch.arange(full.numel(), dtype=full.dtype).view_as(full)
    assert torch.equal(shard.grad, weights.chunk(world, dim=-1)[rank])

    shard.grad = None
    loss = vocab_parallel_cross_entropy(shard, target, rank * 8, group).sum()
    loss.backward()
    ref_full = full.clone().requires_grad_(True)
    ref = F.cross_entropy(ref_full.reshape(-1, full.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum")
    ref.backward()
    assert torch.allclose(loss.double(), ref, rtol=1e-6), (float(loss), float(ref))
    assert torch.allclose(shard.grad.double(), ref_full.grad.chunk(world, dim=-1)[rank], rtol=1e-5, atol=1e-7)
    print(f"rank {rank} ok", file=sys.stderr)
    dist.barrier()
    dist.destroy_process_group()  # a gloo group torn down at interpreter exit can abort the process


if __name__ == "__main__":
    main()
