"""Benchmarks: Monomyth beside its building blocks, plain Python and its peers.

    python scripts/bench.py                  every scenario, 3 runs, full sizes
    python scripts/bench.py --quick          every scenario once, small sizes
    python scripts/bench.py --only relay,cpu --runs 5 --json bench.json

Scenarios (docs/benchmarks.md gives the method of each and the latest figures):

- relay: no-op pipelines of 1 and 3 stages on the SQLite and RabbitMQ
  streams, beside a plain SQLite loop and a plain pika loop that relay the
  same items with the same batch size, and beside raw pipelines of the same
  shape: a producer, one relay process per stage and a consumer, running at
  once on plain sqlite3 or plain pika;
- cpu: a node that spends about 10 ms of pure Python on each item, in 1 and
  2 processes, beside one plain loop and two plain processes;
- wordcount: examples/wordcount.py and a variant without its batched map,
  beside a single-process Counter, multiprocessing.Pool, Ray, Dask and
  Dramatiq;
- startup: `engine run` of a trivial pipeline to its first item and to its
  exit, and the resident memory of its processes.

The table shows the median of the runs with the minimum and maximum beside
it. A ratio is computed within each run from the two figures of that run,
then summarised the same way. Ray, Dask and Dramatiq are optional (`pip
install -e '.[bench]'`). Ray and Dask run in a network namespace that has
only loopback (`unshare -n`, which needs root), because Ray probes a public
address at start. The RabbitMQ figures need the broker on 127.0.0.1:5672 and
`rabbitmqctl`, which creates a virtual host for the bench and deletes it at
the end. Word counts that differ from the single-process count stop the
bench with exit code 1.

This file is also the pipeline file of the engine runs, as in
`engine run scripts/bench.py --pipeline bench-relay-1 -p n=1000`. Loading it
must stay cheap, since the startup scenario times it: the heavier imports
(psutil, pika and the peers) happen inside the functions that need them.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing
import multiprocessing.connection
import os
import platform
import random
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from engine import Pipeline, param
from nodes import SQLiteSink, read_text_chunks

BENCH_FILE = Path(__file__).resolve()
REPOSITORY = BENCH_FILE.parents[1]
WORDCOUNT_EXAMPLE = REPOSITORY / "examples" / "wordcount.py"

PAYLOAD_BYTES = 100
RELAY_BATCH_SIZE = 100
CPU_ITEM_S = 0.010
CPU_BATCH_SIZE = 10
LINES_PER_CHUNK = 10
# Chunks per task of every word-count peer: the batch size of the engine's
# word count.
CHUNKS_PER_TASK = 200
CORPUS_SEED = 20240601

RABBITMQ_HOST = "127.0.0.1"
RABBITMQ_PORT = 5672
# How long a node of a bench pipeline waits for the other nodes to start, or
# for the bench to release it.
HOLD_TIMEOUT_S = 60.0
PEER_TIMEOUT_S = 300.0
# The environment variable that makes this module declare the Dramatiq actor
# when a `dramatiq` worker imports it.
DRAMATIQ_URL_VARIABLE = "MONOMYTH_BENCH_DRAMATIQ_URL"
DRAMATIQ_QUEUE = "monomyth-bench-wordcount"

SCENARIOS = ("relay", "cpu", "wordcount", "startup")
PEERS = ("ray", "dask", "dramatiq")
INSTALL_HINT = "pip install -e '.[bench]'"


class BenchError(Exception):
    """A run that failed or produced a wrong result: the bench exits with code 1."""


# Work shared by the pipelines, the plain loops and the peers.


def make_payload(index: int) -> str:
    """Return the item `index` of the relay: PAYLOAD_BYTES ASCII characters."""
    return f"{index:010d}".ljust(PAYLOAD_BYTES, "x")


def spin(loops: int) -> int:
    """Run `loops` rounds of integer arithmetic: pure Python that holds the GIL."""
    total = 0
    for number in range(loops):
        total = (total + number * number) % 1_000_003
    return total


def count_texts(texts: Iterable[str]) -> Counter[str]:
    """Count the lowercased whitespace-separated words of `texts`."""
    # A Counter and not a plain dict: Dask 2026.8 took about 0.15 s per task
    # that returned a plain dict of 5,000 words here, against 0.02 s for a
    # Counter, which made its whole run 25 times slower.
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(text.lower().split())
    return counts


def read_chunks(path: str | Path, lines_per_chunk: int) -> Iterator[str]:
    """Yield the text of `path` in chunks of `lines_per_chunk` lines."""
    with open(path, encoding="utf-8", errors="replace") as file:
        while True:
            lines = list(itertools.islice(file, lines_per_chunk))
            if not lines:
                return
            yield "".join(lines)


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Yield lists of `size` items, the last one possibly shorter."""
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def write_mark(folder: str, name: str, value: Any) -> None:
    """Write `value` as JSON to `folder/name.json`, replacing it whole."""
    path = Path(folder) / f"{name}.json"
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(value))
    os.replace(partial, path)


def read_marks(folder: Path, prefix: str) -> list[Any]:
    """Return the values of the marks in `folder` whose name starts with `prefix`."""
    return [json.loads(path.read_text()) for path in folder.glob(f"{prefix}*.json")]


# Node functions of the bench pipelines. They run in the node processes and
# write what the bench measures into the folder of the run parameter `marks`.


def mark_ready(ctx) -> None:
    write_mark(ctx.params["marks"], f"ready-{ctx.node}-{os.getpid()}", os.getpid())


def wait_for_every_process(ctx) -> None:
    """Wait until all `processes` of the pipeline have run their setup.

    A source that waits here keeps the start-up of the other node processes
    out of the figures, which then measure the flow of items alone.
    """
    folder = Path(ctx.params["marks"])
    deadline = time.monotonic() + HOLD_TIMEOUT_S
    while time.monotonic() < deadline:
        if len(list(folder.glob("ready-*.json"))) >= ctx.params["processes"]:
            return
        time.sleep(0.005)


def emit_payloads(ctx):
    wait_for_every_process(ctx)
    for index in range(ctx.params["n"]):
        yield make_payload(index)


def forward(item):
    return item


def start_arrival_log(ctx) -> list[list[float]]:
    mark_ready(ctx)
    return []


def log_arrival(items, ctx) -> None:
    ctx.state.append([time.time(), len(items)])


def write_arrival_log(ctx) -> None:
    write_mark(ctx.params["marks"], f"arrivals-{os.getpid()}", ctx.state)


def emit_numbers(ctx):
    wait_for_every_process(ctx)
    yield from range(ctx.params["n"])


def start_burn_log(ctx) -> dict[str, Any]:
    mark_ready(ctx)
    return {"first_s": None, "last_s": None, "count": 0}


def burn(item, ctx):
    state = ctx.state
    if state["first_s"] is None:
        state["first_s"] = time.time()
    spin(ctx.params["loops"])
    state["last_s"] = time.time()
    state["count"] += 1
    return item


def write_burn_log(ctx) -> None:
    write_mark(ctx.params["marks"], f"burn-{os.getpid()}", ctx.state)


def discard(items) -> None:
    pass


def read_corpus(ctx):
    yield from read_text_chunks(ctx.params["input"], lines_per_chunk=LINES_PER_CHUNK)


def count_chunk(chunk) -> dict[str, int]:
    return count_texts([chunk["text"]])


def merge_counts(batch: list[dict[str, int]]) -> list[Counter[str]]:
    # One upsert per distinct word of a sink batch, as examples/wordcount.py.
    total: Counter[str] = Counter()
    for counts in batch:
        total.update(counts)
    return [total]


def count_rows(counts: dict[str, int]) -> Iterable[tuple[str, int]]:
    return counts.items()


def mark_pid(ctx) -> None:
    write_mark(ctx.params["marks"], f"pid-{ctx.node}", os.getpid())


def emit_and_hold(ctx):
    yield from range(ctx.params["n"])
    hold = ctx.params["hold"]
    if not hold:
        return
    # Keeps the processes alive while the bench reads their memory.
    deadline = time.monotonic() + HOLD_TIMEOUT_S
    while not os.path.exists(hold) and time.monotonic() < deadline:
        time.sleep(0.01)


def mark_first_arrival(items, ctx) -> None:
    if ctx.state is None:
        ctx.state = time.time()
        write_mark(ctx.params["marks"], "first-item", ctx.state)


# The bench pipelines. Each engine run gets its own stream, so the fixed
# names never meet an earlier run's queues.


def build_relay_pipeline(stages: int) -> Pipeline:
    """Return a source, `stages` no-op transforms and a sink that logs arrivals."""
    pipeline = Pipeline(
        f"bench-relay-{stages}",
        params={"n": 1000, "marks": "", "processes": stages + 2},
    )
    pipeline.add(
        "source", "emit", emit_payloads, batch_size=RELAY_BATCH_SIZE, setup=mark_ready
    )
    upstream = "emit"
    for stage in range(1, stages + 1):
        name = f"hop{stage}"
        pipeline.add(
            "transform",
            name,
            forward,
            after=upstream,
            batch_size=RELAY_BATCH_SIZE,
            setup=mark_ready,
        )
        upstream = name
    pipeline.add(
        "sink",
        "arrive",
        log_arrival,
        after=upstream,
        batched=True,
        batch_size=RELAY_BATCH_SIZE,
        setup=start_arrival_log,
        teardown=write_arrival_log,
    )
    return pipeline


def build_cpu_pipeline(processes: int) -> Pipeline:
    """Return a source of numbers, a CPU-bound transform and a sink."""
    pipeline = Pipeline(
        f"bench-cpu-{processes}",
        params={"n": 100, "loops": 1000, "marks": "", "processes": processes + 2},
    )
    pipeline.add(
        "source", "emit", emit_numbers, batch_size=CPU_BATCH_SIZE, setup=mark_ready
    )
    pipeline.add(
        "transform",
        "burn",
        burn,
        after="emit",
        processes=processes,
        batch_size=CPU_BATCH_SIZE,
        setup=start_burn_log,
        teardown=write_burn_log,
    )
    pipeline.add("sink", "drop", discard, after="burn", batched=True, setup=mark_ready)
    return pipeline


