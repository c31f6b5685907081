"""The four-stage example: append "18", drop letters, multiply by 7, prefix "test ".

A source generates strings of letters and digits; each stage is one node
process; a sink writes the results as JSON lines, and the run ends by
checking every result against the same four steps done in plain Python.

    engine run examples/basic.py
    engine run examples/basic.py -p count=5000 -p output=basic.jsonl
"""

import json
import random
import string
from collections import Counter
from pathlib import Path

from engine import ParameterError, Pipeline, param
from nodes import JsonLinesSink

pipeline = Pipeline("basic", params={"count": 1000, "seed": 7, "output": "basic.jsonl"})


def generate(count: int, seed: int) -> list[str]:
    """Return `count` strings of letters and digits, the same for the same seed."""
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits
    return ["".join(rng.choices(alphabet, k=rng.randint(1, 8))) for _ in range(count)]


def append_18(text: str) -> str:
    return text + "18"


def drop_letters(text: str) -> str:
    return "".join(ch for ch in text if not ch.isalpha())


def multiply_by_7(text: str) -> int:
    return int(text) * 7


def prefix_test(number: int) -> str:
    return f"test {number}"


def expected_results(count: int, seed: int) -> Counter:
    """Return the results the pipeline must produce, computed in one process."""
    return Counter(
        prefix_test(multiply_by_7(drop_letters(append_18(text))))
        for text in generate(count, seed)
    )


@pipeline.check_params
def check_count(params: dict) -> None:
    if params["count"] < 0:
        raise ParameterError(
            f"invalid count={params['count']!r}: expected 0 or more strings"
        )


@pipeline.on_start
def remove_old_output(params: dict) -> None:
    Path(params["output"]).unlink(missing_ok=True)


@pipeline.source()
def strings(ctx):
    yield from generate(ctx.params["count"], ctx.params["seed"])


pipeline.transform("append", after="strings")(append_18)
pipeline.transform("drop", after="append")(drop_letters)
pipeline.transform("multiply", after="drop")(multiply_by_7)
pipeline.transform("prefix", after="multiply")(prefix_test)
pipeline.add("sink", "write", JsonLinesSink(path=param("output")), after="prefix")


@pipeline.on_complete
def check_results(params: dict) -> None:
    lines = Path(params["output"]).read_text().splitlines()
    results = Counter(json.loads(line) for line in lines)
    expected = expected_results(params["count"], params["seed"])
    if results != expected:
        missing = sum((expected - results).values())
        extra = sum((results - expected).values())
        raise AssertionError(
            f"basic pipeline results differ from the expected ones: {missing} "
            f"missing, {extra} unexpected, in {params['output']}"
        )
    print(f"all {len(lines)} results match the expected ones")
