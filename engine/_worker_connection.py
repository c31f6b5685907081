"""The connection of a worker to its master: register, read, send, reconnect.

A reader thread puts the master's frames in the worker's inbox. Reports
sent while the master is away wait in the outbox and go out after the
worker registers again.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import socket
import threading
import time

import psutil

from engine import protocol as mmop
from engine.errors import EngineError, ProtocolError
from engine.forkserver import start_forkserver
from engine.streams import open_stream

# Every log line of the worker names `engine.worker`, whichever part writes it.
logger = logging.getLogger("engine.worker")

# How many reports the worker keeps for a master that is away.
MAX_OUTBOX = 10_000


class MasterConnectionMixin:
    """The connection of `Worker` to the master, with reconnects.

    Its methods use the state that `Worker.__init__` sets.
    """

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
            # One attempt never outlasts the time left, nor 5 s.
            attempt_s = min(5.0, max(deadline - time.monotonic(), 0.1))
            try:
                return mmop.connect(host, port, self.secret, timeout_s=attempt_s)
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
                logger.warning(
                    "lost the connection to the master, which exited or "
                    "declared this worker lost; draining nodes and exiting"
                )
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
