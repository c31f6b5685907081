"""Helpers shared by the tests: polling waits and service checks."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

import pytest

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
