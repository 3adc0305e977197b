"""Gemma4's mixture-of-experts block (26B-A4B, `enable_moe_block`) inside the TP group of a stage.

transformers' decoder layer runs, beside the dense MLP, `router(residual)` (softmax over experts in
fp32, top-k, renormalised, times a per-expert scale) and `experts(pre_feedforward_layernorm_2(residual),
top_k_index, top_k_weights)`. The runner keeps that forward (`Gemma4DecoderLayerPipe`) and swaps the two
modules for the ones here.

Expert parallelism lives inside the TP group: the TP ranks of a stage already hold the same tokens
(under sequence parallelism once the block input is all-gathered), so tokens never move between
ranks. With `ep` dividing `tp`, TP rank r holds the num_experts / ep experts of EP rank r // (tp / ep),
each cut along its intermediate width over the tp / ep ranks of that EP group (Megatron's
expert-tensor-parallel size; ep = 1: every rank holds a 1/tp slice of every expert, ep = tp: whole
experts). Each rank runs its local experts on the tokens routed to them; the partial outputs join in
ONE all-reduce over TP (a reduce-scatter under sequence parallelism), as a row-parallel linear's do.
Expert weights are thus distinct per TP rank and replicated over DP, so DeepSpeed's ordinary DP
gradient all-reduce is the expert-data-parallel reduction: no DeepSpeed MoE machinery, no all-to-all.
EP carved out of DP (ep > tp, tokens dispatched by all-to-all between DP ranks) is not implemented: at
26B-A4B's size (128 experts of 3 × 704 × 2816) tp ≤ 8 already spreads the experts over a node's
GPUs, and it would need a dispatch with capacity or dropless padding the DP-replicated design avoids.

Gradients, parameter by parameter (partial = each rank sees only its local experts' share):
- experts (`gate_up_proj`, `down_proj`): distinct shards; the downstream gradient reaches every rank
  whole (the all-reduce's backward is the identity), so each shard's gradient is whole.
- router choice weights `top_k_weights`: their gradient is partial per rank (only local experts use
  them), so the router's output enters the TP group (`copy_to_group`: one all-reduce of the small
  tokens × top_k gradient backward; under sequence parallelism the router runs on this rank's slice
  and its outputs are all-gathered, the gradient reduce-scattered). After that the router's input
  gradient and its `proj` / `scale` / `per_expert_scale` gradients are whole — without sequence
  parallelism they are identical on every rank; under it each rank's cover its slice of the tokens and
  are summed over TP once per step (`sum_grad_over`, as the sequence-parallel norms are).
- `pre_feedforward_layernorm_2`: a block-input norm (`BlockInputRMSNorm`) feeding the experts: its
  output enters the group (backward: one all-reduce), so its scale's gradient is whole, or under
  sequence parallelism a slice's, summed over TP.
- `post_feedforward_layernorm_1/_2`: after the reductions, per token: whole, or slices summed under
  sequence parallelism (`SequenceSliceRMSNorm`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from transformers import Gemma4Config
from transformers.activations import ACT2FN

from runner.compat import Gemma4TextRouter
from runner.errors import UserError
from runner.parallel.tensor_parallel import (
    copy_to_group,
    gather_seq,
    mark_cuts,
    mark_sharded,
    reduce_from_group,
    reduce_scatter_seq,
    sum_grad_over,
)
from runner.parallel.topology import ParallelDims, ParallelState, comm_device


def is_moe(config: Gemma4Config) -> bool:
    """Whether the model's decoder layers carry the mixture-of-experts block."""
    return bool(getattr(config.get_text_config(), "enable_moe_block", False))


