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
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from engine.errors import ParameterError, PipelineError
from engine.items import source_position_key

logger = logging.getLogger(__name__)

NodeKind = Literal["source", "transform", "sink"]
Serializer = Literal["json", "pickle"]

NODE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
PIPELINE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True, slots=True)
class NodeSettings:
    """The settings of a node: batching, processes, retries and supervision."""

    batch_size: int = 100
    # Seconds to wait for a batch to fill before processing what has arrived.
    batch_timeout_s: float = 0.1
    processes: int = 1
    # Extra attempts for an item whose processing raised or killed the node
    # process, before the item goes to the fail queue.
    retries: int = 2
    # Delay before the first retry, doubled for each further one.
    retry_backoff_s: float = 0.5
    # Supervision: more than `max_restarts` restarts within
    # `restart_window_s` seconds and the worker gives up on the process.
    max_restarts: int = 5
    restart_window_s: float = 60.0
    max_memory_bytes: int | None = None

    def check(self, node: str) -> None:
        """Raise `PipelineError` naming `node` for the first invalid setting."""
        _require(self.batch_size, int, 1, node, "batch_size")
        _require(self.batch_timeout_s, (int, float), 0, node, "batch_timeout_s")
        _require(self.processes, int, 1, node, "processes")
        _require(self.retries, int, 0, node, "retries")
        _require(self.retry_backoff_s, (int, float), 0, node, "retry_backoff_s")
        _require(self.max_restarts, int, 0, node, "max_restarts")
        _require(self.restart_window_s, (int, float), 0, node, "restart_window_s")
        if self.max_memory_bytes is not None:
            _require(self.max_memory_bytes, int, 1, node, "max_memory_bytes")

    def to_json(self) -> dict[str, Any]:
        """Return the settings as a JSON object."""
        return {name: getattr(self, name) for name in self.__slots__}


def _require(
    value: object, kind: type | tuple[type, ...], minimum: float, node: str, name: str
) -> None:
    is_number = isinstance(value, kind) and not isinstance(value, bool)
    if is_number and math.isfinite(value) and value >= minimum:  # type: ignore[arg-type]
        return
    noun = "an integer" if kind is int else "a number"
    raise PipelineError(
        f"invalid {name}={value!r} for node {node!r}: {name} must be {noun} "
        f"{minimum} or more"
    )


@dataclass(frozen=True, slots=True)
class Edge:
    """A connection from one node's results to another node's input queue."""

    source: str
    target: str
    # Optional filter: the result goes along this edge only if `when(result)`.
    when: Callable[[Any], bool] | None = None


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """A declared node: its function, hooks and settings."""

    name: str
    kind: NodeKind
    function: Callable[..., Any]
    settings: NodeSettings
    setup: Callable[..., Any] | None = None
    teardown: Callable[..., Any] | None = None
    # Chooses the downstream node names for each result; None sends to all.
    route: Callable[[Any], str | Iterable[str] | None] | None = None
    # True when `function` takes the whole batch as a list.
    is_batched: bool = False
    # True when `function` takes the NodeContext as its last argument.
    takes_context: bool = True


