"""`runner train RECIPE`: build everything, then a plain loop of `train_batch` steps.

Order matters for the user: everything that can be checked without processes or weights (recipe,
layout, dataset) fails first, in one line; the model is built straight on the accelerator; weights
come from the newest complete checkpoint when resuming, else from the HF checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from runner.checkpoint import native
from runner.checkpoint.export import export_after_training
from runner.checkpoint.hf_load import load_hf_weights
from runner.compat import skip_deepspeed_shm_comm
from runner.config import RunConfig, fp32_grad_accum, load_deepspeed_json, micro_batches_per_step, runs_zero_optimizer
from runner.data.collate import Gemma4Collator
from runner.data.loader import BadSampleReport, MicroBatchLoader
from runner.data.packing import Packer
from runner.data.sampler import StepSampler
from runner.data.sources import SampleSource
from runner.errors import UserError, from_the_recipe
from runner.evaluate import generate_on_export
from runner.guard import (
    Where,
    any_rank,
    collective_timeout,
    is_finite,
    nonfinite_error,
    one_error_for_the_job,
    output_lock,
    set_collective_timeout,
)
from runner.lora import apply_lora, base_identity, seed_dropout
from runner.metrics import MetricsLogger, mem_gib, peak_flops_per_device, train_flops_per_token
from runner.models.gemma4.moe import is_moe, router_stats, set_balance_scale
from runner.models.gemma4.pipeline import (
    Gemma4Pipeline,
    count_label_tokens,
    to_pipe_batch,
)
from runner.optim import build_optimizer, lr_lambda, matrix_group_count
from runner.parallel.topology import ParallelDims, ParallelState, build_parallel_state, comm_device
from runner.preflight import Checked, check_not_past_end, preflight
from runner.profiling import profile_step
from runner.quiet import verbose

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def use_expandable_segments() -> None:
    """Before CUDA's allocator starts: segments that grow in place instead of fixed blocks. Near the
    card's limit the full 31B otherwise OOMed with 8-11 GiB reserved but unallocated (4x H200).
    A setting of the user's own wins."""
    if not (os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF")):
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def free_port() -> int:
    """A TCP port free now: a fixed one collides with another job, benchmark or test run on the same host."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def init_distributed(timeout_minutes: float = 30.0) -> None:
    """Join the job the launcher (accelerate, deepspeed or torchrun) started; gloo on CPU. A collective
    that waits longer than `timeout_minutes` for a rank fails instead of hanging the job."""
    if not dist.is_initialized():
        if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:  # started without a launcher: one process
            for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                               "MASTER_PORT": str(free_port())}.items():
                os.environ.setdefault(key, value)
        cpu = get_accelerator().device_name() == "cpu"
        use_expandable_segments()
        if not cpu:  # before building anything: each rank its own GPU, not GPU 0
            get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", 0)))
        skip_deepspeed_shm_comm()  # CPU: gloo's collectives, not a C++ op compiled on first start
        deepspeed.init_distributed(dist_backend="gloo" if cpu else get_accelerator().communication_backend_name(),
                                   timeout=timedelta(minutes=timeout_minutes))


def parallel_dims(cfg: RunConfig, world_size: int) -> ParallelDims:
    tp, pp, dp = cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.dp
    if dp == "auto":
        if world_size % (tp * pp):
            raise UserError(f"{world_size} processes cannot be split into tp*pp = {tp}*{pp} groups; "
                            f"launch a multiple of {tp * pp} processes")
        dp = world_size // (tp * pp)
    dims = ParallelDims(tp, pp, dp, cfg.parallel.sequence_parallel, cfg.parallel.ep)
    dims.validate(world_size)
    return dims


def deepspeed_config(cfg: RunConfig, dims: ParallelDims, gas: int, path: str | None) -> tuple[dict, bool]:
    """The DeepSpeed JSON (from the launcher, `--ds-config` or the default for the device) with its
    "auto" batch and clipping fields filled from the recipe. Returns (config, fp32_path)."""
    default = "cpu_fp32.json" if get_accelerator().device_name() == "cpu" else "gpu_bf16_zero1.json"
    path = path or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or str(ROOT / "ds_configs" / default)
    ds = load_deepspeed_json(path)
    bf16 = cfg.model.dtype == "bfloat16"
    ds.setdefault("bf16", {})["enabled"] = bf16
    zero = ds.get("zero_optimization", {}).get("stage", 0)
    if zero >= 2 or ds.get("fp16", {}).get("enabled"):
        raise UserError(f"DeepSpeed config {path}: the pipeline engine supports ZeRO stage 0 or 1 and bf16/fp32, "
                        f"not {'fp16' if zero < 2 else f'ZeRO stage {zero}'}; use ds_configs/gpu_bf16_zero1.json")
    if ds.get("pipeline", {}).get("activation_checkpoint_interval", 0):
        raise UserError(f"DeepSpeed config {path}: pipeline.activation_checkpoint_interval overrides the recipe's "
                        f"checkpointing; remove it and set train.activation_checkpointing / train.recompute_num_layers")
    if bf16 and fp32_grad_accum(ds) and runs_zero_optimizer(ds, bf16):
        raise UserError(f"DeepSpeed config {path}: ZeRO's optimizer with bf16 weights and data_types.grad_accum_dtype "
                        f"fp32 (here with offload_optimizer) parks gradients where the pipeline's tied and replicated "
                        f"weight sums do not see them; drop offload_optimizer or the fp32 grad_accum_dtype")
    fp32_path = not bf16 and zero == 0
    fills = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "train_batch_size": cfg.train.micro_batch_size * gas * dims.dp,
        # on the fp32 path the optimizer clips by the true TP×PP norm (see runner/optim.py)
        "gradient_clipping": 0.0 if fp32_path else cfg.train.grad_clip,
    }
    for key, value in fills.items():
        if ds.get(key, "auto") not in ("auto", value) and not (key == "gradient_clipping" and fp32_path):
            raise UserError(f"DeepSpeed config {path}: {key}={ds[key]} contradicts the recipe ({value}); set it to \"auto\"")
        ds[key] = value
    ds.setdefault("pipeline", {}).update({"pipe_partitioned": False, "grad_partitioned": False})
    return ds, fp32_path


def build_loader(cfg: RunConfig, source: SampleSource, processor, dims: ParallelDims, ps: ParallelState,
                 gas: int, seed: int, split: str, keep_tail: bool = False) -> MicroBatchLoader:
    """This DP replica's micro-batches of one dataset split (`split`: data.train or data.eval, for
    errors; the same on all its TP/PP ranks). `keep_tail`: the last partial global batch too (eval)."""
    collator = Gemma4Collator(processor, max_length=cfg.data.max_length, thinking_prefix=cfg.data.thinking_prefix,
                              buckets=cfg.data.buckets or None, pad_to_multiple_of=cfg.data.pad_to_multiple_of)
    lengths = None
    if cfg.data.group_by_length:
        lengths = collator.estimate_lengths([source.text_and_images(i) for i in range(len(source))])
    try:
        sampler = StepSampler(len(source), cfg.train.micro_batch_size, gas, dims.dp, ps.dp_rank, seed=seed,
                              lengths=lengths, keep_tail=keep_tail)
    except UserError as err:
        raise UserError(f"{split}: {err}", on_every_rank=True) from None
    packer = None
    if cfg.data.packing:
        packer = Packer(cfg.data.pack_length, cfg.train.micro_batch_size, collator.pad_id, collator.max_patches,
                        collator.patch_dim, cfg.data.pad_to_multiple_of)
    # one process per DP replica (its first) names the bad samples it read; every replica's counts per epoch
    first_of_replica = ps.tp_rank == 0 and ps.pp_rank == 0
    report = BadSampleReport(split, speaks=first_of_replica or verbose(), every_time=verbose(),
                             dp_group=ps.dp_group if dims.dp > 1 and first_of_replica and not verbose() else None)
    return MicroBatchLoader(source, collator, sampler, num_workers=cfg.data.num_workers, on_bad=cfg.data.on_bad_sample,
                            packer=packer, report=report)


class StepCounts(NamedTuple):
    """A global batch's sizes, over all its micro-batches and DP ranks."""

    labels: int  # label tokens
    tokens: int  # non-pad tokens
    skipped: int  # samples skipped as bad this epoch
    slots: int  # token slots, non-pad and pad
    micro_batches: int


