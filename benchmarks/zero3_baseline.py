"""The baseline a user would pick instead: transformers' Gemma4 under DeepSpeed ZeRO-3 through
Accelerate's DeepSpeed plugin, data parallel over every GPU — or, for LoRA on one GPU, PEFT's model in
a plain PyTorch loop (what the Trainer runs there). Same checkpoint, data, collator, frozen parts
(embeddings, vision tower) and activation checkpointing as the runner's runs.

Launched by gpu_bench.py under torchrun; writes one JSON with the steady-state tok/s per GPU. Devices
go through DeepSpeed's accelerator, so `gpu_bench --tiny` runs this same script on CPU (fp32, gloo).

Every family member: E2B/E4B's per-layer embedding table is frozen with the embeddings and their audio
tower too (the runner neither builds nor trains it). MoE (26B-A4B): transformers' experts forward is
chosen explicitly (`--experts-implementation`, recorded). transformers 5.17 through 5.25 default
`Gemma4TextExperts` to `grouped_mm` (torch's grouped GEMM over the routed tokens; the per-expert
`eager` loop only where the model cannot switch); `batched_mm` gathers one weight matrix per
(token, choice), far beyond a GPU's memory at 4096 tokens x top-8; `deepgemm` and `sonicmoe` need
kernels installed from outside. So `grouped_mm`, what a user gets and the fastest that runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

ATTENTIONS = ("sdpa", "flex_attention")  # transformers' default, and the runner's for long text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--micro", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=4096)
    ap.add_argument("--gas", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lora-rank", type=int, default=0, help="PEFT LoRA of this rank (alpha 2*rank) on every decoder "
                    "linear of the frozen model, as the runner's lora section builds it (0: full fine-tuning)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--attn", default="sdpa", choices=ATTENTIONS,
                    help="transformers' attention: its default sdpa, or flex_attention as the runner's long-text runs")
    ap.add_argument("--pad-to-multiple-of", type=int, default=8,
                    help="the collator's padding: one length for every batch, so flex_attention compiles once")
    ap.add_argument("--experts-implementation", default="grouped_mm",
                    help="MoE models: transformers' experts_implementation (eager, grouped_mm, batched_mm, ...)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin
    from deepspeed.accelerator import get_accelerator
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from runner.data.collate import Gemma4Collator, hf_model_inputs
    from runner.data.loader import MicroBatchLoader
    from runner.data.sampler import StepSampler
    from runner.data.sources import load_source

    acc = get_accelerator()
    local = int(os.environ.get("LOCAL_RANK", 0))
    acc.set_device(local)
    bf16 = args.dtype == "bfloat16"
    # Built on the device before the plugin exists: transformers 5 under deepspeed.zero.Init fails in
    # _init_weights; ZeRO-3 partitions it in prepare().
    config = AutoConfig.from_pretrained(args.ckpt)
    text_config = config.get_text_config()
    moe = bool(getattr(text_config, "enable_moe_block", False))
    # E2B / E4B carry an audio tower, which refuses sdpa at construction: eager there, args.attn for the rest
    attn = args.attn if config.audio_config is None else {"": args.attn, "text_config": args.attn,
                                                          "vision_config": args.attn, "audio_config": "eager"}
    model = AutoModelForImageTextToText.from_pretrained(
        args.ckpt, dtype=getattr(torch, args.dtype), device_map={"": acc.device_name(local)},
        attn_implementation=attn, **({"experts_implementation": args.experts_implementation} if moe else {}))
    language_model = model.model.language_model
    frozen = [language_model.embed_tokens, model.model.vision_tower]
    frozen += [m for m in (getattr(language_model, "embed_tokens_per_layer", None),  # E2B / E4B
                           getattr(model.model, "audio_tower", None), getattr(model.model, "embed_audio", None))
               if m is not None]
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)
    experts = model.config.get_text_config()._experts_implementation if moe else None
    if args.lora_rank:
        from peft import LoraConfig, get_peft_model

        from runner.config import LORA_TARGETS
        from runner.lora import peft_target_modules

        model = get_peft_model(model, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank,
                                                 target_modules=peft_target_modules(list(LORA_TARGETS))))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # before ZeRO-3 partitions them
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False

    hidden = text_config.hidden_size
    ds_config = {
        "bf16": {"enabled": bf16},
        # Accelerate's "auto" values are sized from config.hidden_size, which Gemma4's top-level
        # config lacks; these are what it would pick from the text model's width.
        "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                              "reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
                              "stage3_param_persistence_threshold": 10 * hidden},
        "gradient_clipping": 1.0,
        "train_micro_batch_size_per_gpu": args.micro,
        "gradient_accumulation_steps": args.gas,
    }
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.01)
    # LoRA on one GPU: what a PEFT user runs there (the Trainer's plain loop), not ZeRO-3 over one rank
    plain = bool(args.lora_rank) and int(os.environ.get("WORLD_SIZE", "1")) == 1
    if plain:
        dist.init_process_group("nccl" if acc.device_name() == "cuda" else "gloo")
        device = acc.device_name(local)

        def backward(loss: torch.Tensor, last: bool) -> None:
            (loss / args.gas).backward()
            if last:
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad()
    else:
        accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config),
                                  gradient_accumulation_steps=args.gas)
        model, optimizer = accelerator.prepare(model, optimizer)
        device = accelerator.device

        def backward(loss: torch.Tensor, last: bool) -> None:
            accelerator.backward(loss)  # ZeRO-3 scales by gas and steps at the boundary itself
            optimizer.step()
            optimizer.zero_grad()

    processor = AutoProcessor.from_pretrained(args.ckpt)
    source = load_source(args.data)
    world, rank = dist.get_world_size(), dist.get_rank()
    sampler = StepSampler(len(source), args.micro, args.gas, world, rank, seed=0)
    loader = MicroBatchLoader(source, Gemma4Collator(processor, max_length=args.max_length,
                                                         pad_to_multiple_of=args.pad_to_multiple_of), sampler, num_workers=2)

    times, tokens = [], []
    model.train()
    for _ in range(args.steps):
        acc.synchronize()
        t0 = time.time()
        n = 0
        micro = loader.next_step()
        for i, batch in enumerate(micro):
            n += int(batch["attention_mask"].sum())
            with contextlib.nullcontext() if plain else accelerator.accumulate(model):
                inputs = {k: v.to(device) for k, v in hf_model_inputs(batch).items()}
                loss = model(**inputs).loss
                backward(loss, i == len(micro) - 1)
        acc.synchronize()
        count = torch.tensor([n], device=device)
        dist.all_reduce(count)
        times.append(time.time() - t0)
        tokens.append(int(count))
        peak = torch.tensor([acc.max_memory_allocated() / 2**30], device=device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        if rank == 0:
            print(f"zero3 step {len(times)}: {times[-1]:.2f}s {tokens[-1] / times[-1] / world:.0f} tok/s/gpu "
                  f"loss {float(loss):.3f}", flush=True)
        rest = list(zip(times, tokens))[args.warmup:]
        if rank == 0 and rest:  # rewritten every step: a run the bench stops at its time limit keeps its figures
            result = {
                "tokens_per_sec_per_gpu": statistics.median(t / s / world for s, t in rest),
                "step_time": statistics.median(s for s, _ in rest),
                "mem_gib": float(peak), "steps_timed": len(rest),
                "system": "peft" if plain else "zero3",
                "name": ("transformers + PEFT, plain PyTorch loop" if plain else "ZeRO-3")
                        + ("" if args.attn == "sdpa" else f", {args.attn}") + ", same command",
                "dp": world, "micro_batch": args.micro, "micro_batches_per_step": args.gas,
                "trainable_params": trainable, "attn_implementation": args.attn,
                "pad_to_multiple_of": args.pad_to_multiple_of, **({"experts_implementation": experts} if moe else {}),
            }
            tmp = f"{args.out}.tmp"
            with open(tmp, "w") as f:
                json.dump(result, f, indent=1)
            os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
