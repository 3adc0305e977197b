"""The one exception type for bad user input."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class UserError(ValueError):
    """Bad input (YAML, topology, checkpoint, image, sample): the message is one line naming what is
    wrong and how to fix it. The CLI prints it without a traceback and exits with code 2.

    `on_every_rank`: every process of the job raises this same error (it follows from the recipe
    alone, or from a collective check), so one process prints it; any other error is printed by
    each process that hits it."""

    def __init__(self, message: str, *, on_every_rank: bool = False) -> None:
        super().__init__(message)
        self.on_every_rank = on_every_rank


@contextlib.contextmanager
def from_the_recipe() -> Iterator[None]:
    """Checks that depend on the recipe and config alone: every process raises the same error."""
    try:
        yield
    except UserError as err:
        err.on_every_rank = True
        raise
