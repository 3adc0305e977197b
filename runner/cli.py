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
from typing import NoReturn

from runner.errors import UserError, from_the_recipe

ERROR_FILE_ENV = "RUNNER_ERROR_FILE"
PLAN_COLUMNS = """\
One row per pipeline stage, as one of its GPUs sees it (every TP rank and DP replica of a stage holds the same):
  stage           pipeline stage, 0 the first
  decoder layers  the decoder layers it runs: first-last (count)
  holds           what else it holds: vision (tower + projector), embedding, final norm, head ("tied": one weight)
  params/GPU      parameters on one GPU: its TP slice of the matrices, norms and the vision tower whole
  trainable       of those, the ones freeze.* leaves trained
  in-flight       micro-batches whose activations the stage keeps at once under DeepSpeed's 1F1B schedule:
                  min(pp - stage, micro-batches per step)
then GiB per GPU:
  weights         the parameters in model.dtype
  grads           the trainable parameters' gradients (bytes per parameter: the note under the table)
  optim           fp32 master weights (bf16 or ZeRO) + Adam's m and v of the trainable parameters, / dp under ZeRO-1
  bucket          what the gradient reduction holds during backward: ZeRO's bucket(s), or the BF16 optimizer's
                  bf16 copy of the gradients
  activ           activations: in-flight x what one micro-batch keeps for backward (checkpointed layers' inputs,
                  the other layers' saved tensors, the stage's input/output) + the largest working set (a layer's
                  recompute and backward, the head's logits) + the pipeline's two receive buffers
  reduce          ZeRO's reduce after the last backward (with contiguous_gradients a flat copy of the gradients)
  step            the ZeRO step's fp32 copy of one optimizer group's gradients
  overhd          CUDA context, cuBLAS workspaces and NCCL buffers, outside torch's allocator
  total           weights + grads + optim + overhd + the largest of bucket + activ, reduce and step (the last
                  two come after the activations are freed); compared with the card: cluster.gpu_mem_gib of the
                  recipe, or --gpu-mem-gib. total - overhd is what torch.cuda.max_memory_allocated measures.
Under the rows: the least recompute (train.recompute_num_layers) that fits 90% of the card, when less than the
recipe's, and each stage's model TFLOP per micro-batch and GPU with the parallel.stage_layers split that
evens them out. A WARNING line (stderr) names each stage that does not fit and the settings that help.
"""


def _make_tiny(args: argparse.Namespace) -> int:
    from runner.models.gemma4.tiny import make_tiny

    out = make_tiny(Path(args.out_dir), seed=args.seed, num_hidden_layers=args.layers, dtype=args.dtype, like=args.like)
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
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's import logs to stdout
            from runner.preflight import check_not_locked, preflight, summary

            checked = preflight(cfg, world_size=args.world_size)
            with from_the_recipe():
                check_not_locked(Path(cfg.output.dir))
        print(f"ok: {args.recipe} ({summary(cfg, checked, args.world_size)})")
        return 0
    from runner.quiet import quiet_libraries, set_verbose

    set_verbose(args.verbose)
    quiet_libraries()
    from runner.train import train

    return train(cfg, ds_config_path=args.ds_config)


