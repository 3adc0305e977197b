"""One rank of a run-safety test, launched through torchrun on CPU (gloo): the (tp, pp, dp) pipeline
saves a checkpoint at step 0 (keep 1), then rank 1 puts a NaN into one of its weights and saves step 1.
A user error ends it the way `runner` does (one `error:` line per job, exit 2)."""

from __future__ import annotations

import sys

import torch

torch.set_num_threads(1)

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402

from runner.checkpoint.native import save  # noqa: E402
from runner.cli import report  # noqa: E402
from runner.errors import UserError  # noqa: E402

from synthetic import ds_config, load_pipeline, worker_parser  # noqa: E402


def poison(args) -> None:
    _, _, model = load_pipeline(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(1, args.dp))
    save(engine, args.root, 0, {"step": 0}, source=args.ckpt, keep=1)
    if dist.get_rank() == 1:
        next(model.parameters()).data.view(-1)[0] = float("nan")
    save(engine, args.root, 1, {"step": 1}, source=args.ckpt, keep=1)


def main() -> int:
    ap = worker_parser()
    ap.add_argument("--root", required=True, help="checkpoint root")
    args = ap.parse_args()
    try:
        poison(args)
    except UserError as err:
        return report(err)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
