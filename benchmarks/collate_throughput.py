"""Collate throughput on one CPU core and padding waste of each sequence-shape policy.

    OMP_NUM_THREADS=1 python -m benchmarks.collate_throughput --out runs/collate_throughput.json

Builds the tiny Gemma4 checkpoint and the synthetic MedPix-shaped set in a temporary folder, then
1. times read → encode (chat template, processor, labels) → collate over every sample, one thread;
2. measures padding waste (pad tokens / all tokens of the padded micro-batches) for static padding
   to max_length, a few length buckets, and dynamic per-micro-batch padding, each with and without
   the sampler's length grouping.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoProcessor

from runner.data.collate import Gemma4Collator
from runner.data.sampler import StepSampler
from runner.data.sources import load_source
from runner.data.synthetic import make_data
from runner.models.gemma4.tiny import make_tiny


def padding_waste(lengths: list[int], batches: list[list[int]], collator: Gemma4Collator) -> float:
    """Fraction of the padded micro-batch tokens that are padding."""
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(collator.padded_length(max(lengths[i] for i in b)) * len(b) for b in batches)
    return 1 - real / padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256, help="synthetic samples")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("runs/collate_throughput.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        processor = AutoProcessor.from_pretrained(str(make_tiny(Path(tmp) / "tiny")))
        source = load_source(str(make_data(Path(tmp) / "data", n=args.n, seed=0)), "train")
        collator = Gemma4Collator(processor, max_length=args.max_length)
        mbs = args.micro_batch_size

        start = time.perf_counter()
        encoded = [collator.encode(source[i]) for i in range(len(source))]
        encode_s = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(0, len(encoded), mbs):
            collator.collate(encoded[i : i + mbs])
        collate_s = time.perf_counter() - start

        lengths = [len(e) for e in encoded]
        m = args.max_length
        policies = {
            "static max_length": [m],
            "4 buckets": [m // 4, m // 2, 3 * m // 4, m],
            "dynamic (multiple of 8)": None,
        }
        plain = StepSampler(len(lengths), mbs, 1).epoch(0)
        grouped = StepSampler(len(lengths), mbs, 1, lengths=collator.estimate_lengths([source.text_and_images(i) for i in range(len(source))])).epoch(0)
        waste = {
            name: {
                "shuffled": round(padding_waste(lengths, plain, Gemma4Collator(processor, max_length=m, buckets=buckets)), 4),
                "length-grouped": round(padding_waste(lengths, grouped, Gemma4Collator(processor, max_length=m, buckets=buckets)), 4),
            }
            for name, buckets in policies.items()
        }

    result = {
        "samples": len(encoded),
        "threads": torch.get_num_threads(),
        "micro_batch_size": mbs,
        "max_length": args.max_length,
        "images_per_sample": 1,
        "soft_tokens_per_image_max": processor.image_processor.max_soft_tokens,
        "sequence_length": {"min": min(lengths), "mean": round(sum(lengths) / len(lengths), 1), "max": max(lengths)},
        "encode_samples_per_s": round(len(encoded) / encode_s, 1),
        "collate_samples_per_s": round(len(encoded) / collate_s, 1),
        "end_to_end_samples_per_s": round(len(encoded) / (encode_s + collate_s), 1),
        "padding_waste": waste,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
