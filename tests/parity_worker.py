"""One rank of a parity run: build the TP×PP×DP pipeline from an HF checkpoint, run optimizer steps
on synthetic global batches, and write the loss, the TP-gathered gradients (HF names) and, at the
end, the tied embedding/head weights. Launched by tests through torchrun on CPU (gloo)."""

from __future__ import annotations

import collections
import json
import os

import torch

torch.set_num_threads(1)

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm  # noqa: E402

from runner.config import LORA_TARGETS  # noqa: E402
from runner.lora import adapted_linears  # noqa: E402
from runner.models.gemma4.moe import is_moe, router_stats  # noqa: E402
from runner.models.gemma4.stages import FusedRMSNorm, Gemma4DecoderLayerPipe, Gemma4FinalNorm  # noqa: E402
from runner.parallel.tensor_parallel import copy_sharding, gather_full  # noqa: E402

from synthetic import apply_peft_adapter, ds_config, global_batch, load_pipeline, train_step, worker_parser  # noqa: E402


class CapturingAdamW(torch.optim.AdamW):
    """AdamW that snapshots the gradients DeepSpeed hands it (after DP and tied all-reduces)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.captured: list[dict[int, torch.Tensor]] = []

    def step(self, closure=None):
        self.captured.append({id(p): p.grad.detach().clone() for g in self.param_groups for p in g["params"]
                              if p.grad is not None})
        return super().step(closure)


def check_dropout_masks(drawn: dict[str, list[torch.Tensor]], ps, gas: int, checkpointing: bool
                        ) -> dict[str, list[torch.Tensor]]:
    """One step's LoRA dropout masks, one per micro-batch and module, after checking them: a recompute
    draws its forward's mask again; every TP rank drew the same masks, from one seed; DP replicas seeded their own."""
    step: dict[str, list[torch.Tensor]] = {}
    for name, calls in sorted(drawn.items()):
        unique: list[torch.Tensor] = []
        for mask in calls:  # forwards come in micro-batch order; a recompute repeats an earlier one
            if not any(mask.shape == u.shape and torch.equal(mask, u) for u in unique):
                unique.append(mask)
        # the vision tower runs on the micro-batches with images only, and is never recomputed
        want = len(calls) if ".vision_tower." in name else gas
        assert len(unique) == want and len(calls) in (want, 2 * want if checkpointing else want), (name, len(unique), len(calls))
        for mask in unique:
            copies = [torch.empty_like(mask, dtype=torch.uint8) for _ in range(ps.dims.tp)]
            dist.all_gather(copies, mask.to(torch.uint8), group=ps.tp_group)
            assert all(torch.equal(c.bool(), mask) for c in copies), f"{name}: TP ranks dropped different elements"
        step[name] = unique
    seed = torch.tensor([torch.initial_seed()], dtype=torch.float64)  # the step's seed: one per replica and stage
    for group, size, same in ((ps.tp_group, ps.dims.tp, True), (ps.dp_group, ps.dims.dp, False)):
        seeds = [torch.empty_like(seed) for _ in range(size)]
        dist.all_gather(seeds, seed, group=group)
        assert size == 1 or (len(set(float(s) for s in seeds)) == (1 if same else size)), (same, seeds)
    return step


