"""`runner make-tiny`: a tiny random Gemma4 checkpoint that loads like the real 31B and is not degenerate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor, Gemma4ForConditionalGeneration

from runner.cli import main as cli_main
from runner.errors import UserError
from runner.models.gemma4.tiny import (
    TINY_IMAGE_SOFT_TOKENS,
    TINY_TOKEN_IDS,
    TINY_TOKEN_STRINGS,
    TINY_VOCAB_SIZE,
    make_tiny,
)

torch.set_num_threads(1)

QUESTION = "What abnormality is seen in the CT scan of the chest?"
ANSWER = "There is a large mass in the right upper lobe of the lung."


def _tensors(out_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, read shard by shard through the index."""
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(out_dir / shard), framework="pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})
    return tensors


def _chat(images: list[Image.Image]) -> list[dict]:
    user = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": QUESTION}]
    system = [{"type": "text", "text": "Answer the question about the medical image."}]
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": user},
        {"role": "assistant", "content": [{"type": "text", "text": ANSWER}]},
    ]


@pytest.fixture(scope="module")
def model(tiny_ckpt: Path) -> Gemma4ForConditionalGeneration:
    return AutoModelForImageTextToText.from_pretrained(tiny_ckpt).eval()


@pytest.fixture(scope="module")
def processor(tiny_ckpt: Path):
    return AutoProcessor.from_pretrained(tiny_ckpt)


@pytest.fixture(scope="module")
def batch(processor) -> dict[str, torch.Tensor]:
    images = [
        Image.new("RGB", (200, 150), (120, 30, 200)),
        Image.radial_gradient("L").convert("RGB").resize((64, 300)),
    ]
    return processor.apply_chat_template(_chat(images), tokenize=True, return_dict=True, return_tensors="pt")


