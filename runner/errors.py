"""The one exception type for bad user input."""


class UserError(ValueError):
    """Bad input (YAML, topology, checkpoint, image, sample): the message is one line naming what is
    wrong and how to fix it. The CLI prints it without a traceback and exits with code 2.

    `on_every_rank`: raised by every process of the job at once (a collective check), so only rank 0
    needs to print it."""

    def __init__(self, message: str, *, on_every_rank: bool = False) -> None:
        super().__init__(message)
        self.on_every_rank = on_every_rank