def _export(args: argparse.Namespace) -> int:
    from runner.checkpoint.export import export_hf, parse_size
    from runner.compat import ADAPTER_CONFIG_NAME

    out = export_hf(Path(args.checkpoint), Path(args.out_dir), max_shard_size=parse_size(args.max_shard_size),
                    source=args.source, merge=args.merge)
    print(f"wrote {'PEFT adapter' if (out / ADAPTER_CONFIG_NAME).is_file() else 'HF checkpoint'} to {out}")
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
    if not plan.fits:
        from runner.plan import layout_proposal, smallest_fitting_layout

        proposal = smallest_fitting_layout(cfg, ds_config=ds_config, gpu_mem_gib=plan.gpu_mem_gib,
                                           fused_attn_max_head_dim=args.fused_attn_max_head_dim)
        print(layout_proposal(proposal, plan.gpu_mem_gib), file=sys.stderr)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from runner.evaluate import run_evaluation, summary_line

    metrics = run_evaluation(args.model_dir, args.data, args.split, args.out, max_samples=args.max_samples,
                             max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    print(f"{args.model_dir} on {args.data} [{args.split}], {metrics['n']} questions: {summary_line(metrics)}")
    return 0


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one `error:` line naming the command's --help (exit 2), like the
    runner's other errors, instead of the usage block and a second line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="runner", description=__doc__.splitlines()[0])
    # the deepspeed launcher passes --local_rank=N before the command; LOCAL_RANK carries it too
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune as a recipe says (start it under accelerate, deepspeed or torchrun)")
    p.add_argument("recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key, e.g. optim.lr=2e-5")
    p.add_argument("--ds-config", default=None, help="DeepSpeed JSON (default: the launcher's, else ds_configs/ for the device)")
    p.add_argument("--check", action="store_true",
                   help="check the recipe, model, data, output dir and checkpoint as the run would before building "
                        "the model, then exit (launch.sh does this before starting processes)")
    p.add_argument("--world-size", type=int, default=None,
                   help="with --check: the launcher's process count, which tp*pp must divide")
    p.add_argument("--verbose", action="store_true",
                   help="keep every library message (DeepSpeed's INFO logging and prints, torch's warnings) and every "
                        "process's bad-sample lines; RUNNER_VERBOSE=1 in the environment does the same")
    p.set_defaults(func=_train)

    p = sub.add_parser("plan", help="stage -> layers, parameters and memory per GPU for a recipe, without a GPU",
                       description="Stage -> layers, parameters and memory per GPU for a recipe, without a GPU.",
                       epilog=PLAN_COLUMNS, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("--cluster", default=None, metavar="ACCELERATE_CONFIG_YAML", help="resolve dp 'auto' from its num_processes")
    p.add_argument("--world-size", type=int, default=None, help="resolve dp 'auto' from this many GPUs")
    p.add_argument("--ds-config", default=None, help="DeepSpeed JSON (default: the cluster's, else ds_configs/gpu_bf16_zero1.json)")
    p.add_argument("--gpu-mem-gib", type=float, default=None,
                   help="one GPU's memory in GiB; warn when a stage needs more (default: the recipe's "
                        "cluster.gpu_mem_gib, 80)")
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
    p.add_argument("--like", choices=["31b", "26b-a4b", "e2b", "e4b"], default="31b",
                   help="family member whose structure to copy: 31b (dense, default), 26b-a4b (mixture of experts), "
                        "e2b, e4b (per-layer embeddings, KV-shared layers)")
    p.set_defaults(func=_make_tiny)

    p = sub.add_parser("make-data", help="write a small synthetic dataset in MedPix-VQA's schema (parquet, train/validation)")
    p.add_argument("out_dir")
    p.add_argument("--n", type=int, default=200, help="train rows (validation gets n // 10, at least 1)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_data)

    p = sub.add_parser("export", help="write a native checkpoint as an HF directory (sharded safetensors, config, "
                                      "processor), a LoRA one as a PEFT adapter directory")
    p.add_argument("checkpoint", help="a checkpoint dir (OUTPUT_DIR/checkpoints/step_N) or the root holding `latest`")
    p.add_argument("out_dir")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB (default 5GB)")
    p.add_argument("--source", default=None,
                   help="HF model dir or Hub id to copy config/tokenizer/processor from (default: the one recorded at save)")
    p.add_argument("--merge", action="store_true",
                   help="a LoRA checkpoint: full HF weights with the adapters merged (default: a PEFT adapter dir)")
    p.set_defaults(func=_export)

    p = sub.add_parser("evaluate",
                       help="greedy answers of an HF Gemma4 dir on a VQA/chat split: exact match, F1, yes/no accuracy")
    p.add_argument("model_dir", help="a base model or a training run's OUTPUT_DIR/export")
    p.add_argument("--data", required=True,
                   help="dataset as data.train takes it (hub id, local dir or file, chat JSONL)")
    p.add_argument("--split", default="validation", help="split, with slicing, e.g. validation or train[90%%:]")
    p.add_argument("--max-samples", type=int, default=0, help="the first N samples of the split (default 0: all)")
    p.add_argument("--out", default=None, help="where eval_metrics.json and predictions.jsonl go "
                                               "(default MODEL_DIR/eval; for a Hub id eval/OWNER--NAME)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    from runner.requirements import check_requirements

    args = build_parser().parse_args(argv)
    try:
        check_requirements()  # before any command imports the libraries
        return args.func(args)
    except UserError as err:
        return report(err)
    except RuntimeError as err:
        if not _lost_peer(err):
            raise
        # another process failed first and said why; this one's trace would bury that line
        print(f"stopped: another process of the job failed ({str(err).splitlines()[0][:200]})", file=sys.stderr)
        return 1


def report(err: UserError) -> int:
    """One clear line, no traceback (printed by one process); the exit code of a user error (2)."""
    if _reports(err):
        print(f"error: {err}", file=sys.stderr)
        _mark_user_error(err)
    else:  # give the printing process time before the launcher stops the job on this exit
        time.sleep(2)
    return 2


def _mark_user_error(err: UserError) -> None:
    """Tell launch.sh the job failed with a user error (launchers turn exit code 2 into 1): the
    reporting process writes its line to the file launch.sh names in RUNNER_ERROR_FILE."""
    path = os.environ.get(ERROR_FILE_ENV)
    if path:
        with contextlib.suppress(OSError):
            with open(path, "a") as f:
                f.write(f"error: {err}\n")


def _lost_peer(err: RuntimeError) -> bool:
    """A collective failed because another process of the job is gone (it exited on an error)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return False
    return isinstance(err, dist.DistNetworkError) or any(
        text in str(err) for text in ("Connection closed by peer", "Connection reset by peer"))


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
