"""LoRA adapters inside the tensor-parallel decoder linears, in PEFT's format in and out.

`apply_lora` freezes every base weight (PEFT's rule: the freeze.* flags add nothing) and gives each targeted
column/row-parallel linear PEFT's update `lora_B(lora_A(dropout(x))) * scaling`, cut over TP so that it
needs no collective of its own (`ColumnParallelLinear._shard_lora`, `RowParallelLinear._shard_lora`);
with `lora.vision_tower` the vision encoder's linears too, replicated (`add_replicated_lora`). The dropout
masks are the same on every TP rank (`LoraDropout`, `seed_dropout`).
Adapters start as PEFT starts them (B zeros; A Kaiming-uniform or Gaussian), drawn per module from
`train.seed` on the full tensor and then sliced, so every layout starts from the same adapters; or
from a PEFT adapter directory (`lora.init_from`). Native checkpoints hold only the adapters, their
optimizer state and the base model's identity (`base_identity`); `runner export` turns them into a
PEFT adapter directory, or with `--merge` into full HF weights with the adapters merged
(`runner/checkpoint/export.py`).
"""

from __future__ import annotations

import hashlib
import math
import re
import zlib
from collections.abc import Collection, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from runner.checkpoint.hf_load import INDEX_NAME, SINGLE_NAME, full_shape_of
from runner.compat import (
    ADAPTER_WEIGHTS_NAME,
    PEFT_KEY_PREFIX,
    peft_key,
    peft_lora_config,
    peft_pattern_value,
    read_peft_lora_config,
)
from runner.config import LORA_TARGETS, LoraConfig, lora_pattern_problem
from runner.errors import UserError
from runner.models.gemma4.stages import DECODER_TP_PLAN, Gemma4DecoderLayerPipe, Gemma4VisionStage, vision_linears
from runner.parallel.tensor_parallel import LoraDropout, add_lora_update, mark_sharded, shard_index

if TYPE_CHECKING:
    from peft import LoraConfig as PeftLoraConfig
    from transformers import Gemma4Config

PARTS = ("lora_A", "lora_B")
# an adapter weight of a decoder / vision encoder linear in adapter_model.safetensors: (layer, linear)
_DECODER_KEY = re.compile(rf"^{re.escape(PEFT_KEY_PREFIX)}model\.language_model\.layers\.(\d+)\.(?:self_attn|mlp)\."
                          rf"(\w+)\.lora_[AB]\.weight$")
_VISION_KEY = re.compile(rf"^{re.escape(PEFT_KEY_PREFIX)}model\.vision_tower\.encoder\.layers\.(\d+)\."
                         rf"(?:self_attn|mlp)\.(\w+)\.linear\.lora_[AB]\.weight$")


def peft_target_modules(targets: list[str], vision_tower: bool = False) -> str:
    """PEFT's `target_modules` for these linears of the decoder layers (and with `vision_tower` of the vision
    encoder's layers, whose clippable linears hold the nn.Linear as `.linear`): a regex PEFT full-matches against
    module names (a plain name list would also catch the vision tower's q_proj, …)."""
    names = "|".join(targets)
    decoder = rf".*\.language_model\.layers\.\d+\.(self_attn|mlp)\.({names})"
    return decoder + (rf"|.*\.vision_tower\.encoder\.layers\.\d+\.(self_attn|mlp)\.({names})\.linear"
                      if vision_tower else "")


def peft_config(cfg: LoraConfig, base: str):
    """The PEFT LoraConfig equivalent to the recipe's `lora` section (what the adapter export writes)."""
    return peft_lora_config(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, use_rslora=cfg.use_rslora,
                            rank_pattern=dict(cfg.rank_pattern), alpha_pattern=dict(cfg.alpha_pattern),
                            target_modules=peft_target_modules(cfg.target_modules, cfg.vision_tower),
                            base_model_name_or_path=base,
                            init_lora_weights=True if cfg.init == "peft_default" else "gaussian")


