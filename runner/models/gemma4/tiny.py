"""A tiny random Gemma4 with the 31B's structure, for tests and the CPU demo.

Same shape of everything the 31B uses (5 sliding + 1 full attention per 6 layers, two head dims,
fewer global KV heads with k_eq_v, softcap, bidirectional vision attention, tied embeddings, a
real vision tower), at sizes a 2-core CPU trains in seconds.

`make_tiny` writes it as a Hub-style directory (sharded safetensors, config, tokenizer, processor)
so that every loader in the runner reads it the way it reads `google/gemma-4-31B-it`.
"""

from __future__ import annotations

import json
import math
import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (
    Gemma4AudioFeatureExtractor,
    Gemma4Config,
    Gemma4ForConditionalGeneration,
    Gemma4ImageProcessor,
    Gemma4Processor,
    Gemma4VideoProcessor,
    GemmaTokenizer,
)

from runner.errors import UserError

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
# Soft tokens per image: the smallest budget Gemma4's image processor accepts (70, 140, 280, 560, 1120).
TINY_IMAGE_SOFT_TOKENS = 70

# The real Gemma4 token strings, in the order of TINY_TOKEN_IDS.
TINY_TOKEN_STRINGS = {
    "pad": "<pad>",
    "eos": "<eos>",
    "bos": "<bos>",
    "unk": "<unk>",
    "image": "<|image|>",
    "boi": "<|image>",
    "eoi": "<image|>",
    "audio": "<|audio|>",
    "boa": "<|audio>",
    "eoa": "<audio|>",
    "video": "<|video|>",
}
# Named tokens of the real Gemma4 tokenizer (attribute -> string), registered as transformers'
# Gemma4 conversion does: the processor reads the multimodal ones, the chat template the rest.
_MULTIMODAL = ("image", "boi", "eoi", "audio", "boa", "eoa")
_NAMED_TOKENS = {f"{name}_token": TINY_TOKEN_STRINGS[name] for name in _MULTIMODAL}
_NAMED_TOKENS |= {
    "sot_token": "<|turn>",
    "eot_token": "<turn|>",
    "soc_token": "<|channel>",
    "eoc_token": "<channel|>",
    "think_token": "<|think|>",
    "escape_token": '<|"|>',
    "str_token": "<|tool_response>",
    "etr_token": "<tool_response|>",
    "stc_token": "<|tool_call>",
    "etc_token": "<tool_call|>",
    "std_token": "<|tool>",
    "etd_token": "<tool|>",
}
_MASK_TOKEN = "<mask>"  # GemmaTokenizer's default mask token; in the vocab so it adds no id past 512

# Gemma4's chat format (the 31B's template without tool calling): `<|turn>role ... <turn|>` turns,
# assistant rendered as `model`, an optional system turn that carries `<|think|>` when thinking is
# on, thoughts stripped from earlier model turns, images as the processor's `<|image|>` placeholder,
# and a generation prompt that opens an empty thought channel unless thinking is on.
CHAT_TEMPLATE = """\
{%- macro strip_thinking(text) -%}
    {%- set ns = namespace(result='') -%}
    {%- for part in text.split('<channel|>') -%}
        {%- if '<|channel>' in part -%}
            {%- set ns.result = ns.result + part.split('<|channel>')[0] -%}
        {%- else -%}
            {%- set ns.result = ns.result + part -%}
        {%- endif -%}
    {%- endfor -%}
    {{- ns.result | trim -}}
{%- endmacro -%}
{%- macro render_content(content, role) -%}
    {%- if content is string -%}
        {{- strip_thinking(content) if role == 'model' else content | trim -}}
    {%- else -%}
        {%- for item in content -%}
            {%- if item['type'] == 'text' -%}
                {{- strip_thinking(item['text']) if role == 'model' else item['text'] | trim -}}
            {%- elif item['type'] == 'image' -%}
                {{- '<|image|>' -}}
            {%- elif item['type'] == 'audio' -%}
                {{- '<|audio|>' -}}
            {%- elif item['type'] == 'video' -%}
                {{- '<|video|>' -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- set thinking = enable_thinking | default(false) -%}
{%- set has_system = messages and messages[0]['role'] in ['system', 'developer'] -%}
{{- bos_token -}}
{%- if thinking or has_system -%}
    {{- '<|turn>system\\n' -}}
    {%- if thinking -%}
        {{- '<|think|>\\n' -}}
    {%- endif -%}
    {%- if has_system -%}
        {{- render_content(messages[0]['content'], 'system') -}}
    {%- endif -%}
    {{- '<turn|>\\n' -}}
{%- endif -%}
{%- for message in (messages[1:] if has_system else messages) -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{- '<|turn>' + role + '\\n' -}}
    {{- render_content(message['content'], role) -}}
    {{- '<turn|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|turn>model\\n' -}}
    {%- if not thinking -%}
        {{- '<|channel>thought\\n<channel|>' -}}
    {%- endif -%}
{%- endif -%}
"""

