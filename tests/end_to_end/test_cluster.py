"""A master and worker processes on one host, with RabbitMQ as the stream."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import psutil
import pytest

from tests.end_to_end.conftest import (
    EXAMPLES,
    PICKY_PIPELINE,
    engine_command,
    run_engine,
)
from tests.end_to_end.test_wordcount import expected_counts, make_corpus, read_counts
from tests.end_to_end.test_wordcount_postgres import (
    read_counts as read_postgres_counts,
)
from tests.helpers import (
    POSTGRES_DSN,
    is_listening,
    node_processes,
    queued_items,
    require_service,
    wait_for,
)

WORDCOUNT = str(EXAMPLES / "wordcount.py")
API_OFF = ("--api", "off")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def vhost():
    """Yield a RabbitMQ vhost of the test's own, deleted afterwards."""
    require_service("RabbitMQ", 5672)
    name = f"monomyth-test-{uuid.uuid4().hex[:12]}"
    subprocess.run(["rabbitmqctl", "-q", "add_vhost", name], check=True)
    subprocess.run(
        ["rabbitmqctl", "-q", "set_permissions", "-p", name, "guest", ".*", ".*", ".*"],
        check=True,
    )
    yield name
    subprocess.run(["rabbitmqctl", "-q", "delete_vhost", name], check=False)


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    path.write_text(uuid.uuid4().hex)
    return path


class Cluster:
    """Processes of one test cluster, all stopped at the end of the test."""

    def __init__(self, tmp_path: Path, secret_file: Path) -> None:
        self.tmp_path = tmp_path
        self.secret_file = secret_file
        self.port = free_port()
        self.processes: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def start(self, *args: str, name: str, cwd: Path | None = None) -> subprocess.Popen:
        log = self.tmp_path / f"{name}.log"
        with log.open("w") as output:
            process = subprocess.Popen(
                [engine_command(), *args],
                cwd=cwd or self.tmp_path,
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.processes.append(process)
        self.logs.append(log)
        return process

    def start_master(self, *args: str) -> subprocess.Popen:
        return self.start(
            "master",
            "--bind",
            f"127.0.0.1:{self.port}",
            "--secret-file",
            str(self.secret_file),
            *API_OFF,
            *args,
            name="master",
        )

    def start_worker(
        self, name: str, *args: str, cwd: Path | None = None
    ) -> subprocess.Popen:
        return self.start(
            "worker",
            "--master",
            f"127.0.0.1:{self.port}",
            "--secret-file",
            str(self.secret_file),
            *args,
            name=name,
            cwd=cwd,
        )

    def output(self) -> str:
        return "\n".join(log.read_text() for log in self.logs if log.exists())

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)


@pytest.fixture
def cluster(tmp_path: Path, secret_file: Path):
    cluster = Cluster(tmp_path, secret_file)
    yield cluster
    cluster.stop()


def amqp_url(vhost: str) -> str:
    return f"amqp://guest:guest@127.0.0.1:5672/{vhost}"


def test_cluster_wordcount_matches_counter(tmp_path: Path, cluster, vhost) -> None:
    paths = make_corpus(tmp_path / "corpus")
    output = tmp_path / "counts.db"
    master = cluster.start_master(
        WORDCOUNT,
        "--stream",
        amqp_url(vhost),
        "--exit-when-done",
        "--workers",
        "2",
        "-p",
        f"input={tmp_path / 'corpus'}",
        "-p",
        f"output={output}",
    )
    cluster.start_worker("worker-a")
    cluster.start_worker("worker-b")

    assert master.wait(timeout=120) == 0, cluster.output()
    assert read_counts(output) == expected_counts(paths)
    # The two count processes go one to each worker: fewest of the type first.
    for name in ("worker-a", "worker-b"):
        log = (tmp_path / f"{name}.log").read_text()
        assert len(re.findall(r"node wordcount\.count#\d started", log)) == 1, log


