"""Single-process transformers Gemma4ForConditionalGeneration on the same global batches: the
ground truth every parallel layout must reproduce."""

from __future__ import annotations

import torch
from peft import PeftModel
from transformers import AutoModelForImageTextToText

from synthetic import global_batch


def load_reference(ckpt: str):
    model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager")
    model.train()
    return model


def global_loss(model, micro_batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """transformers' loss over the whole global batch: its per-micro-batch mean losses weighted back
    to a sum over label tokens, over the total label count."""
    total, count = 0.0, 0
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
    return total / count


def reference_run(ckpt: str, kinds: list[str], lr: float = 0.0, adapter: str = "") -> dict:
    """Losses and gradients (HF names; a PEFT adapter's as the runner names them: `….q_proj.lora_A.weight`)
    per step, and the embedding after the last step. `adapter`: PEFT's LoRA model with that adapter,
    trainable, on the frozen base."""
    model = load_reference(ckpt)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    out: dict = {"losses": [], "grads": []}
    for kind in kinds:
        opt.zero_grad()
        loss = global_loss(model, global_batch(model.config, kind))
        loss.backward()
        out["losses"].append(float(loss.detach()))
        out["grads"].append({n.removeprefix("base_model.model.").replace(".default.", "."): p.grad.detach().clone()
                             for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
    out["embed_weight"] = model.get_input_embeddings().weight.detach().clone()
    return out
