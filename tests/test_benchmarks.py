"""The GPU benchmark's own behaviour (process handling, source trees, result records), checked on CPU."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from benchmarks.gpu_bench import run

# a stand-in for torchrun: a parent that starts its worker in a session of its own, as torchrun does
LAUNCHER = """
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
print(worker.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has let go of everything; only its parent's wait is missing


def test_timed_out_run_leaves_no_worker_behind(tmp_path):
    log = tmp_path / "log.txt"
    t0 = time.time()
    rc = run([sys.executable, "-c", LAUNCHER], log, timeout=3, tails=tmp_path / "tails.txt")
    assert rc == 124 and time.time() - t0 < 30
    worker = int(log.read_text().split()[0])
    for _ in range(50):  # SIGKILL is delivered asynchronously
        if not _alive(worker):
            break
        time.sleep(0.1)
    else:
        os.kill(worker, 9)
        raise AssertionError("the launcher's worker outlived the timed-out run")
    assert "FAILED rc=124" in (tmp_path / "tails.txt").read_text()


def test_finished_run_reports_its_exit_code(tmp_path):
    rc = run([sys.executable, "-c", "import sys; print('done'); sys.exit(3)"], tmp_path / "log.txt", timeout=30,
             tails=tmp_path / "tails.txt")
    assert rc == 3 and "done" in (tmp_path / "log.txt").read_text()


def test_run_imports_runner_from_the_given_source_tree(tmp_path):
    """A layout's `code=DIR` (the before of a before/after pair) must run DIR's `runner`, not this
    checkout's, even where PYTHONPATH already names this checkout."""
    old = tmp_path / "old"
    (old / "runner").mkdir(parents=True)
    (old / "runner" / "__init__.py").write_text("")
    log = tmp_path / "log.txt"
    rc = run([sys.executable, "-c", "import runner; print(runner.__file__)"], log, timeout=60,
             tails=tmp_path / "tails.txt", code=old)
    assert rc == 0 and log.read_text().strip() == str(old / "runner" / "__init__.py")


def test_bench_results_become_records():
    """gpu_bench's runs and ZeRO-3 baselines come out in the one record shape, with the ratio to the baseline."""
    from benchmarks.gpu_bench import to_records
    from benchmarks.records import problems

    entry = {"workload": "text", "tp": 2, "pp": 2, "dp": 1, "overrides": {"parallel.sequence_parallel": "true"},
             "rc": 0, "code": "/tmp/old", "micro_batch": 1, "micro_batches_per_step": 16, "bubble_share": 0.059,
             "plan_gib": 118.6, "tokens_per_sec_per_gpu": 1378.5, "step_time": 11.66, "data_time": 0.02,
             "mfu": 0.27, "model_tflops_per_gpu": 266.6, "mem_gib": 117.61, "steps_timed": 3,
             "step1": {"loss": 13.7852, "grad_norm": 23290280.0}}
    results = {"date": "2026-11-27", "device": "NVIDIA H200", "gpus": 4, "depth": 60, "model": "m", "runs": [entry],
               "baseline": {"text": {"tokens_per_sec_per_gpu": 807.4, "step_time": 39.66, "mem_gib": 129.83,
                                     "steps_timed": 3, "dp": 4, "micro_batch": 1, "micro_batches_per_step": 8,
                                     "rc": 0}}}
    run, zero3 = to_records(results, "python -m benchmarks.gpu_bench --depth 60", "4306942")
    assert problems(run) == [] and problems(zero3) == []
    assert run["layout"] == {"tp": 2, "pp": 2, "dp": 1, "sp": True} and run["ratio"] == 1.71
    assert run["baseline"] == {"name": "ZeRO-3, same command", "tokens_per_sec_per_gpu": 807.4, "peak_gib": 129.83}
    assert run["notes"] == "runner from /tmp/old" and run["details"]["step_time_s"] == 11.66
    assert zero3["system"] == "zero3" and zero3["layout"]["dp"] == 4 and zero3["baseline"] is None
    assert zero3["mfu"] == pytest.approx(0.27 * 807.4 / 1378.5) and "mfu_basis" not in run["details"]  # the runner's FLOPs per token
    moe_run, moe_zero3 = to_records({**results, "moe": True}, "python -m benchmarks.gpu_bench --model 26b-a4b", "4306942")
    assert moe_run["details"]["mfu_basis"] == moe_zero3["details"]["mfu_basis"] == "active parameters"
    # a second baseline (`--baseline-attn sdpa,flex_attention`): its own record, its attention as overrides; the
    # runner's ratio stays to the first
    flex = {**results["baseline"]["text"], "tokens_per_sec_per_gpu": 1000.0, "workload": "text",
            "attn_implementation": "flex_attention", "pad_to_multiple_of": 4224}
    run2, sdpa2, flex2 = to_records({**results, "baseline": {**results["baseline"], "text:flex_attention": flex}},
                                    "python -m benchmarks.gpu_bench --baseline-attn sdpa,flex_attention", "4306942")
    assert run2["ratio"] == 1.71 and sdpa2["overrides"] == {} and problems(flex2) == []
    assert flex2["workload"] == "text" and flex2["tokens_per_sec_per_gpu"] == 1000.0
    assert flex2["overrides"] == {"model.attn_implementation": "flex_attention", "data.pad_to_multiple_of": "4224"}


@pytest.mark.parametrize("procs,baseline", [(1, "peft"), (2, "zero3")])
def test_tiny_lora_benchmark_runs_the_runner_and_the_peft_baseline(tmp_path, procs, baseline):
    """`gpu_bench --lora` end to end on CPU: the runner's LoRA run and transformers + PEFT LoRA — in a plain
    PyTorch loop on one device, under ZeRO-3 (zero3_baseline.py through DeepSpeed's accelerator) on more —
    both time their steps and become records."""
    import json
    import subprocess

    env = {**os.environ, "BENCH_WORK": str(tmp_path / "work"), "DS_ACCELERATOR": "cpu", "BENCH_CPU_PROCS": str(procs)}
    cmd = [sys.executable, "-m", "benchmarks.gpu_bench", "--tiny", "--out", str(tmp_path / "out"), "--layouts", "1x1",
           "--workloads", "medpix", "--steps", "2", "--warmup", "1", "--gas", "2", "--samples", "32", "--lora", "4"]
    done = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    by_system = {r["system"]: r for r in records}
    assert set(by_system) == {"runner", baseline}, records
    runner, base = by_system["runner"], by_system[baseline]
    assert runner["tokens_per_sec_per_gpu"] > 0 and base["tokens_per_sec_per_gpu"] > 0
    assert runner["overrides"]["lora.rank"] == "4" and runner["baseline"]["tokens_per_sec_per_gpu"] > 0
    assert runner["baseline"]["name"].startswith("transformers + PEFT" if baseline == "peft" else "ZeRO-3")


def _tiny_bench(tmp_path: Path, procs: int, *args: str) -> dict[str, dict]:
    """Run `gpu_bench --tiny` on CPU with `procs` processes; its records by system, checked against the shape."""
    import json
    import subprocess

    from benchmarks.records import problems

    env = {**os.environ, "BENCH_WORK": str(tmp_path / "work"), "DS_ACCELERATOR": "cpu", "BENCH_CPU_PROCS": str(procs)}
    cmd = [sys.executable, "-m", "benchmarks.gpu_bench", "--tiny", "--out", str(tmp_path / "out"), "--workloads",
           "medpix", "--steps", "2", "--warmup", "1", "--gas", "2", "--samples", "8", *args]
    done = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    assert [problems(r) for r in records] == [[]] * len(records)
    by_system = {r["system"]: r for r in records}
    assert set(by_system) == {"runner", "zero3"}, (records, (tmp_path / "out" / "logs.txt").read_text()[-3000:])
    runner, zero3 = by_system["runner"], by_system["zero3"]
    assert runner["tokens_per_sec_per_gpu"] > 0 and zero3["tokens_per_sec_per_gpu"] > 0
    assert runner["peak_gib"] > 0 and runner["plan_gib"] > 0 and zero3["peak_gib"] > 0
    assert runner["baseline"]["tokens_per_sec_per_gpu"] == zero3["tokens_per_sec_per_gpu"] and runner["ratio"] > 0
    return by_system


def test_tiny_moe_benchmark_runs_the_runner_at_ep2_and_the_zero3_baseline(tmp_path):
    """`gpu_bench --model 26b-a4b` end to end on CPU: the tiny 26B-A4B under the runner at TP2 with the experts
    split ep 2 ways (a layout override), and transformers' model under ZeRO-3 with its experts forward
    named in the record."""
    by_system = _tiny_bench(tmp_path, 2, "--model", "26b-a4b", "--layouts", "2x1:parallel.ep=2")
    runner, zero3 = by_system["runner"], by_system["zero3"]
    assert "26B-A4B" in runner["model"] and runner["layout"] == {"tp": 2, "pp": 1, "dp": 1, "sp": False}
    assert runner["overrides"] == {"parallel.ep": "2"} and runner["details"]["experts_implementation"] == "loop"
    assert zero3["details"]["experts_implementation"] == "grouped_mm" and zero3["layout"]["dp"] == 2
    assert zero3["details"]["trainable_params"] > 0


def test_tiny_e2b_benchmark_runs_the_runner_and_the_zero3_baseline(tmp_path):
    """`gpu_bench --model e2b` on CPU: per-layer inputs and KV-shared layers under the runner; the baseline
    loads transformers' E2B (its audio tower refuses sdpa, so it gets eager) and trains what the runner trains."""
    by_system = _tiny_bench(tmp_path, 1, "--model", "e2b")
    assert "E2B" in by_system["runner"]["model"] and by_system["runner"]["layout"]["tp"] == 1
    assert "experts_implementation" not in by_system["zero3"].get("details", {})


def test_moe_mfu_counts_active_parameters():
    """MFU's FLOPs per token for 26B-A4B are those of its ~3.8B active parameters (router, top-8 of 128 experts,
    dense MLP, attention, head), not of its 25.8B: 2 FLOPs per active weight, attention aside (one key)."""
    from runner.metrics import forward_flops_per_token
    from runner.models.gemma4.presets import gemma4_26b_a4b_config

    layers, head = forward_flops_per_token(gemma4_26b_a4b_config().text_config, seq_len=1)
    assert 3.7e9 < (sum(layers) + head) / 2 < 3.9e9
