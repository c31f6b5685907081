"""Pipelines that are graphs: fan-out, fan-in, routing, filters, hooks."""

from __future__ import annotations

import json
from pathlib import Path

from tests.end_to_end.conftest import run_engine

GRAPH = """
from engine import Pipeline, param
from nodes import JsonLinesSink

pipeline = Pipeline("graph", params={"output": "out.jsonl", "copies": "copies.jsonl"})


def parity(number):
    return "even" if number % 2 == 0 else "odd"


@pipeline.source(route=parity)
def numbers():
    yield from range(100)


@pipeline.transform()
def even(number):
    return {"kind": "even", "value": number}


@pipeline.transform()
def odd(number):
    return {"kind": "odd", "value": number}


pipeline.connect("numbers", "even")
pipeline.connect("numbers", "odd")

# Fan-in: both branches into one sink.
pipeline.add(
    "sink", "write", JsonLinesSink(path=param("output")), after=["even", "odd"]
)

# Fan-out with a filter: the large results of "odd" also go to "copy".
pipeline.add(
    "sink",
    "copy",
    JsonLinesSink(path=param("copies")),
    after={"odd": lambda result: result["value"] > 90},
)
"""


def read_lines(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_route_fan_in_and_filter(tmp_path: Path, write_pipeline) -> None:
    pipeline = write_pipeline(GRAPH)

    result = run_engine("run", str(pipeline), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    written = read_lines(tmp_path / "out.jsonl")
    assert sorted(item["value"] for item in written) == list(range(100))
    assert all((item["value"] % 2 == 0) == (item["kind"] == "even") for item in written)
    copies = read_lines(tmp_path / "copies.jsonl")
    assert sorted(item["value"] for item in copies) == [91, 93, 95, 97, 99]


HOOKS = """
import os
from pathlib import Path

from engine import Pipeline

pipeline = Pipeline("hooks", params={"log": "hooks.log"})


def open_log(ctx):
    log = Path(ctx.params["log"]).open("a")
    log.write(f"setup {ctx.node} {os.getpid()} {ctx.process_index}\\n")
    log.flush()
    return log


def close_log(ctx):
    ctx.state.write(f"teardown {ctx.node} {os.getpid()}\\n")
    ctx.state.close()


@pipeline.source()
def numbers():
    yield from range(400)


@pipeline.transform(
    after="numbers", processes=2, batch_size=5, setup=open_log, teardown=close_log
)
def tag(number, ctx):
    ctx.state.write(f"item {ctx.node} {os.getpid()}\\n")
    return os.getpid()


@pipeline.sink(after="tag")
def discard(pid):
    pass
"""


def test_hooks_run_once_per_process(tmp_path: Path, write_pipeline) -> None:
    pipeline = write_pipeline(HOOKS)

    result = run_engine("run", str(pipeline), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in (tmp_path / "hooks.log").read_text().splitlines()]
    setups = [line for line in lines if line[0] == "setup"]
    teardowns = [line for line in lines if line[0] == "teardown"]
    items = [line for line in lines if line[0] == "item"]
    assert len(setups) == 2
    assert len(teardowns) == 2
    assert {line[2] for line in setups} == {line[2] for line in teardowns}
    assert sorted(line[3] for line in setups) == ["0", "1"]
    assert len(items) == 400
    assert {line[2] for line in items} <= {line[2] for line in setups}
    assert str(result.args) not in {line[2] for line in setups}


CLOSURES = """
from engine import Pipeline, param
from nodes import JsonLinesSink

pipeline = Pipeline("closures", params={"output": "out.jsonl", "factor": 3})


def make_multiplier(factor):
    def multiply(number):
        return number * factor
    return multiply


@pipeline.source()
def numbers(ctx):
    yield from range(10)


pipeline.transform("times", after="numbers")(make_multiplier(5))
pipeline.transform("plus", after="times")(lambda number: number + 1)


@pipeline.transform(after="plus", batched=True)
def scale(numbers, ctx):
    return [number * ctx.params["factor"] for number in numbers]


pipeline.add("sink", "write", JsonLinesSink(path=param("output")), after="scale")
"""


def test_closures_lambdas_and_batches_run(tmp_path: Path, write_pipeline) -> None:
    pipeline = write_pipeline(CLOSURES)

    result = run_engine("run", str(pipeline), "-p", "factor=2", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    written = sorted(read_lines(tmp_path / "out.jsonl"))
    assert written == sorted((n * 5 + 1) * 2 for n in range(10))


BAD_ROUTES = """
from engine import Pipeline, param
from nodes import JsonLinesSink

pipeline = Pipeline("routes", params={"output": "out.jsonl"})


def pick(number):
    # Neither the number for 1 nor the nested list for 2 is a node name.
    return {1: 7, 2: [["write"]]}.get(number, "write")


@pipeline.source(route=pick, retries=0)
def numbers():
    yield from range(4)


pipeline.add("sink", "write", JsonLinesSink(path=param("output")), after="numbers")
"""


def test_route_non_name_fails_item(tmp_path: Path, write_pipeline) -> None:
    pipeline = write_pipeline(BAD_ROUTES)

    result = run_engine("run", str(pipeline), cwd=tmp_path)

    assert result.returncode == 3, result.stderr
    assert sorted(read_lines(tmp_path / "out.jsonl")) == [0, 3]
    listed = run_engine("fail-queue", "list", "routes.numbers", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "route of node 'numbers' returned 7; expected a node name" in listed.stdout
    assert "route of node 'numbers' returned [['write']]" in listed.stdout


RETURNING_SOURCE = """
from engine import Pipeline, param
from nodes import JsonLinesSink

pipeline = Pipeline("returning", params={"output": "out.jsonl"})


@pipeline.source()
def numbers():
    # The yield makes this a generator, so the list ends it unpublished.
    if False:
        yield 0
    return [1, 2, 3]


pipeline.add("sink", "write", JsonLinesSink(path=param("output")), after="numbers")
"""


def test_source_returning_value_warns(tmp_path: Path, write_pipeline) -> None:
    pipeline = write_pipeline(RETURNING_SOURCE)

    result = run_engine("run", str(pipeline), cwd=tmp_path)

    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "source returning.numbers#1 returned list from its generator" in output
    assert "yield the items instead" in output


# A route that drops the multiples of 3, and an edge filter that passes
# only the even results of "half" on to the sink.
DROPPING = """
from engine import Pipeline, param
from nodes import JsonLinesSink

pipeline = Pipeline("dropping", params={"output": "out.jsonl"})


def keep_some(number):
    return None if number % 3 == 0 else "half"


@pipeline.source(route=keep_some)
def numbers():
    yield from range(30)


@pipeline.transform(after="numbers")
def half(number):
    return number


pipeline.add(
    "sink",
    "write",
    JsonLinesSink(path=param("output")),
    after={"half": lambda number: number % 2 == 0},
)
"""


def summary_counts(stdout: str, node: str) -> tuple[int, int]:
    """Return the in and out columns of `node` in the run summary."""
    for line in stdout.splitlines():
        fields = line.split()
        if fields[:1] == [node]:
            return int(fields[2].replace(",", "")), int(fields[3].replace(",", ""))
    raise AssertionError(f"no summary row for {node!r} in: {stdout}")


def test_dropped_results_not_counted_out(tmp_path: Path, write_pipeline) -> None:
    pipeline = write_pipeline(DROPPING)

    result = run_engine("run", str(pipeline), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    kept = [n for n in range(30) if n % 3 != 0]
    written = sorted(read_lines(tmp_path / "out.jsonl"))
    assert written == [n for n in kept if n % 2 == 0]
    assert summary_counts(result.stdout, "numbers") == (0, len(kept))
    assert summary_counts(result.stdout, "half") == (len(kept), len(written))
    assert summary_counts(result.stdout, "write") == (len(written), 0)
