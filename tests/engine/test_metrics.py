"""Tests of the Prometheus metrics: exposition text, heartbeats and progress.

The text is parsed with `prometheus_client`'s parser, the reference reader of
the format. Where heartbeats matter, a bare MMOP connection acts as the
worker, so no node process runs.
"""

from __future__ import annotations

import http.client
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine import NodeContext, Pipeline
from engine import protocol as mmop
from engine.api import ControlAPI
from engine.master import Master, NodeState, WorkerRecord, WorkerState
from engine.metrics import (
    CONTENT_TYPE,
    MetricFamily,
    format_families,
    render_metrics,
)
from engine.runtime import (
    BATCH_DURATION_BUCKETS_S,
    BATCH_DURATION_COUNTS,
    BATCH_DURATION_SUM_NS,
    COUNTER_NAMES,
    COUNTER_SLOTS,
    PROGRESS_DONE,
    PROGRESS_TOTAL,
    counters_to_stats,
)
from nodes import read_text_chunks
from tests.helpers import wait_for

SECRET = b"metrics-test-secret"
BUCKET_SLOTS = len(BATCH_DURATION_BUCKETS_S) + 1


def generate():
    yield 1


def passthrough(item):
    return item


def consume(item):
    pass


def build_pipeline() -> Pipeline:
    """Return pipeline `m`: `read`, then `map` in 2 processes, then `store`."""
    pipeline = Pipeline("m")
    pipeline.add("source", "read", generate)
    pipeline.add("transform", "map", passthrough, after="read", processes=2)
    pipeline.add("sink", "store", consume, after="map")
    return pipeline


def histogram(*pairs: tuple[int, int]) -> list[int]:
    """Return bucket counts, not cumulative, with `count` batches in `index`."""
    counts = [0] * BUCKET_SLOTS
    for index, count in pairs:
        counts[index] = count
    return counts


@pytest.fixture
def master(tmp_path: Path) -> Iterator[Master]:
    master = Master(SECRET, f"sqlite:///{tmp_path}/s.db", worker_timeout_s=300)
    master.start()
    master.add_pipeline(build_pipeline(), {})
    yield master
    master.close()


@pytest.fixture
def master_with_stats(master: Master) -> Master:
    """Fill the master with fake node stats and workers, as heartbeats would."""
    master.start_pipeline("m")
    with master.lock:
        read = master.types["m.read"].nodes["m.read#1"]
        read.state = NodeState.COMPLETED
        read.stats = {"items_out": 500}
        read.progress_done, read.progress_total = 750, 1000

        first, second = master.types["m.map"].nodes.values()
        first.state = NodeState.RUNNING
        first.stats = {"items_in": 300, "items_out": 290, "failures": 4, "retries": 7}
        first.restarts = 2
        first.batch_duration_counts = histogram((0, 3), (4, 5), (BUCKET_SLOTS - 1, 1))
        first.batch_duration_sum_s = 12.5
        second.state = NodeState.RESTARTING
        second.stats = {"items_in": 200, "items_out": 200, "failures": 1}
        second.batch_duration_counts = histogram((4, 2), (12, 6))
        second.batch_duration_sum_s = 30.25

        store = master.types["m.store"].nodes["m.store#1"]
        store.state = NodeState.FAILED

        for number, state in enumerate(
            [WorkerState.JOINED, WorkerState.JOINED, WorkerState.LOST], start=1
        ):
            master.workers[f"worker-{number}"] = WorkerRecord(
                worker_id=f"worker-{number}",
                connection=None,
                hostname="host",
                pid=number,
                cores=2,
                memory_bytes=2**30,
                state=state,
            )
    return master


def parse(text: str) -> dict[str, Any]:
    """Parse exposition text into families by name."""
    return {family.name: family for family in text_string_to_metric_families(text)}


def samples(family: Any, name: str | None = None) -> dict[tuple, float]:
    """Return {sorted label pairs: value} of the family's samples called `name`."""
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for sample in family.samples
        if name is None or sample.name == name
    }


