"""`runner evaluate`: VQA scores on hand-made answers, generation on the tiny model (MedPix-VQA and chat
JSONL), one-line errors for a bad model directory or data path, and the `eval.generate` recipe check."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from runner.config import load_config
from runner.errors import UserError
from runner.evaluate import normalize_answer, run_evaluation, score, summarize

from conftest import ROOT, assert_one_error_line, free_port, run


def test_scores_on_hand_made_answers() -> None:
    assert normalize_answer("  The Lesion, in the LEFT  lobe!") == "lesion in left lobe"
    cases = [  # prediction, reference, exact match, F1, closed-question correctness
        ("Yes.", "yes", 1.0, 1.0, True),
        ("No, the lungs are clear.", "Yes", 0.0, 0.0, False),
        ("no, clear", "No.", 0.0, 2 / 3, True),  # the first word answers a closed question
        ("a calcified nodule", "The image shows a calcified nodule.", 0.0, 2 / 3, None),
        ("", "CT", 0.0, 0.0, None),
    ]
    scores = [score(prediction, reference) for prediction, reference, *_ in cases]
    for s, (_, _, em, f1, closed) in zip(scores, cases):
        assert s["exact_match"] == em and s["f1"] == pytest.approx(f1, abs=1e-12)
        assert s["closed"] == (closed is not None) and s["closed_correct"] == closed
    summary = summarize(scores)
    assert summary["n"] == 5 and summary["closed_n"] == 3 and summary["closed_correct"] == 2
    assert summary["exact_match"] == pytest.approx(1 / 5)
    assert summary["f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 5)
    assert summary["closed_accuracy"] == pytest.approx(2 / 3)
    assert summarize(scores[3:])["closed_accuracy"] is None


def _read(out: Path) -> tuple[dict, list[dict]]:
    metrics = json.loads((out / "eval_metrics.json").read_text())
    return metrics, [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_generation_on_medpix_rows_writes_both_files(tiny_ckpt, tmp_path) -> None:
    from runner.data.synthetic import make_data

    data = make_data(tmp_path / "medpix", n=30)  # 3 validation rows
    metrics = run_evaluation(str(tiny_ckpt), str(data), "validation", tmp_path / "out", max_samples=2,
                             max_new_tokens=4, batch_size=2)
    on_disk, predictions = _read(tmp_path / "out")
    assert on_disk == metrics
    assert metrics["n"] == 2 and len(predictions) == 2 and metrics["skipped"] == 0
    assert (metrics["model"], metrics["data"], metrics["split"]) == (str(tiny_ckpt), str(data), "validation")
    assert metrics["closed_n"] == 0 and metrics["closed_accuracy"] is None  # no yes/no answers in the synthetic set
    for p in predictions:
        assert p["question"].endswith("?") and p["reference"] and isinstance(p["prediction"], str)
        assert {"exact_match", "f1", "closed", "closed_correct"} <= p.keys()


def test_generation_on_chat_jsonl_takes_the_last_answer_as_reference(tiny_ckpt, tmp_path) -> None:
    """Multi-turn, image and text-only chats in one left-padded batch; the last assistant turn is the
    reference, everything before it the prompt."""
    Image.new("RGB", (64, 48), "gray").save(tmp_path / "scan.png")
    chats = [
        [{"role": "user", "content": [{"type": "image", "path": "scan.png"}, {"type": "text", "text": "Any mass?"}]},
         {"role": "assistant", "content": "No."}],
        [{"role": "system", "content": "Answer briefly."},
         {"role": "user", "content": "Is the heart enlarged?"}, {"role": "assistant", "content": "Yes."},
         {"role": "user", "content": "Which modality?"}, {"role": "assistant", "content": "An X-ray."}],
        [{"role": "user", "content": "Is there a fracture?"}, {"role": "assistant", "content": "yes"}],
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
    metrics = run_evaluation(str(tiny_ckpt), str(path), "train", tmp_path / "out", max_new_tokens=3, batch_size=3)
    _, predictions = _read(tmp_path / "out")
    assert [(p["question"], p["reference"]) for p in predictions] == [
        ("Any mass?", "No."), ("Which modality?", "An X-ray."), ("Is there a fracture?", "yes")]
    assert metrics["n"] == 3 and metrics["closed_n"] == 2


@pytest.mark.parametrize("case", ["missing", "not_gemma4", "lora_export", "adapter"])
def test_bad_model_dir_is_one_error_line(tmp_path, case) -> None:
    model = tmp_path / "model"
    if case == "not_gemma4":
        model.mkdir()
        (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    elif case in ("lora_export", "adapter"):  # a LoRA run's OUTPUT_DIR/export: adapter/ and merged/
        (model / "adapter").mkdir(parents=True)
        (model / "merged").mkdir()
        (model / "adapter" / "adapter_config.json").write_text("{}")
        model = model / "adapter" if case == "adapter" else model
    jsonl = tmp_path / "chat.jsonl"
    chat = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]
    jsonl.write_text(json.dumps({"messages": chat}))
    proc = run([sys.executable, "-m", "runner", "evaluate", str(model), "--data", str(jsonl), "--split", "train"],
               ok=False)
    words = {"missing": ["no such directory"], "not_gemma4": ["Gemma4"],
             "lora_export": ["a LoRA run's export or a PEFT adapter", str(tmp_path / "model" / "merged"), "--merge"]}
    assert_one_error_line(proc, [str(model), *words.get(case, words["lora_export"])])


def test_bad_data_path_is_one_error_line(tiny_ckpt, tmp_path) -> None:
    data = tmp_path / "no-such-data"
    proc = run([sys.executable, "-m", "runner", "evaluate", str(tiny_ckpt), "--data", str(data)], ok=False)
    assert_one_error_line(proc, [str(data)])


def test_eval_generate_logs_the_exports_scores_after_training(tiny_ckpt, tmp_path) -> None:
    """One process, one step: the export answers data.eval's first eval.max_batches global batches."""
    from runner.data.synthetic import make_data

    data, out = make_data(tmp_path / "medpix", n=30), tmp_path / "run"  # 3 validation rows, 2 answered
    sets = [f"model.path={tiny_ckpt}", f"data.train={data}", f"data.eval={data}", f"output.dir={out}",
            "parallel.tp=1", "parallel.pp=1", "train.max_steps=1", "train.global_batch_size=2", "eval.max_batches=1",
            "checkpoint.every_steps=0", "checkpoint.export=true", "eval.generate=true", "logging.tensorboard=false"]
    run(["env", "RANK=0", "LOCAL_RANK=0", "WORLD_SIZE=1", "MASTER_ADDR=127.0.0.1", f"MASTER_PORT={free_port()}",
         sys.executable, "-m", "runner", "train", str(ROOT / "recipes" / "tiny_demo.yaml"),
         *[a for pair in sets for a in ("--set", pair)]])
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert (record["split"], record["data_split"], record["step"], record["n"]) == ("generate", "validation", 1, 2)
    assert record["model"] == str(out / "export") and {"exact_match", "f1", "closed_accuracy"} <= record.keys()
    metrics, predictions = _read(out / "generate")
    assert metrics["n"] == len(predictions) == 2


def test_eval_generate_needs_the_export_and_eval_data() -> None:
    recipe = ROOT / "recipes" / "tiny_demo.yaml"
    # the tiny recipe evaluates on a held-out data.eval_fraction; eval.generate needs a named data.eval
    named = ["eval.generate=true", "data.eval=runs/demo/medpix-synthetic"]
    assert load_config(recipe, named).eval.generate
    for missing in ("checkpoint.export=false", "data.eval="):
        with pytest.raises(UserError, match="eval.generate"):
            load_config(recipe, [*named, missing])
