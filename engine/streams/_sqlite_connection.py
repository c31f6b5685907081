"""The connection of `SQLiteStream`: open, configure, and retry while busy.

Every call of the stream runs through `_write` or `_read`, which serialize
the threads of one process, check that the stream is open in this process,
and retry while another process holds the file's write lock. A write also
passes the stream's write gate first, which orders the writers of the file.
"""

from __future__ import annotations

import logging
import os
import random
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from engine.errors import StreamError, StreamUnavailableError
from engine.streams._sqlite_schema import _SCHEMA
from engine.streams._sqlite_sql import _run_transaction

# The public module's logger, so that one name covers every part of the stream.
logger = logging.getLogger("engine.streams.sqlite")

T = TypeVar("T")

# Maximum time that SQLite itself waits for a lock before one attempt fails as
# busy. The retry loop in `SQLiteStream._retry_busy` then starts another.
BUSY_TIMEOUT_S = 5.0

_BUSY_CODES = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)

# A write that waits this long for the write gate logs a warning, because a
# write transaction of the stream keeps the gate for about a millisecond or
# less.
GATE_WARNING_S = 5.0


class ConnectionMixin:
    """The connection handling of `SQLiteStream`.

    Its methods use the state that `SQLiteStream.__init__` sets.
    """

    def _connect(self) -> sqlite3.Connection:
        folder = os.path.dirname(self.path)
        if folder:
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as exc:
                raise StreamError(
                    f"cannot create the folder {folder!r} of SQLite stream "
                    f"{self.path!r}: {exc.strerror}"
                ) from exc

        connection = self._retry_busy(
            "open",
            lambda: sqlite3.connect(
                self.path,
                timeout=min(BUSY_TIMEOUT_S, self.busy_retry_s),
                isolation_level=None,
                check_same_thread=False,
            ),
        )
        try:
            self._configure(connection)
        except BaseException:
            connection.close()
            raise
        return connection

    def _configure(self, connection: sqlite3.Connection) -> None:
        mode = self._retry_busy(
            "enable WAL mode",
            lambda: connection.execute("PRAGMA journal_mode=WAL").fetchone()[0],
        )
        if mode != "wal":
            raise StreamError(
                f"SQLite stream {self.path!r} cannot use WAL mode "
                f"(journal_mode={mode!r}); put the file on a local disk"
            )
        # In WAL mode, NORMAL commits without fsync and syncs at checkpoints.
        # A committed message survives the crash of any process, which is what
        # the engine needs, but the last commits can be lost on power loss or
        # an OS crash.
        connection.execute("PRAGMA synchronous=NORMAL")

        def create_schema(connection: sqlite3.Connection) -> None:
            for statement in _SCHEMA:
                connection.execute(statement)

        # Several processes may open a new file at once. The statements are
        # idempotent, and the write lock makes them run one process at a time.
        self._retry_busy(
            "create schema", lambda: _run_transaction(connection, create_schema)
        )

    def _write(self, action: str, body: Callable[[sqlite3.Connection], T]) -> T:
        """Run `body` in one write transaction, retried while the file is busy."""
        with self._lock:
            self._check_usable()
            if not self._acquire_gate(action):
                raise StreamUnavailableError(
                    f"{action} failed on SQLite stream {self.path!r}: another "
                    f"process held its write lock {self._gate.path!r} for "
                    f"{self.busy_retry_s:g} s; it may be stopped or stuck, "
                    "retry later"
                )
            try:
                return self._retry_busy(
                    action, lambda: _run_transaction(self._connection, body)
                )
            finally:
                self._gate.release()

    def _acquire_gate(self, action: str) -> bool:
        """Take the write gate within `busy_retry_s`, warning once if it is slow."""
        first_wait_s = min(GATE_WARNING_S, self.busy_retry_s)
        if self._gate.acquire(first_wait_s):
            return True
        if first_wait_s >= self.busy_retry_s:
            return False
        logger.warning(
            "%s on SQLite stream %s has waited %.0f s for the write lock %s, which "
            "another process holds; it waits up to %.0f s in all",
            action,
            self.path,
            first_wait_s,
            self._gate.path,
            self.busy_retry_s,
        )
        return self._gate.acquire(self.busy_retry_s - first_wait_s)

    def _read(self, action: str, sql: str, parameters: Sequence[object]) -> list[tuple]:
        with self._lock:
            self._check_usable()
            return self._retry_busy(
                action, lambda: self._connection.execute(sql, parameters).fetchall()
            )

    def _retry_busy(self, action: str, operation: Callable[[], T]) -> T:
        """Run `operation`, retrying with backoff while the file is locked.

        Raises `StreamUnavailableError` once `busy_retry_s` has passed, and
        wraps every other SQLite error in `StreamError`.
        """
        deadline = time.monotonic() + self.busy_retry_s
        pause_s = 0.01
        attempts = 1
        while True:
            try:
                return operation()
            except sqlite3.Error as exc:
                if not _is_busy(exc):
                    raise StreamError(
                        f"{action} failed on SQLite stream {self.path!r}: {exc}"
                    ) from exc
                if time.monotonic() + pause_s > deadline:
                    raise StreamUnavailableError(
                        f"{action} failed on SQLite stream {self.path!r}: the file "
                        f"stayed locked after {attempts} attempts in "
                        f"{self.busy_retry_s:g} s ({exc}); another process holds "
                        "a long write transaction, retry later"
                    ) from exc
            logger.debug("%s found %s locked, attempt %d", action, self.path, attempts)
            # Jitter keeps processes that collided from retrying in step.
            time.sleep(pause_s * random.uniform(0.5, 1.0))
            pause_s = min(pause_s * 2, 1.0)
            attempts += 1

    def _check_usable(self) -> None:
        if self._is_closed:
            raise StreamError(
                f"SQLite stream {self.path!r} is closed; open a new stream"
            )
        if os.getpid() != self._pid:
            raise StreamError(
                f"SQLite stream {self.path!r} was opened in process {self._pid} "
                f"and cannot be used in process {os.getpid()}; open a stream "
                "in each process after it starts"
            )


def _is_busy(exc: sqlite3.Error) -> bool:
    # The low byte of an extended result code is its primary code.
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in _BUSY_CODES
    message = str(exc)
    return "locked" in message or "busy" in message
