"""Fixtures that run each stream test on every stream backend."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.streams import Stream, open_stream
from tests.helpers import RABBITMQ_URL, require_service


class QueueNames:
    """A source of queue names unique to one test, remembered for cleanup.

    RabbitMQ keeps its queues between test runs, so every name starts with a
    random prefix and the `stream` fixture deletes the queues afterwards.
    """

    def __init__(self) -> None:
        self.prefix = f"test-{uuid.uuid4().hex[:12]}"
        self.created: list[str] = []

    def __call__(self, label: str) -> str:
        """Return the unique queue name for `label`."""
        name = f"{self.prefix}-{label}"
        if name not in self.created:
            self.created.append(name)
        return name


@pytest.fixture(params=["sqlite", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
def stream_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Yield the URL of an empty stream of each backend."""
    if request.param == "sqlite":
        # tmp_path is absolute, so the URL gets the four slashes of an
        # absolute path: sqlite:////tmp/...
        return f"sqlite:///{tmp_path / 'stream.db'}"

    require_service("RabbitMQ", 5672)
    return RABBITMQ_URL


@pytest.fixture
def queue_names() -> QueueNames:
    """Yield a source of queue names unique to this test."""
    return QueueNames()


@pytest.fixture
def stream(stream_url: str, queue_names: QueueNames) -> Iterator[Stream]:
    """Yield an open stream; delete the test's queues and close it afterwards."""
    opened = open_stream(stream_url, owner=f"{queue_names.prefix}-main")
    try:
        yield opened
    finally:
        try:
            opened.delete_queues(queue_names.created)
        finally:
            opened.close()