SLOW_COUNT = """
import time
from collections import Counter

from engine import Pipeline, param
from nodes import SQLiteSink, read_text_chunks

pipeline = Pipeline("slowcount", params={"input": "", "output": ""})


@pipeline.source(batch_size=10)
def read(ctx):
    yield from read_text_chunks(ctx.params["input"], lines_per_chunk=1)


@pipeline.transform(after="read", processes=2, batch_size=5)
def count(chunk):
    time.sleep(0.05)
    return dict(Counter(chunk["text"].lower().split()))


@pipeline.on_start
def create(params):
    import sqlite3
    with sqlite3.connect(params["output"]) as db:
        db.execute("CREATE TABLE word_counts(word TEXT PRIMARY KEY, count INTEGER)")
    db.close()


pipeline.add(
    "sink",
    "store",
    SQLiteSink(
        path=param("output"),
        statement="INSERT INTO word_counts VALUES (?, ?) "
        "ON CONFLICT(word) DO UPDATE SET count = count + excluded.count",
        rows=lambda counts: counts.items(),
    ),
    after="count",
)
"""


def test_killed_worker_items_delivered_again(
    tmp_path: Path, cluster, vhost, write_pipeline
) -> None:
    pipeline = write_pipeline(SLOW_COUNT)
    corpus = tmp_path / "lines.txt"
    corpus.write_text("".join(f"line{i} shared\n" for i in range(400)))
    output = tmp_path / "counts.db"
    master = cluster.start_master(
        str(pipeline),
        "--stream",
        amqp_url(vhost),
        "--exit-when-done",
        "--worker-timeout",
        "2",
        "-p",
        f"input={corpus}",
        "-p",
        f"output={output}",
    )
    first = cluster.start_worker("worker-a")
    wait_for(
        lambda: "worker worker-1 joined" in cluster.output(),
        timeout_s=30,
        what="the first worker to join",
    )
    cluster.start_worker("worker-b")

    def counting_on_first() -> bool:
        children = psutil.Process(first.pid).children(recursive=True)
        return len(children) >= 2 and output.exists() and _counted(output) > 40

    wait_for(counting_on_first, timeout_s=60, what="nodes counting on worker-a")
    # Kill the worker and its nodes at once: their pulled items are unacked.
    os.killpg(first.pid, signal.SIGKILL)

    assert master.wait(timeout=120) == 0, cluster.output()
    with sqlite3.connect(output) as connection:
        counts = Counter(
            dict(connection.execute("SELECT word, count FROM word_counts"))
        )
    connection.close()
    assert "worker worker-1 lost" in cluster.output()
    for i in range(400):
        assert counts[f"line{i}"] >= 1, f"line{i} was never counted"
    assert counts["shared"] >= 400


def _counted(output: Path) -> int:
    try:
        with sqlite3.connect(output) as connection:
            row = connection.execute(
                "SELECT count FROM word_counts WHERE word = 'shared'"
            ).fetchone()
        connection.close()
    except sqlite3.Error:
        return 0
    return row[0] if row else 0


def test_worker_without_master_exits_clearly(tmp_path: Path, secret_file) -> None:
    port = free_port()

    result = run_engine(
        "worker",
        "--master",
        f"127.0.0.1:{port}",
        "--secret-file",
        str(secret_file),
        "--connect-timeout",
        "1",
        cwd=tmp_path,
    )

    assert result.returncode == 1
    assert f"connection to master at 127.0.0.1:{port} failed" in result.stderr
    assert "Traceback" not in result.stderr


def test_worker_silent_master_exits_at_timeout(tmp_path: Path, secret_file) -> None:
    # A listener that accepts and never replies, as a port of another service.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        result = run_engine(
            "worker",
            "--master",
            f"127.0.0.1:{port}",
            "--secret-file",
            str(secret_file),
            "--connect-timeout",
            "1",
            cwd=tmp_path,
        )

    assert result.returncode == 1
    assert f"connection to master at 127.0.0.1:{port} failed" in result.stderr
    assert "timed out after 1.0 s" in result.stderr


def test_worker_without_address_exits_clearly(tmp_path: Path, secret_file) -> None:
    # `--master -` reads the address from standard input, which is empty here.
    result = run_engine(
        "worker", "--master", "-", "--secret-file", str(secret_file), cwd=tmp_path
    )

    assert result.returncode == 1
    assert "standard input ended before the master's address arrived" in (result.stderr)
    assert "Traceback" not in result.stderr


