"""One rank of a checkpoint test run: load an HF checkpoint into the TP×PP×DP pipeline, optionally
resume from a native checkpoint root, train on synthetic batches whose kind and seed come from the
python/numpy/torch RNGs (so a resume that loses RNG state changes the data), save native
checkpoints at chosen steps, export right after a save. Writes, from TP/DP rank 0 of each stage,
every tensor of the stage (TP-gathered, HF names) after load, after resume and at the end; rank 0 writes the
losses after every step. Launched by tests through torchrun on CPU (gloo)."""

from __future__ import annotations

import json
import os
import random
import signal

import numpy as np
import torch

torch.set_num_threads(1)

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402

from runner.checkpoint.engine import Gemma4CheckpointEngine, install  # noqa: E402
from runner.checkpoint.export import export_after_training  # noqa: E402
from runner.checkpoint.native import resume, save  # noqa: E402
from runner.models.gemma4.pipeline import to_pipe_batch  # noqa: E402
from runner.parallel.tensor_parallel import gather_full  # noqa: E402
from runner.train import step_counts  # noqa: E402

from synthetic import apply_peft_adapter, ds_config, global_batch, load_pipeline, train_step, worker_parser  # noqa: E402

EVAL_SEED = 99


class FailAfterWrite(Gemma4CheckpointEngine):
    """A rank whose storage dies mid-save: its first file is written, then the save raises (and
    leaves `marker`, so the test tells this failure from any other)."""

    marker = ""

    def save(self, state_dict: dict, path: str) -> None:
        super().save(state_dict, path)
        with open(self.marker, "w") as f:
            f.write(path)
        raise RuntimeError(f"injected save failure after writing {path}")


def write_stage_tensors(model, ps, path: str) -> None:
    """Every tensor of this stage under its HF name, TP shards gathered (collective over TP), written
    by TP/DP rank 0."""
    tensors = {name: gather_full(t, ps.tp_group).clone() for name, t, _ in model.hf_tensors()}
    if ps.tp_rank == 0 and ps.dp_rank == 0:
        torch.save(tensors, path)


def main() -> None:
    ap = worker_parser()
    ap.add_argument("--root", required=True, help="native checkpoint root")
    ap.add_argument("--out", required=True, help="where this run writes its results")
    ap.add_argument("--steps", type=int, default=0, help="train until this step")
    ap.add_argument("--save-at", default="", help="comma list of steps to save at (0: right after load)")
    ap.add_argument("--keep", type=int, default=2)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--export", default="", help="export the step-0 checkpoint here")
    ap.add_argument("--fail-save", default="", help="STEP:RANK — that rank's save at that step dies")
    ap.add_argument("--kill-after", type=int, default=-1, help="rank 0 sends itself SIGKILL after this step")
    ap.add_argument("--lora", default="", help="LoRA started from this PEFT adapter directory")
    ap.add_argument("--backend", default="gloo", help="nccl with DS_ACCELERATOR=cuda runs it on GPUs")
    ap.add_argument("--eval-loss", action="store_true", help="at the end, write the eval loss of image batch seed 99")
    args = ap.parse_args()

    random.seed(1234)
    np.random.seed(1234)
    torch.manual_seed(1234)
    ps, config, model = load_pipeline(args, backend=args.backend)
    if args.lora:  # LoRA on the frozen base, started from a PEFT adapter directory
        assert apply_peft_adapter(model, args.ckpt, args.lora)
    write_stage_tensors(model, ps, os.path.join(args.out, f"load_stage{ps.pp_rank}.pt"))

    micro_per_step = len(global_batch(config, "text"))
    gas = micro_per_step // args.dp
    ds = ds_config(gas, args.dp, clipping=1.0, scheduler={
        "type": "WarmupLR",
        "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-3, "warmup_num_steps": 10, "warmup_type": "linear"},
    })
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    install(engine)

    start = 0
    if args.resume:
        start = resume(engine, args.root)["step"]
        write_stage_tensors(model, ps, os.path.join(args.out, f"resume_stage{ps.pp_rank}.pt"))
    save_at = {int(s) for s in args.save_at.split(",") if s}
    fail_step, fail_rank = (int(x) for x in args.fail_save.split(":")) if args.fail_save else (-1, -1)

    def checkpoint(step: int) -> None:
        if step == fail_step and dist.get_rank() == fail_rank:
            engine.checkpoint_engine = FailAfterWrite(model, engine.checkpoint_engine.inner)
            engine.checkpoint_engine.marker = os.path.join(args.out, "injected_failure.txt")
        path = save(engine, args.root, step, {"step": step}, source=args.ckpt, keep=args.keep)
        if step == 0 and args.export:
            export_after_training(path, args.export)

    if 0 in save_at and not args.resume:
        checkpoint(0)
    losses: dict[int, float] = {}
    for step in range(start + 1, args.steps + 1):
        seed = random.randrange(10**6) ^ int(np.random.randint(10**6)) ^ int(torch.randint(10**6, (1,)))
        micro = global_batch(config, ("text", "image")[step % 2], seed=seed)
        losses[step] = train_step(engine, model, ps, micro, gas, step=step)
        if dist.get_rank() == 0:  # whole or absent: a test polls this file while the job runs
            tmp = os.path.join(args.out, "losses.json.tmp")
            with open(tmp, "w") as f:
                json.dump(losses, f)
            os.replace(tmp, os.path.join(args.out, "losses.json"))
        if step in save_at:
            checkpoint(step)
        if step == args.kill_after and dist.get_rank() == 0:
            os.kill(os.getpid(), signal.SIGKILL)
    write_stage_tensors(model, ps, os.path.join(args.out, f"final_stage{ps.pp_rank}.pt"))
    if args.eval_loss:  # what `runner train`'s eval computes, on one fixed global batch
        mine = global_batch(config, "image", seed=EVAL_SEED)[ps.dp_rank * gas:(ps.dp_rank + 1) * gas]
        model.token_loss.set_label_count(step_counts(mine, ps)[0], gas)
        loss = float(engine.eval_batch(iter([to_pipe_batch(m) for m in mine]), num_micro_batches=gas))
        if dist.get_rank() == 0:
            with open(os.path.join(args.out, "eval_loss.json"), "w") as f:
                json.dump(loss, f)
    dist.barrier()
    dist.destroy_process_group()  # a gloo group torn down at interpreter exit can abort the process


if __name__ == "__main__":
    main()
