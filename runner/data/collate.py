"""Samples → Gemma4 micro-batches through the processor and its chat template, with prompt masking.

Labels are unshifted and aligned with `input_ids`, as in transformers (the loss shifts once:
logits[:, t] predicts labels[:, t + 1]). Only model-turn tokens are labeled — the answer text and the
turn's end-of-turn token; the template's role headers, the user turns, the image tokens and an injected
thinking-channel prefix are -100. The header, end-of-turn and prefix tokens are learned from the
template itself (by rendering probe chats), so a changed template fails at construction, not silently.

Every value of a micro-batch is a tensor, never None: the dict travels through DeepSpeed's pipeline.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from runner.data.sample import BadSample, Sample
from runner.errors import UserError

IGNORE_INDEX = -100
_PROBE_Q, _PROBE_A = "Probe question?", "Probe answer."

logger = logging.getLogger(__name__)


@dataclass
class Encoded:
    """One sample after the processor: 1-D token tensors and its images' patches."""

    input_ids: torch.Tensor  # (S,) long
    labels: torch.Tensor  # (S,) long, IGNORE_INDEX outside model turns
    mm_token_type_ids: torch.Tensor  # (S,) long, 1 on image soft tokens
    pixel_values: torch.Tensor  # (n_images, max_patches, 3 * patch²) float
    image_position_ids: torch.Tensor  # (n_images, max_patches, 2) long, -1 on padding patches

    def __len__(self) -> int:
        return self.input_ids.numel()


def _find(haystack: list[int], needle: list[int], start: int = 0) -> int:
    """First index >= start where `needle` occurs in `haystack`, or -1."""
    n, first = len(needle), needle[0]
    try:
        while True:
            start = haystack.index(first, start)
            if haystack[start : start + n] == needle:
                return start
            start += 1
    except ValueError:
        return -1