# BPE training text: chat roles and MedPix-style VQA phrasing, so synthetic questions and answers
# become word-level tokens; every other printable ASCII character still has its own token.
_CORPUS = """\
user model system assistant question answer image
What abnormality is seen in the CT scan of the chest?
There is a large mass in the right upper lobe of the lung.
Which organ is affected in this MRI of the brain?
The image shows a fracture of the left femur with no displacement.
Is there evidence of pleural effusion on this radiograph? No, the lungs are clear.
What imaging modality was used? An axial contrast enhanced CT of the abdomen and pelvis.
Describe the finding in the liver: a well defined hypodense lesion, likely a cyst.
Where is the lesion located? In the left temporal lobe, with surrounding edema.
How many nodules are visible? Two small nodules in the lower lobes.
The patient is a 45 year old man with pain, fever and cough for 3 days.
A 62 year old woman presents with headache and weakness of the right arm.
Answer the question about the medical image. Yes. No. Normal. Abnormal.
This is a sagittal T2 weighted image of the spine showing disc herniation at L4-L5.
The heart size is normal and there is no pneumothorax.
Findings are consistent with acute appendicitis; the kidney, bladder and bowel are unremarkable.
What is the most likely diagnosis? Metastatic disease from a primary tumor.
Is the mass benign or malignant? The margins are irregular, which suggests malignancy.
What does the arrow point to? A calcified lymph node near the aorta.
Ultrasound of the neck shows an enlarged thyroid gland with a solid nodule.
The X-ray of the hand shows soft tissue swelling but no bone fracture.
Coronal view of the head: hemorrhage in the frontal region with mass effect.
Was contrast given? Yes, intravenous contrast was given before the scan.
What is the main finding? A wedge-shaped infarct in the upper right region.
What kind of scan is this? In which region is the abnormality? A round cystic lesion, lower left.
"""
# Every printable ASCII character but the blanks; GemmaTokenizer writes a space as ▁.
_ALPHABET = sorted(set(string.printable) - set(" \t\r\x0b\x0c")) + ["▁"]

# Weight scales. Embedding std 0.25 makes the tied head's logits std ~2 at hidden 64 (loss well
# above ln(vocab), far from uniform, yet not one-hot); linears keep activations O(1).
_EMBED_STD = 0.25
_NORM_JITTER = 0.1
_LAYER_SCALAR_RANGE = (0.5, 1.5)
# Router scores have this std (its input is normed to rms hidden^-½): top-k choices a wide margin apart,
# so no layout's rounding flips one.
_ROUTER_STD = 2.0
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def tiny_config(num_hidden_layers: int = 6, vocab_size: int = TINY_VOCAB_SIZE, text_overrides: dict | None = None,
                audio_config: dict | None = None) -> Gemma4Config:
    """The tiny Gemma4 config: 31B structure, test sizes (`text_overrides`, `audio_config`: other members')."""
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
    text.update(text_overrides or {})
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
        # The 31B's config.json states its image budget here and in vision_soft_tokens_per_image
        # (serving stacks read them); they must match the processor's max_soft_tokens.
        default_output_length=TINY_IMAGE_SOFT_TOKENS,
    )
    return Gemma4Config(
        text_config=text,
        vision_config=vision,
        audio_config=audio_config,
        image_token_id=ids["image"],
        boi_token_id=ids["boi"],
        eoi_token_id=ids["eoi"],
        audio_token_id=ids["audio"],
        boa_token_id=ids["boa"],
        eoa_token_index=ids["eoa"],
        video_token_id=ids["video"],
        vision_soft_tokens_per_image=TINY_IMAGE_SOFT_TOKENS,
        tie_word_embeddings=True,
    )


