"""One results record per benchmark run: its shape, a check of it, and the JSONL file that holds them.

A record names the run (date, card, GPU count, commit, command), what ran (system, model, depth,
workload, layout, recipe overrides) and what it gave (tok/s per GPU, MFU, peak and planned GiB, the
baseline it is compared with and the ratio). `details` holds the run's secondary figures; `notes` a
short factual remark. `benchmarks/results/records.jsonl` holds every record, one JSON object a line.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

RECORDS = Path(__file__).resolve().parent / "results" / "records.jsonl"
# this runner; transformers' model under DeepSpeed ZeRO-3, or (LoRA on one GPU) PEFT's in a plain loop (zero3_baseline.py)
SYSTEMS = ("runner", "zero3", "peft")
FIELDS = ("date", "card", "gpu_count", "commit", "command", "system", "model", "depth", "workload", "layout",
          "overrides", "tokens_per_sec_per_gpu", "mfu", "peak_gib", "plan_gib", "baseline", "ratio")
OPTIONAL = ("notes", "details")
DETAILS = {  # the secondary figures a run may carry, and their types
    "step_time_s": float, "data_time_s": float, "first_step_s": float, "model_tflops_per_gpu": float,
    "micro_batch": int, "micro_batches_per_step": int, "bubble_share": float, "tokens_per_step": int,
    "timed_steps": str, "per_step_tokens_per_sec_per_gpu": list, "step1": dict, "plan_total_gib": float,
    "rc": int, "steps_timed": int,
    # MoE: whose expert kernel ran (the runner's: grouped_mm or loop; the baseline's: transformers'
    # experts_implementation), and what the MFU counts ("active parameters": router, top-k experts, dense MLP,
    # attention and head per token; absent: every parameter, as for dense models)
    "experts_implementation": str, "mfu_basis": str,
    "trainable_params": int,  # the baseline's trained parameters (the runner's: `runner plan`)
}
NUMBER_OR_NONE = ("tokens_per_sec_per_gpu", "mfu", "peak_gib", "plan_gib", "ratio")


def ratio(tokens_per_sec_per_gpu: float | None, baseline: dict | None) -> float | None:
    """Tok/s per GPU over the baseline's, to two decimals; None where either is missing."""
    base = (baseline or {}).get("tokens_per_sec_per_gpu")
    return round(tokens_per_sec_per_gpu / base, 2) if tokens_per_sec_per_gpu and base else None


def make_record(*, date: str, card: str, gpu_count: int, commit: str, command: str, system: str, model: str,
                depth: int, workload: str, tp: int, pp: int, dp: int, overrides: dict[str, str],
                tokens_per_sec_per_gpu: float | None, mfu: float | None, peak_gib: float | None,
                plan_gib: float | None, baseline: dict | None = None, notes: str = "",
                details: dict | None = None) -> dict[str, Any]:
    """A record in the one shape; sequence parallelism is read from the overrides, the ratio computed."""
    sp = str(overrides.get("parallel.sequence_parallel", "false")).lower() == "true"
    record = {
        "date": date, "card": card, "gpu_count": gpu_count, "commit": commit, "command": command, "system": system,
        "model": model, "depth": depth, "workload": workload, "layout": {"tp": tp, "pp": pp, "dp": dp, "sp": sp},
        "overrides": {k: str(v) for k, v in overrides.items()},
        "tokens_per_sec_per_gpu": tokens_per_sec_per_gpu, "mfu": mfu, "peak_gib": peak_gib, "plan_gib": plan_gib,
        "baseline": baseline, "ratio": ratio(tokens_per_sec_per_gpu, baseline),
    }
    if notes:
        record["notes"] = notes
    if details := {k: v for k, v in (details or {}).items() if v is not None}:
        record["details"] = details
    return record


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shape_problems(record: dict, fields: tuple[str, ...], optional: tuple[str, ...]) -> list[str]:
    """Missing and unknown keys; with none, a malformed date or commit."""
    found = [f"missing {k}" for k in fields if k not in record]
    found += [f"unknown key {k}" for k in record if k not in fields + optional]
    if found:
        return found
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(record["date"])):
        found.append(f"date {record['date']!r} is not YYYY-MM-DD")
    if not re.fullmatch(r"[0-9a-f]{7,40}", str(record["commit"])):
        found.append(f"commit {record['commit']!r} is not a commit id")
    return found


