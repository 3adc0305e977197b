"""The trainer's data feed: micro-batches of one DP replica, resumable, bad samples skipped and counted.

Workers (torch DataLoader processes) only encode and collate; a bad sample comes back as a reason,
never as an exception, so one corrupt image cannot kill a worker. The main process counts, reports
(`BadSampleReport`: one line per bad sample, one summary per epoch, by one process of the job), and —
with `on_bad="raise"` — stops with one UserError line naming the sample. Position and skip counts
are tracked as micro-batches are handed to the trainer (not as workers prefetch), so `state_dict`
taken between steps resumes exactly: no sample repeated, none missed.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset

from runner.data.collate import Encoded, Gemma4Collator
from runner.data.packing import Packer
from runner.data.sample import BadSample
from runner.data.sampler import StepSampler
from runner.data.sources import SampleSource
from runner.errors import UserError

logger = logging.getLogger(__name__)
_LINES_PER_REASON = 5  # bad-sample lines per reason and process; the epoch summaries have the full counts

Skip = tuple[str, str, int]  # (reason, message, dataset index)
Batch = dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]  # a micro-batch, or a packed step's


class _EncodedDataset(Dataset):
    """source[i] → Encoded, or the BadSample's (reason, message, i) instead of raising."""

    def __init__(self, source: SampleSource, collator: Gemma4Collator) -> None:
        self.source, self.collator = source, collator

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Encoded | Skip:
        try:
            return self.collator.encode(self.source[index])
        except BadSample as bad:
            return bad.reason, str(bad), index


class _Collate:
    """Picklable collate_fn: the micro-batch (with a packer: the step's packed micro-batches) plus the
    skips it contained."""

    def __init__(self, collator: Gemma4Collator, packer: Packer | None) -> None:
        self.collator, self.packer = collator, packer

    def __call__(self, items: list[Encoded | Skip]) -> tuple[Batch, list[Skip]]:
        good = [item for item in items if isinstance(item, Encoded)]
        batch = self.collator.collate(good) if self.packer is None else self.packer.pack(good)
        return batch, [item for item in items if not isinstance(item, Encoded)]


class BadSampleReport:
    """Who says what about bad samples. Every TP/PP rank of a DP replica reads the same samples and
    each replica its own, so one process per replica (`speaks`: its first) prints one line per bad
    sample it read, the first time it meets it (not again in later epochs or eval passes), at most
    `_LINES_PER_REASON` per reason; and at each epoch's end the job's first process prints one summary
    of every replica's counts by reason (gathered over `dp_group`, the speaking processes' DP group,
    when there are several replicas). `every_time` (`runner train --verbose`): a line each time a
    sample is skipped, no cap. Without a process group (one process, tests): speaks, sums its own."""

    def __init__(self, name: str = "data", speaks: bool = True, dp_group: Any = None, every_time: bool = False) -> None:
        self.name, self.speaks, self.dp_group, self.every_time = name, speaks, dp_group, every_time
        self.seen: set[int] = set()
        self.lines: Counter[str] = Counter()
        self.summarized: set[int] = set()  # epochs (an eval pass rewinds to epoch 0 and reads its split again)

    def skipped(self, reason: str, message: str, index: int) -> None:
        if not self.speaks or (index in self.seen and not self.every_time):
            return
        self.seen.add(index)
        self.lines[reason] += 1
        if self.every_time or self.lines[reason] <= _LINES_PER_REASON:
            logger.warning("skipping bad sample %s", message)
            if self.lines[reason] == _LINES_PER_REASON and not self.every_time:
                logger.warning("(further %r samples are counted in the epoch summaries, not listed)", reason)

    def epoch_end(self, epoch: int, counts: Counter[str], samples: int) -> None:
        """Collective over `dp_group` on the speaking processes: call on every rank at the same point."""
        if not self.speaks or epoch in self.summarized:
            return
        self.summarized.add(epoch)
        first = True
        if self.dp_group is not None:
            import torch.distributed as dist

            every: list = [None] * dist.get_world_size(self.dp_group)
            dist.all_gather_object(every, dict(counts), group=self.dp_group)
            counts = sum((Counter(c) for c in every), Counter())
            first = dist.get_rank(self.dp_group) == 0
        total = sum(counts.values())
        if first and total:
            by_reason = ", ".join(f"{reason} {n}" for reason, n in counts.most_common())
            logger.warning("%s epoch %d: skipped %d of %d samples as bad (%s)", self.name, epoch, total, samples, by_reason)


