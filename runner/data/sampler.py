"""Which sample indices each data-parallel replica trains on, micro-batch by micro-batch.

The order is a pure function of (seed, epoch, dp_rank, dp_size) — never of the global rank — so every
TP rank and every pipeline stage of one DP replica computes the same micro-batches without talking to
each other (DeepSpeed's pipeline engine leaves data sharding to us). A position is just
(epoch, micro-batches consumed), which makes saving and resuming exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from runner.errors import UserError


class StepSampler:
    """Shuffles each epoch with `seed`, cuts it into global batches of micro_batch_size ×
    grad_accum_steps × dp_size samples (the incomplete tail is dropped, a different one each epoch),
    and deals each global batch's micro-batches round-robin over the DP ranks.

    With `keep_tail` (evaluation) the tail is kept as a last, partial global batch: its micro-batches
    hold fewer samples or none (the collator makes an empty one a row that adds nothing to the loss),
    so an eval pass sees every sample once, however small the split.

    With `lengths`, each window of `group_window_steps` global batches is sorted by length before
    being cut into micro-batches, whose order is then shuffled: micro-batches hold similar lengths
    (less padding) while steps still mix short and long ones. The set of samples per window is
    unchanged, and the token-weighted loss of a step does not depend on how it is split.
    """

    def __init__(
        self,
        num_samples: int,
        micro_batch_size: int,
        grad_accum_steps: int,
        dp_size: int = 1,
        dp_rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        lengths: Sequence[int] | None = None,
        group_window_steps: int = 8,
        keep_tail: bool = False,
    ) -> None:
        if min(micro_batch_size, grad_accum_steps, dp_size, group_window_steps) < 1:
            raise UserError("micro_batch_size, grad_accum_steps, dp size and group_window_steps must all be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise UserError(f"dp_rank {dp_rank} is outside [0, {dp_size})")
        if lengths is not None and len(lengths) != num_samples:
            raise UserError(f"got {len(lengths)} lengths for {num_samples} samples")
        self.num_samples = num_samples
        self.micro_batch_size = micro_batch_size
        self.grad_accum_steps = grad_accum_steps
        self.dp_size, self.dp_rank = dp_size, dp_rank
        self.seed, self.shuffle = seed, shuffle
        self.lengths = None if lengths is None else np.asarray(lengths)
        self.group_window_steps = group_window_steps
        self.keep_tail = keep_tail
        if self.steps_per_epoch == 0:
            raise UserError(
                f"the dataset has {num_samples} samples, fewer than one global batch "
                f"(micro_batch_size {micro_batch_size} × grad_accum_steps {grad_accum_steps} × dp {dp_size})"
                if num_samples else "the dataset has no samples"
            )

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.dp_size

    @property
    def steps_per_epoch(self) -> int:
        whole, tail = divmod(self.num_samples, self.global_batch_size)
        return whole + (self.keep_tail and tail > 0)

    @property
    def micro_batches_per_epoch(self) -> int:
        """Micro-batches this rank gets per epoch (grad_accum_steps per step)."""
        return self.steps_per_epoch * self.grad_accum_steps

    def epoch(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches (lists of sample indices) of `epoch`, in training order."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.num_samples) if self.shuffle else np.arange(self.num_samples)
        size = self.steps_per_epoch * self.global_batch_size
        order = np.concatenate([order, np.full(max(size - self.num_samples, 0), -1)])  # keep_tail: -1 = no sample
        per_step = self.grad_accum_steps * self.dp_size  # micro-batches in one global batch
        window = self.group_window_steps * self.global_batch_size
        mine: list[list[int]] = []
        for begin in range(0, size, window):
            block = order[begin : min(begin + window, size)]
            if self.lengths is not None:  # longest first, empty slots last
                block = block[np.argsort(-np.where(block >= 0, self.lengths[block], -1), kind="stable")]
            chunks = block.reshape(-1, self.micro_batch_size)
            if self.lengths is not None:
                chunks = chunks[rng.permutation(len(chunks))]
            for step in range(0, len(chunks), per_step):
                dealt = chunks[step + self.dp_rank : step + per_step : self.dp_size]
                mine.extend([i for i in c.tolist() if i >= 0] for c in dealt)
        return mine
