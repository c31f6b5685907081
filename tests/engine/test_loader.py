"""Tests of `load_pipeline`, which runs a pipeline file and returns its pipeline."""

from __future__ import annotations

import sys
import textwrap
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import cloudpickle
import pytest

from engine.errors import PipelineError
from engine.loader import load_pipeline
from engine.pipeline import Pipeline

LoadText = Callable[..., Pipeline]

ONE_PIPELINE = """
from engine import Pipeline

pipeline = Pipeline("solo")

@pipeline.source
def read():
    yield from range(3)

@pipeline.sink(after="read")
def store(item):
    pass
"""

TWO_PIPELINES = """
from engine import Pipeline

first = Pipeline("first")
second = Pipeline("second")
"""


@pytest.fixture
def load_pipeline_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[LoadText]:
    """Yield `load(text, name=None, filename="pipe.py")`, which writes a file in
    tmp_path and loads it. The modules it imports are removed after the test.
    """
    monkeypatch.setattr(sys, "path", list(sys.path))
    modules_before = set(sys.modules)
    by_value_before = cloudpickle.list_registry_pickle_by_value()

    def load(text: str, name: str | None = None, filename: str = "pipe.py") -> Pipeline:
        path = tmp_path / filename
        path.write_text(textwrap.dedent(text))
        return load_pipeline(path, name)

    yield load

    for module_name in cloudpickle.list_registry_pickle_by_value() - by_value_before:
        cloudpickle.unregister_pickle_by_value(types.ModuleType(module_name))
    for module_name in set(sys.modules) - modules_before:
        module_file = getattr(sys.modules[module_name], "__file__", None) or ""
        if module_file.startswith(str(tmp_path.resolve())):
            del sys.modules[module_name]


def test_load_pipeline_returns_only_pipeline(load_pipeline_text: LoadText) -> None:
    pipeline = load_pipeline_text(ONE_PIPELINE)

    assert pipeline.name == "solo"
    assert list(pipeline.nodes) == ["read", "store"]


def test_load_pipeline_accepts_str_path(
    load_pipeline_text: LoadText, tmp_path: Path
) -> None:
    load_pipeline_text(ONE_PIPELINE)

    assert load_pipeline(str(tmp_path / "pipe.py")).name == "solo"


def test_load_pipeline_several_needs_name(load_pipeline_text: LoadText) -> None:
    with pytest.raises(PipelineError) as excinfo:
        load_pipeline_text(TWO_PIPELINES)

    message = str(excinfo.value)
    assert "pipe.py' defines several pipelines ('first', 'second')" in message
    assert "choose one with --pipeline NAME" in message


def test_load_pipeline_selects_by_name(load_pipeline_text: LoadText) -> None:
    assert load_pipeline_text(TWO_PIPELINES, name="second").name == "second"


def test_load_pipeline_unknown_name_rejected(load_pipeline_text: LoadText) -> None:
    with pytest.raises(PipelineError, match="no Pipeline named 'third' in"):
        load_pipeline_text(TWO_PIPELINES, name="third")


def test_load_pipeline_unknown_name_lists_known(
    load_pipeline_text: LoadText,
) -> None:
    with pytest.raises(PipelineError, match="'first', 'second'"):
        load_pipeline_text(TWO_PIPELINES, name="third")


def test_load_pipeline_without_pipeline_rejected(
    load_pipeline_text: LoadText, tmp_path: Path
) -> None:
    with pytest.raises(PipelineError) as excinfo:
        load_pipeline_text("VALUE = 1\n")

    message = str(excinfo.value)
    assert f"no Pipeline found in {str(tmp_path / 'pipe.py')!r}" in message
    assert "pipeline = Pipeline('wordcount')" in message


def test_load_pipeline_alias_counts_once(load_pipeline_text: LoadText) -> None:
    text = ONE_PIPELINE + "\nalias = pipeline\n"

    assert load_pipeline_text(text).name == "solo"


def test_load_pipeline_wraps_file_exception(
    load_pipeline_text: LoadText, tmp_path: Path
) -> None:
    with pytest.raises(PipelineError) as excinfo:
        load_pipeline_text("raise ValueError('input folder is empty')\n")

    message = str(excinfo.value)
    assert f"pipeline file {str(tmp_path / 'pipe.py')!r}" in message
    assert "raised ValueError: input folder is empty" in message
    assert isinstance(excinfo.value.__cause__, ValueError)


def test_load_pipeline_wraps_syntax_error(load_pipeline_text: LoadText) -> None:
    with pytest.raises(PipelineError, match="raised SyntaxError"):
        load_pipeline_text("def broken(:\n")


def test_load_pipeline_passes_pipeline_error_through(
    load_pipeline_text: LoadText,
) -> None:
    text = ONE_PIPELINE + "\npipeline.add('sink', 'store', store)\n"

    with pytest.raises(PipelineError) as excinfo:
        load_pipeline_text(text)

    message = str(excinfo.value)
    assert message.startswith("duplicate node name 'store' in pipeline 'solo'")
    assert "pipeline file" not in message
    assert excinfo.value.__cause__ is None


def test_load_pipeline_puts_folder_on_path(
    load_pipeline_text: LoadText, tmp_path: Path
) -> None:
    (tmp_path / "sibling_helpers.py").write_text(
        "def triple(item):\n    return 3 * item\n"
    )
    text = "from sibling_helpers import triple\n" + ONE_PIPELINE

    pipeline = load_pipeline_text(text)

    assert pipeline.name == "solo"
    assert str(tmp_path.resolve()) in sys.path


def test_load_pipeline_rejects_non_python_file(
    load_pipeline_text: LoadText,
) -> None:
    with pytest.raises(PipelineError, match="expected a Python file ending in .py"):
        load_pipeline_text(ONE_PIPELINE, filename="pipe.txt")


def test_load_pipeline_missing_file_named(tmp_path: Path) -> None:
    path = tmp_path / "absent.py"

    with pytest.raises(PipelineError) as excinfo:
        load_pipeline(path)

    message = str(excinfo.value)
    assert repr(str(path)) in message
    assert "FileNotFoundError" in message


def test_load_pipeline_functions_pickle_by_value(
    load_pipeline_text: LoadText,
) -> None:
    text = ONE_PIPELINE + "\ndef shout(item):\n    return item.upper()\n"
    pipeline = load_pipeline_text(text)
    module = sys.modules[pipeline.nodes["read"].function.__module__]
    body = cloudpickle.dumps(module.shout)

    # By reference, loading would import the module again, which no longer
    # exists under its name.
    del sys.modules[module.__name__]
    shout = cloudpickle.loads(body)

    assert shout("abc") == "ABC"