class MicroBatchLoader:
    """Iterates this DP rank's micro-batches forever, epoch after epoch.

    `next_step()` gives the grad_accum_steps micro-batches of one optimizer step; iterating gives
    them one at a time (what DeepSpeed's `train_batch(data_iter=...)` pulls). With a `packer` a step's
    grad_accum_steps sampler micro-batches are packed together (`runner/data/packing.py`): `next_step()`
    gives its packed micro-batches, as many as they fill, and iterating gives whole steps. Call `load_state_dict`
    before iterating to resume. `skipped` counts this epoch's bad samples by reason;
    `skipped_per_epoch` keeps finished epochs' counts for the log.
    """

    def __init__(
        self,
        source: SampleSource,
        collator: Gemma4Collator,
        sampler: StepSampler,
        num_workers: int = 0,
        on_bad: Literal["skip", "raise"] = "skip",
        packer: Packer | None = None,
        report: BadSampleReport | None = None,
    ) -> None:
        if on_bad not in ("skip", "raise"):
            raise UserError(f"data.on_bad_sample must be 'skip' or 'raise', got {on_bad!r}")
        if len(source) != sampler.num_samples:
            raise UserError(f"sampler is sized for {sampler.num_samples} samples but the dataset has {len(source)}")
        self.dataset = _EncodedDataset(source, collator)
        self.collate = _Collate(collator, packer)
        self.packed = packer is not None
        self.sampler = sampler
        # fingerprint of the estimated lengths, which set the order under length grouping: another dataset
        # of the same size resumed at a saved position would repeat and miss samples
        lengths = None if sampler.lengths is None else sampler.lengths.astype("int64").tobytes()
        self.lengths_digest = None if lengths is None else hashlib.sha1(lengths).hexdigest()[:16]
        self.num_workers = num_workers
        self.on_bad = on_bad
        self.report = report or BadSampleReport()
        self.epoch = 0
        self.position = 0  # micro-batches of this epoch already handed out
        self.skipped: Counter[str] = Counter()
        self.skipped_per_epoch: dict[int, dict[str, int]] = {}
        self._iter: Iterator[Batch] | None = None

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self._iter is None:
            self._iter = self._generate()
        return next(self._iter)

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """The micro-batches of one optimizer step."""
        return next(self) if self.packed else [next(self) for _ in range(self.sampler.grad_accum_steps)]

    @property
    def steps_delivered(self) -> int:
        """Global batches handed out since the start of epoch 0, those whose samples were all skipped
        included: what `train.epochs` counts."""
        return (self.epoch * self.sampler.micro_batches_per_epoch + self.position) // self.sampler.grad_accum_steps

    def _generate(self) -> Iterator[Batch]:
        per_item = self.sampler.grad_accum_steps if self.packed else 1  # sampler micro-batches per item
        while True:
            batches = self.sampler.epoch(self.epoch)[self.position :]
            items = [sum(batches[i:i + per_item], []) for i in range(0, len(batches), per_item)]
            loader = DataLoader(
                self.dataset,
                batch_sampler=items,
                collate_fn=self.collate,
                num_workers=self.num_workers,
            )
            for batch, skips in loader:
                self._count(skips)
                self.position += per_item
                if self.position >= self.sampler.micro_batches_per_epoch:  # before the trainer may stop on it
                    self.report.epoch_end(self.epoch, self.skipped, self._samples_per_epoch())
                yield batch
            self._end_epoch()

    def _count(self, skips: list[Skip]) -> None:
        for reason, message, index in skips:
            if self.on_bad == "raise":
                raise UserError(f"bad sample {message}; set data.on_bad_sample=skip to skip and count such samples")
            self.skipped[reason] += 1
            self.report.skipped(reason, message, index)

    def _samples_per_epoch(self) -> int:
        s = self.sampler  # whole global batches (keep_tail: the last partial one too)
        return min(s.num_samples, s.micro_batches_per_epoch * s.micro_batch_size * s.dp_size)

    def _end_epoch(self) -> None:
        self.skipped_per_epoch[self.epoch] = dict(self.skipped)
        self.epoch, self.position, self.skipped = self.epoch + 1, 0, Counter()

    def _layout(self) -> list[int]:
        s = self.sampler
        return [s.num_samples, s.seed, s.micro_batch_size, s.grad_accum_steps, s.dp_size]

    def rewind(self) -> None:
        """Back to the start of epoch 0 (an eval pass over its whole split)."""
        self.epoch, self.position, self._iter = 0, 0, None

    def state_dict(self) -> dict[str, Any]:
        """Position and skip counts. The position is the same on every rank, so any rank's state
        resumes any rank; the skip counts are this rank's."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "skipped": dict(self.skipped),
            "skipped_per_epoch": dict(self.skipped_per_epoch),
            "layout": self._layout(),
            "grouped": self.sampler.lengths is not None,  # data.group_by_length: another order
            "lengths": self.lengths_digest,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["layout"]) != self._layout():
            raise UserError(
                f"data position was saved for [samples, seed, micro_batch, grad_accum, dp] = {state['layout']}, "
                f"this run has {self._layout()}; resume with the same data and batch layout"
            )
        grouped = self.sampler.lengths is not None
        if state.get("grouped", grouped) != grouped:  # (checkpoints before this key: not checked)
            raise UserError(f"data position was saved with data.group_by_length: {str(not grouped).lower()}, this "
                            f"run has {str(grouped).lower()}; resume with the setting it was saved with (the order "
                            f"differs)")
        if grouped and state.get("lengths", self.lengths_digest) != self.lengths_digest:
            raise UserError("data position was saved for samples of other lengths: this is not the dataset it was "
                            "saved with; resume with that data, or to go on with other data `runner export` the "
                            "checkpoint and train from it (model.path) in a new output.dir")
        self.epoch, self.position = state["epoch"], state["position"]
        # this DP rank's own skip counts, where the trainer saved every rank's (runner.train.data_state)
        own = state["skipped_by_dp_rank"][self.sampler.dp_rank] if "skipped_by_dp_rank" in state else state
        self.skipped = Counter(own["skipped"])
        self.skipped_per_epoch = {int(k): v for k, v in own["skipped_per_epoch"].items()}
        self._iter = None
