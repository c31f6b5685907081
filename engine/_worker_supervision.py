"""The node lifecycle of a worker: start, stop, exits and the restart budget.

A node process that dies is restarted with exponential backoff, at most
`max_restarts` times in `restart_window_s` seconds; past that budget the
node fails.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from typing import Any

import psutil

from engine import protocol as mmop
from engine._worker_nodes import (
    _PROCESSES,
    ManagedNode,
    NodeState,
    _kill_tree,
    _process_index,
    _psutil_process,
)
from engine.errors import EngineError, RecipeError
from engine.forkserver import start_forkserver
from engine.recipe import read_header
from engine.runtime import (
    BATCH_IN_FLIGHT,
    COUNTER_NAMES,
    COUNTER_SLOTS,
    IN_FLIGHT_BYTES,
    NodeLaunch,
    SharedFlag,
    node_main,
)
from engine.streams import is_requeued_by_broker, open_stream, sqlite_file

# Every log line of the worker names `engine.worker`, whichever part writes it.
logger = logging.getLogger("engine.worker")

# Restart backoff: 0.1 s, 0.2 s, 0.4 s ... at most 10 s.
RESTART_BACKOFF_S = 0.1
MAX_RESTART_BACKOFF_S = 10.0
# How long the recovery after a node's death waits for a locked SQLite
# stream. The worker's loop, and so its heartbeats, wait meanwhile, so this
# stays well below the master's default worker timeout of 10 s.
RECOVER_BUSY_RETRY_S = 2.0


class NodeSupervisionMixin:
    """The node lifecycle of `Worker`: launches, exits, restarts and stops.

    Its methods use the state that `Worker.__init__` sets.
    """

    def start_node(
        self, node_id: str, node_type: str, recipe: bytes, resume: bool = False
    ) -> None:
        """Start a process for `node_id` from its serialized recipe.

        `resume` is True when a process of this node started before on another
        worker, so that a source resumes after the items it published.
        """
        if node_id in self.nodes and self.nodes[node_id].state not in (
            NodeState.COMPLETED,
            NodeState.STOPPED,
            NodeState.FAILED,
        ):
            logger.warning("node %s already runs here; START-NODE ignored", node_id)
            return
        try:
            header = read_header(recipe)
        except RecipeError as exc:
            self._send(
                mmop.NodeStartFailed(
                    worker_id=self.worker_id,
                    node_id=node_id,
                    node_type=node_type,
                    reason=str(exc),
                )
            )
            return
        node = ManagedNode(
            node_id=node_id,
            node_type=node_type,
            recipe=recipe,
            header=header,
            process_index=_process_index(node_id),
            complete=SharedFlag(self.context),
            counters=self.context.RawArray("q", COUNTER_SLOTS),
            in_flight=self.context.RawArray("c", IN_FLIGHT_BYTES),
            has_started=resume,
        )
        if node_type in self.completing_types:
            node.complete.set()
        self.nodes[node_id] = node
        if self.is_shutting_down:
            return
        self._launch(node)

    def _launch(self, node: ManagedNode) -> None:
        reader, writer = self.context.Pipe(duplex=False)
        launch = NodeLaunch(
            node_id=node.node_id,
            worker_id=self.worker_id,
            recipe=node.recipe,
            stream_url=self.stream_url or "",
            process_index=node.process_index,
            process_count=int(node.header.settings.get("processes", 1)),
            log_level=self.log_level,
            log_format=self.log_format,
            crash_counts=dict(self.crash_counts.get(node.node_type, {})),
            last_crash=node.last_crash,
            resume_position=node.has_started,
        )
        process = self.context.Process(
            target=node_main,
            args=(launch, writer, node.complete, node.counters, node.in_flight),
            name=f"{self.worker_id}/{node.node_id}",
        )
        # Starts the forkserver again if it died, with SIGTERM blocked in it.
        start_forkserver(self.stream_url)
        process.start()
        writer.close()
        with contextlib.suppress(psutil.Error):
            # A handle from before the exit, so that `_kill_orphan` can tell
            # this process from a later one with the same PID.
            _psutil_process(process.pid)
        node.process = process
        node.status = reader
        node.outcome = None
        node.state = NodeState.STARTING
        logger.debug("node %s starting pid=%d", node.node_id, process.pid)

    def stop_node(self, node_id: str) -> None:
        """Drain and stop one node: it finishes its batch and is not restarted."""
        node = self.nodes.get(node_id)
        if node is None:
            logger.warning("STOP-NODE for unknown node %s ignored", node_id)
            return
        node.is_stop_requested = True
        node.restart_at = None
        if node.is_alive:
            node.state = NodeState.DRAINING
            os.kill(node.pid, signal.SIGTERM)
        elif node.state == NodeState.RESTARTING:
            self._finish(node, NodeState.STOPPED, ("stopped", self._stats(node)))

    def complete_type(self, node_type: str) -> None:
        """Let the nodes of `node_type` finish once their inputs are drained."""
        self.completing_types.add(node_type)
        for node in self.nodes.values():
            if node.node_type == node_type:
                node.complete.set()

    def begin_shutdown(self, drain_timeout_s: float) -> None:
        """Drain every node, then stop; kill what remains after the timeout."""
        if self.is_shutting_down:
            return
        self.is_shutting_down = True
        self.drain_deadline = time.monotonic() + drain_timeout_s
        for node in self.nodes.values():
            node.restart_at = None
            if node.is_alive:
                node.state = NodeState.DRAINING
                with contextlib.suppress(ProcessLookupError):
                    os.kill(node.pid, signal.SIGTERM)
            elif node.state == NodeState.RESTARTING:
                node.state = NodeState.STOPPED

    def _stop_nodes_after_failure(self) -> None:
        for node in self._alive_nodes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(node.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.drain_timeout_s
        for node in self._alive_nodes():
            node.process.join(max(0.0, deadline - time.monotonic()))
        self._kill_all()

    def _kill_all(self) -> None:
        for node in self._alive_nodes():
            _kill_tree(node.pid)

    def _read_status(self, node: ManagedNode) -> None:
        if node.status is None:
            return
        try:
            while node.status.poll():
                report = node.status.recv()
                if report[0] == "started":
                    node.state = NodeState.RUNNING
                    node.has_started = True
                    logger.info(
                        "node %s started pid=%d", node.node_id, node.process.pid
                    )
                    self._send(
                        mmop.NodeStarted(
                            worker_id=self.worker_id,
                            node_id=node.node_id,
                            node_type=node.node_type,
                            pid=node.process.pid,
                        )
                    )
                else:
                    node.outcome = report
        except (EOFError, OSError):
            node.status.close()
            node.status = None

    def _on_exit(self, node: ManagedNode) -> None:
        process = node.process
        process.join()
        self._kill_orphan(node, process.pid)
        self._read_status(node)
        node.process = None
        if node.status is not None:
            node.status.close()
            node.status = None
        recovered = self._recover(node, process.pid)
        outcome = node.outcome or ("crashed", "")
        kind = outcome[0]
        exit_text = _describe_exit(process.exitcode)
        is_stopping = self.is_shutting_down or node.is_stop_requested
        if kind == "completed":
            logger.info("node %s completed %s", node.node_id, _format_stats(outcome[1]))
            self._finish(node, NodeState.COMPLETED, outcome)
        elif kind == "stopped" and is_stopping:
            logger.info("node %s stopped %s", node.node_id, _format_stats(outcome[1]))
            self._finish(node, NodeState.STOPPED, outcome)
        elif kind == "recipe-failed":
            logger.error("node %s cannot start: %s", node.node_id, outcome[1])
            node.last_error = outcome[1]
            node.state = NodeState.FAILED
            self._send(
                mmop.NodeStartFailed(
                    worker_id=self.worker_id,
                    node_id=node.node_id,
                    node_type=node.node_type,
                    reason=outcome[1],
                )
            )
        elif kind == "recycle" and is_stopping:
            # It settled its batch before it exited, as a drain would.
            logger.info(
                "node %s stopped: it was due for recycling (%s) while stopping",
                node.node_id,
                outcome[1],
            )
            self._finish(node, NodeState.STOPPED, ("stopped", self._stats(node)))
        elif kind == "recycle":
            logger.info("node %s recycled: %s", node.node_id, outcome[1])
            self._launch(node)
        elif is_stopping:
            logger.warning(
                "node %s exited while draining (%s)", node.node_id, exit_text
            )
            self._finish(node, NodeState.STOPPED, ("stopped", self._stats(node)))
        else:
            if kind == "error":
                node.last_error = outcome[1]
            elif kind == "stopped":
                # A SIGTERM from elsewhere, such as the kernel's when the
                # forkserver died: the node drained, but its task goes on.
                node.last_error = (
                    "node process drained and exited on a SIGTERM that its "
                    "worker did not send"
                )
            else:
                node.last_error = f"node process exited ({exit_text})"
            is_repeated = self._count_crash(node, exit_text)
            self._restart_or_give_up(
                node, process.exitcode, recovered, is_budgeted=not is_repeated
            )

    def _kill_orphan(self, node: ManagedNode, pid: int) -> None:
        """Kill a node process that outlived its forkserver.

        The worker learns a node's exit from its forkserver, so when the
        forkserver dies every node looks exited, and is restarted, while it
        may still drain its batch.
        """
        # Popped, so that a later process with this PID gets a handle of its own.
        handle = _PROCESSES.pop(pid, None)
        try:
            if handle is None or not handle.is_running():
                return
            if handle.status() == psutil.STATUS_ZOMBIE:
                return
            # SIGKILL cannot be caught, so the process runs no more code.
            handle.kill()
        except psutil.NoSuchProcess:
            return
        except psutil.Error as exc:
            logger.warning("killing node %s pid=%d failed: %s", node.node_id, pid, exc)
            return
        logger.warning(
            "node %s pid=%d outlived its forkserver; killed it", node.node_id, pid
        )

    def _count_crash(self, node: ManagedNode, exit_text: str) -> bool:
        """Count a death against the item that was in flight, if any.

        Returns True when that item had killed a process of this node type
        before: it goes to the fail queue after `retries + 1` deaths, so its
        further deaths are bounded without the restart budget.
        """
        item_id = node.in_flight.value.decode("utf-8", "replace")
        node.in_flight.value = b""
        if not item_id:
            return False
        counts = self.crash_counts.setdefault(node.node_type, {})
        counts[item_id] = counts.get(item_id, 0) + 1
        node.last_crash = exit_text
        if item_id == BATCH_IN_FLIGHT:
            logger.warning(
                "node %s died (%s) while processing a batch; its redelivered "
                "batches are taken one item at a time from now on",
                node.node_id,
                exit_text,
            )
            # Every batch may kill a process, so these deaths stay budgeted.
            return False
        logger.warning(
            "node %s died (%s) while processing item %s; deaths with this item: %d",
            node.node_id,
            exit_text,
            item_id,
            counts[item_id],
        )
        return counts[item_id] > 1

    def _restart_or_give_up(
        self,
        node: ManagedNode,
        exitcode: int | None,
        recovered: int,
        is_budgeted: bool = True,
    ) -> None:
        """Restart a crashed node process with backoff, or fail the node.

        A restart that `is_budgeted` counts against the node's budget of
        `max_restarts` within `restart_window_s`. The others, after a death
        with an item that killed a process before, restart without counting,
        so that a few poison items reach the fail queue instead of failing
        the node.
        """
        settings = node.header.settings
        max_restarts = int(settings.get("max_restarts", 5))
        window_s = float(settings.get("restart_window_s", 60.0))
        now = time.monotonic()
        while node.restart_times and now - node.restart_times[0] > window_s:
            node.restart_times.popleft()

        if is_budgeted and len(node.restart_times) >= max_restarts:
            logger.error(
                "node %s failed: %d restarts within %.0f s; giving up. Last error: %s",
                node.node_id,
                len(node.restart_times),
                window_s,
                node.last_error,
            )
            self._send_exited(node, exitcode, restart_in_s=None)
            node.state = NodeState.FAILED
            self._send(
                mmop.NodeFailed(
                    worker_id=self.worker_id,
                    node_id=node.node_id,
                    node_type=node.node_type,
                    reason=node.last_error,
                    stats=self._stats(node),
                )
            )
            return

        backoff_s = min(
            RESTART_BACKOFF_S * 2 ** len(node.restart_times), MAX_RESTART_BACKOFF_S
        )
        if is_budgeted:
            node.restart_times.append(now)
            budget = (
                f"restart {len(node.restart_times)} of {max_restarts} in "
                f"{window_s:.0f} s"
            )
        else:
            budget = "not counted against the restart budget: a repeated poison item"
        node.restarts += 1
        node.restart_at = now + backoff_s
        node.state = NodeState.RESTARTING
        logger.warning(
            "node %s exited (%s); restarting in %.1f s (%s); "
            "%d pulled messages made visible again",
            node.node_id,
            _describe_exit(exitcode),
            backoff_s,
            budget,
            recovered,
        )
        self._send_exited(node, exitcode, restart_in_s=backoff_s)

    def _send_exited(
        self, node: ManagedNode, exitcode: int | None, restart_in_s: float | None
    ) -> None:
        """Report NODE-EXITED; `restart_in_s` is None when no restart follows."""
        is_signal = exitcode is not None and exitcode < 0
        self._send(
            mmop.NodeExited(
                worker_id=self.worker_id,
                node_id=node.node_id,
                node_type=node.node_type,
                exit_code=None if is_signal else exitcode,
                signal=-exitcode if is_signal else None,
                will_restart=restart_in_s is not None,
                restart_in_s=restart_in_s or 0.0,
            )
        )

    def _finish(self, node: ManagedNode, state: NodeState, outcome: tuple) -> None:
        node.state = state
        stats = outcome[1] if len(outcome) > 1 and isinstance(outcome[1], dict) else {}
        message_type = mmop.NodeCompleted if state == NodeState.COMPLETED else None
        message_type = message_type or mmop.NodeStopped
        self._send(
            message_type(
                worker_id=self.worker_id,
                node_id=node.node_id,
                node_type=node.node_type,
                stats=stats or self._stats(node),
            )
        )

    def _recover(self, node: ManagedNode, pid: int) -> int:
        """Make what the dead process `pid` pulled visible to the other nodes."""
        owner = f"{node.node_id}@{pid}"
        # Connecting to a broker that is down would stall this loop, and its
        # heartbeats, for every connection attempt, only to recover nothing.
        url = self.stream_url or ""
        if is_requeued_by_broker(url):
            return 0
        options = {}
        if sqlite_file(url) is not None:
            options["busy_retry_s"] = RECOVER_BUSY_RETRY_S
        try:
            stream = open_stream(url, owner=f"{self.worker_id}", **options)
            try:
                return stream.recover(owner)
            finally:
                stream.close()
        except EngineError as exc:
            logger.warning(
                "recovering the items pulled by %s failed: %s; they become "
                "visible again when their lease expires",
                owner,
                exc,
            )
            return 0


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "unknown"
        return f"signal {-exitcode} ({name})"
    return f"exit code {exitcode}"


def _format_stats(stats: Any) -> str:
    if not isinstance(stats, dict):
        return ""
    return " ".join(f"{key}={stats.get(key)}" for key in COUNTER_NAMES)
