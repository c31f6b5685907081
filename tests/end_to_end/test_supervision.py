"""Whole runs where nodes crash, items fail, recipes break or Ctrl-C arrives."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

from engine.streams import open_stream
from tests.end_to_end.conftest import engine_command, run_engine
from tests.helpers import (
    GateHolder,
    forkserver_process,
    node_processes,
    queued_items,
    wait_for,
)

# A word count whose map node kills its own process with SIGKILL the first
# time it meets the chunk that contains the word "poison".
CRASHING_WORDCOUNT = """
import os
import signal
from collections import Counter
from pathlib import Path

from engine import Pipeline, param
from nodes import SQLiteSink, read_text_chunks

pipeline = Pipeline("crashing", params={"input": "", "output": "", "marker": ""})


@pipeline.source(batch_size=5)
def read(ctx):
    yield from read_text_chunks(ctx.params["input"], lines_per_chunk=2)


@pipeline.transform(after="read", batch_size=5)
def count(chunk, ctx):
    marker = Path(ctx.params["marker"])
    if "poison" in chunk["text"] and not marker.exists():
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
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


def test_killed_node_restarted_and_run_completes(tmp_path, write_pipeline) -> None:
    pipeline = write_pipeline(
        CRASHING_WORDCOUNT.replace("params_output if False else ", "")
    )
    corpus = tmp_path / "text.txt"
    lines = [f"word{i % 7} common line{i}" for i in range(200)]
    lines[101] = "poison common"
    corpus.write_text("\n".join(lines) + "\n")
    output = tmp_path / "counts.db"
    marker = tmp_path / "killed.pid"

    result = run_engine(
        "run",
        str(pipeline),
        "-p",
        f"input={corpus}",
        "-p",
        f"output={output}",
        "-p",
        f"marker={marker}",
        cwd=tmp_path,
    )

    assert result.returncode == 0, result.stderr + result.stdout
    assert marker.exists()
    assert "signal 9 (SIGKILL)" in result.stderr + result.stdout
    with sqlite3.connect(output) as connection:
        counts = dict(connection.execute("SELECT word, count FROM word_counts"))
    connection.close()
    # At least once: every chunk is counted, a redelivered one maybe twice.
    assert counts["common"] >= 200
    assert counts["poison"] >= 1
    for i in range(200):
        if i != 101:
            assert counts[f"line{i}"] >= 1


FAILING_ITEMS = """
from engine import Pipeline, param
from nodes import JsonLinesSink

pipeline = Pipeline("failing", params={"output": "out.jsonl"})


@pipeline.source()
def numbers():
    yield from range(20)


@pipeline.transform(after="numbers", retries=0)
def invert(number):
    if number % 5 == 0:
        raise ValueError(f"cannot invert {number}")
    return 1 / number


pipeline.add("sink", "write", JsonLinesSink(path=param("output")), after="invert")
"""


def test_failed_items_go_to_fail_queue(tmp_path, write_pipeline) -> None:
    pipeline = write_pipeline(FAILING_ITEMS)

    result = run_engine("run", str(pipeline), cwd=tmp_path)

    assert result.returncode == 3, result.stderr
    assert "4 failed items kept in queue failing.invert-fail" in result.stdout
    written = [
        json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()
    ]
    assert len(written) == 16
    stream = open_stream(f"sqlite:///{tmp_path}/.monomyth/failing.db", owner="test")
    try:
        deliveries = stream.pull(["failing.invert-fail"], 100, 0.5)
        records = [json.loads(d.body) for d in deliveries]
    finally:
        stream.close()
    assert sorted(r["payload"] for r in records) == [0, 5, 10, 15]
    error = records[0]["errors"][0]
    assert error["type"] == "ValueError"
    assert error["message"].startswith("cannot invert")
    assert "Traceback" in error["traceback"]
    assert f'File "{pipeline}", line' in error["traceback"]
    assert error["node"] == "invert"
    assert error["attempt"] == 1


RETRYING = """
from pathlib import Path

from engine import Pipeline, param
from nodes import JsonLinesSink

pipeline = Pipeline("retrying", params={"output": "out.jsonl", "attempts": ""})


@pipeline.source()
def numbers():
    yield from range(3)


@pipeline.transform(after="numbers", retries=2, retry_backoff_s=0.05)
def flaky(number, ctx):
    log = Path(ctx.params["attempts"])
    with log.open("a") as file:
        file.write(f"{number}\\n")
    if number == 1:
        raise RuntimeError("always fails")
    return number


pipeline.add("sink", "write", JsonLinesSink(path=param("output")), after="flaky")
"""


def test_failing_item_retried_then_failed(tmp_path, write_pipeline) -> None:
    pipeline = write_pipeline(RETRYING)
    attempts = tmp_path / "attempts.txt"

    result = run_engine(
        "run", str(pipeline), "-p", f"attempts={attempts}", cwd=tmp_path
    )

    assert result.returncode == 3, result.stderr
    tried = attempts.read_text().split()
    assert tried.count("1") == 3
    assert tried.count("0") == 1
    stream = open_stream(f"sqlite:///{tmp_path}/.monomyth/retrying.db", owner="test")
    try:
        record = json.loads(stream.pull(["retrying.flaky-fail"], 10, 0.5)[0].body)
    finally:
        stream.close()
    assert [error["attempt"] for error in record["errors"]] == [1, 2, 3]


MISSING_MODULE = """
import sys
from pathlib import Path

# Only this process can import the helper: the worker never runs this file.
sys.path.insert(0, str(Path(__file__).parent / "private"))
import private_helper

from engine import Pipeline

pipeline = Pipeline("broken")


@pipeline.source()
def numbers():
    yield from range(3)


pipeline.transform("double", after="numbers")(private_helper.double)


@pipeline.sink(after="double")
def discard(item):
    pass
"""


def test_unloadable_recipe_fails_node_clearly(tmp_path, write_pipeline) -> None:
    private = tmp_path / "private"
    private.mkdir()
    (private / "private_helper.py").write_text("def double(x):\n    return 2 * x\n")
    pipeline = write_pipeline(MISSING_MODULE)

    result = run_engine("run", str(pipeline), cwd=tmp_path)

    output = result.stdout + result.stderr
    assert result.returncode == 4, output
    assert "needs the module 'private_helper'" in output
    assert "double" in output
    assert re.search(r"double\s+failed", result.stdout)
    assert re.search(r"numbers\s+completed", result.stdout)


