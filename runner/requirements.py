"""The installed libraries against the tested ranges pyproject.toml declares, before anything imports them.

pip enforces the ranges at install time only: a later `pip install -U transformers`, a `--no-deps` install
or a cluster image's preinstalled DeepSpeed can leave a release outside them, and the first sign would be
an ImportError deep in a traceback or, worse, silently wrong gradients. So every command first reads the
installed versions (package metadata: no import) and stops with one line on a release below a range, and
warns once on one above it (untested, may work).
"""

from __future__ import annotations

import os
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

from runner.errors import UserError

DISTRIBUTION = "gemma4-tp-pp-runner"
PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"

# Why a lower bound is where it is, where a release below it runs but computes something else
BELOW_BOUND_EFFECT = {
    "deepspeed": "before 0.19.3 its pipeline divides the gradients of every stage but the last by the "
                 "accumulation steps twice; 0.19.3 to 0.19.7 fail in activation checkpointing on CPU",
}


def declared() -> list[Requirement]:
    """The runtime requirements: the source checkout's pyproject.toml (an editable install's metadata keeps
    the ranges of the day it was installed), else the installed distribution's metadata."""
    texts: list[str] = []
    try:
        import tomllib  # Python 3.11+

        with PYPROJECT.open("rb") as f:
            project = tomllib.load(f).get("project", {})
        if project.get("name") == DISTRIBUTION:
            texts = project.get("dependencies", [])
    except (ImportError, OSError):
        pass
    if not texts:
        try:
            texts = metadata.requires(DISTRIBUTION) or []
        except metadata.PackageNotFoundError:
            return []
    return [r for r in map(Requirement, texts) if r.marker is None]


def check_requirements() -> None:
    """Raise one `UserError` naming the first installed library older than its range and the pip command that
    fixes it; print one warning line (rank 0) per library newer than its range."""
    for req in declared():
        if not req.specifier:
            continue
        try:
            installed = metadata.version(req.name)
        except metadata.PackageNotFoundError:  # left to the import that needs it (datasets: Hub and Arrow data only)
            continue
        try:
            version = Version(installed)
        except InvalidVersion:  # a local build's own version string: nothing to compare
            continue
        if req.specifier.contains(version, prereleases=True):
            continue
        lows = [Version(s.version) for s in req.specifier if s.operator == ">="]
        if lows and version < min(lows):
            effect = f" ({BELOW_BOUND_EFFECT[req.name]})" if req.name in BELOW_BOUND_EFFECT else ""
            raise UserError(f"{req.name} {installed} is installed, older than the tested range {req.specifier}"
                            f"{effect}: pip install '{req}'", on_every_rank=True)
        if os.environ.get("RANK", "0") == "0":
            print(f"warning: {req.name} {installed} is newer than the tested range {req.specifier}; if something "
                  f"fails, pip install '{req}'", file=sys.stderr)
