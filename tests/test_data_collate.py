"""Collate through the tiny Gemma4 processor, and the loader the trainer pulls micro-batches from."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from runner.data.collate import IGNORE_INDEX, Gemma4Collator, hf_model_inputs
from runner.data.loader import BadSampleReport, MicroBatchLoader
from runner.data.sample import BadSample, Sample
from runner.data.sampler import StepSampler
from runner.data.sources import ConcatSource, load_source
from runner.data.synthetic import make_data
from runner.errors import UserError

torch.set_num_threads(1)

QUESTION, ANSWER = "What is the main finding?", "The image shows a calcified nodule."
KEYS = ["input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_position_ids", "labels"]


@pytest.fixture(scope="module")
def processor(tiny_ckpt: Path):
    return AutoProcessor.from_pretrained(str(tiny_ckpt))


@pytest.fixture(scope="module")
def medpix(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("medpix"), n=24, seed=0)


def _vqa(image: Image.Image | None, question: str = QUESTION, answer: str = ANSWER) -> Sample:
    user = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    return Sample(messages, [image] if image is not None else [], "test")


def _ids(processor, text: str) -> list[int]:
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


# ---- labels -----------------------------------------------------------------------------------


def test_label_masking_hand_checked_with_thinking_prefix(processor) -> None:
    """480×480 → resized to 384×384 → 24×24 patches → 64 soft tokens (3×3 pooling). Everything up to
    and including the injected empty thought channel is -100; the answer and <turn|> are labeled."""
    tok = processor.tokenizer
    image_id, boi, eoi = (tok.convert_tokens_to_ids(t) for t in ("<|image|>", "<|image>", "<image|>"))
    prompt = (
        _ids(processor, "<bos><|turn>user\n")
        + [boi] + [image_id] * 64 + [eoi]
        + _ids(processor, f"{QUESTION}<turn|>\n<|turn>model\n<|channel>thought\n<channel|>")
    )
    answer = _ids(processor, f"{ANSWER}<turn|>")
    newline = _ids(processor, "\n")

    enc = Gemma4Collator(processor, thinking_prefix=True).encode(_vqa(Image.new("RGB", (480, 480), "gray")))

    assert enc.input_ids.tolist() == prompt + answer + newline
    assert enc.labels.tolist() == [IGNORE_INDEX] * len(prompt) + answer + [IGNORE_INDEX] * len(newline)
    assert enc.mm_token_type_ids.tolist() == [int(t == image_id) for t in prompt + answer + newline]
    assert answer[-1] == tok.convert_tokens_to_ids("<turn|>")


def test_labels_without_prefix_multi_turn_and_text_only(processor) -> None:
    collator = Gemma4Collator(processor)
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
        {"role": "user", "content": [{"type": "text", "text": "Is the heart size normal?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": [{"type": "text", "text": ANSWER}]},
    ]
    enc = collator.encode(Sample(messages, [Image.new("RGB", (64, 64))], "multi"))
    labeled = enc.labels != IGNORE_INDEX
    assert torch.equal(enc.labels[labeled], enc.input_ids[labeled])  # unshifted: aligned with input_ids
    assert processor.tokenizer.decode(enc.labels[labeled]) == f"Yes.<turn|>{ANSWER}<turn|>"

    with_prefix = Gemma4Collator(processor, thinking_prefix="<|channel>thought\n<channel|>").encode(Sample(messages, [Image.new("RGB", (64, 64))]))
    text = processor.tokenizer.decode(with_prefix.input_ids)
    assert text.count("<|channel>") == 1 and text.index("<|channel>") > text.index("Yes.")  # last model turn only
    assert torch.equal(with_prefix.labels[with_prefix.labels != IGNORE_INDEX], enc.labels[labeled])

    text_only = collator.encode(_vqa(None))
    assert text_only.pixel_values.shape == (0, 630, 768) and text_only.image_position_ids.shape == (0, 630, 2)
    assert processor.tokenizer.decode(text_only.labels[text_only.labels != IGNORE_INDEX]) == f"{ANSWER}<turn|>"


def test_an_image_in_a_model_turn_is_never_a_label(processor) -> None:
    """An assistant turn that shows an image: its text and end-of-turn are labels, the image's soft
    tokens and begin/end markers are input only."""
    messages = [
        {"role": "user", "content": [{"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Here:"}, {"type": "image"}]},
    ]
    enc = Gemma4Collator(processor).encode(Sample(messages, [Image.new("RGB", (64, 64))], "answer with image"))
    labeled = enc.labels != IGNORE_INDEX
    assert (enc.mm_token_type_ids != 0).any() and not (labeled & (enc.mm_token_type_ids != 0)).any()
    assert processor.tokenizer.decode(enc.labels[labeled]).replace(" ", "").replace("\n", "") == "Here:<turn|>"


def test_labels_match_transformers_shift_convention(tiny_ckpt: Path, processor) -> None:
    """transformers' own loss on our batch equals CE(logits[:, t], labels[:, t + 1]) over labeled
    tokens: labels are handed over unshifted and the model shifts once."""
    model = AutoModelForImageTextToText.from_pretrained(str(tiny_ckpt)).eval()
    batch = Gemma4Collator(processor)([_vqa(Image.new("RGB", (96, 64), "white")), _vqa(None, answer="No.")])
    with torch.no_grad():
        out = model(**hf_model_inputs(batch))
    logits, labels = out.logits[:, :-1].float(), batch["labels"][:, 1:]
    manual = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, manual)


# ---- images -----------------------------------------------------------------------------------


def test_soft_token_counts_match_the_vision_tower(tiny_ckpt: Path, processor) -> None:
    """For small, tall, wide and large images, the image tokens in input_ids equal the number of
    features the tiny vision tower emits for that image."""
    model = AutoModelForImageTextToText.from_pretrained(str(tiny_ckpt)).eval()
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image|>")
    sizes = [(56, 40), (150, 512), (600, 140), (1024, 768)]  # (width, height)
    collator = Gemma4Collator(processor)
    batch = collator([_vqa(Image.new("RGB", size, (30, 120, 200))) for size in sizes])
    in_text = (batch["input_ids"] == image_id).sum(dim=1).tolist()
    with torch.no_grad():
        features = model.model.get_image_features(batch["pixel_values"], batch["image_position_ids"]).pooler_output
    assert in_text == [f.shape[0] for f in features]
    assert len(set(in_text)) >= 3 and max(in_text) <= 70
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == image_id).long())


# ---- max_length -------------------------------------------------------------------------------


def test_overlong_dropped_or_cut_before_an_image(processor) -> None:
    tok = processor.tokenizer
    boi = tok.convert_tokens_to_ids("<|image>")
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Is the heart size normal?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": [{"type": "text", "text": ANSWER}]},
    ]
    sample = Sample(messages, [Image.new("RGB", (480, 480))], "long")
    full = Gemma4Collator(processor).encode(sample)
    at_boi = full.input_ids.tolist().index(boi)
    max_length = at_boi + 10  # inside the image's soft tokens

    with pytest.raises(BadSample, match="too long"):
        Gemma4Collator(processor, max_length=max_length).encode(sample)
    cut = Gemma4Collator(processor, max_length=max_length, overlong="truncate").encode(sample)
    assert len(cut) == at_boi and cut.pixel_values.shape[0] == 0 and cut.image_position_ids.shape[0] == 0
    assert torch.equal(cut.input_ids, full.input_ids[:at_boi]) and torch.equal(cut.labels, full.labels[:at_boi])
    assert tok.decode(cut.labels[cut.labels != IGNORE_INDEX]) == "Yes.<turn|>"

    image_first = _vqa(Image.new("RGB", (480, 480)))
    with pytest.raises(BadSample, match="no answer token left"):
        Gemma4Collator(processor, max_length=20, overlong="truncate").encode(image_first)


# ---- micro-batch ------------------------------------------------------------------------------


def test_collate_contract_text_only_batches_and_buckets(processor) -> None:
    collator = Gemma4Collator(processor, max_length=512, buckets=[128, 256, 512])
    batch = collator([_vqa(None), _vqa(None, answer="Yes.")])
    assert sorted(batch) == sorted(KEYS)
    assert batch["input_ids"].shape == (2, 128) and batch["pixel_values"].shape == (0, 630, 768)
    assert batch["image_position_ids"].shape == (0, 630, 2)
    assert all(isinstance(v, torch.Tensor) for v in batch.values())
    assert all(batch[k].dtype == torch.long for k in KEYS if k != "pixel_values")
    lengths = batch["attention_mask"].sum(1)
    assert (batch["labels"][1, lengths[1] :] == IGNORE_INDEX).all() and (batch["input_ids"][1, lengths[1] :] == 0).all()

    dynamic = Gemma4Collator(processor, pad_to_multiple_of=8)([_vqa(None)])
    assert dynamic["input_ids"].shape[1] % 8 == 0 and dynamic["input_ids"].shape[1] < 128
    assert Gemma4Collator(processor, max_length=100, pad_to_multiple_of=64).padded_length(90) == 100
    empty = collator.collate([])  # the shortest length it makes: the smallest bucket
    assert empty["input_ids"].shape == (1, 128) and (empty["labels"] == IGNORE_INDEX).all()
    assert Gemma4Collator(processor, pad_to_multiple_of=8).collate([])["input_ids"].shape == (1, 8)
    assert empty["pixel_values"].shape == (0, 630, 768)
    with pytest.raises(UserError, match="buckets"):
        Gemma4Collator(processor, max_length=1024, buckets=[128, 512])


# ---- loader: bad samples, resume, TP ranks ----------------------------------------------------


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def mixed(medpix: Path, tmp_path_factory: pytest.TempPathFactory) -> ConcatSource:
    """18 MedPix rows, 3 text-only chats, and 3 bad samples: corrupt image, empty answer, too long."""
    root = tmp_path_factory.mktemp("mixed")
    features = datasets.Features({"image_id": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string")})
    rows = {"image_id": [{"bytes": b"\x89PNG broken", "path": None}, {"bytes": _png(), "path": None}], "question": ["q", "q"], "answer": ["a", ""]}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(root / "bad.parquet"))
    chats = [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]} for i in range(3)]
    chats.append({"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]})
    (root / "chat.jsonl").write_text("\n".join(json.dumps(c) for c in chats))
    return ConcatSource([load_source(str(medpix), "train[:18]"), load_source(str(root / "bad.parquet")), load_source(str(root / "chat.jsonl"))])


def _loader(source, processor, dp_rank: int = 0, dp_size: int = 1, **kwargs) -> MicroBatchLoader:
    sampler = StepSampler(len(source), micro_batch_size=2, grad_accum_steps=2, dp_size=dp_size, dp_rank=dp_rank, seed=5)
    return MicroBatchLoader(source, Gemma4Collator(processor, max_length=256), sampler, **kwargs)


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in KEYS)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_bad_samples_skipped_counted_or_raised(mixed: ConcatSource, processor, num_workers: int, caplog: pytest.LogCaptureFixture) -> None:
    loader = _loader(mixed, processor, num_workers=num_workers)
    per_epoch = loader.sampler.micro_batches_per_epoch  # 24 samples, 4 per step → 12 micro-batches
    rows = sum(int((b["labels"] != IGNORE_INDEX).any(1).sum()) for b in (next(loader) for _ in range(per_epoch)))
    assert (loader.epoch, loader.position, rows) == (0, per_epoch, 24 - 3)
    assert loader.skipped == {"unreadable image": 1, "empty answer": 1, "too long": 1}
    next(loader)  # crosses into epoch 1: the finished epoch's counts are kept for the log
    assert loader.skipped_per_epoch[0] == {"unreadable image": 1, "empty answer": 1, "too long": 1}
    assert (loader.epoch, loader.position) == (1, 1)
    assert "skipping bad sample" in caplog.text and "epoch 0: skipped 3 of 24 samples as bad" in caplog.text

    strict = _loader(mixed, processor, num_workers=num_workers, on_bad="raise")
    with pytest.raises(UserError, match=r"^bad sample (unreadable image|empty answer|too long): .*(row \d|chat.jsonl:\d)"):
        for _ in range(per_epoch):
            next(strict)


def test_each_bad_sample_is_one_line_once_and_each_epoch_one_summary(mixed: ConcatSource, processor,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Two epochs over the same 3 bad samples: one line per sample (not again in epoch 1), a summary per
    epoch by reason; a process that does not speak for its replica (a TP/PP rank other than the first)
    says nothing."""
    loader = _loader(mixed, processor)
    for _ in range(2 * loader.sampler.micro_batches_per_epoch):
        next(loader)
    lines = [r.getMessage() for r in caplog.records]
    assert len([m for m in lines if m.startswith("skipping bad sample")]) == 3, lines
    assert len({m for m in lines if m.startswith("skipping bad sample")}) == 3, lines
    for epoch in (0, 1):
        [summary] = [m for m in lines if m.startswith(f"data epoch {epoch}: ")]
        assert "skipped 3 of 24 samples as bad" in summary and "empty answer 1" in summary, summary
    caplog.clear()
    silent = _loader(mixed, processor, report=BadSampleReport(speaks=False))
    for _ in range(silent.sampler.micro_batches_per_epoch):
        next(silent)
    assert silent.skipped == {"unreadable image": 1, "empty answer": 1, "too long": 1} and not caplog.records