def test_worker_wrong_secret_exits_clearly(
    tmp_path: Path, cluster, secret_file
) -> None:
    cluster.start_master("--stream", f"sqlite:///{tmp_path}/s.db")
    wait_for(
        lambda: "master listening" in cluster.output(),
        timeout_s=30,
        what="the master to listen",
    )
    wrong = tmp_path / "wrong-secret"
    wrong.write_text("not the cluster secret")

    result = run_engine(
        "worker",
        "--master",
        f"127.0.0.1:{cluster.port}",
        "--secret-file",
        str(wrong),
        cwd=tmp_path,
    )

    assert result.returncode == 1
    assert "authentication failed" in result.stderr
    assert "not the cluster secret" not in result.stderr
    assert "Traceback" not in result.stderr


def test_worker_refused_broker_exits_clearly(tmp_path: Path, cluster) -> None:
    require_service("RabbitMQ", 5672)
    cluster.start_master("--stream", "amqp://guest:wrong@127.0.0.1:5672/")
    wait_for(
        lambda: "master listening" in cluster.output(),
        timeout_s=30,
        what="the master to listen",
    )

    worker = cluster.start_worker("worker-a")

    assert worker.wait(timeout=60) == 1
    log = (tmp_path / "worker-a.log").read_text()
    assert "refused the credentials" in log
    assert "wrong" not in log.replace("amqp://guest:***", "")
    assert "Traceback" not in log


def test_master_restart_run_completes(tmp_path: Path, cluster, write_pipeline) -> None:
    pipeline = write_pipeline(SLOW_COUNT)
    corpus = tmp_path / "lines.txt"
    corpus.write_text("".join(f"line{i} shared\n" for i in range(300)))
    output = tmp_path / "counts.db"
    master_args = (
        str(pipeline),
        "--stream",
        f"sqlite:///{tmp_path}/stream.db",
        "--exit-when-done",
        "-p",
        f"input={corpus}",
        "-p",
        f"output={output}",
    )
    master = cluster.start_master(*master_args)
    cluster.start_worker("worker-a")
    wait_for(lambda: _counted(output) > 30, timeout_s=60, what="30 lines counted")

    os.killpg(master.pid, signal.SIGKILL)
    master.wait(timeout=30)
    counted_while_away = _counted(output)
    # Nodes keep processing while the master is down.
    wait_for(
        lambda: _counted(output) > counted_while_away + 20,
        timeout_s=60,
        what="counting to go on without the master",
    )
    restarted = cluster.start_master(*master_args)

    assert restarted.wait(timeout=120) == 0, cluster.output()
    log = cluster.output()
    assert "reconnecting" in log
    assert "resumed" in log
    with sqlite3.connect(output) as connection:
        counts = Counter(
            dict(connection.execute("SELECT word, count FROM word_counts"))
        )
    connection.close()
    for i in range(300):
        assert counts[f"line{i}"] >= 1, f"line{i} was never counted"
    assert counts["shared"] >= 300


def test_returning_lost_worker_stops_copies(
    tmp_path: Path, cluster, write_pipeline
) -> None:
    pipeline = write_pipeline(SLOW_COUNT)
    corpus = tmp_path / "lines.txt"
    corpus.write_text("".join(f"line{i} shared\n" for i in range(300)))
    output = tmp_path / "counts.db"
    master = cluster.start_master(
        str(pipeline),
        "--stream",
        f"sqlite:///{tmp_path}/stream.db",
        "--exit-when-done",
        "--workers",
        "2",
        "--worker-timeout",
        "2",
        "-p",
        f"input={corpus}",
        "-p",
        f"output={output}",
    )
    first = cluster.start_worker("worker-a")
    wait_for(
        lambda: "worker worker-1 joined" in cluster.output(),
        timeout_s=30,
        what="the first worker to join",
    )
    cluster.start_worker("worker-b")
    wait_for(lambda: _counted(output) > 20, timeout_s=60, what="20 lines counted")

    # A paused worker sends no heartbeat: the master declares it lost.
    os.kill(first.pid, signal.SIGSTOP)
    try:
        wait_for(
            lambda: "worker worker-1 lost" in cluster.output(),
            timeout_s=30,
            what="the paused worker to be declared lost",
        )
    finally:
        os.kill(first.pid, signal.SIGCONT)

    assert master.wait(timeout=120) == 0, cluster.output()
    log = cluster.output()
    assert "rejoined" in log
    assert "stopping it there" in log
    with sqlite3.connect(output) as connection:
        counts = Counter(
            dict(connection.execute("SELECT word, count FROM word_counts"))
        )
    connection.close()
    for i in range(300):
        assert counts[f"line{i}"] >= 1, f"line{i} was never counted"