def adapted_linears(model: nn.Module, targets: list[str], vision_tower: bool = False
                    ) -> Iterator[tuple[str, nn.Module]]:
    """(transformers module name, linear) of every targeted linear on this rank, in model order: the decoder
    layers' TP linears (full layers with attention_k_eq_v have no v_proj, E2B/E4B's KV-shared layers no k_proj or
    v_proj: skipped, as PEFT has nothing to adapt there; the per-layer gate and projection are not targets), and with
    `vision_tower` the vision encoder layers' nn.Linear (replicated on every TP rank of the first stage)."""
    for layer in model.modules():
        if isinstance(layer, Gemma4VisionStage) and vision_tower:
            yield from vision_linears(layer.vision_tower, targets)
        if isinstance(layer, Gemma4DecoderLayerPipe):
            for path in DECODER_TP_PLAN:
                parent, attr = path.split(".")
                linear = getattr(getattr(layer, parent), attr, None)
                if attr in targets and linear is not None:
                    yield layer.hf_prefix + path, linear


def add_replicated_lora(linear: nn.Linear, rank: int, scaling: float, dropout: float) -> None:
    """PEFT's LoRA update on a replicated nn.Linear (the vision tower's): `lora_A`, `lora_B`, `lora_dropout` as
    its submodules (so their names are PEFT's: `….linear.lora_A.weight`) and the update added to its output by a
    forward hook. Every TP rank computes the whole update on the same input and gets the whole gradient."""
    kw = dict(bias=False, device=linear.weight.device, dtype=linear.weight.dtype)
    linear.lora_A = nn.Linear(linear.in_features, rank, **kw)
    linear.lora_B = nn.Linear(rank, linear.out_features, **kw)
    tp = getattr(linear.weight, "tp_replicas", 1)
    for p in (linear.lora_A.weight, linear.lora_B.weight):
        nn.init.zeros_(p)
        mark_sharded(p, None, tp, 0)
    linear.lora_dropout = LoraDropout(dropout, linear.in_features) if dropout else nn.Identity()
    linear.lora_scaling = scaling
    linear.register_forward_hook(_add_lora_update)


def _add_lora_update(linear: nn.Linear, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
    return add_lora_update(linear, out, args[0])


def init_adapter(name: str, linear: nn.Module, cfg: LoraConfig, seed: int) -> None:
    """PEFT's initialization of one adapter, drawn on the full A from a generator of (seed, module name),
    then sliced to this rank's shard: the same adapters at every layout. B stays zero."""
    a = linear.lora_A.weight
    full = torch.empty(full_shape_of(a), dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed ^ zlib.crc32(name.encode()))
    if cfg.init == "gaussian":
        full.normal_(0.0, 1.0 / cfg.rank_of(name), generator=gen)
    else:
        nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=gen)
    with torch.no_grad():
        a.copy_(full[shard_index(list(full.shape), a)[0]])


def apply_lora(model: nn.Module, cfg: LoraConfig, seed: int, base: dict) -> int:
    """Freeze the whole base model and add trainable adapters to the targeted decoder linears (initialized,
    or loaded from `cfg.init_from`); call after loading the base weights, before building the optimizer.
    `model.lora` then holds what checkpoints record (the section and `base`, see `base_identity`), and
    checkpoints hold the adapters only. Returns how many linears got one."""
    model.lora = {"config": asdict(cfg), "base": base}
    for p in model.parameters():
        p.requires_grad_(False)
    adapted = list(adapted_linears(model, cfg.target_modules, cfg.vision_tower))
    for name, linear in adapted:
        rank, scaling = cfg.rank_of(name), cfg.scaling_of(name)
        if isinstance(linear, nn.Linear):  # the vision tower's
            add_replicated_lora(linear, rank, scaling, cfg.dropout)
        else:
            linear.add_lora(rank, scaling, cfg.dropout)
        if not cfg.init_from:
            init_adapter(name, linear, cfg, seed)
    if cfg.init_from:
        load_adapter(adapted, cfg)
    return len(adapted)