def step_counts(micro_batches: list[dict[str, torch.Tensor]], ps: ParallelState, skipped: int = 0) -> StepCounts:
    """The global batch's `StepCounts` in one all-reduce (`skipped`: this rank's; `attention_mask` is 0 on
    padding, a 0/1 mask or packed document ids)."""
    local = torch.tensor([
        sum(count_label_tokens(m["labels"]) for m in micro_batches),
        sum(int((m["attention_mask"] > 0).sum()) for m in micro_batches),
        skipped,
        sum(m["input_ids"].numel() for m in micro_batches),
        len(micro_batches),
    ], dtype=torch.float64, device=comm_device())
    if ps.dims.dp > 1:
        dist.all_reduce(local, group=ps.dp_group)
    return StepCounts(*(int(x) for x in local))


def set_micro_batches(engine, count: int) -> None:
    """This step's number of micro-batches on this DP replica (packed steps differ per step and replica),
    through DeepSpeed's own setter, which keeps the micro-batch size."""
    if count != engine.gradient_accumulation_steps():
        engine.set_train_batch_size(engine.train_micro_batch_size_per_gpu() * count * engine.dp_world_size)


def data_state(loader: MicroBatchLoader, ps: ParallelState) -> dict:
    """The data position for a checkpoint, with every DP rank's skip counts: DeepSpeed writes the
    client state of DP rank 0 only, and each rank skipped its own samples."""
    state = loader.state_dict()
    if ps.dims.dp > 1:
        counts: list = [None] * ps.dims.dp
        dist.all_gather_object(counts, {k: state[k] for k in ("skipped", "skipped_per_epoch")}, group=ps.dp_group)
        state["skipped_by_dp_rank"] = counts
    return state