def problems(record: dict) -> list[str]:
    """What is wrong with `record` against the shape (empty when nothing is)."""
    found = _shape_problems(record, FIELDS, OPTIONAL)
    if found and found[0].startswith(("missing", "unknown")):
        return found
    for key in ("card", "command", "model", "workload"):
        if not isinstance(record[key], str) or not record[key]:
            found.append(f"{key} must be a non-empty string")
    if record["system"] not in SYSTEMS:
        found.append(f"system {record['system']!r} is not one of {SYSTEMS}")
    for key in ("gpu_count", "depth"):
        if not isinstance(record[key], int) or record[key] < 1:
            found.append(f"{key} must be a positive integer")
    layout = record["layout"]
    if not isinstance(layout, dict) or set(layout) != {"tp", "pp", "dp", "sp"} or not isinstance(layout["sp"], bool):
        found.append("layout must be {tp, pp, dp, sp}")
    elif layout["tp"] * layout["pp"] * layout["dp"] != record["gpu_count"]:
        found.append("layout tp*pp*dp must equal gpu_count")
    if not isinstance(record["overrides"], dict) or not all(isinstance(v, str) for v in record["overrides"].values()):
        found.append("overrides must map keys to strings")
    found += [f"{k} must be a number or null" for k in NUMBER_OR_NONE
              if record[k] is not None and not _number(record[k])]
    base = record["baseline"]
    if base is not None and (not isinstance(base, dict) or set(base) - {"name", "tokens_per_sec_per_gpu", "peak_gib"}
                             or not isinstance(base.get("name"), str) or not _number(base.get("tokens_per_sec_per_gpu"))):
        found.append("baseline must be null or {name, tokens_per_sec_per_gpu[, peak_gib]}")
    if "notes" in record and (not isinstance(record["notes"], str) or not record["notes"]):
        found.append("notes must be a non-empty string when present")
    for key, value in record.get("details", {}).items():
        kind = DETAILS.get(key)
        if kind is None:
            found.append(f"unknown details key {key}")
        elif not (isinstance(value, kind) or (kind is float and _number(value))):
            found.append(f"details.{key} must be {kind.__name__}")
    return found


def load(path: Path = RECORDS) -> list[dict]:
    """Every record of a JSONL file, in file order."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def dumps(records: list[dict]) -> str:
    """JSONL text: one record a line, keys in the shape's order."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


KERNELS = RECORDS.with_name("kernels.jsonl")  # one-GPU kernel timings (attention_bench.py, norm_bench.py)
KERNEL_FIELDS = ("date", "card", "gpu_count", "commit", "command", "bench", "case", "variant", "fwd_ms", "bwd_ms")
KERNEL_OPTIONAL = ("fwd_tflops", "bwd_tflops", "peak_extra_gib", "first_call_s", "max_rel_err", "notes")


def kernel_problems(record: dict) -> list[str]:
    """What is wrong with a kernel timing record (empty when nothing is)."""
    found = _shape_problems(record, KERNEL_FIELDS, KERNEL_OPTIONAL)
    if found and found[0].startswith(("missing", "unknown")):
        return found
    if record["bench"] not in ("attention", "rms_norm"):
        found.append(f"bench {record['bench']!r} is not attention or rms_norm")
    timed = [k for k in ("fwd_ms", "bwd_ms", "fwd_tflops", "bwd_tflops", "peak_extra_gib", "first_call_s")
             if record.get(k) is not None]
    found += [f"{k} must be a number" for k in timed if not _number(record[k])]
    if record["fwd_ms"] is None and "notes" not in record:
        found.append("a record without timings needs notes saying why")
    return found
