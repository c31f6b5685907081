"""Tests of `engine fail-queue replay` against a real SQLite stream.

The fail records are written straight to the stream, as a node writes them,
so that each test controls exactly what the fail queue contains.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from engine.items import unpack
from engine.streams import open_stream
from tests.end_to_end.conftest import engine_command

FAIL_QUEUE = "demo.double-fail"
INPUT_QUEUE = "demo.numbers-to-double"


def record(item_id: str, queue: str | None, message: str) -> bytes:
    """Return a fail record as the runtime writes it."""
    failure: dict[str, Any] = {
        "id": item_id,
        "attempt": 3,
        "payload": item_id,
        "errors": [{"node": "double", "type": "ValueError", "message": message}],
        "queue": queue,
    }
    return json.dumps(failure).encode()


def fill_fail_queue(url: str, records: list[bytes]) -> None:
    stream = open_stream(url, owner="test")
    try:
        stream.declare([FAIL_QUEUE, INPUT_QUEUE])
        stream.publish([(FAIL_QUEUE, body) for body in records])
    finally:
        stream.close()


def read_queue(url: str, queue: str) -> list[dict[str, Any]]:
    stream = open_stream(url, owner="test")
    try:
        deliveries = stream.pull([queue], 100, 0.0)
        stream.reject(deliveries, requeue=True)
    finally:
        stream.close()
    return [
        envelope
        for delivery in deliveries
        for envelope in unpack(delivery.body, "json")
    ]


def replay(url: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [engine_command(), "fail-queue", "replay", "demo.double", "--stream", url],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_replay_puts_each_item_back_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/stream.db"
    fill_fail_queue(
        url,
        [
            record("numbers:1", INPUT_QUEUE, "first run"),
            record("numbers:2", INPUT_QUEUE, "first run"),
            record("numbers:1", INPUT_QUEUE, "second run"),
        ],
    )

    result = replay(url, tmp_path)

    assert result.returncode == 0, result.stderr
    assert "replayed 2 items" in result.stdout
    assert "deleted 1 older records" in result.stdout
    replayed = read_queue(url, INPUT_QUEUE)
    assert sorted(item["id"] for item in replayed) == ["numbers:1", "numbers:2"]
    newest = next(item for item in replayed if item["id"] == "numbers:1")
    assert newest["errors"][-1]["message"] == "second run"
    assert all(item["attempt"] == 1 for item in replayed)
    assert read_queue(url, FAIL_QUEUE) == []


def test_replay_sums_up_source_items(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/stream.db"
    fill_fail_queue(
        url,
        [record(f"numbers:{index}", None, "route failed") for index in range(7)],
    )

    result = replay(url, tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stderr.count("skipped") == 1
    assert "skipped 7 items that failed in a source" in result.stderr
    assert "numbers:0, numbers:1, numbers:2, numbers:3, numbers:4" in result.stderr
    assert "and 2 more" in result.stderr
    assert "replayed 0 items" in result.stdout
    assert len(read_queue(url, FAIL_QUEUE)) == 7