INVALID = """
from engine import Pipeline

pipeline = Pipeline("invalid")


@pipeline.source()
def read():
    yield 1


@pipeline.transform(after=["read", "second"])
def first(item):
    return item


@pipeline.transform(after="first")
def second(item):
    return item


@pipeline.sink(after="second")
def write(item):
    pass
"""


def test_cyclic_pipeline_rejected_before_start(tmp_path, write_pipeline) -> None:
    pipeline = write_pipeline(INVALID)

    result = run_engine("run", str(pipeline), cwd=tmp_path)

    assert result.returncode == 1
    assert "Error: cycle 'first' -> 'second' -> 'first'" in result.stderr
    assert not (tmp_path / ".monomyth").exists()


# Its on_start hook records the children of the `engine run` process, among
# them the worker started before the hooks run, and then fails.
FAILING_START = """
import json

import psutil

from engine import Pipeline

pipeline = Pipeline("failingstart", params={"children": ""})


@pipeline.on_start
def record_children_then_fail(params):
    children = [child.pid for child in psutil.Process().children()]
    with open(params["children"], "w") as file:
        json.dump(children, file)
    raise RuntimeError("cannot start")


@pipeline.source()
def numbers():
    yield 1


@pipeline.sink(after="numbers")
def drop(number):
    pass
"""


def test_failed_start_leaves_no_worker(tmp_path, write_pipeline) -> None:
    import psutil

    pipeline = write_pipeline(FAILING_START)
    children = tmp_path / "children.json"

    result = run_engine(
        "run", str(pipeline), "-p", f"children={children}", cwd=tmp_path
    )

    assert result.returncode == 1
    assert "on_start hook 'record_children_then_fail'" in result.stderr
    pids = json.loads(children.read_text())
    assert pids, "engine run had started no worker when its hooks ran"
    for pid in pids:
        assert not psutil.pid_exists(pid), f"process {pid} outlived engine run"


SLOW = """
import time

from engine import Pipeline, param
from nodes import JsonLinesSink

pipeline = Pipeline("slow", params={"output": "out.jsonl"})


@pipeline.source(batch_size=100)
def numbers():
    yield from range(2000)


@pipeline.transform(after="numbers", batch_size=10)
def wait(number):
    time.sleep(0.005)
    return number


pipeline.add("sink", "write", JsonLinesSink(path=param("output")), after="wait")
"""


