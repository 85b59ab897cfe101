"""Errors that mean "bad usage or bad input".

The CLI turns a :class:`SharpscopeError` into one line on stderr and exit code 2
(docs/design.md, "Contracts"); anything else is an unexpected failure (exit 1).
"""


class SharpscopeError(Exception):
    """Bad usage or bad input: the message is shown to the user as is."""


class SharpscopeWarning(UserWarning):
    """Something the user should know, the work going on (the command line prints it as
    one line: ``sharpscope COMMAND: warning: ...``)."""


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type's name if it has none): what a
    one-line error says of an exception from torch or numpy."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
