"""What `runner train` leaves on the console: the runner's own lines, and of the libraries' only what
a user can act on. `--verbose` (or RUNNER_VERBOSE=1 in the environment, for launchers) keeps every
library message and every process's bad-sample lines.

Each message a 4-process CPU run printed, and what happens to it here:
- torch `UserWarning: c10d::broadcast_: an autograd kernel was not registered ... may lead to silently
  incorrect behavior`, once per process: see `_TIED_WEIGHT_BROADCAST`; filtered.
- DeepSpeed `deepspeed_shm_comm_op built successfully` per process (after minutes of compiling) and
  torch's `No CUDA runtime is found, using CUDA_HOME=...` from the compile: the op is not built at all
  on CPU (`runner.compat.skip_deepspeed_shm_comm`).
- DeepSpeed's `Using topology: {...}` and `SEED_LAYERS=...` (print() on rank 0, no switch): dropped
  around the calls that print them (`runner.compat.deepspeed_prints_dropped`).
- DeepSpeed's INFO logging (accelerator, engine and config dumps on releases whose logger starts at
  INFO): its logger at WARNING; warnings and errors still show.
- Bad samples: one line per sample and a summary per epoch (`runner.data.loader.BadSampleReport`).
- datasets' "Generating train split" bars stay: once per dataset and cache, progress of real work.
"""

from __future__ import annotations

import logging
import os
import warnings

VERBOSE_ENV = "RUNNER_VERBOSE"

# DeepSpeed's PipelineModule broadcasts each tied weight (here the embedding, held by the first and the
# last stage as the head) from its first holder when the module is built (`_synchronize_tied_weights`),
# outside `torch.no_grad()`. c10d's in-place `broadcast_` has no autograd kernel, so torch's fallback
# marks the parameter and warns when the first backward reaches it. The broadcast only sets the
# weight's starting value before any forward: it is not part of the computed function, the parameter
# stays a leaf and gets its gradient as usual (tests/test_parity.py checks every parameter's gradient
# against transformers; DeepSpeed all-reduces the tied copies' gradients itself). Harmless here.
_TIED_WEIGHT_BROADCAST = r"c10d::broadcast_: an autograd kernel was not registered to the Autograd key"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def set_verbose(on: bool) -> None:
    """`runner train --verbose`: also for what this process starts (loader workers, the export)."""
    if on:
        os.environ[VERBOSE_ENV] = "1"


def quiet_libraries() -> None:
    """Silence, at their sources, the library messages that need no action (nothing when verbose).
    Call before the process group and the model are built."""
    if verbose():
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.INFO)
        for handler in ds_logger.handlers:
            handler.setLevel(logging.INFO)
        return
    warnings.filterwarnings("ignore", message=_TIED_WEIGHT_BROADCAST, category=UserWarning)
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
