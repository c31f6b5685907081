"""The worker: a process supervisor that runs the nodes the master starts.

    engine-worker                        Worker.run: the supervision loop
    ├── thread mmop-reader               frames from the master into the inbox
    └── forkserver                       engine.forkserver: forks the nodes
        ├── process worker-1/wc.read#1   engine.runtime.node_main
        ├── process worker-1/wc.count#1
        └── process worker-1/wc.count#2

The worker registers with READY, runs one process per START-NODE, reports
each node's start, exit and completion, and sends heartbeats with every
node's counters, CPU and memory. A node process that dies is restarted with
exponential backoff, within its restart budget (at most `max_restarts`
restarts in `restart_window_s` seconds); past the budget the worker gives up
on it and reports NODE-FAILED. What a dead node had pulled and not acked is
made visible again at once.

Shutdown (SHUTDOWN from the master, SIGTERM, or the master gone when the
worker runs for one `engine run`): SIGTERM to every node, which finishes and
acks its batch, runs `teardown` and exits; then WORKER-STOPPING and exit. A
second SIGTERM, or the drain timeout, sends SIGKILL to what is left.

`Worker` keeps its state and the supervision loop here, and takes the rest
from mixins in private modules, one concept each: `_worker_connection` (the
MMOP connection to the master and reconnects), `_worker_supervision` (node
launches, exits, restarts within the budget, and stops), `_worker_heartbeat`
(the node reports and heartbeats) and `_worker_nodes` (the node record and
its OS processes).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import signal
import socket
import time
from collections import deque
from multiprocessing.connection import wait as wait_for_ready
from typing import Any

import psutil

from engine import protocol as mmop
from engine._worker_connection import MAX_OUTBOX, MasterConnectionMixin
from engine._worker_heartbeat import HeartbeatMixin
from engine._worker_nodes import ManagedNode, NodeState
from engine._worker_supervision import (
    MAX_RESTART_BACKOFF_S,
    RESTART_BACKOFF_S,
    NodeSupervisionMixin,
)
from engine.errors import ProtocolError
from engine.forkserver import node_context

__all__ = [
    "DEFAULT_DRAIN_TIMEOUT_S",
    "MAX_OUTBOX",
    "MAX_RESTART_BACKOFF_S",
    "RESTART_BACKOFF_S",
    "ManagedNode",
    "NodeState",
    "Worker",
]

logger = logging.getLogger(__name__)

DEFAULT_DRAIN_TIMEOUT_S = 60.0

# Events handled per step of the supervision loop, so that exits, timers and
# heartbeats still run while a long series of START-NODE messages is handled.
MAX_EVENTS_PER_STEP = 50


class Worker(MasterConnectionMixin, NodeSupervisionMixin, HeartbeatMixin):
    """Supervise node processes for one master."""

    def __init__(
        self,
        master_host: str,
        master_port: int,
        secret: bytes,
        stream_url: str | None = None,
        exit_with_master: bool = False,
        connect_timeout_s: float = 10.0,
        drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
        log_level: str = "info",
        log_format: str = "text",
    ) -> None:
        self.master_address = (master_host, master_port)
        self.secret = secret
        self.stream_url = stream_url
        self.exit_with_master = exit_with_master
        self.connect_timeout_s = connect_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self.log_level = log_level
        self.log_format = log_format
        self.worker_id = ""
        self.heartbeat_interval_s = 1.0
        self.nodes: dict[str, ManagedNode] = {}
        self.completing_types: set[str] = set()
        # Per node type, how often a process died with each item id in flight.
        self.crash_counts: dict[str, dict[str, int]] = {}
        self.connection: mmop.Connection | None = None
        self.inbox: queue.Queue[Any] = queue.Queue()
        # Events taken from the inbox and not handled yet, stop requests first.
        self.pending_events: deque[tuple] = deque()
        self.outbox: deque[mmop.Message] = deque(maxlen=MAX_OUTBOX)
        self.wake_reader, self.wake_writer = socket.socketpair()
        self.wake_reader.setblocking(False)
        self.wake_writer.setblocking(False)
        self.context = node_context()
        self.process = psutil.Process()
        self.drain_deadline: float | None = None
        self.is_reconnecting = False
        self.sigterm_count = 0
        self.is_shutting_down = False
        # Monotonic time of the next heartbeat; 0 sends the first one at once.
        self._next_heartbeat = 0.0

    # The supervision loop.

    def run(self) -> int:
        """Supervise nodes until shutdown; return the process exit code."""
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            while True:
                self._step()
                if self.is_shutting_down and not self._alive_nodes():
                    break
        except BaseException:
            # Never leave node processes behind: drain them, then kill.
            logger.exception("worker %s failed; stopping its nodes", self.worker_id)
            self._stop_nodes_after_failure()
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
        self._send(mmop.WorkerStopping(worker_id=self.worker_id, reason="shutdown"))
        if self.connection is not None:
            self.connection.close()
        logger.info("worker %s stopped", self.worker_id)
        return 0

    def _on_sigterm(self, signum: int, frame: object) -> None:
        self.sigterm_count += 1
        self._post(("sigterm", self.sigterm_count))

    def _step(self) -> None:
        now = time.monotonic()
        timeout_s = self._next_timer(now) - now
        handles: list[Any] = [self.wake_reader]
        for node in self.nodes.values():
            if node.is_alive:
                handles.append(node.process.sentinel)
            elif node.process is not None:
                # It exited since the last step's check, so no handle of it
                # would become ready: handle the exit without waiting.
                timeout_s = 0.0
            if node.status is not None:
                handles.append(node.status)
        if self.pending_events:
            timeout_s = 0.0
        wait_for_ready(handles, timeout=max(0.0, min(timeout_s, 0.5)))
        with contextlib.suppress(BlockingIOError, OSError):
            self.wake_reader.recv(4096)

        self._take_events()
        for _ in range(min(len(self.pending_events), MAX_EVENTS_PER_STEP)):
            self._handle_event(self.pending_events.popleft())

        for node in list(self.nodes.values()):
            self._read_status(node)
            if node.process is not None and node.process.exitcode is not None:
                self._on_exit(node)
        self._run_timers(time.monotonic())

    def _take_events(self) -> None:
        """Move the inbox's events to `pending_events`, stop requests first."""
        has_stop = False
        while True:
            try:
                event = self.inbox.get_nowait()
            except queue.Empty:
                break
            self.pending_events.append(event)
            has_stop = has_stop or _is_stop_request(event)
        if has_stop:
            # SHUTDOWN or SIGTERM goes before the START-NODEs that came ahead
            # of it, which then only record their nodes instead of forking.
            stops = [e for e in self.pending_events if _is_stop_request(e)]
            others = [e for e in self.pending_events if not _is_stop_request(e)]
            self.pending_events = deque(stops + others)

    def _next_timer(self, now: float) -> float:
        times = [self._next_heartbeat]
        times += [n.restart_at for n in self.nodes.values() if n.restart_at]
        if self.drain_deadline is not None:
            times.append(self.drain_deadline)
        return min(times) if times else now + 0.5

    def _run_timers(self, now: float) -> None:
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.heartbeat_interval_s
            if self.connection is not None:
                self._send_heartbeat()
        for node in list(self.nodes.values()):
            if node.restart_at is not None and now >= node.restart_at:
                node.restart_at = None
                if not self.is_shutting_down and not node.is_stop_requested:
                    self._launch(node)
        if self.drain_deadline is not None and now >= self.drain_deadline:
            logger.warning(
                "drain timed out after %.0f s; killing %d node processes",
                self.drain_timeout_s,
                len(self._alive_nodes()),
            )
            self.drain_deadline = None
            self._kill_all()

    def _handle_event(self, event: tuple) -> None:
        kind, value = event
        if kind == "message":
            self._handle_message(value)
        elif kind == "disconnected":
            self._on_disconnected(value)
        elif kind == "reconnected":
            self.is_reconnecting = False
            try:
                self._register(value)
            except (ProtocolError, OSError) as exc:
                logger.warning("registering with master failed: %s", exc)
                value.close()
                self._start_reconnecting()
        elif kind == "sigterm":
            if value == 1:
                logger.info("SIGTERM received; draining nodes")
                self.begin_shutdown(self.drain_timeout_s)
            else:
                logger.warning("second SIGTERM received; killing node processes")
                self._kill_all()

    def _handle_message(self, message: mmop.Message) -> None:
        logger.debug("received %s", mmop.wire_name(message))
        if isinstance(message, mmop.StartNode):
            self.start_node(
                message.node_id, message.node_type, message.recipe, message.resume
            )
            if message.complete:
                self.complete_type(message.node_type)
        elif isinstance(message, mmop.StopNode):
            self.stop_node(message.node_id)
        elif isinstance(message, mmop.CompleteType):
            self.complete_type(message.node_type)
        elif isinstance(message, mmop.Shutdown):
            logger.info("shutdown requested by master; draining nodes")
            self.begin_shutdown(message.drain_timeout_s)
        elif isinstance(message, mmop.Ping):
            self._send(mmop.Pong(nonce=message.nonce))
        elif isinstance(message, mmop.Welcome):
            logger.debug("extra WELCOME from master ignored")
        elif isinstance(message, mmop.Rejected):
            logger.error("master rejected a message: %s", message.reason)
        else:
            logger.error("unexpected %s from master; ignored", mmop.wire_name(message))
            self._send(
                mmop.Rejected(
                    reason=f"a worker does not take {mmop.wire_name(message)}"
                )
            )


def _is_stop_request(event: tuple) -> bool:
    kind, value = event
    return kind == "sigterm" or (kind == "message" and isinstance(value, mmop.Shutdown))
