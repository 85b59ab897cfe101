import subprocess
import sys

import pytest

from sharpscope.cli import main


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().err


def test_unknown_command_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice" in err


def test_python_dash_m_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "sharpscope", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.startswith("sharpscope ")