def test_killed_worker_leaves_no_nodes(tmp_path: Path, cluster, write_pipeline) -> None:
    pipeline = write_pipeline(SLOW_COUNT)
    corpus = tmp_path / "lines.txt"
    corpus.write_text("".join(f"line{i} shared\n" for i in range(2000)))
    cluster.start_master(
        str(pipeline),
        "--stream",
        f"sqlite:///{tmp_path}/stream.db",
        "--worker-timeout",
        "2",
        "-p",
        f"input={corpus}",
        "-p",
        f"output={tmp_path / 'counts.db'}",
    )
    worker = cluster.start_worker("worker-a")
    wait_for(
        lambda: len(node_processes(worker.pid)) >= 4,
        timeout_s=60,
        what="the worker's node processes",
    )
    # The nodes, and the forkserver and resource tracker that serve them.
    descendants = psutil.Process(worker.pid).children(recursive=True)

    # Only the worker: its nodes must notice and exit on their own.
    os.kill(worker.pid, signal.SIGKILL)

    def all_gone() -> bool:
        return not any(p.is_running() and p.status() != "zombie" for p in descendants)

    wait_for(all_gone, timeout_s=30, what="the orphaned node processes to exit")


def test_cluster_wordcount_into_postgres(
    tmp_path: Path, cluster, vhost, map_reduce_lock
) -> None:
    paths = make_corpus(tmp_path / "corpus", seed=23)
    api_port = free_port()
    master = cluster.start(
        "master",
        WORDCOUNT,
        "--bind",
        f"127.0.0.1:{cluster.port}",
        "--secret-file",
        str(cluster.secret_file),
        "--api",
        f"127.0.0.1:{api_port}",
        "--stream",
        amqp_url(vhost),
        "--exit-when-done",
        "--workers",
        "2",
        "-p",
        f"input={tmp_path / 'corpus'}",
        "-p",
        "sink=postgres",
        "-p",
        f"dsn={POSTGRES_DSN}",
        name="master",
    )
    cluster.start_worker("worker-a")
    cluster.start_worker("worker-b")

    def count_nodes_by_worker() -> dict[str, int] | None:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{api_port}/worker-info", timeout=5
            ) as reply:
                workers = json.load(reply)["workers"]
        except OSError:
            return None
        spread = {
            worker_id: len(info["nodes"].get("wordcount.count", []))
            for worker_id, info in workers.items()
        }
        return spread if sum(spread.values()) == 2 else None

    spread = wait_for(
        count_nodes_by_worker, timeout_s=60, what="both count nodes placed"
    )

    assert master.wait(timeout=120) == 0, cluster.output()
    # Fewest of the type first: one count node on each worker.
    assert sorted(spread.values()) == [1, 1]
    assert read_postgres_counts(map_reduce_lock) == expected_counts(paths)


def test_relative_sqlite_stream_shared_by_workers(
    tmp_path: Path, cluster, write_pipeline
) -> None:
    pipeline = write_pipeline(SLOW_COUNT)
    corpus = tmp_path / "lines.txt"
    corpus.write_text("".join(f"line{i} shared\n" for i in range(100)))
    output = tmp_path / "counts.db"
    master = cluster.start_master(
        str(pipeline),
        "--stream",
        "sqlite:///relative/stream.db",
        "--exit-when-done",
        "--workers",
        "2",
        "-p",
        f"input={corpus}",
        "-p",
        f"output={output}",
    )
    # Workers in other folders must still use the master's stream file.
    for name in ("worker-a", "worker-b"):
        folder = tmp_path / name
        folder.mkdir()
        cluster.start_worker(name, cwd=folder)

    assert master.wait(timeout=120) == 0, cluster.output()
    assert _counted(output) == 100
    assert not (tmp_path / "worker-a" / "relative").exists()
    assert not (tmp_path / "worker-b" / "relative").exists()


