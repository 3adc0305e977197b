"""Synthetic global batches for model tests: token ids, images as patches, labels.

Built directly (not through the processor) so a model test controls every case: 0, 1 or several
images per sample, text-only micro-batches, right padding, unequal label counts.

Also what the pipeline test workers share: their arguments, DeepSpeed config, pipeline and step.
"""

from __future__ import annotations

import argparse

import deepspeed
import torch
from transformers import AutoConfig, Gemma4Config

from runner.checkpoint.hf_load import load_hf_weights
from runner.compat import skip_deepspeed_shm_comm
from runner.config import LoraConfig
from runner.data.collate import Encoded
from runner.data.packing import Packer
from runner.lora import adopt_adapter_config, apply_lora, base_identity, seed_dropout
from runner.models.gemma4.moe import set_balance_scale
from runner.models.gemma4.pipeline import Gemma4Pipeline, to_pipe_batch
from runner.parallel.topology import ParallelDims, ParallelState, build_parallel_state
from runner.train import set_micro_batches, step_counts

IGNORE = -100


def _image(gen: torch.Generator, config: Gemma4Config, w: int, h: int, max_soft: int = 70):
    """One image of w×h patches (multiples of the pooling kernel), padded to the processor's
    max_patches; returns (pixel_values[P, 3p²], positions[P, 2], n_soft_tokens)."""
    vc = config.vision_config
    k = vc.pooling_kernel_size
    max_patches = max_soft * k * k
    pixels = torch.rand(max_patches, 3 * vc.patch_size**2, generator=gen)
    pos = torch.full((max_patches, 2), -1, dtype=torch.long)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos[: w * h, 0] = xs.flatten()
    pos[: w * h, 1] = ys.flatten()
    pixels[w * h:] = 0.0
    return pixels, pos, (w // k) * (h // k)


def _sample(gen, config: Gemma4Config, n_text: int, n_answer: int, images: list[tuple[int, int]] = (),
            bos: bool = True) -> Encoded:
    """One sample: [bos] text, each image (boi, soft tokens, eoi) followed by 3 text tokens, the answer."""
    vocab = config.text_config.vocab_size
    low = 16  # ids below are special tokens

    def text(n: int) -> list[int]:
        return torch.randint(low, vocab, (n,), generator=gen).tolist()

    ids, types, pix, pos = [config.text_config.bos_token_id] if bos else [], [0] if bos else [], [], []
    ids += text(n_text)
    types += [0] * n_text
    for w, h in images:
        p, q, n_soft = _image(gen, config, w, h)
        pix.append(p)
        pos.append(q)
        ids += [config.boi_token_id] + [config.image_token_id] * n_soft + [config.eoi_token_id]
        types += [0] + [1] * n_soft + [0]
        ids += text(3)
        types += [0] * 3
    prompt_len = len(ids)
    ids += text(n_answer)
    types += [0] * n_answer
    vc = config.vision_config
    max_patches = 70 * vc.pooling_kernel_size**2
    return Encoded(
        torch.tensor(ids), torch.tensor([IGNORE] * prompt_len + ids[prompt_len:]), torch.tensor(types),
        torch.stack(pix) if pix else torch.zeros(0, max_patches, 3 * vc.patch_size**2),
        torch.stack(pos) if pos else torch.zeros(0, max_patches, 2, dtype=torch.long),
    )


def collate(config: Gemma4Config, built: list[Encoded], multiple: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad samples to one length, a multiple of `multiple`, images in sample order."""
    seq = -(-max(len(e) for e in built) // multiple) * multiple
    pad = config.text_config.pad_token_id
    out = {
        "input_ids": torch.full((len(built), seq), pad, dtype=torch.long),
        "attention_mask": torch.zeros(len(built), seq, dtype=torch.long),
        "mm_token_type_ids": torch.zeros(len(built), seq, dtype=torch.long),
        "labels": torch.full((len(built), seq), IGNORE, dtype=torch.long),
    }
    for i, e in enumerate(built):
        n = len(e)
        out["input_ids"][i, :n] = e.input_ids
        out["attention_mask"][i, :n] = 1
        out["mm_token_type_ids"][i, :n] = e.mm_token_type_ids
        out["labels"][i, :n] = e.labels
    out["pixel_values"] = torch.cat([e.pixel_values for e in built])
    out["image_position_ids"] = torch.cat([e.image_position_ids for e in built])
    return out


def micro_batch(gen, config: Gemma4Config, samples: list[dict], multiple: int = 1) -> dict[str, torch.Tensor]:
    """Collate samples (dicts of n_text, n_answer, images) with right padding to a multiple of `multiple`."""
    return collate(config, [_sample(gen, config, **s) for s in samples], multiple)


GLOBAL_BATCHES = {
    # four micro-batches of two samples, unequal lengths, padding and label counts
    "text": [
        [dict(n_text=20, n_answer=9), dict(n_text=31, n_answer=4)],
        [dict(n_text=12, n_answer=15), dict(n_text=12, n_answer=15)],
        [dict(n_text=40, n_answer=2), dict(n_text=5, n_answer=7)],
        [dict(n_text=25, n_answer=11), dict(n_text=18, n_answer=3)],
    ],
    # one image; several images in one sample; a text-only sample beside an image; a text-only micro-batch
    "image": [
        [dict(n_text=6, n_answer=8, images=[(9, 6)]), dict(n_text=10, n_answer=5, images=[(6, 6)])],
        [dict(n_text=4, n_answer=12, images=[(6, 9), (3, 6)]), dict(n_text=20, n_answer=6)],
        [dict(n_text=15, n_answer=3), dict(n_text=9, n_answer=10)],
        [dict(n_text=7, n_answer=4, images=[(12, 9)]), dict(n_text=3, n_answer=9, images=[(3, 3)])],
    ],
}


# One step's samples in the sampler's order, packed first-fit into rows of PACK_LENGTH tokens (the tiny
# model's sliding window is 16, so most windows would cross a sample boundary if the masks let them):
# rows [0, 1, 6] (30 + 19 + 13 tokens), [2, 3] (19 + 32: sample 2 has no bos, its image opens the row),
# [4, 5] (26 + 36), [7] (55). 0, 1 and 2 images per sample, text-only samples.
PACK_LENGTH = 64
PACK_MULTIPLE = 8  # micro-batches padded to their longest row: 64, 56, 64, 56 tokens (packed), 64, 64 (packed2)
PACKED_SAMPLES = [
    dict(n_text=10, n_answer=8, images=[(9, 6)]),
    dict(n_text=12, n_answer=6),
    dict(n_text=0, n_answer=10, images=[(6, 6)], bos=False),
    dict(n_text=4, n_answer=9, images=[(6, 9), (3, 6)]),
    dict(n_text=20, n_answer=5),
    dict(n_text=6, n_answer=12, images=[(12, 9)]),
    dict(n_text=8, n_answer=4),
    dict(n_text=30, n_answer=10, images=[(9, 9)]),
]
# PACKED_SAMPLES as packed micro-batches of 1 or 2 rows each, or one sample per micro-batch (the reference)
PACKED_KINDS = {"packed": 1, "packed2": 2, "unpacked": 0}


def global_batch(config: Gemma4Config, kind: str, seed: int = 0, multiple: int = 1) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    if kind not in PACKED_KINDS:
        return [micro_batch(gen, config, samples, multiple) for samples in GLOBAL_BATCHES[kind]]
    encoded = [_sample(gen, config, **s) for s in PACKED_SAMPLES]
    if not PACKED_KINDS[kind]:
        return [collate(config, [e]) for e in encoded]
    vc = config.vision_config
    packer = Packer(PACK_LENGTH, PACKED_KINDS[kind], config.text_config.pad_token_id,
                    70 * vc.pooling_kernel_size**2, 3 * vc.patch_size**2, PACK_MULTIPLE)
    return packer.pack(encoded)


def ds_config(gas: int, dp: int, clipping: float = 0.0, **extra) -> dict:
    """DeepSpeed's config for the test workers: fp32, no ZeRO, micro-batches of 2."""
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": gas,
        "train_batch_size": 2 * gas * dp,
        "gradient_clipping": clipping,
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": 0},
        # DeepSpeed caches the partition metadata of the first micro-batch: wrong once shapes change
        "pipeline": {"pipe_partitioned": False, "grad_partitioned": False},
        **extra,
    }


def worker_parser() -> argparse.ArgumentParser:
    """The arguments every test worker takes: the HF checkpoint and the (tp, pp, dp) layout."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    for dim in ("tp", "pp", "dp"):
        ap.add_argument(f"--{dim}", type=int, default=1)
    ap.add_argument("--sequence-parallel", action="store_true")
    ap.add_argument("--ep", type=int, default=None, help="expert-parallel size inside TP (MoE models; default tp)")
    return ap


def load_pipeline(args: argparse.Namespace, backend: str = "gloo",
                  **kwargs) -> tuple[ParallelState, Gemma4Config, Gemma4Pipeline]:
    """Join the process group and build this rank's part of the (args.tp, args.pp, args.dp) pipeline
    from the HF checkpoint args.ckpt, eager attention; `kwargs` go to Gemma4Pipeline."""
    skip_deepspeed_shm_comm()  # as runner.train.init_distributed: no C++ build on CPU
    deepspeed.init_distributed(dist_backend=backend)
    ps = build_parallel_state(ParallelDims(args.tp, args.pp, args.dp, args.sequence_parallel, args.ep))
    config = AutoConfig.from_pretrained(args.ckpt)
    config.text_config._attn_implementation = "eager"
    model = Gemma4Pipeline(config, ps, **kwargs)
    load_hf_weights(model, args.ckpt)
    return ps, config, model


def train_step(engine, model: Gemma4Pipeline, ps: ParallelState, micro: list[dict[str, torch.Tensor]],
               gas: int, step: int = 0, dp_counts: list[int] | None = None, balance_coef: float = 0.0) -> float:
    """Optimizer step `step` on this DP rank's `gas` micro-batches of the global batch `micro` (or, with
    `dp_counts`, on its share of them: micro-batches per DP rank, in rank order), the loss weighted by the
    label tokens of the whole global batch (LoRA dropout seeded as `runner train` seeds it), an MoE model's
    load-balancing loss weighted by `balance_coef`; returns the loss."""
    counts = dp_counts or [gas] * ps.dims.dp
    assert sum(counts) == len(micro) and len(counts) == ps.dims.dp, (counts, len(micro))
    start, gas = sum(counts[:ps.dp_rank]), counts[ps.dp_rank]
    mine = micro[start:start + gas]
    seed_dropout(model, 0, step, ps.dp_rank, ps.pp_rank)
    set_micro_batches(engine, gas)
    model.token_loss.set_label_count(step_counts(mine, ps)[0], gas)  # the count `runner train` uses
    set_balance_scale(model, balance_coef, ps.dims.dp, len(micro))
    return float(engine.train_batch(iter([to_pipe_batch(m) for m in mine])))


def apply_peft_adapter(model: Gemma4Pipeline, ckpt: str, adapter: str, dropout: float = 0.0) -> int:
    """The runner's LoRA on the frozen base `ckpt`, started from the PEFT adapter directory `adapter` with its
    settings as `lora.init_from` takes them (r, lora_alpha, targets, vision tower), and `lora.dropout`; returns
    the number of adapted linears."""
    cfg = adopt_adapter_config(LoraConfig(enabled=True, init_from=adapter, dropout=dropout), {"dropout"}, adapter)
    return apply_lora(model, cfg, seed=0, base=base_identity(ckpt, ckpt))