def build_wordcount_pipeline() -> Pipeline:
    """Return the word count with a map that sends the counts of each chunk.

    It differs from examples/wordcount.py only in its map, which is not
    batched: it shows what combining the counts of a batch saves.
    """
    pipeline = Pipeline("bench-wordcount", params={"input": "", "output": ""})
    pipeline.add("source", "read", read_corpus, batch_size=CHUNKS_PER_TASK)
    pipeline.add(
        "transform",
        "count",
        count_chunk,
        after="read",
        processes=2,
        batch_size=CHUNKS_PER_TASK,
    )
    sink = SQLiteSink(
        path=param("output"),
        schema="CREATE TABLE IF NOT EXISTS word_counts "
        "(word TEXT PRIMARY KEY, count INTEGER NOT NULL)",
        statement="INSERT INTO word_counts (word, count) VALUES (?, ?) "
        "ON CONFLICT (word) DO UPDATE SET count = count + excluded.count",
        rows=count_rows,
        dedupe=True,
        combine=merge_counts,
    )
    pipeline.add("sink", "store", sink, after="count", batch_size=CHUNKS_PER_TASK)
    return pipeline


def build_trivial_pipeline() -> Pipeline:
    """Return a source of `n` numbers and a sink that marks the first arrival."""
    pipeline = Pipeline("bench-trivial", params={"n": 1, "marks": "", "hold": ""})
    # A batch of one publishes the first item at once.
    pipeline.add("source", "emit", emit_and_hold, batch_size=1, setup=mark_pid)
    pipeline.add(
        "sink",
        "first",
        mark_first_arrival,
        after="emit",
        batched=True,
        batch_size=1,
        setup=mark_pid,
    )
    return pipeline


relay_1 = build_relay_pipeline(1)
relay_3 = build_relay_pipeline(3)
cpu_1 = build_cpu_pipeline(1)
cpu_2 = build_cpu_pipeline(2)
wordcount_batched = build_wordcount_pipeline()
trivial = build_trivial_pipeline()


# Figures.


@dataclass
class Figure:
    """The values of one measured quantity, one per run."""

    label: str
    unit: str
    values: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "unit": self.unit,
            "values": self.values,
            "median": statistics.median(self.values),
            "min": min(self.values),
            "max": max(self.values),
        }


@dataclass
class ScenarioReport:
    """The figures of one scenario, and what it skipped with the reason."""

    figures: dict[str, Figure] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


class Report:
    """Every figure of a bench, by scenario."""

    def __init__(self) -> None:
        self.scenarios: dict[str, ScenarioReport] = {}

    def scenario(self, name: str) -> ScenarioReport:
        return self.scenarios.setdefault(name, ScenarioReport())

    def add(self, scenario: str, key: str, label: str, unit: str, value: float) -> None:
        figures = self.scenario(scenario).figures
        figures.setdefault(key, Figure(label, unit)).values.append(value)

    def add_rows(self, scenario: str, rows: list[tuple[str, str, str, float]]) -> None:
        """Add one value to each figure of `rows`: (key, label, unit, value)."""
        for key, label, unit, value in rows:
            self.add(scenario, key, label, unit, value)

    def skip(self, scenario: str, subject: str, reason: str) -> None:
        """Record and print that `subject` is not measured, once per scenario."""
        skipped = self.scenario(scenario).skipped
        if subject not in skipped:
            skipped[subject] = reason
            print(f"skipped {subject} in {scenario}: {reason}", flush=True)

    def median(self, scenario: str, key: str) -> float | None:
        report = self.scenarios.get(scenario)
        if report is None or key not in report.figures:
            return None
        return statistics.median(report.figures[key].values)

    def to_json(self) -> dict[str, Any]:
        return {
            name: {
                "figures": {
                    key: figure.summary() for key, figure in report.figures.items()
                },
                "skipped": report.skipped,
            }
            for name, report in self.scenarios.items()
        }


@dataclass(frozen=True)
class Sizes:
    """The sizes of one kind of bench run."""

    relay_items: int
    cpu_items: int
    corpus_bytes: int
    runs: int


FULL = Sizes(relay_items=10_000, cpu_items=400, corpus_bytes=12_000_000, runs=3)
QUICK = Sizes(relay_items=1_000, cpu_items=40, corpus_bytes=600_000, runs=1)


@dataclass
class Bench:
    """The state that every scenario of one bench invocation shares."""

    sizes: Sizes
    workdir: Path
    report: Report
    # The AMQP URL of the bench's own virtual host, or None without RabbitMQ.
    amqp_url: str | None = None
    folder_count: int = 0

    def new_folder(self, label: str) -> Path:
        """Create and return a new empty folder for one measurement."""
        self.folder_count += 1
        folder = self.workdir / f"{self.folder_count:03d}-{label}"
        folder.mkdir()
        return folder


# Engine runs.


@dataclass(frozen=True)
class EngineRun:
    """One finished `engine run`: when it started, how long it took, its output."""

    launched_s: float
    wall_s: float
    output: str


def engine_command(
    pipeline_file: Path,
    pipeline_name: str | None,
    params: dict[str, Any],
    stream_url: str,
    log_format: str = "text",
) -> list[str]:
    command = [sys.executable, "-m", "engine.cli", "--log-format", log_format, "run"]
    command += [str(pipeline_file), "--stream", stream_url, "--purge"]
    if pipeline_name is not None:
        command += ["--pipeline", pipeline_name]
    for key, value in params.items():
        command += ["-p", f"{key}={value}"]
    return command


def engine_environment() -> dict[str, str]:
    environment = dict(os.environ)
    # `engine run` makes a secret of its own for each run.
    environment.pop("MONOMYTH_SECRET", None)
    return environment


