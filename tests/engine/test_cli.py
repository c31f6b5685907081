"""Tests of the `engine` command group: its command list and its entry points."""

from __future__ import annotations

import subprocess
import sys

from tests.end_to_end.conftest import engine_command


def _engine(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [engine_command(), *args], capture_output=True, text=True, timeout=60
    )


def _command_names(help_text: str) -> set[str]:
    _, _, listing = help_text.partition("Commands:")
    return {line.split()[0] for line in listing.splitlines() if line.strip()}


def test_help_lists_every_command() -> None:
    result = _engine("--help")

    assert result.returncode == 0, result.stderr
    names = _command_names(result.stdout)
    for name in ("run", "worker", "master", "status", "scale", "fail-queue"):
        assert name in names


def test_operator_command_loads_on_first_use() -> None:
    result = _engine("fail-queue", "--help")

    assert result.returncode == 0, result.stderr
    assert {"list", "show", "replay", "purge"} <= _command_names(result.stdout)


def test_unknown_command_exits_2() -> None:
    result = _engine("no-such-command")

    assert result.returncode == 2
    assert "No such command 'no-such-command'" in result.stderr


def test_python_m_engine_runs_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "engine", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert "version" in result.stdout
