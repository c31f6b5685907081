"""Pipelines: the user's graph of nodes, checked before anything starts.

A pipeline file declares nodes with decorators and wires them with `after=`
or `connect`:

    pipeline = Pipeline("wordcount", params={"input": "book.txt"})

    @pipeline.source()
    def read(ctx):
        yield from read_text_chunks(ctx.params["input"])

    @pipeline.transform(after="read", processes=2)
    def count(chunk):
        return dict(Counter(chunk["text"].lower().split()))

    @pipeline.sink(after="count")
    def store(counts, ctx): ...

Queue names derive from the graph: `<pipeline>.<from>-to-<to>` for an edge and
`<pipeline>.<node>-fail` for a node's failed items.

`Pipeline` is assembled from a mixin and helpers in private modules, one
concept each: `_pipeline_nodes` (node settings, specs, edges and the checks
of a declared node) and `_pipeline_graph` (the graph's names, queues,
checks and order).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

from engine._pipeline_graph import GraphMixin
from engine._pipeline_nodes import (
    NODE_NAME,
    Edge,
    NodeKind,
    NodeSettings,
    NodeSpec,
    _bound_hook,
    _function_name,
    _normalize_after,
    _takes_context,
)
from engine.errors import ParameterError, PipelineError

__all__ = [
    "NODE_NAME",
    "PIPELINE_NAME",
    "Edge",
    "NodeKind",
    "NodeSettings",
    "NodeSpec",
    "Pipeline",
    "Serializer",
]

logger = logging.getLogger(__name__)

Serializer = Literal["json", "pickle"]

PIPELINE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class Pipeline(GraphMixin):
    """A named graph of source, transform and sink nodes."""

    def __init__(
        self,
        name: str,
        params: Mapping[str, Any] | None = None,
        serializer: Serializer = "json",
    ) -> None:
        if not isinstance(name, str) or not PIPELINE_NAME.match(name):
            raise PipelineError(
                f"invalid pipeline name {name!r}: use letters, digits, '_', '.' "
                "and '-', starting with a letter, digit or '_'"
            )
        if serializer not in ("json", "pickle"):
            raise PipelineError(
                f"invalid serializer {serializer!r} for pipeline {name!r}: "
                "expected 'json' or 'pickle'"
            )
        self.name = name
        self.serializer: Serializer = serializer
        self.params: dict[str, Any] = dict(params or {})
        self.nodes: dict[str, NodeSpec] = {}
        self.edges: list[Edge] = []
        self.param_checks: list[Callable[[dict[str, Any]], None]] = []
        self.start_hooks: list[Callable[[dict[str, Any]], None]] = []
        self.completion_hooks: list[Callable[[dict[str, Any]], None]] = []
        # The file that defined the pipeline, set by the loader. Its functions
        # travel by value, and cloudpickle replaces their file name in
        # tracebacks by "<dynamic-code>", which the node runtime puts back.
        self.source_file = ""

    def __repr__(self) -> str:
        return f"Pipeline({self.name!r}, nodes={list(self.nodes)!r})"

    # Declaring nodes.

    def source(self, name: str | None = None, **options: Any) -> Callable:
        """Declare a source node: a generator function `fn(ctx)` yielding items.

        Options are the `NodeSettings` fields plus `setup` and `teardown`.
        """
        return self._decorator("source", name, options)

    def transform(self, name: str | None = None, **options: Any) -> Callable:
        """Declare a transform node: `fn(item, ctx)` returns one result.

        Returning None drops the item; a generator function yields any number
        of results. `after=` names the upstream nodes, `route=` a function
        that picks downstream node names for each result, and `batched=True`
        makes `fn` take and return whole lists.
        """
        return self._decorator("transform", name, options)

    def sink(self, name: str | None = None, **options: Any) -> Callable:
        """Declare a sink node: `fn(item, ctx)` consumes items, places nothing.

        With `batched=True`, `fn(items, ctx)` gets the whole batch and should
        apply it atomically, because the batch is acknowledged after it returns.
        """
        return self._decorator("sink", name, options)

    def _decorator(
        self, kind: NodeKind, name: str | Callable | None, options: dict[str, Any]
    ) -> Callable:
        # Allows both `@pipeline.sink` and `@pipeline.sink(...)`.
        if callable(name):
            self.add(kind, _function_name(name), name, **options)
            return name

        def decorate(function: Callable) -> Callable:
            self.add(kind, name or _function_name(function), function, **options)
            return function

        return decorate

    def add(
        self,
        kind: NodeKind,
        name: str,
        function: Callable[..., Any],
        *,
        after: str | Iterable[str] | Mapping[str, Callable | None] | None = None,
        setup: Callable[..., Any] | None = None,
        teardown: Callable[..., Any] | None = None,
        route: Callable[[Any], Any] | None = None,
        batched: bool | None = None,
        **settings: Any,
    ) -> NodeSpec:
        """Add a node of `kind` named `name` that runs `function`.

        `function` may be an object with optional `setup(ctx)` and
        `teardown(ctx)` methods and a `batched` attribute, as the built-in
        nodes are. Raises `PipelineError` for a duplicate name, an invalid
        setting or a function of the wrong shape.
        """
        if kind not in ("source", "transform", "sink"):
            raise PipelineError(
                f"invalid node kind {kind!r}: expected source, transform or sink"
            )
        if not isinstance(name, str) or not NODE_NAME.match(name):
            raise PipelineError(
                f"invalid node name {name!r}: use letters, digits and '_', "
                "starting with a letter or '_'"
            )
        if name in self.nodes:
            raise PipelineError(
                f"duplicate node name {name!r} in pipeline {self.name!r}; "
                "give each node its own name"
            )
        if not callable(function):
            raise PipelineError(
                f"node {name!r}: expected a function or callable object, "
                f"got {function!r}"
            )
        known = set(NodeSettings.__slots__)
        unknown = sorted(set(settings) - known)
        if unknown:
            raise PipelineError(
                f"node {name!r}: unknown option {unknown[0]!r}; known options are "
                + ", ".join(
                    sorted(known | {"after", "batched", "route", "setup", "teardown"})
                )
            )
        node_settings = NodeSettings(**settings)
        node_settings.check(name)

        setup = setup or _bound_hook(function, "setup")
        teardown = teardown or _bound_hook(function, "teardown")
        for hook_name, hook in (("setup", setup), ("teardown", teardown)):
            if hook is not None and not callable(hook):
                raise PipelineError(
                    f"node {name!r}: {hook_name} must be a function taking the "
                    f"node context, got {hook!r}"
                )
        if batched is None:
            batched = bool(getattr(function, "batched", False))
        if kind == "source" and (after is not None or batched):
            raise PipelineError(
                f"source node {name!r} pulls nothing, so it takes no after= or "
                "batched=; use a transform to read from other nodes"
            )
        if kind == "sink" and route is not None:
            raise PipelineError(
                f"sink node {name!r} places nothing downstream, so it takes no "
                "route=; use a transform to choose where items go"
            )
        if route is not None and not callable(route):
            raise PipelineError(
                f"node {name!r}: route must be a function of a result returning "
                f"node names, got {route!r}"
            )

        takes_context = _takes_context(name, kind, function)
        spec = NodeSpec(
            name=name,
            kind=kind,
            function=function,
            settings=node_settings,
            setup=setup,
            teardown=teardown,
            route=route,
            is_batched=batched,
            takes_context=takes_context,
        )
        # Check the edges first, so that a rejected node leaves no trace.
        edges: list[Edge] = []
        for upstream, when in _normalize_after(name, after):
            edges.append(self._new_edge(upstream, name, when, edges))
        self.nodes[name] = spec
        self.edges.extend(edges)
        return spec

    def connect(
        self, source: str, target: str, when: Callable[[Any], bool] | None = None
    ) -> None:
        """Send the results of `source` to `target`, optionally only `when(result)`.

        Edges may name nodes declared later; `check` verifies them.
        """
        self.edges.append(self._new_edge(source, target, when))

    def _new_edge(
        self,
        source: str,
        target: str,
        when: Callable[[Any], bool] | None,
        pending: list[Edge] = (),  # type: ignore[assignment]
    ) -> Edge:
        if when is not None and not callable(when):
            raise PipelineError(
                f"edge {source!r} -> {target!r}: when= must be a function of a "
                f"result returning True or False, got {when!r}"
            )
        for edge in [*self.edges, *pending]:
            if (edge.source, edge.target) == (source, target):
                raise PipelineError(
                    f"duplicate edge {source!r} -> {target!r}; connect two nodes "
                    "once, and combine filters in one when= function"
                )
        return Edge(source, target, when)

    def check_params(
        self, function: Callable[[dict[str, Any]], None]
    ) -> Callable[[dict[str, Any]], None]:
        """Register `function(params)`, run before the pipeline starts.

        It raises `ParameterError` for an invalid parameter, which the CLI
        reports as a usage error (exit code 2) before anything starts.
        """
        self.param_checks.append(function)
        return function

    def on_start(
        self, function: Callable[[dict[str, Any]], None]
    ) -> Callable[[dict[str, Any]], None]:
        """Register `function(params)`, run once before any node starts.

        Use it to prepare the run's output, such as emptying a result table;
        it runs in the `engine run` or `engine master` process, not in the
        nodes, so a node restart never repeats it.
        """
        self.start_hooks.append(function)
        return function

    def on_complete(
        self, function: Callable[[dict[str, Any]], None]
    ) -> Callable[[dict[str, Any]], None]:
        """Register `function(params)`, run by `engine run` after the pipeline ends.

        Use it to print or check results; it runs in the `engine run` process.
        """
        self.completion_hooks.append(function)
        return function

    # Run parameters.

    def resolve_params(self, overrides: Mapping[str, str]) -> dict[str, Any]:
        """Return the declared parameters with `overrides` applied and checked.

        A value given as text is converted to the type of the declared
        default (int, float or bool). Raises `ParameterError` for an unknown
        name or a value that does not convert, then runs the `check_params`
        functions. Raises `PipelineError` when one of them raises anything
        other than `ParameterError`.
        """
        params = dict(self.params)
        for key, text in overrides.items():
            if key not in self.params:
                known = ", ".join(repr(name) for name in self.params) or "none"
                raise ParameterError(
                    f"unknown parameter {key!r} for pipeline {self.name!r}; "
                    f"known parameters are {known}"
                )
            params[key] = _convert(key, text, self.params[key])
        for check in self.param_checks:
            try:
                check(params)
            except ParameterError:
                raise
            except Exception as exc:
                # Any other exception is a bug in the check, not in the
                # command line, so it is no usage error.
                name = getattr(check, "__name__", repr(check))
                raise PipelineError(
                    f"check_params function {name!r} of pipeline {self.name!r} "
                    f"failed with {type(exc).__name__}: {exc}; fix the function, "
                    "or raise ParameterError from it for an invalid parameter"
                ) from exc
        return params


def _convert(key: str, text: str, default: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        if isinstance(default, bool):
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            number = float(text)
            # Items are JSON, which has no NaN or infinity.
            if not math.isfinite(number):
                raise ValueError(text)
            return number
        if isinstance(default, (list, dict)):
            value = json.loads(text)
            if not isinstance(value, type(default)):
                raise ValueError(text)
            return value
    except ValueError:
        raise ParameterError(
            f"invalid value {text!r} for parameter {key!r}: expected "
            f"{type(default).__name__} like the default {default!r}"
            + (" written as JSON" if isinstance(default, (list, dict)) else "")
            + (", and finite" if isinstance(default, float) else "")
        ) from None
    return text
