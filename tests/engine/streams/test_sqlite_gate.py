"""Tests of the write gate that orders the writers of a SQLite stream.

The other writer is a real process that holds the gate until the test
releases it or kills it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.errors import StreamError, StreamUnavailableError
from engine.streams import open_stream
from engine.streams._sqlite_gate import WriteGate

# Holds the gate of the database named by argv[1] until a line arrives on
# stdin, then releases it and waits for stdin to close.
HOLDER = """
import sys
from engine.streams._sqlite_gate import WriteGate

gate = WriteGate(sys.argv[1])
assert gate.acquire(5.0)
print("held", flush=True)
sys.stdin.readline()
gate.release()
print("released", flush=True)
sys.stdin.read()
"""


class Holder:
    """A process that has taken the gate of `database`."""

    def __init__(self, database: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(database)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline() == "held\n"

    def release(self) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        assert self.process.stdout.readline() == "released\n"

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)


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
