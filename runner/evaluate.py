"""`runner evaluate MODEL_DIR --data DATA`: greedy answers from an HF Gemma4 directory, scored as VQA.

Any directory transformers loads (a base model, a training run's `export/`) answers each question of a
dataset `runner train` accepts, prompted through the processor's chat template with its generation
prompt, so a base model and its fine-tune are compared on the prompt a server would send. The last
assistant turn of each sample is the reference; the turns before it are the prompt.

Scores per answer, as SQuAD computes them: exact match and token F1 after normalisation (lowercase,
punctuation, articles and extra whitespace removed); for closed questions (reference yes or no) also
whether the answer's first word is that yes/no, since a model may justify its answer after it.
"""

from __future__ import annotations

import gc
import json
import re
import string
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from runner.checkpoint.hf_load import resolve_model_dir
from runner.compat import ADAPTER_CONFIG_NAME
from runner.config import RunConfig
from runner.data.sample import BadSample
from runner.data.sources import SampleSource, load_source
from runner.errors import UserError

CLOSED_ANSWERS = ("yes", "no")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1 between normalised answers (two empty answers agree)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def score(prediction: str, reference: str) -> dict[str, Any]:
    """One answer's scores; `closed_correct` is None unless the reference is yes or no."""
    ref = normalize_answer(reference)
    closed = ref in CLOSED_ANSWERS
    first_word = normalize_answer(prediction).partition(" ")[0]
    return {
        "exact_match": float(normalize_answer(prediction) == ref),
        "f1": token_f1(prediction, reference),
        "closed": closed,
        "closed_correct": (first_word == ref) if closed else None,
    }