def validate_moe_layout(config: Gemma4Config, dims: ParallelDims) -> None:
    """One clear line when the experts cannot be cut at this tp / ep."""
    if not is_moe(config):
        if dims.ep is not None and dims.ep > 1:
            raise UserError(f"parallel.ep={dims.ep} needs a mixture-of-experts model (text_config.enable_moe_block); "
                            f"this model is dense: remove parallel.ep")
        return
    tc = config.get_text_config()
    ep, etp = dims.ep_size, dims.etp_size
    if tc.num_experts % ep:
        raise UserError(f"text_config.num_experts={tc.num_experts} is not divisible by parallel.ep={ep}; choose ep "
                        f"dividing {tc.num_experts} (and tp)")
    if tc.moe_intermediate_size % etp:
        raise UserError(f"text_config.moe_intermediate_size={tc.moe_intermediate_size} is not divisible by "
                        f"tp / ep = {dims.tp} / {ep} = {etp} (each expert's width is split over that many ranks); "
                        f"raise parallel.ep")


def _gather_tokens(x: torch.Tensor, group) -> torch.Tensor:
    """Flat [tokens/tp, …] slices → [tokens, …] in rank order (backward: reduce-scatter)."""
    return gather_seq(x.unsqueeze(0), group).squeeze(0)


def _scatter_tokens(x: torch.Tensor, group) -> torch.Tensor:
    """Flat partial sums [tokens, …] → this rank's [tokens/tp, …] slice of their total."""
    return reduce_scatter_seq(x.unsqueeze(0), group).squeeze(0)


