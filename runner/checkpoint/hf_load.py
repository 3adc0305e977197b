"""Read an HF safetensors checkpoint into the pipeline, each rank only its own slices.

A rank opens only the files holding its stage's tensors and reads, through safetensors' lazy
slices, only its TP shard of each: host memory per rank is its shard, never the whole model.
Every way the checkpoint can disagree with its config (a shard file gone, a tensor missing from the
index, a shape or dtype the config does not produce) is one `UserError` naming file and tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from safetensors import safe_open

from runner.errors import UserError
from runner.parallel.tensor_parallel import shard_shape, take_shard

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# What a Gemma4 run needs from a Hub repo: weights, config, tokenizer, processor, chat template.
HUB_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "*.model", "*.txt"]
# safetensors dtype codes of the float formats a checkpoint may hold (cast to the model's dtype).
FLOAT_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A local checkpoint directory for `name_or_path`: the directory itself, or a Hub id resolved
    through huggingface_hub's cache (downloading only when the Hub is reachable)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or str(name_or_path).startswith((".", "~")) or str(name_or_path).count("/") > 1:
        raise UserError(f"model {name_or_path}: no such directory (and not a Hub id such as google/gemma-4-31B-it)")
    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=HUB_PATTERNS))
    except (HfHubHTTPError, HFValidationError, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(
            f"model {name_or_path}: not a local directory and not fetchable from the Hugging Face Hub "
            f"({reason}); download it where the Hub is reachable (`hf download {name_or_path}`) and "
            f"point model.path at that directory or the HF cache"
        ) from None


def _declared_dtype(config_dir: Path) -> torch.dtype | None:
    """The dtype config.json declares for the weights (None when it declares none)."""
    config = config_dir / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    name = data.get("dtype", data.get("torch_dtype"))
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) else None


class HFCheckpoint:
    """The tensor → file map of an HF checkpoint (local dir or Hub id; single file or sharded + index)."""

    def __init__(self, path: str | Path) -> None:
        self.path = resolve_model_dir(path)
        index = self.path / INDEX_NAME
        single = self.path / SINGLE_NAME
        if index.is_file():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif single.is_file():
            with safe_open(single, framework="pt") as f:
                self.weight_map = {k: SINGLE_NAME for k in f.keys()}
        else:
            raise UserError(f"{self.path}: no {INDEX_NAME} or {SINGLE_NAME}; point model.path at an HF checkpoint dir")
        self.config_dtype = _declared_dtype(self.path)
        self._open: dict[str, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def file(self, name: str) -> Path:
        """The shard file that holds `name`."""
        if name not in self.weight_map:
            raise UserError(f"{self.path}: tensor {name} is not in the checkpoint index; is it a Gemma4 checkpoint?")
        return self.path / self.weight_map[name]

    def _handle(self, name: str):
        fpath = self.file(name)
        if fpath.name not in self._open:
            if not fpath.is_file():
                raise UserError(f"{fpath}: shard file listed in {INDEX_NAME} is missing (needed for {name})")
            self._open[fpath.name] = safe_open(fpath, framework="pt")
        return self._open[fpath.name]

    def dtype(self, name: str) -> torch.dtype:
        """The dtype `name` is stored in; refuses non-float tensors and ones config.json does not declare."""
        code = self._handle(name).get_slice(name).get_dtype()
        dtype = FLOAT_DTYPES.get(code)
        if dtype is None:
            raise UserError(f"{self.file(name)}: {name} is stored as {code}; only {sorted(FLOAT_DTYPES)} "
                            f"checkpoints load (a quantized checkpoint must be dequantized first)")
        if self.config_dtype is not None and dtype != self.config_dtype:
            raise UserError(f"{self.file(name)}: {name} is stored as {dtype} but config.json declares "
                            f"{self.config_dtype}; re-save the checkpoint in one dtype or fix config.json's dtype")
        return dtype

    def read_full(self, name: str) -> torch.Tensor:
        """The whole tensor `name`, in the file's dtype (checked against config.json)."""
        self.dtype(name)
        return self._handle(name).get_tensor(name)

    def read_shard(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """This rank's slice of `name`, cut as `like` records (`tp_cuts`: one range per cut, two for a
        fused gate_up's gate and up rows), in the file's dtype (checked against config.json)."""
        self.dtype(name)
        sl = self._handle(name).get_slice(name)
        full_shape = list(sl.get_shape())
        try:
            expect = shard_shape(full_shape, like)
        except ValueError as err:
            raise UserError(f"{self.file(name)}: {name} {err}; check parallel.tp and parallel.ep") from None
        if expect != list(like.shape):
            raise UserError(
                f"{self.file(name)}: {name} has shape {full_shape}, the config expects "
                f"{full_shape_of(like)}; the checkpoint does not match its config.json"
            )
        return take_shard(sl, like) if full_shape else self._handle(name).get_tensor(name)


def full_shape_of(like: torch.Tensor) -> list[int]:
    """The unsharded shape of a TP-sharded tensor."""
    shape = list(like.shape)
    for dim, shards, _ in getattr(like, "tp_cuts", ()):
        shape[dim] *= shards
    return shape


@torch.no_grad()
def load_hf_weights(model, path: str | Path) -> int:
    """Fill every tensor of this rank's stage from the HF checkpoint at `path` (cast to the model's
    dtype); returns the count. Call before `deepspeed.initialize` (optimizers copy weights there).

    Tied models: the last stage's head is the embedding module, named
    `model.language_model.embed_tokens.weight`, so it is read from the embedding's bytes — an HF
    tied checkpoint has no `lm_head.weight` (one that has it anyway is ignored, as transformers
    does). Untied models (`tie_word_embeddings: false`) read their own `lm_head.weight`.
    """
    ckpt = HFCheckpoint(path)
    n = 0
    for name, tensor, _ in model.hf_tensors():
        if name not in ckpt and name.startswith("lm_head."):
            raise UserError(f"{ckpt.path}: config.json unties the LM head (tie_word_embeddings: false) but the "
                            f"checkpoint has no {name}; use a tied config or a checkpoint with its own head")
        tensor.copy_(ckpt.read_shard(name, tensor).to(tensor.dtype))
        n += 1
    return n