def test_malformed_jsonl_lines_skipped_counted_or_raised(tmp_path: Path, processor) -> None:
    """Lines that are not JSON, not UTF-8 or have no `messages` are bad samples like any other: skipped
    and counted (read by a loader worker too), or one line naming file and line under `raise`."""
    chats = [json.dumps({"messages": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": "A."}]})
             for i in range(3)]
    path = tmp_path / "chat.jsonl"
    path.write_bytes(b"\n".join([chats[0].encode(), b"{not json", chats[1].encode(), b'"caf\xe9"', chats[2].encode(),
                                 b'{"text": "no messages"}']))
    source = load_source(str(path))

    def loader(**kwargs) -> MicroBatchLoader:  # every line in an epoch
        return MicroBatchLoader(source, Gemma4Collator(processor, max_length=256), StepSampler(6, 2, 1), **kwargs)

    lenient = loader(num_workers=1)
    batches = [next(lenient) for _ in range(3)]
    assert lenient.skipped == {"malformed line": 3}
    assert sum(int((b["labels"] != IGNORE_INDEX).any(1).sum()) for b in batches) == 3
    strict = loader(on_bad="raise")
    with pytest.raises(UserError, match=r"^bad sample malformed line: chat.jsonl:[246]: (not valid JSON|not UTF-8|"
                                        r"expected an object with a \"messages\" list)[^\n]*on_bad_sample=skip"):
        for _ in range(3):
            next(strict)


def test_resume_continues_without_repeats_or_gaps(mixed: ConcatSource, processor) -> None:
    unbroken = _loader(mixed, processor)
    reference = [next(unbroken) for _ in range(16)]  # crosses the epoch boundary at 12

    first = _loader(mixed, processor)
    head = first.next_step() + first.next_step() + first.next_step()
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
    resumed = _loader(mixed, processor)
    resumed.load_state_dict(state)
    tail = [next(resumed) for _ in range(16 - len(head))]
    assert _same(head + tail, reference)

    other_layout = MicroBatchLoader(mixed, Gemma4Collator(processor), StepSampler(len(mixed), 1, 2, seed=5))
    with pytest.raises(UserError, match="same data and batch layout"):
        other_layout.load_state_dict(state)
    sampler = resumed.sampler
    grouped = MicroBatchLoader(mixed, Gemma4Collator(processor), StepSampler(
        len(mixed), sampler.micro_batch_size, sampler.grad_accum_steps, seed=sampler.seed, lengths=[1] * len(mixed)))
    with pytest.raises(UserError, match="saved with data.group_by_length: false, this run has true"):
        grouped.load_state_dict(state)
    grouped_state = grouped.state_dict()
    grouped.load_state_dict(grouped_state)  # the same lengths resume
    other_data = MicroBatchLoader(mixed, Gemma4Collator(processor), StepSampler(
        len(mixed), sampler.micro_batch_size, sampler.grad_accum_steps, seed=sampler.seed, lengths=[2] * len(mixed)))
    with pytest.raises(UserError, match="samples of other lengths: this is not the dataset"):
        other_data.load_state_dict(grouped_state)


def test_each_dp_rank_resumes_its_own_skip_counts(mixed: ConcatSource, processor) -> None:
    """Checkpoints keep DP rank 0's client state; the trainer adds every rank's skip counts to it."""
    ranks = [_loader(mixed, processor, dp_rank=r, dp_size=2) for r in range(2)]
    for loader in ranks:
        loader.next_step(), loader.next_step(), loader.next_step()
    states = [loader.state_dict() for loader in ranks]
    assert states[0]["skipped"] != states[1]["skipped"]  # the 3 bad rows did not all land on one rank
    saved = {**states[0], "skipped_by_dp_rank": [{k: st[k] for k in ("skipped", "skipped_per_epoch")} for st in states]}
    saved = json.loads(json.dumps(saved))
    for rank, state in enumerate(states):
        resumed = _loader(mixed, processor, dp_rank=rank, dp_size=2)
        resumed.load_state_dict(saved)
        assert resumed.skipped == state["skipped"] and resumed.position == state["position"]


def test_tp_ranks_of_a_replica_see_identical_batches_workers_too(mixed: ConcatSource, processor) -> None:
    tp0 = _loader(mixed, processor, dp_rank=1, dp_size=2)
    tp1 = _loader(mixed, processor, dp_rank=1, dp_size=2, num_workers=1)
    other_replica = _loader(mixed, processor, dp_rank=0, dp_size=2)
    a, b, c = tp0.next_step(), tp1.next_step(), other_replica.next_step()
    assert _same(a, b)
    assert not _same(a, c)


def test_eval_skips_a_global_batch_left_without_labels(medpix: Path, mixed: ConcatSource, processor) -> None:
    """The eval tail can be a sample or two; skipped as bad, its global batch has no label tokens: the
    eval leaves it out (the training loss refuses such a batch with one line)."""
    from types import SimpleNamespace

    from runner.models.gemma4.pipeline import TokenWeightedLoss
    from runner.train import evaluate

    source = ConcatSource([load_source(str(medpix), "train[:4]"), mixed.sources[1]])  # 4 good, then 2 bad
    loader = MicroBatchLoader(source, Gemma4Collator(processor, max_length=256),
                              StepSampler(6, 2, 2, shuffle=False, keep_tail=True))
    assert loader.sampler.epoch(0) == [[0, 1], [2, 3], [4, 5], []]
    ps = SimpleNamespace(dims=SimpleNamespace(dp=1, tp=1), tp_rank=0, dp_group=None)
    seen = []
    engine = SimpleNamespace(eval_batch=lambda batches, num_micro_batches: seen.append(len(list(batches))) or 2.0)
    result = evaluate(engine, SimpleNamespace(token_loss=TokenWeightedLoss(ps, 1000)), loader, ps, max_batches=0)
    assert seen == [2] and result["loss"] == 2.0 and result["label_tokens"] > 0
    with pytest.raises(UserError, match="no label tokens.*skipped as bad"):
        TokenWeightedLoss(ps, 1000).set_label_count(0, 2)
