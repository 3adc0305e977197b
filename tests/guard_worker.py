"""One rank of a run-safety test, launched through torchrun on CPU (gloo); a user error ends it the way
`runner` does (one `error:` line per job, exit 2).

  --mode timeout  the process group of `runner train` with parallel.timeout_minutes=--minutes; rank 1
                  sleeps while rank 0 waits in an all-reduce of step 1
  --mode poison   the (tp, pp, dp) pipeline saves a checkpoint at step 0 (keep 1), then rank 1 puts a NaN
                  into one of its weights and saves step 1
"""

from __future__ import annotations

import sys
import time

import torch

torch.set_num_threads(1)

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402

from runner.checkpoint.native import save  # noqa: E402
from runner.cli import report  # noqa: E402
from runner.errors import UserError  # noqa: E402
from runner.guard import collective_timeout  # noqa: E402
from runner.train import init_distributed  # noqa: E402

from synthetic import ds_config, load_pipeline, worker_parser  # noqa: E402


def timeout(minutes: float) -> None:
    init_distributed(minutes)
    with collective_timeout(minutes) as where:
        where.at = "in step 1"
        if dist.get_rank() == 1:
            time.sleep(600)  # frozen: the launcher ends it once rank 0 has failed
        dist.all_reduce(torch.zeros(1))


def poison(args) -> None:
    ps, _, model = load_pipeline(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(1, args.dp))
    save(engine, args.root, 0, {"step": 0}, source=args.ckpt, keep=1)
    if dist.get_rank() == 1:
        next(model.parameters()).data.view(-1)[0] = float("nan")
    save(engine, args.root, 1, {"step": 1}, source=args.ckpt, keep=1)


def main() -> int:
    ap = worker_parser()
    ap.add_argument("--mode", choices=["timeout", "poison"], required=True)
    ap.add_argument("--minutes", type=float, default=0.05)
    ap.add_argument("--root", default="", help="checkpoint root (poison)")
    args = ap.parse_args()
    try:
        if args.mode == "timeout":
            timeout(args.minutes)
        else:
            poison(args)
    except UserError as err:
        return report(err)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
