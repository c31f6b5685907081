"""The embedded durable stream: queues of messages in one SQLite file.

Every message is a row of the `messages` table. Pulling a message claims a
lease on it: the row gets the puller's owner name and a `visible_at` time one
lease later, so no other process can pull it before then. Acknowledging deletes
the row. A process that dies leaves its rows claimed until the lease expires,
or until its supervisor calls `recover(owner)`, which makes them visible at
once.

Many processes share one file. SQLite lets one writer in at a time, so every
write is a short `BEGIN IMMEDIATE` transaction. The writers take turns
through the write gate, an exclusive lock of `<file>-lock` that wakes the
next writer as soon as it is free, and a writer that still finds the file
locked waits and retries with backoff.

Each process opens its own `SQLiteStream`. A SQLite connection must not cross
a fork, so a stream used in a process other than the one that opened it
raises `StreamError`. Within a process, one stream may be shared by threads:
its calls are serialized, so a helper thread can extend leases while the
main thread runs a long transform.

`SQLiteStream` takes the rest from private modules, one concept each:
`_sqlite_schema` (the tables and indexes, and the migration of older files),
`_sqlite_connection` (opening the file and retrying while it is locked),
`_sqlite_gate` (the write gate) and `_sqlite_sql` (the transaction and the
statements that the calls share).
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from engine.errors import StreamError
from engine.streams._checks import (
    check_bodies,
    check_delay,
    check_position,
    delivery_ids,
    unique_queue_names,
)
from engine.streams._sqlite_connection import (
    # Named by the class docs, so importable from here as before.
    BUSY_TIMEOUT_S as BUSY_TIMEOUT_S,
)
from engine.streams._sqlite_connection import ConnectionMixin
from engine.streams._sqlite_gate import WriteGate
from engine.streams._sqlite_sql import (
    _EXTEND_HELD_SQL,
    _chunks,
    _claim_query,
    _insert,
    _marks,
    _run_transaction,
)
from engine.streams.base import Delivery

if TYPE_CHECKING:
    from types import TracebackType

logger = logging.getLogger(__name__)

# Default maximum time that one operation retries while other processes keep
# the file locked, before it raises `StreamUnavailableError`.
DEFAULT_BUSY_RETRY_S = 60.0

# The pause between two polls of `pull` starts short, so that a batch fills
# quickly while messages flow, and grows while the queues stay empty.
POLL_MIN_S = 0.002
POLL_MAX_S = 0.05


class SQLiteStream(ConnectionMixin):
    """Durable queues in one SQLite file, shared by the processes of one machine.

    `path` is the database file; its folder and schema are created when
    missing. `owner` names the process that pulls messages, so that its
    supervisor can `recover` what it pulled if it dies. It must be unique
    among live processes, and defaults to a unique name. `lease_s` is how
    many seconds a pulled message stays hidden from other processes before
    it is delivered again. `busy_retry_s` bounds how long one operation
    waits for the write gate, and again how long it retries while other
    processes keep the file locked. Its last attempt may wait up to
    `BUSY_TIMEOUT_S` seconds longer inside SQLite.

    Raises `StreamError` when the file or its lock file `<path>-lock` cannot
    be opened or the file is not a SQLite database, and
    `StreamUnavailableError` when it stays locked.

    Limits: the file must be on a local disk, because WAL mode needs shared
    memory between the processes. Message times come from the wall clock,
    so a clock stepped back delays visibility by the size of the step.
    """

    def __init__(
        self,
        path: str,
        owner: str = "",
        lease_s: float = 300.0,
        busy_retry_s: float = DEFAULT_BUSY_RETRY_S,
    ) -> None:
        if not (math.isfinite(lease_s) and lease_s > 0):
            raise ValueError(f"invalid lease_s={lease_s!r}: must be more than 0")
        if not (math.isfinite(busy_retry_s) and busy_retry_s >= 0):
            raise ValueError(
                f"invalid busy_retry_s={busy_retry_s!r}: must be 0 or more"
            )
        self.path = path
        self.owner = owner or f"pid-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.lease_s = lease_s
        self.busy_retry_s = busy_retry_s

        self._pid = os.getpid()
        self._is_closed = False
        # Serializes every use of the connection, which is shared by threads.
        self._lock = threading.Lock()
        # Ids of the messages that this stream pulled and has not yet acked,
        # rejected or released. `close` makes them visible again.
        self._held: set[int] = set()

        self._connection = self._connect()
        try:
            self._gate = WriteGate(path)
        except BaseException:
            self._connection.close()
            raise
        logger.debug("SQLite stream opened path=%s owner=%s", path, self.owner)

    def __repr__(self) -> str:
        return f"SQLiteStream({self.path!r}, owner={self.owner!r})"

    def __enter__(self) -> SQLiteStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def declare(self, queues: Iterable[str]) -> None:
        """Create the queues if they do not exist yet.

        Publishing to an undeclared queue works on this stream, but other
        backends drop such messages, so declare every queue first.
        """
        names = unique_queue_names(queues)
        self._write(
            "declare queues",
            lambda connection: connection.executemany(
                "INSERT OR IGNORE INTO queues (name) VALUES (?)",
                [(name,) for name in names],
            ),
        )

    def publish(
        self,
        messages: Sequence[tuple[str, bytes]],
        delay_s: float = 0.0,
        position: tuple[str, int] | None = None,
    ) -> None:
        """Publish `(queue, body)` pairs in one transaction.

        The messages are durable when this returns, and become visible to
        `pull` `delay_s` seconds later. With `position=(key, count)`, the same
        transaction stores `count` under `key` for `read_position`. Raises
        `TypeError` for a body that is not bytes.
        """
        check_delay(delay_s)
        messages = _checked_messages(messages)
        if position is not None:
            check_position(position)
        elif not messages:
            return

        def insert(connection: sqlite3.Connection) -> None:
            _insert(connection, messages, time.time() + delay_s)
            if position is not None:
                connection.execute(
                    "INSERT INTO positions (key, position) VALUES (?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET position = excluded.position",
                    position,
                )

        self._write("publish", insert)
        logger.debug(
            "published %d messages delay_s=%s position=%s",
            len(messages),
            delay_s,
            position,
        )

    def read_position(self, key: str) -> int:
        """Return the count stored under `key` by `publish`, or 0 when none is."""
        check_position((key, 0))
        rows = self._read(
            "read position", "SELECT position FROM positions WHERE key = ?", [key]
        )
        return int(rows[0][0]) if rows else 0

    def pull(
        self, queues: Sequence[str], max_count: int, timeout_s: float
    ) -> list[Delivery]:
        """Pull up to `max_count` messages from `queues`, oldest first.

        Each message pulled stays hidden from other processes for `lease_s`
        seconds, until it is acked or rejected. When fewer than `max_count`
        are visible, polls for more until the batch is full or `timeout_s`
        seconds pass, and returns what it has then, possibly nothing.
        Messages come in the order they became visible, then in the order
        they were published.
        """
        names = unique_queue_names(queues)
        if not names:
            raise ValueError("invalid queues=[]: name at least one queue to pull")
        if max_count < 1:
            raise ValueError(f"invalid max_count={max_count!r}: must be 1 or more")
        if not (math.isfinite(timeout_s) and timeout_s >= 0):
            raise ValueError(f"invalid timeout_s={timeout_s!r}: must be 0 or more")

        deadline = time.monotonic() + timeout_s
        deliveries: list[Delivery] = []
        pause_s = POLL_MIN_S
        while True:
            # A read finds an empty queue without taking the write lock, which
            # keeps idle pollers out of the way of the writers.
            if self._has_visible(names):
                claimed = self._claim(names, max_count - len(deliveries))
                deliveries.extend(claimed)
                if claimed:
                    pause_s = POLL_MIN_S
            if len(deliveries) >= max_count:
                break
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                break
            time.sleep(min(pause_s, remaining_s))
            pause_s = min(pause_s * 2, POLL_MAX_S)

        logger.debug("pulled %d messages from %s", len(deliveries), names)
        return deliveries

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge messages: delete them for good.

        Deletes only the messages that this stream's owner still owns. A
        message whose lease expired and that another process pulled since
        stays with that process, and a warning gives the count.
        """
        ids = delivery_ids(deliveries)
        if not ids:
            return
        deleted = self._write(
            "ack", lambda connection: self._delete_held(connection, ids)
        )
        self._held.difference_update(ids)
        self._warn_if_lost("ack", len(ids), deleted)
        logger.debug("acked %d messages", deleted)

    def settle(
        self,
        deliveries: Sequence[Delivery],
        messages: Sequence[tuple[str, bytes]],
        delayed: Mapping[float, Sequence[tuple[str, bytes]]] | None = None,
    ) -> bool:
        """Publish `messages` and `delayed` and ack `deliveries` in one transaction.

        `delayed` maps a delay in seconds to the `(queue, body)` pairs that
        become visible after it. A process that dies during the call commits
        nothing, so its deliveries come back and none of the messages exist.
        Returns False, with nothing published, when this stream's owner no
        longer owns every delivery (a lease expired and another process
        pulled the message, or it was acked already). The deliveries it still
        owns are then made visible again.
        """
        is_settled, _ = self.settle_and_pull(deliveries, messages, delayed, [], 0)
        return is_settled

    def settle_and_pull(
        self,
        deliveries: Sequence[Delivery],
        messages: Sequence[tuple[str, bytes]],
        delayed: Mapping[float, Sequence[tuple[str, bytes]]] | None,
        queues: Sequence[str],
        max_count: int,
    ) -> tuple[bool, list[Delivery]]:
        """Settle as `settle` does, and pull up to `max_count` messages of `queues`.

        The pull runs in the settle's transaction, without waiting, so that
        a node that goes on to its next batch takes the write lock once per
        batch instead of twice. Returns whether the batch was settled, and
        the pulled messages, none when it was not or `max_count` is 0.
        """
        groups = [(0.0, _checked_messages(messages))]
        for delay_s, delayed_messages in (delayed or {}).items():
            check_delay(delay_s)
            groups.append((delay_s, _checked_messages(delayed_messages)))
        ids = delivery_ids(deliveries)
        names = unique_queue_names(queues) if max_count > 0 else []

        def settle(connection: sqlite3.Connection) -> list[tuple]:
            if ids and self._delete_held(connection, ids) < len(ids):
                raise _LeaseLost
            now = time.time()
            for delay_s, group in groups:
                _insert(connection, group, now + delay_s)
            if not names:
                return []
            return self._claim_rows(connection, names, max_count)

        try:
            rows = self._write("settle", settle)
        except _LeaseLost:
            released = self._write(
                "release", lambda connection: self._release(connection, ids)
            )
            self._held.difference_update(ids)
            logger.warning(
                "settling a batch of %d messages published nothing: owner %s no "
                "longer owns %d of them, because their lease expired and another "
                "process pulled them; the other %d are visible again",
                len(ids),
                self.owner,
                len(ids) - released,
                released,
            )
            return False, []
        self._held.difference_update(ids)
        logger.debug(
            "settled %d messages, published %d, pulled %d",
            len(ids),
            sum(len(group) for _, group in groups),
            len(rows),
        )
        return True, self._claimed(rows)

    def reject(self, deliveries: Sequence[Delivery], requeue: bool) -> None:
        """Reject messages: make them visible again now, or delete them.

        With `requeue=True` the messages are delivered again and marked
        redelivered; with `requeue=False` they are dropped. Like `ack`, this
        skips messages that another process pulled after their lease expired.
        """
        ids = delivery_ids(deliveries)
        if not ids:
            return

        def update(connection: sqlite3.Connection) -> int:
            if requeue:
                return self._release(connection, ids)
            return self._delete_held(connection, ids)

        changed = self._write("reject", update)
        self._held.difference_update(ids)
        self._warn_if_lost("reject", len(ids), changed)
        logger.debug("rejected %d messages requeue=%s", changed, requeue)

    def extend_lease(
        self, deliveries: Sequence[Delivery], lease_s: float | None = None
    ) -> None:
        """Keep pulled messages hidden for another lease, counted from now.

        Call it during a transform that may outlast the lease, so that the
        messages are not delivered to another process meanwhile. `lease_s`
        defaults to the stream's lease. Skips, with a warning, messages that
        another process pulled after their lease expired.
        """
        lease_s = self.lease_s if lease_s is None else lease_s
        if not (math.isfinite(lease_s) and lease_s > 0):
            raise ValueError(f"invalid lease_s={lease_s!r}: must be more than 0")
        ids = delivery_ids(deliveries)
        if not ids:
            return

        def update(connection: sqlite3.Connection) -> int:
            visible_at = time.time() + lease_s
            rows = [(visible_at, message_id, self.owner) for message_id in ids]
            return connection.executemany(_EXTEND_HELD_SQL, rows).rowcount

        extended = self._write("extend lease", update)
        self._warn_if_lost("extend_lease", len(ids), extended)
        logger.debug("extended the lease of %d messages by %s s", extended, lease_s)

    def depth(self, queue: str) -> int:
        """Return the number of messages in `queue`, pulled or not."""
        return self.depths([queue])[queue]

    def has_queue(self, queue: str) -> bool:
        """Return True when `queue` was declared and not deleted since."""
        rows = self._read(
            "check queue", "SELECT 1 FROM queues WHERE name = ?", (queue,)
        )
        return bool(rows)

    def depths(self, queues: Sequence[str]) -> dict[str, int]:
        """Return the number of messages in each of `queues`, pulled or not.

        Counts all the queues in one query, so the counts are consistent with
        each other. A queue that does not exist counts 0.
        """
        names = unique_queue_names(queues)
        if not names:
            return {}
        placeholders = ", ".join("?" * len(names))
        # Each half of the union counts in one of the two indexes.
        rows = self._read(
            "count messages",
            "SELECT queue, COUNT(*) FROM ("
            f"SELECT queue FROM messages WHERE queue IN ({placeholders}) "
            "AND owner IS NULL UNION ALL "
            f"SELECT queue FROM messages WHERE queue IN ({placeholders}) "
            "AND owner IS NOT NULL) GROUP BY queue",
            names + names,
        )
        counts = dict.fromkeys(names, 0)
        counts.update(rows)
        return counts

    def delete_queues(self, queues: Iterable[str]) -> None:
        """Delete the queues and every message in them, pulled or not.

        A name may also be a position key of `publish`, which is deleted too.
        """
        names = unique_queue_names(queues)
        if not names:
            return

        def delete(connection: sqlite3.Connection) -> None:
            rows = [(name,) for name in names]
            for owner_is in ("IS NULL", "IS NOT NULL"):
                connection.executemany(
                    f"DELETE FROM messages WHERE queue = ? AND owner {owner_is}", rows
                )
            connection.executemany("DELETE FROM queues WHERE name = ?", rows)
            connection.executemany("DELETE FROM positions WHERE key = ?", rows)

        self._write("delete queues", delete)
        logger.debug("deleted queues %s", names)

    def recover(self, owner: str) -> int:
        """Make every message pulled by `owner` and not yet acked visible now.

        Call it after the process `owner` died, so that its messages need not
        wait for their lease to expire. They count as redelivered. Returns how
        many messages were recovered.
        """

        def release(connection: sqlite3.Connection) -> int:
            return connection.execute(
                "UPDATE messages SET owner = NULL, visible_at = ? WHERE owner = ?",
                (time.time(), owner),
            ).rowcount

        count = self._write("recover", release)
        if count:
            logger.info("recovered %d messages pulled by owner %s", count, owner)
        return count

    def recover_queues(self, queues: Sequence[str]) -> int:
        """Make every pulled, unacked message of `queues` visible now.

        Use it only when no live process pulls from these queues, such as at
        the start of a run that holds the pipeline's run lock: it takes the
        messages away from the processes that leased them. Returns the count.
        """
        names = list(queues)
        if not names:
            return 0
        marks = ", ".join("?" for _ in names)

        def release(connection: sqlite3.Connection) -> int:
            return connection.execute(
                "UPDATE messages SET owner = NULL, visible_at = ? "
                f"WHERE owner IS NOT NULL AND queue IN ({marks})",
                (time.time(), *names),
            ).rowcount

        count = self._write("recover", release)
        if count:
            logger.info("recovered %d messages pulled by processes gone", count)
        return count

    def close(self) -> None:
        """Close the stream and make the messages it pulled and did not ack visible.

        Calling it again does nothing. In a process other than the one that
        opened the stream, it only marks the stream closed, because the
        connection belongs to the parent.
        """
        with self._lock:
            if self._is_closed:
                return
            self._is_closed = True
            if os.getpid() != self._pid:
                return
            self._release_held()
            try:
                self._connection.close()
            except sqlite3.Error:
                logger.exception("closing SQLite stream %s failed", self.path)
            self._gate.close()
        logger.debug("SQLite stream closed path=%s owner=%s", self.path, self.owner)

    def _has_visible(self, names: list[str]) -> bool:
        placeholders = ", ".join("?" * len(names))
        now = time.time()
        rows = self._read(
            "pull",
            "SELECT EXISTS (SELECT 1 FROM messages "
            f"WHERE queue IN ({placeholders}) AND owner IS NULL AND visible_at <= ?) "
            "OR EXISTS (SELECT 1 FROM messages "
            f"WHERE queue IN ({placeholders}) AND owner IS NOT NULL "
            "AND visible_at <= ?)",
            [*names, now, *names, now],
        )
        return bool(rows[0][0])

    def _claim(self, names: list[str], count: int) -> list[Delivery]:
        """Claim up to `count` visible messages of `names` in one transaction."""
        rows = self._write(
            "pull", lambda connection: self._claim_rows(connection, names, count)
        )
        return self._claimed(rows)

    def _claim_rows(
        self, connection: sqlite3.Connection, names: list[str], count: int
    ) -> list[tuple]:
        """Lease up to `count` visible messages of `names`, in the open transaction."""
        now = time.time()
        parameters: list[object] = []
        for name in names:
            parameters += [name, now, count]
        if len(names) > 1:
            parameters.append(count)
        rows = connection.execute(
            _claim_query(len(names), is_pulled=False), parameters
        ).fetchall()
        # Messages whose lease expired: almost always none, found in one
        # index lookup per queue.
        expired = connection.execute(
            _claim_query(len(names), is_pulled=True), parameters
        ).fetchall()
        if expired:
            rows = sorted(rows + expired, key=lambda row: (row[5], row[0]))
            del rows[count:]
        # One UPDATE per chunk of ids instead of one per message saves the
        # statement overhead, a large share of the claim's cost.
        visible_at = now + self.lease_s
        for chunk in _chunks([row[0] for row in rows]):
            connection.execute(
                "UPDATE messages SET owner = ?, visible_at = ?, "
                "delivery_count = delivery_count + 1 "
                f"WHERE id IN ({_marks(len(chunk))})",
                (self.owner, visible_at, *chunk),
            )
        return rows

    def _claimed(self, rows: list[tuple]) -> list[Delivery]:
        """Return the deliveries of claimed rows, which this stream now holds."""
        self._held.update(row[0] for row in rows)

        # A message that still has an owner was neither acked nor recovered.
        expired = sum(1 for row in rows if row[4] is not None)
        if expired:
            logger.warning(
                "pulled %d messages again after their lease expired: the process "
                "that held them died, or its transform outlasted its lease",
                expired,
            )
        return [
            Delivery(
                queue=queue,
                body=body,
                delivery_id=message_id,
                is_redelivered=delivery_count > 0,
            )
            for message_id, queue, body, delivery_count, _, _ in rows
        ]

    def _release_held(self) -> None:
        """Make the messages this stream pulled and did not ack visible now."""
        if not self._held:
            return
        ids = sorted(self._held)
        self._held.clear()

        try:
            released = self._retry_busy(
                "release",
                lambda: _run_transaction(
                    self._connection,
                    lambda connection: self._release(connection, ids),
                ),
            )
        except StreamError as exc:
            logger.warning(
                "closing SQLite stream %s left %d unacked messages hidden until "
                "their lease expires: %s",
                self.path,
                len(ids),
                exc,
            )
            return
        logger.debug("released %d unacked messages on close", released)

    def _delete_held(self, connection: sqlite3.Connection, ids: list[int]) -> int:
        """Delete the messages of `ids` that this owner owns, and return the count."""
        deleted = 0
        for chunk in _chunks(ids):
            deleted += connection.execute(
                "DELETE FROM messages "
                f"WHERE owner = ? AND id IN ({_marks(len(chunk))})",
                (self.owner, *chunk),
            ).rowcount
        return deleted

    def _release(self, connection: sqlite3.Connection, ids: list[int]) -> int:
        """Make the messages of `ids` that this owner owns visible, and count them."""
        now = time.time()
        released = 0
        for chunk in _chunks(ids):
            released += connection.execute(
                "UPDATE messages SET owner = NULL, visible_at = ? "
                f"WHERE owner = ? AND id IN ({_marks(len(chunk))})",
                (now, self.owner, *chunk),
            ).rowcount
        return released

    def _warn_if_lost(self, action: str, requested: int, changed: int) -> None:
        if changed < requested:
            logger.warning(
                "%s skipped %d of %d messages that owner %s no longer owns: their "
                "lease expired and another process pulled them, or they were "
                "already acked",
                action,
                requested - changed,
                requested,
                self.owner,
            )


class _LeaseLost(Exception):
    """Rolls back a settle whose deliveries this owner no longer owns."""


def _checked_messages(
    messages: Sequence[tuple[str, bytes]],
) -> list[tuple[str, bytes]]:
    """Return `messages` as a list, after checking each queue name and body."""
    messages = list(messages)
    unique_queue_names(queue for queue, _ in messages)
    check_bodies(messages)
    return messages
