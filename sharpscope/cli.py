"""The ``sharpscope`` command line: parsing and printing only; the work is in the API.

Exit codes (docs/design.md): 0 success; 2 bad usage or bad input, one line on stderr
and no traceback; 1 an unexpected failure; 130 interrupted by the user.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import warnings
from collections.abc import Sequence

from .errors import SharpscopeError, SharpscopeWarning

_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.I)

# Each subcommand lives in sharpscope/commands/<name>.py with register(subparsers).
COMMANDS = ("train", "measure", "landscape", "plot", "compare", "demo")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr and exit code 2, and which
    reads every negative number as a value (``--range -1e-3 1e-3``, ``-inf``), not only
    the plain ``-1`` and ``-0.5`` that argparse knows."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> ArgumentParser:
    from . import __version__

    parser = ArgumentParser(
        prog="sharpscope",
        description="Train with SAM or SGD, measure sharpness and Hessian spectra, "
        "and draw loss landscapes.",
    )
    parser.add_argument("--version", action="version", version=f"sharpscope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    for name in COMMANDS:
        importlib.import_module(f".commands.{name}", __package__).register(sub)
    parser.set_defaults(_subparsers=sub.choices)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the subcommand's parser, which names itself
        command = args._subparsers.get(getattr(args, "command", None) or "", parser)
        command.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        print(
            f"usage: sharpscope COMMAND ... ({', '.join(COMMANDS)}); sharpscope --help for more",
            file=sys.stderr,
        )
        return 2
    # What followed the command name: a command can tell the options given from defaults.
    args._argv = argv[argv.index(args.command) + 1 :]
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings(args.command, warnings.showwarning)
            return int(args.func(args) or 0)
    except SharpscopeError as exc:
        print(f"sharpscope {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path that cannot be written or read, a full disk
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"sharpscope {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sharpscope {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line_warnings(command: str, show):
    """A ``warnings.showwarning`` that prints a :class:`SharpscopeWarning` as one line,
    ``sharpscope COMMAND: warning: ...``, and leaves the others to ``show``."""

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, SharpscopeWarning):
            print(f"sharpscope {command}: warning: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    return showwarning


if __name__ == "__main__":
    sys.exit(main())