def check_patterns(cfg: LoraConfig, config: Gemma4Config) -> None:
    """The recipe's lora.rank_pattern / alpha_pattern: each key names some linear the run adapts (PEFT skips a key
    that matches nothing, so a misspelt one would train the default rank without a word), and no linear is named
    by two keys with different values (PEFT saves adapter_config.json with sorted keys and takes the first that
    matches, so the saved adapter would hold another value than the run trained). An adapter's own patterns, at
    lora.init_from, are used as PEFT saved them. Nothing to check without LoRA."""
    if not cfg.enabled or cfg.init_from or not (cfg.rank_pattern or cfg.alpha_pattern):
        return
    from runner.plan import adapted_modules

    modules = adapted_modules(config, cfg)
    for name, pattern in (("rank_pattern", cfg.rank_pattern), ("alpha_pattern", cfg.alpha_pattern)):
        matched = {key: {m for m in modules if peft_pattern_value({key: True}, m, False)} for key in pattern}
        for key, found in matched.items():
            if not found:
                vision = not cfg.vision_tower and any(peft_pattern_value({key: True}, m, False) for m in
                                                      adapted_modules(config, replace(cfg, vision_tower=True)))
                fix = "set lora.vision_tower: true or remove it" if vision else "fix the key or remove it"
                raise UserError(f"lora.{name} key {key!r} matches none of the linears this run adapts (a key "
                                f"matches a module name's end after a dot, e.g. mlp.down_proj or "
                                f"layers.0.self_attn.q_proj{'; it matches vision tower linears' if vision else ''}); "
                                f"{fix}")
        for module in modules:
            keys = [key for key in pattern if module in matched[key]]
            if len({pattern[key] for key in keys}) > 1:
                raise UserError(f"lora.{name} keys {' and '.join(map(repr, keys))} both match {module} with "
                                f"different values; PEFT saves them sorted and takes the first that matches, so "
                                f"the saved adapter would differ from the trained one: make the keys match "
                                f"disjoint linears (e.g. 'layers\\.([1-9]|[1-9]\\d)\\.mlp\\.down_proj')")


def seed_dropout(model: nn.Module, seed: int, step: int, dp_rank: int, pp_rank: int) -> None:
    """Before each optimizer step of a run with `lora.dropout` > 0: seed the default generators (which
    `LoraDropout` draws from, and activation-checkpoint recompute restores) from (seed, step, DP rank,
    stage). Every TP rank of a stage then drops the same elements; DP replicas and stages draw their own
    masks; a resumed run draws the masks of the unbroken one."""
    if getattr(model, "lora", None) and model.lora["config"]["dropout"]:
        torch.manual_seed(int(np.random.SeedSequence([seed, step, dp_rank, pp_rank]).generate_state(1)[0]))


# PEFT settings whose non-default values change what the adapter computes in ways the runner does not train
_UNSUPPORTED = (("use_dora", False, "DoRA (use_dora)"), ("modules_to_save", None, "modules_to_save"),
                ("bias", "none", "trained biases (bias)"), ("lora_bias", False, "lora_bias"),
                ("target_parameters", None, "target_parameters"), ("trainable_token_indices", None,
                                                                   "trainable_token_indices"))


def _check_adapter_values(saved: PeftLoraConfig, where: str) -> None:
    """r, lora_alpha, lora_dropout and the patterns of a saved adapter are values the recipe's keys could hold."""
    def number(v: object) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

    for key, value, ok, want in (
            ("r", saved.r, number(saved.r) and float(saved.r).is_integer() and saved.r >= 1, "an integer >= 1"),
            ("lora_alpha", saved.lora_alpha, number(saved.lora_alpha) and saved.lora_alpha > 0, "a number > 0"),
            ("lora_dropout", saved.lora_dropout, number(saved.lora_dropout) and 0 <= saved.lora_dropout < 1,
             "a number in [0, 1)")):
        if not ok:
            raise UserError(f"{where}: adapter_config.json has {key} = {value!r}, which must be {want}; fix the file "
                            f"or save the adapter again")
    problem = lora_pattern_problem(saved.rank_pattern or {}, saved.alpha_pattern or {}, "")
    if problem:
        raise UserError(f"{where}: adapter_config.json's {problem}; fix the file or save the adapter again")