def test_sharded_tied_checkpoint_files(tiny_ckpt: Path) -> None:
    index = json.loads((tiny_ckpt / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 2
    assert all((tiny_ckpt / shard).is_file() for shard in shards)
    assert "lm_head.weight" not in index["weight_map"]
    assert "lm_head.weight" not in _tensors(tiny_ckpt)
    config = json.loads((tiny_ckpt / "config.json").read_text())
    assert config["architectures"] == ["Gemma4ForConditionalGeneration"]
    assert config["dtype"] == "float32"
    assert config["text_config"]["vocab_size"] == TINY_VOCAB_SIZE
    assert config["vision_config"]["default_output_length"] == TINY_IMAGE_SOFT_TOKENS
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        assert (tiny_ckpt / name).is_file(), name


@pytest.mark.compat
def test_loads_without_missing_or_unexpected_keys(tiny_ckpt: Path) -> None:
    model, info = AutoModelForImageTextToText.from_pretrained(tiny_ckpt, output_loading_info=True)
    assert isinstance(model, Gemma4ForConditionalGeneration)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    embed = model.get_input_embeddings().weight
    assert model.lm_head.weight.data_ptr() == embed.data_ptr()
    saved = _tensors(tiny_ckpt)
    loaded = model.state_dict()
    for key, tensor in saved.items():  # layer_scalar buffers included
        assert torch.equal(loaded[key], tensor), key


def test_weights_are_not_degenerate(tiny_ckpt: Path) -> None:
    tensors = _tensors(tiny_ckpt)
    for key, tensor in tensors.items():
        assert tensor.numel() == 1 or tensor.float().std() > 1e-3, f"{key} is constant"
        assert tensor.abs().max() > 0, f"{key} is all zero"
    scalars = [t.item() for key, t in tensors.items() if key.endswith("layer_scalar")]
    assert len(scalars) == 6 and len(set(scalars)) == 6
    assert all(0.5 <= s <= 1.5 and s != 1.0 for s in scalars)
    norms = [t for key, t in tensors.items() if key.endswith("norm.weight")]
    assert norms and not any(torch.all(t == 1) for t in norms)


def test_tokenizer_special_tokens(processor) -> None:
    tok = processor.tokenizer
    for name, token_id in TINY_TOKEN_IDS.items():
        assert tok.convert_tokens_to_ids(TINY_TOKEN_STRINGS[name]) == token_id, name
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    for attr in ("image_token", "boi_token", "eoi_token", "audio_token", "boa_token", "eoa_token"):
        assert getattr(tok, attr), attr
    assert len(tok) <= TINY_VOCAB_SIZE
    for turn_token in ("<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|think|>"):
        assert tok.convert_tokens_to_ids(turn_token) not in (None, tok.unk_token_id), turn_token
    ids = tok(f"{QUESTION} {ANSWER} 45 year old, L4-L5.", add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert len(ids) < 40  # whole words, not one token per character
    assert tok.decode(ids) == f"{QUESTION} {ANSWER} 45 year old, L4-L5."


def test_chat_template_renders_gemma4_turns(processor) -> None:
    text = processor.apply_chat_template(_chat([Image.new("RGB", (32, 32))])[:2], add_generation_prompt=True)
    assert text == (
        "<bos><|turn>system\nAnswer the question about the medical image.<turn|>\n"
        f"<|turn>user\n<|image|>{QUESTION}<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    )
    thinking = processor.apply_chat_template([{"role": "user", "content": "Hi"}], enable_thinking=True)
    assert thinking == "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHi<turn|>\n"


def test_processed_chat_matches_vision_tower(batch, model) -> None:
    for key in ("input_ids", "attention_mask", "pixel_values", "image_position_ids", "mm_token_type_ids"):
        assert key in batch, key
    ids = batch["input_ids"][0].tolist()
    assert ids[0] == TINY_TOKEN_IDS["bos"]
    assert ids.count(TINY_TOKEN_IDS["boi"]) == ids.count(TINY_TOKEN_IDS["eoi"]) == 2
    image_token = TINY_TOKEN_IDS["image"]
    assert torch.equal(batch["mm_token_type_ids"][0].bool(), batch["input_ids"][0] == image_token)
    # image tokens per image: the runs between <|image> and <image|>
    per_image, count = [], None
    for token in ids:
        if token == TINY_TOKEN_IDS["boi"]:
            count = 0
        elif token == TINY_TOKEN_IDS["eoi"]:
            per_image.append(count)
            count = None
        elif count is not None:
            assert token == image_token
            count += 1
    with torch.no_grad():
        features = model.model.get_image_features(
            pixel_values=batch["pixel_values"], image_position_ids=batch["image_position_ids"]
        ).pooler_output
    assert per_image == [f.shape[0] for f in features]
    assert all(0 < n <= TINY_IMAGE_SOFT_TOKENS for n in per_image)
    assert per_image[0] != per_image[1]  # the two aspect ratios give different soft-token counts


@pytest.mark.compat
def test_forward_loss_is_finite_and_not_uniform(batch, model) -> None:
    labels = batch["input_ids"].masked_fill(batch["mm_token_type_ids"].bool(), -100)
    with torch.no_grad():
        out = model(**batch, labels=labels)
    assert torch.isfinite(out.loss)
    assert abs(out.loss.item() - math.log(TINY_VOCAB_SIZE)) > 1.0, out.loss.item()
    assert out.logits.float().std(dim=-1).mean() > 1.0


def test_same_seed_is_bit_identical(tmp_path: Path) -> None:
    a = make_tiny(tmp_path / "a", seed=7, num_hidden_layers=7)
    b = make_tiny(tmp_path / "b", seed=7, num_hidden_layers=7)
    c = make_tiny(tmp_path / "c", seed=8, num_hidden_layers=7)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ta, tc = _tensors(a), _tensors(c)
    assert ta.keys() == tc.keys()
    assert all(not torch.equal(ta[key], tc[key]) for key in ta)


def test_cli_writes_bfloat16(tmp_path: Path) -> None:
    assert cli_main(["make-tiny", str(tmp_path), "--seed", "3", "--layers", "2", "--dtype", "bfloat16"]) == 0
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    tensors = _tensors(tmp_path)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    model = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert model.dtype == torch.bfloat16
    assert model.config.text_config.layer_types == ["sliding_attention", "full_attention"]  # last layer is full


def test_rejects_unknown_dtype(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="dtype"):
        make_tiny(tmp_path, dtype="float16")


@pytest.mark.parametrize("argv,words", [
    (["make-tiny", "out", "--like", "bogus"], ["runner make-tiny", "--like", "'bogus'", "e2b", "runner make-tiny --help"]),
    (["train"], ["runner train", "recipe", "runner train --help"]),
    (["bogus"], ["runner:", "'bogus'", "make-tiny", "runner --help"]),
])
def test_command_line_mistakes_are_one_line(capsys, argv, words) -> None:
    """A wrong argument is one `error:` line naming the command's --help, exit 2, no usage block."""
    with pytest.raises(SystemExit) as stop:
        cli_main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert all(w in err for w in words), err
