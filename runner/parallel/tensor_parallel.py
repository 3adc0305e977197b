"""Megatron-style tensor parallelism: the autograd ops and the layers built on them.

The conjugate pairs: `copy_to_group` (identity forward, all-reduce backward) enters a parallel
region, `reduce_from_group` (all-reduce forward, identity backward) leaves it. Column-parallel
linears shard their outputs, row-parallel linears shard their inputs, so an attention block or an
MLP costs one all-reduce forward and one backward.

Sequence parallelism (Megatron's, `parallel.sequence_parallel`) splits each all-reduce in two around
the per-token work: `reduce_scatter_seq` leaves a block with each rank holding its slice of the
sequence, the norms and residual adds run on that slice only, and `gather_seq` enters the next block
(all-gather forward, reduce-scatter backward). Same bytes on the wire, 1/tp of the token-wise work and
of the activations between blocks (and between pipeline stages).

Every sharded parameter records how it was cut (`tp_cuts`, `tp_replicas`; `mark_cuts`),
which is what checkpoint loading slices by and what gathering for export or tests undoes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from runner.errors import UserError


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group=group)


def _coords(group) -> tuple[int, int]:
    """(size, this rank's index) of a TP group; (1, 0) without one."""
    size = _group_size(group)
    return size, 0 if size == 1 else dist.get_rank(group=group)


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group=group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        size = dist.get_world_size(group=ctx.group)
        rank = dist.get_rank(group=ctx.group)
        return grad.chunk(size, dim=-1)[rank].contiguous(), None


def _check_slices(x: torch.Tensor, size: int) -> None:
    if x.shape[1] % size:
        raise UserError(f"sequence parallelism: a micro-batch of {x.shape[1]} tokens does not split into "
                        f"tp={size} equal slices; pad every micro-batch to a multiple of {size} "
                        f"(data.pad_to_multiple_of, data.max_length, data.buckets)")


def _all_gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    """[B, S/tp, …] slices → [B, S, …], rank order; the collective runs on the sequence-first view
    (no copy at micro-batch size 1)."""
    x = x.transpose(0, 1).contiguous()
    out = x.new_empty((x.shape[0] * _group_size(group), *x.shape[1:]))
    dist.all_gather_into_tensor(out, x, group=group)
    return out.transpose(0, 1).contiguous()


def _reduce_scatter_seq(x: torch.Tensor, group) -> torch.Tensor:
    """Sum [B, S, …] over the group and keep this rank's [B, S/tp, …] slice."""
    size = _group_size(group)
    _check_slices(x, size)
    x = x.transpose(0, 1).contiguous()
    out = x.new_empty((x.shape[0] // size, *x.shape[1:]))
    dist.reduce_scatter_tensor(out, x, group=group)
    return out.transpose(0, 1).contiguous()


def _split_seq(x: torch.Tensor, group) -> torch.Tensor:
    size, rank = _coords(group)
    _check_slices(x, size)
    return x.chunk(size, dim=1)[rank].contiguous()


def _sequence_op(name: str, forward: Callable, backward: Callable) -> type[torch.autograd.Function]:
    """An autograd op of the sequence-parallel conjugate pairs: `forward` on the way in, `backward`
    on the gradient (split ↔ gather, gather ↔ reduce-scatter, reduce-scatter ↔ gather)."""

    def fwd(ctx, x, group):
        ctx.group = group
        return forward(x, group)

    def bwd(ctx, grad):
        return backward(grad, ctx.group), None

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})


_GatherSeq = _sequence_op("_GatherSeq", _all_gather_seq, _reduce_scatter_seq)
_ReduceScatterSeq = _sequence_op("_ReduceScatterSeq", _reduce_scatter_seq, _all_gather_seq)
_SplitSeq = _sequence_op("_SplitSeq", _split_seq, _all_gather_seq)


def gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    """Sequence slices → the whole sequence (all-gather forward, reduce-scatter backward): enter a
    parallel region under sequence parallelism, where `copy_to_group` would otherwise."""
    return x if _group_size(group) == 1 else _GatherSeq.apply(x, group)


def reduce_scatter_seq(x: torch.Tensor, group) -> torch.Tensor:
    """Partial sums → this rank's sequence slice of their total (reduce-scatter forward, all-gather
    backward): leave a parallel region under sequence parallelism, where `reduce_from_group` would."""
    return x if _group_size(group) == 1 else _ReduceScatterSeq.apply(x, group)


def split_seq(x: torch.Tensor, group) -> torch.Tensor:
    """A tensor identical on every rank → this rank's sequence slice (backward: all-gather)."""
    return x if _group_size(group) == 1 else _SplitSeq.apply(x, group)


def copy_to_group(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward, gradient all-reduced over `group` backward (enter a parallel region)."""
    return x if _group_size(group) == 1 else _CopyToGroup.apply(x, group)


def reduce_from_group(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce forward, identity backward (leave a parallel region)."""
    return x if _group_size(group) == 1 else _ReduceFromGroup.apply(x, group)


def gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate the shards of the last dimension; backward keeps this rank's slice."""
    return x if _group_size(group) == 1 else _GatherLastDim.apply(x, group)


def sum_grad_over(param: nn.Parameter, group) -> None:
    """Mark a parameter whose copies on the ranks of `group` each get only part of its gradient (a
    scale shared by heads split over TP, a norm fed one slice of the sequence, KV heads replicated
    over ranks that see different query heads). The pipeline sums these gradients over `group` once
    per step, after the last micro-batch's backward (DeepSpeed's tied-gradient reduce: see
    `Gemma4Pipeline.get_tied_weights_and_groups`), instead of one all-reduce per use and micro-batch;
    the copies stay identical."""
    if _group_size(group) > 1:
        param.grad_sum_group = group


# One cut of a sharded parameter: (dim, shards, blocks). The full tensor's `dim` is cut into `shards`
# equal parts; with `blocks` > 1 it is first viewed as that many equal blocks along `dim` (a fused
# [gate; up] projection) and each block is cut, a shard being its part of every block, in order.
Cut = tuple[int, int, int]


def mark_cuts(param: nn.Parameter, cuts: Sequence[Cut], tp: int, tp_rank: int, replicas: int = 1) -> None:
    """Record how `param` was cut from the full tensor (what loading slices and gathering undoes).

    `cuts=()`: replicated on every TP rank. Otherwise the distinct shards are the product of the cuts'
    `shards` (tp / replicas of them), the TP ranks laid over the cuts row-major (the first cut varies
    slowest) and `replicas` consecutive TP ranks holding the same shard (KV heads fewer than tp). One
    cut is Megatron's column/row split; experts cut two dims (experts over EP ranks, each expert's
    intermediate width over the expert-TP ranks). DeepSpeed's gradient-norm code counts a parameter
    on every rank that marks it `tensor_model_parallel` (and replicated ones on one rank only), so each
    distinct shard is marked on exactly one rank of its replica group.
    """
    cuts = tuple(tuple(c) for c in cuts)
    shards = math.prod(c[1] for c in cuts)
    if cuts and shards * replicas != tp:
        raise ValueError(f"cuts {cuts} x {replicas} replicas do not cover tp={tp}")
    param.tp_cuts = cuts
    param.tp_dim = cuts[0][0] if cuts else None  # None: replicated (what most callers ask)
    param.tp_shards = shards if cuts else 1
    param.tp_index = tp_rank // replicas if cuts else 0
    param.tp_replicas = replicas if cuts else tp
    param.tensor_model_parallel = bool(cuts) and tp > 1 and tp_rank % replicas == 0


def mark_sharded(param: nn.Parameter, dim: int | None, tp: int, tp_rank: int, replicas: int = 1) -> None:
    """`mark_cuts` with one cut along `dim` into tp/replicas shards (`dim=None`: replicated)."""
    mark_cuts(param, () if dim is None else ((dim, tp // replicas, 1),), tp, tp_rank, replicas)


def copy_sharding(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Give `dst` (e.g. a gradient) the cut recorded on `src`; returns `dst`."""
    for attr in ("tp_cuts", "tp_dim", "tp_shards", "tp_index", "tp_replicas"):
        setattr(dst, attr, getattr(src, attr))
    return dst


class LoraDropout(nn.Module):
    """PEFT's `lora_dropout` on this rank's adapter input, with one mask for the whole input.

    The noise is drawn as `nn.Dropout` draws it on CPU (`bernoulli_(1 - p)` on a tensor like the input,
    divided by 1 - p, from the default generator of the input's device), but always at the full input
    width and then cut to this rank's `columns` (row-parallel inputs are sharded by columns). So every TP
    rank, seeded alike (`runner.lora.seed_dropout`), drops the same elements of a replicated input and
    its own slice of one mask of a sharded one: the update is the tp-1 update, whatever the layout.
    Activation-checkpoint recompute restores the generator's state, so it draws the same mask again."""

    def __init__(self, p: float, full_features: int, columns: slice | None = None) -> None:
        super().__init__()
        self.p, self.full_features, self.columns = p, full_features, columns

    def noise(self, x: torch.Tensor) -> torch.Tensor:
        """0 or 1 / (1 - p) per element of the full-width input `x` stands for."""
        shape = (*x.shape[:-1], self.full_features)
        return torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1 - self.p).div_(1 - self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not self.p:
            return x
        noise = self.noise(x)
        return x * (noise if self.columns is None else noise[..., self.columns].contiguous())

    def extra_repr(self) -> str:
        return f"p={self.p}, full_features={self.full_features}, columns={self.columns}"


def add_lora_update(linear: nn.Module, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`out + lora_B(lora_A(dropout(x))) * scaling`, PEFT's update, with the second product, the scaling
    and the sum in one GEMM (addmm, alpha = scaling): no tokens × out_features intermediate is written,
    scaled and added in forward, and backward scales only the rank-wide products, not the output's
    gradient."""
    h = linear.lora_A(linear.lora_dropout(x))
    flat = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), linear.lora_B.weight.t(),
                       alpha=linear.lora_scaling)
    return flat.view(out.shape)


class _ParallelLinear(nn.Module):
    """What the column- and row-parallel linears share: nn.Linear's initialization of the shard
    (checkpoint loading overwrites it; a model built without weights still trains sanely), and an
    optional LoRA update (`add_lora`), cut by each subclass's `_shard_lora` so that it needs no
    collective of its own."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    in_features: int
    out_features: int
    tp_group: object

    def __init__(self) -> None:
        super().__init__()
        self.lora_A: nn.Linear | None = None
        self.lora_B: nn.Linear | None = None

    def reset_parameters(self) -> None:
        if self.weight.device.type == "meta":
            return
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def add_lora(self, rank: int, scaling: float, dropout: float) -> None:
        """Add PEFT's LoRA update `lora_B(lora_A(dropout(x))) * scaling` (PEFT's names: `lora_A.weight` is
        rank × in, `lora_B.weight` out × rank), on this rank's shard; zeros until the caller fills them."""
        kw = dict(bias=False, device=self.weight.device, dtype=self.weight.dtype)
        self.lora_A = nn.Linear(self.in_features, rank, **kw)
        self.lora_B = nn.Linear(rank, self.out_features, **kw)
        for p in (self.lora_A.weight, self.lora_B.weight):
            nn.init.zeros_(p)
        self.lora_scaling = scaling
        self._shard_lora(*_coords(self.tp_group))
        self.lora_dropout = self._lora_dropout(dropout) if dropout else nn.Identity()

    def _lora_dropout(self, p: float) -> LoraDropout:
        """Dropout on the whole (unsharded) input: column-parallel linears see it all."""
        return LoraDropout(p, self.in_features)

    def _shard_lora(self, tp: int, tp_rank: int) -> None:
        raise NotImplementedError

    def _with_lora(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`out` plus the LoRA update of this rank's input `x` (as PEFT adds it: after the base)."""
        return out if self.lora_A is None else add_lora_update(self, out, x)


class ColumnParallelLinear(_ParallelLinear):
    """y = x Wᵀ with W's output rows split over the TP group; the output stays sharded.

    `replicas > 1` splits the rows into tp/replicas shards, each held by `replicas` consecutive TP
    ranks (the rule for KV heads fewer than tp: rank r holds KV head r // (tp / num_kv_heads)); each
    replica's gradient covers its own query heads, so they are summed over `replica_group` once per
    step (`sum_grad_over`) and the replicas stay identical.

    `copy_input=False` when the caller enters the group once for several linears that read the same
    input (q/k/v, gate/up): their input gradients are summed locally and all-reduced once, instead of
    once per linear.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        tp_group,
        *,
        replicas: int = 1,
        replica_group=None,
        bias: bool = False,
        copy_input: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        tp, tp_rank = _coords(tp_group)
        shards = tp // replicas
        if out_features % shards:
            raise ValueError(f"out_features={out_features} not divisible into {shards} shards")
        self.in_features = in_features
        self.out_features = out_features // shards
        self.tp_group = tp_group
        self.replicas, self.replica_group = replicas, replica_group
        self.copy_input = copy_input
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features, device=device, dtype=dtype))
        mark_sharded(self.weight, 0, tp, tp_rank, replicas)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, device=device, dtype=dtype))
            mark_sharded(self.bias, 0, tp, tp_rank, replicas)
        else:
            self.register_parameter("bias", None)
        if replicas > 1:
            for p in self.parameters():
                sum_grad_over(p, replica_group)
        self.reset_parameters()

    def _shard_lora(self, tp: int, tp_rank: int) -> None:
        """A replicated, B split by output rows as the weight (replicas included): every rank's A
        gradient covers only its output rows, B's on KV replicas only its query heads; summed once per step."""
        mark_sharded(self.lora_A.weight, None, tp, tp_rank)
        sum_grad_over(self.lora_A.weight, self.tp_group)
        mark_sharded(self.lora_B.weight, 0, tp, tp_rank, self.replicas)
        if self.replicas > 1:
            sum_grad_over(self.lora_B.weight, self.replica_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.copy_input:
            x = copy_to_group(x, self.tp_group)
        return self._with_lora(F.linear(x, self.weight, self.bias), x)


class RowParallelLinear(_ParallelLinear):
    """y = x Wᵀ with W's input columns split over the TP group; the input arrives sharded (the
    output of a column-parallel layer) and the partial products are all-reduced, or under
    `sequence_parallel` reduce-scattered over the sequence."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        tp_group,
        *,
        bias: bool = False,
        sequence_parallel: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        tp, tp_rank = _coords(tp_group)
        if bias and sequence_parallel:
            raise UserError("parallel.sequence_parallel does not support this model's row-parallel biases "
                            "(attention_bias); set parallel.sequence_parallel: false")
        self.reduce = reduce_scatter_seq if sequence_parallel else reduce_from_group
        if in_features % tp:
            raise ValueError(f"in_features={in_features} not divisible by tp={tp}")
        self.in_features = in_features // tp
        self.out_features = out_features
        self.tp_group = tp_group
        self.weight = nn.Parameter(torch.empty(out_features, self.in_features, device=device, dtype=dtype))
        mark_sharded(self.weight, 1, tp, tp_rank)
        if bias:  # added once, after the reduction: replicated
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
            mark_sharded(self.bias, None, tp, tp_rank)
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def _shard_lora(self, tp: int, tp_rank: int) -> None:
        """A split by input columns as the weight, B replicated: the update's partial sums join the
        base's before its one reduction; B's gradient on each rank covers its input slice, summed once
        per step."""
        mark_sharded(self.lora_A.weight, 1, tp, tp_rank)
        mark_sharded(self.lora_B.weight, None, tp, tp_rank)
        sum_grad_over(self.lora_B.weight, self.tp_group)

    def _lora_dropout(self, p: float) -> LoraDropout:
        """Dropout on this rank's columns of the full input's mask."""
        shards, index = self.lora_A.weight.tp_shards, self.lora_A.weight.tp_index
        columns = slice(index * self.in_features, (index + 1) * self.in_features) if shards > 1 else None
        return LoraDropout(p, self.in_features * shards, columns)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.reduce(self._with_lora(F.linear(x, self.weight), x), self.tp_group)
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows over the TP group.

    Each rank looks up the ids in its row range, zeros the rest, and the all-reduce assembles the
    full embedding. `padding_idx` keeps nn.Embedding's rule (no gradient into the pad row), which
    transformers' Gemma4 embedding uses. The same weight serves as the tied LM head (`logits`), whose
    input arrives in sequence slices under `sequence_parallel`.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        tp_group,
        *,
        padding_idx: int | None = None,
        embed_scale: float = 1.0,
        sequence_parallel: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        tp, tp_rank = _coords(tp_group)
        self.sequence_parallel = sequence_parallel
        if num_embeddings % tp:
            raise ValueError(f"vocab size {num_embeddings} not divisible by tp={tp}")
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.tp_group = tp_group
        self.rows = num_embeddings // tp
        self.vocab_start = tp_rank * self.rows
        self.padding_idx = padding_idx
        self.embed_scale = embed_scale
        self.weight = nn.Parameter(torch.empty(self.rows, embedding_dim, device=device, dtype=dtype))
        mark_sharded(self.weight, 0, tp, tp_rank)
        if self.weight.device.type != "meta":
            nn.init.normal_(self.weight)

    def embed(self, input_ids: torch.Tensor, scatter_seq: bool = False) -> torch.Tensor:
        """Scaled token embeddings, full hidden size, identical on every TP rank; with `scatter_seq`
        only this rank's sequence slice (one reduce-scatter instead of an all-reduce and a split)."""
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.rows)
        local = local.masked_fill(outside, 0)
        pad = None
        if self.padding_idx is not None and 0 <= self.padding_idx - self.vocab_start < self.rows:
            pad = self.padding_idx - self.vocab_start
        out = F.embedding(local, self.weight, padding_idx=pad)
        if _group_size(self.tp_group) > 1:
            out = out.masked_fill(outside.unsqueeze(-1), 0.0)
            out = (reduce_scatter_seq if scatter_seq else reduce_from_group)(out, self.tp_group)
        # transformers casts the scale to the weight dtype first (sqrt(5376) in bf16 is 73.5)
        return out * torch.tensor(self.embed_scale, dtype=self.weight.dtype, device=out.device)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's vocabulary slice of the LM-head logits: (…, vocab / tp)."""
        enter = gather_seq if self.sequence_parallel else copy_to_group
        return F.linear(enter(hidden, self.tp_group), self.weight)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross entropy over vocab-sharded logits without gathering the vocabulary.

    Each rank contributes its max, its sum of exponentials and (for the rank owning the target) the
    target logit; three small all-reduces of (tokens,) tensors replace a (tokens, vocab) gather.
    """

    @staticmethod
    def forward(ctx, logits, target, vocab_start, group, ignore_index):
        logits = logits.float()
        logits_max = logits.max(dim=-1).values
        if _group_size(group) > 1:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)
        rows = logits.shape[-1]
        local = target - vocab_start
        ignored = target == ignore_index
        outside = (local < 0) | (local >= rows) | ignored
        local = local.masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        if _group_size(group) > 1:
            dist.all_reduce(target_logit, group=group)
            dist.all_reduce(sum_exp, group=group)
        loss = (sum_exp.log() - target_logit).masked_fill(ignored, 0.0)
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local, outside, ignored)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local, outside, ignored = ctx.saved_tensors
        grad = softmax
        hit = (~outside).to(grad.dtype)
        grad.scatter_add_(-1, local.unsqueeze(-1), -hit.unsqueeze(-1))
        grad.mul_((grad_loss * (~ignored).to(grad.dtype)).unsqueeze(-1))
        return grad, None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, vocab_start: int, group, ignore_index: int = -100
) -> torch.Tensor:
    """Per-token loss (0 where `target == ignore_index`) from this rank's logits slice
    `(…, vocab/tp)` starting at `vocab_start`; computed in fp32."""
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_start, group, ignore_index)


def _cut_indices(cuts: Sequence[Cut], shard: int) -> list[int]:
    """Shard number → this shard's index along each cut (row-major, the first cut slowest)."""
    indices = []
    for _, shards, _ in reversed(cuts):
        indices.append(shard % shards)
        shard //= shards
    return indices[::-1]


def join_shards(parts: Sequence[torch.Tensor], cuts: Sequence[Cut], replicas: int = 1) -> torch.Tensor:
    """The full tensor from every TP rank's shard (rank order): one copy per distinct shard, joined
    cut by cut from the innermost (the inverse of `take_shard`)."""
    parts = list(parts[::replicas])
    if not cuts:
        return parts[0]
    for dim, shards, blocks in reversed(cuts):
        groups = [parts[i:i + shards] for i in range(0, len(parts), shards)]
        parts = [torch.cat([torch.cat([p.chunk(blocks, dim)[b] for p in group], dim) for b in range(blocks)], dim)
                 for group in groups]
    return parts[0]


def gather_full(tensor: torch.Tensor, tp_group) -> torch.Tensor:
    """Reassemble the full tensor from the TP shards recorded by `mark_cuts` (collective over
    the TP group; replicated tensors are returned as they are)."""
    cuts = getattr(tensor, "tp_cuts", ())
    if not cuts or _group_size(tp_group) == 1:
        return tensor.detach()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group=tp_group))]
    dist.all_gather(parts, tensor.detach().contiguous(), group=tp_group)
    return join_shards(parts, cuts, tensor.tp_replicas)


def shard_shape(full_shape: Sequence[int], like: torch.Tensor) -> list[int]:
    """This rank's shard shape in a full tensor of `full_shape`, cut as recorded on `like`; ValueError when
    a dimension does not split into its shards (and blocks)."""
    shape = list(full_shape)
    for dim, shards, blocks in getattr(like, "tp_cuts", ()):
        size, rem = divmod(shape[dim], shards * blocks)
        if rem:
            raise ValueError(f"dim {dim} = {full_shape[dim]} does not split into {shards * blocks} shards")
        shape[dim] = size * blocks
    return shape


def shard_pieces(full_shape: Sequence[int], like: torch.Tensor) -> tuple[list[tuple[slice, ...]], int]:
    """The index tuples into a full tensor of `full_shape` whose results, concatenated along the
    returned dim, are this rank's shard (one piece unless a cut has blocks: a fused gate_up's gate
    and up rows). Basic slices only, so safetensors' lazy slices read just these bytes."""
    cuts = getattr(like, "tp_cuts", ())
    shard_shape(full_shape, like)  # the divisibility check
    pieces: list[list[slice]] = [[slice(None)] * len(full_shape)]
    cat_dim = 0
    for (dim, shards, blocks), index in zip(cuts, _cut_indices(cuts, getattr(like, "tp_index", 0))):
        block = full_shape[dim] // blocks
        size = block // shards
        if blocks > 1:
            cat_dim = dim
        pieces = [p[:dim] + [slice(b * block + index * size, b * block + (index + 1) * size)] + p[dim + 1:]
                  for p in pieces for b in range(blocks)]
    return [tuple(p) for p in pieces], cat_dim


def take_shard(full, like: torch.Tensor) -> torch.Tensor:
    """This rank's shard of `full` (a tensor or a safetensors slice of the full shape), cut as `like` records."""
    shape = list(full.get_shape()) if hasattr(full, "get_shape") else list(full.shape)
    pieces, dim = shard_pieces(shape, like)
    taken = [full[index] for index in pieces]
    return taken[0] if len(taken) == 1 else torch.cat(taken, dim)


def shard_index(full_shape: list[int], like: torch.Tensor) -> tuple[tuple[slice, ...], list[int]]:
    """(index, shape) of this rank's shard in a full tensor of `full_shape`, for cuts without blocks (one
    piece); ValueError when a dimension does not split into its shards."""
    pieces, _ = shard_pieces(full_shape, like)
    if len(pieces) != 1:
        raise ValueError("a blocked cut has several pieces: use take_shard")
    return pieces[0], shard_shape(full_shape, like)
