"""Real Gemma4 shapes, built locally without Hub access: `runner plan` and the GPU benchmark need the
31B's and 26B-A4B's exact geometry (and depth-reduced slices of the 31B with the same width)."""

from __future__ import annotations

from transformers import Gemma4Config

from runner.errors import UserError

GEMMA4_31B_ID = "google/gemma-4-31B-it"
GEMMA4_31B_LAYERS = 60
_PATTERN = 6  # 5 sliding + 1 full attention layer per 6
# Soft tokens per image in the published config (vision `default_output_length`, top-level
# `vision_soft_tokens_per_image`), one of the image processor's budgets.
GEMMA4_31B_IMAGE_SOFT_TOKENS = 280


def gemma4_31b_config(depth: int = GEMMA4_31B_LAYERS, text_overrides: dict | None = None,
                      name: str = "gemma4_31b_config", max_depth: int = GEMMA4_31B_LAYERS) -> Gemma4Config:
    """google/gemma-4-31B-it's config.json as a Gemma4Config, with `depth` decoder layers.

    `depth` < 60 keeps the width, the vision tower and the 5:1 sliding/full pattern (so it must be
    a multiple of 6): a slice whose per-layer cost, memory and kernels are the 31B's own.
    The full layers' shape is given the way the published config.json gives it
    (`global_head_dim`, `num_global_key_value_heads`, `attention_k_eq_v`). `text_overrides` replace
    text-config keys (a sibling model's shape); `name` and `max_depth` are that model's, for the message.
    """
    if depth < _PATTERN or depth > max_depth or depth % _PATTERN:
        raise UserError(
            f"{name}: depth={depth} must be a multiple of {_PATTERN} in [{_PATTERN}, "
            f"{max_depth}] to keep the 5 sliding + 1 full layer pattern"
        )
    layer_types = (["sliding_attention"] * (_PATTERN - 1) + ["full_attention"]) * (depth // _PATTERN)
    text = dict(
        vocab_size=262144,
        hidden_size=5376,
        intermediate_size=21504,
        num_hidden_layers=depth,
        num_attention_heads=32,
        num_key_value_heads=16,
        head_dim=256,
        global_head_dim=512,
        num_global_key_value_heads=4,
        attention_k_eq_v=True,
        hidden_activation="gelu_pytorch_tanh",
        sliding_window=1024,
        layer_types=layer_types,
        final_logit_softcapping=30.0,
        use_bidirectional_attention="vision",
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=262144,
        num_kv_shared_layers=0,
        enable_moe_block=False,
        use_double_wide_mlp=False,
        max_position_embeddings=262144,
        rms_norm_eps=1e-6,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
        },
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    ) | (text_overrides or {})
    vision = dict(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
        num_key_value_heads=16,
        head_dim=72,
        hidden_activation="gelu_pytorch_tanh",
        patch_size=16,
        pooling_kernel_size=3,
        position_embedding_size=10240,
        max_position_embeddings=131072,
        rope_parameters={"rope_type": "default", "rope_theta": 100.0},
        standardize=True,
        use_clipped_linears=False,
        rms_norm_eps=1e-6,
        default_output_length=GEMMA4_31B_IMAGE_SOFT_TOKENS,
    )
    return Gemma4Config(
        text_config=text,
        vision_config=vision,
        audio_config=None,
        vision_soft_tokens_per_image=GEMMA4_31B_IMAGE_SOFT_TOKENS,
        eos_token_id=[1, 106],  # <eos> and end of turn, as the instruction-tuned 31B stops
        tie_word_embeddings=True,
    )


GEMMA4_26B_A4B_ID = "google/gemma-4-26B-A4B-it"
GEMMA4_26B_A4B_LAYERS = 30


