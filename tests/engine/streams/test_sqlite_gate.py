"""Tests of the write gate that orders the writers of a SQLite stream.

The other writer is a real process that holds the gate until the test
releases it or kills it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.errors import StreamError, StreamUnavailableError
from engine.streams import _sqlite_connection, open_stream
from engine.streams._sqlite_gate import WriteGate
from tests.helpers import GateHolder as Holder


@pytest.fixture
def database(tmp_path: Path) -> Path:
    return tmp_path / "stream.db"


@pytest.fixture
def holder(database: Path) -> Iterator[Holder]:
    holding = Holder(database)
    yield holding
    holding.stop()


def test_gate_is_free_without_other_writers(database: Path) -> None:
    gate = WriteGate(str(database))
    try:
        assert gate.acquire(0.0)
        gate.release()
        assert gate.acquire(0.0)
        gate.release()
    finally:
        gate.close()
    assert Path(f"{database}-lock").exists()


def test_acquire_gives_up_after_timeout(database: Path, holder: Holder) -> None:
    gate = WriteGate(str(database))
    try:
        assert not gate.acquire(0.2)
    finally:
        gate.close()


def test_waiter_gets_the_gate_when_holder_releases(
    database: Path, holder: Holder
) -> None:
    gate = WriteGate(str(database))
    releaser = threading.Timer(0.3, holder.release)
    releaser.start()
    try:
        assert gate.acquire(30.0)
        gate.release()
    finally:
        releaser.join()
        gate.close()


def test_killed_holder_frees_the_gate(database: Path, holder: Holder) -> None:
    gate = WriteGate(str(database))
    killer = threading.Timer(0.3, holder.kill)
    killer.start()
    try:
        assert gate.acquire(30.0)
        gate.release()
    finally:
        killer.join()
        gate.close()


def test_abandoned_wait_passes_the_gate_on(database: Path, holder: Holder) -> None:
    gate = WriteGate(str(database))
    try:
        assert not gate.acquire(0.1)
        holder.release()
        # The helper thread took the gate for the caller that gave up and
        # must have let it go: another process can take it.
        other = Holder(database)
        try:
            other.release()
        finally:
            other.stop()
        assert gate.acquire(30.0)
        gate.release()
    finally:
        gate.close()


def test_caller_takes_over_an_abandoned_wait(database: Path, holder: Holder) -> None:
    gate = WriteGate(str(database))
    try:
        assert not gate.acquire(0.1)
        releaser = threading.Timer(0.3, holder.release)
        releaser.start()
        try:
            assert gate.acquire(30.0)
        finally:
            releaser.join()
        gate.release()
    finally:
        gate.close()


def test_stream_write_times_out_at_gate(
    database: Path,
) -> None:
    stream = open_stream(f"sqlite:///{database}", owner="test", busy_retry_s=0.3)
    holding = Holder(database)
    try:
        with pytest.raises(StreamUnavailableError, match=r"stream\.db-lock"):
            stream.publish([("queue", b"body")])
        holding.release()
        stream.publish([("queue", b"body")])
        assert stream.depth("queue") == 1
    finally:
        holding.stop()
        stream.close()


def test_gate_open_failure_names_file(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")

    with pytest.raises(StreamError, match=r"lock file .*stream\.db-lock"):
        WriteGate(str(not_a_folder / "stream.db"))


def test_long_gate_wait_logs_warning(
    database: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_sqlite_connection, "GATE_WARNING_S", 0.1)
    stream = open_stream(f"sqlite:///{database}", owner="test", busy_retry_s=0.5)
    holding = Holder(database)
    try:
        with (
            caplog.at_level(logging.WARNING, logger="engine.streams.sqlite"),
            pytest.raises(StreamUnavailableError),
        ):
            stream.publish([("queue", b"body")])
    finally:
        holding.stop()
        stream.close()
    messages = [record.getMessage() for record in caplog.records]
    warnings = [message for message in messages if "has waited" in message]
    assert len(warnings) == 1
    assert "stream.db-lock" in warnings[0]