def main() -> None:
    ap = worker_parser()
    ap.add_argument("--batches", default="text,image", help="one global batch kind per optimizer step")
    ap.add_argument("--lr", type=float, default=0.0)
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--recompute-num-layers", type=int, default=None, help="checkpoint only a stage's first N layers")
    ap.add_argument("--no-fused-rms-norm", action="store_true")
    ap.add_argument("--freeze", default="", help="comma list of embeddings,vision_tower,language_model")
    ap.add_argument("--stage-layers", default="", help="comma list: decoder layers per stage (empty: even split)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--lora", default="", help="LoRA on the frozen base, started from this PEFT adapter directory")
    ap.add_argument("--dp-counts", default="", help="comma list: micro-batches per DP rank of every step "
                    "(empty: an even split), as packing gives replicas different counts")
    ap.add_argument("--lora-dropout", type=float, default=0.0, help="lora.dropout; the masks drawn are saved "
                    "(masks_stage{pp}_dp{dp}.pt) for the reference to replay")
    ap.add_argument("--aux-loss-coef", type=float, default=0.0, help="moe.aux_loss_coef; the router statistics "
                    "of every step (`router_stats`) are saved with the losses")
    ap.add_argument("--ds-config", default="", help="a GPU config of ds_configs/ instead of the fp32 one (bf16 model); "
                    "only the once-per-step sums of partial gradients are captured (DeepSpeed steps flat copies), "
                    "replicated weights are compared across TP ranks after the steps")
    args = ap.parse_args()

    counts = [int(n) for n in args.stage_layers.split(",") if n]
    checkpointing = args.activation_checkpointing or args.recompute_num_layers is not None
    ps, config, model = load_pipeline(args, activation_checkpoint_interval=int(checkpointing),
                                      fused_rms_norm=not args.no_fused_rms_norm, stage_layers=counts,
                                      recompute_num_layers=args.recompute_num_layers)
    decoder = [f for f in model.forward_funcs if isinstance(f, Gemma4DecoderLayerPipe)]
    forwards = collections.Counter()  # forward calls per decoder layer: recompute runs one again
    lengths = collections.Counter()  # (hidden tokens, whole sequence) per decoder-layer call
    for layer in decoder:
        layer.register_forward_hook(lambda module, inputs, output: forwards.update([id(module)]))
        layer.register_forward_hook(lambda module, inputs, output: lengths.update([(inputs[0][0].shape[1],
                                                                                     inputs[0][2].shape[1])]))
    if counts:  # this stage holds exactly its share, in order
        first = sum(counts[:ps.pp_rank])
        assert model.decoder_layers() == list(range(first, first + counts[ps.pp_rank])), model.decoder_layers()
    # the choice reaches every RMSNorm of the language model (else the unfused case would test nothing)
    norms = [m for layer in model.modules() if isinstance(layer, (Gemma4DecoderLayerPipe, Gemma4FinalNorm))
             for m in layer.modules() if isinstance(m, Gemma4RMSNorm)]
    fused = {getattr(m, "fused", isinstance(m, FusedRMSNorm)) for m in norms}  # HeadShared/FinalNorm carry a flag
    assert norms and fused == {not args.no_fused_rms_norm}, fused
    model.freeze(**{part: True for part in args.freeze.split(",") if part})
    base: dict[str, torch.Tensor] = {}
    if args.lora:  # the runner's LoRA started from a PEFT adapter directory; the base must not move
        assert apply_peft_adapter(model, args.ckpt, args.lora, args.lora_dropout)
    drawn: dict[str, list[torch.Tensor]] = collections.defaultdict(list)  # LoRA dropout: keep masks, full width
    for name, linear in adapted_linears(model, list(LORA_TARGETS), model.lora["config"]["vision_tower"]
                                        ) if args.lora_dropout else ():
        def noise(x, name=name, draw=linear.lora_dropout.noise):
            out = draw(x)
            drawn[name].append(out.ne(0))
            return out
        linear.lora_dropout.noise = noise

    kinds = args.batches.split(",")
    multiple = args.tp if args.sequence_parallel else 1  # sequences split into tp slices
    n_micro = len(global_batch(config, kinds[0]))
    gas = n_micro // args.dp
    ds = ds_config(gas, args.dp)
    if args.ds_config:
        batch_keys = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping")
        ds = {**json.load(open(args.ds_config)), **{k: ds[k] for k in batch_keys}}
        model.to(torch.bfloat16)
    if args.lora:
        base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = (torch.optim.AdamW if args.ds_config else CapturingAdamW)(params, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    summed: dict[int, torch.Tensor] = {}
    if args.ds_config:  # read the summed partial gradients where the engine hands gradients to its DP reduce
        partial = [w for w, _ in model.get_tied_weights_and_groups() if hasattr(w, "grad_sum_group")]

        def capture(reduce):
            def wrapped(*a, **kw):
                summed.update({id(w): (w._hp_grad if engine.using_bf16_optimizer else w.grad).detach().float()
                               .view_as(w).clone() for w in partial})
                return reduce(*a, **kw)
            return wrapped

        engine._bf16_reduce_grads = capture(engine._bf16_reduce_grads)  # BF16 optimizer
        engine.allreduce_gradients = capture(engine.allreduce_gradients)  # ZeRO-1 with bf16 gradients

    result: dict = {"losses": [], "grads": []}
    masks: list[dict[str, list[torch.Tensor]]] = []  # per step: module -> this DP rank's masks, one per micro-batch
    micro_batches = 0  # this DP rank's, all steps (packed steps differ in count)
    for kind in kinds:
        batch = global_batch(config, kind, multiple=multiple)
        dp_counts = [int(n) for n in args.dp_counts.split(",") if n] or None
        micro_batches += dp_counts[ps.dp_rank] if dp_counts else len(batch) // args.dp
        result["losses"].append(train_step(engine, model, ps, batch, len(batch) // args.dp, step=len(result["losses"]),
                                           dp_counts=dp_counts, balance_coef=args.aux_loss_coef))
        if is_moe(config):
            result.setdefault("routing", []).append(router_stats(model, ps, config, len(batch)))
        if args.lora_dropout:
            masks.append(check_dropout_masks(drawn, ps, len(batch) // args.dp, checkpointing))
            drawn.clear()
        grads = dict(summed) if args.ds_config else optimizer.captured[-1]
        summed.clear()
        step_grads = {}
        for name, tensor, _ in model.hf_tensors():
            if isinstance(tensor, torch.nn.Parameter) and id(tensor) in grads:
                g = copy_sharding(tensor, grads[id(tensor)])
                step_grads[name] = gather_full(g, ps.tp_group)
                if tensor.tp_dim is None and ps.dims.tp > 1:  # replicated: every TP rank must hold the same gradient
                    copies = [torch.empty_like(g) for _ in range(ps.dims.tp)]
                    dist.all_gather(copies, g.contiguous(), group=ps.tp_group)
                    assert all(torch.equal(c, g) for c in copies), f"{name}: TP ranks disagree on a replicated gradient"
        result["grads"].append(step_grads)
    recomputed = len(decoder) if args.recompute_num_layers is None else args.recompute_num_layers
    want = [micro_batches * (2 if checkpointing and i < recomputed else 1) for i in range(len(decoder))]
    assert [forwards[id(layer)] for layer in decoder] == want, ([forwards[id(layer)] for layer in decoder], want)
    slices = args.tp if args.sequence_parallel else 1  # sequence parallelism: each layer sees 1/tp of it
    assert decoder and all(tokens * slices == seq for tokens, seq in lengths), lengths
    for name, tensor, _ in model.hf_tensors():  # replicated weights: one value on every TP rank after the steps
        if isinstance(tensor, torch.nn.Parameter) and tensor.tp_dim is None and ps.dims.tp > 1:
            copies = [torch.empty_like(tensor) for _ in range(ps.dims.tp)]
            dist.all_gather(copies, tensor.detach().contiguous(), group=ps.tp_group)
            assert all(torch.equal(c, copies[0]) for c in copies), f"{name}: TP copies diverged"
    for name, p in model.named_parameters():  # a LoRA run's base: bit-unchanged, never a gradient
        if name in base:
            assert p.grad is None and torch.equal(p, base[name]), f"{name}: frozen base weight changed or got a grad"
    embed = model.tied_modules["embed"] if "embed" in model.tied_modules else None
    if embed is not None:
        result["embed_weight"] = gather_full(embed.weight, ps.tp_group)
    if ps.tp_rank == 0 and ps.dp_rank == 0:
        torch.save(result, os.path.join(args.out, f"stage{ps.pp_rank}.pt"))
    if ps.tp_rank == 0 and masks:
        torch.save(masks, os.path.join(args.out, f"masks_stage{ps.pp_rank}_dp{ps.dp_rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()  # a gloo group torn down at interpreter exit can abort the process


if __name__ == "__main__":
    main()
