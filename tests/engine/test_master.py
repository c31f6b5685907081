"""Tests of the master with bare MMOP connections as its workers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import protocol as mmop
from engine.master import Master
from engine.recipe import params_digest
from tests.engine.test_api import SECRET, FakeWorker, build_pipeline
from tests.helpers import wait_for


@pytest.fixture
def master(tmp_path: Path) -> Iterator[Master]:
    master = Master(SECRET, f"sqlite:///{tmp_path}/s.db", worker_timeout_s=300)
    master.start()
    master.add_pipeline(build_pipeline(), {})
    yield master
    master.close()


def test_worker_joining_after_shutdown_stops(master: Master) -> None:
    master.start_pipeline("p")
    master.shutdown_workers(drain_timeout_s=7.0)

    worker = FakeWorker(master)
    try:
        shutdowns = wait_for(
            lambda: worker.received(mmop.Shutdown),
            timeout_s=10,
            what="SHUTDOWN to the worker that joined late",
        )
        # START-NODE would have come before SHUTDOWN on the same connection.
        assert worker.started_ids() == []
        assert shutdowns[0].drain_timeout_s == 7.0
        assert master.worker_info()[worker.worker_id]["state"] == "stopping"
    finally:
        worker.close()


def start_source(master: Master, worker: FakeWorker) -> None:
    """Start pipeline `p` and report its source `p.a#1` started on `worker`."""
    master.start_pipeline("p")
    wait_for(
        lambda: "p.a#1" in worker.started_ids(),
        timeout_s=10,
        what="START-NODE of source p.a#1",
    )
    worker.report(mmop.NodeStarted, "p.a#1", pid=os.getpid())


def test_master_keeps_running_source_running(master: Master) -> None:
    worker = FakeWorker(master)
    try:
        start_source(master, worker)
        wait_for(
            lambda: master.recipe_info()["p.a"]["running"] == 1,
            timeout_s=10,
            what="source p.a counted running",
        )

        # A source ends when its generator is exhausted, never on request.
        assert master.recipe_info()["p.a"]["state"] == "running"
        assert worker.received(mmop.CompleteType) == []
    finally:
        worker.close()


def test_master_completes_source_when_it_ends(master: Master) -> None:
    worker = FakeWorker(master)
    try:
        start_source(master, worker)
        worker.report(mmop.NodeCompleted, "p.a#1", stats={})

        completes = wait_for(
            lambda: worker.received(mmop.CompleteType),
            timeout_s=10,
            what="COMPLETE-TYPE after the source completed",
        )
        assert [message.node_type for message in completes] == ["p.b"]
        assert master.recipe_info()["p.a"]["state"] == "completed"
    finally:
        worker.close()


def heartbeat(worker: FakeWorker, node_id: str, **counters: int) -> None:
    """Send a HEARTBEAT that reports `node_id` running with `counters`."""
    report = {
        "node_id": node_id,
        "node_type": node_id.rpartition("#")[0],
        "pid": os.getpid(),
        "state": "running",
        **counters,
    }
    worker.connection.send(
        mmop.Heartbeat(
            worker_id=worker.worker_id, cpu_percent=0.0, memory_bytes=0, nodes=[report]
        )
    )


def test_master_keeps_counters_of_moved_node(master: Master) -> None:
    first = FakeWorker(master, hostname="first")
    master.start_pipeline("p")
    wait_for(
        lambda: "p.b#1" in first.started_ids(),
        timeout_s=10,
        what="START-NODE of p.b#1 on the first worker",
    )
    first.report(mmop.NodeStarted, "p.b#1", pid=os.getpid())
    heartbeat(first, "p.b#1", items_in=10, items_out=10, restarts=1)
    wait_for(
        lambda: master.node_stats()["p.b#1"]["items_in"] == 10,
        timeout_s=10,
        what="10 items in counted for p.b#1",
    )
    first.connection.send(mmop.WorkerStopping(worker_id=first.worker_id, reason="test"))
    second = FakeWorker(master, hostname="second")
    try:
        wait_for(
            lambda: "p.b#1" in second.started_ids(),
            timeout_s=10,
            what="START-NODE of p.b#1 on the second worker",
        )
        second.report(mmop.NodeStarted, "p.b#1", pid=os.getpid())
        heartbeat(second, "p.b#1", items_in=5, items_out=4, restarts=0)

        # The new process counts from 0; the master adds what the first counted.
        stats = wait_for(
            lambda: (
                master.node_stats()["p.b#1"]
                if master.node_stats()["p.b#1"]["items_in"] != 10
                else None
            ),
            timeout_s=10,
            what="the second worker's report of p.b#1 applied",
        )
        assert stats["items_in"] == 15
        assert stats["items_out"] == 14
        assert master.type_stats(["p.b"])["p.b"]["items_in"] == 15
        assert master.type_stats(["p.b"])["p.b"]["restarts"] == 1
    finally:
        first.close()
        second.close()


def rejoin(master: Master, digest: str) -> mmop.Connection:
    """Register again as worker-7, reporting node p.b#1 run with `digest`."""
    connection = mmop.connect("127.0.0.1", master.port, SECRET)
    report = {
        "node_id": "p.b#1",
        "node_type": "p.b",
        "pid": os.getpid(),
        "state": "running",
        "params_digest": digest,
    }
    connection.send(
        mmop.Ready(
            hostname="back",
            pid=os.getpid(),
            cores=2,
            memory_bytes=2**30,
            worker_id="worker-7",
            nodes=[report],
        )
    )
    assert isinstance(connection.receive(timeout_s=10), mmop.Welcome)
    return connection


def test_master_logs_nodes_with_other_params(
    master: Master, caplog: pytest.LogCaptureFixture
) -> None:
    connection = rejoin(master, "0123456789abcdef")
    try:
        wait_for(
            lambda: "p.b#1" in master.node_stats(),
            timeout_s=10,
            what="node p.b#1 adopted",
        )

        assert "worker-7 runs 1 nodes with other run parameters" in caplog.text
        assert "(p.b#1)" in caplog.text
        assert master.node_stats()["p.b#1"]["state"] == "running"
    finally:
        connection.close()


def test_master_adopts_nodes_with_same_params(
    master: Master, caplog: pytest.LogCaptureFixture
) -> None:
    connection = rejoin(master, params_digest({}))
    try:
        wait_for(
            lambda: "p.b#1" in master.node_stats(),
            timeout_s=10,
            what="node p.b#1 adopted",
        )

        assert "other run parameters" not in caplog.text
    finally:
        connection.close()