def test_metrics_parse_with_expected_types(master_with_stats: Master) -> None:
    families = parse(render_metrics(master_with_stats, {"m.read-to-map": 3}))

    expected = {
        "monomyth_items_processed": "counter",
        "monomyth_items_produced": "counter",
        "monomyth_items_failed": "counter",
        "monomyth_items_retried": "counter",
        "monomyth_node_restarts": "counter",
        "monomyth_batch_duration_seconds": "histogram",
        "monomyth_progress_ratio": "gauge",
        "monomyth_node_processes": "gauge",
        "monomyth_workers": "gauge",
        "monomyth_queue_depth": "gauge",
        "monomyth_stream_up": "gauge",
    }
    assert {name: family.type for name, family in families.items()} == expected


def test_metrics_have_help_and_type_lines(master_with_stats: Master) -> None:
    text = render_metrics(master_with_stats, {})
    lines = text.splitlines()

    names = {line.split()[2] for line in lines if line.startswith("# TYPE ")}
    helped = {line.split()[2] for line in lines if line.startswith("# HELP ")}

    assert len(names) == 11
    assert helped == names
    assert text.endswith("\n")
    assert all(name.startswith("monomyth_") for name in names)


def test_counters_sum_nodes_per_type(master_with_stats: Master) -> None:
    families = parse(render_metrics(master_with_stats, {}))

    def by_type(family: str) -> dict[str, float]:
        return {
            sample.labels["node_type"]: sample.value
            for sample in families[family].samples
        }

    assert by_type("monomyth_items_processed") == {
        "m.read": 0,
        "m.map": 500,
        "m.store": 0,
    }
    assert by_type("monomyth_items_produced") == {
        "m.read": 500,
        "m.map": 490,
        "m.store": 0,
    }
    assert by_type("monomyth_items_failed")["m.map"] == 5
    assert by_type("monomyth_items_retried")["m.map"] == 7
    assert by_type("monomyth_node_restarts") == {"m.read": 0, "m.map": 2, "m.store": 0}
    for sample in families["monomyth_items_processed"].samples:
        assert sample.name == "monomyth_items_processed_total"


def test_histogram_buckets_cumulative(master_with_stats: Master) -> None:
    family = parse(render_metrics(master_with_stats, {}))[
        "monomyth_batch_duration_seconds"
    ]
    node_types = {sample.labels["node_type"] for sample in family.samples}
    buckets = [
        (float(sample.labels["le"]), sample.value)
        for sample in family.samples
        if sample.name.endswith("_bucket") and sample.labels["node_type"] == "m.map"
    ]
    count = samples(family, "monomyth_batch_duration_seconds_count")
    total = samples(family, "monomyth_batch_duration_seconds_sum")

    # Sources pull no batches, so only transforms and sinks have a histogram.
    assert node_types == {"m.map", "m.store"}
    assert [bound for bound, _ in buckets] == [*BATCH_DURATION_BUCKETS_S, float("inf")]
    values = [value for _, value in buckets]
    assert values == sorted(values)
    assert values[0] == 3
    assert values[4] == 3 + 5 + 2
    assert values[-2] == 3 + 5 + 2 + 6
    assert values[-1] == 17
    assert count[(("node_type", "m.map"),)] == values[-1]
    assert total[(("node_type", "m.map"),)] == pytest.approx(42.75)
    assert count[(("node_type", "m.store"),)] == 0


def test_state_gauges_count_every_state(master_with_stats: Master) -> None:
    families = parse(render_metrics(master_with_stats, {}))

    workers = {
        sample.labels["state"]: sample.value
        for sample in families["monomyth_workers"].samples
    }
    processes = samples(families["monomyth_node_processes"])

    assert workers == {"joined": 2, "stopping": 0, "lost": 1, "stopped": 0}
    assert processes[(("node_type", "m.map"), ("state", "running"))] == 1
    assert processes[(("node_type", "m.map"), ("state", "restarting"))] == 1
    assert processes[(("node_type", "m.map"), ("state", "completed"))] == 0
    assert processes[(("node_type", "m.read"), ("state", "completed"))] == 1
    assert processes[(("node_type", "m.store"), ("state", "failed"))] == 1
    assert len(processes) == 3 * len(NodeState)


def test_progress_ratio_only_with_total(master_with_stats: Master) -> None:
    family = parse(render_metrics(master_with_stats, {}))["monomyth_progress_ratio"]

    assert samples(family) == {(("node_type", "m.read"),): 0.75}


