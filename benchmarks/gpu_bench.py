"""GPU benchmark: `runner train` on a Gemma4 member's full width under TP×PP, beside transformers + ZeRO-3.

One command builds everything on the GPU host itself (no Hub access needed) and runs it:

    python -m benchmarks.gpu_bench --out $OUT --depth 12 --layouts 2x2,4x1,1x4 --steps 6

`--model 31b|26b-a4b|e2b|e4b` (default 31b) picks the member; `--depth` and `--layouts` default per
member and GPU count to what `runner plan` fits in an H200 for full fine-tuning with embeddings and
vision tower frozen (MEMBERS): 26B-A4B 6 of its 30 layers on one GPU (the experts train; 12 layers
need 168 GiB), 18 on two, all 30 on four or more; E2B / E4B always whole (35 / 42 layers). On a host
with DeepSpeed installed (a tree without git names its commit in BENCH_COMMIT), one command each:

    # 1x H200: 26B-A4B (6 layers, full width) against ZeRO-3; MFU on active parameters
    python3 -m benchmarks.gpu_bench --model 26b-a4b --depth 6 --layouts 1x1 --workloads text \
        --steps 6 --warmup 2 --budget 500 --out $OUT
    # 1x H200: the whole 26B-A4B with LoRA r16 on attention and dense MLP (experts, router frozen; plan 68 GiB)
    python3 -m benchmarks.gpu_bench --model 26b-a4b --depth 30 --layouts 1x1 --lora 16 --workloads text \
        --steps 6 --warmup 2 --budget 500 --out $OUT
    # 4x H200: the whole 26B-A4B at TP2 x PP2, experts split EP2
    python3 -m benchmarks.gpu_bench --model 26b-a4b --depth 30 --layouts 2x2:parallel.ep=2 --workloads text \
        --steps 5 --warmup 2 --budget 500 --out $OUT
    # 1x H200: E4B (E2B: --model e2b) whole
    python3 -m benchmarks.gpu_bench --model e4b --layouts 1x1 --workloads text --steps 6 --warmup 2 \
        --budget 500 --out $OUT

`--budget S` keeps the whole command inside S seconds (a device call's limit): each run is stopped at
an even share of the time left, keeping the steps it timed. A layout may carry recipe overrides for a
before/after pair in the same command, e.g. `--layouts 2x1,2x1:data.pad_to_multiple_of=128` or
`--layouts 2x1:parallel.ep=2,2x1:parallel.ep=1` (`;` between overrides; lists as `[7,5]`). The key
`code=DIR` runs that layout's `runner` from another source tree (DIR holding another commit's `runner/`,
`ds_configs/` and `pyproject.toml`, e.g. from `git worktree add DIR OLD`), so a code change gets its
before/after on the same GPUs, checkpoint and data: `--layouts 2x2:code=/tmp/old,2x2`.
`$OUT` gets three files only (records.jsonl, logs.txt with each run's tail, profiles.txt with the
profiled step's reports when BENCH_PROFILE_STEP=N); everything else stays under BENCH_WORK.
`--tiny --model NAME` is the CPU smoke test of all of it on that member's tiny model (fp32 baseline).

1. a random-weight Gemma4 of the member's real shape (presets.py: same width, vision tower and
   sliding/full pattern, `depth` decoder layers), bf16, built on the GPUs themselves (E2B's per-layer
   table alone is 2.3B weights) and saved as an HF checkpoint with the tiny tokenizer and a processor
   at 280 soft tokens per image;
2. two chat-JSONL workloads: `text` (one ~4096-token answer per sample) and `medpix` (one image, a
   short question and answer: a few hundred tokens, MedPix-VQA's shape);
3. `runner train` per layout and workload (torchrun, bf16, ZeRO-1, activation checkpointing,
   embeddings and vision tower frozen), steady state = median of the steps after the warm-up;
4. the baseline a user would otherwise pick: transformers' model under DeepSpeed ZeRO-3 through
   Accelerate, data parallel over the same GPUs (LoRA on one GPU: PEFT's model in a plain PyTorch
   loop, system "peft"), same data, same frozen parts (zero3_baseline.py;
   MoE experts through transformers' `grouped_mm`, named in the record; `--baseline-attn sdpa,flex_attention`
   runs it once per attention, the runner's ratio taken to the first);
5. `records.jsonl`: one record per run in the shape of `benchmarks/records.py` (tok/s per GPU, MFU —
   on active parameters for MoE, `details.mfu_basis` —, peak GiB, `runner plan`'s estimate, the ZeRO-3
   baseline and the ratio; date, card, commit from `git rev-parse` or BENCH_COMMIT, and the command),
   ready to append to benchmarks/results/records.jsonl.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from benchmarks.records import dumps, make_record
from benchmarks.zero3_baseline import ATTENTIONS
from runner.config import apply_overrides
from runner.metrics import peak_flops_per_device
from runner.train import free_port, use_expandable_segments

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the patient scan shows a small lesion in the left lung with no sign of fluid near the heart "
         "and the bone looks normal while the liver has a bright spot that may need a follow up").split()


@dataclass(frozen=True)
class Member:
    """A Gemma4 family member the bench builds at full width: its config at a depth, its full depth, and
    the depth and layouts a plain `--model NAME` runs at per GPU count (what `runner plan` fits in
    140 GiB per H200 for full fine-tuning with embeddings and vision tower frozen)."""

    label: str
    preset: str  # the presets.py function, named in the records
    full_depth: int
    sliceable: bool  # depth slices keep the 5:1 sliding/full pattern (31B, 26B-A4B); E models: full depth only
    depths: dict[int, int]  # GPUs -> default depth; key 0: any other count
    layouts: dict[int, str]  # GPUs -> default --layouts; key 0: any other count

    def config(self, depth: int):
        from runner.models.gemma4 import presets

        if not self.sliceable and depth != self.full_depth:
            raise SystemExit(f"gpu_bench: --model {self.label} is built at its full depth only; "
                             f"use --depth {self.full_depth} or leave --depth out")
        build = getattr(presets, self.preset)
        return build(depth) if self.sliceable else build()

    def default_depth(self, gpus: int) -> int:
        return self.depths.get(gpus, self.depths.get(0, self.full_depth))

    def default_layouts(self, gpus: int) -> str:
        return self.layouts.get(gpus, self.layouts[0])


# runner plan, text workload (1 x 4224 tokens, activation checkpointing), 140 GiB per GPU:
# 26B-A4B at depth 6 on one GPU 95 GiB (depth 12: 168, does not fit); depth 18 at TP2 EP2 123 GiB, at PP2 130;
# the full 30 layers on 4 GPUs at TP2 x PP2 EP2 103 GiB, TP4 EP4 100, PP4 107. E2B 53 GiB, E4B 87 on one GPU.
MEMBERS = {
    "31b": Member("31B", "gemma4_31b_config", 60, True, {0: 12}, {0: "2x2,4x1,1x4"}),
    "26b-a4b": Member("26B-A4B", "gemma4_26b_a4b_config", 30, True, {1: 6, 2: 18, 0: 30},
                      {1: "1x1", 2: "2x1:parallel.ep=2,1x2", 8: "4x2:parallel.ep=4,2x2:parallel.ep=2",
                       0: "2x2:parallel.ep=2,4x1:parallel.ep=4"}),
    "e2b": Member("E2B", "gemma4_e2b_config", 35, False, {}, {1: "1x1", 0: "1x1,2x1"}),
    "e4b": Member("E4B", "gemma4_e4b_config", 42, False, {}, {1: "1x1", 0: "1x1,2x1"}),
}


def bench_config(depth: int, model: str = "31b"):
    """`model`'s full width at `depth` decoder layers, with the tiny tokenizer's special-token ids."""
    from runner.models.gemma4.tiny import TINY_TOKEN_IDS

    config = MEMBERS[model].config(depth)
    ids = TINY_TOKEN_IDS  # the tiny tokenizer's special tokens stand in for the 31B's
    config.image_token_id, config.boi_token_id, config.eoi_token_id = ids["image"], ids["boi"], ids["eoi"]
    config.audio_token_id, config.boa_token_id, config.eoa_token_index = ids["audio"], ids["boa"], ids["eoa"]
    config.video_token_id = ids["video"]
    return config


def _write_shards(rank: int, workers: int, config, out: Path, shard_size: str) -> None:
    """One writer: build the random model on its own GPU and write every `workers`-th shard of the
    layout save_pretrained uses (each tensor comes from exactly one writer; rank 0 adds the index)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from transformers import Gemma4ForConditionalGeneration

    torch.manual_seed(0)
    device = f"cuda:{rank}" if torch.cuda.is_available() else "cpu"
    if torch.cuda.is_available():
        torch.cuda.set_device(rank)
    with torch.device(device):
        model = Gemma4ForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():  # a tied tensor once, under its first name (no lm_head)
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            state[name] = tensor
    split = split_torch_state_dict_into_shards(state, max_shard_size=shard_size)
    for i, (filename, names) in enumerate(sorted(split.filename_to_tensors.items())):
        if i % workers == rank:
            save_file({n: state[n].contiguous().cpu() for n in names}, out / filename, metadata={"format": "pt"})
    if rank == 0:
        total = sum(t.numel() * t.element_size() for t in state.values())
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": split.tensor_to_filename}, indent=2))
        model.config.save_pretrained(out)