def run_engine(command: list[str], cwd: Path, timeout_s: float) -> EngineRun:
    """Run an `engine run` command to its end, and raise `BenchError` if it fails."""
    launched_s = time.time()
    started = time.perf_counter()
    try:
        result = subprocess.run(
            command,
            cwd=cwd,
            env=engine_environment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(
            f"engine run timed out after {timeout_s:.0f} s: {' '.join(command)}\n"
            f"{_tail(exc.output)}"
        ) from None
    wall_s = time.perf_counter() - started
    if result.returncode != 0:
        raise BenchError(
            f"engine run exited with code {result.returncode}: "
            f"{' '.join(command)}\n{_tail(result.stdout)}"
        )
    return EngineRun(launched_s, wall_s, result.stdout)


def _tail(output: str | bytes | None, lines: int = 30) -> str:
    if isinstance(output, bytes):
        output = output.decode("utf-8", "replace")
    return "\n".join((output or "").splitlines()[-lines:])


def engine_timeout_s(sizes: Sizes) -> float:
    return 120.0 if sizes is QUICK else 600.0


def sqlite_url(path: Path) -> str:
    # An absolute path gives the four slashes of sqlite:////tmp/run.db.
    return f"sqlite:///{path}"


def log_time_s(entry: dict[str, Any]) -> float:
    """Return the time of a JSON log entry of the engine, in seconds since the epoch."""
    moment = datetime.strptime(entry["time"], "%Y-%m-%dT%H:%M:%S.%fZ")
    return moment.replace(tzinfo=UTC).timestamp()


def processing_window_s(output: str, pipeline: str, processes: int, sink: str) -> float:
    """Return the seconds from the start of the last node process to the end.

    Reads the JSON log lines of `engine --log-format json run`: the worker's
    "node <pipeline>.<node>#<index> started" for each of the `processes` node
    processes, and the master's "node type <pipeline>.<sink> completed".
    """
    started = re.compile(rf"node {re.escape(pipeline)}\.\w+#\d+ started")
    completed_message = f"node type {pipeline}.{sink} completed"
    started_s: list[float] = []
    completed_s = None
    for line in output.splitlines():
        if not line.startswith("{"):
            continue
        entry = json.loads(line)
        message = entry.get("message", "")
        if started.match(message):
            started_s.append(log_time_s(entry))
        elif message == completed_message:
            completed_s = log_time_s(entry)
    if len(started_s) != processes or completed_s is None:
        raise BenchError(
            f"the log of pipeline {pipeline} has {len(started_s)} lines 'node ... "
            f"started', not {processes}, or lacks {completed_message!r}; the "
            "engine's log messages changed, so update processing_window_s"
        )
    return completed_s - max(started_s)


# Scenario 1: relay per stage.


def bench_relay(bench: Bench, run: int) -> None:
    streams = ["sqlite"]
    if bench.amqp_url is not None:
        streams.append("rabbitmq")
    for stream in streams:
        for stages in (1, 3):
            print(f"relay: {stream}, {stages} stage(s), run {run}", flush=True)
            raw_s = relay_raw(bench, stream, stages, run)
            pipeline_rate = relay_raw_pipeline(bench, stream, stages, run)
            engine_rate = relay_engine(bench, stream, stages)
            record_relay(
                bench.report,
                stream,
                stages,
                raw_loop_rate=bench.sizes.relay_items / raw_s,
                raw_pipeline_rate=pipeline_rate,
                engine_rate=engine_rate,
            )


def relay_raw(bench: Bench, stream: str, stages: int, run: int) -> float:
    """Return the seconds that a plain loop takes to relay the items `stages` times."""
    count = bench.sizes.relay_items
    if stream == "sqlite":
        path = bench.new_folder("raw-sqlite") / "raw.db"
        return relay_sqlite_raw(path, count, stages, RELAY_BATCH_SIZE)
    assert bench.amqp_url is not None
    prefix = f"raw-{stages}-{run}-{uuid.uuid4().hex[:6]}"
    queues = [f"{prefix}.q{index}" for index in range(stages + 1)]
    return relay_pika_raw(bench.amqp_url, queues, count, RELAY_BATCH_SIZE)


def relay_raw_pipeline(bench: Bench, stream: str, stages: int, run: int) -> float:
    """Return the end-to-end items/s of a raw pipeline with `stages` relay processes."""
    count = bench.sizes.relay_items
    timeout_s = engine_timeout_s(bench.sizes)
    if stream == "sqlite":
        path = bench.new_folder("raw-pipeline-sqlite") / "raw.db"
        return relay_sqlite_pipeline(path, count, stages, RELAY_BATCH_SIZE, timeout_s)
    assert bench.amqp_url is not None
    prefix = f"raw-pipeline-{stages}-{run}-{uuid.uuid4().hex[:6]}"
    return relay_pika_pipeline(
        bench.amqp_url, prefix, count, stages, RELAY_BATCH_SIZE, timeout_s
    )


def relay_engine(bench: Bench, stream: str, stages: int) -> float:
    """Return the items/s of an engine relay, between the first and last arrival."""
    folder = bench.new_folder(f"relay-{stream}-{stages}")
    count = bench.sizes.relay_items
    if stream == "sqlite":
        url = sqlite_url(folder / "stream.db")
    else:
        assert bench.amqp_url is not None
        url = bench.amqp_url
    params = {"n": count, "marks": folder}
    command = engine_command(BENCH_FILE, f"bench-relay-{stages}", params, url)
    run_engine(command, folder, engine_timeout_s(bench.sizes))

    arrivals = sorted(entry for log in read_marks(folder, "arrivals-") for entry in log)
    arrived = sum(entry[1] for entry in arrivals)
    if arrived != count:
        raise BenchError(
            f"the relay sink got {arrived} items of {count} on {stream}; see {folder}"
        )
    return arrival_rate(arrivals, f"in the engine on {stream}")


def arrival_rate(arrivals: Sequence[Sequence[float]], where: str) -> float:
    """Return the items/s after the first batch of `arrivals`: (time, size) in order.

    The items of the later batches arrived after the first one, so the rate
    is their count over the time from the first batch to the last.
    """
    window_s = arrivals[-1][0] - arrivals[0][0]
    if window_s <= 0:
        raise BenchError(
            f"all items arrived in one batch {where}; raise the relay item "
            "count to measure a rate"
        )
    arrived = sum(size for _, size in arrivals)
    return (arrived - arrivals[0][1]) / window_s


def record_relay(
    report: Report,
    stream: str,
    stages: int,
    *,
    raw_loop_rate: float,
    raw_pipeline_rate: float,
    engine_rate: float,
) -> None:
    """Record the rates in items/s end to end, and per stage as stages x that.

    `engine_over_raw` compares the engine with the single raw loop, and
    `engine_over_raw_pipeline` with the raw pipeline of the same shape.
    """
    key = f"{stream}.{stages}_stage"
    where = f"{stream}, {_stages_text(stages)}"
    raw_per_stage = stages * raw_loop_rate
    pipeline_per_stage = stages * raw_pipeline_rate
    engine_per_stage = stages * engine_rate
    ratio = engine_per_stage / raw_per_stage
    pipeline_ratio = engine_per_stage / pipeline_per_stage
    figures = {
        "raw_per_stage": ("raw loop, per stage", "items/s", raw_per_stage),
        "raw_pipeline_end_to_end": (
            "raw pipeline, end to end",
            "items/s",
            raw_pipeline_rate,
        ),
        "raw_pipeline_per_stage": (
            "raw pipeline, per stage",
            "items/s",
            pipeline_per_stage,
        ),
        "engine_end_to_end": ("engine, end to end", "items/s", engine_rate),
        "engine_per_stage": ("engine, per stage", "items/s", engine_per_stage),
        "engine_over_raw": ("engine / raw, per stage", "x", ratio),
        "engine_over_raw_pipeline": (
            "engine / raw pipeline, per stage",
            "x",
            pipeline_ratio,
        ),
    }
    for name, (label, unit, value) in figures.items():
        report.add("relay", f"{key}.{name}", f"{where}: {label}", unit, value)


def _stages_text(stages: int) -> str:
    return "1 stage" if stages == 1 else f"{stages} stages"


def relay_sqlite_raw(path: Path, count: int, stages: int, batch_size: int) -> float:
    """Return the seconds to relay `count` items through `stages` SQLite queues.

    Each step claims a batch, inserts it into the next queue and deletes the
    inputs, in one transaction, with the stream's settings: WAL and
    synchronous=NORMAL.
    """
    connection = connect_raw_sqlite(path)
    try:
        create_raw_sqlite_schema(connection)
        bodies = [(make_payload(index).encode(),) for index in range(count)]
        connection.execute("BEGIN IMMEDIATE")
        connection.executemany(
            "INSERT INTO messages (queue, body) VALUES (0, ?)", bodies
        )
        connection.execute("COMMIT")

        started = time.perf_counter()
        for stage in range(stages):
            while _relay_sqlite_batch(connection, stage, batch_size) == batch_size:
                pass
        elapsed_s = time.perf_counter() - started

        (relayed,) = connection.execute(
            "SELECT COUNT(*) FROM messages WHERE queue = ?", (stages,)
        ).fetchone()
    finally:
        connection.close()
    if relayed != count:
        raise BenchError(f"the raw SQLite relay moved {relayed} items of {count}")
    return elapsed_s


def _relay_sqlite_batch(connection: sqlite3.Connection, stage: int, size: int) -> int:
    connection.execute("BEGIN IMMEDIATE")
    rows = connection.execute(
        "SELECT id, body FROM messages WHERE queue = ? ORDER BY id LIMIT ?",
        (stage, size),
    ).fetchall()
    connection.executemany(
        "INSERT INTO messages (queue, body) VALUES (?, ?)",
        [(stage + 1, body) for _, body in rows],
    )
    connection.executemany(
        "DELETE FROM messages WHERE id = ?", [(message_id,) for message_id, _ in rows]
    )
    connection.execute("COMMIT")
    return len(rows)


def relay_pika_raw(url: str, queues: list[str], count: int, batch_size: int) -> float:
    """Relay `count` items along `queues` with plain pika, and return the seconds.

    The first queue is filled first and not timed. Each later queue ends
    with all the items, moved by `PikaRelay`.
    """
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        for queue in queues:
            channel.queue_declare(queue, durable=True)
        persistent = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)
        for index in range(count):
            body = make_payload(index).encode()
            channel.basic_publish("", queues[0], body, persistent)
        _wait_for_depth(channel, queues[0], count)

        relay = PikaRelay(url, queues, count, batch_size)
        relay.run()
        elapsed_s = relay.elapsed_s

        _wait_for_depth(channel, queues[-1], count)
        for queue in queues:
            channel.queue_delete(queue)
    finally:
        connection.close()
    return elapsed_s


def _wait_for_depth(channel: Any, queue: str, count: int, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while True:
        depth = channel.queue_declare(queue, passive=True).method.message_count
        if depth == count:
            return
        if time.monotonic() > deadline:
            raise BenchError(
                f"timed out after {timeout_s:.0f} s waiting for queue {queue} to "
                f"hold {count} messages; it holds {depth}"
            )
        time.sleep(0.01)


class PikaLoop:
    """One connection and one channel in confirm mode on pika's `SelectConnection`.

    `run` drives pika's I/O loop until a subclass calls `_finish`, the
    connection fails or `timeout_s` passes. Once the channel has its
    prefetch of two batches, `on_ready` runs (if given) and then `_start`.
    A batch is published before waiting once for all its confirms, where
    pika's blocking channel waits for each confirm in turn.
    """

    # The name of the client in error messages.
    role = "client"

    def __init__(
        self,
        url: str,
        batch_size: int,
        timeout_s: float,
        on_ready: Callable[[], None] | None = None,
    ):
        import pika

        self.pika = pika
        self.parameters = pika.URLParameters(url)
        self.persistent = pika.BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent
        )
        self.batch_size = batch_size
        self.timeout_s = timeout_s
        self.on_ready = on_ready
        self.unconfirmed: set[int] = set()
        self.publish_seq = 0
        self.finished = False
        self.error: str | None = None

    def run(self) -> None:
        """Run the I/O loop to the end, and raise `BenchError` if it failed."""
        self.connection = self.pika.SelectConnection(
            self.parameters,
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_closed,
        )
        self.connection.ioloop.call_later(self.timeout_s, self._on_timeout)
        self.connection.ioloop.start()
        if not self.finished:
            raise BenchError(f"the raw pika {self.role} failed: {self.error}")

    def _start(self) -> None:
        raise NotImplementedError

    def _on_all_confirmed(self) -> None:
        """Continue once the broker has confirmed every message published so far."""

    def _publish(self, queue: str, body: bytes) -> None:
        self.channel.basic_publish("", queue, body, self.persistent)
        self.publish_seq += 1
        self.unconfirmed.add(self.publish_seq)

    def _finish(self) -> None:
        self.finished = True
        self.connection.close()

    def _on_open(self, connection: Any) -> None:
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_open_error(self, connection: Any, error: Exception) -> None:
        self.error = f"connection failed: {error!r}"
        connection.ioloop.stop()

    def _on_closed(self, connection: Any, reason: Exception) -> None:
        if not self.finished and self.error is None:
            self.error = f"connection closed: {reason!r}"
        connection.ioloop.stop()

    def _on_timeout(self) -> None:
        self.error = f"timed out after {self.timeout_s:.0f} s"
        self.connection.close()

    def _on_channel_open(self, channel: Any) -> None:
        self.channel = channel
        channel.confirm_delivery(
            ack_nack_callback=self._on_confirm, callback=self._on_confirm_mode
        )

    def _on_confirm_mode(self, _frame: Any) -> None:
        self.channel.basic_qos(
            prefetch_count=2 * self.batch_size, callback=self._on_qos
        )

    def _on_qos(self, _frame: Any) -> None:
        if self.on_ready is not None:
            self.on_ready()
        self._start()

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        if isinstance(method, self.pika.spec.Basic.Nack):
            self.error = f"the broker rejected message {method.delivery_tag}"
            self.connection.close()
            return
        if method.multiple:
            self.unconfirmed = {s for s in self.unconfirmed if s > method.delivery_tag}
        else:
            self.unconfirmed.discard(method.delivery_tag)
        if not self.unconfirmed:
            self._on_all_confirmed()