class Gemma4MoERouter(Gemma4TextRouter):
    """transformers' router, replicated on every TP rank, whose outputs enter the TP group (see the
    module docstring): every rank routes every token of the block identically.

    It also keeps the layer's expert load and Switch-style load-balancing loss (`RouterBalance`): the
    decoder layer hands it the real-token mask of the micro-batch (`real_tokens`) before each forward."""

    def __init__(self, config: Gemma4Config, ps: ParallelState, layer_idx: int) -> None:
        super().__init__(config.get_text_config())
        self.tp_group = ps.tp_group
        self.tp, self.tp_rank = ps.dims.tp, ps.tp_rank
        self.sequence_parallel = ps.dims.sequence_parallel
        self.layer_idx = layer_idx
        for p in self.parameters():
            mark_sharded(p, None, ps.dims.tp, ps.tp_rank)
            if self.sequence_parallel:
                sum_grad_over(p, ps.tp_group)
        self.real_tokens: torch.Tensor | None = None  # [batch, whole sequence] bool, set by the decoder layer
        self.balance_scale = 0.0  # the loss's gradient per micro-batch (`set_balance_scale`)
        # since the last `router_stats`, on the device (no host sync per layer): routed slots per expert, and
        # this rank's share of the balance losses
        self.load: torch.Tensor | float = 0.0
        self.balance_sum: torch.Tensor | float = 0.0

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        probabilities, top_k_weights, top_k_index = super().forward(hidden_states)
        if self.sequence_parallel:
            top_k_weights, top_k_index = (_gather_tokens(top_k_weights, self.tp_group),
                                          _gather_tokens(top_k_index, self.tp_group))
        else:
            top_k_weights = copy_to_group(top_k_weights, self.tp_group)
        if torch.is_grad_enabled() and top_k_weights.requires_grad and self.real_tokens is not None:
            load, balance = self.balance(probabilities, top_k_index)
            top_k_weights = RouterBalance.apply(top_k_weights, balance, load, self)
        return probabilities, top_k_weights, top_k_index

    def balance(self, probabilities: torch.Tensor, top_k_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(routed slots per expert, this rank's part of the balance loss) over the micro-batch's real tokens:
        transformers' `load_balancing_loss_func` (Mixtral) of this layer with the attention mask,
        E · Σ_i (slots_i / T) · (Σ_t p_ti / T), T real tokens. Under sequence parallelism `probabilities`
        cover this rank's slice and `top_k_index` every token (gathered in rank order), so the part is
        linear in the slice and the TP ranks' parts sum to the loss."""
        real = self.real_tokens
        if self.sequence_parallel:  # this rank's slice, and every slice in the gathered order
            mine = real.chunk(self.tp, dim=1)[self.tp_rank].reshape(-1)
            real = real.reshape(real.shape[0], self.tp, -1).transpose(0, 1).reshape(-1)
        else:
            real = mine = real.reshape(-1)
        num_experts, dtype = probabilities.shape[-1], probabilities.dtype  # no host sync: masks as weights
        load = torch.zeros(num_experts, dtype=dtype, device=probabilities.device).index_add_(
            0, top_k_index.flatten(), real.to(dtype).repeat_interleave(top_k_index.shape[-1]))
        tokens = real.sum().clamp_min(1).to(dtype)
        return load, num_experts * (load * (probabilities * mine[:, None]).sum(0)).sum() / tokens**2


class RouterBalance(torch.autograd.Function):
    """Identity on the router's choice weights whose backward adds the load-balancing loss's gradient,
    `balance_scale` per micro-batch (Megatron's MoEAuxLossAutoScaler: the loss of a layer on any pipeline
    stage joins the objective without travelling to the last stage), and records the layer's load. Both
    happen in backward, which runs once per micro-batch also when activation checkpointing runs the
    forward twice."""

    @staticmethod
    def forward(ctx, top_k_weights: torch.Tensor, balance: torch.Tensor, load: torch.Tensor,
                router: Gemma4MoERouter) -> torch.Tensor:
        ctx.router, ctx.load, ctx.value = router, load, balance.detach()
        return top_k_weights.view_as(top_k_weights)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        router = ctx.router
        router.load = router.load + ctx.load.double()
        router.balance_sum = router.balance_sum + ctx.value.double()
        scale = router.balance_scale
        return grad, (torch.full_like(ctx.value, scale) if scale else None), None, None


def moe_routers(model: nn.Module) -> list[Gemma4MoERouter]:
    return [m for m in model.modules() if isinstance(m, Gemma4MoERouter)]


def set_balance_scale(model: nn.Module, coef: float, dp: int, global_micro_batches: int) -> None:
    """Before a step: `coef` × the mean over the MoE layers and the global batch's micro-batches of each
    layer's balance loss joins the objective. DeepSpeed averages gradients over DP, so each micro-batch's
    gradient is scaled by coef · dp / (layers · micro-batches)."""
    routers = moe_routers(model)
    if routers:
        layers = routers[0].config.num_hidden_layers
        for router in routers:
            router.balance_scale = coef * dp / (layers * global_micro_batches)


def router_stats(model: nn.Module, ps: ParallelState, config: Gemma4Config, global_micro_batches: int
                 ) -> dict[str, float]:
    """The step's expert load over every MoE layer of every stage and DP replica, in one all-reduce, and
    resets it (every rank calls it after every step): `moe_balance_loss`, the mean over layers and
    micro-batches of transformers' balance loss (top_k when perfectly balanced); `moe_load_max` /
    `moe_load_min`, an expert's share of its layer's routed slots × the number of experts (1 = even);
    `moe_idle_experts`, (layer, expert) pairs no real token was routed to."""
    num_layers, num_experts = config.get_text_config().num_hidden_layers, config.get_text_config().num_experts
    table = torch.zeros(num_layers * num_experts + 1, dtype=torch.float64, device=comm_device())
    replicas = 1 if ps.dims.sequence_parallel else ps.dims.tp  # TP ranks hold equal loads and losses
    for router in moe_routers(model):
        table[router.layer_idx * num_experts:(router.layer_idx + 1) * num_experts] += router.load / ps.dims.tp
        table[-1] += router.balance_sum / replicas
        router.load = router.balance_sum = 0.0
    dist.all_reduce(table)
    load = table[:-1].view(num_layers, num_experts).cpu()
    share = load * num_experts / load.sum(1, keepdim=True).clamp_min(1)
    return {"moe_balance_loss": float(table[-1]) / (num_layers * global_micro_batches),
            "moe_load_max": float(share.max()), "moe_load_min": float(share.min()),
            "moe_idle_experts": int((load == 0).sum())}


class Gemma4MoEExperts(nn.Module):
    """This TP rank's slice of transformers' `Gemma4TextExperts`: its EP group's experts, each cut to its
    expert-TP share of the intermediate width (fused gate_up [E_local, 2·I_local, H], gate rows then up
    rows; down [E_local, H, I_local]). Same parameter names and math as transformers'; the output is
    this rank's partial sum, reduced over TP here."""

    def __init__(self, config: Gemma4Config, ps: ParallelState) -> None:
        super().__init__()
        tc = config.get_text_config()
        tp, ep, etp = ps.dims.tp, ps.dims.ep_size, ps.dims.etp_size
        self.num_experts = tc.num_experts
        self.num_local = tc.num_experts // ep
        self.first = (ps.tp_rank // etp) * self.num_local  # global id of the first local expert
        hidden, inter = tc.hidden_size, tc.moe_intermediate_size // etp
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_local, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(self.num_local, hidden, inter))
        mark_cuts(self.gate_up_proj, ((0, ep, 1), (1, etp, 2)), tp, ps.tp_rank)
        mark_cuts(self.down_proj, ((0, ep, 1), (2, etp, 1)), tp, ps.tp_rank)
        for p in self.parameters():  # transformers' init scale; checkpoint loading overwrites them
            nn.init.normal_(p, std=tc.initializer_range)
        self.act_fn = ACT2FN[tc.hidden_activation]
        self.tp_group = ps.tp_group
        self.reduce = _scatter_tokens if ps.dims.sequence_parallel else reduce_from_group
        # torch's grouped GEMM (one kernel for all local experts) where it exists and pays: CUDA, bf16
        self.grouped_mm = hasattr(torch, "_grouped_mm")

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        grouped = self.grouped_mm and hidden_states.is_cuda and hidden_states.dtype == torch.bfloat16
        partial = (self.forward_grouped if grouped else self.forward_loop)(hidden_states, top_k_index, top_k_weights)
        return self.reduce(partial, self.tp_group)

    def _expert_ffn(self, x: torch.Tensor, e: int) -> torch.Tensor:
        gate, up = nn.functional.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return nn.functional.linear(self.act_fn(gate) * up, self.down_proj[e])

    def forward_loop(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor) -> torch.Tensor:
        """transformers' loop over the experts a token chose, local experts only (what CPU runs)."""
        out = torch.zeros_like(hidden_states)
        local = top_k_index - self.first
        with torch.no_grad():
            hit = torch.unique(local[(local >= 0) & (local < self.num_local)]).tolist()
        for e in hit:
            token_idx, k_pos = torch.where(local == e)
            y = self._expert_ffn(hidden_states[token_idx], e) * top_k_weights[token_idx, k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out

    def forward_grouped(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor) -> torch.Tensor:
        """The same sum with the (token, choice) pairs sorted by local expert and one `torch._grouped_mm`
        per projection (the dims must be multiples of 16 bytes, as the 26B-A4B's are)."""
        local = (top_k_index - self.first).flatten()
        mine = ((local >= 0) & (local < self.num_local)).nonzero().squeeze(-1)
        order = mine[torch.argsort(local[mine], stable=True)]
        token_idx = order // top_k_index.shape[1]
        counts = torch.bincount(local[order], minlength=self.num_local)
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        h = torch._grouped_mm(hidden_states[token_idx], self.gate_up_proj.transpose(1, 2), offs=offs)
        gate, up = h.chunk(2, dim=-1)
        y = torch._grouped_mm(self.act_fn(gate) * up, self.down_proj.transpose(1, 2), offs=offs)
        y = y * top_k_weights.flatten()[order, None]
        return torch.zeros_like(hidden_states).index_add_(0, token_idx, y.to(hidden_states.dtype))


def shard_moe_block(layer: nn.Module, config: Gemma4Config, ps: ParallelState) -> None:
    """Swap a (meta) transformers decoder layer's router and experts for the TP/EP ones above."""
    layer.router = Gemma4MoERouter(config, ps, layer.layer_idx)
    layer.experts = Gemma4MoEExperts(config, ps)

