"""Every MMOP message, grouped by the direction in which it travels.

Each class is registered under its wire name as it is defined, so importing
this module fills `MESSAGE_TYPES`. `docs/mmop.md` describes each message and
the conversations between the peers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.protocol.registry import (
    Message,
    _register,
    _require_at_least,
    _require_ids,
    _require_more_than_zero,
)

# Worker to master.


@_register
@dataclass(frozen=True, slots=True)
class Ready(Message):
    """A worker registers with the master, or registers again after a restart."""

    hostname: str
    pid: int
    cores: int
    memory_bytes: int
    # Set only when the worker reconnects after the master restarted.
    worker_id: str | None = None
    # One dict per running node (node_id, node_type, pid, state), set on reconnect.
    nodes: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        _require_ids(self, "hostname", "worker_id")
        _require_at_least(self, "pid", 1)
        _require_at_least(self, "cores", 1)
        _require_at_least(self, "memory_bytes", 0)


@_register
@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    """A worker's periodic sign of life, with its stats and each node's stats."""

    worker_id: str
    # Percent, with no upper bound: per-process figures summed over several
    # cores pass 100.
    cpu_percent: float
    memory_bytes: int
    # One dict per node: node_id, node_type, pid, state, items_in, items_out,
    # failures, restarts, cpu_percent, memory_bytes.
    nodes: list[dict[str, Any]]

    def __post_init__(self) -> None:
        _require_ids(self, "worker_id")
        _require_at_least(self, "cpu_percent", 0)
        _require_at_least(self, "memory_bytes", 0)


@_register
@dataclass(frozen=True, slots=True)
class NodeStarted(Message):
    """A worker started a node process."""

    worker_id: str
    node_id: str
    node_type: str
    pid: int

    def __post_init__(self) -> None:
        _require_ids(self, "worker_id", "node_id", "node_type")
        _require_at_least(self, "pid", 1)


@_register
@dataclass(frozen=True, slots=True)
class NodeStartFailed(Message):
    """A worker could not start a node process."""

    worker_id: str
    node_id: str
    node_type: str
    reason: str

    def __post_init__(self) -> None:
        _require_ids(self, "worker_id", "node_id", "node_type")


@_register
@dataclass(frozen=True, slots=True)
class NodeExited(Message):
    """A node process ended without being asked to, by an exit code or a signal."""

    worker_id: str
    node_id: str
    node_type: str
    # Exactly one of exit_code and signal is set: the exit status of a process
    # that exited, or the number of the signal that killed it.
    exit_code: int | None
    signal: int | None
    will_restart: bool
    restart_in_s: float

    def __post_init__(self) -> None:
        _require_ids(self, "worker_id", "node_id", "node_type")
        _require_at_least(self, "restart_in_s", 0)
        if (self.exit_code is None) == (self.signal is None):
            raise ValueError(
                f"invalid exit_code={self.exit_code!r} and signal={self.signal!r} "
                "for NODE-EXITED: exactly one of them must be set"
            )


@_register
@dataclass(frozen=True, slots=True)
class NodeCompleted(Message):
    """A node finished its task: its source is exhausted, or its input drained."""

    worker_id: str
    node_id: str
    node_type: str
    stats: dict[str, Any]

    def __post_init__(self) -> None:
        _require_ids(self, "worker_id", "node_id", "node_type")


@_register
@dataclass(frozen=True, slots=True)
class NodeStopped(Message):
    """A node stopped on request after draining its current batch."""

    worker_id: str
    node_id: str
    node_type: str
    stats: dict[str, Any]

    def __post_init__(self) -> None:
        _require_ids(self, "worker_id", "node_id", "node_type")


@_register
@dataclass(frozen=True, slots=True)
class NodeFailed(Message):
    """A worker gave up on a node: restart budget spent, or recipe unusable."""

    worker_id: str
    node_id: str
    node_type: str
    reason: str
    stats: dict[str, Any]

    def __post_init__(self) -> None:
        _require_ids(self, "worker_id", "node_id", "node_type")


@_register
@dataclass(frozen=True, slots=True)
class WorkerStopping(Message):
    """A worker is shutting down and will drain its nodes."""

    worker_id: str
    reason: str

    def __post_init__(self) -> None:
        _require_ids(self, "worker_id")


@_register
@dataclass(frozen=True, slots=True)
class Pong(Message):
    """The reply to `Ping`, carrying its nonce back."""

    nonce: int

    def __post_init__(self) -> None:
        _require_at_least(self, "nonce", 0)


# Master to worker.


@_register
@dataclass(frozen=True, slots=True)
class Welcome(Message):
    """The master's reply to `Ready`: the worker's id and the data stream to use."""

    worker_id: str
    # May contain the broker's password, so never log it whole.
    stream_url: str
    heartbeat_interval_s: float

    def __post_init__(self) -> None:
        _require_ids(self, "worker_id", "stream_url")
        _require_more_than_zero(self, "heartbeat_interval_s")


@_register
@dataclass(frozen=True, slots=True)
class StartNode(Message):
    """A command to a worker: start one node process from a recipe."""

    node_id: str
    node_type: str
    # cloudpickle bytes, sent as base64 and kept out of repr and logs.
    recipe: bytes = field(repr=False)
    # True when the node type is already completing: drain, then finish.
    complete: bool
    # True when a process of this node started before, on a worker since lost
    # or in the run that this one resumes: a source then resumes after the
    # items the stream records as published.
    resume: bool = False

    def __post_init__(self) -> None:
        _require_ids(self, "node_id", "node_type")


@_register
@dataclass(frozen=True, slots=True)
class StopNode(Message):
    """A command to a worker: drain one node, then stop it."""

    node_id: str

    def __post_init__(self) -> None:
        _require_ids(self, "node_id")


@_register
@dataclass(frozen=True, slots=True)
class CompleteType(Message):
    """Every upstream of a node type is done: its nodes finish once drained."""

    node_type: str

    def __post_init__(self) -> None:
        _require_ids(self, "node_type")


@_register
@dataclass(frozen=True, slots=True)
class Shutdown(Message):
    """A command to a worker: drain every node, then exit."""

    drain_timeout_s: float

    def __post_init__(self) -> None:
        _require_at_least(self, "drain_timeout_s", 0)


@_register
@dataclass(frozen=True, slots=True)
class Ping(Message):
    """A liveness probe, to which the worker replies with `Pong` and the same nonce."""

    nonce: int

    def __post_init__(self) -> None:
        _require_at_least(self, "nonce", 0)


# Client to master, and the replies.


@_register
@dataclass(frozen=True, slots=True)
class StartNodeRequest(Message):
    """A client asks the master to start more nodes of a type."""

    node_type: str
    count: int = 1

    def __post_init__(self) -> None:
        _require_ids(self, "node_type")
        _require_at_least(self, "count", 1)


@_register
@dataclass(frozen=True, slots=True)
class StartNodeRequestSucceeded(Message):
    """The ids of the started nodes, in start order."""

    node_ids: list[str]


@_register
@dataclass(frozen=True, slots=True)
class StartNodeRequestFailed(Message):
    """The master could not start the requested nodes."""

    reason: str


@_register
@dataclass(frozen=True, slots=True)
class StopWorkerRequest(Message):
    """A client asks the master to shut a worker down."""

    worker_id: str

    def __post_init__(self) -> None:
        _require_ids(self, "worker_id")


@_register
@dataclass(frozen=True, slots=True)
class StopWorkerRequestSucceeded(Message):
    """The master sent `Shutdown` to the worker."""

    worker_id: str

    def __post_init__(self) -> None:
        _require_ids(self, "worker_id")


@_register
@dataclass(frozen=True, slots=True)
class StopWorkerRequestFailed(Message):
    """The master could not stop the worker."""

    reason: str


@_register
@dataclass(frozen=True, slots=True)
class RecipeInfoRequest(Message):
    """A client asks for the node counts of every node type."""


@_register
@dataclass(frozen=True, slots=True)
class RecipeInfo(Message):
    """Node counts per node type: queued, running, completed and failed."""

    types: dict[str, dict[str, int]]


@_register
@dataclass(frozen=True, slots=True)
class WorkerInfoRequest(Message):
    """A client asks for the state of every worker."""


@_register
@dataclass(frozen=True, slots=True)
class WorkerInfo(Message):
    """Per worker id: its host, its state and its node ids by node type."""

    workers: dict[str, dict[str, Any]]


@_register
@dataclass(frozen=True, slots=True)
class Rejected(Message):
    """A reply to a message that the receiver cannot take, with the reason."""

    reason: str
