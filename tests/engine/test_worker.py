"""Tests of `engine worker` against a master made of one MMOP listener."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

from engine import Pipeline
from engine import protocol as mmop
from engine.recipe import build_recipe
from engine.worker import MAX_EVENTS_PER_STEP
from tests.end_to_end.conftest import engine_command

SECRET = b"worker-test-secret"


def sink_recipe() -> bytes:
    """Return the recipe of a sink, with functions that travel by value."""

    def numbers():
        yield from range(10)

    def discard(number):
        return None

    pipeline = Pipeline("burst")
    pipeline.add("source", "numbers", numbers)
    pipeline.add("sink", "discard", discard, after="numbers")
    return build_recipe(pipeline, "discard", {})


def test_worker_shutdown_overtakes_queued_starts(tmp_path: Path) -> None:
    starts = 120
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(30)
    port = listener.getsockname()[1]
    worker = subprocess.Popen(
        [engine_command(), "worker", "--master", f"127.0.0.1:{port}"],
        cwd=tmp_path,
        env={**os.environ, "MONOMYTH_SECRET": SECRET.decode()},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        sock, _ = listener.accept()
        connection = mmop.accept(sock, SECRET, timeout_s=10)
        assert isinstance(connection.receive(timeout_s=10), mmop.Ready)
        connection.send(
            mmop.Welcome(
                worker_id="worker-1",
                stream_url=f"sqlite:///{tmp_path}/burst.db",
                heartbeat_interval_s=1.0,
            )
        )

        # The SHUTDOWN comes behind many START-NODEs, all sent at once.
        recipe = sink_recipe()
        for number in range(1, starts + 1):
            connection.send(
                mmop.StartNode(
                    node_id=f"burst.discard#{number}",
                    node_type="burst.discard",
                    recipe=recipe,
                    complete=False,
                )
            )
        connection.send(mmop.Shutdown(drain_timeout_s=5.0))

        reports: list[mmop.Message] = []
        while True:
            try:
                reports.append(connection.receive(timeout_s=60))
            except mmop.ConnectionClosedError:
                break
        output, _ = worker.communicate(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        listener.close()

    started = [r for r in reports if isinstance(r, mmop.NodeStarted)]
    assert worker.returncode == 0, output
    assert any(isinstance(r, mmop.WorkerStopping) for r in reports)
    # Without the reordering every START-NODE forks a process before the
    # SHUTDOWN is read; with it, only those of the first step can.
    assert len(started) <= MAX_EVENTS_PER_STEP, output


def test_worker_recovers_nothing_from_broker(caplog) -> None:
    from types import SimpleNamespace

    from engine._worker_supervision import NodeSupervisionMixin

    # No broker listens on port 1; a connection attempt would fail and warn.
    worker = SimpleNamespace(
        stream_url="amqp://guest:guest@127.0.0.1:1/", worker_id="worker-1"
    )
    node = SimpleNamespace(node_id="p.b#1")

    recovered = NodeSupervisionMixin._recover(worker, node, 4242)

    # The broker requeues what a dead connection held: nothing to connect for.
    assert recovered == 0
    assert caplog.records == []
