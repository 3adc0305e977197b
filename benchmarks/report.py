"""Results tables generated from the records, written between markers in README.md and benchmarks/RESULTS.md.

    python -m benchmarks.report --write   # regenerate every marked table in place
    python -m benchmarks.report --check   # exit 1 if a marked table differs from the records

A table sits between `<!-- results:NAME -->` and `<!-- /results:NAME -->`; NAME is one of
`summary` (the fastest run of each model, card, depth and workload; the depth cell names the member
when it is not the 31B), `runs` (every run, with its command)
and `kernels` (one-GPU kernel timings).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from benchmarks.records import KERNELS, RECORDS, load

ROOT = Path(__file__).resolve().parents[1]
DOCS = (ROOT / "README.md", ROOT / "benchmarks" / "RESULTS.md")
MARKER = re.compile(r"(<!-- results:(\w+) -->\n).*?(<!-- /results:\2 -->)", re.S)


def _card(r: dict) -> str:
    return f"{r['gpu_count']}× {r['card'].removeprefix('NVIDIA ').split(' 80GB')[0]}"


def _layout(r: dict) -> str:
    lay = r["layout"]
    if r["system"] == "zero3":
        return f"ZeRO-3, DP{lay['dp']}"
    if r["system"] == "peft":
        return "PEFT, plain PyTorch"
    text = f"TP{lay['tp']} × PP{lay['pp']}" + (f" × DP{lay['dp']}" if lay["dp"] > 1 else "")
    return text + (", SP" if lay["sp"] else "")


def _overrides(r: dict) -> str:
    shown = {k: v for k, v in r["overrides"].items() if k != "parallel.sequence_parallel"}
    return "; ".join(f"`{k.split('.')[-1]}={v}`" for k, v in shown.items()) or "–"


def _num(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


_MEMBERS = {"gemma4_26b_a4b_config": "26B-A4B", "gemma4_e2b_config": "E2B", "gemma4_e4b_config": "E4B"}


def _member(r: dict) -> str:
    """The family member a record ran ("" for the 31B, whose depth column needs no name)."""
    return next((label for preset, label in _MEMBERS.items() if r["model"].startswith(preset)), "")


def _depth(r: dict) -> str:
    member = _member(r)
    return f"{member}, {r['depth']}" if member else str(r["depth"])


def _mfu(r: dict) -> str:
    """MFU; on active parameters for mixture-of-experts runs (details.mfu_basis)."""
    active = r.get("details", {}).get("mfu_basis") == "active parameters"
    return _num(r["mfu"], ".1%") + (" (active)" if active and r["mfu"] is not None else "")


def _peak(r: dict) -> str:
    if r["peak_gib"] is None:
        return "–"
    return f"{r['peak_gib']:.1f}" + (f" ({r['plan_gib']:.1f})" if r["plan_gib"] is not None else "")


def _baseline(r: dict) -> str:
    """The baseline's tok/s/GPU; named unless it is ZeRO-3."""
    base = r["baseline"]
    if base is None:
        return "–"
    return f"{base['tokens_per_sec_per_gpu']:.0f}" + (" (PEFT)" if base["name"].startswith("transformers + PEFT") else "")


def _workload(r: dict) -> str:
    rank = r["overrides"].get("lora.rank") if r["overrides"].get("lora.enabled") == "true" else None
    return r["workload"] + (f", LoRA r{rank}" if rank else "")


