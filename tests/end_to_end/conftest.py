"""Fixtures for whole runs through the installed `engine` command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]
EXAMPLES = REPOSITORY / "examples"


def engine_command() -> str:
    """Return the path of the installed `engine` console script."""
    beside_python = Path(sys.executable).parent / "engine"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("engine")
    if found is None:
        pytest.fail("the engine console script is not installed; run pip install -e .")
    return found


def run_engine(
    *args: str, cwd: Path, timeout_s: float = 90.0
) -> subprocess.CompletedProcess[str]:
    """Run `engine ARGS...` in `cwd` and return its exit code and output."""
    environment = dict(os.environ)
    environment.pop("MONOMYTH_SECRET", None)
    return subprocess.run(
        [engine_command(), *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def write_pipeline(tmp_path: Path):
    """Yield a function that writes a pipeline file into the test's folder."""

    def write(source: str, name: str = "pipeline.py") -> Path:
        path = tmp_path / name
        path.write_text(source)
        return path

    return write