def build_checkpoint(out: Path, config, name: str, workers: int) -> Path:
    """A random bf16 checkpoint of `config` with the processor, written as save_pretrained would (shards
    of 5 GB, an index, no tied lm_head) by `workers` processes at once: transformers writes shards one
    by one (~70 s for the full 31B on 4x H200)."""
    from runner.models.gemma4.presets import GEMMA4_31B_IMAGE_SOFT_TOKENS
    from runner.models.gemma4.tiny import tiny_processor, tiny_tokenizer

    ckpt = out / name
    if (ckpt / "config.json").exists():
        return ckpt
    partial = ckpt.with_name(ckpt.name + ".partial")  # renamed when complete: a killed command leaves no half checkpoint
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    torch.multiprocessing.spawn(_write_shards, args=(workers, config, partial, "5GB"), nprocs=workers)
    tiny_processor(config, tiny_tokenizer(), soft_tokens=GEMMA4_31B_IMAGE_SOFT_TOKENS).save_pretrained(partial)
    shutil.rmtree(ckpt, ignore_errors=True)  # a half one from before this rule
    partial.rename(ckpt)
    return ckpt


def _write_atomically(path: Path, text: str) -> None:
    """A killed command leaves no truncated file for the next one to reuse."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.rename(path)


def build_data(out: Path, n: int, text_tokens: int, workloads: list[str]) -> dict[str, Path]:
    """Chat JSONL workloads (only those asked for; kept under BENCH_WORK for the next command);
    images are PNGs beside the file. The text answers are sized in tokens of the tokenizer the
    checkpoint carries."""
    from PIL import Image

    from runner.models.gemma4.tiny import tiny_tokenizer

    data = out / "data"
    (data / "img").mkdir(parents=True, exist_ok=True)
    paths = {"text": data / f"text_{n}x{text_tokens}.jsonl", "medpix": data / f"medpix_{n}.jsonl"}
    if "text" in workloads and not paths["text"].exists():
        per_word = len(tiny_tokenizer()(" ".join(WORDS * 10)).input_ids) / (10 * len(WORDS))
        n_words, rng = int(text_tokens / per_word), random.Random(0)
        lines = [json.dumps({"messages": [
            {"role": "user", "content": [{"type": "text", "text": f"Write report {i}."}]},
            {"role": "assistant", "content": [{"type": "text", "text": " ".join(rng.choice(WORDS) for _ in range(n_words))}]},
        ]}) for i in range(n)]
        _write_atomically(paths["text"], "\n".join(lines) + "\n")
    if "medpix" in workloads and not paths["medpix"].exists():
        rng, lines = random.Random(1), []
        for i in range(n):
            name = f"img/{i}.png"
            pixels = torch.randint(0, 255, (3, 64, 64), generator=torch.Generator().manual_seed(i)).to(torch.uint8)
            Image.fromarray(pixels.permute(1, 2, 0).numpy()).resize((768, 768)).save(data / name, compress_level=1)
            question = " ".join(rng.choice(WORDS) for _ in range(20))
            answer = " ".join(rng.choice(WORDS) for _ in range(40))
            lines.append(json.dumps({"messages": [
                {"role": "user", "content": [{"type": "image", "image": name}, {"type": "text", "text": question}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}))
        _write_atomically(paths["medpix"], "\n".join(lines) + "\n")
    return paths


WORKLOADS = {  # micro-batch, max_length
    "text": (1, 4096 + 128),
    "medpix": (4, 1024),
}


def recipe(out: Path, ckpt: Path, data: Path, workload: str, tp: int, pp: int, dp: int, steps: int, gas: int,
           overrides: dict[str, str], profile_step: int) -> tuple[Path, dict]:
    """The run's recipe file, and its `train` section after the overrides."""
    micro, max_length = WORKLOADS[workload]
    cfg = {
        "model": {"path": str(ckpt), "dtype": "bfloat16", "attn_implementation": "sdpa"},
        "parallel": {"tp": tp, "pp": pp, "dp": dp},
        "train": {"micro_batch_size": micro, "global_batch_size": micro * gas * dp, "max_steps": steps,
                  "activation_checkpointing": True, "grad_clip": 1.0},
        "freeze": {"embeddings": True, "vision_tower": True},
        "optim": {"lr": 1e-5, "warmup_steps": 1},
        "data": {"train": str(data), "max_length": max_length, "group_by_length": False, "num_workers": 4},
        "output": {"dir": str(out)},
        "checkpoint": {"every_steps": 0, "resume": "none", "export": False, "at_end": False},
        "logging": {"tensorboard": False, "progress_bar": False, "profile_step": profile_step},
    }
    apply_overrides(cfg, [f"{key}={value}" for key, value in overrides.items()])
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path, cfg["train"]


