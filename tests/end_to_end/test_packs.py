"""Packed messages: a batch's results travel along an edge as few messages.

Each test runs `engine run` for real on the embedded stream.
"""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

from tests.end_to_end.conftest import run_engine

# Batch sizes that do not divide each other, and a filter that leaves
# messages of every size, so that consumers meet packs smaller and larger
# than what their batch lacks.
UNEVEN = """
import json

from engine import Pipeline

pipeline = Pipeline("uneven", params={"calls": ""})


@pipeline.source(batch_size=7)
def numbers():
    yield from range(500)


@pipeline.transform(after="numbers", batch_size=5)
def keep(number):
    if number % 3 != 0:
        return number


@pipeline.sink(after="keep", batch_size=4, batched=True)
def store(numbers, ctx):
    with open(ctx.params["calls"], "a") as calls:
        calls.write(json.dumps(numbers) + "\\n")
"""

RELAY = """
import json

from engine import Pipeline

pipeline = Pipeline("relay", params={"out": ""})


@pipeline.source(batch_size=50)
def numbers():
    yield from range(1000)


@pipeline.transform(after="numbers", batch_size=50)
def double(number):
    return number * 2


@pipeline.sink(after="double", batch_size=50, batched=True)
def store(numbers, ctx):
    with open(ctx.params["out"], "a") as out:
        out.write("".join(f"{number}\\n" for number in numbers))
"""


def test_batches_within_batch_size(tmp_path: Path, write_pipeline) -> None:
    pipeline = write_pipeline(UNEVEN)
    calls = tmp_path / "calls.jsonl"

    result = run_engine(
        "--log-level",
        "debug",
        "run",
        str(pipeline),
        "-p",
        f"calls={calls}",
        cwd=tmp_path,
    )

    assert result.returncode == 0, result.stderr
    batches = [json.loads(line) for line in calls.read_text().splitlines()]
    stored = [number for batch in batches for number in batch]
    assert sorted(stored) == [n for n in range(500) if n % 3 != 0]
    assert max(len(batch) for batch in batches) <= 4
    # The runtime logs the items of every batch that a node settled.
    sizes = {
        node: [
            int(size)
            for size in re.findall(rf"node=uneven\.{node}#1 in=(\d+)", result.stderr)
        ]
        for node in ("keep", "store")
    }
    assert sum(sizes["keep"]) == 500
    assert max(sizes["keep"]) <= 5
    assert sum(sizes["store"]) == len(stored)
    assert max(sizes["store"]) <= 4
    # On SQLite a node pulls its next batch in the transaction that settles
    # the last one.
    settled_and_pulled = r"settled \d+ messages, published \d+, pulled [1-9]"
    assert re.search(settled_and_pulled, result.stderr)


def test_stream_moves_batches(tmp_path: Path, write_pipeline) -> None:
    pipeline = write_pipeline(RELAY)
    out = tmp_path / "out.txt"

    result = run_engine("run", str(pipeline), "-p", f"out={out}", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert sorted(int(line) for line in out.read_text().split()) == [
        2 * n for n in range(1000)
    ]
    # Message ids count up with every message ever published to the file.
    connection = sqlite3.connect(tmp_path / ".monomyth" / "relay.db")
    try:
        (published,) = connection.execute(
            "SELECT seq FROM sqlite_sequence WHERE name = 'messages'"
        ).fetchone()
    finally:
        connection.close()
    # 1,000 items cross two edges in batches of 50: 40 messages, where one
    # message per item would be 2,000.
    assert published <= 60
