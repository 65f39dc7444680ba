"""The ``megannm`` command itself: its help names every command, each command's --help works, a wrong command is one
line and exit 2, old command names still resolve, and the libraries' import-time notices are hidden unless
``--verbose``."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megannm.cli import ALIASES, COMMANDS, HELP, command, main

REPO = Path(__file__).resolve().parents[1]


def test_help_names_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == HELP and out.startswith("megannm: train native multimodal models")
    listed = {line.split()[0] for line in HELP.splitlines() if line.startswith("  ") and not line.startswith("   ")}
    assert set(COMMANDS) <= listed, set(COMMANDS) - listed
    assert main([]) == 2  # no command: the help on stderr, exit 2
    assert "COMMAND" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(set(COMMANDS) | set(ALIASES)))
def test_every_command_has_help(name, capsys):
    try:
        code = command(name)(["--help"])  # tokenizers prints its own help; the others are argparse's
    except SystemExit as e:
        code = e.code
    assert code in (0, None)
    out = capsys.readouterr().out
    assert "megannm" in out and len(out.splitlines()) >= 2


def test_unknown_command_is_one_line(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown command 'trian'" in err[0] and "train" in err[0]


def test_old_names_resolve():
    assert command("plan") is command("estimate")


@pytest.mark.parametrize("verbose", [False, True])
def test_library_notices_only_with_verbose(verbose):
    """megatron-core warns on import when Transformer Engine and apex are missing; the command hides it."""
    code = ("from megannm.cli.quiet import quiet_library_warnings\n"
            f"quiet_library_warnings({verbose})\n"
            "import megatron.core.optimizer\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    if verbose:
        try:
            import transformer_engine  # noqa: F401
            pytest.skip("Transformer Engine is installed: megatron-core has nothing to warn about")
        except ImportError:
            pass
        assert "Transformer Engine" in out.stderr
    else:
        assert "Transformer Engine" not in out.stderr and "Warning" not in out.stderr, out.stderr