class Gemma4Collator:
    """Encodes samples with a Gemma4 processor and pads them into micro-batches.

    `max_length`: longer samples are dropped (`overlong="drop"`) or cut (`"truncate"`) before the
    image whose soft tokens the cut would split — never through one. `thinking_prefix`: True injects
    the template's own empty thinking channel (what its generation prompt opens with when thinking
    is off) at the start of the last model turn, masked, so training sees the prompt inference uses;
    a string injects that text instead. `buckets`: sequence lengths to pad up to (the smallest that
    fits), or None to pad each micro-batch to its longest sample, rounded up to `pad_to_multiple_of`.
    """

    def __init__(
        self,
        processor: Any,
        max_length: int = 2048,
        overlong: Literal["drop", "truncate"] = "drop",
        thinking_prefix: bool | str = False,
        buckets: Sequence[int] | None = None,
        pad_to_multiple_of: int = 8,
    ) -> None:
        if overlong not in ("drop", "truncate"):
            raise UserError(f"data.overlong must be 'drop' or 'truncate', got {overlong!r}")
        if buckets is not None and (not buckets or max(buckets) < max_length):
            raise UserError(f"data.buckets {list(buckets)} must include a length >= max_length {max_length}")
        self.processor = processor
        self.tokenizer = tokenizer = processor.tokenizer
        self.max_length = max_length
        self.overlong = overlong
        self.buckets = sorted(buckets) if buckets is not None else None
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_id = tokenizer.pad_token_id
        self.boi_id = tokenizer.convert_tokens_to_ids(processor.boi_token)
        self.eoi_id = tokenizer.convert_tokens_to_ids(processor.eoi_token)
        image_processor = processor.image_processor
        self.max_patches = image_processor.max_soft_tokens * image_processor.pooling_kernel_size**2
        self.patch_dim = 3 * image_processor.patch_size**2
        self.image_tokens_max = image_processor.max_soft_tokens + 2  # soft tokens plus boi/eoi
        self._learn_template(thinking_prefix)

    # ---- template structure -------------------------------------------------------------------
    def _render(self, messages: list[dict], **kwargs: Any) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, **kwargs)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _learn_template(self, thinking_prefix: bool | str) -> None:
        """Find the model-turn header, end-of-turn token and thinking prefix by rendering probes."""
        user = [{"role": "user", "content": [{"type": "text", "text": _PROBE_Q}]}]
        turn = user + [{"role": "assistant", "content": [{"type": "text", "text": _PROBE_A}]}]
        prompt, full = self._render(user), self._render(turn)
        if not full.startswith(prompt) or _PROBE_A not in full[len(prompt) :]:
            raise UserError("chat template: an assistant turn does not extend the rendered user turn; cannot locate answers")
        block = full[len(prompt) :]
        self.header = block[: block.index(_PROBE_A)]  # e.g. "<|turn>model\n"
        tail = self._ids(block[block.index(_PROBE_A) + len(_PROBE_A) :])  # e.g. "<turn|>\n"
        if not self.header or not tail:
            raise UserError("chat template: model turns need a header and an end-of-turn marker to mask prompts")
        self.header_ids, self.end_id = self._ids(self.header), tail[0]
        if thinking_prefix is True:
            generation = self._render(user, add_generation_prompt=True)[len(prompt) :]
            if not generation.startswith(self.header) or generation == self.header:
                raise UserError("data.thinking_prefix: the chat template's generation prompt opens no thinking channel; pass the prefix text")
            thinking_prefix = generation[len(self.header) :]
        self.thinking_prefix = thinking_prefix or ""
        self.prefix_ids = self._ids(self.thinking_prefix)
        probe = self._encode(Sample(turn, [], "template probe"))
        answer = self.tokenizer.decode(probe.labels[probe.labels != IGNORE_INDEX])
        if not answer.startswith(_PROBE_A):
            raise UserError(f"chat template: masking probe labeled {answer!r}, expected the answer; the tokenizer splits the model-turn header differently in context")

    # ---- one sample ---------------------------------------------------------------------------
    def encode(self, sample: Sample) -> Encoded:
        """Render, tokenize and label one sample; BadSample if it cannot be trained on."""
        encoded = self._encode(sample)
        return self._fit(encoded, sample.key) if len(encoded) > self.max_length else encoded

    def _encode(self, sample: Sample) -> Encoded:
        text = self._render(sample.messages)
        if self.thinking_prefix:
            cut = text.rindex(self.header) + len(self.header)
            text = text[:cut] + self.thinking_prefix + text[cut:]
        try:
            out = self.processor(
                text=[text], images=[sample.images] if sample.images else None, add_special_tokens=False, return_tensors="pt"
            )
        except ValueError as err:  # e.g. an image the resize rule cannot place
            raise BadSample("processor rejected sample", f"{sample.key}: {err}") from None
        ids = out["input_ids"][0]
        labels = self._labels(ids.tolist(), sum(m["role"] == "assistant" for m in sample.messages), sample.key)
        # an image inside a model turn is input, not something to predict: its soft tokens and markers
        labels[(out["mm_token_type_ids"][0] != 0) | (ids == self.boi_id) | (ids == self.eoi_id)] = IGNORE_INDEX
        n_images = len(sample.images)
        pixel_values = out["pixel_values"] if n_images else torch.zeros(0, self.max_patches, self.patch_dim)
        positions = out["image_position_ids"] if n_images else torch.zeros(0, self.max_patches, 2, dtype=torch.long)
        return Encoded(ids, labels, out["mm_token_type_ids"][0], pixel_values, positions)

    def _labels(self, ids: list[int], n_turns: int, key: str) -> torch.Tensor:
        """Label each model turn from after its header (and prefix) through its end-of-turn token."""
        starts, at = [], _find(ids, self.header_ids)
        while at >= 0:
            starts.append(at + len(self.header_ids))
            at = _find(ids, self.header_ids, starts[-1])
        if len(starts) != n_turns:  # e.g. a user text containing the literal model-turn header
            raise BadSample("chat markup in text", f"{key}: {len(starts)} model-turn headers for {n_turns} assistant turns")
        labels = torch.full((len(ids),), IGNORE_INDEX, dtype=torch.long)
        starts[-1] += len(self.prefix_ids)
        for start in starts:
            end = ids.index(self.end_id, start) if self.end_id in ids[start:] else len(ids) - 1
            labels[start : end + 1] = torch.tensor(ids[start : end + 1])
        return labels

    def _fit(self, enc: Encoded, key: str) -> Encoded:
        """Drop, or cut an overlong sample before any image its cut would split."""
        detail = f"{key}: {len(enc)} tokens > max_length {self.max_length}"
        if self.overlong == "drop":
            raise BadSample("too long", detail)
        cut = self.max_length
        head = enc.input_ids[:cut]
        boi = (head == self.boi_id).nonzero().flatten()
        kept = int((head == self.eoi_id).sum())
        if len(boi) > kept:  # the cut falls inside an image: cut before its begin-of-image token
            cut = int(boi[kept])
        if not (enc.labels[:cut] != IGNORE_INDEX).any():
            raise BadSample("too long", f"{detail}; no answer token left after truncation")
        logger.warning("truncated %s to %d tokens (%d of %d images kept)", key, cut, kept, len(enc.pixel_values))
        return Encoded(
            enc.input_ids[:cut], enc.labels[:cut], enc.mm_token_type_ids[:cut], enc.pixel_values[:kept], enc.image_position_ids[:kept]
        )

    def estimate_lengths(self, texts_and_images: Sequence[tuple[str, int]]) -> list[int]:
        """Token-length estimates (text tokens + the image budget) for length grouping, no images decoded."""
        counts = self.tokenizer([text for text, _ in texts_and_images], add_special_tokens=False)["input_ids"]
        return [len(ids) + n * self.image_tokens_max for ids, (_, n) in zip(counts, texts_and_images)]

    # ---- micro-batch --------------------------------------------------------------------------
    def padded_length(self, longest: int) -> int:
        """The micro-batch length for its longest sample: a bucket, or rounded up (not past max_length)."""
        if self.buckets is not None:
            return self.buckets[bisect.bisect_left(self.buckets, longest)]
        rounded = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        return max(longest, min(rounded, self.max_length))

    def collate(self, encoded: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        """Right-pad to one length and concatenate images in sample order (the order the model
        scatters image features into image tokens). No samples → one row of unlabeled pad tokens at
        the shortest length this collator makes, so a micro-batch whose samples were all bad keeps
        valid shapes (a length sequence parallelism can split, no new FlexAttention compile) and adds
        nothing to the loss."""
        if not encoded:
            one = torch.full((1, self.padded_length(1)), self.pad_id, dtype=torch.long)
            return {
                "input_ids": one,
                "attention_mask": torch.ones_like(one),
                "mm_token_type_ids": torch.zeros_like(one),
                "pixel_values": torch.zeros(0, self.max_patches, self.patch_dim),
                "image_position_ids": torch.zeros(0, self.max_patches, 2, dtype=torch.long),
                "labels": torch.full_like(one, IGNORE_INDEX),
            }
        length = self.padded_length(max(len(e) for e in encoded))
        batch = {
            "input_ids": torch.full((len(encoded), length), self.pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(encoded), length), dtype=torch.long),
            "mm_token_type_ids": torch.zeros((len(encoded), length), dtype=torch.long),
            "labels": torch.full((len(encoded), length), IGNORE_INDEX, dtype=torch.long),
        }
        for row, enc in enumerate(encoded):
            n = len(enc)
            batch["input_ids"][row, :n] = enc.input_ids
            batch["attention_mask"][row, :n] = 1
            batch["mm_token_type_ids"][row, :n] = enc.mm_token_type_ids
            batch["labels"][row, :n] = enc.labels
        batch["pixel_values"] = torch.cat([e.pixel_values for e in encoded])
        batch["image_position_ids"] = torch.cat([e.image_position_ids for e in encoded])
        return batch

    def __call__(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        """Encode and collate in one go (BadSample propagates); loaders use encode/collate separately."""
        return self.collate([self.encode(s) for s in samples])


def hf_model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The micro-batch as transformers' Gemma4ForConditionalGeneration takes it: the reference model
    cannot run its vision tower on zero images, so empty image tensors are left out."""
    if batch["pixel_values"].shape[0]:
        return dict(batch)
    return {k: v for k, v in batch.items() if k not in ("pixel_values", "image_position_ids")}
