"""Ctrl-C in any entry point is one line, whether it arrives while the entry point imports or while it works."""

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
