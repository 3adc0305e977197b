"""Long-run fidelity: `runner train`'s loss curve against transformers' own Gemma4 over hundreds of steps.

A one-step parity test cannot show drift that builds up over a run (bf16 gradient accumulation,
rounding in the TP/PP sums, optimizer state). This trains the same random-weight slice of the 31B's
width, from the same weights, on the same data in the same order, for `--steps` steps and compares:

- the runner at each `--layouts` tp x pp (dp 1) with `--config` (default: bf16, ZeRO-1, gradients
  accumulated in bf16), and at `--fp32-grads-layouts` with `--fp32-grads-config` (fp32 accumulation);
- the reference: transformers' Gemma4ForConditionalGeneration (with `--lora`, PEFT's LoRA on it, starting
  from the runner's initial adapters) in one plain-torch process, bf16
  weights with an fp32 master copy, fp32 AdamW states, gradients accumulated in fp32 over the same
  micro-batches, the runner's loss (summed token CE over the global batch / its label tokens), AdamW
  groups, LR schedule and clipping, fed by the runner's own loader (`runner.train.build_loader`).

Every run is a subprocess writing `metrics.jsonl` (a step line each step, an eval line every
`--eval-every`). `--out` gets `longrun-DATE-CARD.json` (the record: per run the 20-step smoothed
loss's largest deviation from the reference and the final eval's, and pass/fail against the
acceptance target), `longrun-DATE-CARD-curves.json` (every step's loss) and `longrun-DATE-CARD.png`
(loss vs step; relative deviation below), plus `logs.txt` with each run's tail. Runs share the GPUs:
each starts as soon as enough are free (on CPU one at a time).

    python -m benchmarks.longrun --out $OUT --depth 6 --layouts 1x1 --steps 300
    python -m benchmarks.longrun --out /tmp/lr --device cpu --layouts 1x1,1x2 --steps 6   # tiny, fp32
    python -m benchmarks.longrun --plot-only OUT/longrun-DATE-CARD-curves.json            # redraw the PNG
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.gpu_bench import ROOT, bench_config, build_checkpoint, build_data, descendants, free_port, recipe, run

REFERENCE = "reference"
ACCEPT_SMOOTHED, ACCEPT_EVAL, ACCEPT_MIN_STEPS = 0.01, 0.005, 300  # the long-run fidelity target
# data.max_length over --text-tokens: the chat template and question, and the spread of build_data's
# word-count sizing (448 asked: 430-510 tokens per sample with the tiny tokenizer)
PROMPT_TOKENS = 128


@dataclass(frozen=True)
class Run:
    """One training run: the reference (no DeepSpeed config), a variant of it with other attention
    kernels (the noise floor: the same function in other bf16 arithmetic), or the runner at tp x pp."""

    name: str
    tp: int = 1
    pp: int = 1
    ds_config: str | None = None
    attn: str | None = None  # a reference variant's model.attn_implementation

    @property
    def kind(self) -> str:
        return "runner" if self.ds_config else "noise floor" if self.attn else "reference"

    @property
    def procs(self) -> int:
        return self.tp * self.pp


# ----------------------------------------------------------------------------------------------
# the reference: transformers' model, trained the way the runner defines a step


def _micro_losses(model, micro: list[dict[str, torch.Tensor]], device: str):
    """(label tokens, transformers' mean token loss) of each micro-batch that has labels, computed
    lazily so that a training loop's backward of one runs before the next forward."""
    from runner.data.collate import hf_model_inputs
    from runner.models.gemma4.pipeline import count_label_tokens

    for batch in micro:
        n = count_label_tokens(batch["labels"])
        if n:  # transformers' mean over no labels is 0/0; an empty micro-batch adds nothing
            yield n, model(**{k: v.to(device) for k, v in hf_model_inputs(batch).items()}, use_cache=False).loss


@torch.no_grad()
def _evaluate(model, loader, max_batches: int, device: str) -> dict:
    """What `runner.train.evaluate` computes: summed token loss over the split's label tokens."""
    steps = loader.sampler.steps_per_epoch if max_batches == 0 else min(max_batches, loader.sampler.steps_per_epoch)
    loader.rewind()
    total, labels = 0.0, 0
    for _ in range(steps):
        for n, loss in _micro_losses(model, loader.next_step(), device):
            total += float(loss) * n
            labels += n
    return {"loss": total / max(labels, 1), "label_tokens": labels}


def _master_adamw(model, optim) -> tuple[list[torch.nn.Parameter], list[torch.Tensor], torch.optim.AdamW]:
    """(trainable parameters, their fp32 master copies with zeroed fp32 gradients, AdamW over the
    masters in the runner's decay / no-decay groups and hyperparameters)."""
    from runner.optim import param_groups

    groups = param_groups(model, optim.weight_decay)
    params = [p for g in groups for p in g["params"]]
    masters = [p.detach().to(torch.float32, copy=True) for p in params]
    for master in masters:
        master.grad = torch.zeros_like(master)  # where the micro-batches' gradients accumulate
    chunks, start = [], 0
    for g in groups:
        chunks.append({"params": masters[start:start + len(g["params"])], "weight_decay": g["weight_decay"]})
        start += len(g["params"])
    optimizer = torch.optim.AdamW(chunks, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                  fused=torch.cuda.is_available())  # as runner.optim.build_optimizer
    return params, masters, optimizer


def _peft_model(model, cfg):
    """PEFT's LoRA on transformers' model as the recipe's `lora` section says (`get_peft_model`, PEFT's own
    layers and dtype rules), its A drawn as the runner draws it (`runner.lora.init_adapter`, one value per
    module name at every layout), B zeros: both sides start from the same adapters."""
    from types import SimpleNamespace

    from peft import get_peft_model

    from runner.lora import init_adapter, peft_config

    model = get_peft_model(model, peft_config(cfg.lora, str(cfg.model.path)))
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, torch.nn.ModuleDict) and "default" in lora_a:
            init_adapter(name.removeprefix("base_model.model."), SimpleNamespace(lora_A=lora_a["default"]), cfg.lora,
                         cfg.train.seed)
    return model


