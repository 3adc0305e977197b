"""benchmarks/longrun.py on CPU: the tiny Gemma4 in fp32, where the runner must follow transformers'
own model step for step, so the record, curves and plot the GPU call writes are checked here first."""

from __future__ import annotations

import json
import sys

from benchmarks.longrun import acceptance, compare, main

from conftest import run

STEPS, EVAL_EVERY = 5, 2


def test_runner_follows_the_reference_and_writes_record_curves_and_plot(tmp_path, tiny_ckpt, capsys):
    out = tmp_path / "out"
    run(["env", f"BENCH_WORK={tmp_path / 'work'}", sys.executable, "-m", "benchmarks.longrun", "--out", str(out),
         "--device", "cpu", "--ckpt", str(tiny_ckpt), "--layouts", "1x1,1x2", "--reference-variants", "eager",
         "--steps", str(STEPS),
         "--eval-every", str(EVAL_EVERY), "--micro", "1", "--global-batch", "2", "--text-tokens", "32",
         "--eval-samples", "3", "--smooth", "2", "--lr", "1e-3", "--warmup", "0"], timeout=600)
    (path,) = out.glob("longrun-*-cpu.json")
    record = json.loads(path.read_text())
    for key in ("date", "card", "gpus", "commit", "command", "model", "settings", "runs", "passed"):
        assert key in record, key
    assert record["gpus"] == 0 and "--layouts 1x1,1x2" in record["command"]
    runs = {r["name"]: r for r in record["runs"]}
    assert set(runs) == {"reference", "reference eager", "tp1pp1 cpu_fp32", "tp1pp2 cpu_fp32"}
    floor = runs["reference eager"]  # transformers' eager attention against its sdpa: fp32, the same function
    assert floor["kind"] == "noise floor" and "passed" not in floor and floor["max_smoothed_rel_deviation"] < 1e-3
    for name in ("tp1pp1 cpu_fp32", "tp1pp2 cpu_fp32"):
        r = runs[name]
        assert r["steps_logged"] == r["steps_compared"] == STEPS, r
        assert r["max_smoothed_rel_deviation"] < 1e-3, r  # fp32 on both sides: the same function
        assert abs(r["final_eval_rel_deviation"]) < 1e-3 and r["final_eval_step"] == 4, r
        assert r["failures"] == [f"compared {STEPS} steps, the target needs all of max(--steps, 300)"], r
        against = r["against_references"]  # beside the noise floor: against each of transformers' runs
        assert set(against) == {"reference", "reference eager"}, against
        assert all(d["max_smoothed_rel_deviation"] < 1e-3 and abs(d["final_eval_rel_deviation"]) < 1e-3
                   for d in against.values()), against
    assert not record["passed"]  # 5 steps are not a long run

    curves = json.loads((out / record["curves"]).read_text())["runs"]
    ref = curves["reference"]
    assert ref["step"] == list(range(1, STEPS + 1)) and ref["eval_step"] == [2, 4]
    assert abs(ref["eval_loss"][1] / ref["eval_loss"][0] - 1) > 1e-2  # it trained: agreement is not two frozen models
    for name in ("tp1pp1 cpu_fp32", "tp1pp2 cpu_fp32"):
        assert len(curves[name]["loss"]) == STEPS and curves[name]["eval_step"] == [2, 4]

    png = out / record["plot"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png.unlink()  # --plot-only redraws it from the curves file alone
    assert main(["--plot-only", str(out / record["curves"])]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = [line.split()[:3] for line in capsys.readouterr().out.splitlines()[1:]]  # and reads every pair back
    assert ["tp1pp2", "cpu_fp32", "reference"] in table and ["reference", "eager", "reference"] in table, table
    assert len(table) == 5, table  # two runner runs x two references, the two references once


def test_bf16_runs_follow_the_reference_with_fp32_master_weights(tmp_path, tiny_ckpt):
    """The GPU call's code paths on CPU: bf16 weights, both GPU DeepSpeed configs, and the reference's
    fp32 master copy and gradient accumulation. bf16 rounding at hidden 64 keeps them ~0.5% apart;
    a reference that dropped its updates would be ~9% off after these steps."""
    out = tmp_path / "out"
    run(["env", f"BENCH_WORK={tmp_path / 'work'}", sys.executable, "-m", "benchmarks.longrun", "--out", str(out),
         "--device", "cpu", "--ckpt", str(tiny_ckpt), "--layouts", "1x1", "--config", "ds_configs/gpu_bf16_zero1.json",
         "--fp32-grads-layouts", "1x1", "--set", "model.dtype=bfloat16", "--steps", "6", "--eval-every", "3",
         "--micro", "1", "--global-batch", "4", "--text-tokens", "32", "--eval-samples", "4", "--smooth", "3",
         "--lr", "1e-3", "--warmup", "0"], timeout=600)
    (path,) = out.glob("longrun-*-cpu.json")
    record = json.loads(path.read_text())
    assert record["settings"]["recipe_overrides"]["model.dtype"] == "bfloat16"
    runs = {r["name"]: r for r in record["runs"]}
    assert set(runs) == {"reference", "tp1pp1 gpu_bf16_zero1", "tp1pp1 gpu_bf16_zero1_fp32_grads"}
    assert runs["reference"]["final_eval_loss"] < 0.97 * runs["reference"]["step1_loss"]  # it trained
    for name in ("tp1pp1 gpu_bf16_zero1", "tp1pp1 gpu_bf16_zero1_fp32_grads"):
        r = runs[name]
        assert r["steps_compared"] == 6 and r["max_smoothed_rel_deviation"] < 0.02, r
        assert abs(r["final_eval_rel_deviation"]) < 0.02, r


def _curve(losses: list[float], evals: dict[int, float]) -> dict:
    return {"loss": losses, "eval_step": list(evals), "eval_loss": list(evals.values())}


def test_comparison_finds_drift_the_target_refuses():
    """A run whose loss drifts 2% above the reference's (late, as bf16 drift would) fails; noise that
    the moving mean averages out does not."""
    steps = 400
    ref = _curve([5.0] * steps, {200: 4.0, 400: 3.0})
    noisy = _curve([5.0 * (1.02 if i % 2 else 0.98) for i in range(steps)], {200: 4.0, 400: 3.001})
    drift = _curve([5.0] * 300 + [5.1] * 100, {200: 4.0, 400: 3.03})
    ok, bad = compare(noisy, ref, 20), compare(drift, ref, 20)
    assert ok["max_smoothed_rel_deviation"] < 1e-12 and acceptance(ok, steps) == []
    assert abs(bad["max_smoothed_rel_deviation"] - 0.02) < 1e-9 and bad["max_smoothed_rel_deviation_step"] >= 320
    assert abs(bad["final_eval_rel_deviation"] - 0.01) < 1e-9 and bad["final_eval_step"] == 400
    failures = acceptance(bad, steps)
    assert len(failures) == 2 and "smoothed loss 2.00%" in failures[0] and "final eval +1.00%" in failures[1]


def test_lora_runs_follow_peft_from_the_same_initial_adapters(tmp_path, tiny_ckpt):
    """`--lora`: the reference is PEFT's get_peft_model on transformers' model, its A drawn as the runner
    draws it; in fp32 the runner at 1x1 and 2x1 follows it step for step (PEFT's own A, drawn from torch's
    RNG, puts the same run 0.6% off after 5 steps)."""
    out = tmp_path / "out"
    run(["env", f"BENCH_WORK={tmp_path / 'work'}", sys.executable, "-m", "benchmarks.longrun", "--out", str(out),
         "--device", "cpu", "--ckpt", str(tiny_ckpt), "--layouts", "1x1,2x1", "--lora", "4", "--steps", "5",
         "--eval-every", "2", "--micro", "1", "--global-batch", "2", "--text-tokens", "32", "--eval-samples", "3",
         "--smooth", "2", "--lr", "1e-2", "--warmup", "0"], timeout=600)
    (path,) = out.glob("longrun-*-cpu.json")
    record = json.loads(path.read_text())
    assert record["settings"]["recipe_overrides"]["lora.rank"] == 4
    assert "PeftModel" in (tmp_path / "work" / "longrun" / "log_reference.txt").read_text()
    runs = {r["name"]: r for r in record["runs"]}
    evals = json.loads((out / record["curves"]).read_text())["runs"]["reference"]["eval_loss"]
    assert evals[1] < 0.995 * evals[0]  # the adapters trained: agreement is not two frozen models
    for name in ("tp1pp1 cpu_fp32", "tp2pp1 cpu_fp32"):
        r = runs[name]
        assert r["steps_compared"] == 5 and r["max_smoothed_rel_deviation"] < 1e-4, r
        assert abs(r["final_eval_rel_deviation"]) < 1e-4, r
