"""The DeepSpeed checkpoint engine of the Gemma4 pipeline.

DeepSpeed picks its checkpoint engine from the config alone (`_configure_checkpointing`: torch,
fast writer, decoupled, DataStates) and afterwards reaches it only through the engine attribute
`checkpoint_engine`, at every save and load. `install` wraps the engine DeepSpeed chose in
`Gemma4CheckpointEngine`: writing stays DeepSpeed's, loading learns the model.

How the tied embedding/head travels through a native checkpoint: DeepSpeed writes a `TiedLayerSpec`
once, on the stage where it is a module (the embedding, layer 01); on the last stage the head is a
function of that module and has no layer file. So the head is absent from every native checkpoint,
and `PipelineModule.load_state_dir` fills it after the layer files by broadcasting the embedding
from the first stage (`_synchronize_tied_weights`). An untied head (`Gemma4LMHead`) is a layer of
its own, written and read as `lm_head.weight`; nothing ever copies the embedding into it. The HF
path applies the same rule in `hf_load.load_hf_weights`.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable

import torch
from deepspeed.pipe import PipelineModule
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointCommitInfo, CheckpointEngine
from torch import nn

from runner.errors import UserError

LAYER_FILE = re.compile(r"^layer_(\d+)-")


def stage_layers(model: PipelineModule) -> dict[int, nn.Module]:
    """Global layer index → module, for this stage's layers that DeepSpeed writes a file for (a
    tied spec with a `forward_fn` — the tied head — is a function here and gets none)."""
    layers = {}
    for i, layer in enumerate(model.forward_funcs):
        if isinstance(layer, nn.Module):
            layers[int(LAYER_FILE.match(os.path.basename(model.ckpt_layer_path("", i)))[1])] = layer
    return layers


DAMAGED = ("the checkpoint is damaged (a save cut short, a file truncated or deleted): resume from another "
           "one (checkpoint.resume=DIR/step_N), or move it away")


def read_file(path: str | os.PathLike, load: Callable[..., dict] = torch.load, **kwargs) -> dict:
    """`load(path)` (torch.load, or the configured engine's own), with a missing or unreadable file
    as one line naming it instead of a deserializer's trace."""
    try:
        return load(path, **kwargs)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: cannot be read ({reason}); {DAMAGED}") from None


def check_layer_state(layer: nn.Module, state: dict, path: str,
                      keep: Callable[[torch.Tensor], bool] = lambda t: True) -> None:
    """One clear line, naming file and HF tensor, when a layer file does not fit the layer it is
    loaded into (DeepSpeed's own strict load names neither); `keep`: which tensors checkpoints hold."""
    prefix = getattr(layer, "hf_prefix", "")
    expected = {k: t for k, t in layer.state_dict(keep_vars=True).items() if keep(t)}
    for names, problem in ((expected.keys() - state.keys(), "is missing"), (state.keys() - expected.keys(), "is unexpected")):
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            raise UserError(f"{path}: {prefix}{sorted(names)[0]} {problem}{more}; the checkpoint was saved from "
                            f"a different model config — resume with the config it was trained with")
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise UserError(f"{path}: {prefix}{key} has shape {list(state[key].shape)}, this rank expects "
                            f"{list(tensor.shape)}; a checkpoint continues at another layout only through "
                            f"`runner export` and a fresh start from the export")


class Gemma4CheckpointEngine(CheckpointEngine):
    """DeepSpeed's configured checkpoint engine, plus knowledge of the Gemma4 pipeline on load.

    Writing (create / makedirs / save / commit) is delegated unchanged. `load` is what the
    pipeline engine calls for the engine state file and once per layer file (twice for TP rank 0's
    file: DeepSpeed's loader opens the first file of a layer to inspect it); a layer file is checked
    against the module it fills, so a wrong config or layout is one line naming file and tensor
    instead of a size-mismatch trace. Decoupled (asynchronous) writers are refused: `native.save`
    moves `latest` only after every rank's files exist, which needs synchronous commits.
    """

    def __init__(self, model: PipelineModule, inner: CheckpointEngine) -> None:
        super().__init__()
        if inner.is_decoupled():
            raise UserError("checkpoint.writer.decoupled is not supported: `latest` must move only after every "
                            "rank finished writing; remove the decoupled writer from the DeepSpeed config")
        self.name = f"Gemma4({inner.name})"
        self.inner = inner
        self.model = model
        self.layers = stage_layers(model)

    def create(self, info: CheckpointCommitInfo) -> None:
        self.inner.create(info)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.inner.makedirs(path, exist_ok=exist_ok)

    def save(self, state_dict: dict, path: str) -> None:
        self.inner.save(state_dict, path)

    def commit(self, info: CheckpointCommitInfo) -> bool:
        return self.inner.commit(info)

    def is_data_parallel_writer(self, dp_rank: int) -> bool:
        return self.inner.is_data_parallel_writer(dp_rank)

    def preserves_storage_sharing(self) -> bool:
        return self.inner.preserves_storage_sharing()

    def load(self, path: str, map_location=None) -> dict:
        state = read_file(path, self.inner.load, map_location=map_location)
        match = LAYER_FILE.match(os.path.basename(path))
        if match:
            check_layer_state(self.layers[int(match[1])], state, path, self.model.checkpointed)
        return state


def install(engine) -> Gemma4CheckpointEngine:
    """Plug `Gemma4CheckpointEngine` into a DeepSpeed pipeline engine (idempotent); call once
    after `deepspeed.initialize` — `native.save` and `native.resume` also call it."""
    if not isinstance(engine.checkpoint_engine, Gemma4CheckpointEngine):
        engine.checkpoint_engine = Gemma4CheckpointEngine(engine.module, engine.checkpoint_engine)
    return engine.checkpoint_engine
