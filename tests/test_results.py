"""The results records (benchmarks/results/*.jsonl) and the tables README.md and RESULTS.md hold."""

from __future__ import annotations

import pytest

from benchmarks.records import KERNELS, RECORDS, kernel_problems, load, make_record, problems
from benchmarks.report import DOCS, MARKER, fill, tables

RUNS = load(RECORDS)


def test_every_record_has_the_shape():
    assert RUNS
    bad = {i: problems(r) for i, r in enumerate(RUNS, 1) if problems(r)}
    assert not bad, f"records.jsonl lines with problems: {bad}"


def test_every_kernel_record_has_the_shape():
    bad = {i: kernel_problems(k) for i, k in enumerate(load(KERNELS), 1) if kernel_problems(k)}
    assert not bad, f"kernels.jsonl lines with problems: {bad}"


@pytest.mark.parametrize("record", RUNS, ids=lambda r: f"{r['date']}-{r['commit']}-{r['workload']}")
def test_ratio_is_tokens_over_baseline(record):
    base = (record["baseline"] or {}).get("tokens_per_sec_per_gpu")
    if record["tokens_per_sec_per_gpu"] and base:
        assert record["ratio"] == pytest.approx(record["tokens_per_sec_per_gpu"] / base, abs=0.005)
    else:
        assert record["ratio"] is None


def test_baselines_are_recorded_runs():
    """Every baseline figure a run is compared with is itself a baseline record (ZeRO-3, or PEFT's plain loop)
    of the same card and depth."""
    baselines = {(r["card"], r["gpu_count"], r["depth"], r["workload"], r["tokens_per_sec_per_gpu"])
                 for r in RUNS if r["system"] in ("zero3", "peft")}
    for r in RUNS:
        if r["baseline"]:
            key = (r["card"], r["gpu_count"], r["depth"], r["workload"], r["baseline"]["tokens_per_sec_per_gpu"])
            assert key in baselines, f"{r['date']} {r['commit']}: baseline {r['baseline']} has no record"


def test_summary_keeps_lora_runs_apart_and_names_a_peft_baseline():
    """A LoRA run is its own summary row, its baseline marked PEFT; the full fine-tuning row beside it stays."""
    common = dict(date="2026-12-05", card="NVIDIA H200", gpu_count=1, commit="abc1234", command="python -m x",
                  model="m", depth=12, workload="text", tp=1, pp=1, dp=1, mfu=None, peak_gib=None, plan_gib=None)
    full = make_record(system="runner", overrides={}, tokens_per_sec_per_gpu=100.0,
                       baseline={"name": "ZeRO-3, same command", "tokens_per_sec_per_gpu": 50.0}, **common)
    lora = make_record(system="runner", overrides={"lora.enabled": "true", "lora.rank": "16"},
                       tokens_per_sec_per_gpu=300.0,
                       baseline={"name": "transformers + PEFT, plain PyTorch loop, same command",
                                 "tokens_per_sec_per_gpu": 200.0}, **common)
    rows = [line for line in tables([full, lora], [])["summary"].splitlines() if "abc1234" in line]
    assert len(rows) == 2, rows
    assert "| text | " in rows[0] + rows[1] and "| 50 |" in rows[0] + rows[1]
    assert any("| text, LoRA r16 |" in row and "| 200 (PEFT) |" in row and "| 1.50 |" in row for row in rows), rows


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_generated_tables_match_the_docs(doc):
    text = doc.read_text()
    assert MARKER.search(text), f"{doc.name} has no results markers"
    assert fill(text, tables(RUNS, load(KERNELS))) == text, "stale tables: python -m benchmarks.report --write"


def test_make_record_reads_sequence_parallel_and_computes_the_ratio():
    record = make_record(date="2026-11-28", card="NVIDIA H200", gpu_count=4, commit="95cb613", command="python -m x",
                         system="runner", model="m", depth=60, workload="text", tp=4, pp=1, dp=1,
                         overrides={"parallel.sequence_parallel": True}, tokens_per_sec_per_gpu=1067.6, mfu=0.209,
                         peak_gib=116.35, plan_gib=115.7,
                         baseline={"name": "ZeRO-3", "tokens_per_sec_per_gpu": 807.4}, details={"rc": 0, "x": None})
    assert problems(record) == []
    assert record["layout"] == {"tp": 4, "pp": 1, "dp": 1, "sp": True} and record["ratio"] == 1.32
    assert record["details"] == {"rc": 0} and "notes" not in record
    assert problems({**record, "gpu_count": 2}) == ["layout tp*pp*dp must equal gpu_count"]
    assert "unknown key extra" in problems({**record, "extra": 1})
