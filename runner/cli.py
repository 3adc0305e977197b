"""Command line: `runner <command> …` (also `python -m runner`).

Each command lives in the module of its concern; this file only parses arguments and dispatches.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

from runner.errors import UserError, from_the_recipe


def _make_tiny(args: argparse.Namespace) -> int:
    from runner.models.gemma4.tiny import make_tiny

    out = make_tiny(Path(args.out_dir), seed=args.seed, num_hidden_layers=args.layers, dtype=args.dtype)
    print(f"wrote tiny Gemma4 checkpoint to {out}")
    return 0


def _make_data(args: argparse.Namespace) -> int:
    from runner.data.synthetic import make_data

    out = make_data(Path(args.out_dir), n=args.n, seed=args.seed)
    print(f"wrote synthetic MedPix-VQA-shaped dataset to {out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from runner.config import load_config

    with from_the_recipe():
        cfg = load_config(args.recipe, args.set)  # recipe errors before any process group exists
    if args.check:
        return 0
    from runner.train import train

    return train(cfg, ds_config_path=args.ds_config)


def _export(args: argparse.Namespace) -> int:
    from runner.checkpoint.export import export_hf, parse_size

    out = export_hf(Path(args.checkpoint), Path(args.out_dir), max_shard_size=parse_size(args.max_shard_size),
                    source=args.source)
    print(f"wrote HF checkpoint to {out}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from runner.config import load_config

    cfg = load_config(args.recipe, args.set)
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's logger binds to stdout on import: keep it for the plan
        from runner.plan import cluster_world_size, make_plan

    world_size, ds_config = args.world_size, None
    if args.cluster:
        world_size, ds_config = cluster_world_size(args.cluster)
    ds_config = args.ds_config or ds_config
    plan = make_plan(cfg, world_size=world_size, ds_config=ds_config, gpu_mem_gib=args.gpu_mem_gib,
                     fused_attn_max_head_dim=args.fused_attn_max_head_dim)
    print(json.dumps(plan.to_json(), indent=2) if args.json else plan.table())
    for line in plan.warnings:
        print(line, file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="runner", description=__doc__.splitlines()[0])
    # the deepspeed launcher passes --local_rank=N before the command; LOCAL_RANK carries it too
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune as a recipe says (start it under accelerate, deepspeed or torchrun)")
    p.add_argument("recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key, e.g. optim.lr=2e-5")
    p.add_argument("--ds-config", default=None, help="DeepSpeed JSON (default: the launcher's, else ds_configs/ for the device)")
    p.add_argument("--check", action="store_true",
                   help="check the recipe and --set overrides, then exit (launch.sh does this before starting processes)")
    p.set_defaults(func=_train)

    p = sub.add_parser("plan", help="stage -> layers, parameters and memory per GPU for a recipe, without a GPU")
    p.add_argument("recipe")
    p.add_argument("--cluster", default=None, metavar="ACCELERATE_CONFIG_YAML", help="resolve dp 'auto' from its num_processes")
    p.add_argument("--world-size", type=int, default=None, help="resolve dp 'auto' from this many GPUs")
    p.add_argument("--ds-config", default=None, help="DeepSpeed JSON (default: the cluster's, else ds_configs/gpu_bf16_zero1.json)")
    p.add_argument("--gpu-mem-gib", type=float, default=80.0, help="warn when a GPU needs more (default 80)")
    p.add_argument("--fused-attn-max-head-dim", type=int, default=512,
                   help="largest head dim assumed to run fused SDPA; larger ones count materialized scores (default 512)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_plan)

    p = sub.add_parser("make-tiny", help="write a tiny random Gemma4 checkpoint (HF format) with its processor")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=6, help="decoder layers (default 6: 5 sliding + 1 full)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.set_defaults(func=_make_tiny)

    p = sub.add_parser("make-data", help="write a small synthetic dataset in MedPix-VQA's schema (parquet, train/validation)")
    p.add_argument("out_dir")
    p.add_argument("--n", type=int, default=200, help="train rows (validation gets n // 10, at least 1)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_data)

    p = sub.add_parser("export", help="write a native checkpoint as an HF directory (sharded safetensors, config, processor)")
    p.add_argument("checkpoint", help="a checkpoint dir (OUTPUT_DIR/checkpoints/step_N) or the root holding `latest`")
    p.add_argument("out_dir")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB (default 5GB)")
    p.add_argument("--source", default=None,
                   help="HF model dir or Hub id to copy config/tokenizer/processor from (default: the one recorded at save)")
    p.set_defaults(func=_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        return report(err)


def report(err: UserError) -> int:
    """One clear line, no traceback; the exit code of a user error (2)."""
    if _reports(err):
        print(f"error: {err}", file=sys.stderr)
    else:  # give the printing process time before the launcher stops the job on this exit
        time.sleep(2)
    return 2


def _reports(err: UserError) -> bool:
    """One line per job for an error every process raises (`on_every_rank`): rank 0 prints it once
    the process group exists, before that each node's local rank 0; any other error is printed by
    every process that hits it (data or files may fail on one process only)."""
    if not err.on_every_rank:
        return True
    dist = sys.modules.get("torch.distributed")  # not imported: no process group either
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("LOCAL_RANK", "0") == "0"
