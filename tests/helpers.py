"""Helpers shared by the tests: polling waits, service checks and processes."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from engine.items import unpack

RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/"
POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def wait_for(
    predicate: Callable[[], object],
    timeout_s: float,
    what: str,
    interval_s: float = 0.05,
) -> object:
    """Poll `predicate` until it returns a truthy value, and return that value.

    Fails the test with `what` in the message when `timeout_s` passes first.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def is_listening(host: str, port: int) -> bool:
    """Return True when a TCP server accepts connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def require_service(name: str, port: int) -> None:
    """Skip the test when the service is absent, but fail it under CI=true."""
    if is_listening("127.0.0.1", port):
        return
    message = f"{name} is not listening on 127.0.0.1:{port}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI must start it before the tests")
    pytest.skip(f"{message}; start it to run this test")


def forkserver_process(worker_pid: int) -> psutil.Process | None:
    """Return the forkserver that the worker `worker_pid` started, or None."""
    try:
        children = psutil.Process(worker_pid).children()
    except psutil.Error:
        return None
    for child in children:
        try:
            if "multiprocessing.forkserver" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    return None


def node_processes(worker_pid: int) -> list[psutil.Process]:
    """Return the node processes of the worker `worker_pid`.

    They are the children of the worker's forkserver, or, where the worker
    starts nodes with `spawn`, its children other than the resource tracker.
    """
    forkserver = forkserver_process(worker_pid)
    try:
        if forkserver is not None:
            return forkserver.children()
        children = psutil.Process(worker_pid).children()
    except psutil.Error:
        return []
    nodes = []
    for child in children:
        try:
            if "resource_tracker" not in " ".join(child.cmdline()):
                nodes.append(child)
        except psutil.Error:
            continue
    return nodes


def queued_items(database: Path, queues: list[str]) -> int:
    """Return how many items the messages of `queues` contain in a SQLite stream.

    A message contains one item or a pack of them, so counting rows is not
    enough.
    """
    marks = ", ".join("?" for _ in queues)
    connection = sqlite3.connect(database)
    try:
        rows = connection.execute(
            f"SELECT body FROM messages WHERE queue IN ({marks})", queues
        ).fetchall()
    finally:
        connection.close()
    return sum(len(unpack(body, "json")) for (body,) in rows)


# Holds the gate of the database named by argv[1] until a line arrives on
# stdin, then releases it and waits for stdin to close.
GATE_HOLDER = """
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


class GateHolder:
    """A process that has taken the write gate of the SQLite stream `database`."""

    def __init__(self, database: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", GATE_HOLDER, str(database)],
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