def reference(recipe_path: str) -> int:
    """Train transformers' Gemma4ForConditionalGeneration as the recipe says, in one process, and write
    `metrics.jsonl` in the runner's format to the recipe's output.dir."""
    from deepspeed.accelerator import get_accelerator
    from transformers import AutoProcessor, Gemma4ForConditionalGeneration

    from runner.checkpoint.hf_load import resolve_model_dir
    from runner.config import load_config, micro_batches_per_step
    from runner.data.sources import load_source
    from runner.metrics import MetricsLogger, mem_gib
    from runner.optim import lr_lambda
    from runner.parallel.topology import ParallelDims, build_parallel_state
    from runner.train import DTYPES, build_loader, init_distributed, step_counts

    cfg = load_config(recipe_path)
    init_distributed()  # a one-process group: the loader takes its DP coordinates from a ParallelState
    dims = ParallelDims()
    ps = build_parallel_state(dims)
    gas = micro_batches_per_step(cfg.train, dims.dp)
    model_dir = resolve_model_dir(cfg.model.path)
    torch.manual_seed(cfg.train.seed)
    processor = AutoProcessor.from_pretrained(model_dir)
    train_data = build_loader(cfg, load_source(cfg.data.train, cfg.data.train_split), processor, dims, ps, gas,
                              cfg.train.seed, "data.train")
    eval_data = None
    if cfg.data.eval and cfg.eval.every_steps:
        eval_data = build_loader(cfg, load_source(cfg.data.eval, cfg.data.eval_split), processor, dims, ps, gas,
                                 cfg.train.seed, "data.eval", keep_tail=True)
    total_steps = cfg.train.max_steps or cfg.train.epochs * train_data.sampler.steps_per_epoch

    device = get_accelerator().current_device_name()
    model = Gemma4ForConditionalGeneration.from_pretrained(
        model_dir, dtype=DTYPES[cfg.model.dtype], attn_implementation=cfg.model.attn_implementation,
        device_map={"": device})
    text = model.model.language_model
    frozen = {"embeddings": [text.embed_tokens], "vision_tower": [model.model.vision_tower],
              "language_model": [text.layers, text.norm]}  # what Gemma4Pipeline.freeze freezes
    for key, modules in frozen.items():
        if getattr(cfg.freeze, key):
            for module in modules:
                module.requires_grad_(False)
    if cfg.lora.enabled:
        model = _peft_model(model, cfg)
    if cfg.train.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()

    params, masters, optimizer = _master_adamw(model, cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, total_steps))

    logger = MetricsLogger(Path(cfg.output.dir), total_steps, True, tensorboard=False, progress_bar=False)
    print(f"reference: transformers {type(model).__name__} from {model_dir}, {cfg.model.dtype} weights"
          f"{f', PEFT LoRA r{cfg.lora.rank}' if cfg.lora.enabled else ''}, fp32 master "
          f"and gradient accumulation, {gas} micro-batches of {cfg.train.micro_batch_size} per step", flush=True)
    step = 0
    while step < total_steps:
        t0 = time.time()
        micro = train_data.next_step()
        data_time = time.time() - t0
        n_labels, n_tokens, n_skipped = step_counts(micro, ps, sum(train_data.skipped.values()))[:3]
        if n_labels == 0:  # as the runner: no update, the next global batch takes the step
            continue
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for n, loss in _micro_losses(model, micro, device):
            (loss * (n / n_labels)).backward()
            loss_sum += loss.detach().double() * n
            for p, master in zip(params, masters):
                if p.grad is not None:
                    master.grad.add_(p.grad.to(torch.float32))
                    p.grad = None
        grad_norm = torch.nn.utils.clip_grad_norm_(masters, cfg.train.grad_clip or math.inf)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            for p, master in zip(params, masters):
                p.copy_(master)
                master.grad.zero_()
        step += 1
        dt = time.time() - t0
        logger.log({
            "step": step, "total_steps": total_steps, "epoch": train_data.epoch,
            "loss": float(loss_sum) / n_labels, "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
            "mem_gib": mem_gib(), "tokens_per_sec": n_tokens / dt, "tokens_per_sec_per_gpu": n_tokens / dt,
            "mfu": None, "label_tokens": n_labels, "tokens": n_tokens, "step_time": dt, "data_time": data_time,
            "skipped_samples": n_skipped,
        })
        if eval_data is not None and step % cfg.eval.every_steps == 0:
            logger.log({"split": "eval", "step": step, **_evaluate(model, eval_data, cfg.eval.max_batches, device)})
    logger.close()
    torch.distributed.destroy_process_group()
    return 0


