"""The run as a node's functions and hooks access it: `NodeContext` and `param`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.errors import ParameterError


@dataclass(frozen=True, slots=True)
class Param:
    """A placeholder for a run parameter, resolved in each node process.

    Built-in nodes take a `Param` wherever they take a value, so that a
    pipeline file can write `SQLiteSink(path=param("output"))` and leave the
    value to `engine run -p output=counts.db`.
    """

    name: str


def param(name: str) -> Param:
    """Refer to the run parameter `name`; nodes resolve it with `ctx.resolve`."""
    if not isinstance(name, str) or not name:
        raise ParameterError(f"invalid parameter name {name!r}: expected a name")
    return Param(name)


@dataclass(slots=True)
class NodeContext:
    """The run as seen from inside one node process.

    A node function takes it as its last argument when it declares one, and
    `setup` and `teardown` hooks always get it.
    """

    pipeline: str
    node: str
    params: Mapping[str, Any]
    # Index of this process among the node's processes, 0 <= index < count.
    process_index: int = 0
    process_count: int = 1
    # What the node's `setup` hook returned, for the node function to use.
    state: Any = None
    # Ids of the items that the node function is called with now: one for a
    # plain node, the whole batch for a batched one. Sinks record them to
    # skip items they applied before.
    item_ids: list[str] = field(default_factory=list)
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("node"))
    # Receives each valid `report_progress` call. The node runtime sets it to
    # store the progress in the process's shared counters; None drops it.
    progress_hook: Callable[[int, int], None] | None = None

    def report_progress(self, done: int, total: int) -> None:
        """Report how much of its input the node has read: `done` of `total`.

        The units are the node's own, such as bytes or rows. The worker's
        heartbeats carry the last report to the master, where `engine run`
        draws a progress bar and the control API shows it. A `total` of 0
        means the total is not known. Reports of several processes of one
        node are summed.

        Raises `TypeError` unless both are integers, and `ValueError` when
        one is negative or does not fit in 64 bits.
        """
        for name, value in (("done", done), ("total", total)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(
                    f"invalid {name}={value!r} for report_progress: expected an "
                    "integer, such as the number of bytes read"
                )
            if not 0 <= value < 2**63:
                raise ValueError(
                    f"invalid {name}={value} for report_progress: expected an "
                    "integer from 0 to 2**63 - 1"
                )
        if self.progress_hook is not None:
            self.progress_hook(done, total)

    def resolve(self, value: Any) -> Any:
        """Return `value`, or the run parameter it names if it is a `Param`."""
        if not isinstance(value, Param):
            return value
        try:
            return self.params[value.name]
        except KeyError:
            known = ", ".join(repr(name) for name in sorted(self.params)) or "none"
            raise ParameterError(
                f"missing run parameter {value.name!r} for node {self.node!r}; "
                f"pass it with -p {value.name}=VALUE (known parameters: {known})"
            ) from None
