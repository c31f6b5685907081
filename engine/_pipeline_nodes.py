"""The nodes of a pipeline: their settings, specs and edges.

`NodeSettings` contains a node's batching, processes, retries and
supervision, and checks them. The functions below `NodeSpec` check the shape of a
declared node: its name, its `after=` and the signature of its function.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from engine.errors import PipelineError

NodeKind = Literal["source", "transform", "sink"]

# The maximum number of processes of one node type in a pipeline, a start-node
# request or a scale request. A worker forks a process for each.
MAX_PROCESSES = 1000

NODE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


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
        if self.processes > MAX_PROCESSES:
            raise PipelineError(
                f"invalid processes={self.processes!r} for node {node!r}: "
                f"processes must be from 1 to {MAX_PROCESSES}, because a worker "
                "forks a process for each"
            )
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