# ----------------------------------------------------------------------------------------------
# comparison, record and plot


def moving_mean(x: list[float], window: int) -> np.ndarray:
    """Trailing mean over full windows: entry i covers steps i+1 .. i+window."""
    return np.convolve(np.asarray(x, dtype=np.float64), np.ones(window) / window, mode="valid")


def read_curve(metrics: Path) -> dict:
    """A run's per-step loss, grad norm, lr and step time, and its eval losses, from metrics.jsonl."""
    curve: dict = {k: [] for k in ("step", "loss", "grad_norm", "lr", "step_time", "eval_step", "eval_loss")}
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    for record in map(json.loads, lines):
        if record.get("split") == "eval":
            curve["eval_step"].append(record["step"])
            curve["eval_loss"].append(record["loss"])
        else:
            for key in ("step", "loss", "grad_norm", "lr", "step_time"):
                curve[key].append(record[key])
    return curve


def compare(curve: dict, ref: dict, window: int) -> dict:
    """Largest |relative deviation| of the smoothed loss from the reference's over the steps both
    logged, and the relative deviation of the last eval both ran."""
    n = min(len(curve["loss"]), len(ref["loss"]))
    if n == 0:
        return {}
    w = min(window, n)
    rel = moving_mean(curve["loss"][:n], w) / moving_mean(ref["loss"][:n], w) - 1
    worst = int(np.argmax(np.abs(rel)))
    out = {"steps_compared": n, "smoothing_window": w, "max_smoothed_rel_deviation": float(abs(rel[worst])),
           "max_smoothed_rel_deviation_step": worst + w, "final_smoothed_rel_deviation": float(rel[-1])}
    common = sorted(set(curve["eval_step"]) & set(ref["eval_step"]))
    if common:
        last = common[-1]
        mine, theirs = (c["eval_loss"][c["eval_step"].index(last)] for c in (curve, ref))
        out.update(final_eval_step=last, final_eval_loss=mine, final_eval_rel_deviation=mine / theirs - 1)
    return out