def finished(cfg: RunConfig, step: int, total_steps: int, loader: MicroBatchLoader) -> bool:
    """`train.max_steps` counts optimizer steps; `train.epochs` counts the global batches the sampler
    delivered, so a batch whose samples were all skipped (no step) still spends its share of the epoch."""
    return (step if cfg.train.max_steps else loader.steps_delivered) >= total_steps


def spans_an_epoch(loader: MicroBatchLoader, empty_in_a_row: int) -> bool:
    """Whether the last `empty_in_a_row` global batches (no label tokens) hold every batch of an epoch."""
    delivered, per_epoch = loader.steps_delivered, loader.sampler.steps_per_epoch
    return (delivered // per_epoch - 1) * per_epoch >= delivered - empty_in_a_row


def save_checkpoint(engine, root: Path, step: int, loader: MicroBatchLoader, ps: ParallelState, source: str | Path,
                    keep: int, nonfinite_steps: int) -> Path:
    """A native checkpoint of `step` with the data position (for an exact resume) and the run's count of
    updates skipped as non-finite."""
    return native.save(engine, root, step, {"step": step, "data": data_state(loader, ps),
                                            "nonfinite_steps": nonfinite_steps}, source=source, keep=keep)


class StopFlag:
    """SIGTERM asks for a clean stop: the step in flight finishes, a checkpoint is saved, exit 0."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True


def evaluate(engine, model: Gemma4Pipeline, loader: MicroBatchLoader, ps: ParallelState, max_batches: int) -> dict:
    """Token-weighted loss over `max_batches` global batches (the whole split when 0, its last partial
    global batch included). A global batch without label tokens (its samples all skipped as bad: the
    tail may hold one sample) adds nothing; every rank skips it, the count being global."""
    steps = loader.sampler.steps_per_epoch if max_batches == 0 else min(max_batches, loader.sampler.steps_per_epoch)
    loader.rewind()
    total, labels = 0.0, 0
    for _ in range(steps):
        micro = loader.next_step()
        n_labels = step_counts(micro, ps)[0]
        if n_labels == 0:
            continue
        model.token_loss.set_label_count(n_labels, len(micro))
        loss = engine.eval_batch(iter([to_pipe_batch(m) for m in micro]), num_micro_batches=len(micro))
        total += float(loss) * n_labels
        labels += n_labels
    return {"loss": total / max(labels, 1), "label_tokens": labels}


def train(cfg: RunConfig, ds_config_path: str | None = None) -> int:
    checked = preflight(cfg, world_size=int(os.environ.get("WORLD_SIZE", 1)))  # before anything is built
    init_distributed(cfg.parallel.timeout_minutes)
    with collective_timeout(cfg.parallel.timeout_minutes) as where, output_lock(Path(cfg.output.dir)):
        return _train(cfg, ds_config_path, checked, where)


def _train(cfg: RunConfig, ds_config_path: str | None, checked: Checked, where: Where) -> int:
    """The job once it holds the output dir; `where` tells a collective timeout what was running."""
    model_dir, config, processor = checked.model_dir, checked.config, checked.processor
    train_source, eval_source, resume_from = checked.train_source, checked.eval_source, checked.resume_from
    world, rank = dist.get_world_size(), dist.get_rank()
    with from_the_recipe():  # the recipe, the DeepSpeed config and the world size: the same on every process
        dims = parallel_dims(cfg, world)
        gas = micro_batches_per_step(cfg.train, dims.dp)
        ds_config, fp32_path = deepspeed_config(cfg, dims, gas, ds_config_path)

    torch.manual_seed(cfg.train.seed)
    ps = build_parallel_state(dims)
    train_data = build_loader(cfg, train_source, processor, dims, ps, gas, cfg.train.seed, "data.train")
    eval_data = None if eval_source is None else build_loader(cfg, eval_source, processor, dims, ps, gas,
                                                               cfg.train.seed, "data.eval", keep_tail=True)
    total_steps = cfg.train.max_steps or cfg.train.epochs * train_data.sampler.steps_per_epoch

    out_dir = Path(cfg.output.dir)
    ckpt_root = out_dir / "checkpoints"
    resuming = resume_from is not None
    if resuming:  # the layout, before building the model (minutes on the 31B)
        zero = ds_config.get("zero_optimization", {}).get("stage", 0) >= 1
        meta = native.check_resumable(resume_from, dims, zero=zero, sizes=checked.resume_sizes)
        if meta["step"] == total_steps:  # nothing left to train
            if rank == 0:
                export = out_dir / "export"
                found = f"its export is {export}" if export.is_dir() else f"export it: runner export {resume_from} OUT"
                print(f"the run in {out_dir} is finished ({resume_from} is step {total_steps} of {total_steps}); "
                      f"{found}, or raise train.max_steps to train on", flush=True)
            dist.destroy_process_group()
            return 0
        check_not_past_end(resume_from, meta["step"], total_steps)

    device = get_accelerator().current_device_name()
    with torch.device(device):
        model = Gemma4Pipeline(config, ps, activation_checkpoint_interval=int(cfg.train.activation_checkpointing),
                               fused_rms_norm=cfg.model.fused_rms_norm, gemm_backward=cfg.model.wide_head_gemm,
                               stage_layers=cfg.parallel.stage_layers,
                               recompute_num_layers=cfg.train.recompute_num_layers)
    model.to(DTYPES[cfg.model.dtype])
    with one_error_for_the_job():  # a stage's weights or adapter keys: one line for the job
        if not resuming or cfg.lora.enabled:  # a resumed run takes every weight from its checkpoint, but a LoRA base
            load_hf_weights(model, model_dir)
        model.freeze(**vars(cfg.freeze))
        if cfg.lora.enabled:
            apply_lora(model, cfg.lora, cfg.train.seed, base_identity(model_dir, cfg.model.path))
    optimizer = build_optimizer(
        model, cfg.optim, ps, fp32_path=fp32_path, max_grad_norm=cfg.train.grad_clip, device=comm_device(),
        zero_optimizer=runs_zero_optimizer(ds_config, bf16=cfg.model.dtype == "bfloat16"),
        matrix_groups=matrix_group_count(model.stage_layer_counts(), not cfg.freeze.language_model))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, total_steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    set_collective_timeout(cfg.parallel.timeout_minutes)  # every group exists now

    step = nonfinite_steps = 0  # nonfinite_steps: updates skipped for an inf/NaN loss or grad norm, whole run
    if resuming:
        client = native.resume(engine, resume_from)
        step, nonfinite_steps = client["step"], client.get("nonfinite_steps", 0)
        train_data.load_state_dict(client["data"])
    logger = MetricsLogger(out_dir, total_steps, rank == 0, cfg.logging.tensorboard, cfg.logging.progress_bar,
                           start_step=step)
    if rank == 0:
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        sp = " with sequence parallelism" if dims.sequence_parallel and dims.tp > 1 else ""
        shape = f"{gas} micro-batches of {cfg.train.micro_batch_size}"
        if cfg.data.packing:
            rows = "row" if cfg.train.micro_batch_size == 1 else "rows"
            shape = f"up to {shape} packed {rows} of at most {cfg.data.pack_length} tokens"
        print(f"training {model_dir} at tp={dims.tp} pp={dims.pp} dp={dims.dp}{sp}, {shape} per step, "
              f"steps {step + 1}..{total_steps}"
              + (f" (resumed from {resume_from})" if resuming else ""), flush=True)
        if cfg.model.attn_implementation == "flex_attention":
            print("flex_attention: the first step compiles its kernels (200 s on 4x H100 at one length); a new "
                  "sequence length may compile again: pad to one length (data.pad_to_multiple_of; with packing, "
                  "data.pack_length)", flush=True)
    stop = StopFlag()
    flops_per_token = None
    peak = peak_flops_per_device()
    last_ckpt = resume_from if resuming else native.latest_complete(ckpt_root)
    empty_in_a_row = 0  # global batches whose samples were all skipped as bad
    nonfinite_in_a_row = 0

    def save(at_step: int) -> Path:
        return save_checkpoint(engine, ckpt_root, at_step, train_data, ps, model_dir, cfg.checkpoint.keep,
                               nonfinite_steps)

    while not finished(cfg, step, total_steps, train_data):
        where.at = f"in step {step + 1}"
        t0 = time.time()
        micro = train_data.next_step()
        data_time = time.time() - t0
        counts = step_counts(micro, ps, sum(train_data.skipped.values()))
        n_labels, n_tokens, n_skipped, n_slots = counts.labels, counts.tokens, counts.skipped, counts.slots
        if n_labels == 0:  # no update from it (data.on_bad_sample: skip); every rank agrees, the count is global
            empty_in_a_row += 1
            if spans_an_epoch(train_data, empty_in_a_row):
                raise UserError("a whole epoch of global batches had no label tokens: every sample was skipped as bad "
                                "or fully masked; check the skipped-sample warnings and the data's masking",
                                on_every_rank=True)
            if rank == 0:
                print(f"step {step + 1}: every sample of this global batch was skipped as bad; no update, "
                      f"the next global batch takes the step", flush=True)
            continue
        empty_in_a_row = 0
        set_micro_batches(engine, len(micro))  # packed: as many as this replica's samples fill
        model.token_loss.set_label_count(n_labels, len(micro))
        set_balance_scale(model, cfg.moe.aux_loss_coef, ps.dims.dp, counts.micro_batches)
        profiling = step + 1 == cfg.logging.profile_step
        seed_dropout(model, cfg.train.seed, step, ps.dp_rank, ps.pp_rank)
        with profile_step(out_dir, rank == 0) if profiling else contextlib.nullcontext():
            loss = engine.train_batch(iter([to_pipe_batch(m) for m in micro]))
        dt = time.time() - t0
        grad_norm = engine.get_global_grad_norm()
        routing = router_stats(model, ps, config, counts.micro_batches) if is_moe(config) else {}
        # one all-reduce (MAX) per step: the peak memory of any rank, whether any rank got SIGTERM, and
        # whether any rank saw an inf/NaN loss or grad norm (the optimizer then skipped the update)
        status = torch.tensor([mem_gib(), float(stop.requested), float(not is_finite(loss, grad_norm))],
                              device=comm_device())
        dist.all_reduce(status, op=dist.ReduceOp.MAX)
        mem, stopping, nonfinite = float(status[0]), bool(status[1]), bool(status[2])
        if nonfinite:  # nothing saved or logged for it; under skip the next global batch takes the step
            nonfinite_steps += 1
            nonfinite_in_a_row += 1
            if cfg.train.on_nonfinite == "stop" or nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                raise nonfinite_error(step + 1, float(loss), grad_norm, nonfinite_in_a_row, cfg.train.on_nonfinite,
                                      last_ckpt)
            if rank == 0:
                print(f"step {step + 1}: loss {float(loss):.4g}, grad norm {float(grad_norm or 0):.4g} not finite; "
                      f"update skipped ({nonfinite_in_a_row} in a row, train.max_nonfinite_steps="
                      f"{cfg.train.max_nonfinite_steps}), the next global batch takes the step", flush=True)
            continue
        nonfinite_in_a_row = 0
        step += 1
        done = finished(cfg, step, total_steps, train_data)
        if flops_per_token is None:
            seq = max(m["input_ids"].shape[1] for m in micro)
            if cfg.data.packing:  # a packed token attends within its own sample: this replica's mean sample length
                samples = sum(int(m["attention_mask"].amax(1).sum()) for m in micro)
                seq = sum(int((m["attention_mask"] > 0).sum()) for m in micro) // max(samples, 1)
            flops_per_token = train_flops_per_token(config.text_config, seq)
        tok_s = n_tokens / dt
        if step % cfg.logging.every_steps == 0 or done:
            logger.log({
                "step": step, "total_steps": total_steps, "epoch": train_data.epoch,
                "loss": float(loss), "grad_norm": float(grad_norm or 0.0),
                "lr": scheduler.get_last_lr()[0], "mem_gib": mem, "tokens_per_sec": tok_s,
                "tokens_per_sec_per_gpu": tok_s / world,
                "mfu": (tok_s / world * flops_per_token / peak) if peak else None,
                "label_tokens": n_labels, "tokens": n_tokens, "fill": n_tokens / n_slots, "step_time": dt,
                "data_time": data_time,
                "skipped_samples": n_skipped,  # this epoch's so far, all DP ranks
                "nonfinite_steps": nonfinite_steps,
                **routing,
            })
        # no eval when stopping: a launcher kills the workers ~30 s after SIGTERM
        if eval_data is not None and step % cfg.eval.every_steps == 0 and not stopping:
            logger.log({"split": "eval", "step": step, **evaluate(engine, model, eval_data, ps, cfg.eval.max_batches)})
        every = cfg.checkpoint.every_steps
        if stopping or (done and cfg.checkpoint.at_end) or (every and step % every == 0):
            last_ckpt = save(step)
            stopping = any_rank(stop.requested)  # a SIGTERM during the save: stop right after it
        if stopping and not done:
            if rank == 0:
                print(f"SIGTERM: saved {last_ckpt} after step {step}; resume with checkpoint.resume=auto", flush=True)
            break
    if empty_in_a_row and cfg.checkpoint.at_end:  # the epochs ended on global batches that took no step
        last_ckpt = save(step)
    logger.close()
    where.at = "in the export"
    exported = None
    if cfg.checkpoint.export and finished(cfg, step, total_steps, train_data) and last_ckpt is not None:
        exported = export_after_training(last_ckpt, out_dir / "export")
        if exported is not None:
            what = "HF model"
            if cfg.lora.enabled:  # export_after_training wrote export/adapter and export/merged
                what = f"PEFT adapter to {exported.with_name('adapter')} and merged HF model"
            print(f"exported {what} to {exported}", flush=True)
    dist.destroy_process_group()  # local teardown, not a collective: rank 0 may still be exporting
    if cfg.eval.generate and exported is not None:  # rank 0, which wrote the export
        del engine, model, optimizer, scheduler  # the accelerator's memory goes to generation
        generate_on_export(exported, cfg, step)
    if rank == 0 and finished(cfg, step, total_steps, train_data):
        saved = f"last checkpoint {last_ckpt}" if last_ckpt is not None else "no checkpoint"
        print(f"finished: step {step} of {total_steps}; {saved}; metrics in {out_dir / 'metrics.jsonl'}", flush=True)
    return 0
