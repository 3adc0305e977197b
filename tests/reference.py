"""Single-process transformers Gemma4ForConditionalGeneration on the same global batches: the
ground truth every parallel layout must reproduce."""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel
from transformers import AutoModelForImageTextToText
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from synthetic import global_batch


def load_reference(ckpt: str):
    model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager")
    model.train()
    return model


def global_loss(model, micro_batches: list[dict[str, torch.Tensor]],
                balances: list[torch.Tensor] | None = None) -> torch.Tensor:
    """transformers' loss over the whole global batch: its per-micro-batch mean losses weighted back
    to a sum over label tokens, over the total label count. An MoE model's load-balancing loss, the mean
    over micro-batches and layers of transformers' `load_balancing_loss_func` on each layer's router
    logits with the attention mask (what `moe.aux_loss_coef` weights), is appended to `balances`."""
    text = model.config.get_text_config()
    logits: list[torch.Tensor] = []
    hooks = [m.proj.register_forward_hook(lambda mod, inp, out: logits.append(out))
             for m in model.modules() if type(m).__name__ == "Gemma4TextRouter"]
    total, count, balance = 0.0, 0, 0.0
    for mb in micro_batches:
        n = int((mb["labels"][:, 1:] != -100).sum())
        has_images = mb["pixel_values"].shape[0] > 0
        out = model(
            input_ids=mb["input_ids"],
            attention_mask=mb["attention_mask"],
            mm_token_type_ids=mb["mm_token_type_ids"],
            pixel_values=mb["pixel_values"] if has_images else None,
            image_position_ids=mb["image_position_ids"] if has_images else None,
            labels=mb["labels"],
        )
        total = total + out.loss * n
        count += n
        for layer_logits in logits:
            balance = balance + load_balancing_loss_func((layer_logits,), text.num_experts, text.top_k_experts,
                                                         mb["attention_mask"])
        logits.clear()
    for hook in hooks:
        hook.remove()
    if hooks and balances is not None:
        balances.append(balance / (len(hooks) * len(micro_batches)))
    return total / count


class ReplayedDropout(torch.nn.Module):
    """Stands in for PEFT's `lora_dropout` of one module: its nn.Dropout with the runner's keep masks, in
    the order the runner drew them (one per micro-batch), scaled as nn.Dropout scales."""

    def __init__(self, masks: list[torch.Tensor], p: float) -> None:
        super().__init__()
        self.masks, self.p = list(masks), p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = self.masks.pop(0)  # the runner's micro-batch may be right-padded further (to a multiple of tp)
        assert keep.shape[0] == x.shape[0] and keep.shape[1] >= x.shape[1] and keep.shape[2:] == x.shape[2:]
        keep = keep[:, :x.shape[1]]
        return x * keep.to(x.dtype).div_(1 - self.p)


def replay_dropout(model: PeftModel, masks: dict[str, list[torch.Tensor]], p: float) -> list[ReplayedDropout]:
    """Put the runner's masks (by transformers module name) into PEFT's LoRA dropout, which must be
    PEFT's own nn.Dropout(p) on the adapter input of exactly those modules."""
    replays = []
    for name, module in model.named_modules():
        if isinstance(getattr(module, "lora_dropout", None), torch.nn.ModuleDict):
            own = module.lora_dropout["default"]
            assert isinstance(own, torch.nn.Dropout) and own.p == p, (name, own)
            replays.append(ReplayedDropout(masks.pop(name.removeprefix("base_model.model.")), p))
            module.lora_dropout["default"] = replays[-1]
    assert not masks, f"masks for modules PEFT does not adapt: {sorted(masks)[:3]}"
    return replays


def reference_run(ckpt: str, kinds: list[str], lr: float = 0.0, adapter: str = "", dropout: float = 0.0,
                  masks: dict[str, list[torch.Tensor]] | None = None, balance_coef: float = 0.0) -> dict:
    """Losses and gradients (HF names; a PEFT adapter's as the runner names them: `….q_proj.lora_A.weight`)
    per step, and the embedding after the last step. `adapter`: PEFT's LoRA model with that adapter,
    trainable, on the frozen base, its lora_dropout `dropout` drawing `masks` (module → one per micro-batch
    of every step, in order). `balance_coef`: an MoE model trains with that times its load-balancing loss
    (`balances`: the loss of each step; `losses` stay the language-model loss, as the runner logs it)."""
    model = load_reference(ckpt)
    if adapter:
        config = LoraConfig.from_pretrained(adapter)
        config.lora_dropout = dropout
        model = PeftModel.from_pretrained(model, adapter, is_trainable=True, config=config)
    replays = replay_dropout(model, dict(masks), dropout) if masks else []
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    out: dict = {"losses": [], "grads": [], "balances": []}
    for kind in kinds:
        opt.zero_grad()
        loss = global_loss(model, global_batch(model.config, kind), out["balances"])
        (loss + balance_coef * out["balances"][-1] if balance_coef else loss).backward()
        out["losses"].append(float(loss.detach()))
        out["grads"].append({n.removeprefix("base_model.model.").replace(".default.", "."): p.grad.detach().clone()
                             for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
    assert not any(r.masks for r in replays), "PEFT ran fewer adapter forwards than the runner"
    out["embed_weight"] = model.get_input_embeddings().weight.detach().clone()
    out["balances"] = [float(b.detach()) for b in out["balances"]]
    return out