def is_reference(name: str) -> bool:
    """The reference or one of its attention-kernel variants (the noise floor): transformers' own model."""
    return name == REFERENCE or name.startswith(REFERENCE + " ")


def against_references(curves: dict, name: str, window: int) -> dict[str, dict]:
    """A run's deviation from each of transformers' own runs (the reference and its kernel variants): a
    runner curve read beside the spread between two equally valid transformers curves."""
    keys = ("max_smoothed_rel_deviation", "max_smoothed_rel_deviation_step", "final_eval_rel_deviation")
    return {ref: {k: v for k, v in compare(curves[name], curves[ref], window).items() if k in keys}
            for ref in curves if is_reference(ref) and ref != name}


def acceptance(entry: dict, steps: int) -> list[str]:
    """Why a runner run misses the long-run target (empty: it meets it)."""
    failures = []
    if entry.get("steps_compared", 0) < max(steps, ACCEPT_MIN_STEPS):
        failures.append(f"compared {entry.get('steps_compared', 0)} steps, the target needs all of "
                        f"max(--steps, {ACCEPT_MIN_STEPS})")
    if entry.get("max_smoothed_rel_deviation", math.inf) > ACCEPT_SMOOTHED:
        failures.append(f"smoothed loss {entry.get('max_smoothed_rel_deviation', math.inf):.2%} from the reference "
                        f"(target {ACCEPT_SMOOTHED:.0%})")
    if abs(entry.get("final_eval_rel_deviation", math.inf)) > ACCEPT_EVAL:
        failures.append(f"final eval {entry.get('final_eval_rel_deviation', math.inf):+.2%} from the reference "
                        f"(target {ACCEPT_EVAL:.1%})")
    return failures


def print_against_references(curve_file: dict) -> None:
    """Every run against every transformers run of a curves file (what --plot-only reads back)."""
    runs, window = curve_file["runs"], curve_file["smoothing_window"]
    print(f"{'run':36} {'against':24} {'max smoothed dev':>16} {'at step':>7} {'final eval dev':>14}")
    for name in runs:
        for ref, dev in against_references(runs, name, window).items():
            if dev and not (is_reference(name) and ref != REFERENCE):  # a variant against the reference only
                print(f"{name:36} {ref:24} {dev['max_smoothed_rel_deviation']:>16.3%} "
                      f"{dev['max_smoothed_rel_deviation_step']:>7} {dev.get('final_eval_rel_deviation', math.nan):>+14.3%}")