def summary_table(records: list[dict]) -> str:
    """The fastest run of this runner per card, GPU count, depth and workload, newest first within a depth."""
    best: dict[tuple, dict] = {}
    for r in records:
        key = (r["depth"], r["card"], r["gpu_count"], _workload(r), _member(r))
        if r["system"] == "runner" and r["tokens_per_sec_per_gpu"] and (
                key not in best or r["tokens_per_sec_per_gpu"] > best[key]["tokens_per_sec_per_gpu"]):
            best[key] = r
    lines = ["| depth | card | workload | layout | overrides | tok/s/GPU | MFU | peak GiB (plan) "
             "| baseline tok/s/GPU | ratio | date, commit |", "|" + "---|" * 11]
    for key in sorted(best, key=lambda k: (k[4], -k[0], k[1], -k[2], k[3])):
        r = best[key]
        lines.append(f"| {_depth(r)} | {_card(r)} | {_workload(r)} | {_layout(r)} | {_overrides(r)} "
                     f"| {r['tokens_per_sec_per_gpu']:.0f} | {_mfu(r)} | {_peak(r)} | {_baseline(r)} "
                     f"| {_num(r['ratio'], '.2f')} | {r['date']}, {r['commit']} |")
    return "\n".join(lines) + "\n"


def runs_table(records: list[dict]) -> str:
    """Every record in file order, commands numbered once below the table."""
    commands: dict[str, int] = {}
    lines = ["| date | card | commit | depth | workload | layout | overrides | tok/s/GPU | MFU | peak GiB (plan) "
             "| baseline tok/s/GPU | ratio | cmd | notes |", "|" + "---|" * 14]
    for r in records:
        number = commands.setdefault(r["command"], len(commands) + 1)
        lines.append(f"| {r['date']} | {_card(r)} | {r['commit']} | {_depth(r)} | {_workload(r)} | {_layout(r)} "
                     f"| {_overrides(r)} | {_num(r['tokens_per_sec_per_gpu'], '.0f')} | {_mfu(r)} "
                     f"| {_peak(r)} | {_baseline(r)} | {_num(r['ratio'], '.2f')} | {number} "
                     f"| {r.get('notes', '').replace('|', '/')} |")
    lines += ["", "Commands (`cmd` above):", ""]
    lines += [f"{number}. `{command}`" for command, number in commands.items()]
    return "\n".join(lines) + "\n"


def kernels_table(kernels: list[dict]) -> str:
    """Kernel timings: one row per case and variant."""
    lines = ["| date, commit | bench | case | variant | fwd ms | bwd ms | fwd / bwd TFLOP/s | extra GiB | notes |",
             "|" + "---|" * 9]
    for k in kernels:
        tflops = "–" if k.get("fwd_tflops") is None else f"{k['fwd_tflops']:.1f} / {k['bwd_tflops']:.1f}"
        lines.append(f"| {k['date']}, {k['commit']} | {k['bench']} | {k['case']} | {k['variant']} "
                     f"| {_num(k['fwd_ms'], '.3f')} | {_num(k['bwd_ms'], '.3f')} | {tflops} "
                     f"| {_num(k.get('peak_extra_gib'), '.2f')} | {k.get('notes', '').replace('|', '/')} |")
    commands = dict.fromkeys(f"`{k['command']}` ({k['card']}, {k['commit']})" for k in kernels)
    return "\n".join(lines + ["", "Commands: " + "; ".join(commands)]) + "\n"


def tables(records: list[dict], kernels: list[dict]) -> dict[str, str]:
    """Every generated table by marker name."""
    return {"summary": summary_table(records), "runs": runs_table(records), "kernels": kernels_table(kernels)}


def fill(text: str, generated: dict[str, str]) -> str:
    """`text` with every marked table replaced by its generated content."""
    return MARKER.sub(lambda m: m.group(1) + generated[m.group(2)] + m.group(3), text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="regenerate the marked tables in place")
    mode.add_argument("--check", action="store_true", help="exit 1 if a marked table is out of date")
    args = ap.parse_args()
    generated = tables(load(RECORDS), load(KERNELS))
    stale = []
    for doc in DOCS:
        text = doc.read_text()
        new = fill(text, generated)
        if new != text:
            stale.append(doc.relative_to(ROOT))
            if args.write:
                doc.write_text(new)
    if stale:
        print(("rewrote " if args.write else "out of date (python -m benchmarks.report --write): ")
              + ", ".join(map(str, stale)))
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
