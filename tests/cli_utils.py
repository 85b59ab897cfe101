"""The command line's contract for bad input, as one check (for tests)."""

from __future__ import annotations

from sharpscope.cli import main


def exit2(argv: list[str], capsys) -> str:
    """Run ``sharpscope ARGV``: it must exit with code 2 and one line on stderr, no
    traceback. Returns that line."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err
