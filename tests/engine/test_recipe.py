"""Tests of recipes: built in this process, loaded here or in a spawned child.

The round-trip tests load the recipe in a child started with the `spawn`
method, so the child shares no memory with the test: what the node function
needs must travel inside the recipe, as it does from a master to a worker.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import queue
import sys
import textwrap
import threading
import types
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

from engine.context import NodeContext
from engine.errors import RecipeError
from engine.loader import load_pipeline
from engine.pipeline import Pipeline
from engine.recipe import (
    Output,
    build_recipe,
    load_recipe,
    params_digest,
    python_version,
    read_header,
)

CHILD_TIMEOUT_S = 60.0


def generate():
    yield 1


def consume(item):
    pass


def is_even(item):
    return item % 2 == 0


def pipeline_around(name: str, function: Any, **options: Any) -> Pipeline:
    """Return the pipeline `read` -> `name` -> `store`, with `function` as `name`."""
    pipeline = Pipeline("recipes", params=options.pop("params", None))
    pipeline.add("source", "read", generate)
    pipeline.add("transform", name, function, after="read", **options)
    pipeline.add("sink", "store", consume, after=name)
    return pipeline


def load_and_call(
    recipe: bytes, value: Any, hidden_folder: str | None, results: Any
) -> None:
    """Load `recipe` and call its node function on `value`, as the child's entry.

    Removes `hidden_folder` from `sys.path` first. Puts `("result", value)`,
    `("RecipeError", message)` or `("error", text)` on `results`.
    """
    if hidden_folder is not None:
        sys.path[:] = [entry for entry in sys.path if entry != hidden_folder]
    try:
        recipe_object = load_recipe(recipe)
        spec = recipe_object.spec
        if spec.takes_context:
            context = NodeContext(
                pipeline=recipe_object.pipeline,
                node=spec.name,
                params=recipe_object.params,
            )
            result = spec.function(value, context)
        else:
            result = spec.function(value)
        results.put(("result", result))
    except RecipeError as exc:
        results.put(("RecipeError", str(exc)))
    except Exception as exc:
        results.put(("error", f"{type(exc).__name__}: {exc}"))


def run_in_child(
    recipe: bytes, value: Any, hidden_folder: str | None = None
) -> tuple[str, Any]:
    """Run `load_and_call` in a spawned child and return the outcome it sent."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child = context.Process(
        target=load_and_call,
        args=(recipe, value, hidden_folder, results),
        name="recipe-loader",
    )
    child.start()
    try:
        return results.get(timeout=CHILD_TIMEOUT_S)
    except queue.Empty:
        pytest.fail(
            f"timed out after {CHILD_TIMEOUT_S} s waiting for the recipe-loader "
            f"child (exit code {child.exitcode})"
        )
    finally:
        child.join(timeout=CHILD_TIMEOUT_S)
        if child.is_alive():
            child.kill()
            child.join(timeout=CHILD_TIMEOUT_S)
        results.close()