def plot(curves: dict, path: Path) -> None:
    """Loss vs step for every run (raw faint, smoothed bold, eval as dots) and, below, each runner
    run's smoothed loss and eval relative to the reference's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, window = curves["runs"], curves["smoothing_window"]
    ref = runs[REFERENCE]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(11, 8), gridspec_kw={"height_ratios": [2, 1]})
    for name, c in runs.items():
        if not c["loss"]:
            continue
        w = min(window, len(c["loss"]))
        color = "black" if name == REFERENCE else None
        (raw,) = top.plot(c["step"], c["loss"], lw=0.6, alpha=0.25, color=color)
        color = raw.get_color()
        width = 3.0 if name == REFERENCE else 1.4  # under the runs it should coincide with, still visible
        top.plot(c["step"][w - 1:], moving_mean(c["loss"], w), lw=width, color=color, label=name)
        top.plot(c["eval_step"], c["eval_loss"], "o", ms=4, color=color)
        if name == REFERENCE or not ref["loss"]:
            continue
        n = min(len(c["loss"]), len(ref["loss"]))
        w = min(window, n)
        rel = moving_mean(c["loss"][:n], w) / moving_mean(ref["loss"][:n], w) - 1
        bottom.plot(c["step"][w - 1:n], 100 * rel, lw=1.2, color=color, label=name)
        evals = [(s, e / ref["eval_loss"][ref["eval_step"].index(s)] - 1)
                 for s, e in zip(c["eval_step"], c["eval_loss"]) if s in ref["eval_step"]]
        if evals:
            bottom.plot(*zip(*[(s, 100 * r) for s, r in evals]), "o", ms=4, color=color)
    for level, style in ((ACCEPT_SMOOTHED, "--"), (ACCEPT_EVAL, ":")):
        for sign in (1, -1):
            bottom.axhline(100 * sign * level, color="grey", lw=0.8, ls=style)
    bottom.axhline(0, color="black", lw=0.6)
    top.set_ylabel("training loss (token-weighted)")
    top.set_title(f"{textwrap.fill(curves['title'], 110)}\nfaint: every step, bold: {window}-step moving mean, "
                  f"dots: eval", fontsize=9)
    top.legend(fontsize=8)
    bottom.set_ylabel("vs reference (%)")
    bottom.set_xlabel("step")
    bottom.set_title(f"smoothed loss (lines, target ±{ACCEPT_SMOOTHED:.0%}) and eval (dots, ±{ACCEPT_EVAL:.1%})",
                     fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# the benchmark


def card_name(gpus: int) -> tuple[str, str]:
    """(short card name for file names, e.g. h200x1; the description the results files carry)."""
    versions = ", ".join(f"{pkg} {_version(pkg)}" for pkg in ("torch", "transformers", "deepspeed"))
    if not torch.cuda.is_available():
        return "cpu", f"CPU ({os.cpu_count()} cores), {versions}"
    name = torch.cuda.get_device_name()
    mib = torch.cuda.get_device_properties(0).total_memory // 2**20
    return f"{name.replace('NVIDIA', '').split()[0].lower()}x{gpus}", f"{gpus}x {name} ({mib} MiB each), {versions}"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _commit() -> str:
    """This tree's commit where git is at hand (without git, pass --commit)."""
    try:
        proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:  # no git installed
        return "unknown"
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def plan_runs(args: argparse.Namespace, slots: int) -> list[Run]:
    """The reference first, then every runner run the machine has devices for, fewest devices first
    (on 4 GPUs: the one-GPU runs beside the reference, then 2x1 beside 1x2, then 2x2)."""
    runs = []
    for layouts, ds_config in ((args.layouts, args.config), (args.fp32_grads_layouts, args.fp32_grads_config)):
        for layout in filter(None, layouts.split(",")):
            tp, pp = map(int, layout.split("x"))
            if tp * pp > slots:
                print(f"tp={tp} pp={pp}: skipped, needs {tp * pp} devices, this machine has {slots}", flush=True)
                continue
            runs.append(Run(f"tp{tp}pp{pp} {Path(ds_config).stem}", tp, pp, ds_config))
    variants = [Run(f"{REFERENCE} {attn}", attn=attn) for attn in filter(None, args.reference_variants.split(","))]
    return [Run(REFERENCE), *variants, *sorted(runs, key=lambda r: r.procs)]