def test_queue_depths_and_stream_up(master_with_stats: Master) -> None:
    depths = {"m.read-to-map": 12, "m.map-fail": 0}

    reachable = parse(render_metrics(master_with_stats, depths))
    unreachable = parse(render_metrics(master_with_stats, None))

    assert samples(reachable["monomyth_queue_depth"]) == {
        (("queue", "m.read-to-map"),): 12,
        (("queue", "m.map-fail"),): 0,
    }
    assert samples(reachable["monomyth_stream_up"]) == {(): 1}
    assert samples(unreachable["monomyth_queue_depth"]) == {}
    assert samples(unreachable["monomyth_stream_up"]) == {(): 0}


def test_label_values_and_help_escaped() -> None:
    awkward = 'say "hi"\\ then\nbreak'
    family = MetricFamily("test_escaped", "gauge", "help with \\ and\nnewline")
    family.add(1.5, queue=awkward)

    text = format_families([family])
    parsed = parse(text)["test_escaped"]

    assert '\\"hi\\"' in text
    assert "\\\\ then\\nbreak" in text
    assert parsed.samples[0].labels == {"queue": awkward}
    assert parsed.samples[0].value == 1.5
    assert parsed.documentation == "help with \\ and\nnewline"


def test_metrics_endpoint_serves_text(master_with_stats: Master) -> None:
    api = ControlAPI(
        master_with_stats, "127.0.0.1", 0, SECRET, master_with_stats.stream_url
    )
    api.start()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        text = response.read().decode()
        connection.close()
    finally:
        api.close()

    families = parse(text)
    assert response.status == 200
    assert response.getheader("Content-Type") == CONTENT_TYPE
    # The API read the depth of every edge and fail queue from the stream.
    assert samples(families["monomyth_stream_up"]) == {(): 1}
    assert len(families["monomyth_queue_depth"].samples) == 2 + 3


# Heartbeats: what a worker ships, summed by the master.


class FakeWorker:
    """A worker made of one MMOP connection that joins and sends heartbeats."""

    def __init__(self, master: Master) -> None:
        self.connection = mmop.connect("127.0.0.1", master.port, SECRET)
        self.connection.send(
            mmop.Ready(hostname="fake", pid=os.getpid(), cores=2, memory_bytes=2**30)
        )
        welcome = self.connection.receive(timeout_s=10)
        assert isinstance(welcome, mmop.Welcome)
        self.worker_id = welcome.worker_id
        self.started: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                message = self.connection.receive()
            except (mmop.ConnectionClosedError, mmop.ProtocolError, OSError):
                return
            if isinstance(message, mmop.StartNode):
                self.started.append(message.node_id)

    def heartbeat(self, reports: list[dict[str, Any]]) -> None:
        self.connection.send(
            mmop.Heartbeat(
                worker_id=self.worker_id,
                cpu_percent=1.0,
                memory_bytes=1,
                nodes=reports,
            )
        )


def node_report(node_id: str, **stats: Any) -> dict[str, Any]:
    counters = [0] * COUNTER_SLOTS
    report = {
        "node_id": node_id,
        "node_type": node_id.rpartition("#")[0],
        "pid": 4242,
        "state": "running",
        "restarts": 0,
        **counters_to_stats(counters),
    }
    report.update(stats)
    return report


def test_heartbeat_histograms_summed_by_master(master: Master) -> None:
    worker = FakeWorker(master)
    try:
        master.start_pipeline("m")
        wait_for(
            lambda: len(worker.started) == 4,
            timeout_s=10,
            what="START-NODE for the four nodes of pipeline m",
        )

        worker.heartbeat(
            [
                node_report(
                    "m.map#1",
                    items_in=40,
                    batch_duration_counts=histogram((1, 4)),
                    batch_duration_sum_s=0.008,
                ),
                node_report(
                    "m.map#2",
                    items_in=60,
                    batch_duration_counts=histogram((1, 2), (5, 3)),
                    batch_duration_sum_s=0.1,
                ),
                node_report("m.read#1", progress_done=5, progress_total=20),
            ]
        )
        wait_for(
            lambda: master.type_stats()["m.map"]["items_in"] == 100,
            timeout_s=10,
            what="the heartbeat's counters at the master",
        )
        family = parse(render_metrics(master, {}))["monomyth_batch_duration_seconds"]
    finally:
        worker.connection.close()

    buckets = samples(family, "monomyth_batch_duration_seconds_bucket")
    count = samples(family, "monomyth_batch_duration_seconds_count")
    assert buckets[(("le", "0.0025"), ("node_type", "m.map"))] == 6
    assert buckets[(("le", "0.05"), ("node_type", "m.map"))] == 9
    assert count[(("node_type", "m.map"),)] == 9
    assert master.type_stats()["m.read"]["progress_done"] == 5
    assert master.type_stats()["m.read"]["progress_total"] == 20


