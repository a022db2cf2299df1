"""Errors a user can act on. The CLI prints their message as one line, never a traceback."""


class RetfmError(Exception):
    """Bad input or a failed precondition, explained in one line that names the file and the reason."""
