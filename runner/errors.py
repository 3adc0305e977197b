"""The one exception type for bad user input."""


class UserError(ValueError):
    """Bad input (YAML, topology, checkpoint, image, sample): the message is one line naming what is
    wrong and how to fix it. The CLI prints it without a traceback and exits with code 2."""