def summarize(scores: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts and means over scored answers; closed-question accuracy is None without closed questions."""
    closed = [s["closed_correct"] for s in scores if s["closed"]]
    n = len(scores)
    return {
        "n": n,
        "exact_match": sum(s["exact_match"] for s in scores) / n if n else None,
        "f1": sum(s["f1"] for s in scores) / n if n else None,
        "closed_n": len(closed),
        "closed_correct": sum(closed),
        "closed_accuracy": sum(closed) / len(closed) if closed else None,
    }


@dataclass
class Question:
    """A sample cut before its last assistant turn: the prompt (and its images) and the reference answer."""

    key: str
    prompt: list[dict]
    images: list[Image.Image]
    question: str
    reference: str


def _text(message: dict) -> str:
    return "".join(part["text"] for part in message["content"] if part["type"] == "text")


def questions(source: SampleSource, limit: int, skipped: Counter) -> Iterator[Question]:
    """The first `limit` samples (0: all) as Questions; unreadable ones are counted in `skipped` by reason."""
    for index in range(min(limit, len(source)) if limit else len(source)):
        try:
            sample = source[index]
        except BadSample as err:
            skipped[err.reason] += 1
            continue
        last = max(i for i, m in enumerate(sample.messages) if m["role"] == "assistant")
        prompt = sample.messages[:last]
        n_images = sum(part["type"] == "image" for m in prompt for part in m["content"])
        user = [m for m in prompt if m["role"] == "user"]
        yield Question(sample.key, prompt, sample.images[:n_images], _text(user[-1]) if user else "",
                       _text(sample.messages[last]))


def load_model(model: str) -> tuple[Any, Any]:
    """An HF Gemma4 directory (or Hub id) → (model, processor): bf16 spread over the GPUs by
    `device_map="auto"` when CUDA is available, else fp32 on the CPU."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    model_dir = resolve_model_dir(model)
    fix = "pass a Gemma4 HF directory (a base model or a training run's OUTPUT_DIR/export)"
    if (model_dir / "merged").is_dir() or (model_dir / ADAPTER_CONFIG_NAME).is_file():
        merged = next((d for d in (model_dir / "merged", model_dir.parent / "merged") if d.is_dir()), None)
        where = f"{merged}, or write one" if merged else "write one"
        raise UserError(f"{model_dir} is a LoRA run's export or a PEFT adapter; evaluate the model with the "
                        f"adapters merged in ({where}: runner export CKPT OUT --merge)")
    try:
        model_type = AutoConfig.from_pretrained(model_dir).model_type
    except (OSError, ValueError) as err:
        raise UserError(f"{model_dir}: not an HF model directory ({_first_line(err)}); {fix}") from None
    if model_type != "gemma4":
        raise UserError(f"{model_dir}: model_type {model_type!r} is not Gemma4; {fix}")
    gpus = torch.cuda.is_available()
    placement = {"device_map": "auto", "dtype": torch.bfloat16} if gpus else {"dtype": torch.float32}
    try:
        processor = AutoProcessor.from_pretrained(model_dir)
        loaded = AutoModelForImageTextToText.from_pretrained(model_dir, **placement)
    except (OSError, ValueError) as err:
        raise UserError(f"{model_dir}: cannot load the model or its processor ({_first_line(err)}); {fix}") from None
    processor.tokenizer.padding_side = "left"  # generation continues every row from its last prompt token
    return loaded.eval(), processor


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


@torch.no_grad()
def generate(model: Any, processor: Any, batch: list[Question], max_new_tokens: int) -> list[str]:
    """Greedy answers for a left-padded batch, decoded without special tokens."""
    texts = [processor.apply_chat_template(q.prompt, tokenize=False, add_generation_prompt=True) for q in batch]
    images = [q.images for q in batch] if any(q.images for q in batch) else None
    inputs = processor(text=texts, images=images, padding=True, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**inputs.to(model.device), do_sample=False, max_new_tokens=max_new_tokens)
    answers = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [answer.strip() for answer in answers]


def run_evaluation(model: str, data: str, split: str = "validation", out_dir: str | Path | None = None,
                   max_samples: int = 0, max_new_tokens: int = 64, batch_size: int = 8) -> dict[str, Any]:
    """Answer and score `data[split]` with `model`; writes OUT/eval_metrics.json and OUT/predictions.jsonl
    (OUT defaults to MODEL_DIR/eval, or eval/OWNER--NAME for a Hub id) and returns the metrics."""
    from tqdm import tqdm

    if max_samples < 0 or max_new_tokens < 1 or batch_size < 1:
        raise UserError("evaluate: --max-samples must be >= 0 (0: all), --max-new-tokens and --batch-size >= 1")
    source = load_source(data, split)  # a bad data path fails before the weights load
    loaded, processor = load_model(model)
    if out_dir is None:  # beside a local model's weights; a Hub id's cache snapshot is no place for results
        out_dir = Path(model) / "eval" if Path(model).is_dir() else Path("eval") / model.replace("/", "--")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    skipped: Counter = Counter()
    scores = []
    pending = questions(source, max_samples, skipped)
    total = min(max_samples, len(source)) if max_samples else len(source)
    with (out / "predictions.jsonl").open("w", encoding="utf-8") as fh, tqdm(total=total, desc="evaluate",
                                                                             file=sys.stderr) as bar:
        while batch := list(islice(pending, batch_size)):
            for q, prediction in zip(batch, generate(loaded, processor, batch, max_new_tokens)):
                scores.append(score(prediction, q.reference))
                fh.write(json.dumps({"key": q.key, "question": q.question, "reference": q.reference,
                                     "prediction": prediction, **scores[-1]}) + "\n")
            bar.update(len(batch))
        bar.update(total - bar.n)  # rows skipped as unreadable
    if not scores:
        raise UserError(f"{data} [{split}]: no readable samples ({dict(skipped)}); check the dataset")
    metrics = {"model": str(model), "data": str(data), "split": split, **summarize(scores),
               "skipped": sum(skipped.values()), "skipped_by_reason": dict(skipped),
               "max_new_tokens": max_new_tokens}
    (out / "eval_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def summary_line(metrics: dict[str, Any]) -> str:
    """EM / F1 / closed accuracy as one short human-readable string."""
    closed = "n/a" if metrics["closed_accuracy"] is None else f"{metrics['closed_accuracy']:.3f}"
    return f"EM {metrics['exact_match']:.3f} / F1 {metrics['f1']:.3f} / closed acc {closed}"


def generate_on_export(export_dir: Path, cfg: RunConfig, step: int) -> dict[str, Any]:
    """`eval.generate: true`: score the run's export on data.eval after training (rank 0), the first
    eval.max_batches global batches of it, into OUTPUT_DIR/generate and a `{"split": "generate"}`
    line of metrics.jsonl, so a run's answers are judged as a server would produce them."""
    gc.collect()  # the training engine the caller dropped
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    out = Path(cfg.output.dir)
    metrics = run_evaluation(str(export_dir), cfg.data.eval, cfg.data.eval_split, out / "generate",
                             max_samples=cfg.eval.max_batches * cfg.train.global_batch_size,
                             batch_size=cfg.train.micro_batch_size)
    with (out / "metrics.jsonl").open("a", encoding="utf-8") as fh:
        record = {**metrics, "split": "generate", "data_split": metrics["split"], "step": step}
        fh.write(json.dumps(record) + "\n")
    print(f"generate step {step}: {summary_line(metrics)} over {metrics['n']} questions", flush=True)
    return metrics
