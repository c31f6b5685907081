"""The master's records of node types, nodes and workers, and their states.

The master builds these from the pipelines it loads and from the workers'
messages. `apply_node_stats` copies a worker's node counters into a record.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from engine import protocol as mmop
from engine.runtime import BATCH_DURATION_BUCKETS_S

STAT_KEYS = ("items_in", "items_out", "failures", "retries", "batches")


class NodeState(enum.Enum):
    """A node as the master counts it."""

    QUEUED = "queued"
    RUNNING = "running"
    RESTARTING = "restarting"
    COMPLETED = "completed"
    STOPPED = "stopped"
    FAILED = "failed"


class TypeState(enum.Enum):
    """A node type's progress through its task."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETING = "completing"
    COMPLETED = "completed"
    FAILED = "failed"


class WorkerState(enum.Enum):
    """A worker's state, as the master tracks it."""

    JOINED = "joined"
    STOPPING = "stopping"
    LOST = "lost"
    STOPPED = "stopped"


@dataclass(eq=False)
class NodeRecord:
    """One node process slot, across its restarts."""

    node_id: str
    node_type: str
    worker_id: str | None
    state: NodeState = NodeState.QUEUED
    pid: int | None = None
    restarts: int = 0
    # True once a process of this node reported that it started.
    has_started: bool = False
    last_error: str = ""
    stats: dict[str, int] = field(default_factory=dict)
    cpu_percent: float = 0.0
    memory_bytes: int = 0
    # The last `report_progress` of the node, in its own units; 0 of 0 when none.
    progress_done: int = 0
    progress_total: int = 0
    # Batches per bucket of BATCH_DURATION_BUCKETS_S plus one over the largest
    # bound, not cumulative, and the sum of their durations.
    batch_duration_counts: list[int] = field(
        default_factory=lambda: [0] * (len(BATCH_DURATION_BUCKETS_S) + 1)
    )
    batch_duration_sum_s: float = 0.0
    # What the node's processes on workers now gone had counted. The next
    # process of the node counts from 0, and its reports are added to these,
    # so that the node's counters never go down.
    carried_stats: dict[str, int] = field(default_factory=dict)
    carried_batch_duration_counts: list[int] = field(
        default_factory=lambda: [0] * (len(BATCH_DURATION_BUCKETS_S) + 1)
    )
    carried_batch_duration_sum_s: float = 0.0
    carried_restarts: int = 0

    def carry_counters(self) -> None:
        """Keep the counters so far before the node moves to another worker."""
        self.carried_stats = dict(self.stats)
        self.carried_batch_duration_counts = list(self.batch_duration_counts)
        self.carried_batch_duration_sum_s = self.batch_duration_sum_s
        self.carried_restarts = self.restarts


@dataclass(eq=False)
class TypeRecord:
    """A node type: its recipe, graph neighbours and nodes."""

    node_type: str
    pipeline: str
    node: str
    kind: str
    recipe: bytes
    processes: int
    upstream: list[str]
    downstream: list[str]
    input_queues: list[str]
    state: TypeState = TypeState.PENDING
    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    next_number: int = 1
    last_error: str = ""
    # The digest of the run parameters in `recipe`, from `params_digest`.
    params_digest: str = ""

    def count(self, state: NodeState) -> int:
        return sum(1 for node in self.nodes.values() if node.state == state)

    @property
    def is_done(self) -> bool:
        return self.state in (TypeState.COMPLETED, TypeState.FAILED)


@dataclass(eq=False)
class WorkerRecord:
    """A registered worker and its connection."""

    worker_id: str
    connection: mmop.Connection | None
    hostname: str
    pid: int
    cores: int
    memory_bytes: int
    state: WorkerState = WorkerState.JOINED
    last_seen: float = field(default_factory=time.monotonic)
    cpu_percent: float = 0.0
    process_memory_bytes: int = 0


def apply_node_stats(node: NodeRecord, stats: dict[str, Any]) -> None:
    """Copy the counters of a worker's node report or final stats into `node`.

    A member that is missing or of the wrong type keeps its previous value,
    so that a report from a worker of another version cannot stop the master.
    """
    for key in STAT_KEYS:
        reported = _count(stats.get(key), -1)
        if reported >= 0:
            node.stats[key] = node.carried_stats.get(key, 0) + reported
    node.progress_done = _count(stats.get("progress_done"), node.progress_done)
    node.progress_total = _count(stats.get("progress_total"), node.progress_total)
    counts = stats.get("batch_duration_counts")
    total_s = stats.get("batch_duration_sum_s")
    is_histogram = (
        isinstance(counts, list)
        and len(counts) == len(BATCH_DURATION_BUCKETS_S) + 1
        and all(_count(count, -1) >= 0 for count in counts)
        and isinstance(total_s, int | float)
        and not isinstance(total_s, bool)
        and total_s >= 0
    )
    if is_histogram:
        node.batch_duration_counts = [
            carried + int(count)
            for carried, count in zip(
                node.carried_batch_duration_counts, counts, strict=True
            )
        ]
        node.batch_duration_sum_s = node.carried_batch_duration_sum_s + float(total_s)


def _count(value: Any, default: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return default