@pytest.fixture
def restored_imports(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Restore sys.path, sys.modules and the cloudpickle by-value registry after
    a test loads pipeline files.
    """
    monkeypatch.setattr(sys, "path", list(sys.path))
    modules_before = set(sys.modules)
    by_value_before = cloudpickle.list_registry_pickle_by_value()

    yield

    for module_name in cloudpickle.list_registry_pickle_by_value() - by_value_before:
        cloudpickle.unregister_pickle_by_value(types.ModuleType(module_name))
    for module_name in set(sys.modules) - modules_before:
        if module_name.startswith("monomyth_pipeline_"):
            del sys.modules[module_name]


def replace_header(data: bytes, **fields: Any) -> bytes:
    """Return the recipe `data` with `fields` changed in its JSON header."""
    line, _, body = data.partition(b"\n")
    header = json.loads(line) | fields
    return json.dumps(header).encode() + b"\n" + body


# Round trips through a spawned child.


def test_recipe_closure_runs_in_child() -> None:
    factor = 3

    def multiply(item):
        return item * factor

    recipe = build_recipe(pipeline_around("multiply", multiply), "multiply", {})

    assert run_in_child(recipe, 5) == ("result", 15)


def test_recipe_lambda_runs_in_child() -> None:
    pipeline = pipeline_around("double", lambda item: item * 2)
    recipe = build_recipe(pipeline, "double", {})

    assert run_in_child(recipe, 21) == ("result", 42)


def test_recipe_params_reach_child() -> None:
    def scale(item, ctx):
        return item * ctx.params["factor"]

    pipeline = pipeline_around("scale", scale, params={"factor": 1})
    recipe = build_recipe(pipeline, "scale", {"factor": 4})

    assert run_in_child(recipe, 5) == ("result", 20)


def test_recipe_pipeline_file_runs_in_child(
    tmp_path: Path, restored_imports: None
) -> None:
    path = tmp_path / "offsets.py"
    path.write_text(
        textwrap.dedent(
            """
            from engine import Pipeline

            OFFSET = 100
            pipeline = Pipeline("offsets")

            @pipeline.source
            def read():
                yield 1

            def add_offset(item):
                return item + OFFSET

            pipeline.transform("offset", after="read")(add_offset)

            @pipeline.sink(after="offset")
            def store(item):
                pass
            """
        )
    )
    pipeline = load_pipeline(path)
    recipe = build_recipe(pipeline, "offset", {})

    outcome = run_in_child(recipe, 1, hidden_folder=str(tmp_path.resolve()))

    assert outcome == ("result", 101)


# Headers.


def test_header_read_without_unpickling() -> None:
    pipeline = pipeline_around("double", lambda item: item * 2, batch_size=7)
    line, _, _ = build_recipe(pipeline, "double", {}).partition(b"\n")

    # A body that cannot be unpickled shows that only the header line is read.
    header = read_header(line + b"\n" + b"\x80 not a pickle")

    assert header.node_type == "recipes.double"
    assert header.kind == "transform"
    assert header.python == python_version()
    assert header.settings["batch_size"] == 7
    assert header.settings == pipeline.nodes["double"].settings.to_json()
    assert header.input_queues == ["recipes.read-to-double"]
    assert header.params_digest == params_digest({})


def test_header_digest_follows_params() -> None:
    pipeline = pipeline_around("double", lambda item: item * 2)

    def digest(params: dict) -> str:
        return read_header(build_recipe(pipeline, "double", params)).params_digest

    assert digest({"a": 1, "b": "x"}) == digest({"b": "x", "a": 1})
    assert digest({"a": 1}) != digest({"a": 2})


@pytest.mark.parametrize(
    "data",
    [
        b"not json\nbody",
        b"[1, 2]\nbody",
        b'{"node_type": "recipes.double"}\nbody',
        b"",
    ],
    ids=["not-json", "not-object", "missing-fields", "empty"],
)
def test_header_rejects_invalid_line(data: bytes) -> None:
    with pytest.raises(RecipeError, match="invalid recipe header"):
        read_header(data)


def test_python_mismatch_names_both_versions() -> None:
    recipe = build_recipe(pipeline_around("double", is_even), "double", {})
    tampered = replace_header(recipe, python="2.7")

    with pytest.raises(RecipeError) as excinfo:
        load_recipe(tampered)

    message = str(excinfo.value)
    assert "recipe of node type 'recipes.double' was built with Python 2.7" in message
    assert f"this worker runs Python {python_version()}" in message
    assert "same Python minor version" in message


def test_unknown_format_rejected() -> None:
    recipe = build_recipe(pipeline_around("double", is_even), "double", {})

    with pytest.raises(RecipeError, match="format"):
        load_recipe(replace_header(recipe, format=99))


# Loading in this process.


def test_recipe_carries_queues_and_params() -> None:
    pipeline = Pipeline("fanout", serializer="pickle")
    pipeline.add("source", "read", generate)
    pipeline.add("transform", "split", is_even, after="read")
    pipeline.add("sink", "evens", consume, after={"split": is_even})
    pipeline.add("sink", "odds", consume, after="split")

    recipe = load_recipe(build_recipe(pipeline, "split", {"limit": 5}))

    assert recipe.pipeline == "fanout"
    assert recipe.node_type == "fanout.split"
    assert recipe.input_queues == ("fanout.read-to-split",)
    assert recipe.outputs == (
        Output("evens", "fanout.split-to-evens", is_even),
        Output("odds", "fanout.split-to-odds", None),
    )
    assert recipe.fail_queue == "fanout.split-fail"
    assert recipe.params == {"limit": 5}
    assert recipe.serializer == "pickle"
    assert recipe.spec.function is is_even


def test_load_rejects_body_not_recipe() -> None:
    recipe = build_recipe(pipeline_around("double", is_even), "double", {})
    line, _, _ = recipe.partition(b"\n")

    with pytest.raises(RecipeError, match="contains a int, not a Recipe"):
        load_recipe(line + b"\n" + cloudpickle.dumps(42))


def test_load_rejects_corrupt_body() -> None:
    recipe = build_recipe(pipeline_around("double", is_even), "double", {})
    line, _, _ = recipe.partition(b"\n")

    with pytest.raises(
        RecipeError,
        match="recipe of node type 'recipes.double' cannot be loaded on this worker",
    ):
        load_recipe(line + b"\n" + b"\x80\x05 truncated")


# Recipes that cannot travel.


def test_recipe_missing_module_named_in_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module_name = f"parent_only_{uuid.uuid4().hex[:12]}"
    folder = tmp_path / "parent_only"
    folder.mkdir()
    (folder / f"{module_name}.py").write_text(
        "def shout(item):\n    return item.upper()\n"
    )
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, module_name, raising=False)
    module = importlib.import_module(module_name)
    recipe = build_recipe(pipeline_around("shout", module.shout), "shout", {})

    kind, message = run_in_child(recipe, "abc", hidden_folder=str(folder))

    assert load_recipe(recipe).spec.function("abc") == "ABC"
    assert kind == "RecipeError"
    assert f"needs the module {module_name!r}" in message
    assert "install it here or move the code into the pipeline file" in message


def test_recipe_closure_over_missing_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module_name = f"parent_only_{uuid.uuid4().hex[:12]}"
    folder = tmp_path / "parent_only"
    folder.mkdir()
    (folder / f"{module_name}.py").write_text("SUFFIX = '!'\n")
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, module_name, raising=False)
    module = importlib.import_module(module_name)

    def exclaim(item):
        return item + module.SUFFIX

    recipe = build_recipe(pipeline_around("exclaim", exclaim), "exclaim", {})

    kind, message = run_in_child(recipe, "hi", hidden_folder=str(folder))

    assert kind == "RecipeError"
    assert f"needs the module {module_name!r}" in message


def test_recipe_lock_closure_rejected() -> None:
    lock = threading.Lock()

    def guarded(item):
        with lock:
            return item

    pipeline = pipeline_around("guarded", guarded)

    with pytest.raises(RecipeError) as excinfo:
        build_recipe(pipeline, "guarded", {})

    message = str(excinfo.value)
    assert "node 'guarded' cannot be serialized for the workers" in message
    assert "lock" in message
    assert "open files, connections and locks in the node's setup hook" in message
    assert isinstance(excinfo.value.__cause__, TypeError)