def test_interrupt_drains_without_losing_items(tmp_path, write_pipeline) -> None:
    pipeline = write_pipeline(SLOW)
    output = tmp_path / "out.jsonl"
    process = subprocess.Popen(
        [engine_command(), "run", str(pipeline)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: output.exists() and len(output.read_text().splitlines()) >= 50,
            timeout_s=60,
            what="50 items written by the sink",
        )
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()

    assert process.returncode == 130, stderr
    assert "interrupted" in stdout
    # The summary shows the types that the interrupt cut short as stopped.
    assert re.search(r"^  wait\s+stopped\s", stdout, re.MULTILINE), stdout
    assert re.search(r"^  write\s+stopped\s", stdout, re.MULTILINE), stdout
    written = [int(line) for line in output.read_text().splitlines()]
    pending = queued_items(
        tmp_path / ".monomyth" / "slow.db",
        ["slow.numbers-to-wait", "slow.wait-to-write"],
    )
    assert len(written) < 2000
    assert len(set(written)) == len(written)
    assert len(written) + pending == 2000

    # The next run refuses to mix its items with the leftovers.
    again = run_engine("run", str(pipeline), cwd=tmp_path)
    assert again.returncode == 1
    assert "--purge" in again.stderr


def test_worker_leaves_no_node_processes(tmp_path, write_pipeline) -> None:
    import psutil

    pipeline = write_pipeline(SLOW)
    process = subprocess.Popen(
        [engine_command(), "run", str(pipeline)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        parent = psutil.Process(process.pid)

        # The transform and the sink: the source may have completed already.
        def has_two_nodes() -> bool:
            workers = parent.children()
            return bool(workers) and len(node_processes(workers[0].pid)) >= 2

        wait_for(has_two_nodes, timeout_s=60, what="the worker's node processes")
        descendants = parent.children(recursive=True)
        os.kill(process.pid, signal.SIGINT)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()

    def all_gone() -> bool:
        return not any(p.is_running() and p.status() != "zombie" for p in descendants)

    wait_for(all_gone, timeout_s=30, what="every worker and node process to exit")


def test_interrupt_kills_worker_that_hangs(tmp_path, write_pipeline) -> None:
    import psutil

    pipeline = write_pipeline(SLOW)
    process = subprocess.Popen(
        [engine_command(), "run", str(pipeline), "--drain-timeout", "1"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    workers: list[psutil.Process] = []
    try:
        parent = psutil.Process(process.pid)
        workers = wait_for(
            lambda: [
                child
                for child in parent.children()
                if len(node_processes(child.pid)) >= 2
            ],
            timeout_s=60,
            what="the worker and its node processes",
        )
        descendants = parent.children(recursive=True)

        # A stopped worker cannot drain, nor kill its nodes when the drain
        # timeout passes: the run must kill it itself.
        workers[0].suspend()
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        # A worker left stopped would never exit by itself.
        for worker in workers:
            with contextlib.suppress(psutil.Error):
                worker.kill()

    assert process.returncode == 130, output
    assert "the worker did not stop within the drain timeout of 1 s" in output

    def all_gone() -> bool:
        return not any(p.is_running() and p.status() != "zombie" for p in descendants)

    wait_for(all_gone, timeout_s=30, what="every worker and node process to exit")


LONG_BATCHES = """
import os
import time

from engine import Pipeline, param
from nodes import JsonLinesSink

pipeline = Pipeline("long", params={"output": "out.jsonl"})


@pipeline.source(batch_size=1)
def numbers():
    yield from range(6)


@pipeline.transform(after="numbers", batch_size=1, processes=2)
def slow(number):
    # Busy for longer than the 1 s lease, so only lease renewal keeps the item.
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        pass
    return {"number": number, "pid": os.getpid()}


pipeline.add("sink", "write", JsonLinesSink(path=param("output")), after="slow")
"""


def test_long_batch_keeps_its_lease(tmp_path, write_pipeline) -> None:
    pipeline = write_pipeline(LONG_BATCHES)
    stream = f"sqlite:///{tmp_path}/long.db?lease_s=1"

    result = run_engine("run", str(pipeline), "--stream", stream, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    numbers = sorted(json.loads(line)["number"] for line in lines)
    assert numbers == list(range(6))


ALWAYS_CRASHING = """
import os

from engine import Pipeline

pipeline = Pipeline("doomed")


@pipeline.source()
def numbers():
    yield from range(3)


def explode(ctx):
    raise RuntimeError("cannot open the device")


@pipeline.transform(after="numbers", setup=explode, max_restarts=2)
def use(number):
    return number


@pipeline.sink(after="use")
def discard(item):
    pass
"""


def test_restart_budget_spent_fails_node(tmp_path, write_pipeline) -> None:
    pipeline = write_pipeline(ALWAYS_CRASHING)

    result = run_engine("run", str(pipeline), cwd=tmp_path)

    output = result.stdout + result.stderr
    assert result.returncode == 4, output
    assert "restart 2 of 2" in output
    assert "giving up" in output
    assert "last error: RuntimeError: cannot open the device" in result.stdout
    assert re.search(r"use\s+failed", result.stdout)


POISON = """
import os
import signal

from engine import Pipeline, param
from nodes import JsonLinesSink

pipeline = Pipeline("poison", params={"output": "out.jsonl"})


@pipeline.source()
def numbers():
    yield from range(50)


@pipeline.transform(after="numbers", batch_size=10, retries=1)
def fragile(number):
    if number == 13:
        os.kill(os.getpid(), signal.SIGKILL)
    return number


pipeline.add("sink", "write", JsonLinesSink(path=param("output")), after="fragile")
"""


def test_poison_item_ends_in_fail_queue(tmp_path, write_pipeline) -> None:
    pipeline = write_pipeline(POISON)

    result = run_engine("run", str(pipeline), cwd=tmp_path)

    output = result.stdout + result.stderr
    assert result.returncode == 3, output
    written = sorted(int(line) for line in (tmp_path / "out.jsonl").read_text().split())
    assert written == [n for n in range(50) if n != 13]
    assert "while processing item numbers:13" in output
    stream = open_stream(f"sqlite:///{tmp_path}/.monomyth/poison.db", owner="test")
    try:
        deliveries = stream.pull(["poison.fragile-fail"], 10, 0.5)
    finally:
        stream.close()
    assert len(deliveries) == 1
    record = json.loads(deliveries[0].body)
    assert record["payload"] == 13
    error = record["errors"][-1]
    assert error["type"] == "NodeProcessDiedError"
    assert "died 2 times" in error["message"]
    assert "signal 9 (SIGKILL)" in error["message"]
    listed = run_engine("fail-queue", "list", "poison.fragile", cwd=tmp_path)
    assert "numbers:13  attempts=2  NodeProcessDiedError" in listed.stdout


def test_fail_queue_commands(tmp_path, write_pipeline) -> None:
    pipeline = write_pipeline(FAILING_ITEMS)
    assert run_engine("run", str(pipeline), cwd=tmp_path).returncode == 3

    listed = run_engine("fail-queue", "list", "failing.invert", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "4 failed items in failing.invert-fail" in listed.stdout
    assert "ValueError: cannot invert 5" in listed.stdout
    item_id = next(
        line.split()[0] for line in listed.stdout.splitlines() if "invert 5" in line
    )

    shown = run_engine("fail-queue", "show", "failing.invert", item_id, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    assert record["payload"] == 5
    assert record["errors"][0]["type"] == "ValueError"

    missing = run_engine("fail-queue", "show", "failing.invert", "nope", cwd=tmp_path)
    assert missing.returncode == 1
    assert "item 'nope' not found in failing.invert-fail" in missing.stderr

    elsewhere = run_engine("fail-queue", "list", "other.invert", cwd=tmp_path)
    assert elsewhere.returncode == 1
    assert "no stream of pipeline 'other' here" in elsewhere.stderr
    assert not (tmp_path / ".monomyth" / "other.db").exists()

    unknown = run_engine("fail-queue", "list", "failing.nope", cwd=tmp_path)
    assert unknown.returncode == 1
    assert "node 'failing.nope' has no fail queue 'failing.nope-fail'" in (
        unknown.stderr
    )

    replayed = run_engine(
        "fail-queue", "replay", "failing.invert", "--id", item_id, cwd=tmp_path
    )
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 1 items" in replayed.stdout
    stream = open_stream(f"sqlite:///{tmp_path}/.monomyth/failing.db", owner="test")
    try:
        depths = stream.depths(["failing.invert-fail", "failing.numbers-to-invert"])
        back = json.loads(stream.pull(["failing.numbers-to-invert"], 1, 0.5)[0].body)
    finally:
        stream.close()
    assert depths == {"failing.invert-fail": 3, "failing.numbers-to-invert": 1}
    assert back["payload"] == 5
    assert back["attempt"] == 1

    purged = run_engine("fail-queue", "purge", "failing.invert", "--yes", cwd=tmp_path)
    assert purged.returncode == 0, purged.stderr
    assert "purged 3 items" in purged.stdout


FLAKY_UNTIL_FIXED = """
from pathlib import Path

from engine import Pipeline, param
from nodes import JsonLinesSink

pipeline = Pipeline("flaky", params={"output": "out.jsonl", "broken": ""})


@pipeline.source()
def numbers():
    yield from range(20)


@pipeline.transform(after="numbers", retries=0)
def check(number, ctx):
    if number % 5 == 0 and Path(ctx.params["broken"]).exists():
        raise RuntimeError(f"service down for {number}")
    return number


pipeline.add("sink", "write", JsonLinesSink(path=param("output")), after="check")
"""


def test_replayed_items_processed_on_resume(tmp_path, write_pipeline) -> None:
    pipeline = write_pipeline(FLAKY_UNTIL_FIXED)
    broken = tmp_path / "broken"
    broken.write_text("")
    args = ("run", str(pipeline), "-p", f"broken={broken}")
    assert run_engine(*args, cwd=tmp_path).returncode == 3

    broken.unlink()
    replayed = run_engine("fail-queue", "replay", "flaky.check", cwd=tmp_path)
    assert "replayed 4 items" in replayed.stdout
    refused = run_engine(*args, cwd=tmp_path)
    resumed = run_engine(*args, "--resume", cwd=tmp_path)

    assert refused.returncode == 1
    assert "--resume" in refused.stderr
    assert resumed.returncode == 0, resumed.stderr
    written = sorted(int(n) for n in (tmp_path / "out.jsonl").read_text().split())
    assert written == list(range(20))


def test_second_run_same_stream_refused(tmp_path, write_pipeline) -> None:
    pipeline = write_pipeline(SLOW)
    first = subprocess.Popen(
        [engine_command(), "run", str(pipeline)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(
            lambda: (tmp_path / "out.jsonl").exists(),
            timeout_s=60,
            what="the first run to write",
        )
        second = run_engine("run", str(pipeline), "--purge", cwd=tmp_path)
    finally:
        first.send_signal(signal.SIGINT)
        first.wait(timeout=60)

    assert second.returncode == 1
    assert "another run of pipeline 'slow'" in second.stderr
    assert f"pid {first.pid}" in second.stderr


def test_repeated_parameter_exits_2(tmp_path, write_pipeline) -> None:
    pipeline = write_pipeline(SLOW)

    result = run_engine(
        "run", str(pipeline), "-p", "output=a", "-p", "output=b", cwd=tmp_path
    )

    assert result.returncode == 2
    assert "parameter 'output' given twice" in result.stderr


FAILING_TEARDOWN = """
from engine import Pipeline, param
from nodes import JsonLinesSink

pipeline = Pipeline("teardown", params={"output": "out.jsonl"})


def close(ctx):
    raise OSError("socket already closed")


@pipeline.source()
def numbers():
    yield from range(10)


@pipeline.transform(after="numbers", teardown=close)
def same(number):
    return number


pipeline.add("sink", "write", JsonLinesSink(path=param("output")), after="same")
"""


def test_failing_teardown_keeps_node_completed(tmp_path, write_pipeline) -> None:
    pipeline = write_pipeline(FAILING_TEARDOWN)

    result = run_engine("run", str(pipeline), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert "teardown of node teardown.same#1 failed" in result.stderr
    assert "OSError: socket already closed" in result.stderr
    assert re.search(r"same\s+completed", result.stdout)


GROWING = """
from engine import Pipeline, param
from nodes import JsonLinesSink

pipeline = Pipeline("growing", params={"output": "out.jsonl"})
HOARD = []


@pipeline.source(batch_size=10)
def numbers():
    yield from range(60)


@pipeline.transform(after="numbers", batch_size=10, max_memory_bytes=150_000_000)
def hoard(number):
    # Each item keeps 8 MB alive, so the process passes its limit every
    # few batches and must be recycled between batches.
    HOARD.append(bytearray(8_000_000))
    return number


pipeline.add("sink", "write", JsonLinesSink(path=param("output")), after="hoard")
"""


def test_node_over_memory_limit_recycled(tmp_path, write_pipeline) -> None:
    pipeline = write_pipeline(GROWING)

    result = run_engine("run", str(pipeline), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert "node growing.hoard#1 recycled: resident memory" in result.stderr
    written = sorted(int(n) for n in (tmp_path / "out.jsonl").read_text().split())
    assert written == list(range(60))


def kill_nodes_mid_run(pipeline: Path, output: Path) -> None:
    """Run `pipeline` until its sink wrote 50 items, then press Ctrl-C twice.

    The second interrupt kills the nodes while they hold leased items.
    """
    process = subprocess.Popen(
        [engine_command(), "run", str(pipeline)],
        cwd=pipeline.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(
            lambda: output.exists() and len(output.read_text().splitlines()) >= 50,
            timeout_s=60,
            what="50 items written by the sink",
        )
        process.send_signal(signal.SIGINT)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()


def test_resume_after_killed_nodes_finishes(tmp_path, write_pipeline) -> None:
    pipeline = write_pipeline(SLOW)
    output = tmp_path / "out.jsonl"
    kill_nodes_mid_run(pipeline, output)

    resumed = run_engine("run", str(pipeline), "--resume", cwd=tmp_path)

    assert resumed.returncode == 0, resumed.stderr
    written = {int(n) for n in output.read_text().split()}
    assert written == set(range(2000))


def start_slow_run(pipeline: Path, output: Path) -> subprocess.Popen:
    """Start `engine run` of SLOW and return once its sink wrote 50 items."""
    process = subprocess.Popen(
        [engine_command(), "run", str(pipeline)],
        cwd=pipeline.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: output.exists() and len(output.read_text().splitlines()) >= 50,
            timeout_s=60,
            what="50 items written by the sink",
        )
    except BaseException:
        process.kill()
        process.communicate()
        raise
    return process


def kill_worker(process: subprocess.Popen, killed_pids: set[int]) -> None:
    """SIGKILL the worker of the run `process`, one not killed before."""
    import psutil

    def new_worker() -> psutil.Process | None:
        children = psutil.Process(process.pid).children()
        fresh = [child for child in children if child.pid not in killed_pids]
        return fresh[0] if fresh else None

    worker = wait_for(new_worker, timeout_s=30, what="a worker not killed yet")
    killed_pids.add(worker.pid)
    worker.kill()


def test_killed_worker_replaced_run_completes(tmp_path, write_pipeline) -> None:
    pipeline = write_pipeline(SLOW)
    output = tmp_path / "out.jsonl"
    process = start_slow_run(pipeline, output)
    try:
        kill_worker(process, set())
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()

    assert process.returncode == 0, stderr
    assert "the worker exited with code -9; starting a new worker" in stderr
    assert "(restart 1 of 3)" in stderr
    written = {int(n) for n in output.read_text().split()}
    assert written == set(range(2000))


def test_worker_killed_too_often_suggests_resume(tmp_path, write_pipeline) -> None:
    pipeline = write_pipeline(SLOW)
    output = tmp_path / "out.jsonl"
    process = start_slow_run(pipeline, output)
    killed_pids: set[int] = set()
    try:
        for _ in range(4):
            kill_worker(process, killed_pids)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()

    assert process.returncode == 1, stderr
    assert "after 3 restarts" in stderr
    assert "with --resume" in stderr
    resumed = run_engine("run", str(pipeline), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    written = {int(n) for n in output.read_text().split()}
    assert written == set(range(2000))


def test_resume_with_nothing_left_fails(tmp_path, write_pipeline) -> None:
    pipeline = write_pipeline(SLOW)

    result = run_engine("run", str(pipeline), "--resume", cwd=tmp_path)

    assert result.returncode == 1
    assert "nothing to resume" in result.stderr


SLOW_SOURCE = """
import time

from engine import Pipeline, param
from nodes import JsonLinesSink

pipeline = Pipeline("trickle", params={"output": "out.jsonl", "count": 1000})


@pipeline.source(batch_size=1)
def numbers(ctx):
    for number in range(ctx.params["count"]):
        time.sleep(0.01)
        yield number


pipeline.add("sink", "write", JsonLinesSink(path=param("output")), after="numbers")
"""


def test_resume_finishes_cut_off_source(tmp_path, write_pipeline) -> None:
    pipeline = write_pipeline(SLOW_SOURCE)
    output = tmp_path / "out.jsonl"
    process = subprocess.Popen(
        [engine_command(), "run", str(pipeline), "-p", "count=300"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(
            lambda: output.exists() and len(output.read_text().splitlines()) >= 20,
            timeout_s=60,
            what="20 items written by the sink",
        )
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 130
    finally:
        if process.poll() is None:
            process.kill()
    written_before = len(output.read_text().splitlines())

    changed = run_engine(
        "run", str(pipeline), "--resume", "-p", "count=100", cwd=tmp_path
    )
    resumed = run_engine("run", str(pipeline), "--resume", cwd=tmp_path)

    assert changed.returncode == 2
    assert "earlier run with its parameters (-p count=300)" in changed.stderr
    assert resumed.returncode == 0, resumed.stderr
    assert "the sources 'numbers' of the earlier run did not finish" in resumed.stdout
    written = [int(line) for line in output.read_text().splitlines()]
    assert written_before < 300
    assert sorted(written) == list(range(300))
    again = run_engine("run", str(pipeline), "--resume", cwd=tmp_path)
    assert again.returncode == 1
    assert "nothing to resume" in again.stderr


# A source that kills its own process with SIGKILL once, halfway through its
# items and after the sink stored the first half, before a batched transform
# that records the ids it receives and sums each batch into one result.
CRASHING_SOURCE = """
import os
import signal
import sqlite3
import time
from pathlib import Path

from engine import Pipeline, param
from nodes import SQLiteSink

pipeline = Pipeline("replay", params={"marker": "", "output": "", "seen": ""})


def stored_items(path):
    try:
        with sqlite3.connect(path) as database:
            return database.execute("SELECT SUM(items) FROM totals").fetchone()[0] or 0
    except sqlite3.OperationalError:
        return 0  # the sink has not created the table yet


@pipeline.source(batch_size=10)
def numbers(ctx):
    marker = Path(ctx.params["marker"])
    for number in range(1000):
        if number == 500 and not marker.exists():
            deadline = time.monotonic() + 60
            while stored_items(ctx.params["output"]) < 500:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        yield number


@pipeline.transform(after="numbers", batched=True, batch_size=25)
def add(numbers, ctx):
    with open(ctx.params["seen"], "a") as seen:
        seen.writelines(item_id + "\\n" for item_id in ctx.item_ids)
    return [{"sum": sum(numbers), "count": len(numbers)}]


pipeline.add(
    "sink",
    "store",
    SQLiteSink(
        path=param("output"),
        schema="CREATE TABLE IF NOT EXISTS totals (total INTEGER, items INTEGER)",
        statement="INSERT INTO totals VALUES (:sum, :count)",
        dedupe=True,
    ),
    after="add",
)
"""


def test_source_restart_skips_published_items(tmp_path, write_pipeline) -> None:
    pipeline = write_pipeline(CRASHING_SOURCE)
    marker = tmp_path / "marker"
    output = tmp_path / "totals.db"
    seen = tmp_path / "seen.txt"

    result = run_engine(
        "run",
        str(pipeline),
        "-p",
        f"marker={marker}",
        "-p",
        f"output={output}",
        "-p",
        f"seen={seen}",
        cwd=tmp_path,
    )

    assert result.returncode == 0, result.stderr
    assert marker.exists()
    seen_ids = seen.read_text().splitlines()
    assert len(seen_ids) == 1000
    assert len(set(seen_ids)) == 1000
    with sqlite3.connect(output) as database:
        total, items = database.execute(
            "SELECT SUM(total), SUM(items) FROM totals"
        ).fetchone()
    database.close()
    assert items == 1000
    assert total == sum(range(1000))
    assert "skips the first 500 items of its source" in result.stderr


# A source that records, in its setup hook, what its process holds, then
# waits for the test to create the release file.
INSPECTED = """
import json
import os
import threading
import time
from pathlib import Path

import psutil

from engine import Pipeline

pipeline = Pipeline("inspected", params={"report": "", "release": ""})


def inspect(ctx):
    report = {
        "threads": sorted(thread.name for thread in threading.enumerate()),
        "sockets": [str(c) for c in psutil.Process().net_connections("all")],
    }
    Path(ctx.params["report"]).write_text(json.dumps(report))


@pipeline.source(setup=inspect)
def hold(ctx):
    deadline = time.monotonic() + 60
    while not os.path.exists(ctx.params["release"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    yield 1


@pipeline.sink(after="hold")
def drop(item):
    pass
"""


def test_forkserver_holds_no_thread_or_socket(tmp_path, write_pipeline) -> None:
    import psutil

    pipeline = write_pipeline(INSPECTED)
    report = tmp_path / "report.json"
    release = tmp_path / "release"
    process = subprocess.Popen(
        [engine_command(), "run", str(pipeline)]
        + ["-p", f"report={report}", "-p", f"release={release}"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(report.exists, timeout_s=60, what="the source's setup report")
        worker = psutil.Process(process.pid).children()[0]
        forkserver = forkserver_process(worker.pid)
        assert forkserver is not None, "the worker started no forkserver"
        # A fork copies one thread, so other threads would leave their locks
        # held in every node.
        assert forkserver.num_threads() == 1
        assert forkserver.net_connections("inet") == []
        stream_files = [
            f.path for f in forkserver.open_files() if ".monomyth" in f.path
        ]
        assert stream_files == []
        node_report = json.loads(report.read_text())
        assert node_report["sockets"] == []
        # The stream's write gate starts a thread once a write had to wait.
        assert set(node_report["threads"]) <= {
            "MainThread",
            "worker-watch",
            "sqlite-write-gate",
        }
    finally:
        release.touch()
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output


SLOW_NUMBERS = """
import time

from engine import Pipeline, param
from nodes import SQLiteSink

pipeline = Pipeline("slownumbers", params={"output": ""})


@pipeline.source(batch_size=10)
def numbers():
    yield from range(300)


@pipeline.transform(after="numbers", batch_size=5)
def wait(number):
    time.sleep(0.01)
    return number


pipeline.add(
    "sink",
    "store",
    SQLiteSink(
        path=param("output"),
        schema="CREATE TABLE IF NOT EXISTS numbers(value INTEGER)",
        statement="INSERT INTO numbers VALUES (?)",
        rows=lambda number: [(number,)],
        dedupe=True,
    ),
    after="wait",
)
"""


def test_killed_forkserver_nodes_restarted(tmp_path, write_pipeline) -> None:
    import psutil

    pipeline = write_pipeline(SLOW_NUMBERS)
    output = tmp_path / "numbers.db"
    process = subprocess.Popen(
        [engine_command(), "run", str(pipeline), "-p", f"output={output}"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def has_stored() -> bool:
            if not output.exists():
                return False
            with sqlite3.connect(output) as connection:
                tables = connection.execute(
                    "SELECT COUNT(*) FROM sqlite_master WHERE name = 'numbers'"
                ).fetchone()[0]
                stored = (
                    tables
                    and connection.execute("SELECT COUNT(*) FROM numbers").fetchone()[0]
                )
            connection.close()
            return bool(stored)

        wait_for(has_stored, timeout_s=60, what="the first stored numbers")
        worker = psutil.Process(process.pid).children()[0]
        forkserver = forkserver_process(worker.pid)
        assert forkserver is not None, "the worker started no forkserver"
        forkserver.kill()
        output_text, _ = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()

    assert process.returncode == 0, output_text
    assert "outlived its forkserver; killed it" in output_text
    assert "restarting in" in output_text
    with sqlite3.connect(output) as connection:
        values = [row[0] for row in connection.execute("SELECT value FROM numbers")]
    connection.close()
    # The sink's dedupe keeps each number once, even if it was redelivered.
    assert sorted(values) == list(range(300))


# One item fails once, and its retry becomes visible only after the source
# has completed and the transform's completion flag is set.
LATE_RETRY = """
from pathlib import Path

from engine import Pipeline, param
from nodes import JsonLinesSink

pipeline = Pipeline("lateretry", params={"output": "out.jsonl", "marker": ""})


@pipeline.source()
def numbers():
    yield from range(5)


@pipeline.transform(after="numbers", processes=2, batch_size=1, retry_backoff_s=1.0)
def flaky(number, ctx):
    marker = Path(ctx.params["marker"])
    if number == 3 and not marker.exists():
        marker.touch()
        raise RuntimeError("fails once")
    return number


pipeline.add("sink", "write", JsonLinesSink(path=param("output")), after="flaky")
"""


def test_completion_waits_for_delayed_retry(tmp_path, write_pipeline) -> None:
    pipeline = write_pipeline(LATE_RETRY)
    output = tmp_path / "out.jsonl"
    marker = tmp_path / "failed-once"

    result = run_engine(
        "run",
        str(pipeline),
        "-p",
        f"output={output}",
        "-p",
        f"marker={marker}",
        cwd=tmp_path,
    )

    assert result.returncode == 0, result.stderr + result.stdout
    assert marker.exists()
    written = sorted(json.loads(line) for line in output.read_text().splitlines())
    assert written == [0, 1, 2, 3, 4]


# A batched transform that returns one string per batch instead of a list.
BATCH_RETURNS_TEXT = """
from engine import Pipeline, param
from nodes import JsonLinesSink

pipeline = Pipeline("textbatch", params={"output": "out.jsonl"})


@pipeline.source()
def numbers():
    yield from range(3)


@pipeline.transform(after="numbers", batched=True, retries=0)
def total(numbers):
    return f"total={sum(numbers)}"


pipeline.add("sink", "write", JsonLinesSink(path=param("output")), after="total")
"""


def test_batched_transform_returning_text_fails(tmp_path, write_pipeline) -> None:
    pipeline = write_pipeline(BATCH_RETURNS_TEXT)

    result = run_engine("run", str(pipeline), cwd=tmp_path)

    assert result.returncode == 3, result.stderr
    output = tmp_path / "out.jsonl"
    assert not output.exists() or output.read_text() == ""
    stream = open_stream(f"sqlite:///{tmp_path}/.monomyth/textbatch.db", owner="test")
    try:
        deliveries = stream.pull(["textbatch.total-fail"], 100, 0.5)
        records = [json.loads(d.body) for d in deliveries]
    finally:
        stream.close()
    assert sorted(record["payload"] for record in records) == [0, 1, 2]
    error = records[0]["errors"][0]
    assert error["type"] == "TypeError"
    assert "batched transform 'total' returned str" in error["message"]
    assert "return a list" in error["message"]


def test_sigterm_drains_like_ctrl_c(tmp_path, write_pipeline) -> None:
    pipeline = write_pipeline(SLOW_SOURCE)
    output = tmp_path / "out.jsonl"
    process = subprocess.Popen(
        [engine_command(), "run", str(pipeline), "-p", "count=300"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: output.exists() and len(output.read_text().splitlines()) >= 20,
            timeout_s=60,
            what="20 items written by the sink",
        )
        process.send_signal(signal.SIGTERM)
        stdout, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()

    assert process.returncode == 130
    assert "interrupted: draining nodes" in stdout
    resumed = run_engine("run", str(pipeline), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    written = [int(line) for line in output.read_text().splitlines()]
    assert sorted(written) == list(range(300))


def test_doubled_sigterm_still_drains(tmp_path, write_pipeline) -> None:
    pipeline = write_pipeline(SLOW_SOURCE)
    output = tmp_path / "out.jsonl"
    process = subprocess.Popen(
        [engine_command(), "run", str(pipeline), "-p", "count=300"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: output.exists() and len(output.read_text().splitlines()) >= 20,
            timeout_s=60,
            what="20 items written by the sink",
        )
        # As `timeout` does: once to the process, once to its process group.
        # The pause keeps the kernel from merging the two into one.
        process.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        stdout, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()

    assert process.returncode == 130
    assert "interrupted: draining nodes" in stdout
    assert "interrupted again" not in stdout


UNENCODABLE = """
from engine import Pipeline


pipeline = Pipeline("unencodable", params={})


@pipeline.source()
def numbers():
    yield from range(2)


@pipeline.transform(after="numbers", retries=2, retry_backoff_s=0.05)
def wrap(number):
    return {"value": number, "kind": object()}


@pipeline.sink(after="wrap")
def drop(item):
    pass
"""


def test_unencodable_result_fails_without_retry(tmp_path, write_pipeline) -> None:
    pipeline = write_pipeline(UNENCODABLE)

    result = run_engine("run", str(pipeline), cwd=tmp_path)

    assert result.returncode == 3, result.stderr
    url = f"sqlite:///{tmp_path}/.monomyth/unencodable.db"
    stream = open_stream(url, owner="test")
    try:
        deliveries = stream.pull(["unencodable.wrap-fail"], 100, 0.5)
        records = [json.loads(d.body) for d in deliveries]
    finally:
        stream.close()
    assert sorted(record["payload"] for record in records) == [0, 1]
    for record in records:
        assert len(record["errors"]) == 1
        assert record["errors"][0]["type"] == "EncodingError"


PICKLED_FAILURE = """
from engine import Pipeline

pipeline = Pipeline("pickled", serializer="pickle")


@pipeline.source()
def numbers():
    yield from range(3)


@pipeline.sink(after="numbers", retries=0)
def reject_one(number):
    if number == 1:
        raise ValueError("one is rejected")
"""


def test_fail_queue_lists_pickled_item(tmp_path, write_pipeline) -> None:
    pipeline = write_pipeline(PICKLED_FAILURE)

    result = run_engine("run", str(pipeline), cwd=tmp_path)

    assert result.returncode == 3, result.stderr
    listed = run_engine("fail-queue", "list", "pickled.reject_one", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "?  pickled item of " in listed.stdout
    assert "attempts=" not in listed.stdout
    assert "1 failed items in pickled.reject_one-fail" in listed.stdout


# A batched transform that records the size of every call it gets.
SLOW_BATCHES = """
import time

from engine import Pipeline, param
from nodes import JsonLinesSink

pipeline = Pipeline("slowbatch", params={"output": "out.jsonl", "sizes": "sizes.txt"})


@pipeline.source(batch_size=100)
def numbers():
    yield from range(600)


@pipeline.transform(after="numbers", batched=True, batch_size=10)
def wait(numbers, ctx):
    with open(ctx.params["sizes"], "a") as sizes:
        sizes.write(f"{len(numbers)}\\n")
    time.sleep(0.05)
    return numbers


pipeline.add("sink", "write", JsonLinesSink(path=param("output")), after="wait")
"""


def test_resume_keeps_batching_redelivered_items(tmp_path, write_pipeline) -> None:
    pipeline = write_pipeline(SLOW_BATCHES)
    output = tmp_path / "out.jsonl"
    sizes = tmp_path / "sizes.txt"
    kill_nodes_mid_run(pipeline, output)
    sizes.write_text("")

    resumed = run_engine("run", str(pipeline), "--resume", cwd=tmp_path)

    assert resumed.returncode == 0, resumed.stderr
    assert {int(n) for n in output.read_text().split()} == set(range(600))
    # No process died in a batched call, so the items delivered again after
    # the interrupt are no suspects and stay in batches.
    calls = [int(n) for n in sizes.read_text().split()]
    assert calls.count(1) <= 1, calls


# A batched transform whose batch with item 13 kills its process.
BATCH_POISON = """
import os
import signal

from engine import Pipeline, param
from nodes import JsonLinesSink

pipeline = Pipeline("batchpoison", params={"output": "out.jsonl"})


@pipeline.source()
def numbers():
    yield from range(50)


@pipeline.transform(after="numbers", batched=True, batch_size=10, retries=1)
def fragile(numbers):
    if 13 in numbers:
        os.kill(os.getpid(), signal.SIGKILL)
    return numbers


pipeline.add("sink", "write", JsonLinesSink(path=param("output")), after="fragile")
"""


def test_batched_poison_item_ends_in_fail_queue(tmp_path, write_pipeline) -> None:
    pipeline = write_pipeline(BATCH_POISON)

    result = run_engine("run", str(pipeline), cwd=tmp_path)

    output = result.stdout + result.stderr
    assert result.returncode == 3, output
    assert "died (signal 9 (SIGKILL)) while processing a batch" in output
    written = sorted(int(n) for n in (tmp_path / "out.jsonl").read_text().split())
    assert written == [n for n in range(50) if n != 13]
    listed = run_engine("fail-queue", "list", "batchpoison.fragile", cwd=tmp_path)
    assert "numbers:13  attempts=2  NodeProcessDiedError" in listed.stdout


# A transform whose process dies on item 7 once, at a moment the test picks:
# it marks `dying`, then waits for `go` to exist before it kills itself.
GATED_CRASH = """
import os
import signal
import time
from pathlib import Path

from engine import Pipeline, param
from nodes import JsonLinesSink

pipeline = Pipeline("gated", params={"output": "out.jsonl", "dying": "", "go": ""})


@pipeline.source(batch_size=5)
def numbers():
    yield from range(20)


@pipeline.transform(after="numbers", batch_size=5)
def fragile(number, ctx):
    go = Path(ctx.params["go"])
    if number == 7 and not go.exists():
        Path(ctx.params["dying"]).touch()
        for _ in range(1200):
            if go.exists():
                break
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)
    return number


pipeline.add("sink", "write", JsonLinesSink(path=param("output")), after="fragile")
"""


def test_locked_stream_keeps_worker_alive(tmp_path, write_pipeline) -> None:
    pipeline = write_pipeline(GATED_CRASH)
    database = tmp_path / "stream.db"
    dying = tmp_path / "dying"
    go = tmp_path / "go"
    process = subprocess.Popen(
        [engine_command(), "run", str(pipeline)]
        + ["--stream", f"sqlite:///{database}?lease_s=3"]
        + ["-p", f"dying={dying}", "-p", f"go={go}"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(dying.exists, timeout_s=60, what="the transform to reach item 7")
        # Another process takes the stream's write lock, and the transform
        # dies while it is held: the worker's recovery of what the transform
        # pulled must not hold up its heartbeats past the master's 10 s.
        holder = GateHolder(database)
        try:
            go.touch()
            time.sleep(12)
            holder.release()
        finally:
            holder.stop()
        output, _ = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()

    assert process.returncode == 0, output
    assert "recovering the items pulled by gated.fragile#1" in output
    assert "lost: silent" not in output
    written = sorted(int(n) for n in (tmp_path / "out.jsonl").read_text().split())
    assert written == list(range(20))


# Three poison items with retries=1 kill six processes, more than the
# restart budget of 5, and one item in ten of `every` kills its process.
POISONS = """
import os
import signal

from engine import Pipeline, param
from nodes import JsonLinesSink

pipeline = Pipeline("poisons", params={"output": "out.jsonl", "every": 0})


@pipeline.source()
def numbers():
    yield from range(60)


@pipeline.transform(after="numbers", batch_size=10, retries=1)
def fragile(number, ctx):
    every = ctx.params["every"]
    if number in (13, 27, 41) or (every and number % every == 0):
        os.kill(os.getpid(), signal.SIGKILL)
    return number


pipeline.add("sink", "write", JsonLinesSink(path=param("output")), after="fragile")
"""


def test_poison_items_spare_restart_budget(tmp_path, write_pipeline) -> None:
    pipeline = write_pipeline(POISONS)

    result = run_engine("run", str(pipeline), cwd=tmp_path, timeout_s=120)

    output = result.stdout + result.stderr
    assert result.returncode == 3, output
    written = sorted(int(n) for n in (tmp_path / "out.jsonl").read_text().split())
    assert written == [n for n in range(60) if n not in (13, 27, 41)]
    assert "not counted against the restart budget" in output
    listed = run_engine("fail-queue", "list", "poisons.fragile", cwd=tmp_path)
    for item in ("numbers:13", "numbers:27", "numbers:41"):
        assert f"{item}  attempts=2  NodeProcessDiedError" in listed.stdout


def test_crash_on_every_item_fails_node(tmp_path, write_pipeline) -> None:
    pipeline = write_pipeline(POISONS)

    result = run_engine(
        "run", str(pipeline), "-p", "every=2", cwd=tmp_path, timeout_s=120
    )

    output = result.stdout + result.stderr
    assert result.returncode == 4, output
    assert "giving up" in output
    assert re.search(r"fragile\s+failed", result.stdout)


# A transform recycled after every batch. It marks the start of each item
# in `started` and then takes 0.2 s, so that a drain started right after a
# new mark finds it in the middle of a batch.
RECYCLED_SLOW = """
import time
from pathlib import Path

from engine import Pipeline, param
from nodes import JsonLinesSink

pipeline = Pipeline("recycled", params={"output": "out.jsonl", "started": ""})


@pipeline.source(batch_size=50)
def numbers():
    yield from range(400)


@pipeline.transform(after="numbers", batch_size=5, max_memory_bytes=1)
def slow(number, ctx):
    Path(ctx.params["started"]).write_text(str(number))
    time.sleep(0.2)
    return number


pipeline.add("sink", "write", JsonLinesSink(path=param("output")), after="slow")
"""


def test_recycle_during_drain_stops_node(tmp_path, write_pipeline) -> None:
    pipeline = write_pipeline(RECYCLED_SLOW)
    output = tmp_path / "out.jsonl"
    started = tmp_path / "started"
    process = subprocess.Popen(
        [engine_command(), "run", str(pipeline), "-p", f"started={started}"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(
            lambda: output.exists() and len(output.read_text().splitlines()) >= 5,
            timeout_s=60,
            what="5 items written by the sink",
        )
        mark = started.read_text()
        wait_for(
            lambda: started.read_text() != mark,
            timeout_s=60,
            what="the transform to start another item",
        )
        process.send_signal(signal.SIGINT)
        log, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()

    assert process.returncode == 130, log
    assert "due for recycling" in log
    assert "exited while draining" not in log
    written = [int(n) for n in output.read_text().split()]
    pending = queued_items(
        tmp_path / ".monomyth" / "recycled.db",
        ["recycled.numbers-to-slow", "recycled.slow-to-write"],
    )
    assert len(set(written)) == len(written)
    assert len(written) + pending == 400


def test_stream_in_file_path_fails_clearly(tmp_path, write_pipeline) -> None:
    pipeline = write_pipeline(POISON)
    (tmp_path / "notafolder").write_text("")

    result = run_engine(
        "run", str(pipeline), "--stream", "sqlite:///notafolder/s.db", cwd=tmp_path
    )

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "cannot create the run lock 'notafolder/s.db.poison.lock'" in result.stderr