def tiny_moe_config(num_hidden_layers: int = 6, vocab_size: int = TINY_VOCAB_SIZE) -> Gemma4Config:
    """The tiny config with 26B-A4B's mixture-of-experts block in every layer (dense MLP beside 8 experts,
    top-2): expert count and width split over every test layout's ep and tp / ep."""
    return tiny_config(num_hidden_layers, vocab_size, text_overrides=dict(
        enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=32))


def tiny_tokenizer() -> GemmaTokenizer:
    """A GemmaTokenizer over a BPE vocabulary trained here, special tokens at TINY_TOKEN_IDS.

    Built the way transformers' Gemma4 conversion builds the real one (vocab + merges handed to
    GemmaTokenizer, named multimodal and turn tokens as extra special tokens), so it saves and
    loads like the 31B's tokenizer.
    """
    specials = [TINY_TOKEN_STRINGS[name] for name in TINY_TOKEN_IDS]
    specials += [_MASK_TOKEN] + [t for t in _NAMED_TOKENS.values() if t not in specials]
    bpe = Tokenizer(models.BPE(unk_token=TINY_TOKEN_STRINGS["unk"]))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    bpe.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")  # merges stay inside words
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=specials,
        initial_alphabet=_ALPHABET,
        limit_alphabet=len(_ALPHABET),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS.splitlines(), trainer)
    trained = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    return GemmaTokenizer(
        vocab=trained["vocab"],
        merges=merges,
        unk_token=TINY_TOKEN_STRINGS["unk"],
        bos_token=TINY_TOKEN_STRINGS["bos"],
        eos_token=TINY_TOKEN_STRINGS["eos"],
        pad_token=TINY_TOKEN_STRINGS["pad"],
        mask_token=_MASK_TOKEN,
        add_bos_token=False,  # the chat template writes <bos>
        padding_side="left",
        extra_special_tokens=dict(_NAMED_TOKENS),
        chat_template=CHAT_TEMPLATE,
    )


def tiny_processor(
    config: Gemma4Config, tokenizer: GemmaTokenizer, soft_tokens: int = TINY_IMAGE_SOFT_TOKENS
) -> Gemma4Processor:
    """Gemma4Processor with all four parts, its image budget (`soft_tokens` per image) matching the
    vision config; the GPU benchmark reuses it with the 31B's 280."""
    vision = config.vision_config
    patching = dict(
        patch_size=vision.patch_size,
        pooling_kernel_size=vision.pooling_kernel_size,
        max_soft_tokens=soft_tokens,
    )
    return Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=Gemma4ImageProcessor(do_normalize=False, **patching),
        tokenizer=tokenizer,
        video_processor=Gemma4VideoProcessor(**patching),
        chat_template=CHAT_TEMPLATE,
        image_seq_length=soft_tokens,
    )


