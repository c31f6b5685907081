"""Tests of `NodeContext` and `param`, the run state passed to node functions."""

from __future__ import annotations

from typing import Any

import pytest

from engine.context import NodeContext, Param, param
from engine.errors import ParameterError


@pytest.fixture
def context() -> NodeContext:
    return NodeContext(
        pipeline="wordcount",
        node="store",
        params={"output": "counts.db", "lines": 10},
    )


def test_param_returns_placeholder() -> None:
    assert param("output") == Param("output")


@pytest.mark.parametrize("name", ["", None, 3])
def test_param_rejects_invalid_name(name: Any) -> None:
    with pytest.raises(ParameterError, match=f"invalid parameter name {name!r}"):
        param(name)


def test_resolve_param_returns_run_value(context: NodeContext) -> None:
    assert context.resolve(param("output")) == "counts.db"
    assert context.resolve(param("lines")) == 10


@pytest.mark.parametrize("value", ["counts.db", 0, None, ["output"], {"a": 1}])
def test_resolve_plain_value_unchanged(context: NodeContext, value: Any) -> None:
    assert context.resolve(value) is value


def test_resolve_missing_param_lists_known(context: NodeContext) -> None:
    with pytest.raises(ParameterError) as excinfo:
        context.resolve(param("input"))

    message = str(excinfo.value)
    assert "missing run parameter 'input' for node 'store'" in message
    assert "pass it with -p input=VALUE" in message
    assert "known parameters: 'lines', 'output'" in message


def test_resolve_missing_param_without_params() -> None:
    context = NodeContext(pipeline="wordcount", node="store", params={})

    with pytest.raises(ParameterError, match="known parameters: none"):
        context.resolve(param("output"))


def test_context_defaults_single_process() -> None:
    context = NodeContext(pipeline="wordcount", node="store", params={})

    assert context.process_index == 0
    assert context.process_count == 1
    assert context.state is None
    assert context.item_ids == []


def test_context_item_ids_not_shared() -> None:
    first = NodeContext(pipeline="wordcount", node="read", params={})
    second = NodeContext(pipeline="wordcount", node="store", params={})

    first.item_ids.append("read:0")

    assert second.item_ids == []
