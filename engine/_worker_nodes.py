"""The record of a node that the worker supervises, and its OS processes.

`ManagedNode` outlives the processes of its node. The helpers keep a psutil
handle per node process, kill a process tree, and read a node's process
index from its id.
"""

from __future__ import annotations

import contextlib
import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import psutil

from engine.recipe import RecipeHeader


class NodeState(enum.Enum):
    """The life stage of a node process, as the worker tracks it."""

    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    DRAINING = "draining"
    COMPLETED = "completed"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass(eq=False)
class ManagedNode:
    """A node that this worker supervises, across restarts of its process."""

    node_id: str
    node_type: str
    recipe: bytes
    header: RecipeHeader
    process_index: int
    # Survive restarts: the completion flag, the counters and the id of the
    # item in flight, in memory shared with the node process.
    complete: Any
    counters: Any
    in_flight: Any
    state: NodeState = NodeState.STARTING
    process: Any = None
    status: Any = None
    # The last report of the current process: ("completed", stats) and so on.
    outcome: tuple | None = None
    restart_times: deque[float] = field(default_factory=deque)
    restart_at: float | None = None
    restarts: int = 0
    # True once a process of this node reported that it started, here or on a
    # worker since lost: a restarted source then resumes after its position.
    has_started: bool = False
    last_error: str = ""
    last_crash: str = ""
    is_stop_requested: bool = False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def is_alive(self) -> bool:
        return self.process is not None and self.process.exitcode is None


_PROCESSES: dict[int, psutil.Process] = {}


def _psutil_process(pid: int) -> psutil.Process:
    # psutil measures CPU between two calls on the same Process object.
    process = _PROCESSES.get(pid)
    if process is None:
        process = _PROCESSES[pid] = psutil.Process(pid)
    return process


def _kill_tree(pid: int | None) -> None:
    if pid is None:
        return
    try:
        parent = psutil.Process(pid)
        children = parent.children(recursive=True)
    except psutil.Error:
        return
    for process in [parent, *children]:
        with contextlib.suppress(psutil.Error):
            process.kill()


def _process_index(node_id: str) -> int:
    _, _, number = node_id.rpartition("#")
    return int(number) - 1 if number.isdigit() and int(number) > 0 else 0