def descendants(root: int) -> list[int]:
    """Every live process below `root`, read from /proc before any is killed. torchrun starts each
    worker in a session of its own, so killing torchrun's process group left the workers of a
    timed-out run holding the GPUs and the next run went out of memory."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # the name in (...) may hold spaces
            children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def code_env(code: Path) -> dict[str, str]:
    """The environment that imports `runner` from `code` (a layout's `code=`, else this checkout)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")]))}


def run(cmd: list[str], log: Path, timeout: int, tails: Path, code: Path = ROOT) -> int:
    """Run one job from the source tree `code`; its whole log stays in `log`, its last lines go to
    the shared `tails` file."""
    t0 = time.time()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=code, env=code_env(code), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = 124
        finally:  # torchrun and its workers go with it (a timeout, or the bench interrupted), else they keep the GPUs
            if proc.poll() is None:  # once reaped, its pid may be another process's
                for pid in [proc.pid, *descendants(proc.pid)]:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
                proc.wait()
    status = f"{'ok' if rc == 0 else 'FAILED rc=' + str(rc)} in {time.time() - t0:.0f}s (limit {timeout}s)"
    print(f"  {status}: {log}", flush=True)
    lines = log.read_text(errors="replace").splitlines()
    errors = list(dict.fromkeys(x for x in lines if "Error" in x and "elastic" not in x))[:20]  # the cause, not torchrun's summary
    with tails.open("a") as f:
        f.write(f"===== {log.name}: {status}\n" + "\n".join(errors + lines[-40:]) + "\n")
    return rc


def steady(records: list[dict], warmup: int, profile_step: int) -> dict:
    """Median over the steps after the warm-up (first steps compile kernels and fill caches),
    leaving out the profiled step (profilers slow it)."""
    timed = [r for r in records if r["step"] > warmup and r["step"] != profile_step]
    rest = timed or records[-1:]
    med = {k: statistics.median(r[k] for r in rest) for k in ("tokens_per_sec_per_gpu", "step_time", "data_time")}
    mfu = [r["mfu"] for r in rest if r.get("mfu") is not None]
    peak = peak_flops_per_device()
    return {**med, "mfu": statistics.median(mfu) if mfu else None,
            "model_tflops_per_gpu": statistics.median(mfu) * peak / 1e12 if mfu and peak else None,
            "mem_gib": max(r["mem_gib"] for r in records), "steps_timed": len(rest)}


class Budget:
    """Per-run time limits inside one command's `budget` seconds (0: none): each run may use at most
    `timeout`, and at most an even share of the time left among the runs still to go, so a run that
    starts late is cut at its share (keeping its timed steps) instead of the whole command at the
    device's limit."""

    def __init__(self, budget: int, timeout: int, start: float, jobs: int) -> None:
        self.budget, self.timeout, self.start, self.left = budget, timeout, start, max(jobs, 1)

    def next_timeout(self) -> int:
        share = self.timeout
        if self.budget:
            share = min(share, int((self.budget - (time.time() - self.start)) / self.left))
        self.left = max(self.left - 1, 1)
        return max(share, 1)


def is_moe_dir(ckpt: Path) -> bool:
    """Whether the checkpoint's config has the mixture-of-experts block (its MFU counts active parameters)."""
    return bool(json.loads((ckpt / "config.json").read_text())["text_config"].get("enable_moe_block"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="31b", choices=sorted(MEMBERS), help="the Gemma4 member whose full width is built")
    ap.add_argument("--depth", type=int, default=None,
                    help="decoder layers (31B: 12; 26B-A4B: 6 on 1 GPU, 18 on 2, else 30; E2B/E4B: their full depth)")
    ap.add_argument("--layouts", default=None, help="tp x pp per run, ':'-separated recipe overrides after it; "
                    "dp = GPUs / (tp*pp) (default per model and GPU count: MEMBERS)")
    ap.add_argument("--workloads", default="text,medpix")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--gas", type=int, default=8, help="micro-batches per step per pipeline")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--text-tokens", type=int, default=4000)
    ap.add_argument("--baseline", default="zero3", choices=["zero3", "none"])
    ap.add_argument("--lora", type=int, default=0, metavar="RANK",
                    help="LoRA of this rank (alpha 2*rank, every decoder linear) in every run and the baseline (PEFT)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per run at most")
    ap.add_argument("--budget", type=int, default=0, help="seconds for the whole command (0: no limit): each run "
                    "gets at most an even share of what is left, so a device call's limit is never hit mid-run")
    ap.add_argument("--baseline-attn", default="sdpa",
                    help="the baseline's attention, ','-separated for one baseline run each (sdpa, flex_attention; "
                         "the runner's ratio is to the first); flex_attention rows are padded to --baseline-pad-to")
    ap.add_argument("--baseline-pad-to", type=int, default=4224,
                    help="the flex_attention baseline's pad_to_multiple_of (one compiled length, as the runner's)")
    ap.add_argument("--experts-implementation", default="grouped_mm",
                    help="MoE baseline: transformers' experts_implementation (its default and fastest built-in)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test with the tiny model")
    args = ap.parse_args()
    attns = list(dict.fromkeys(a.strip() for a in args.baseline_attn.split(",")))
    if not set(attns) <= set(ATTENTIONS):
        raise SystemExit(f"--baseline-attn {args.baseline_attn!r}: each value must be one of {', '.join(ATTENTIONS)}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`/`kill`: unwind, so run() stops its job

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    use_expandable_segments()  # the allocator setting runner train sets for itself, for the ZeRO-3 baseline too
    work = Path(os.environ.get("BENCH_WORK", "/tmp/gpu_bench"))
    work.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count() or int(os.environ.get("BENCH_CPU_PROCS", "4"))
    t0 = time.time()
    member = MEMBERS[args.model]
    depth = args.depth or member.default_depth(gpus)
    if args.tiny:  # CPU smoke test of this script: the tiny model of the member, short texts
        from runner.models.gemma4.tiny import make_tiny

        ckpt = work / ("tiny" if args.model == "31b" else f"tiny-{args.model}")
        if not (ckpt / "config.json").exists():
            make_tiny(ckpt, like=args.model)
        depth = json.loads((ckpt / "config.json").read_text())["text_config"]["num_hidden_layers"]
        WORKLOADS.update(text=(1, args.text_tokens + 64), medpix=(2, 512))
        model_name = f"tiny Gemma4 like {member.label} (CPU smoke test)"
    else:
        ckpt = build_checkpoint(work, bench_config(depth, args.model), f"gemma4-{args.model}-d{depth}", max(1, gpus))
        model_name = f"{member.preset}({'depth=' + str(depth) if member.sliceable else ''}) random bf16"
    moe = is_moe_dir(ckpt)
    data = build_data(work, args.samples, args.text_tokens, args.workloads.split(","))
    print(f"checkpoint + data ready in {time.time() - t0:.0f}s on {gpus} devices", flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    results: dict = {"date": time.strftime("%Y-%m-%d"), "device": device, "gpus": gpus, "depth": depth,
                     "model": model_name, "moe": moe, "runs": [], "baseline": {}}
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={gpus}", f"--master_port={free_port()}"]
    tails, profiles = out / "logs.txt", out / "profiles.txt"
    profile_step = int(os.environ.get("BENCH_PROFILE_STEP", 0))
    layout_arg = args.layouts or member.default_layouts(gpus)
    layouts = [x for x in re.split(r",(?![^\[]*\])", layout_arg) if x != "none"]  # ',' inside [...]: a list value
    runnable = [x for x in layouts if gpus % math.prod(map(int, x.split(":")[0].split("x"))) == 0]
    budget = Budget(args.budget, args.timeout, t0,
                    len(args.workloads.split(",")) * (len(runnable) + (args.baseline == "zero3") * len(attns)))
    for workload in args.workloads.split(","):
        for index, layout in enumerate(layouts):
            shape, *sets = layout.split(":")
            overrides = dict(kv.split("=", 1) for part in sets for kv in part.split(";"))
            if args.lora:
                overrides = {"lora.enabled": "true", "lora.rank": str(args.lora), "lora.alpha": str(2 * args.lora),
                             **overrides}
            code = Path(overrides.pop("code", ROOT)).resolve()
            tp, pp = map(int, shape.split("x"))
            if gpus % (tp * pp):
                print(f"{workload} tp={tp} pp={pp}: skipped, {gpus} GPUs are not a multiple of tp*pp", flush=True)
                continue
            dp = gpus // (tp * pp)
            run_dir = work / f"run_{workload}_{index}_tp{tp}pp{pp}dp{dp}"
            shutil.rmtree(run_dir, ignore_errors=True)  # a kept BENCH_WORK must not add an earlier command's metrics
            rec_path, train = recipe(run_dir, ckpt, data[workload], workload, tp, pp, dp, args.steps, args.gas,
                                     overrides, profile_step)
            gas = train["global_batch_size"] // (train["micro_batch_size"] * dp)
            plan = subprocess.run([sys.executable, "-m", "runner", "plan", str(rec_path), "--world-size", str(gpus),
                                   "--json"], cwd=code, env=code_env(code), capture_output=True, text=True)
            print(f"{workload} tp={tp} pp={pp} dp={dp}", flush=True)
            rc = run(torchrun + ["-m", "runner", "train", str(rec_path)], work / f"log_{run_dir.name}.txt",
                     budget.next_timeout(), tails, code)
            for report in sorted(run_dir.glob("profile_rank0*.txt")):
                with profiles.open("a") as f:
                    f.write(f"===== {run_dir.name}/{report.name}\n{report.read_text()}\n")
            entry = {"workload": workload, "tp": tp, "pp": pp, "dp": dp, "overrides": overrides, "rc": rc,
                     **({} if code == ROOT else {"code": str(code)}),
                     "micro_batch": train["micro_batch_size"], "micro_batches_per_step": gas,
                     "bubble_share": (pp - 1) / (gas + pp - 1)}
            if moe:  # the runner's expert kernel (moe.py): one grouped GEMM per projection on CUDA bf16
                entry["experts_implementation"] = "grouped_mm" if torch.cuda.is_available() else "loop"
            if plan.returncode == 0:  # the plan's allocated bytes (no CUDA context) vs the measured peak
                planned = json.loads(plan.stdout)
                entry["plan_gib"] = planned["max_gib_per_gpu"]
                entry["plan_total_gib"] = planned.get("max_total_gib_per_gpu")  # absent from older trees' plans
            else:
                with tails.open("a") as f:
                    f.write(f"===== runner plan {rec_path.name}: rc {plan.returncode}\n{plan.stderr[-2000:]}\n")
            metrics = run_dir / "metrics.jsonl"
            recs = [json.loads(line) for line in metrics.read_text().splitlines()
                    if '"split"' not in line] if metrics.exists() else []
            # every timed step logged counts, also when the run died after them (e.g. stopped in shutdown)
            if len(recs) > args.warmup:
                entry["steps_logged"] = len(recs)
                entry.update(steady(recs, args.warmup, profile_step))
                entry["tokens_per_step"] = recs[-1]["tokens"]
                entry["step1"] = {"loss": recs[0]["loss"], "grad_norm": recs[0]["grad_norm"]}  # same data, weights
            results["runs"].append(entry)
            write_records(out, results)
        for attn in attns if args.baseline == "zero3" else []:
            micro, max_length = WORKLOADS[workload]
            print(f"{workload} ZeRO-3 baseline dp={gpus} {attn}", flush=True)
            key = workload if attn == attns[0] else f"{workload}:{attn}"  # the runner's records compare to the first
            base_out = work / f"zero3_{workload}_{attn}.json"
            base_out.unlink(missing_ok=True)  # a kept BENCH_WORK must not give an earlier command's figures
            rc = run(torchrun + [str(ROOT / "benchmarks" / "zero3_baseline.py"), "--ckpt", str(ckpt),
                                 "--data", str(data[workload]), "--micro", str(micro), "--max-length", str(max_length),
                                 "--gas", str(args.gas), "--steps", str(args.steps), "--warmup", str(args.warmup),
                                 "--lora-rank", str(args.lora), "--dtype", "float32" if args.tiny else "bfloat16",
                                 "--experts-implementation", args.experts_implementation, "--attn", attn,
                                 *(["--pad-to-multiple-of", str(args.baseline_pad_to)] if attn == "flex_attention"
                                   else []), "--out", str(base_out)],
                     work / f"log_zero3_{workload}_{attn}.txt", budget.next_timeout(), tails)
            if base_out.exists():  # also a run stopped at --timeout after its timed steps
                results["baseline"][key] = {**json.loads(base_out.read_text()), "rc": rc, "workload": workload}
        write_records(out, results)
    print_table(write_records(out, results))
    return 0


def _commit() -> str:
    """The checkout's short commit (BENCH_COMMIT where the tree has no git), or "unknown"."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return git.stdout.strip() if git.returncode == 0 else "unknown"


def to_records(results: dict, command: str, commit: str) -> list[dict]:
    """The runs and their ZeRO-3 baselines as records in the one results shape (benchmarks/records.py).
    MoE models count MFU on active parameters (router, top-k experts, dense MLP, attention, head:
    runner/metrics.py), said in `details.mfu_basis`; a baseline's MFU uses the runner's FLOPs per token
    of the same workload (same model and data)."""
    common = {"date": results["date"], "card": results["device"], "gpu_count": results["gpus"], "commit": commit,
              "command": command, "model": results["model"], "depth": results["depth"]}
    basis = "active parameters" if results.get("moe") else None
    keys = {"step_time": "step_time_s", "data_time": "data_time_s", "model_tflops_per_gpu": "model_tflops_per_gpu",
            "micro_batch": "micro_batch", "micro_batches_per_step": "micro_batches_per_step",
            "bubble_share": "bubble_share", "tokens_per_step": "tokens_per_step", "step1": "step1",
            "plan_total_gib": "plan_total_gib", "steps_timed": "steps_timed", "rc": "rc",
            "experts_implementation": "experts_implementation"}
    records, flops_ratio, mfu_ratio = [], {}, {}
    for e in results["runs"]:
        base = results["baseline"].get(e["workload"])
        baseline = None if base is None else {"name": base.get("name", "ZeRO-3, same command"), "peak_gib": base.get("mem_gib"),
                                              "tokens_per_sec_per_gpu": base["tokens_per_sec_per_gpu"]}
        if e.get("model_tflops_per_gpu") and e.get("tokens_per_sec_per_gpu"):  # model FLOPs per token (the first run's)
            flops_ratio.setdefault(e["workload"], e["model_tflops_per_gpu"] / e["tokens_per_sec_per_gpu"])
            mfu_ratio.setdefault(e["workload"], e["mfu"] / e["tokens_per_sec_per_gpu"])
        records.append(make_record(
            **common, system="runner", workload=e["workload"], tp=e["tp"], pp=e["pp"], dp=e["dp"],
            overrides=e["overrides"], tokens_per_sec_per_gpu=e.get("tokens_per_sec_per_gpu"), mfu=e.get("mfu"),
            peak_gib=e.get("mem_gib"), plan_gib=e.get("plan_gib"),
            baseline=None if baseline is None else {k: v for k, v in baseline.items() if v is not None},
            notes=f"runner from {e['code']}" if "code" in e else "",
            details={**{new: e.get(old) for old, new in keys.items()},
                     "mfu_basis": basis if e.get("mfu") is not None else None}))
    for key, b in results["baseline"].items():
        workload = b.get("workload", key)
        tflops, mfu = flops_ratio.get(workload), mfu_ratio.get(workload)
        experts = b.get("experts_implementation")
        attn = {} if b.get("attn_implementation", "sdpa") == "sdpa" else {  # transformers' default: no override
            "model.attn_implementation": b["attn_implementation"], "data.pad_to_multiple_of": b["pad_to_multiple_of"]}
        records.append(make_record(
            **common, system=b.get("system", "zero3"), workload=workload, tp=1, pp=1, dp=b["dp"], overrides=attn,
            tokens_per_sec_per_gpu=b["tokens_per_sec_per_gpu"], mfu=mfu * b["tokens_per_sec_per_gpu"] if mfu else None,
            peak_gib=b.get("mem_gib"), plan_gib=None,
            notes=f"transformers experts_implementation={experts}" if experts else "",
            details={"step_time_s": b.get("step_time"), "micro_batch": b.get("micro_batch"),
                     "micro_batches_per_step": b.get("micro_batches_per_step"), "steps_timed": b.get("steps_timed"),
                     "rc": b.get("rc"), "experts_implementation": experts, "mfu_basis": basis if mfu else None,
                     "trainable_params": b.get("trainable_params"),
                     "model_tflops_per_gpu": tflops * b["tokens_per_sec_per_gpu"] if tflops else None}))
    return records


def write_records(out: Path, results: dict) -> list[dict]:
    """`out/records.jsonl`, rewritten whole (a stopped command keeps the runs so far)."""
    records = to_records(results, shlex.join(["python", "-m", "benchmarks.gpu_bench", *sys.argv[1:]]), _commit())
    _write_atomically(out / "records.jsonl", dumps(records))
    return records


def print_table(records: list[dict]) -> None:
    first = records[0] if records else {"card": "-", "gpu_count": 0, "model": "-"}
    moe = any(r.get("details", {}).get("mfu_basis") == "active parameters" for r in records)
    print(f"\n{first['card']} x{first['gpu_count']}, {first['model']}"
          + ("; MFU on active parameters (router + top-k experts + dense MLP + attention + head)" if moe else ""))
    print(f"{'workload':8} {'layout':14} {'tok/s/gpu':>10} {'MFU':>6} {'peak GiB':>9} {'plan GiB':>9} {'vs base':>9}")
    for r in records:
        lay = r["layout"]
        name = {"zero3": "ZeRO-3", "peft": "PEFT"}.get(r["system"], f"tp{lay['tp']}pp{lay['pp']}dp{lay['dp']}")
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
        print(f"{r['workload']:8} {name:14} {r['tokens_per_sec_per_gpu'] or 0:>10.0f} {mfu:>6} {r['peak_gib'] or 0:>9.1f} "
              f"{r['plan_gib'] or 0:>9.1f} {r['ratio'] or 0:>9.2f} {r['overrides'] or ''}")


if __name__ == "__main__":
    raise SystemExit(main())