def randomize_(model: Gemma4ForConditionalGeneration, seed: int) -> None:
    """Re-draw every weight from one seeded generator, in place.

    transformers' init leaves norm scales and the vision position table at exactly 1 and the
    decoder's `layer_scalar` buffers at 1, so a wrong load of them would go unnoticed; its std 0.02
    gives near-uniform logits at hidden 64. Here nothing is constant: norm scales 1 + 0.1·N(0,1),
    linears and the vision position table N(0, 1/last dim), the (tied) embedding N(0, 0.25²),
    layer scalars U(0.5, 1.5).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # a tied weight is listed once
            noise = torch.randn(param.shape, generator=gen)
            if param.ndim == 1:  # an RMSNorm scale, or a router's input / per-expert scale
                param.copy_(1.0 + _NORM_JITTER * noise)
            elif name.endswith("router.proj.weight"):  # decisive routing: no near-ties in the top-k
                param.copy_(_ROUTER_STD * noise)
            elif name.endswith("embed_tokens.weight"):
                param.copy_(_EMBED_STD * noise)
            else:
                param.copy_(noise / math.sqrt(param.shape[-1]))
        low, high = _LAYER_SCALAR_RANGE
        for name, buf in model.named_buffers():
            if name.endswith("layer_scalar"):
                buf.copy_(low + (high - low) * torch.rand(buf.shape, generator=gen))


def make_tiny(out_dir: Path, seed: int = 0, num_hidden_layers: int = 6, dtype: str = "float32",
              like: str = "31b") -> Path:
    """Write a random tiny Gemma4ForConditionalGeneration checkpoint with its processor to `out_dir`,
    structured like the published model `like` names (`TINY_LIKE`).

    The weights go into at least two safetensors shards with an index and without
    `lm_head.weight` (tied), as the 31B's do, so sharded and tied loading paths are exercised.
    The same arguments (and library versions) always give byte-identical files. `like` picks the
    family member's structure (`TINY_LIKE`); only the 31B's takes `num_hidden_layers`.
    """
    if dtype not in _DTYPES:
        raise UserError(f"make-tiny: dtype {dtype!r} is not supported; use one of {sorted(_DTYPES)}")
    if num_hidden_layers < 1:
        raise UserError(f"make-tiny: num_hidden_layers must be >= 1, got {num_hidden_layers}")
    if like not in TINY_LIKE:
        raise UserError(f"make-tiny: --like {like!r} is not a Gemma4 member it can build; use one of {sorted(TINY_LIKE)}")
    if like in FIXED_DEPTH and num_hidden_layers != 6:
        raise UserError(f"make-tiny: --like {like} has a fixed layer layout (6 layers); leave --layers at 6")
    out_dir = Path(out_dir)
    config = TINY_LIKE[like]() if like in FIXED_DEPTH else TINY_LIKE[like](num_hidden_layers=num_hidden_layers)
    with torch.random.fork_rng(devices=[]):  # the default init draws from the caller's global RNG
        model = Gemma4ForConditionalGeneration(config)
    randomize_(model, seed)
    model.to(_DTYPES[dtype])

    tokenizer = tiny_tokenizer()
    # like the instruction-tuned 31B, generation stops at <eos> or at the end of the model's turn
    end_of_turn = tokenizer.convert_tokens_to_ids(tokenizer.eot_token)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]

    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weight once
    model.save_pretrained(out_dir, max_shard_size=weight_bytes // 3)  # >= 3 shards, as a real checkpoint
    tiny_processor(config, tokenizer).save_pretrained(out_dir)
    return out_dir


# E2B / E4B: per-layer inputs (P = 16 and 8) and KV-shared layers; 6 layers, so that at pp 2 with the even
# split (layers 0-2 | 3-5) stored keys/values cross the stage boundary to the layers reusing them.
_S, _F = "sliding_attention", "full_attention"
# A tiny audio tower (not trained by the runner: its weights must pass through load and export).
TINY_AUDIO = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, subsampling_conv_channels=[4, 4],
                  conv_kernel_size=3, attention_chunk_size=4, attention_context_left=5, output_proj_dims=16)


def tiny_e2b_config() -> Gemma4Config:
    """E2B's structure: one KV head (replicated under TP), separate k and v on full layers, double-wide
    MLPs on the KV-shared layers 3-5, which reuse what layers 1 (sliding) and 2 (full) store; both
    producers sit on stage 0 of a pp-2 split, every consumer on stage 1. P = 16: at P = 8 this seed's
    image-batch gradients move 7e-4 under a 1e-7 weight perturbation (fp64), too ill-conditioned to
    compare fp32 gradients at 1e-4."""
    return tiny_config(text_overrides=dict(
        layer_types=[_S, _S, _F, _S, _S, _F], num_key_value_heads=1, num_global_key_value_heads=None,
        attention_k_eq_v=False, hidden_size_per_layer_input=16, num_kv_shared_layers=3, use_double_wide_mlp=True,
    ), audio_config=TINY_AUDIO)


def tiny_e4b_config() -> Gemma4Config:
    """E4B's structure: two KV heads, no double-wide MLP; layers 4-5 reuse what layers 3 (sliding,
    stage 1 at pp 2: stored and reused on one stage) and 2 (full, stage 0: carried across) store."""
    return tiny_config(text_overrides=dict(
        layer_types=[_S, _S, _F, _S, _S, _F], num_key_value_heads=2, num_global_key_value_heads=None,
        attention_k_eq_v=False, hidden_size_per_layer_input=8, num_kv_shared_layers=2,
    ), audio_config=TINY_AUDIO)


# `runner make-tiny --like NAME`: the tiny config of each family member; the E models' layer layout is fixed
TINY_LIKE = {"31b": tiny_config, "26b-a4b": tiny_moe_config, "e2b": tiny_e2b_config, "e4b": tiny_e4b_config}
FIXED_DEPTH = ("e2b", "e4b")
