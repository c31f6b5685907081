"""The write gate of `SQLiteStream`: a lock file that wakes the next writer.

SQLite lets one connection write at a time. A connection that finds the
file locked sleeps in SQLite's busy handler, in pauses of 1, 2, 5, 10 ms
and longer, and the lock can stay free while every waiter sleeps. The
stream's write transactions are short (a batch is one message), so those
pauses cost more than the writes. Each write transaction of the stream
therefore first takes an exclusive `flock` of a file beside the database,
`<file>-lock`: the kernel hands that lock to a waiter as soon as its holder
releases it. SQLite's own locking still guards the data; the gate only
orders the writers.

A blocking `flock` has no timeout, so a caller that finds the gate taken
hands the wait to a helper thread and waits for it at most its deadline.
A process that dies, even by SIGKILL, releases the gate with its file.
"""

from __future__ import annotations

import fcntl
import os
import threading

from engine.errors import StreamError


class WriteGate:
    """An exclusive lock on `<database>-lock`, taken with a bounded wait.

    A gate is used from one thread at a time, which `SQLiteStream` ensures
    by serializing its calls.
    """

    def __init__(self, database: str) -> None:
        self.path = f"{database}-lock"
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StreamError(
                f"cannot open the lock file {self.path!r} of SQLite stream "
                f"{database!r}: {exc.strerror}; the stream needs write access "
                "to the folder of its file"
            ) from exc
        # Guards the hand-over between a caller and the helper thread.
        self._mutex = threading.Lock()
        # A caller waits for the helper's lock, and has not given up.
        self._is_requested = False
        # The helper is blocked in flock, or about to be.
        self._is_waiting = False
        self._is_closed = False
        self._granted = threading.Event()
        self._wake = threading.Event()
        self._helper: threading.Thread | None = None

    def acquire(self, timeout_s: float) -> bool:
        """Take the gate, or return False if it stayed taken for `timeout_s` seconds."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        with self._mutex:
            self._is_requested = True
            if not self._is_waiting:
                # Otherwise the helper still waits for a caller that gave
                # up, and this caller takes over that wait.
                self._is_waiting = True
                self._granted.clear()
                self._start_helper()
                self._wake.set()
        if self._granted.wait(max(0.0, timeout_s)):
            self._granted.clear()
            return True
        with self._mutex:
            if self._granted.is_set():
                # Granted between the timeout and the mutex.
                self._granted.clear()
                return True
            self._is_requested = False
            return False

    def release(self) -> None:
        """Release the gate taken by `acquire`."""
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Close the lock file, or let a helper that still waits close it later."""
        with self._mutex:
            if self._is_closed:
                return
            self._is_closed = True
            self._is_requested = False
            if self._is_waiting:
                return
            os.close(self._fd)
        self._wake.set()

    def _start_helper(self) -> None:
        if self._helper is None:
            self._helper = threading.Thread(
                target=self._wait_in_helper, name="sqlite-write-gate", daemon=True
            )
            self._helper.start()

    def _wait_in_helper(self) -> None:
        """Block in flock for each waiting caller, and hand the lock over."""
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._mutex:
                if self._is_closed and not self._is_waiting:
                    return
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            with self._mutex:
                self._is_waiting = False
                if self._is_requested:
                    self._is_requested = False
                    self._granted.set()
                    continue
                # The caller gave up: pass the gate on.
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                if self._is_closed:
                    os.close(self._fd)
                    return