class PikaRelay(PikaLoop):
    """The raw block on RabbitMQ: consume a batch, publish it confirmed, ack it.

    The prefetch is two batches, so the next batch arrives while the broker
    confirms the current one. The stages run one after the other, each
    moving `count` items from one queue of `queues` to the next.
    """

    role = "relay"

    def __init__(
        self,
        url: str,
        queues: list[str],
        count: int,
        batch_size: int,
        timeout_s: float = 300.0,
        on_ready: Callable[[], None] | None = None,
    ):
        super().__init__(url, batch_size, timeout_s, on_ready)
        self.queues = queues
        self.count = count
        self.stage = 0
        # Delivery tags and bodies received and not yet published.
        self.pending: list[tuple[int, bytes]] = []
        self.relayed = 0
        # The batch published and waiting for its confirms.
        self.batch_last_tag = 0
        self.batch_count = 0
        self.started = 0.0
        # The seconds from the first consume to the end of the last stage.
        self.elapsed_s = 0.0

    def _start(self) -> None:
        self.started = time.perf_counter()
        self._consume()

    def _consume(self) -> None:
        queue = self.queues[self.stage]
        self.consumer_tag = self.channel.basic_consume(queue, self._on_message)

    def _on_message(self, _channel: Any, method: Any, _props: Any, body: bytes):
        self.pending.append((method.delivery_tag, body))
        self._publish_batch()

    def _publish_batch(self) -> None:
        size = min(self.batch_size, self.count - self.relayed)
        if self.batch_count or size == 0 or len(self.pending) < size:
            return
        batch, self.pending = self.pending[:size], self.pending[size:]
        target = self.queues[self.stage + 1]
        for _, body in batch:
            self._publish(target, body)
        self.batch_last_tag = batch[-1][0]
        self.batch_count = size

    def _on_all_confirmed(self) -> None:
        if not self.batch_count:
            return
        # Every result is confirmed, so the inputs can go.
        self.channel.basic_ack(self.batch_last_tag, multiple=True)
        self.relayed += self.batch_count
        self.batch_count = 0
        if self.relayed < self.count:
            self._publish_batch()
            return
        self.channel.basic_cancel(self.consumer_tag, callback=self._on_stage_done)

    def _on_stage_done(self, _frame: Any) -> None:
        self.stage += 1
        self.relayed = 0
        if self.stage < len(self.queues) - 1:
            self._consume()
            return
        self.elapsed_s = time.perf_counter() - self.started
        self._finish()


class PikaProducer(PikaLoop):
    """Publish `count` payloads to `queue`, waiting for each batch's confirms."""

    role = "producer"

    def __init__(
        self,
        url: str,
        queue: str,
        count: int,
        batch_size: int,
        timeout_s: float,
        on_ready: Callable[[], None] | None = None,
    ):
        super().__init__(url, batch_size, timeout_s, on_ready)
        self.queue = queue
        self.count = count
        self.published = 0

    def _start(self) -> None:
        self._publish_batch()

    def _publish_batch(self) -> None:
        size = min(self.batch_size, self.count - self.published)
        for index in range(self.published, self.published + size):
            self._publish(self.queue, make_payload(index).encode())
        self.published += size

    def _on_all_confirmed(self) -> None:
        if self.published < self.count:
            self._publish_batch()
        else:
            self._finish()


class PikaConsumer(PikaLoop):
    """Consume `count` messages from `queue` and ack each batch with one ack.

    `arrivals` gets the `time.perf_counter()` and the size of each batch, and
    `bodies` the distinct bodies received.
    """

    role = "consumer"

    def __init__(
        self,
        url: str,
        queue: str,
        count: int,
        batch_size: int,
        timeout_s: float,
        on_ready: Callable[[], None] | None = None,
    ):
        super().__init__(url, batch_size, timeout_s, on_ready)
        self.queue = queue
        self.count = count
        self.received = 0
        self.pending: list[tuple[int, bytes]] = []
        self.arrivals: list[tuple[float, int]] = []
        self.bodies: set[bytes] = set()

    def _start(self) -> None:
        self.consumer_tag = self.channel.basic_consume(self.queue, self._on_message)

    def _on_message(self, _channel: Any, method: Any, _props: Any, body: bytes):
        self.pending.append((method.delivery_tag, body))
        if self.received == self.count:
            # A message beyond `count` stays unacked, so it goes back to the
            # queue when the connection closes, and the queue check fails.
            return
        size = min(self.batch_size, self.count - self.received)
        if len(self.pending) < size:
            return
        batch, self.pending = self.pending[:size], self.pending[size:]
        self.channel.basic_ack(batch[-1][0], multiple=True)
        self.arrivals.append((time.perf_counter(), size))
        self.bodies.update(body for _, body in batch)
        self.received += size
        if self.received == self.count:
            self.channel.basic_cancel(self.consumer_tag, callback=self._on_cancelled)

    def _on_cancelled(self, _frame: Any) -> None:
        self._finish()


# Raw pipelines of the relay: the shape of the engine's relay pipeline, in
# plain processes that use plain sqlite3 or plain pika and no engine code.

# The pause between two polls of a SQLite queue that lacks a full batch: the
# shortest poll pause of the SQLite stream.
RAW_POLL_S = 0.002
# How long SQLite waits for the write lock before a statement fails as busy,
# as in the SQLite stream.
RAW_BUSY_TIMEOUT_S = 5.0
_COUNT_VISIBLE_SQL = (
    "SELECT COUNT(*) FROM (SELECT 1 FROM messages WHERE queue = ? LIMIT ?)"
)


@dataclass(frozen=True)
class RawRole:
    """One process of a raw pipeline: its name, and the function it runs with `args`."""

    name: str
    function: Callable[..., Any]
    args: tuple[Any, ...]


def run_raw_pipeline(roles: list[RawRole], timeout_s: float) -> Any:
    """Run every role in a forked process at once, and return the last role's result.

    Each function gets a `ready` callable as its last argument. Calling it
    waits until every process has called it, so the processes' start-up
    stays out of the figures, as the engine's source waits for every node.
    Raises `BenchError` as soon as a role fails, or when the roles have not
    all finished `timeout_s` (plus 10 s) after the start. The processes still
    running then are terminated.
    """
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(len(roles))
    started: list[tuple[str, Any, Any]] = []
    try:
        for role in roles:
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(
                target=_run_raw_role,
                args=(role, barrier, timeout_s, sender),
                name=f"raw {role.name}",
            )
            process.start()
            sender.close()
            started.append((role.name, process, receiver))
        results = _collect_raw_results(started, timeout_s + 10.0)
    finally:
        for _, process, receiver in started:
            if process.is_alive():
                process.terminate()
            process.join(10.0)
            receiver.close()
    return results[roles[-1].name]


def _run_raw_role(role: RawRole, barrier: Any, timeout_s: float, sender: Any) -> None:
    def ready() -> None:
        barrier.wait(timeout_s)

    try:
        result = role.function(*role.args, ready)
    except Exception as exc:  # the parent reports it and fails the bench
        # Releases the other processes from the barrier at once.
        barrier.abort()
        sender.send(("error", f"{type(exc).__name__}: {exc}"))
    else:
        sender.send(("ok", result))
    finally:
        sender.close()


def _collect_raw_results(
    started: list[tuple[str, Any, Any]], timeout_s: float
) -> dict[str, Any]:
    names = {receiver: name for name, _, receiver in started}
    results: dict[str, Any] = {}
    deadline = time.monotonic() + timeout_s
    while names:
        remaining_s = max(0.0, deadline - time.monotonic())
        ready = multiprocessing.connection.wait(list(names), timeout=remaining_s)
        if not ready:
            raise BenchError(
                f"the raw pipeline timed out after {timeout_s:.0f} s; still "
                f"running: {', '.join(names.values())}"
            )
        for receiver in ready:
            name = names.pop(receiver)
            try:
                status, value = receiver.recv()
            except EOFError:
                raise BenchError(
                    f"the {name} process of the raw pipeline exited without a result"
                ) from None
            if status == "error":
                raise BenchError(
                    f"the {name} process of the raw pipeline failed: {value}"
                )
            results[name] = value
    return results


def check_raw_delivery(pipeline: str, result: dict[str, Any], count: int) -> None:
    """Raise `BenchError` unless the consumer got each of the `count` items once."""
    received, distinct = result["received"], result["distinct"]
    if received != count or distinct != count:
        raise BenchError(
            f"{pipeline} delivered {received} items to its consumer, {distinct} of "
            f"them distinct; expected each of the {count} items exactly once"
        )


