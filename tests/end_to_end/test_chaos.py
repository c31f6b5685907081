"""A short chaos run on each stream: exact counts despite SIGKILLs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.end_to_end.conftest import REPOSITORY
from tests.helpers import require_service

# Enough chunks on each stream for the run to outlast every fault, which
# come 0.5 s apart: the SQLite run counts faster.
CHUNKS = {"sqlite": "80000", "rabbitmq": "30000"}


@pytest.mark.timeout(400)
@pytest.mark.parametrize("stream", ["sqlite", "rabbitmq"])
def test_chaos_run_counts_exactly(tmp_path: Path, stream: str) -> None:
    if stream == "rabbitmq":
        require_service("RabbitMQ", 5672)

    result = subprocess.run(
        [
            sys.executable,
            str(REPOSITORY / "scripts" / "chaos.py"),
            "--stream",
            stream,
            "--seed",
            "11",
            "--chunks",
            CHUNKS[stream],
            "--spacing",
            "0.5",
            "--folder",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=360,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "counts equal the single-process count" in result.stdout
    assert "SIGKILL worker" in result.stdout
    assert "SIGKILL master" in result.stdout
    assert result.stdout.count("SIGKILL node process") >= 1
