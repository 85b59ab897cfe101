"""Errors that mean "bad usage or bad input".

The CLI turns a :class:`SharpscopeError` into one line on stderr and exit code 2
(DESIGN.md, "Exit codes"); anything else is an unexpected failure (exit 1).
"""


class SharpscopeError(Exception):
    """Bad usage or bad input: the message is shown to the user as is."""