def test_malformed_histogram_in_heartbeat_ignored(master: Master) -> None:
    worker = FakeWorker(master)
    try:
        master.start_pipeline("m")
        wait_for(lambda: len(worker.started) == 4, timeout_s=10, what="START-NODE")

        worker.heartbeat(
            [
                node_report(
                    "m.map#1",
                    items_in=7,
                    batch_duration_counts=[1, 2],
                    batch_duration_sum_s="slow",
                    progress_done=-3,
                )
            ]
        )
        wait_for(
            lambda: master.type_stats()["m.map"]["items_in"] == 7,
            timeout_s=10,
            what="the heartbeat's counters at the master",
        )
        text = render_metrics(master, {})
    finally:
        worker.connection.close()

    count = samples(
        parse(text)["monomyth_batch_duration_seconds"],
        "monomyth_batch_duration_seconds_count",
    )
    assert count[(("node_type", "m.map"),)] == 0
    assert master.type_stats()["m.map"]["progress_done"] == 0


# The shared counters of a node process and its progress reports.


def test_counters_to_stats_names_every_slot() -> None:
    counters = list(range(100, 100 + COUNTER_SLOTS))
    counters[BATCH_DURATION_SUM_NS] = 1_500_000_000

    stats = counters_to_stats(counters)

    assert [stats[name] for name in COUNTER_NAMES] == [100, 101, 102, 103, 104]
    assert stats["progress_done"] == counters[PROGRESS_DONE]
    assert stats["progress_total"] == counters[PROGRESS_TOTAL]
    assert stats["batch_duration_sum_s"] == 1.5
    assert stats["batch_duration_counts"] == counters[BATCH_DURATION_COUNTS:]
    assert len(stats["batch_duration_counts"]) == BUCKET_SLOTS


def test_report_progress_calls_hook() -> None:
    reports: list[tuple[int, int]] = []
    context = NodeContext("p", "read", {}, progress_hook=lambda *r: reports.append(r))

    context.report_progress(10, 40)
    context.report_progress(40, 40)

    assert reports == [(10, 40), (40, 40)]


@pytest.mark.parametrize(
    ("done", "total", "error"),
    [
        (-1, 10, ValueError),
        (1, 2**63, ValueError),
        (1.5, 10, TypeError),
        (True, 10, TypeError),
        (1, "10", TypeError),
    ],
)
def test_report_progress_rejects_invalid_values(
    done: Any, total: Any, error: type[Exception]
) -> None:
    context = NodeContext("p", "read", {}, progress_hook=lambda *_: None)

    with pytest.raises(error, match="report_progress"):
        context.report_progress(done, total)


def test_read_text_chunks_reports_bytes(tmp_path: Path) -> None:
    first = tmp_path / "a.txt"
    first.write_text("one\ntwo\nthree\n")
    second = tmp_path / "b.txt"
    second.write_text("four\r\nfive\n" * 3)
    total = first.stat().st_size + second.stat().st_size
    reports: list[tuple[int, int]] = []

    chunks = list(
        read_text_chunks(
            tmp_path, lines_per_chunk=2, progress=lambda *r: reports.append(r)
        )
    )

    assert len(chunks) == 2 + 3
    assert reports[0] == (0, total)
    assert reports[-1] == (total, total)
    assert all(report_total == total for _, report_total in reports)
    done = [report_done for report_done, _ in reports]
    assert done == sorted(done)
    assert len(reports) == len(chunks) + 2