def run_all(runs: list[Run], slots: int, launch, exclusive: bool) -> None:
    """Start the runs in order, each once enough devices are free (`exclusive`: one run at a time).
    Interrupted (SIGTERM, Ctrl-C), every job this process started is killed, or it keeps the GPUs."""
    free, changed, threads = list(range(slots)), threading.Condition(), []

    def work(r: Run, taken: list[int]) -> None:
        try:
            launch(r, taken[:r.procs])
        finally:
            with changed:
                free.extend(taken)
                changed.notify_all()

    try:
        for r in runs:
            need = slots if exclusive else r.procs
            with changed:  # waits with a timeout: a signal only reaches Python in the main thread once it wakes
                while not changed.wait_for(lambda: len(free) >= need, timeout=1):
                    pass
                devices = [free.pop(0) for _ in range(need)]
            threads.append(threading.Thread(target=work, args=(r, sorted(devices))))
            threads[-1].start()
        for t in threads:
            while t.is_alive():
                t.join(timeout=1)
    except BaseException:  # an interrupted join marks its thread stopped (bpo-45274): kill by process tree instead
        for pid in descendants(os.getpid()):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="where the record, curves, plot and logs.txt go")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: the tiny Gemma4 in fp32 with ds_configs/cpu_fp32.json (tests)")
    ap.add_argument("--depth", type=int, default=6, help="decoder layers of the 31B-width slice")
    ap.add_argument("--ckpt", default=None, help="an HF checkpoint to train instead of building one")
    ap.add_argument("--layouts", default="1x1", help="tp x pp of the runner runs with --config (dp 1)")
    ap.add_argument("--config", default=None, help="their DeepSpeed JSON (default: gpu_bf16_zero1, cpu_fp32 on CPU)")
    ap.add_argument("--fp32-grads-layouts", default=None, help="tp x pp of the runs with --fp32-grads-config "
                    "(default 1x1 on GPUs, none on CPU; '' for none)")
    ap.add_argument("--fp32-grads-config", default="ds_configs/gpu_bf16_zero1_fp32_grads.json")
    ap.add_argument("--reference-variants", default="", metavar="ATTN,...",
                    help="also train the reference with these model.attn_implementation values (e.g. eager): how far "
                         "the same function drifts in other bf16 arithmetic, the noise floor the runs are read against")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--micro", type=int, default=2, help="samples per micro-batch")
    ap.add_argument("--global-batch", type=int, default=8, help="samples per step")
    ap.add_argument("--text-tokens", type=int, default=384, help="answer tokens per sample (about)")
    ap.add_argument("--samples", type=int, default=0, help="training samples (default: steps x global batch)")
    ap.add_argument("--eval-samples", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--lora", type=int, default=0, metavar="RANK",
                    help="LoRA of this rank (alpha 2*rank, dropout 0, every decoder linear) in every run; the reference "
                         "is then PEFT's get_peft_model on transformers' model, from the runner's initial adapters")
    ap.add_argument("--smooth", type=int, default=20, help="moving-mean window of the loss comparison")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override for every run")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per run")
    ap.add_argument("--commit", default=None, help="the commit the record names (default: git's HEAD)")
    ap.add_argument("--plot-only", default=None, metavar="CURVES_JSON", help="redraw the PNG of a curves file")
    ap.add_argument("--reference-recipe", default=None, help=argparse.SUPPRESS)  # the reference's own process
    args = ap.parse_args(argv)
    if args.reference_recipe:
        return reference(args.reference_recipe)
    if args.plot_only:
        curves = Path(args.plot_only)
        curve_file = json.loads(curves.read_text())
        plot(curve_file, curves.with_name(curves.name.replace("-curves.json", ".png")))
        print_against_references(curve_file)
        return 0
    if not args.out:
        ap.error("--out is required")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`/`kill`: unwind, so run_all stops its jobs

    cpu = args.device == "cpu"
    if cpu:
        os.environ["DS_ACCELERATOR"] = "cpu"  # the runs inherit it
    elif not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here; use --device cpu for the tiny model")
    config = args.config or f"ds_configs/{'cpu_fp32' if cpu else 'gpu_bf16_zero1'}.json"
    fp32_layouts = ("" if cpu else "1x1") if args.fp32_grads_layouts is None else args.fp32_grads_layouts
    args = argparse.Namespace(**{**vars(args), "config": config, "fp32_grads_layouts": fp32_layouts})
    for path in {config, args.fp32_grads_config} if fp32_layouts else {config}:
        if not (ROOT / path).is_file():
            ap.error(f"DeepSpeed config {path} does not exist (paths are relative to {ROOT})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("BENCH_WORK", "/tmp/gpu_bench"))  # gpu_bench's: a kept BENCH_WORK reuses its checkpoint
    work.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count() if not cpu else 0
    slots = gpus or max((int(x) * int(y) for layouts in (args.layouts, fp32_layouts)
                         for x, y in (lay.split("x") for lay in filter(None, layouts.split(",")))), default=1)
    t0 = time.time()
    if args.ckpt:
        ckpt = Path(args.ckpt)
        model = f"{ckpt} (given)"
    elif cpu:
        from runner.models.gemma4.tiny import make_tiny

        ckpt = work / "tiny"
        if not (ckpt / "config.json").exists():
            make_tiny(ckpt)
        model = "tiny Gemma4 (make_tiny)"
    else:
        ckpt = build_checkpoint(work, bench_config(args.depth), f"gemma4-31b-d{args.depth}", gpus)
        model = f"gemma4_31b_config(depth={args.depth}) random bf16 (gpu_bench.build_checkpoint)"
    n_train = args.samples or args.steps * args.global_batch
    data = build_data(work, n_train + args.eval_samples, args.text_tokens, ["text"])["text"]
    print(f"checkpoint + data ready in {time.time() - t0:.0f}s", flush=True)

    overrides = {  # every run's recipe: gpu_bench's text recipe with these
        "train.micro_batch_size": args.micro, "train.global_batch_size": args.global_batch,
        "train.activation_checkpointing": "false",  # depth 6 fits without; recompute changes no value
        "data.max_length": args.text_tokens + PROMPT_TOKENS,
        "data.train_split": f"train[:{n_train}]", "data.eval": str(data), "data.eval_split": f"train[{n_train}:]",
        "eval.every_steps": args.eval_every, "optim.lr": args.lr, "optim.warmup_steps": args.warmup,
        **({"model.dtype": "float32", "data.num_workers": 0} if cpu else {}),
        **({"lora.enabled": "true", "lora.rank": args.lora, "lora.alpha": 2 * args.lora, "lora.dropout": 0}
           if args.lora else {}),  # dropout's masks are random draws no two implementations share
        **dict(kv.split("=", 1) for kv in args.set),
    }
    runs = plan_runs(args, slots)
    base = work / "longrun"
    base.mkdir(exist_ok=True)
    tails = out / "logs.txt"
    tails.unlink(missing_ok=True)
    walls: dict[str, float] = {}

    def launch(r: Run, devices: list[int]) -> None:
        run_dir = base / r.name.replace(" ", "_")
        shutil.rmtree(run_dir, ignore_errors=True)  # a kept BENCH_WORK must not add an earlier call's metrics
        own = {"model.attn_implementation": r.attn} if r.attn else {}
        rec, _ = recipe(run_dir, ckpt, data, "text", r.tp, r.pp, 1, args.steps, 1,
                        {k: str(v) for k, v in {**overrides, **own}.items()}, 0)
        port = free_port()
        env = ["env", f"MASTER_PORT={port}"] + ([f"CUDA_VISIBLE_DEVICES={','.join(map(str, devices))}"] if gpus else [])
        if r.ds_config is None:
            cmd = env + [sys.executable, "-m", "benchmarks.longrun", "--reference-recipe", str(rec)]
        else:
            cmd = env + [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={r.procs}",
                         f"--master_port={port}", "-m", "runner", "train", str(rec), "--ds-config", r.ds_config]
        print(f"{r.name}: starting on {'GPUs ' + ','.join(map(str, devices)) if gpus else 'CPU'}", flush=True)
        start = time.time()
        run(cmd, base / f"log_{run_dir.name}.txt", args.timeout, tails)
        walls[r.name] = time.time() - start

    card, card_text = card_name(gpus)
    stem = f"longrun-{time.strftime('%Y-%m-%d')}-{card}"
    argv_text = " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    try:
        run_all(runs, slots, launch, exclusive=cpu)
    finally:  # also when interrupted: what the finished runs logged is kept
        passed, complete = report(runs, base, out, stem, args, overrides, walls, {
            "date": time.strftime("%Y-%m-%d"), "card": card_text, "gpus": gpus, "commit": args.commit or _commit(),
            "command": f"python3 -m benchmarks.longrun {argv_text}", "model": model, "wall_s": round(time.time() - t0),
        })
    print(f"long-run target (every runner run: smoothed loss within {ACCEPT_SMOOTHED:.0%} of the reference over "
          f">= {ACCEPT_MIN_STEPS} steps, final eval within {ACCEPT_EVAL:.1%}): {'PASS' if passed else 'FAIL'}",
          flush=True)
    return 0 if complete else 1


def report(runs: list[Run], base: Path, out: Path, stem: str, args: argparse.Namespace, overrides: dict,
           walls: dict[str, float], record: dict) -> tuple[bool, bool]:
    """Write the record, the curves and the plot under `out`. Returns (every runner run meets the
    target, every run logged all its steps)."""
    curves = {r.name: read_curve(base / r.name.replace(" ", "_") / "metrics.jsonl") for r in runs}
    ref = curves[REFERENCE]
    record["settings"] = {
        "steps": args.steps, "eval_every": args.eval_every, "micro_batch": args.micro,
        "global_batch": args.global_batch, "text_tokens": args.text_tokens, "lr": args.lr, "warmup": args.warmup,
        "smoothing_window": args.smooth, "recipe_overrides": overrides,
        "reference": "transformers Gemma4ForConditionalGeneration in one process"
                     + (" with PEFT's LoRA (get_peft_model) from the runner's initial adapters" if args.lora else "")
                     + ": model.dtype weights, fp32 master copy, AdamW states and gradient accumulation over the "
                       "runner's micro-batches",
        "acceptance": {"max_smoothed_rel_deviation": ACCEPT_SMOOTHED, "final_eval_rel_deviation": ACCEPT_EVAL,
                       "min_steps": ACCEPT_MIN_STEPS},
    }
    entries = []
    for r in runs:
        c = curves[r.name]
        entry = {"name": r.name, "kind": r.kind, "tp": r.tp, "pp": r.pp,
                 "dp": 1, "ds_config": r.ds_config, "steps_logged": len(c["loss"]),
                 "wall_s": round(walls[r.name]) if r.name in walls else None,
                 "step_time_median_s": statistics.median(c["step_time"][1:]) if len(c["step_time"]) > 1 else None,
                 "step1_loss": c["loss"][0] if c["loss"] else None, "final_loss": c["loss"][-1] if c["loss"] else None}
        if r.kind != "reference":
            entry.update(compare(c, ref, args.smooth))
        if r.kind == "runner":
            failures = acceptance(entry, args.steps)
            entry.update(passed=not failures, failures=failures)
            if any(v.kind == "noise floor" for v in runs):  # beside the noise floor: every transformers run
                entry["against_references"] = against_references(curves, r.name, args.smooth)
        elif c["eval_loss"]:
            entry.update(final_eval_step=c["eval_step"][-1], final_eval_loss=c["eval_loss"][-1])
        entries.append(entry)
    record["runs"] = entries
    runner_runs = [e for e in entries if e["kind"] == "runner"]
    record["passed"] = bool(runner_runs) and all(e["passed"] for e in runner_runs)
    record["curves"], record["plot"] = f"{stem}-curves.json", f"{stem}.png"
    title = (f"{record['model']}, {record['card']}: {args.steps} steps of {args.global_batch} samples"
             + (f", LoRA r{args.lora} (reference: PEFT)" if args.lora else ""))
    curve_file = {"title": title, "smoothing_window": args.smooth, "runs": curves}
    (out / record["curves"]).write_text(json.dumps(curve_file, separators=(",", ":")))
    try:
        plot(curve_file, out / record["plot"])
    except Exception as err:  # noqa: BLE001 - a missing or broken matplotlib must not cost the measured runs
        record["plot"] = None
        print(f"no plot ({type(err).__name__}: {err}): redraw it with --plot-only {out / record['curves']}", flush=True)
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1))
    print(f"\n{record['card']}: {record['model']}")
    print(f"{'run':42} {'steps':>5} {'step s':>7} {'final loss':>10} {'max smoothed dev':>16} {'final eval dev':>14}")
    for e in entries:
        dev = f"{e['max_smoothed_rel_deviation']:.3%}" if "max_smoothed_rel_deviation" in e else "-"
        eval_dev = f"{e['final_eval_rel_deviation']:+.3%}" if "final_eval_rel_deviation" in e else "-"
        verdict = {"reference": "", "noise floor": "noise floor"}.get(e["kind"])
        verdict = ("PASS" if e["passed"] else "FAIL") if verdict is None else verdict
        print(f"{e['name']:42} {e['steps_logged']:>5} {e['step_time_median_s'] or 0:>7.3f} "
              f"{e['final_loss'] or 0:>10.4f} {dev:>16} {eval_dev:>14} {verdict}")
    print(f"record: {out / (stem + '.json')}", flush=True)
    return record["passed"], all(e["steps_logged"] == args.steps for e in entries)


if __name__ == "__main__":
    raise SystemExit(main())