class Pipeline:
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

    # The graph.

    def upstream(self, node: str) -> list[str]:
        """Return the names of the nodes whose results go to `node`."""
        return [edge.source for edge in self.edges if edge.target == node]

    def downstream(self, node: str) -> list[str]:
        """Return the names of the nodes that receive the results of `node`."""
        return [edge.target for edge in self.edges if edge.source == node]

    def node_type(self, node: str) -> str:
        """Return the cluster-wide type name of `node`: `<pipeline>.<node>`."""
        return f"{self.name}.{node}"

    def edge_queue(self, source: str, target: str) -> str:
        """Return the queue that carries the results of `source` to `target`."""
        return f"{self.name}.{source}-to-{target}"

    def fail_queue(self, node: str) -> str:
        """Return the queue that contains the items that failed in `node`."""
        return f"{self.name}.{node}-fail"

    def position_keys(self) -> list[str]:
        """Return the stream keys of the sources' positions, one per process."""
        return [
            source_position_key(self.node_type(name), index)
            for name, spec in self.nodes.items()
            if spec.kind == "source"
            for index in range(spec.settings.processes)
        ]

    def input_queues(self, node: str) -> list[str]:
        """Return the queues that `node` pulls from, one per incoming edge."""
        return [self.edge_queue(source, node) for source in self.upstream(node)]

    def data_queues(self) -> list[str]:
        """Return every edge queue of the pipeline, in declaration order."""
        return [self.edge_queue(edge.source, edge.target) for edge in self.edges]

    def all_queues(self) -> list[str]:
        """Return every queue of the pipeline: edge queues, then fail queues."""
        return self.data_queues() + [self.fail_queue(name) for name in self.nodes]

    def check(self) -> None:
        """Raise `PipelineError` if the graph cannot run as declared.

        Checks that edges name known nodes, that sources have no inputs and
        sinks no outputs, that every other node is connected both ways, and
        that the graph has no cycle.
        """
        if not self.nodes:
            raise PipelineError(
                f"pipeline {self.name!r} has no nodes; declare at least a source "
                "and a sink"
            )
        known = ", ".join(repr(name) for name in self.nodes)
        for edge in self.edges:
            for end in (edge.source, edge.target):
                if end not in self.nodes:
                    raise PipelineError(
                        f"edge {edge.source!r} -> {edge.target!r}: node {end!r} not "
                        f"found; known nodes are {known}"
                    )
        if not any(spec.kind == "source" for spec in self.nodes.values()):
            raise PipelineError(
                f"pipeline {self.name!r} has no source node; declare one with "
                "@pipeline.source()"
            )
        for spec in self.nodes.values():
            self._check_connections(spec)
        cycle = self._find_cycle()
        if cycle:
            path = " -> ".join(repr(name) for name in cycle)
            raise PipelineError(
                f"cycle {path} in pipeline {self.name!r}; a pipeline must be "
                f"acyclic, so remove one of these edges"
            )

    def _check_connections(self, spec: NodeSpec) -> None:
        has_inputs = bool(self.upstream(spec.name))
        has_outputs = bool(self.downstream(spec.name))
        if spec.kind == "source" and has_inputs:
            raise PipelineError(
                f"edge into source node {spec.name!r} from "
                f"{self.upstream(spec.name)[0]!r}: sources pull nothing; make "
                f"{spec.name!r} a transform"
            )
        if spec.kind == "sink" and has_outputs:
            raise PipelineError(
                f"edge from sink node {spec.name!r} to "
                f"{self.downstream(spec.name)[0]!r}: sinks place nothing "
                f"downstream; make {spec.name!r} a transform"
            )
        if spec.kind != "source" and not has_inputs:
            raise PipelineError(
                f"{spec.kind} node {spec.name!r} has no input; give it "
                "after='<upstream node>' or connect a node to it"
            )
        if spec.kind != "sink" and not has_outputs:
            raise PipelineError(
                f"{spec.kind} node {spec.name!r} sends its results nowhere; "
                "connect it to a downstream node, or make it a sink"
            )

    def _find_cycle(self) -> list[str] | None:
        state: dict[str, int] = {}  # 1 while on the current path, 2 once done
        path: list[str] = []

        def visit(node: str) -> list[str] | None:
            state[node] = 1
            path.append(node)
            for target in self.downstream(node):
                if state.get(target) == 1:
                    return path[path.index(target) :] + [target]
                if target not in state:
                    found = visit(target)
                    if found:
                        return found
            path.pop()
            state[node] = 2
            return None

        for name in self.nodes:
            if name not in state:
                found = visit(name)
                if found:
                    return found
        return None

    def topological_order(self) -> list[str]:
        """Return the node names so that each comes after its upstream nodes."""
        order: list[str] = []
        remaining = dict.fromkeys(self.nodes)
        while remaining:
            ready = [n for n in remaining if all(u in order for u in self.upstream(n))]
            if not ready:
                raise PipelineError(f"cycle in pipeline {self.name!r}")
            for name in ready:
                order.append(name)
                del remaining[name]
        return order

    # Run parameters.

    def resolve_params(self, overrides: Mapping[str, str]) -> dict[str, Any]:
        """Return the declared parameters with `overrides` applied and checked.

        A value given as text is converted to the type of the declared
        default (int, float or bool). Raises `ParameterError` for an unknown
        name or a value that does not convert, then runs the `check_params`
        functions.
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
                name = getattr(check, "__name__", repr(check))
                raise ParameterError(
                    f"check_params function {name!r} of pipeline {self.name!r} "
                    f"raised {type(exc).__name__}: {exc}"
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


def _function_name(function: Callable) -> str:
    name = getattr(function, "__name__", None) or type(function).__name__
    if name == "<lambda>":
        raise PipelineError(
            "a lambda needs a node name: pipeline.transform('name', after=...)"
            "(lambda item: ...) or pipeline.add('transform', 'name', fn)"
        )
    return name


def _bound_hook(function: Any, hook: str) -> Callable | None:
    if inspect.isroutine(function):
        return None
    return getattr(function, hook, None)


def _normalize_after(
    name: str, after: str | Iterable[str] | Mapping[str, Callable | None] | None
) -> list[tuple[str, Callable | None]]:
    if after is None:
        return []
    if isinstance(after, str):
        return [(after, None)]
    if isinstance(after, Mapping):
        return list(after.items())
    if isinstance(after, Iterable):
        names = list(after)
        if all(isinstance(item, str) for item in names):
            return [(item, None) for item in names]
    raise PipelineError(
        f"node {name!r}: after= must be a node name, a list of names or a dict "
        f"of name to filter function, got {after!r}"
    )


def _takes_context(name: str, kind: NodeKind, function: Callable) -> bool:
    """Decide whether `function` takes the NodeContext after its item argument."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return kind == "source"
    positional = [
        p
        for p in signature.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    has_varargs = any(p.kind == p.VAR_POSITIONAL for p in signature.parameters.values())
    if any(
        p.kind == p.KEYWORD_ONLY and p.default is p.empty
        for p in signature.parameters.values()
    ):
        raise _shape_error(name, kind, signature)
    required = [p for p in positional if p.default is p.empty]
    data_arguments = 0 if kind == "source" else 1
    if has_varargs or len(positional) >= data_arguments + 1:
        if len(required) > data_arguments + 1:
            raise _shape_error(name, kind, signature)
        return True
    if len(positional) == data_arguments:
        return False
    raise _shape_error(name, kind, signature)


def _shape_error(name: str, kind: NodeKind, signature: inspect.Signature) -> Exception:
    expected = {
        "source": "fn(ctx) or fn()",
        "transform": "fn(item, ctx) or fn(item)",
        "sink": "fn(item, ctx) or fn(item)",
    }[kind]
    return PipelineError(
        f"{kind} node {name!r} has the signature {signature}; expected {expected}"
    )
