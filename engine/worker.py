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
"""

from __future__ import annotations

import contextlib
import enum
import logging
import multiprocessing
import os
import queue
import signal
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_for_ready
from typing import Any

import psutil

from engine import protocol as mmop
from engine.errors import EngineError, ProtocolError, RecipeError
from engine.forkserver import node_context, start_forkserver
from engine.recipe import RecipeHeader, read_header
from engine.runtime import (
    COUNTER_NAMES,
    COUNTER_SLOTS,
    IN_FLIGHT_BYTES,
    NodeLaunch,
    SharedFlag,
    counters_to_stats,
    node_main,
)
from engine.streams import open_stream

logger = logging.getLogger(__name__)

# Restart backoff: 0.1 s, 0.2 s, 0.4 s ... at most 10 s.
RESTART_BACKOFF_S = 0.1
MAX_RESTART_BACKOFF_S = 10.0
DEFAULT_DRAIN_TIMEOUT_S = 60.0
# How many reports the worker keeps for a master that is away.
MAX_OUTBOX = 10_000


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


class Worker:
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

    # Connection to the master.

    def connect(self) -> None:
        """Connect to the master, register, and take the WELCOME.

        Raises `ProtocolError` when the master cannot be reached within the
        connect timeout or rejects this worker's secret.
        """
        # The forkserver imports the node runtime while this worker registers.
        start_forkserver(self.stream_url)
        has_own_stream = self.stream_url is not None
        if has_own_stream:
            # A stream of the worker's own fails before the master is bothered.
            self._check_stream()
        connection = self._open_connection(self.connect_timeout_s)
        self._register(connection)
        try:
            if not has_own_stream:
                self._check_stream()
        except EngineError as exc:
            with contextlib.suppress(ProtocolError, OSError):
                connection.send(
                    mmop.WorkerStopping(worker_id=self.worker_id, reason=str(exc))
                )
            connection.close()
            self.connection = None
            raise

    def _check_stream(self) -> None:
        """Open the data stream once, so a wrong URL fails here, not in every node.

        Raises `StreamUnavailableError` (or `StreamError`) with the reason.
        """
        stream = open_stream(self.stream_url or "", owner=f"{self.worker_id}-check")
        stream.close()

    def _open_connection(self, timeout_s: float) -> mmop.Connection:
        host, port = self.master_address
        deadline = time.monotonic() + timeout_s
        delay_s = 0.1
        while True:
            try:
                return mmop.connect(host, port, self.secret, timeout_s=5.0)
            except mmop.AuthenticationError:
                raise
            except mmop.ConnectionFailedError:
                if time.monotonic() + delay_s > deadline:
                    raise
            except (ProtocolError, OSError) as exc:
                if time.monotonic() + delay_s > deadline:
                    raise ProtocolError(
                        f"connection to master at {host}:{port} failed ({exc}); "
                        "check that engine-master runs there and that the "
                        "address is right"
                    ) from exc
                time.sleep(delay_s)
                delay_s = min(delay_s * 2, 2.0)

    def _register(self, connection: mmop.Connection) -> None:
        memory = psutil.virtual_memory().total
        # Finished nodes too: a restarted master learns what completed.
        nodes = [self._node_report(node) for node in self.nodes.values()]
        connection.send(
            mmop.Ready(
                hostname=socket.gethostname(),
                pid=os.getpid(),
                cores=os.cpu_count() or 1,
                memory_bytes=memory,
                worker_id=self.worker_id or None,
                nodes=nodes,
            )
        )
        reply = connection.receive(timeout_s=10.0)
        if not isinstance(reply, mmop.Welcome):
            connection.close()
            raise ProtocolError(
                f"master at {self.master_address[0]}:{self.master_address[1]} "
                f"replied {mmop.wire_name(reply)} to READY instead of WELCOME"
            )
        self.worker_id = reply.worker_id
        self.heartbeat_interval_s = reply.heartbeat_interval_s
        if self.stream_url is None:
            self.stream_url = reply.stream_url
        multiprocessing.current_process().name = self.worker_id
        self.connection = connection
        threading.Thread(
            target=self._read_master,
            args=(connection,),
            name="mmop-reader",
            daemon=True,
        ).start()
        logger.info(
            "worker %s joined master %s:%d",
            self.worker_id,
            *self.master_address,
        )
        while self.outbox:
            self._send(self.outbox.popleft())

    def _read_master(self, connection: mmop.Connection) -> None:
        while True:
            try:
                message = connection.receive()
            except mmop.ConnectionClosedError as exc:
                logger.debug("connection to master closed: %s", exc)
                self._post(("disconnected", connection))
                return
            except ProtocolError as exc:
                # The bad frame was consumed, so the connection stays in sync.
                logger.error("invalid message from master rejected: %s", exc)
                with contextlib.suppress(OSError, ProtocolError):
                    connection.send(mmop.Rejected(reason=str(exc)))
                continue
            except OSError as exc:
                logger.warning("connection to master failed: %s", exc)
                self._post(("disconnected", connection))
                return
            self._post(("message", message))

    def _post(self, event: tuple) -> None:
        self.inbox.put(event)
        with contextlib.suppress(BlockingIOError, OSError):
            self.wake_writer.send(b"\0")

    def _send(self, message: mmop.Message) -> None:
        connection = self.connection
        if connection is None:
            self.outbox.append(message)
            return
        try:
            connection.send(message)
        except (OSError, ProtocolError) as exc:
            logger.warning(
                "sending %s to master failed: %s", mmop.wire_name(message), exc
            )
            # A stale heartbeat is worth nothing after a reconnect.
            if not isinstance(message, mmop.Heartbeat):
                self.outbox.append(message)

    def _on_disconnected(self, connection: mmop.Connection) -> None:
        if connection is not self.connection:
            return
        self.connection = None
        connection.close()
        if self.exit_with_master or self.is_shutting_down:
            if not self.is_shutting_down:
                logger.warning("master is gone; draining nodes and exiting")
            self.begin_shutdown(self.drain_timeout_s)
            return
        logger.warning(
            "connection to master %s:%d lost; nodes keep running, reconnecting",
            *self.master_address,
        )
        self._start_reconnecting()

    def _start_reconnecting(self) -> None:
        if self.is_reconnecting:
            return
        self.is_reconnecting = True

        def reconnect() -> None:
            delay_s = 0.5
            attempt = 0
            while not self.is_shutting_down:
                attempt += 1
                try:
                    connection = mmop.connect(*self.master_address, self.secret, 5.0)
                except (ProtocolError, OSError) as exc:
                    logger.warning(
                        "reconnect to master failed (%s); retry %d in %.1f s",
                        exc,
                        attempt,
                        delay_s,
                    )
                    time.sleep(delay_s)
                    delay_s = min(delay_s * 2, 10.0)
                    continue
                self._post(("reconnected", connection))
                return

        threading.Thread(target=reconnect, name="mmop-reconnect", daemon=True).start()

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
        wait_for_ready(handles, timeout=max(0.0, min(timeout_s, 0.5)))
        with contextlib.suppress(BlockingIOError, OSError):
            self.wake_reader.recv(4096)

        while True:
            try:
                event = self.inbox.get_nowait()
            except queue.Empty:
                break
            self._handle_event(event)

        for node in list(self.nodes.values()):
            self._read_status(node)
            if node.process is not None and node.process.exitcode is not None:
                self._on_exit(node)
        self._run_timers(time.monotonic())

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

    # Node lifecycle.

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
        elif kind == "recycle" and not self.is_shutting_down:
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
            self._count_crash(node, exit_text)
            self._restart_or_give_up(node, process.exitcode, recovered)

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

    def _count_crash(self, node: ManagedNode, exit_text: str) -> None:
        """Count a death against the item that was in flight, if any."""
        item_id = node.in_flight.value.decode("utf-8", "replace")
        node.in_flight.value = b""
        if not item_id:
            return
        counts = self.crash_counts.setdefault(node.node_type, {})
        counts[item_id] = counts.get(item_id, 0) + 1
        node.last_crash = exit_text
        logger.warning(
            "node %s died (%s) while processing item %s; deaths with this item: %d",
            node.node_id,
            exit_text,
            item_id,
            counts[item_id],
        )

    def _restart_or_give_up(
        self, node: ManagedNode, exitcode: int | None, recovered: int
    ) -> None:
        settings = node.header.settings
        max_restarts = int(settings.get("max_restarts", 5))
        window_s = float(settings.get("restart_window_s", 60.0))
        now = time.monotonic()
        while node.restart_times and now - node.restart_times[0] > window_s:
            node.restart_times.popleft()
        signal_number = -exitcode if exitcode is not None and exitcode < 0 else None
        exit_code = exitcode if exitcode is not None and exitcode >= 0 else None
        if len(node.restart_times) >= max_restarts:
            logger.error(
                "node %s failed: %d restarts within %.0f s; giving up. Last error: %s",
                node.node_id,
                len(node.restart_times),
                window_s,
                node.last_error,
            )
            self._send(
                mmop.NodeExited(
                    worker_id=self.worker_id,
                    node_id=node.node_id,
                    node_type=node.node_type,
                    exit_code=exit_code,
                    signal=signal_number,
                    will_restart=False,
                    restart_in_s=0.0,
                )
            )
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
        node.restart_times.append(now)
        node.restarts += 1
        node.restart_at = now + backoff_s
        node.state = NodeState.RESTARTING
        logger.warning(
            "node %s exited (%s); restarting in %.1f s (restart %d of %d in %.0f s); "
            "%d pulled items made visible again",
            node.node_id,
            _describe_exit(exitcode),
            backoff_s,
            len(node.restart_times),
            max_restarts,
            window_s,
            recovered,
        )
        self._send(
            mmop.NodeExited(
                worker_id=self.worker_id,
                node_id=node.node_id,
                node_type=node.node_type,
                exit_code=exit_code,
                signal=signal_number,
                will_restart=True,
                restart_in_s=backoff_s,
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
        try:
            stream = open_stream(self.stream_url or "", owner=f"{self.worker_id}")
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

    # Reports.

    def _active_nodes(self) -> list[ManagedNode]:
        done = (NodeState.COMPLETED, NodeState.STOPPED, NodeState.FAILED)
        return [node for node in self.nodes.values() if node.state not in done]

    def _alive_nodes(self) -> list[ManagedNode]:
        return [node for node in self.nodes.values() if node.is_alive]

    def _stats(self, node: ManagedNode) -> dict[str, Any]:
        return counters_to_stats(node.counters)

    def _node_report(self, node: ManagedNode) -> dict[str, Any]:
        report: dict[str, Any] = {
            "node_id": node.node_id,
            "node_type": node.node_type,
            "pid": node.pid,
            "state": node.state.value,
            "restarts": node.restarts,
            "has_started": node.has_started,
            "last_error": node.last_error,
            "cpu_percent": 0.0,
            "memory_bytes": 0,
            **self._stats(node),
        }
        if node.is_alive:
            with contextlib.suppress(psutil.Error):
                process = _psutil_process(node.pid)
                report["cpu_percent"] = process.cpu_percent(None)
                report["memory_bytes"] = process.memory_info().rss
        return report

    def _send_heartbeat(self) -> None:
        nodes = [self._node_report(node) for node in self.nodes.values()]
        # The worker's own use plus that of its node processes.
        cpu_percent = self.process.cpu_percent(None)
        cpu_percent += sum(report["cpu_percent"] for report in nodes)
        memory_bytes = self.process.memory_info().rss
        memory_bytes += sum(report["memory_bytes"] for report in nodes)
        self._send(
            mmop.Heartbeat(
                worker_id=self.worker_id,
                cpu_percent=cpu_percent,
                memory_bytes=memory_bytes,
                nodes=nodes,
            )
        )


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