def test_loopback_master_reuses_its_secret(tmp_path: Path) -> None:
    port = free_port()
    arguments = ("master", "--bind", f"127.0.0.1:{port}", "--api", "off")

    def start_and_stop() -> str:
        process = subprocess.Popen(
            [engine_command(), *arguments],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        secret = tmp_path / ".monomyth" / "secret"
        try:
            wait_for(secret.exists, timeout_s=30, what="the secret file")
            wait_for(
                lambda: is_listening("127.0.0.1", port),
                timeout_s=30,
                what="the master port",
            )
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=30)
        return secret.read_text()

    first = start_and_stop()
    second = start_and_stop()

    assert first.strip()
    assert second == first


DRAINING = """
import time
from pathlib import Path

from engine import Pipeline, param
from nodes import JsonLinesSink

pipeline = Pipeline("draining", params={"output": "out.jsonl", "marks": ""})


def mark_teardown(ctx):
    with Path(ctx.params["marks"]).open("a") as file:
        file.write(ctx.node + "\\n")


@pipeline.source(batch_size=50)
def numbers():
    yield from range(3000)


@pipeline.transform(after="numbers", batch_size=5, teardown=mark_teardown)
def slow(number):
    time.sleep(0.01)
    return number


pipeline.add("sink", "write", JsonLinesSink(path=param("output")), after="slow")
"""


def test_sigterm_drains_worker(tmp_path: Path, cluster, write_pipeline) -> None:
    pipeline = write_pipeline(DRAINING)
    output = tmp_path / "out.jsonl"
    marks = tmp_path / "marks.txt"
    cluster.start_master(
        str(pipeline),
        "--stream",
        f"sqlite:///{tmp_path}/stream.db",
        "-p",
        f"output={output}",
        "-p",
        f"marks={marks}",
    )
    worker = cluster.start_worker("worker-a")
    wait_for(
        lambda: output.exists() and len(output.read_text().splitlines()) >= 100,
        timeout_s=60,
        what="100 items written",
    )
    wait_for(
        lambda: "node draining.numbers#1 completed" in cluster.output(),
        timeout_s=60,
        what="the source to publish all its items",
    )

    worker.send_signal(signal.SIGTERM)

    assert worker.wait(timeout=60) == 0, cluster.output()
    assert "slow" in marks.read_text().split()
    written = [int(n) for n in output.read_text().split()]
    pending = queued_items(
        tmp_path / "stream.db",
        ["draining.numbers-to-slow", "draining.slow-to-write"],
    )
    assert len(set(written)) == len(written)
    assert len(written) + pending == 3000


def test_master_stopped_waiting_stops_workers(
    tmp_path: Path, cluster, write_pipeline
) -> None:
    pipeline = write_pipeline(DRAINING)
    master = cluster.start_master(
        str(pipeline), "--stream", f"sqlite:///{tmp_path}/stream.db", "--workers", "2"
    )
    worker = cluster.start_worker("worker-a")
    wait_for(
        lambda: "worker worker-1 joined" in cluster.output(),
        timeout_s=30,
        what="the first of two workers joined",
    )

    # The master waits for a second worker that never comes.
    master.send_signal(signal.SIGTERM)

    assert master.wait(timeout=60) == 0, cluster.output()
    assert worker.wait(timeout=60) == 0, cluster.output()


def test_master_with_failed_items_exits_3(
    tmp_path: Path, cluster, vhost, write_pipeline
) -> None:
    pipeline = write_pipeline(PICKY_PIPELINE)
    master = cluster.start_master(
        str(pipeline), "--stream", amqp_url(vhost), "--exit-when-done"
    )
    cluster.start_worker("worker-a")

    assert master.wait(timeout=120) == 3, cluster.output()
    assert "2 failed items kept in queue picky.invert-fail" in cluster.output()

    # The master has ended, and the command still finds its stream.
    listed = run_engine("fail-queue", "list", "picky.invert", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "2 failed items in picky.invert-fail" in listed.stdout