def gemma4_26b_a4b_config(depth: int = GEMMA4_26B_A4B_LAYERS) -> Gemma4Config:
    """google/gemma-4-26B-A4B-it's published shape: the 31B's vision tower and attention pattern at width
    2816 over 30 layers, each with a dense MLP (2112) beside 128 experts of width 704, top-8. `depth` < 30
    (a multiple of 6) keeps all of that but the layer count: a slice that fits one GPU for full fine-tuning."""
    return gemma4_31b_config(depth, dict(
        hidden_size=2816, intermediate_size=2112, num_attention_heads=16, num_key_value_heads=8,
        num_global_key_value_heads=2, enable_moe_block=True, num_experts=128, top_k_experts=8,
        moe_intermediate_size=704,
    ), name="gemma4_26b_a4b_config", max_depth=GEMMA4_26B_A4B_LAYERS)


GEMMA4_E2B_ID = "google/gemma-4-E2B-it"
GEMMA4_E4B_ID = "google/gemma-4-E4B-it"
_E_PATTERN = {"e2b": 5, "e4b": 6}  # E2B: 4 sliding + 1 full; E4B: 5 + 1


def _gemma4_e_config(name: str, **text: object) -> Gemma4Config:
    """An E-model config. From the published config.json (and the model card): every text field passed
    in by the callers, the audio tower (transformers' Gemma4AudioConfig defaults equal it: 1024 wide,
    12 conformer layers, output_proj_dims 1536). Assumed: the vision tower is transformers'
    Gemma4VisionConfig defaults (documented against google/gemma-4-e2b-it: 768 wide, 16 layers) with the
    31B's 280 soft tokens per image; softcap 30, RoPE, bidirectional image attention and the special
    token ids as the 31B's."""
    depth, pattern = int(text.pop("num_hidden_layers")), _E_PATTERN[name]
    layer_types = [("full_attention" if (i + 1) % pattern == 0 else "sliding_attention") for i in range(depth)]
    base = gemma4_31b_config().text_config.to_dict()
    common = {k: base[k] for k in ("vocab_size", "hidden_activation", "final_logit_softcapping", "rope_parameters",
                                   "use_bidirectional_attention", "rms_norm_eps", "pad_token_id", "eos_token_id",
                                   "bos_token_id")}
    return Gemma4Config(
        text_config=dict(common, num_hidden_layers=depth, layer_types=layer_types, num_attention_heads=8,
                         head_dim=256, global_head_dim=512, attention_k_eq_v=False, sliding_window=512,
                         hidden_size_per_layer_input=256, vocab_size_per_layer_input=262144,
                         max_position_embeddings=131072, tie_word_embeddings=True, **text),
        vision_config=dict(default_output_length=GEMMA4_31B_IMAGE_SOFT_TOKENS, standardize=False),
        audio_config={},
        vision_soft_tokens_per_image=GEMMA4_31B_IMAGE_SOFT_TOKENS,
        eos_token_id=[1, 106],
        tie_word_embeddings=True,
    )


def gemma4_e2b_config() -> Gemma4Config:
    """google/gemma-4-E2B-it: 35 layers, 1 KV head, double-wide MLPs on its 20 KV-shared layers
    (which fields are published and which assumed: `_gemma4_e_config`)."""
    return _gemma4_e_config("e2b", hidden_size=1536, num_hidden_layers=35, num_key_value_heads=1,
                            intermediate_size=6144, use_double_wide_mlp=True, num_kv_shared_layers=20)


def gemma4_e4b_config() -> Gemma4Config:
    """google/gemma-4-E4B-it: 42 layers, 2 KV heads, 18 KV-shared layers (see `_gemma4_e_config`)."""
    return _gemma4_e_config("e4b", hidden_size=2560, num_hidden_layers=42, num_key_value_heads=2,
                            intermediate_size=10240, use_double_wide_mlp=False, num_kv_shared_layers=18)


# Hub id -> its built-in config, for `runner plan` without the Hub
PRESETS = {GEMMA4_31B_ID: gemma4_31b_config, GEMMA4_26B_A4B_ID: gemma4_26b_a4b_config, GEMMA4_E2B_ID: gemma4_e2b_config,
           GEMMA4_E4B_ID: gemma4_e4b_config}