def connect_raw_sqlite(path: Path) -> sqlite3.Connection:
    """Open `path` with the SQLite stream's settings: WAL and synchronous=NORMAL."""
    connection = sqlite3.connect(path, timeout=RAW_BUSY_TIMEOUT_S, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    return connection


def create_raw_sqlite_schema(connection: sqlite3.Connection) -> None:
    connection.execute(
        "CREATE TABLE messages "
        "(id INTEGER PRIMARY KEY, queue INTEGER NOT NULL, body BLOB NOT NULL)"
    )
    connection.execute("CREATE INDEX messages_by_queue ON messages (queue, id)")


def relay_sqlite_pipeline(
    path: Path, count: int, stages: int, batch_size: int, timeout_s: float
) -> float:
    """Return the end-to-end items/s of a raw SQLite pipeline, timed as the engine's.

    A producer inserts the items into queue 0, one process per stage moves
    them to the next queue, and a consumer deletes them from queue `stages`.
    """
    connection = connect_raw_sqlite(path)
    try:
        create_raw_sqlite_schema(connection)
    finally:
        connection.close()

    shared = (count, batch_size, timeout_s)
    roles = [RawRole("producer", produce_sqlite, (path, *shared))]
    for stage in range(stages):
        roles.append(
            RawRole(f"relay {stage + 1}", relay_sqlite_stage, (path, stage, *shared))
        )
    roles.append(RawRole("consumer", consume_sqlite, (path, stages, *shared)))
    result = run_raw_pipeline(roles, timeout_s)

    check_raw_delivery("the raw SQLite pipeline", result, count)
    connection = connect_raw_sqlite(path)
    try:
        (left,) = connection.execute("SELECT COUNT(*) FROM messages").fetchone()
    finally:
        connection.close()
    if left:
        raise BenchError(f"the raw SQLite pipeline left {left} messages in {path}")
    return arrival_rate(result["arrivals"], "in the raw SQLite pipeline")


def produce_sqlite(
    path: Path,
    count: int,
    batch_size: int,
    timeout_s: float,
    ready: Callable[[], None],
) -> None:
    """Insert the `count` payloads into queue 0, one transaction per batch."""
    connection = connect_raw_sqlite(path)
    try:
        ready()
        deadline = time.monotonic() + timeout_s
        for indexes in batched(range(count), batch_size):
            _check_deadline(deadline, timeout_s, "the raw SQLite producer")
            bodies = [(make_payload(index).encode(),) for index in indexes]
            connection.execute("BEGIN IMMEDIATE")
            connection.executemany(
                "INSERT INTO messages (queue, body) VALUES (0, ?)", bodies
            )
            connection.execute("COMMIT")
    finally:
        connection.close()


def relay_sqlite_stage(
    path: Path,
    stage: int,
    count: int,
    batch_size: int,
    timeout_s: float,
    ready: Callable[[], None],
) -> None:
    """Move `count` items from queue `stage` to the next, as the raw loop does."""
    connection = connect_raw_sqlite(path)
    try:
        ready()
        deadline = time.monotonic() + timeout_s
        relayed = 0
        while relayed < count:
            size = min(batch_size, count - relayed)
            _wait_for_sqlite_batch(connection, stage, size, deadline, timeout_s)
            relayed += _relay_sqlite_batch(connection, stage, batch_size)
    finally:
        connection.close()


def consume_sqlite(
    path: Path,
    queue: int,
    count: int,
    batch_size: int,
    timeout_s: float,
    ready: Callable[[], None],
) -> dict[str, Any]:
    """Claim and delete `count` items from `queue`, one transaction per batch.

    Returns the `time.perf_counter()` and size of each batch as "arrivals",
    the items received, and how many distinct bodies they had.
    """
    connection = connect_raw_sqlite(path)
    arrivals: list[tuple[float, int]] = []
    bodies: set[bytes] = set()
    received = 0
    try:
        ready()
        deadline = time.monotonic() + timeout_s
        while received < count:
            size = min(batch_size, count - received)
            _wait_for_sqlite_batch(connection, queue, size, deadline, timeout_s)
            connection.execute("BEGIN IMMEDIATE")
            rows = connection.execute(
                "SELECT id, body FROM messages WHERE queue = ? ORDER BY id LIMIT ?",
                (queue, batch_size),
            ).fetchall()
            connection.executemany(
                "DELETE FROM messages WHERE id = ?",
                [(message_id,) for message_id, _ in rows],
            )
            connection.execute("COMMIT")
            arrivals.append((time.perf_counter(), len(rows)))
            bodies.update(body for _, body in rows)
            received += len(rows)
    finally:
        connection.close()
    return {"arrivals": arrivals, "received": received, "distinct": len(bodies)}


def _wait_for_sqlite_batch(
    connection: sqlite3.Connection,
    queue: int,
    size: int,
    deadline: float,
    timeout_s: float,
) -> None:
    """Poll, outside any write transaction, until `queue` contains `size` messages."""
    while True:
        (visible,) = connection.execute(_COUNT_VISIBLE_SQL, (queue, size)).fetchone()
        if visible >= size:
            return
        _check_deadline(
            deadline, timeout_s, f"queue {queue} of the raw SQLite pipeline"
        )
        time.sleep(RAW_POLL_S)


def _check_deadline(deadline: float, timeout_s: float, subject: str) -> None:
    if time.monotonic() > deadline:
        raise TimeoutError(f"{subject} timed out after {timeout_s:.0f} s")


def relay_pika_pipeline(
    url: str, prefix: str, count: int, stages: int, batch_size: int, timeout_s: float
) -> float:
    """Return the end-to-end items/s of a raw pika pipeline, timed as the engine's.

    A producer publishes the items to the first of the queues named after
    `prefix`, one `PikaRelay` process per stage moves them to the next
    queue, and a consumer acks them from the last queue.
    """
    import pika

    queues = [f"{prefix}.q{index}" for index in range(stages + 1)]
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        for queue in queues:
            channel.queue_declare(queue, durable=True)
    finally:
        connection.close()

    shared = (count, batch_size, timeout_s)
    roles = [RawRole("producer", produce_pika, (url, queues[0], *shared))]
    for stage in range(stages):
        queue_pair = (queues[stage], queues[stage + 1])
        roles.append(
            RawRole(f"relay {stage + 1}", relay_pika_stage, (url, *queue_pair, *shared))
        )
    roles.append(RawRole("consumer", consume_pika, (url, queues[-1], *shared)))
    try:
        result = run_raw_pipeline(roles, timeout_s)
    finally:
        left = _delete_queues(url, queues)

    check_raw_delivery("the raw pika pipeline", result, count)
    if any(left.values()):
        raise BenchError(f"the raw pika pipeline left messages in its queues: {left}")
    return arrival_rate(result["arrivals"], "in the raw pika pipeline")


def produce_pika(
    url: str,
    queue: str,
    count: int,
    batch_size: int,
    timeout_s: float,
    ready: Callable[[], None],
) -> None:
    PikaProducer(url, queue, count, batch_size, timeout_s, ready).run()


def relay_pika_stage(
    url: str,
    source: str,
    target: str,
    count: int,
    batch_size: int,
    timeout_s: float,
    ready: Callable[[], None],
) -> None:
    PikaRelay(url, [source, target], count, batch_size, timeout_s, ready).run()


def consume_pika(
    url: str,
    queue: str,
    count: int,
    batch_size: int,
    timeout_s: float,
    ready: Callable[[], None],
) -> dict[str, Any]:
    """Consume and ack `count` items, and return the same result as `consume_sqlite`."""
    consumer = PikaConsumer(url, queue, count, batch_size, timeout_s, ready)
    consumer.run()
    return {
        "arrivals": consumer.arrivals,
        "received": consumer.received,
        "distinct": len(consumer.bodies),
    }


def _delete_queues(url: str, queues: list[str]) -> dict[str, int]:
    """Delete `queues`, and return the messages that each one held."""
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        return {
            queue: channel.queue_delete(queue).method.message_count for queue in queues
        }
    finally:
        connection.close()


# Scenario 2: CPU-heavy scaling.


def calibrate_spin_loops(item_s: float = CPU_ITEM_S) -> int:
    """Return the `spin` loops that take about `item_s` seconds here."""
    probe_loops = 200_000
    best_s = min(_time_call(spin, probe_loops) for _ in range(5))
    return max(1, round(probe_loops * item_s / best_s))


def _time_call(function: Callable[..., Any], *args: Any) -> float:
    started = time.perf_counter()
    function(*args)
    return time.perf_counter() - started


def bench_cpu(bench: Bench, run: int, loops: int) -> None:
    count = bench.sizes.cpu_items
    print(f"cpu: {count} items of {loops} loops, run {run}", flush=True)
    plain_s = _time_call(_spin_many, count, loops)
    ceiling_s = spin_in_two_processes(count, loops)
    engine_1_s = cpu_engine(bench, 1, loops)
    engine_2_s = cpu_engine(bench, 2, loops)

    ceiling_x = plain_s / ceiling_s
    one_x = plain_s / engine_1_s
    two_x = plain_s / engine_2_s
    ratio = ceiling_s / engine_2_s
    bench.report.add_rows(
        "cpu",
        [
            ("plain_loop_s", "one plain loop", "s", plain_s),
            ("two_processes_s", "two plain processes", "s", ceiling_s),
            ("engine_1_s", "engine, 1 process", "s", engine_1_s),
            ("engine_2_s", "engine, 2 processes", "s", engine_2_s),
            ("ceiling_speedup", "speedup of two plain processes", "x", ceiling_x),
            ("engine_1_speedup", "speedup of the engine, 1 process", "x", one_x),
            ("engine_2_speedup", "speedup of the engine, 2 processes", "x", two_x),
            ("engine_2_over_ceiling", "engine 2 processes / ceiling", "x", ratio),
        ],
    )


def _spin_many(count: int, loops: int) -> None:
    for _ in range(count):
        spin(loops)


def _spin_share(count: int, loops: int, results: Any) -> None:
    started_s = time.time()
    _spin_many(count, loops)
    results.send((started_s, time.time()))
    results.close()


def spin_in_two_processes(count: int, loops: int) -> float:
    """Return the seconds from the first start to the last end of two processes."""
    context = multiprocessing.get_context("fork")
    shares = (count // 2, count - count // 2)
    spans = []
    workers = []
    for share in shares:
        receiver, sender = context.Pipe(duplex=False)
        worker = context.Process(target=_spin_share, args=(share, loops, sender))
        worker.start()
        sender.close()
        workers.append((worker, receiver))
    for worker, receiver in workers:
        if not receiver.poll(PEER_TIMEOUT_S):
            raise BenchError("a plain spin process sent no result")
        spans.append(receiver.recv())
        worker.join(10.0)
    return max(end for _, end in spans) - min(start for start, _ in spans)


def cpu_engine(bench: Bench, processes: int, loops: int) -> float:
    """Return the seconds from the first item started to the last item done."""
    folder = bench.new_folder(f"cpu-{processes}")
    count = bench.sizes.cpu_items
    params = {"n": count, "loops": loops, "marks": folder}
    url = sqlite_url(folder / "stream.db")
    command = engine_command(BENCH_FILE, f"bench-cpu-{processes}", params, url)
    run_engine(command, folder, engine_timeout_s(bench.sizes))

    logs = read_marks(folder, "burn-")
    burned = sum(log["count"] for log in logs)
    if burned != count:
        raise BenchError(f"the burn node processed {burned} items of {count}")
    active = [log for log in logs if log["count"]]
    return max(log["last_s"] for log in active) - min(log["first_s"] for log in active)


# Scenario 3: word count.


def write_corpus(path: Path, size_bytes: int, seed: int = CORPUS_SEED) -> None:
    """Write about `size_bytes` of lines of pseudo-words, the same for the same seed.

    Word frequencies follow Zipf's law over 20,000 words, and one line in
    eight starts with a capital, so that lowercasing matters.
    """
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocabulary = [
        "".join(rng.choices(letters, k=rng.randint(2, 10))) for _ in range(20_000)
    ]
    cumulative = list(itertools.accumulate(1 / rank for rank in range(1, 20_001)))
    written = 0
    with open(path, "w", encoding="utf-8") as file:
        while written < size_bytes:
            lines = []
            for _ in range(1000):
                words = rng.choices(vocabulary, cum_weights=cumulative, k=10)
                if rng.random() < 0.125:
                    words[0] = words[0].capitalize()
                lines.append(" ".join(words) + "\n")
            block = "".join(lines)
            file.write(block)
            written += len(block)


@dataclass(frozen=True)
class Corpus:
    """The word-count input and its reference counts."""

    path: Path
    size_bytes: int
    chunks: int
    counts: dict[str, int]


def prepare_corpus(bench: Bench) -> Corpus:
    path = bench.workdir / "corpus.txt"
    write_corpus(path, bench.sizes.corpus_bytes)
    counts = dict(Counter(path.read_text(encoding="utf-8").lower().split()))
    chunks = sum(1 for _ in read_chunks(path, LINES_PER_CHUNK))
    return Corpus(path, path.stat().st_size, chunks, counts)


def check_counts(system: str, counts: dict[str, int], expected: dict[str, int]):
    """Raise `BenchError` when `counts` differ from the single-process count."""
    if counts == expected:
        return
    missing = sorted(set(expected) - set(counts))
    extra = sorted(set(counts) - set(expected))
    wrong = sorted(w for w in set(expected) & set(counts) if counts[w] != expected[w])
    example = (wrong or missing or extra)[0]
    raise BenchError(
        f"{system} counted the words differently from the single-process count: "
        f"{len(missing)} words missing, {len(extra)} unexpected, {len(wrong)} "
        f"with another count (for example {example!r}: {counts.get(example)} "
        f"instead of {expected.get(example)})"
    )


@dataclass(frozen=True)
class Timing:
    """Wall time of a word count with its start-up and without it."""

    included_s: float
    excluded_s: float


def bench_wordcount(bench: Bench, run: int, corpus: Corpus) -> None:
    print(
        f"wordcount: {corpus.size_bytes / 1e6:.1f} MB in {corpus.chunks} chunks, "
        f"run {run}",
        flush=True,
    )
    timings: dict[str, Timing] = {
        "counter": wordcount_counter(corpus),
        "pool": wordcount_pool(corpus),
        "engine_example": wordcount_engine(bench, corpus, example=True),
        "engine_per_chunk": wordcount_engine(bench, corpus, example=False),
    }
    for peer in PEERS:
        timing = wordcount_peer(bench, corpus, peer)
        if timing is not None:
            timings[peer] = timing
    record_wordcount(bench.report, timings)


WORDCOUNT_LABELS = {
    "counter": "single-process Counter",
    "pool": "multiprocessing.Pool, 2 processes",
    "engine_example": "engine, examples/wordcount.py",
    "engine_per_chunk": "engine, per-chunk map variant",
    "ray": "Ray, 2 CPUs",
    "dask": "Dask distributed, 2 worker processes",
    "dramatiq": "Dramatiq, 2 worker processes",
}


def record_wordcount(report: Report, timings: dict[str, Timing]) -> None:
    """Record each system's times, then each engine's time over each other's."""
    for system, timing in timings.items():
        label = WORDCOUNT_LABELS[system]
        for kind in ("included", "excluded"):
            value = getattr(timing, f"{kind}_s")
            label_kind = f"{label}, start-up {kind}"
            report.add("wordcount", f"{system}.{kind}_s", label_kind, "s", value)
    for engine in ("engine_example", "engine_per_chunk"):
        for other, timing in timings.items():
            if other.startswith("engine"):
                continue
            for kind in ("included", "excluded"):
                key = f"{engine}.over_{other}.{kind}"
                label = f"{WORDCOUNT_LABELS[engine]} / {other}, start-up {kind}"
                ratio = getattr(timings[engine], f"{kind}_s") / getattr(
                    timing, f"{kind}_s"
                )
                report.add("wordcount", key, label, "x", ratio)


def wordcount_counter(corpus: Corpus) -> Timing:
    """Count in this process, reading the file in chunks of 10 lines."""
    started = time.perf_counter()
    counts = dict(count_texts(read_chunks(corpus.path, LINES_PER_CHUNK)))
    elapsed_s = time.perf_counter() - started
    check_counts("the single-process Counter", counts, corpus.counts)
    return Timing(elapsed_s, elapsed_s)


def wordcount_pool(corpus: Corpus) -> Timing:
    """Count with a pool of two forked processes, one task per 200 chunks."""
    started = time.perf_counter()
    pool = multiprocessing.get_context("fork").Pool(2)
    try:
        pool.map(len, [[], []])
        ready = time.perf_counter()
        counts: Counter[str] = Counter()
        tasks = batched(read_chunks(corpus.path, LINES_PER_CHUNK), CHUNKS_PER_TASK)
        for partial in pool.imap_unordered(count_texts, tasks):
            counts.update(partial)
        computed = time.perf_counter()
        pool.close()
    finally:
        pool.terminate()
        pool.join()
    ended = time.perf_counter()
    check_counts("multiprocessing.Pool", dict(counts), corpus.counts)
    return Timing(ended - started, computed - ready)


def wordcount_engine(bench: Bench, corpus: Corpus, example: bool) -> Timing:
    """Run an engine word count, and return its wall time and processing window."""
    folder = bench.new_folder("wordcount-example" if example else "wordcount-batched")
    output = folder / "counts.db"
    params = {"input": corpus.path, "output": output}
    url = sqlite_url(folder / "stream.db")
    if example:
        command = engine_command(WORDCOUNT_EXAMPLE, None, params, url, "json")
        pipeline = "wordcount"
    else:
        command = engine_command(BENCH_FILE, "bench-wordcount", params, url, "json")
        pipeline = "bench-wordcount"
    run = run_engine(command, folder, engine_timeout_s(bench.sizes))
    # One reader, two counting processes and one writer.
    window_s = processing_window_s(run.output, pipeline, 4, "store")

    with contextlib.closing(sqlite3.connect(output)) as database:
        counts = dict(database.execute("SELECT word, count FROM word_counts"))
    check_counts(f"the engine ({pipeline})", counts, corpus.counts)
    return Timing(run.wall_s, window_s)


def wordcount_peer(bench: Bench, corpus: Corpus, peer: str) -> Timing | None:
    """Run the word count on an optional peer, or record why it is skipped."""
    report = bench.report
    if find_spec(peer) is None:
        report.skip("wordcount", peer, f"not installed; {INSTALL_HINT}")
        return None
    if peer == "dramatiq":
        if bench.amqp_url is None:
            report.skip("wordcount", peer, "needs RabbitMQ and rabbitmqctl")
            return None
        return wordcount_dramatiq(bench, corpus)
    reason = missing_namespace_reason()
    if reason:
        report.skip("wordcount", peer, reason)
        return None
    return wordcount_in_namespace(bench, corpus, peer)


def missing_namespace_reason() -> str | None:
    """Return why a loopback-only network namespace cannot be made, or None."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare and ip for a loopback-only network namespace"
    if os.geteuid() != 0:
        return "needs root for a loopback-only network namespace (unshare -n)"
    return None


def wordcount_in_namespace(bench: Bench, corpus: Corpus, peer: str) -> Timing:
    """Run this script with `--peer` in a network namespace that has only loopback."""
    result_path = bench.new_folder(f"wordcount-{peer}") / "result.json"
    command = [
        "unshare",
        "-n",
        "sh",
        "-c",
        'ip link set lo up && exec "$0" "$@"',
        sys.executable,
        str(BENCH_FILE),
        "--peer",
        peer,
        "--input",
        str(corpus.path),
        "--result",
        str(result_path),
    ]
    environment = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    started = time.perf_counter()
    try:
        result = subprocess.run(
            command,
            env=environment,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=PEER_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"{peer} timed out after {PEER_TIMEOUT_S:.0f} s") from None
    wall_s = time.perf_counter() - started
    if result.returncode != 0:
        raise BenchError(
            f"{peer} exited with code {result.returncode}:\n"
            f"{_tail(result.stdout + result.stderr)}"
        )
    outcome = json.loads(result_path.read_text())
    check_counts(peer, outcome["counts"], corpus.counts)
    return Timing(wall_s, outcome["compute_s"])


def run_peer(peer: str, corpus_path: Path, result_path: Path) -> None:
    """Count the words of `corpus_path` with Ray or Dask into `result_path`.

    The entry point of `--peer`, which runs in a process of its own.
    """
    started = time.perf_counter()
    if peer == "ray":
        counts, ready, computed = _count_with_ray(corpus_path)
    elif peer == "dask":
        counts, ready, computed = _count_with_dask(corpus_path)
    else:
        raise BenchError(f"invalid peer {peer!r}: expected ray or dask")
    outcome = {
        "counts": counts,
        "startup_s": ready - started,
        "compute_s": computed - ready,
    }
    result_path.write_text(json.dumps(outcome))


def _count_with_ray(corpus_path: Path) -> tuple[dict[str, int], float, float]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        count_remote = ray.remote(count_texts)
        ray.get([count_remote.remote([]) for _ in range(2)])
        ready = time.perf_counter()
        tasks = batched(read_chunks(corpus_path, LINES_PER_CHUNK), CHUNKS_PER_TASK)
        futures = [count_remote.remote(task) for task in tasks]
        counts: Counter[str] = Counter()
        for partial in ray.get(futures):
            counts.update(partial)
        computed = time.perf_counter()
    finally:
        ray.shutdown()
    return dict(counts), ready, computed


def _count_with_dask(corpus_path: Path) -> tuple[dict[str, int], float, float]:
    from dask.distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
    )
    try:
        with Client(cluster) as client:
            client.wait_for_workers(2)
            ready = time.perf_counter()
            tasks = batched(read_chunks(corpus_path, LINES_PER_CHUNK), CHUNKS_PER_TASK)
            futures = client.map(count_texts, list(tasks), pure=False)
            counts: Counter[str] = Counter()
            for partial in client.gather(futures):
                counts.update(partial)
            computed = time.perf_counter()
    finally:
        cluster.close()
    return dict(counts), ready, computed


def count_texts_to_file(index: int, texts: list[str], folder: str) -> None:
    """Count `texts` and write the counts to `folder/part-<index>.json`."""
    write_mark(folder, f"part-{index}", count_texts(texts))


def declare_dramatiq_actor(url: str) -> Any:
    """Point Dramatiq at the RabbitMQ `url` and declare the word-count actor."""
    import dramatiq
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    broker = RabbitmqBroker(url=url)
    dramatiq.set_broker(broker)
    return dramatiq.actor(
        count_texts_to_file, queue_name=DRAMATIQ_QUEUE, max_retries=0, broker=broker
    )


# A `dramatiq` worker that imports this module finds the actor here.
if os.environ.get(DRAMATIQ_URL_VARIABLE):
    declare_dramatiq_actor(os.environ[DRAMATIQ_URL_VARIABLE])


def wordcount_dramatiq(bench: Bench, corpus: Corpus) -> Timing:
    """Count with a `dramatiq` worker of 2 processes, one message per 200 chunks.

    Each task writes its counts to a file, and this process merges them.
    """
    assert bench.amqp_url is not None
    folder = bench.new_folder("wordcount-dramatiq")
    log_path = folder / "worker.log"
    environment = dict(os.environ, **{DRAMATIQ_URL_VARIABLE: bench.amqp_url})
    # The module goes first, because --path takes every argument after it.
    command = [sys.executable, "-m", "dramatiq", BENCH_FILE.stem, "--processes"]
    command += ["2", "--threads", "1", "--path", str(BENCH_FILE.parent)]
    started = time.perf_counter()
    with open(log_path, "w") as log:
        worker = subprocess.Popen(
            command, env=environment, stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
    try:
        actor = declare_dramatiq_actor(bench.amqp_url)
        _wait_for_log(log_path, "is ready for action", 2, worker)
        ready = time.perf_counter()
        tasks = batched(read_chunks(corpus.path, LINES_PER_CHUNK), CHUNKS_PER_TASK)
        task_count = 0
        for index, task in enumerate(tasks):
            actor.send(index, task, str(folder))
            task_count += 1
        _wait_for_marks(folder, "part-", task_count, worker, log_path)
        counts: Counter[str] = Counter()
        for partial in read_marks(folder, "part-"):
            counts.update(partial)
        computed = time.perf_counter()
        actor.broker.close()
    finally:
        _stop_process(worker)
    ended = time.perf_counter()
    check_counts("Dramatiq", dict(counts), corpus.counts)
    return Timing(ended - started, computed - ready)


def _wait_for_log(path: Path, text: str, times: int, process: subprocess.Popen):
    deadline = time.monotonic() + PEER_TIMEOUT_S
    while path.read_text().count(text) < times:
        if process.poll() is not None or time.monotonic() > deadline:
            raise BenchError(
                f"the dramatiq worker did not log {text!r} {times} times:\n"
                f"{_tail(path.read_text())}"
            )
        time.sleep(0.01)


def _wait_for_marks(
    folder: Path, prefix: str, count: int, process: subprocess.Popen, log: Path
) -> None:
    deadline = time.monotonic() + PEER_TIMEOUT_S
    while len(list(folder.glob(f"{prefix}*.json"))) < count:
        if process.poll() is not None or time.monotonic() > deadline:
            raise BenchError(
                f"the dramatiq worker wrote fewer than {count} results:\n"
                f"{_tail(log.read_text())}"
            )
        time.sleep(0.005)


def _stop_process(process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10.0)


# Scenario 4: start-up and memory.


def bench_startup(bench: Bench, run: int) -> None:
    print(f"startup: trivial pipeline, run {run}", flush=True)
    first_item_s, exit_s = startup_times(bench)
    memory = resident_memory(bench)
    bare = memory.pop("bare")
    largest_node = max(memory["source_node"], memory["sink_node"])
    rows = [
        ("first_item_s", "engine run to its first item", "s", first_item_s),
        ("exit_s", "engine run to its exit", "s", exit_s),
        ("bare_python_mb", "bare Python process", "MB", bare),
    ]
    for role, megabytes in memory.items():
        rows.append(
            (f"{role}_mb", f"{role.replace('_', ' ')} process", "MB", megabytes)
        )
    label = "largest node process beyond bare Python"
    rows.append(("node_over_bare_mb", label, "MB", largest_node - bare))
    bench.report.add_rows("startup", rows)


def startup_times(bench: Bench) -> tuple[float, float]:
    """Return the seconds from launch to the first item at the sink, and to exit."""
    folder = bench.new_folder("startup")
    params = {"n": 1, "marks": folder}
    url = sqlite_url(folder / "stream.db")
    command = engine_command(BENCH_FILE, "bench-trivial", params, url)
    run = run_engine(command, folder, engine_timeout_s(bench.sizes))
    first_item = json.loads((folder / "first-item.json").read_text())
    return first_item - run.launched_s, run.wall_s


def resident_memory(bench: Bench) -> dict[str, float]:
    """Return the resident MB of a held trivial run's processes and of bare Python."""
    import psutil

    folder = bench.new_folder("memory")
    hold = folder / "release"
    params = {"n": 1, "marks": folder, "hold": hold}
    url = sqlite_url(folder / "stream.db")
    command = engine_command(BENCH_FILE, "bench-trivial", params, url)
    with open(folder / "engine.log", "w") as log:
        master = subprocess.Popen(
            command,
            cwd=folder,
            env=engine_environment(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_for_paths(
            [
                folder / f"{name}.json"
                for name in ("first-item", "pid-emit", "pid-first")
            ],
            master,
        )
        master_process = psutil.Process(master.pid)
        workers = [
            child for child in master_process.children() if "worker" in child.cmdline()
        ]
        if len(workers) != 1:
            raise BenchError(f"expected one worker process, found {len(workers)}")
        pids = {
            role: json.loads((folder / f"pid-{node}.json").read_text())
            for role, node in (("source_node", "emit"), ("sink_node", "first"))
        }
        memory = {
            "master": _rss_mb(master_process),
            "worker": _rss_mb(workers[0]),
            **{role: _rss_mb(psutil.Process(pid)) for role, pid in pids.items()},
        }
    finally:
        hold.touch()
        _wait_for_exit(master, engine_timeout_s(bench.sizes))
    memory["bare"] = bare_python_mb()
    return memory


def _wait_for_exit(process: subprocess.Popen, timeout_s: float) -> None:
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10.0)
        raise BenchError(
            f"the held trivial run did not exit {timeout_s:.0f} s after its release"
        ) from None


def _rss_mb(process: Any) -> float:
    return process.memory_info().rss / 1e6


def _wait_for_paths(paths: list[Path], process: subprocess.Popen) -> None:
    deadline = time.monotonic() + HOLD_TIMEOUT_S
    while not all(path.exists() for path in paths):
        if process.poll() is not None or time.monotonic() > deadline:
            missing = [path.name for path in paths if not path.exists()]
            raise BenchError(f"the held trivial run wrote no {', '.join(missing)}")
        time.sleep(0.01)


def bare_python_mb() -> float:
    """Return the resident MB of an idle `python -c` process of this interpreter."""
    import psutil

    bare = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; print('ready', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        bare.stdout.readline()
        return _rss_mb(psutil.Process(bare.pid))
    finally:
        bare.stdin.close()
        bare.wait(10.0)


# RabbitMQ virtual host of the bench.


def is_listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def create_vhost(report: Report) -> str | None:
    """Create a RabbitMQ virtual host for this bench, or record why not."""
    if not is_listening(RABBITMQ_HOST, RABBITMQ_PORT):
        reason = f"RabbitMQ is not listening on {RABBITMQ_HOST}:{RABBITMQ_PORT}"
    elif shutil.which("rabbitmqctl") is None:
        reason = "rabbitmqctl not found; it creates the bench's virtual host"
    else:
        vhost = f"monomyth-bench-{uuid.uuid4().hex[:10]}"
        _rabbitmqctl("add_vhost", vhost)
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        return vhost
    report.skip("relay", "rabbitmq", reason)
    report.skip("wordcount", "dramatiq", f"needs RabbitMQ: {reason}")
    return None


def delete_vhost(vhost: str) -> None:
    _rabbitmqctl("delete_vhost", vhost, check=False)


def _rabbitmqctl(*args: str, check: bool = True) -> None:
    try:
        subprocess.run(
            ["rabbitmqctl", "-q", *args],
            check=check,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.CalledProcessError as exc:
        raise BenchError(
            f"rabbitmqctl {' '.join(args)} failed: {exc.stderr.strip()}"
        ) from None


# Machine, versions, targets and the table.


def describe_machine() -> dict[str, Any]:
    import psutil

    cpu_model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu_model,
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "kernel": f"{platform.system()} {platform.release()}",
        # Other work on the machine skews every figure, and the load shows how much.
        "load_average_1min": os.getloadavg()[0],
    }


def describe_versions() -> dict[str, str]:
    versions = {
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "rabbitmq": _rabbitmq_version(),
    }
    for package in ("monomyth", "pika", "ray", "dask", "distributed", "dramatiq"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _rabbitmq_version() -> str:
    if shutil.which("rabbitmqctl") is None:
        return "unknown"
    try:
        result = subprocess.run(
            ["rabbitmqctl", "-q", "version"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        return "unknown"
    return result.stdout.strip() or "unknown"


@dataclass(frozen=True)
class Target:
    """One target of the product owner, and whether the medians meet it."""

    scenario: str
    name: str
    goal: str
    measured: str
    status: str  # "met", "missed" or "not measured"
    # A related figure printed beside the check, such as the engine's ratio
    # to the single raw loop beside the relay target.
    note: str = ""


def evaluate_targets(report: Report) -> list[Target]:
    targets = []
    for stream in ("sqlite", "rabbitmq"):
        for stages in (1, 3):
            key = f"{stream}.{stages}_stage"
            ratio = report.median("relay", f"{key}.engine_over_raw_pipeline")
            loop_ratio = report.median("relay", f"{key}.engine_over_raw")
            targets.append(
                _target(
                    "relay",
                    f"relay per stage, {stream}, {_stages_text(stages)}",
                    ">= 0.80x the raw pipeline",
                    ratio,
                    lambda value: value >= 0.8,
                    "{:.2f}x",
                    note="" if loop_ratio is None else f"raw loop: {loop_ratio:.2f}x",
                )
            )
    ratio = report.median("cpu", "engine_2_over_ceiling")
    targets.append(
        _target(
            "cpu",
            "CPU speedup with 2 processes",
            ">= 0.90x the two-process ceiling",
            ratio,
            lambda value: value >= 0.9,
            "{:.2f}x",
        )
    )
    for engine in ("engine_example", "engine_per_chunk"):
        targets.extend(_wordcount_targets(report, engine))
    targets.append(
        _target(
            "startup",
            "engine run of a trivial pipeline to its first item",
            "< 1 s",
            report.median("startup", "first_item_s"),
            lambda value: value < 1.0,
            "{:.2f} s",
        )
    )
    targets.append(
        _target(
            "startup",
            "node process resident memory beyond bare Python",
            "<= 40 MB",
            report.median("startup", "node_over_bare_mb"),
            lambda value: value <= 40.0,
            "{:.1f} MB",
        )
    )
    return targets


def _wordcount_targets(report: Report, engine: str) -> list[Target]:
    label = WORDCOUNT_LABELS[engine]
    targets = []
    for peer in PEERS:
        ratio = report.median("wordcount", f"{engine}.over_{peer}.included")
        targets.append(
            _target(
                "wordcount",
                f"word count, {label}, faster than {peer}",
                "time / peer time < 1, start-up included",
                ratio,
                lambda value: value < 1.0,
                "{:.2f}x",
            )
        )
    for kind in ("included", "excluded"):
        ratio = report.median("wordcount", f"{engine}.over_counter.{kind}")
        targets.append(
            _target(
                "wordcount",
                f"word count, {label}, beside one process",
                f"<= 1.6x the single-process count, start-up {kind}",
                ratio,
                lambda value: value <= 1.6,
                "{:.2f}x",
            )
        )
    return targets


def _target(
    scenario: str,
    name: str,
    goal: str,
    value: float | None,
    is_met: Callable[[float], bool],
    template: str,
    note: str = "",
) -> Target:
    if value is None:
        return Target(scenario, name, goal, "-", "not measured", note)
    status = "met" if is_met(value) else "missed"
    return Target(scenario, name, goal, template.format(value), status, note)


def format_value(value: float, unit: str) -> str:
    if unit == "items/s":
        return f"{value:,.0f}"
    if unit == "x":
        return f"{value:.2f}"
    if unit == "MB":
        return f"{value:.1f}"
    return f"{value:.3f}"


def format_table(report: Report) -> str:
    """Return the figures as a text table: median, min and max of each."""
    rows = [("figure", "median", "min", "max", "unit")]
    for name, scenario in report.scenarios.items():
        if not scenario.figures:
            continue
        rows.append((f"[{name}]", "", "", "", ""))
        for figure in scenario.figures.values():
            summary = figure.summary()
            rows.append(
                (
                    figure.label,
                    format_value(summary["median"], figure.unit),
                    format_value(summary["min"], figure.unit),
                    format_value(summary["max"], figure.unit),
                    figure.unit,
                )
            )
    widths = [max(len(row[column]) for row in rows) for column in range(5)]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        cells += [
            cell.rjust(width) for cell, width in zip(row[1:4], widths[1:4], strict=True)
        ]
        cells.append(row[4])
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def format_targets(targets: list[Target]) -> str:
    width = max(len(target.name) for target in targets)
    lines = []
    for target in targets:
        line = (
            f"{target.status:<12}  {target.name:<{width}}  {target.measured:>9}  "
            f"(goal {target.goal})"
        )
        if target.note:
            line += f"  {target.note}"
        lines.append(line)
    return "\n".join(lines)


# The command line.


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark Monomyth beside its building blocks and its peers.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: small sizes, one run of each scenario, under a minute",
    )
    parser.add_argument(
        "--runs",
        type=int,
        help="runs of each scenario, summarised by their median, min and max "
        "(default: 3, or 1 with --quick)",
    )
    parser.add_argument(
        "--only",
        metavar="SCENARIO[,SCENARIO]",
        help=f"run only these scenarios, from {', '.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--json", type=Path, metavar="PATH", help="write the figures as JSON to PATH"
    )
    # The entry point of a peer's word count, in a process of its own.
    parser.add_argument("--peer", choices=("ray", "dask"), help=argparse.SUPPRESS)
    parser.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)

    if arguments.runs is not None and arguments.runs < 1:
        parser.error(f"invalid --runs {arguments.runs}: expected 1 or more")
    scenarios = list(SCENARIOS)
    if arguments.only:
        scenarios = [name.strip() for name in arguments.only.split(",")]
        unknown = [name for name in scenarios if name not in SCENARIOS]
        if unknown:
            parser.error(
                f"invalid --only {unknown[0]!r}: expected one of {', '.join(SCENARIOS)}"
            )
    arguments.scenarios = scenarios
    return arguments


def run_bench(arguments: argparse.Namespace) -> dict[str, Any]:
    """Run the chosen scenarios and return the whole report as JSON."""
    sizes = QUICK if arguments.quick else FULL
    runs = arguments.runs or sizes.runs
    machine, versions = describe_machine(), describe_versions()
    print(f"machine: {json.dumps(machine)}\nversions: {json.dumps(versions)}")

    report = Report()
    workdir = Path(tempfile.mkdtemp(prefix="monomyth-bench-"))
    bench = Bench(sizes, workdir, report)
    vhost = None
    needs_rabbitmq = {"relay", "wordcount"} & set(arguments.scenarios)
    try:
        if needs_rabbitmq:
            vhost = create_vhost(report)
        if vhost is not None:
            bench.amqp_url = (
                f"amqp://guest:guest@{RABBITMQ_HOST}:{RABBITMQ_PORT}/{vhost}"
            )
        run_scenarios(bench, arguments.scenarios, runs)
    finally:
        if vhost is not None:
            delete_vhost(vhost)
        shutil.rmtree(workdir, ignore_errors=True)

    targets = [
        target
        for target in evaluate_targets(report)
        if target.scenario in arguments.scenarios
    ]
    machine["load_average_1min_at_end"] = os.getloadavg()[0]
    print(f"\n{format_table(report)}\n\n{format_targets(targets)}")
    print(
        f"\nload average over 1 min: {machine['load_average_1min']:.2f} at the "
        f"start, {machine['load_average_1min_at_end']:.2f} at the end"
    )
    return {
        "quick": arguments.quick,
        "runs": runs,
        "scenarios_run": arguments.scenarios,
        "command": " ".join(["python", "scripts/bench.py", *sys.argv[1:]]),
        "machine": machine,
        "versions": versions,
        "scenarios": report.to_json(),
        "targets": [target.__dict__ for target in targets],
    }


def run_scenarios(bench: Bench, scenarios: list[str], runs: int) -> None:
    loops = calibrate_spin_loops() if "cpu" in scenarios else 0
    corpus = prepare_corpus(bench) if "wordcount" in scenarios else None
    for run in range(1, runs + 1):
        if "relay" in scenarios:
            bench_relay(bench, run)
        if "cpu" in scenarios:
            bench_cpu(bench, run, loops)
        if corpus is not None:
            bench_wordcount(bench, run, corpus)
        if "startup" in scenarios:
            bench_startup(bench, run)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    try:
        if arguments.peer:
            run_peer(arguments.peer, arguments.input, arguments.result)
            return 0
        outcome = run_bench(arguments)
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    if arguments.json is not None:
        arguments.json.write_text(json.dumps(outcome, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