def adopt_adapter_config(cfg: LoraConfig, explicit: Collection[str], source: str) -> LoraConfig:
    """The `lora` section continuing the PEFT adapter `cfg.init_from`, as PeftModel.from_pretrained would: its
    r, lora_alpha, rank_pattern, alpha_pattern, use_rslora and lora_dropout, and as targets the decoder linears its
    weights adapt. A value the recipe states (`explicit`: the keys under `lora:`) must agree with the adapter's,
    else one line names both; only lora.dropout may differ (it changes training, not the adapter), the recipe's
    then wins."""
    path = Path(cfg.init_from).expanduser()
    where = f"{source}: lora.init_from {path}"
    try:
        saved = read_peft_lora_config(path)
        with safe_open(path / ADAPTER_WEIGHTS_NAME, framework="pt") as f:
            shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
    except (OSError, ValueError, TypeError, SafetensorError) as err:
        raise UserError(f"{where}: not a PEFT LoRA adapter directory with a readable {ADAPTER_WEIGHTS_NAME} "
                        f"({str(err).splitlines()[0][:200]}); give the directory PeftModel.save_pretrained wrote") from None
    for attr, default, what in _UNSUPPORTED:
        if getattr(saved, attr, default) not in (default, None, {}, False, "none"):
            raise UserError(f"{where}: the adapter uses {what}, which the runner does not train; continue it with PEFT")
    _check_adapter_values(saved, where)
    if not shapes:
        raise UserError(f"{where}: {ADAPTER_WEIGHTS_NAME} holds no LoRA weights; give an adapter that PEFT saved "
                        f"after get_peft_model")
    for key, shape in shapes.items():  # lora_A is (r, in_features), lora_B (out_features, r)
        part = "lora_A" if ".lora_A." in key else "lora_B" if ".lora_B." in key else None
        module = key.removeprefix(PEFT_KEY_PREFIX).rsplit(".", 2)[0]
        r = peft_pattern_value(saved.rank_pattern or {}, module, saved.r)
        if part and (len(shape) != 2 or shape[0 if part == "lora_A" else 1] != r):
            said = f"r = {r}" + (" for it (rank_pattern)" if r != saved.r else "")
            raise UserError(f"{where}: {key} has shape {shape}, but adapter_config.json says {said}; the "
                            f"config and the weights come from different adapters: save the adapter again")
    targets: dict[str, set[str]] = {"decoder": set(), "vision": set()}
    for key in shapes:
        decoder, vision = _DECODER_KEY.match(key), _VISION_KEY.match(key)
        match = decoder or vision
        if not match or match[2] not in LORA_TARGETS:
            raise UserError(f"{where}: the adapter adapts {key.removeprefix(PEFT_KEY_PREFIX)}; the runner adapts only "
                            f"the linears {', '.join(LORA_TARGETS)} of the decoder and vision encoder layers: "
                            f"continue it with PEFT")
        targets["decoder" if decoder else "vision"].add(match[2])
    if targets["vision"] and targets["vision"] != targets["decoder"]:
        raise UserError(f"{where}: the adapter adapts {sorted(targets['vision'])} in the vision tower but "
                        f"{sorted(targets['decoder'])} in the decoder; the runner adapts the same lora.target_modules "
                        f"in both: continue it with PEFT")
    adopted = {"rank": int(saved.r), "alpha": saved.lora_alpha, "use_rslora": bool(saved.use_rslora),
               "rank_pattern": dict(saved.rank_pattern or {}), "alpha_pattern": dict(saved.alpha_pattern or {}),
               "target_modules": [t for t in LORA_TARGETS if t in targets["decoder"]],
               "vision_tower": bool(targets["vision"])}
    names = {"rank": "r", "alpha": "lora_alpha", "use_rslora": "use_rslora", "rank_pattern": "rank_pattern",
             "alpha_pattern": "alpha_pattern", "target_modules": "target_modules",
             "vision_tower": "vision tower adapters"}
    for key, theirs in adopted.items():
        mine = getattr(cfg, key)
        if key in explicit and (set(mine) != set(theirs) if key == "target_modules" else mine != theirs):
            raise UserError(f"{where}: the adapter has {names[key]} = {theirs}, the recipe sets lora.{key}: {mine}; "
                            f"remove lora.{key} (the adapter's is used) or set it to {theirs}")
    if "dropout" not in explicit:
        adopted["dropout"] = saved.lora_dropout
    return replace(cfg, **adopted)


