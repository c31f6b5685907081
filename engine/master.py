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

import itertools
import logging
import socket
import threading
import time
from typing import Any

from engine import protocol as mmop
from engine._master_placement import PlacementMixin
from engine._master_records import (
    STAT_KEYS,
    NodeRecord,
    NodeState,
    TypeRecord,
    TypeState,
    WorkerRecord,
    WorkerState,
    apply_node_stats,
)
from engine._master_stats import StatsMixin
from engine.errors import EngineError, ProtocolError

__all__ = [
    "STAT_KEYS",
    "Master",
    "NodeRecord",
    "NodeState",
    "TypeRecord",
    "TypeState",
    "WorkerRecord",
    "WorkerState",
]

logger = logging.getLogger(__name__)


class Master(PlacementMixin, StatsMixin):
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
        other_params: list[str] = []
        for report in reports:
            record = self.types.get(report.get("node_type", ""))
            if record is None:
                continue
            reported_digest = report.get("params_digest")
            if reported_digest and reported_digest != record.params_digest:
                other_params.append(report["node_id"])
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
        if other_params:
            # The nodes keep running: stopping them would stop the run's data.
            logger.error(
                "worker %s runs %d nodes with other run parameters than this "
                "master loaded (%s); they keep their own, but this master's "
                "hooks and new nodes use its values: start the master again "
                "with the -p values that the run started with",
                worker.worker_id,
                len(other_params),
                ", ".join(other_params[:5]) + (" ..." if len(other_params) > 5 else ""),
            )
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
            apply_node_stats(node, message.stats)
            logger.info("node %s completed on %s", node.node_id, worker.worker_id)
        elif isinstance(message, mmop.NodeStopped):
            node.state = NodeState.STOPPED
            apply_node_stats(node, message.stats)
        elif isinstance(message, (mmop.NodeFailed, mmop.NodeStartFailed)):
            node.state = NodeState.FAILED
            node.last_error = message.reason
            record.last_error = message.reason
            if isinstance(message, mmop.NodeFailed):
                apply_node_stats(node, message.stats)
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
        restarts = report.get("restarts")
        if isinstance(restarts, int) and not isinstance(restarts, bool):
            node.restarts = node.carried_restarts + restarts
        node.has_started = node.has_started or bool(report.get("has_started"))
        node.cpu_percent = float(report.get("cpu_percent", 0.0))
        node.memory_bytes = int(report.get("memory_bytes", 0))
        apply_node_stats(node, report)
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

    def release_exited_worker(self, pid: int) -> None:
        """Declare lost the worker whose process `pid` exited, without waiting.

        Its nodes are queued for the other workers and the next one to join.
        For `engine run`, which notices when its own worker exits.
        """
        with self.lock:
            for worker in self.workers.values():
                if worker.pid == pid and worker.state == WorkerState.JOINED:
                    self._declare_lost(worker, time.monotonic() - worker.last_seen)

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

    # Client requests.

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
