"""A tiny random Gemma4 with the 31B's structure, for tests and the CPU demo.

Same shape of everything the 31B uses (5 sliding + 1 full attention per 6 layers, two head dims,
fewer global KV heads with k_eq_v, softcap, bidirectional vision attention, tied embeddings, a
real vision tower), at sizes a 2-core CPU trains in seconds.
"""

from __future__ import annotations

from transformers import Gemma4Config

# Special-token ids of the tiny tokenizer; the config and the tokenizer must agree on them.
TINY_TOKEN_IDS = {
    "pad": 0,
    "eos": 1,
    "bos": 2,
    "unk": 3,
    "image": 4,
    "boi": 5,
    "eoi": 6,
    "audio": 7,
    "boa": 8,
    "eoa": 9,
    "video": 10,
}
TINY_VOCAB_SIZE = 512  # divisible by 1, 2, 4, 8 so every test layout shards it


def tiny_config(num_hidden_layers: int = 6, vocab_size: int = TINY_VOCAB_SIZE) -> Gemma4Config:
    """The tiny Gemma4 config: 31B structure, test sizes."""
    ids = TINY_TOKEN_IDS
    text = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=32,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        sliding_window=16,
        final_logit_softcapping=30.0,
        use_bidirectional_attention="vision",
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=vocab_size,
        num_kv_shared_layers=0,
        enable_moe_block=False,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        pad_token_id=ids["pad"],
        eos_token_id=ids["eos"],
        bos_token_id=ids["bos"],
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        patch_size=16,
        pooling_kernel_size=3,
        position_embedding_size=1024,
        standardize=False,
    )
    return Gemma4Config(
        text_config=text,
        vision_config=vision,
        audio_config=None,
        image_token_id=ids["image"],
        boi_token_id=ids["boi"],
        eoi_token_id=ids["eoi"],
        audio_token_id=ids["audio"],
        boa_token_id=ids["boa"],
        eoa_token_index=ids["eoa"],
        video_token_id=ids["video"],
        tie_word_embeddings=True,
    )