def load_adapter(adapted: list[tuple[str, nn.Module]], cfg: LoraConfig) -> None:
    """Fill this rank's adapter shards from the PEFT adapter directory `cfg.init_from`, whose r, lora_alpha,
    patterns, use_rslora and targets must be the recipe's."""
    path = Path(cfg.init_from).expanduser()
    where = f"lora.init_from {path}"
    try:
        saved = read_peft_lora_config(path)
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"{where}: not a PEFT LoRA adapter directory ({str(err).splitlines()[0][:200]}); give "
                        f"the directory PeftModel.save_pretrained wrote") from None
    for key, mine, theirs in (("rank", cfg.rank, saved.r), ("alpha", cfg.alpha, saved.lora_alpha),
                              ("use_rslora", cfg.use_rslora, saved.use_rslora),
                              ("rank_pattern", cfg.rank_pattern, saved.rank_pattern or {}),
                              ("alpha_pattern", cfg.alpha_pattern, saved.alpha_pattern or {})):
        if mine != theirs:
            raise UserError(f"{where}: the adapter was trained with lora.{key} = {theirs}, the recipe sets {mine}; "
                            f"set lora.{key}: {theirs}")
    weights = path / ADAPTER_WEIGHTS_NAME
    if not weights.is_file():
        raise UserError(f"{where}: no {ADAPTER_WEIGHTS_NAME}; save the adapter with safetensors (PEFT's default)")
    with safe_open(weights, framework="pt") as f, torch.no_grad():
        keys = set(f.keys())
        for name, linear in adapted:
            for part in PARTS:
                key, param = peft_key(name, part), getattr(linear, part).weight
                if key not in keys:
                    raise UserError(f"{where}: no {key}: the adapter does not adapt {name} (PEFT's layers_to_transform "
                                    f"or exclude_modules?); the runner adapts lora.target_modules in every layer")
                sl = f.get_slice(key)
                index, shape = shard_index(list(sl.get_shape()), param)
                if shape != list(param.shape):
                    raise UserError(f"{where}: {key} has shape {sl.get_shape()}, this model expects "
                                    f"{full_shape_of(param)}; the adapter belongs to another base model")
                param.copy_(sl[index].to(param.dtype))
                if not torch.isfinite(param).all():
                    raise UserError(f"{where}: {key} holds NaN or infinite values; the adapter is damaged: start from "
                                    f"the last good one")


def base_identity(model_dir: str | Path, source: str) -> dict:
    """What a LoRA checkpoint records of the frozen base it does not hold: where it came from and a
    fingerprint of its config.json and weight index (or single file's safetensors header)."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    for name in ("config.json", INDEX_NAME):
        if (model_dir / name).is_file():
            digest.update((model_dir / name).read_bytes())
    single = model_dir / SINGLE_NAME
    if not (model_dir / INDEX_NAME).is_file() and single.is_file():
        with single.open("rb") as f:
            digest.update(f.read(int.from_bytes(f.read(8), "little")))
    return {"path": source, "fingerprint": digest.hexdigest()}


def check_lora_resume(meta: dict, cfg: LoraConfig, model_dir: str | Path, source: str, ckpt: Path) -> None:
    """A resume continues the same kind of run on the same base: LoRA with the same adapters, or full
    fine-tuning; the base's fingerprint must still match."""
    saved = meta.get("lora")
    if bool(saved) != cfg.enabled:
        kind = "LoRA adapters" if saved else "a full fine-tune"
        raise UserError(f"{ckpt} holds {kind} but this recipe sets lora.enabled: {str(cfg.enabled).lower()}; "
                        f"set it back, or start afresh in a new output.dir", on_every_rank=True)
    if not saved:
        return
    for key, default in (("rank", None), ("target_modules", None), ("use_rslora", False), ("alpha", None),
                         ("vision_tower", False), ("rank_pattern", {}), ("alpha_pattern", {})):
        if saved["config"].get(key, default) != getattr(cfg, key):
            raise UserError(f"{ckpt} was trained with lora.{key} = {saved['config'].get(key, default)}, this recipe "
                            f"sets {getattr(cfg, key)}; set it back to resume", on_every_rank=True)
    if base_identity(model_dir, source)["fingerprint"] != saved["base"]["fingerprint"]:
        raise UserError(f"{ckpt} holds adapters for the base model {saved['base']['path']}, but model.path = {source} "
                        f"has another config or weight index; point model.path at that base", on_every_rank=True)
