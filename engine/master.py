"""The master: stores the recipes, places nodes on workers, cascades completion.

    engine-master or engine run         Master
    ├── thread mmop-accept              accepts connections and authenticates
    ├── thread mmop-peer (one each)     reads a worker's or client's messages
    └── thread master-monitor           declares silent workers lost

Workers connect and register with READY; the master replies WELCOME with the
worker's id and the stream URL, then sends START-NODE for each node it places
there: on the worker with the fewest nodes of that type, then the fewest in
all. It counts, per node type and per worker, the nodes queued, running,
completed and failed, from the workers' reports. When every node of a type
has completed, each type downstream of it whose upstream types have all
completed gets COMPLETE-TYPE: its nodes finish once their inputs are drained.

Shutdown: `shutdown_workers` sends SHUTDOWN to every worker, which drains its
nodes; `close` then stops listening and closes every connection. The master
keeps no data items, so it can stop at any time without losing one.
"""

from __future__ import annotations

import enum
import itertools
import logging
import socket
import threading
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine import protocol as mmop
from engine.errors import EngineError, ProtocolError
from engine.recipe import build_recipe
from engine.runtime import BATCH_DURATION_BUCKETS_S

if TYPE_CHECKING:
    from engine.pipeline import Pipeline

logger = logging.getLogger(__name__)

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


