"""One line for the user: Ctrl-C in any entry point (while it imports or while it works), JSON errors."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ctrl_c_while_importing_is_one_line():
    code = "import megatron_patch\nraise KeyboardInterrupt"  # what Ctrl-C during `import megatron.core` amounts to
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.stderr == "interrupted (Ctrl-C)\n"
    assert result.returncode == -signal.SIGINT  # the shell reports 130, as for any program stopped by Ctrl-C


def test_ctrl_c_in_a_cli_is_one_line(capsys):
    from megatron_patch.errors import run_reporting_errors

    def interrupted():
        raise KeyboardInterrupt

    assert run_reporting_errors(interrupted) == 130
    assert capsys.readouterr().err == "interrupted (Ctrl-C)\n"


def test_json_error_reads_once_at_column():
    """'Unterminated string starting at at column 7' was the message: json's text already ends in 'at'."""
    import pytest

    from megatron_patch.data.jsonl import json_object
    from megatron_patch.errors import BadLineError

    with pytest.raises(BadLineError) as error:
        json_object('{"text": "abc', 3)
    assert str(error.value) == "line 3: not valid JSON (Unterminated string starting at column 10)"
