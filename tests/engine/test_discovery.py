"""Tests of the discovery files that lead the control commands to an API."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.discovery import DiscoveryFile


def read(folder: Path) -> dict:
    return json.loads((folder / "control.json").read_text())


def test_discovery_keeps_file_of_running_process(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "control.json").write_text(
            json.dumps({"api": "http://127.0.0.1:7601", "pid": other.pid})
        )
        second = DiscoveryFile("http://127.0.0.1:7602", b"token", ["p"], tmp_path)

        is_written = second.write()

        assert is_written is False
        assert read(tmp_path)["pid"] == other.pid
        assert not (tmp_path / "control.token").exists()
        assert "pass --api http://127.0.0.1:7602" in caplog.text
    finally:
        other.kill()
        other.wait()


def test_discovery_replaces_file_of_ended_process(tmp_path: Path) -> None:
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    (tmp_path / "control.json").write_text(
        json.dumps({"api": "http://127.0.0.1:7601", "pid": ended.pid})
    )
    discovery = DiscoveryFile("http://127.0.0.1:7602", b"token", ["p"], tmp_path)

    is_written = discovery.write()

    assert is_written is True
    assert read(tmp_path)["api"] == "http://127.0.0.1:7602"
    assert (tmp_path / "control.token").read_bytes() == b"token\n"
