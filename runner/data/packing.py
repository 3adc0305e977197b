"""Sample packing: several whole samples per row, each blind to the others.

MedPix samples are a few hundred tokens; a padded micro-batch re-reads every weight for them. With
`data.packing`, one optimizer step's samples (this DP replica's share of `train.global_batch_size`,
in the sampler's order) go first-fit into rows of at most `data.pack_length` tokens, and the rows into
micro-batches of `train.micro_batch_size` rows: as few micro-batches as the step needs, so their
number varies per step and DP replica (the trainer tells DeepSpeed each step's count). A micro-batch is
as long as its longest row, rounded up to `data.pad_to_multiple_of` (as unpacked ones are): the step's
last row, often a few samples, does not pay for a whole `pack_length` of padding.

A packed micro-batch has the padded one's keys; its `attention_mask` holds document ids instead of
0/1: 1, 2, … for the samples of a row, 0 on padding. Every stage rebuilds masks and positions from
them (`document_positions`; `runner.compat.build_masks` with `packed`): causal within each sample,
bidirectional within each image, sliding windows and both RoPE tables counted from each sample's
start. Each sample's first label is -100: the token before it belongs to another sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from runner.data.collate import IGNORE_INDEX, Encoded


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices into `lengths`, grouped into rows of at most `capacity` tokens: each sample in turn
    goes to the first row with room for it, else opens a new one; rows keep their samples' order."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(f"sample of {n} tokens does not fit a row of {capacity}")
        row = next((r for r, free in enumerate(room) if n <= free), len(rows))
        if row == len(rows):
            rows.append([])
            room.append(capacity)
        rows[row].append(i)
        room[row] -= n
    return rows


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """Position ids restarting at 0 wherever the document id changes along a row (a padded row, ids
    1…1 0…0, gets 0…n-1 for its sample)."""
    batch, seq = document_ids.shape
    index = torch.arange(seq, device=document_ids.device).expand(batch, seq)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return index - torch.where(starts, index, 0).cummax(dim=1).values


class Packer:
    """Encoded samples of one step → packed micro-batches of `rows_per_micro_batch` rows of at most
    `pack_length` tokens, each micro-batch padded to its longest row rounded up to `multiple`."""

    def __init__(self, pack_length: int, rows_per_micro_batch: int, pad_id: int, max_patches: int,
                 patch_dim: int, multiple: int) -> None:
        self.pack_length = pack_length
        self.rows_per_micro_batch = rows_per_micro_batch
        self.multiple = multiple
        self.pad_id = pad_id
        self.max_patches, self.patch_dim = max_patches, patch_dim

    def pack(self, encoded: Sequence[Encoded]) -> list[dict[str, torch.Tensor]]:
        """The step's micro-batches. No samples (all bad) → one unlabeled pad row, adding nothing to
        the loss (document id 1: a row nobody attends to would be a fully masked softmax)."""
        if not encoded:
            return [self._collate([[]], empty=True)]
        rows = [[encoded[i] for i in row] for row in first_fit([len(e) for e in encoded], self.pack_length)]
        per = self.rows_per_micro_batch
        return [self._collate(rows[i:i + per]) for i in range(0, len(rows), per)]

    def _collate(self, rows: list[list[Encoded]], empty: bool = False) -> dict[str, torch.Tensor]:
        longest = max(sum(len(enc) for enc in row) for row in rows) or 1
        shape = (len(rows), min(self.pack_length, -(-longest // self.multiple) * self.multiple))
        batch = {
            "input_ids": torch.full(shape, self.pad_id, dtype=torch.long),
            "attention_mask": torch.full(shape, int(empty), dtype=torch.long),
            "mm_token_type_ids": torch.zeros(shape, dtype=torch.long),
            "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.long),
        }
        for r, row in enumerate(rows):
            at = 0
            for doc, enc in enumerate(row, start=1):
                span = slice(at, at + len(enc))
                batch["input_ids"][r, span] = enc.input_ids
                batch["attention_mask"][r, span] = doc
                batch["mm_token_type_ids"][r, span] = enc.mm_token_type_ids
                batch["labels"][r, span] = enc.labels
                batch["labels"][r, at] = IGNORE_INDEX
                at += len(enc)
        samples = [enc for row in rows for enc in row]  # image order = the order image tokens are scattered
        batch["pixel_values"] = torch.cat([torch.zeros(0, self.max_patches, self.patch_dim)]
                                          + [e.pixel_values for e in samples])
        batch["image_position_ids"] = torch.cat([torch.zeros(0, self.max_patches, 2, dtype=torch.long)]
                                                + [e.image_position_ids for e in samples])
        return batch
