"""Two-rank check of the TP kernel pieces the parity tests do not isolate: gather_last_dim forward
and backward, and vocab-parallel cross entropy (loss and gradient, ignore_index) against the
full-vocabulary computation."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

torch.set_num_threads(1)

from runner.parallel.tensor_parallel import gather_last_dim, vocab_parallel_cross_entropy  # noqa: E402


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(world)))
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
