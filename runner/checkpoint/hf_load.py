"""Read an HF safetensors checkpoint into the pipeline, each rank only its own slices.

A rank opens only the files holding its stage's tensors and reads, through safetensors' lazy
slices, only its TP shard of each: host memory per rank is its shard, never the whole model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from runner.errors import UserError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class HFCheckpoint:
    """The tensor → file map of a local HF checkpoint directory (single file or sharded + index)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index = self.path / INDEX_NAME
        single = self.path / SINGLE_NAME
        if index.is_file():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif single.is_file():
            with safe_open(single, framework="pt") as f:
                self.weight_map = {k: SINGLE_NAME for k in f.keys()}
        else:
            raise UserError(f"{self.path}: no {INDEX_NAME} or {SINGLE_NAME}; point model.path at an HF checkpoint dir")
        self._open: dict[str, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _file(self, name: str):
        if name not in self.weight_map:
            raise UserError(f"{self.path}: tensor {name} is not in the checkpoint index; is it a Gemma4 checkpoint?")
        fname = self.weight_map[name]
        if fname not in self._open:
            fpath = self.path / fname
            if not fpath.is_file():
                raise UserError(f"{fpath}: shard file listed in {INDEX_NAME} is missing (needed for {name})")
            self._open[fname] = safe_open(fpath, framework="pt")
        return self._open[fname]

    def read_shard(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """This rank's slice of `name`, cut as `like` records (`tp_dim`, `tp_shards`, `tp_index`)."""
        f = self._file(name)
        sl = f.get_slice(name)
        full_shape = list(sl.get_shape())
        dim = getattr(like, "tp_dim", None)
        index: tuple[slice, ...] = tuple(slice(None) for _ in full_shape)
        expect = list(full_shape)
        if dim is not None:
            size, rem = divmod(full_shape[dim], like.tp_shards)
            if rem:
                raise UserError(f"{self.path / self.weight_map[name]}: {name} dim {dim} = {full_shape[dim]} "
                                f"does not split into {like.tp_shards} shards; check parallel.tp")
            start = like.tp_index * size
            index = index[:dim] + (slice(start, start + size),) + index[dim + 1:]
            expect[dim] = size
        if expect != list(like.shape):
            raise UserError(
                f"{self.path / self.weight_map[name]}: {name} has shape {full_shape}, the config expects "
                f"{self._full_shape(like)}; the checkpoint does not match its config.json"
            )
        return sl[index] if full_shape else f.get_tensor(name)

    @staticmethod
    def _full_shape(like: torch.Tensor) -> list[int]:
        shape = list(like.shape)
        dim = getattr(like, "tp_dim", None)
        if dim is not None:
            shape[dim] *= like.tp_shards
        return shape


@torch.no_grad()
def load_hf_weights(model, path: str | Path) -> int:
    """Fill every tensor of this rank's stage from the HF checkpoint at `path`; returns the count.

    The tied LM head maps to `model.language_model.embed_tokens.weight`, so a tied checkpoint
    (which has no `lm_head.weight`) fills the last stage's head from the embedding.
    """
    ckpt = HFCheckpoint(path)
    n = 0
    for name, tensor, _ in model.hf_tensors():
        tensor.copy_(ckpt.read_shard(name, tensor).to(tensor.dtype))
        n += 1
    return n
