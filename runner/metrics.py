"""What a step reports: loss, grad norm, lr, memory, throughput, MFU — to the console, a progress
bar, `OUTPUT_DIR/metrics.jsonl` and TensorBoard. Only the first rank writes."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

# Dense bf16 tensor-core peak per GPU, FLOP/s (no sparsity); MFU is reported against it.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops_per_device() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def forward_flops_per_token(text_config, seq_len: int) -> tuple[list[float], float]:
    """Forward FLOPs of one token: (each decoder layer's, the LM head's); text model only.

    Matmuls: 2 FLOPs per weight per token (decoder linears and the LM head). Attention: QKᵀ and AV
    cost 2·2·heads·head_dim per attended key; a causal token attends to (seq+1)/2 keys on average,
    a sliding one to at most the window; an MoE layer's experts only the top-k a token is routed to. The
    vision tower and E2B/E4B's per-layer-input projection (first stage) are not counted.
    """
    from runner.compat import kv_sharing_modes
    from runner.models.gemma4.pipeline import attention_shapes

    hidden = text_config.hidden_size
    shapes = attention_shapes(text_config)
    layers = []
    for layer_type, mode in zip(text_config.layer_types, kv_sharing_modes(text_config)):
        q_heads, kv_heads, head_dim = shapes[layer_type]
        kv_proj = 1 if (layer_type == "full_attention" and text_config.attention_k_eq_v) else 2
        shared = mode == "reuse"  # KV-shared (E2B/E4B): no k/v projections, E2B's MLP double-wide
        mlp = text_config.intermediate_size * (2 if shared and getattr(text_config, "use_double_wide_mlp", False) else 1)
        weights = (hidden * head_dim * (2 * q_heads + (0 if shared else kv_proj * kv_heads)) + 3 * hidden * mlp
                   + 2 * hidden * (text_config.hidden_size_per_layer_input or 0))  # the per-layer gate and projection
        if getattr(text_config, "enable_moe_block", False):  # router + the top-k experts a token runs
            weights += hidden * text_config.num_experts + text_config.top_k_experts * 3 * hidden * \
                text_config.moe_intermediate_size
        keys = (seq_len + 1) / 2
        if layer_type == "sliding_attention":
            keys = min(keys, text_config.sliding_window)
        layers.append(2 * weights + 4 * q_heads * head_dim * keys)
    return layers, 2 * text_config.vocab_size * hidden


def train_flops_per_token(text_config, seq_len: int) -> float:
    """Model FLOPs of one trained token: forward + backward = 3 × forward (what MFU counts)."""
    layers, head = forward_flops_per_token(text_config, seq_len)
    return 3 * (sum(layers) + head)


def mem_gib() -> float:
    """Peak allocated accelerator memory on this rank (GiB), or the process's max RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def cut_back(path: Path, step: int) -> None:
    """Keep only the records (train and eval) up to `step` in a JSONL file: a run resumed from step k
    after a hard kill appends steps k+1… again, and each step must appear once. A torn last line goes
    too. Atomic: a kill during the cut leaves the old file."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError, TypeError, KeyError):
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


class MetricsLogger:
    """Writes one JSON object per step to metrics.jsonl and TensorBoard, prints a log line and
    keeps a progress bar on the first rank; a no-op elsewhere. `start_step`: the step the run
    resumed from (0 for a fresh one); what an earlier run logged after it is dropped first."""

    def __init__(self, out_dir: Path, total_steps: int, enabled: bool, tensorboard: bool, progress_bar: bool,
                 start_step: int = 0) -> None:
        self.enabled = enabled
        self.total = total_steps
        self.jsonl = None
        self.tb = None
        self.bar = progress_bar and sys.stderr.isatty()
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        cut_back(out_dir / "metrics.jsonl", start_step)
        self.jsonl = open(out_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1)
            except ImportError:  # tensorboard is optional
                print("tensorboard not installed: metrics go to metrics.jsonl only", file=sys.stderr)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        step = record["step"]
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(f"{record.get('split', 'train')}/{key}", value, step)
        if self.bar:
            done = step / max(self.total, 1)
            sys.stderr.write(f"\r[{'#' * int(30 * done):<30}] {step}/{self.total}  ")
        print(format_line(record), flush=True)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def format_line(r: dict[str, Any]) -> str:
    """A one-line summary of a step (or an eval) for the console log."""
    if r.get("split") == "eval":
        return f"eval step {r['step']}: loss {r['loss']:.4f} over {r['label_tokens']} label tokens"
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
    return (
        f"step {r['step']}/{r['total_steps']} epoch {r['epoch']} | loss {r['loss']:.4f} | grad_norm "
        f"{r['grad_norm']:.4f} | lr {r['lr']:.3g} | mem {r['mem_gib']:.2f} GiB | {r['tokens_per_sec']:.0f} tok/s "
        f"({r['tokens_per_sec_per_gpu']:.0f}/gpu) | fill {r.get('fill', 1.0):.2f} | MFU {mfu} | label tokens {r['label_tokens']} | {r['step_time']:.2f}s"
    )
