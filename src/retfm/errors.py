"""Errors a user can act on. The CLI prints their message as one line, never a traceback."""


class RetfmError(Exception):
    """Bad input or a failed precondition, explained in one line that names the file and the reason."""


class RetfmWarning(UserWarning):
    """Something the user should know that does not stop the work (the CLI prints it as one line)."""