class Master:
    """Accept workers and clients over MMOP and run pipelines on the workers."""

    def __init__(
        self,
        secret: bytes,
        stream_url: str,
        host: str = "127.0.0.1",
        port: int = 0,
        heartbeat_interval_s: float = 1.0,
        worker_timeout_s: float = 10.0,
    ) -> None:
        self.secret = secret
        self.stream_url = stream_url
        self.host = host
        self.requested_port = port
        self.heartbeat_interval_s = heartbeat_interval_s
        self.worker_timeout_s = worker_timeout_s
        self.lock = threading.RLock()
        # Notified whenever a node or type changes state.
        self.changed = threading.Condition(self.lock)
        self.types: dict[str, TypeRecord] = {}
        self.pipelines: dict[str, list[str]] = {}
        self.workers: dict[str, WorkerRecord] = {}
        self.worker_numbers = itertools.count(1)
        self.listener: socket.socket | None = None
        self.is_closed = False
        # Set once SHUTDOWN was sent to every worker: no node moves any more.
        self.is_stopping = False
        # The drain timeout of that SHUTDOWN, for workers that join later.
        self.drain_timeout_s = 60.0
        # Nodes an operator stopped: never started again elsewhere.
        self.stop_requested_ids: set[str] = set()
        self.threads: list[threading.Thread] = []

    @property
    def port(self) -> int:
        """Return the TCP port that MMOP listens on."""
        if self.listener is None:
            raise EngineError("the master is not listening; call start() first")
        return self.listener.getsockname()[1]

    def start(self) -> None:
        """Bind the MMOP port and start accepting workers and clients."""
        try:
            listener = socket.create_server(
                (self.host, self.requested_port), backlog=64
            )
        except OSError as exc:
            raise EngineError(
                f"cannot listen on {self.host}:{self.requested_port} "
                f"({exc.strerror or exc}); stop the process that uses the port, "
                "or pass another --bind HOST:PORT"
            ) from exc
        self.listener = listener
        self._spawn(self._accept_loop, "mmop-accept")
        self._spawn(self._monitor_loop, "master-monitor")
        logger.info("master listening on %s:%d", self.host, self.port)

    def _spawn(self, target: Any, name: str, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def close(self) -> None:
        """Stop listening and close every connection."""
        with self.lock:
            self.is_closed = True
            connections = [w.connection for w in self.workers.values() if w.connection]
        if self.listener is not None:
            self.listener.close()
        for connection in connections:
            connection.close()

    # Pipelines and recipes.

    def add_pipeline(self, pipeline: Pipeline, params: dict[str, Any]) -> None:
        """Build and hold the recipes of every node of a checked pipeline."""
        pipeline.check()
        recipes = {
            name: build_recipe(pipeline, name, params) for name in pipeline.nodes
        }
        with self.lock:
            if pipeline.name in self.pipelines:
                raise EngineError(
                    f"pipeline {pipeline.name!r} is loaded already; give the "
                    "other pipeline another name"
                )
            names = []
            for name, spec in pipeline.nodes.items():
                node_type = pipeline.node_type(name)
                self.types[node_type] = TypeRecord(
                    node_type=node_type,
                    pipeline=pipeline.name,
                    node=name,
                    kind=spec.kind,
                    recipe=recipes[name],
                    processes=spec.settings.processes,
                    upstream=[pipeline.node_type(n) for n in pipeline.upstream(name)],
                    downstream=[
                        pipeline.node_type(n) for n in pipeline.downstream(name)
                    ],
                    input_queues=pipeline.input_queues(name),
                )
                names.append(node_type)
            self.pipelines[pipeline.name] = names
        logger.info("pipeline %s loaded with %d node types", pipeline.name, len(names))

    def start_pipeline(
        self,
        name: str,
        sources: Collection[str] | None = None,
        resume_sources: bool = False,
    ) -> list[str]:
        """Start every node type of pipeline `name` with its declared processes.

        `sources` names the source nodes to run, all when None. The others
        count as completed at once, so the other nodes process what the
        stream contains already and complete. With `resume_sources`, the
        sources skip the items that the stream records as published by an
        earlier run. Nodes wait in the queued state until a worker joins.
        Returns the new node ids.
        """
        with self.lock:
            if name not in self.pipelines:
                raise EngineError(
                    f"pipeline {name!r} not found; loaded pipelines are "
                    + (", ".join(repr(p) for p in self.pipelines) or "none")
                )
            node_ids = []
            for node_type in self.pipelines[name]:
                record = self.types[node_type]
                if record.kind != "source":
                    node_ids += self.start_nodes(node_type, record.processes)
                elif sources is None or record.node in sources:
                    node_ids += self.start_nodes(
                        node_type, record.processes, resume=resume_sources
                    )
                else:
                    record.state = TypeState.COMPLETED
            for node_type in self.pipelines[name]:
                self._complete_if_ready(self.types[node_type])
            return node_ids

    def has_nodes(self, name: str) -> bool:
        """Return True when workers reported nodes of pipeline `name` already."""
        with self.lock:
            return any(self.types[t].nodes for t in self.pipelines[name])

    def resume_pipeline(self, name: str) -> list[str]:
        """Start only the processes that pipeline `name` lacks after a restart.

        Types whose nodes completed are left alone; for the others, as many
        nodes start as the declared process count exceeds the live ones.
        """
        live = (NodeState.QUEUED, NodeState.RUNNING, NodeState.RESTARTING)
        with self.lock:
            node_ids = []
            for node_type in self.pipelines[name]:
                record = self.types[node_type]
                if record.is_done or record.count(NodeState.COMPLETED):
                    continue
                running = sum(1 for n in record.nodes.values() if n.state in live)
                if running < record.processes:
                    # They replace processes lost while the master was down, so
                    # a source continues after the items it published.
                    node_ids += self.start_nodes(
                        node_type, record.processes - running, resume=True
                    )
            logger.info(
                "pipeline %s resumed with the workers' nodes; %d nodes started",
                name,
                len(node_ids),
            )
            return node_ids

    def start_nodes(
        self, node_type: str, count: int = 1, resume: bool = False
    ) -> list[str]:
        """Queue `count` new processes of `node_type`, placed on workers when free.

        With `resume`, a source skips the items that the stream records as
        published by the process of the same number in an earlier run.
        """
        with self.lock:
            record = self.types.get(node_type)
            if record is None:
                known = ", ".join(repr(t) for t in self.types) or "none"
                raise EngineError(
                    f"node type {node_type!r} not found; known types are {known}"
                )
            if record.is_done:
                raise EngineError(
                    f"node type {node_type!r} has {record.state.value}; start the "
                    "pipeline again to run it"
                )
            if record.state == TypeState.PENDING:
                record.state = TypeState.RUNNING
            node_ids = []
            for _ in range(count):
                node_id = f"{node_type}#{record.next_number}"
                record.next_number += 1
                record.nodes[node_id] = NodeRecord(
                    node_id, node_type, None, has_started=resume
                )
                node_ids.append(node_id)
            self._place_queued()
            return node_ids

    def _place_queued(self) -> None:
        """Send START-NODE for every queued node that has no worker yet."""
        for record in self.types.values():
            for node in record.nodes.values():
                if node.state == NodeState.QUEUED and node.worker_id is None:
                    worker = self._choose_worker(record.node_type)
                    if worker is None:
                        return
                    self._send_start(worker, record, node)

    def _choose_worker(self, node_type: str) -> WorkerRecord | None:
        candidates = [
            w
            for w in self.workers.values()
            if w.state == WorkerState.JOINED and w.connection
        ]
        if not candidates:
            return None

        def load(worker: WorkerRecord) -> tuple[int, int, str]:
            of_type = total = 0
            for record in self.types.values():
                for node in record.nodes.values():
                    if node.worker_id == worker.worker_id and node.state in (
                        NodeState.QUEUED,
                        NodeState.RUNNING,
                        NodeState.RESTARTING,
                    ):
                        total += 1
                        of_type += record.node_type == node_type
            return (of_type, total, worker.worker_id)

        return min(candidates, key=load)

    def _send_start(
        self, worker: WorkerRecord, record: TypeRecord, node: NodeRecord
    ) -> None:
        node.worker_id = worker.worker_id
        node.state = NodeState.QUEUED
        is_completing = record.state == TypeState.COMPLETING
        message = mmop.StartNode(
            node_id=node.node_id,
            node_type=record.node_type,
            recipe=record.recipe,
            complete=is_completing,
            resume=node.has_started,
        )
        logger.debug("START-NODE %s sent to %s", node.node_id, worker.worker_id)
        self._send(worker, message)

    def _send(self, worker: WorkerRecord, message: mmop.Message) -> None:
        if worker.connection is None:
            return
        try:
            worker.connection.send(message)
        except (OSError, ProtocolError) as exc:
            logger.warning(
                "sending %s to worker %s failed: %s",
                mmop.wire_name(message),
                worker.worker_id,
                exc,
            )

    # Connections.

    def _accept_loop(self) -> None:
        while not self.is_closed:
            try:
                sock, address = self.listener.accept()
            except OSError:
                return
            self._spawn(self._serve, f"mmop-peer-{address[1]}", sock, address)

    def _serve(self, sock: socket.socket, address: tuple) -> None:
        try:
            connection = mmop.accept(sock, self.secret, timeout_s=10.0)
        except mmop.AuthenticationError:
            logger.error(
                "connection from %s:%d rejected: authentication failed", *address[:2]
            )
            sock.close()
            return
        except (ProtocolError, OSError) as exc:
            logger.error(
                "connection from %s:%d rejected: %s", address[0], address[1], exc
            )
            sock.close()
            return
        worker: WorkerRecord | None = None
        try:
            while not self.is_closed:
                try:
                    message = connection.receive()
                except mmop.ConnectionClosedError as exc:
                    logger.debug("connection from %s:%d closed: %s", *address[:2], exc)
                    break
                except ProtocolError as exc:
                    # The bad frame was consumed, so the connection stays in sync.
                    logger.error(
                        "invalid message from %s:%d rejected: %s",
                        address[0],
                        address[1],
                        exc,
                    )
                    connection.send(mmop.Rejected(reason=str(exc)))
                    continue
                with self.lock:
                    worker = self._handle(connection, worker, message)
        except (OSError, ProtocolError) as exc:
            logger.warning("connection from %s:%d failed: %s", *address[:2], exc)
        finally:
            connection.close()
            if worker is not None:
                with self.lock:
                    self._on_worker_disconnected(worker, connection)

    def _handle(
        self,
        connection: mmop.Connection,
        worker: WorkerRecord | None,
        message: mmop.Message,
    ) -> WorkerRecord | None:
        """Act on one message; returns the worker this connection belongs to."""
        if isinstance(message, mmop.Ready):
            return self._on_ready(connection, message)
        if worker is not None:
            worker.last_seen = time.monotonic()
            self._handle_worker_message(worker, message)
            return worker
        self._handle_client_message(connection, message)
        return None

    def _on_ready(self, connection: mmop.Connection, ready: mmop.Ready) -> WorkerRecord:
        worker_id = ready.worker_id
        if (
            not worker_id
            or worker_id in self.workers
            and (self.workers[worker_id].connection is not None)
        ):
            worker_id = self._new_worker_id()
        is_rejoin = worker_id in self.workers
        worker = WorkerRecord(
            worker_id=worker_id,
            connection=connection,
            hostname=ready.hostname,
            pid=ready.pid,
            cores=ready.cores,
            memory_bytes=ready.memory_bytes,
        )
        self.workers[worker_id] = worker
        connection.send(
            mmop.Welcome(
                worker_id=worker_id,
                stream_url=self.stream_url,
                heartbeat_interval_s=self.heartbeat_interval_s,
            )
        )
        if (
            self.stream_url.startswith("sqlite:")
            and ready.hostname != socket.gethostname()
        ):
            logger.warning(
                "worker %s runs on host %s, but the SQLite stream is a file of "
                "this host; use a RabbitMQ stream (--stream amqp://...) for a "
                "cluster of several hosts",
                worker_id,
                ready.hostname,
            )
        logger.info(
            "worker %s %s from %s pid=%d cores=%d",
            worker_id,
            "rejoined" if is_rejoin else "joined",
            ready.hostname,
            ready.pid,
            ready.cores,
        )
        self._adopt_nodes(worker, ready.nodes)
        if self.is_stopping:
            # SHUTDOWN went out before this worker joined, such as on a Ctrl-C
            # while `engine run` started: it gets its own and no node.
            worker.state = WorkerState.STOPPING
            self._send(worker, mmop.Shutdown(drain_timeout_s=self.drain_timeout_s))
            self.changed.notify_all()
            return worker
        # A worker that joins late still learns which types are completing.
        for record in self.types.values():
            if record.state == TypeState.COMPLETING:
                self._send(worker, mmop.CompleteType(node_type=record.node_type))
        self._place_queued()
        self.changed.notify_all()
        return worker

    def _new_worker_id(self) -> str:
        while True:
            worker_id = f"worker-{next(self.worker_numbers)}"
            if worker_id not in self.workers:
                return worker_id

    def _adopt_nodes(self, worker: WorkerRecord, reports: list) -> None:
        """Count the nodes a reconnecting worker runs, rebuilding lost state."""
        for report in reports:
            record = self.types.get(report.get("node_type", ""))
            if record is None:
                continue
            node = record.nodes.get(report["node_id"])
            if node is None:
                node = NodeRecord(report["node_id"], record.node_type, None)
                record.nodes[node.node_id] = node
            elif node.worker_id not in (None, worker.worker_id) and node.state in (
                NodeState.QUEUED,
                NodeState.RUNNING,
                NodeState.RESTARTING,
            ):
                # The node moved while this worker was lost: keep one copy.
                logger.warning(
                    "worker %s still runs node %s, which now runs on %s; "
                    "stopping it there",
                    worker.worker_id,
                    node.node_id,
                    node.worker_id,
                )
                self._send(worker, mmop.StopNode(node_id=node.node_id))
                continue
            node.worker_id = worker.worker_id
            self._apply_report(node, report)
            _, _, number = node.node_id.rpartition("#")
            if number.isdigit():
                record.next_number = max(record.next_number, int(number) + 1)
            if record.state == TypeState.PENDING:
                record.state = TypeState.RUNNING
        if reports:
            self._reconcile()

    def _reconcile(self) -> None:
        """Bring type states in line with adopted nodes, and cascade completion."""
        for record in self.types.values():
            self._update_type(record)
        for record in self.types.values():
            self._complete_if_ready(record)

    def _on_worker_disconnected(
        self, worker: WorkerRecord, connection: mmop.Connection
    ) -> None:
        if worker.connection is not connection:
            return
        worker.connection = None
        if worker.state == WorkerState.JOINED:
            logger.warning(
                "worker %s disconnected; its nodes keep running until it "
                "rejoins or times out",
                worker.worker_id,
            )
        self.changed.notify_all()

    def _handle_worker_message(
        self, worker: WorkerRecord, message: mmop.Message
    ) -> None:
        if isinstance(message, mmop.Heartbeat):
            worker.cpu_percent = message.cpu_percent
            worker.process_memory_bytes = message.memory_bytes
            for report in message.nodes:
                node = self._find_node(report.get("node_id", ""))
                if node is not None and node.worker_id == worker.worker_id:
                    self._apply_report(node, report)
            return
        if isinstance(message, mmop.Pong):
            return
        if isinstance(message, mmop.WorkerStopping):
            worker.state = WorkerState.STOPPED
            logger.info("worker %s stopping: %s", worker.worker_id, message.reason)
            self._release_nodes(worker)
            return
        node = self._find_node(getattr(message, "node_id", ""))
        if node is None:
            logger.error(
                "%s from worker %s names unknown node %r; ignored",
                mmop.wire_name(message),
                worker.worker_id,
                getattr(message, "node_id", None),
            )
            return
        if node.worker_id != worker.worker_id:
            # A report from a copy that this master sent STOP-NODE (see _adopt_nodes).
            logger.debug(
                "%s for node %s from %s ignored: the node runs on %s",
                mmop.wire_name(message),
                node.node_id,
                worker.worker_id,
                node.worker_id,
            )
            return
        record = self.types[node.node_type]
        if isinstance(message, mmop.NodeStarted):
            node.state = NodeState.RUNNING
            node.pid = message.pid
            node.has_started = True
        elif isinstance(message, mmop.NodeExited):
            node.state = NodeState.RESTARTING if message.will_restart else node.state
            if message.will_restart:
                node.restarts += 1
        elif isinstance(message, mmop.NodeCompleted):
            node.state = NodeState.COMPLETED
            _apply_stats(node, message.stats)
            logger.info("node %s completed on %s", node.node_id, worker.worker_id)
        elif isinstance(message, mmop.NodeStopped):
            node.state = NodeState.STOPPED
            _apply_stats(node, message.stats)
        elif isinstance(message, (mmop.NodeFailed, mmop.NodeStartFailed)):
            node.state = NodeState.FAILED
            node.last_error = message.reason
            record.last_error = message.reason
            if isinstance(message, mmop.NodeFailed):
                _apply_stats(node, message.stats)
            logger.error("node %s failed: %s", node.node_id, message.reason)
        else:
            logger.error(
                "unexpected %s from worker %s; ignored",
                mmop.wire_name(message),
                worker.worker_id,
            )
            return
        self._update_type(record)
        self.changed.notify_all()

    def _apply_report(self, node: NodeRecord, report: dict[str, Any]) -> None:
        node.pid = report.get("pid") or node.pid
        node.restarts = int(report.get("restarts", node.restarts))
        node.has_started = node.has_started or bool(report.get("has_started"))
        node.cpu_percent = float(report.get("cpu_percent", 0.0))
        node.memory_bytes = int(report.get("memory_bytes", 0))
        _apply_stats(node, report)
        try:
            state = NodeState(report.get("state"))
        except ValueError:
            state = {
                "starting": NodeState.QUEUED,
                "draining": NodeState.RUNNING,
            }.get(report.get("state"), node.state)
        if node.state not in (NodeState.COMPLETED, NodeState.FAILED):
            node.state = state
        if report.get("last_error"):
            node.last_error = str(report["last_error"])

    def _find_node(self, node_id: str) -> NodeRecord | None:
        node_type, _, _ = node_id.rpartition("#")
        record = self.types.get(node_type)
        return record.nodes.get(node_id) if record else None

    # Completion.

    def _update_type(self, record: TypeRecord) -> None:
        """Mark a type done when no node of it is left, then cascade."""
        if record.is_done or not record.nodes:
            return
        live = (NodeState.QUEUED, NodeState.RUNNING, NodeState.RESTARTING)
        if any(node.state in live for node in record.nodes.values()):
            return
        if any(node.state == NodeState.COMPLETED for node in record.nodes.values()):
            record.state = TypeState.COMPLETED
        elif all(node.state == NodeState.STOPPED for node in record.nodes.values()):
            return
        else:
            record.state = TypeState.FAILED
        if record.count(NodeState.FAILED):
            record.state = TypeState.FAILED
        logger.info("node type %s %s", record.node_type, record.state.value)
        for node_type in record.downstream:
            self._complete_if_ready(self.types[node_type])

    def _complete_if_ready(self, record: TypeRecord) -> None:
        if record.state not in (TypeState.PENDING, TypeState.RUNNING):
            return
        if not all(self.types[t].is_done for t in record.upstream):
            return
        record.state = TypeState.COMPLETING
        logger.info("node type %s completing: its upstream is done", record.node_type)
        for worker in self.workers.values():
            if worker.state == WorkerState.JOINED:
                self._send(worker, mmop.CompleteType(node_type=record.node_type))

    def is_pipeline_done(self, name: str) -> bool:
        """Return True when every node type of pipeline `name` is done."""
        with self.lock:
            return all(self.types[t].is_done for t in self.pipelines[name])

    def wait_pipeline(self, name: str, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for pipeline `name` to finish; True if it did."""
        deadline = time.monotonic() + timeout_s
        with self.changed:
            while not self.is_pipeline_done(name):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.changed.wait(remaining)
            return True

    # Workers.

    def shutdown_workers(self, drain_timeout_s: float) -> None:
        """Tell every worker to drain its nodes and stop."""
        with self.lock:
            self.is_stopping = True
            self.drain_timeout_s = drain_timeout_s
            for worker in self.workers.values():
                if worker.state == WorkerState.JOINED:
                    worker.state = WorkerState.STOPPING
                    self._send(worker, mmop.Shutdown(drain_timeout_s=drain_timeout_s))

    def stop_worker(self, worker_id: str, drain_timeout_s: float = 60.0) -> None:
        """Tell one worker to drain and stop; raises `EngineError` if unknown."""
        with self.lock:
            worker = self.workers.get(worker_id)
            if worker is None or worker.state != WorkerState.JOINED:
                known = ", ".join(
                    repr(w)
                    for w, r in self.workers.items()
                    if r.state == WorkerState.JOINED
                )
                raise EngineError(
                    f"worker {worker_id!r} not found among joined workers; "
                    f"joined workers are {known or 'none'}"
                )
            worker.state = WorkerState.STOPPING
            self._send(worker, mmop.Shutdown(drain_timeout_s=drain_timeout_s))

    def wait_workers(self, count: int, stop: threading.Event) -> bool:
        """Wait until `count` workers have joined; False if `stop` is set first."""
        with self.changed:
            while not stop.is_set():
                joined = [
                    w for w in self.workers.values() if w.state == WorkerState.JOINED
                ]
                if len(joined) >= count:
                    return True
                self.changed.wait(0.5)
        return False

    def _monitor_loop(self) -> None:
        while not self.is_closed:
            time.sleep(min(self.heartbeat_interval_s, 1.0))
            with self.lock:
                now = time.monotonic()
                for worker in self.workers.values():
                    silent_s = now - worker.last_seen
                    if (
                        worker.state == WorkerState.JOINED
                        and silent_s > self.worker_timeout_s
                    ):
                        self._declare_lost(worker, silent_s)

    def _declare_lost(self, worker: WorkerRecord, silent_s: float) -> None:
        worker.state = WorkerState.LOST
        logger.warning(
            "worker %s lost: silent for %.1f s; starting its nodes elsewhere",
            worker.worker_id,
            silent_s,
        )
        if worker.connection is not None:
            worker.connection.close()
            worker.connection = None
        self._release_nodes(worker)

    def _release_nodes(self, worker: WorkerRecord) -> None:
        """Queue the unfinished nodes of a gone worker for the other workers."""
        if self.is_stopping:
            return
        released = 0
        for record in self.types.values():
            if record.is_done:
                continue
            for node in record.nodes.values():
                if node.node_id in self.stop_requested_ids:
                    continue
                if node.worker_id == worker.worker_id and node.state in (
                    NodeState.QUEUED,
                    NodeState.RUNNING,
                    NodeState.RESTARTING,
                    NodeState.STOPPED,
                ):
                    node.worker_id = None
                    node.state = NodeState.QUEUED
                    node.pid = None
                    released += 1
        if released:
            logger.info(
                "%d nodes of worker %s queued for other workers",
                released,
                worker.worker_id,
            )
        self._place_queued()
        self.changed.notify_all()

    # Client requests and reports.

    def _handle_client_message(
        self, connection: mmop.Connection, message: mmop.Message
    ) -> None:
        reply: mmop.Message
        if isinstance(message, mmop.StartNodeRequest):
            try:
                node_ids = self.start_nodes(message.node_type, message.count)
                reply = mmop.StartNodeRequestSucceeded(node_ids=node_ids)
            except EngineError as exc:
                reply = mmop.StartNodeRequestFailed(reason=str(exc))
        elif isinstance(message, mmop.StopWorkerRequest):
            try:
                self.stop_worker(message.worker_id)
                reply = mmop.StopWorkerRequestSucceeded(worker_id=message.worker_id)
            except EngineError as exc:
                reply = mmop.StopWorkerRequestFailed(reason=str(exc))
        elif isinstance(message, mmop.RecipeInfoRequest):
            reply = mmop.RecipeInfo(types=self.recipe_info())
        elif isinstance(message, mmop.WorkerInfoRequest):
            reply = mmop.WorkerInfo(workers=self.worker_info())
        elif isinstance(message, mmop.Ping):
            reply = mmop.Pong(nonce=message.nonce)
        else:
            name = mmop.wire_name(message)
            logger.error("unexpected %s from a client; rejected", name)
            reply = mmop.Rejected(reason=f"the master does not take {name} here")
        connection.send(reply)

    def recipe_info(self) -> dict[str, dict[str, Any]]:
        """Return, per node type, its state and nodes queued, running and done."""
        with self.lock:
            return {
                node_type: {
                    "state": record.state.value,
                    "queued": record.count(NodeState.QUEUED),
                    "running": record.count(NodeState.RUNNING)
                    + record.count(NodeState.RESTARTING),
                    "completed": record.count(NodeState.COMPLETED),
                    "stopped": record.count(NodeState.STOPPED),
                    "failed": record.count(NodeState.FAILED),
                    "last_error": record.last_error,
                }
                for node_type, record in self.types.items()
            }

    def worker_info(self) -> dict[str, dict[str, Any]]:
        """Return, per worker, its host, state and node ids by type."""
        with self.lock:
            info: dict[str, dict[str, Any]] = {}
            for worker_id, worker in self.workers.items():
                nodes: dict[str, list[str]] = {}
                for record in self.types.values():
                    for node in record.nodes.values():
                        if node.worker_id == worker_id and node.state in (
                            NodeState.QUEUED,
                            NodeState.RUNNING,
                            NodeState.RESTARTING,
                        ):
                            nodes.setdefault(record.node_type, []).append(node.node_id)
                info[worker_id] = {
                    "hostname": worker.hostname,
                    "pid": worker.pid,
                    "state": worker.state.value,
                    "cores": worker.cores,
                    "memory_bytes": worker.memory_bytes,
                    "cpu_percent": worker.cpu_percent,
                    "process_memory_bytes": worker.process_memory_bytes,
                    "last_seen_s_ago": round(time.monotonic() - worker.last_seen, 3),
                    "nodes": nodes,
                }
            return info

    def type_stats(self, names: Iterable[str] | None = None) -> dict[str, dict]:
        """Return, per node type, its state, counters summed over its nodes, and
        its processes by state."""
        with self.lock:
            result = {}
            for node_type in names or self.types:
                record = self.types[node_type]
                totals = dict.fromkeys(STAT_KEYS, 0)
                restarts = progress_done = progress_total = 0
                for node in record.nodes.values():
                    for key in STAT_KEYS:
                        totals[key] += node.stats.get(key, 0)
                    restarts += node.restarts
                    progress_done += node.progress_done
                    progress_total += node.progress_total
                result[node_type] = {
                    "node": record.node,
                    "kind": record.kind,
                    "state": record.state.value,
                    "running": record.count(NodeState.RUNNING),
                    "processes": len(record.nodes),
                    "restarts": restarts,
                    "last_error": record.last_error,
                    "input_queues": list(record.input_queues),
                    **totals,
                    "progress_done": progress_done,
                    "progress_total": progress_total,
                }
            return result

    def node_stats(self) -> dict[str, dict[str, Any]]:
        """Return, per node id, its type, worker, state and counters."""
        with self.lock:
            return {
                node.node_id: {
                    "node_type": record.node_type,
                    "worker_id": node.worker_id,
                    "state": node.state.value,
                    "pid": node.pid,
                    "restarts": node.restarts,
                    "cpu_percent": node.cpu_percent,
                    "memory_bytes": node.memory_bytes,
                    **{key: node.stats.get(key, 0) for key in STAT_KEYS},
                    "progress_done": node.progress_done,
                    "progress_total": node.progress_total,
                }
                for record in self.types.values()
                for node in record.nodes.values()
            }

    def batch_durations(self) -> dict[str, tuple[list[int], float]]:
        """Return, per node type, its batch duration histogram summed over nodes.

        Each value is the count per bucket of BATCH_DURATION_BUCKETS_S plus
        one for the batches over its largest bound, not cumulative, and the
        sum of the durations in seconds.
        """
        with self.lock:
            result = {}
            for node_type, record in self.types.items():
                counts = [0] * (len(BATCH_DURATION_BUCKETS_S) + 1)
                total_s = 0.0
                for node in record.nodes.values():
                    for index, count in enumerate(node.batch_duration_counts):
                        counts[index] += count
                    total_s += node.batch_duration_sum_s
                result[node_type] = (counts, total_s)
            return result

    # Stopping and scaling the nodes of a type.

    def _stop_requested_ids(self) -> set[str]:
        """Return the ids of nodes sent STOP-NODE that may still be draining."""
        # Ids stay after NODE-STOPPED arrives, which is harmless because
        # `active_node_ids` checks the node's state first.
        return self.stop_requested_ids

    def active_node_ids(self, node_type: str) -> list[str]:
        """Return the ids of the live nodes of `node_type` not asked to stop.

        Live nodes are queued, running or restarting. The ids come oldest
        first. Raises `EngineError` for an unknown node type.
        """
        with self.lock:
            record = self.types.get(node_type)
            if record is None:
                known = ", ".join(repr(t) for t in self.types) or "none"
                raise EngineError(
                    f"node type {node_type!r} not found; known types are {known}"
                )
            stopping = self._stop_requested_ids()
            live = (NodeState.QUEUED, NodeState.RUNNING, NodeState.RESTARTING)
            return [
                node.node_id
                for node in record.nodes.values()
                if node.state in live and node.node_id not in stopping
            ]

    def stop_nodes(self, node_type: str, count: int = 1) -> list[str]:
        """Drain and stop up to `count` of the newest live nodes of `node_type`.

        A node placed on a worker gets STOP-NODE: it finishes its batch and
        exits, and counts as stopped once its worker reports NODE-STOPPED. A
        node still queued for want of a worker is stopped at once. Returns
        the ids of the nodes asked to stop, newest first, which are fewer
        than `count` when fewer are live. Raises `EngineError` for an unknown
        node type.

        Limits: stopping every node of a type leaves the type running, so
        the types downstream of it never complete.
        """
        with self.lock:
            newest_first = self.active_node_ids(node_type)[::-1][:count]
            record = self.types[node_type]
            for node_id in newest_first:
                node = record.nodes[node_id]
                worker = self.workers.get(node.worker_id or "")
                if worker is None:
                    node.state = NodeState.STOPPED
                    continue
                self._stop_requested_ids().add(node_id)
                logger.debug("STOP-NODE %s sent to %s", node_id, worker.worker_id)
                self._send(worker, mmop.StopNode(node_id=node_id))
            if newest_first:
                self._update_type(record)
                self.changed.notify_all()
            return newest_first

    def scale_nodes(self, node_type: str, count: int) -> tuple[list[str], list[str]]:
        """Start or stop nodes of `node_type` until `count` of them are live.

        Nodes already asked to stop do not count. Returns the ids of the
        nodes started and of those asked to stop, and one of the two lists
        is empty.
        Raises `EngineError` for an unknown node type, and for a type that
        has completed or failed when nodes would have to start.
        """
        with self.lock:
            active = len(self.active_node_ids(node_type))
            if count > active:
                return self.start_nodes(node_type, count - active), []
            return [], self.stop_nodes(node_type, active - count)


def _apply_stats(node: NodeRecord, stats: dict[str, Any]) -> None:
    """Copy the counters of a worker's node report or final stats into `node`.

    A member that is missing or of the wrong type keeps its previous value,
    so that a report from a worker of another version cannot stop the master.
    """
    node.stats = {
        key: _count(stats.get(key), node.stats.get(key, 0)) for key in STAT_KEYS
    }
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
        node.batch_duration_counts = [int(count) for count in counts]
        node.batch_duration_sum_s = float(total_s)


def _count(value: Any, default: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return default
