"""Each transformers seam of runner/compat.py on the installed release: the values it reads are the
ones transformers' own modules use. Part of the compatibility subset (`-m compat`) that also runs on
the oldest supported transformers."""

from __future__ import annotations

import pytest
import torch
import transformers
from packaging.version import Version

from runner.compat import (
    Gemma4RMSNorm,
    Gemma4TextDecoderLayer,
    Gemma4TextRotaryEmbedding,
    attn_implementation,
    build_masks,
    decoder_layer_forward,
    is_kv_shared_layer,
    rms_norm_eps,
    set_attn_implementation,
)
from runner.models.gemma4.stages import FusedRMSNorm
from runner.models.gemma4.tiny import tiny_config

pytestmark = pytest.mark.compat


def test_installed_transformers_is_in_the_declared_range():
    import tomllib

    from conftest import ROOT

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if d.startswith("transformers"))
    low, high = (part.split("=")[-1].lstrip("<") for part in spec.removeprefix("transformers").split(","))
    assert Version(low) <= Version(transformers.__version__) < Version(high), (transformers.__version__, spec)


@pytest.mark.parametrize("eps", [1e-6, 3e-5])
def test_rms_norm_eps_is_the_one_transformers_computes_with(eps):
    norm = Gemma4RMSNorm(8, eps=eps)
    assert rms_norm_eps(norm) == eps
    x = torch.full((1, 8), 3e-3)  # eps matters next to mean x² ≈ 1e-5
    fused = FusedRMSNorm(8, eps=rms_norm_eps(norm), fused=True)
    torch.testing.assert_close(fused(x), norm(x), rtol=1e-5, atol=0)


def test_attention_backend_is_read_and_set_on_one_config_only():
    config = tiny_config()
    set_attn_implementation(config.text_config, "eager")
    assert attn_implementation(config.text_config) == "eager"
    layer = Gemma4TextDecoderLayer(config.text_config, 0)
    assert attn_implementation(layer.self_attn.config) == "eager"


def test_masks_and_decoder_layer_forward_match_the_keyword_call():
    """The positional seams (mask builder, decoder-layer forward) give what transformers' keyword call gives."""
    config = tiny_config()
    tc = config.text_config
    set_attn_implementation(tc, "eager")
    torch.manual_seed(0)
    batch, seq = 2, 12
    x = torch.randn(batch, seq, tc.hidden_size)
    pos = torch.arange(seq).repeat(batch, 1)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[1, :3] = 0
    masks = build_masks(config, x, attention_mask, pos, torch.zeros(batch, seq, dtype=torch.long))
    assert set(masks) >= set(tc.layer_types)
    for layer_idx in (0, tc.layer_types.index("full_attention")):
        layer = Gemma4TextDecoderLayer(tc, layer_idx)
        assert not is_kv_shared_layer(layer.self_attn)
        layer_type = tc.layer_types[layer_idx]
        rope = Gemma4TextRotaryEmbedding(tc)(x, pos, layer_type)
        ours = decoder_layer_forward(layer, x, rope, masks[layer_type], pos)
        theirs = layer(x, shared_kv_states={}, position_embeddings=rope, attention_mask=masks[layer_type], position_ids=pos)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_installed_peft_is_in_the_declared_range_and_names_adapters_as_the_runner_does(tmp_path):
    import peft
    import tomllib
    from peft import get_peft_model
    from safetensors import safe_open

    from runner.compat import (
        ADAPTER_CONFIG_NAME,
        ADAPTER_WEIGHTS_NAME,
        peft_key,
        peft_lora_config,
        read_peft_lora_config,
    )
    from runner.models.gemma4.tiny import make_tiny

    from conftest import ROOT

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if d.startswith("peft"))
    low, high = (part.split("=")[-1].lstrip("<") for part in spec.removeprefix("peft").split(","))
    assert Version(low) <= Version(peft.__version__) < Version(high), peft.__version__
    model = transformers.AutoModelForImageTextToText.from_pretrained(make_tiny(tmp_path / "tiny", seed=0))
    target = "model.language_model.layers.0.self_attn.q_proj"
    get_peft_model(model, peft_lora_config(r=2, target_modules=[target])).save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / ADAPTER_CONFIG_NAME).is_file()
    with safe_open(tmp_path / "adapter" / ADAPTER_WEIGHTS_NAME, framework="pt") as f:
        assert set(f.keys()) == {peft_key(target, "lora_A"), peft_key(target, "lora_B")}
    assert read_peft_lora_config(tmp_path / "adapter").r == 2


def test_peft_gives_each_module_the_rank_and_scaling_the_runner_reads_from_its_patterns():
    """PEFT's LoraModel, given rank_pattern / alpha_pattern (and rsLoRA), builds every adapter at the rank and
    scaling `LoraConfig.rank_of` / `scaling_of` compute through `peft_pattern_value`."""
    from peft import get_peft_model

    from runner.config import LORA_TARGETS, LoraConfig
    from runner.lora import peft_config

    with torch.device("meta"):
        model = transformers.Gemma4ForConditionalGeneration(tiny_config())
    for rslora in (False, True):
        cfg = LoraConfig(enabled=True, rank=2, alpha=4, use_rslora=rslora, target_modules=list(LORA_TARGETS),
                         rank_pattern={"mlp.down_proj": 3, "layers.1.self_attn.q_proj": 5}, alpha_pattern={"o_proj": 7})
        peft_model = get_peft_model(model, peft_config(cfg, "base"))
        ranks = {}
        for name, module in peft_model.base_model.model.named_modules():
            if "default" in getattr(module, "r", {}):
                ranks[name] = module.r["default"]
                assert module.scaling["default"] == pytest.approx(cfg.scaling_of(name), rel=1e-12), name
        assert all(r == cfg.rank_of(name) for name, r in ranks.items()) and set(ranks.values()) == {2, 3, 5}
        peft_model.unload()


def test_deepspeed_shm_comm_op_is_not_built_on_cpu():
    """On CPU the runner marks DeepSpeed's shared-memory comm op incompatible before DeepSpeed's comm
    backend starts: the backend then builds nothing (no C++ compile on a fresh TORCH_EXTENSIONS_DIR)
    and uses gloo's collectives. (The seam: `deepspeed.ops.__compatible_ops__`, probed once and kept.)"""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.comm.torch import build_shm_op

    from runner.compat import skip_deepspeed_shm_comm

    assert get_accelerator().device_name() == "cpu"  # DS_ACCELERATOR=cpu (conftest)
    assert skip_deepspeed_shm_comm()
    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False
    assert build_shm_op() is None


def test_collective_timeout_on_torch_without_set_timeout(monkeypatch):
    """torch 2.11 (the oldest supported) has no `torch.distributed.set_timeout`: the seam falls back to
    `distributed_c10d._set_pg_timeout`, which torch 2.11 has, with the same arguments."""
    from datetime import timedelta

    from torch.distributed import distributed_c10d

    from runner.compat import set_group_timeout

    calls = []
    monkeypatch.delattr(torch.distributed, "set_timeout", raising=False)
    monkeypatch.setattr(distributed_c10d, "_set_pg_timeout", lambda timeout, group: calls.append((timeout, group)))
    set_group_timeout(timedelta(minutes=3), "group")
    assert calls == [(timedelta(minutes=3), "group")]
