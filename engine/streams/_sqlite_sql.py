"""The SQL of the SQLite stream: transactions, and the statements they run.

The functions take a connection, so that `SQLiteStream` runs several of them
in one transaction.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

# The public module's logger, so that one name covers every part of the stream.
logger = logging.getLogger("engine.streams.sqlite")

T = TypeVar("T")

_EXTEND_HELD_SQL = "UPDATE messages SET visible_at = ? WHERE id = ? AND owner = ?"


def _run_transaction(
    connection: sqlite3.Connection, body: Callable[[sqlite3.Connection], T]
) -> T:
    # IMMEDIATE takes the write lock up front. A deferred transaction that
    # reads first and then writes can fail as busy with no wait at all, when
    # another process committed in between.
    connection.execute("BEGIN IMMEDIATE")
    try:
        result = body(connection)
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            try:
                connection.execute("ROLLBACK")
            except sqlite3.Error:
                logger.debug("rollback failed after an error", exc_info=True)
        raise
    return result


@functools.lru_cache(maxsize=16)
def _claim_query(queue_count: int, is_pulled: bool) -> str:
    """Build the query that selects the next visible messages of the queues.

    With `is_pulled`, it selects those that were pulled and whose lease
    expired, else those that no process has pulled.

    Each queue gets its own subquery so that each walks the index in order
    and stops at the limit, and the union is then cut to the same limit. The
    query of one queue takes its 3 parameters, the union one more: the limit.
    """
    owner = "owner IS NOT NULL" if is_pulled else "owner IS NULL"
    one_queue = (
        "SELECT id, queue, body, delivery_count, owner, visible_at FROM messages "
        f"WHERE queue = ? AND {owner} AND visible_at <= ? "
        "ORDER BY visible_at, id LIMIT ?"
    )
    if queue_count == 1:
        # Without the union, SQLite reads the rows in the index's order and
        # needs no sort: this takes about half the time.
        return one_queue
    union = " UNION ALL ".join(
        f"SELECT * FROM ({one_queue})" for _ in range(queue_count)
    )
    return f"{union} ORDER BY visible_at, id LIMIT ?"


# Ids per statement, well under SQLite's limit of 32,766 parameters.
_IDS_PER_STATEMENT = 500


# Rows per INSERT statement at most. One statement of many rows costs about
# half as much per row as executemany, which runs the statement once per row.
# Statements of 1, 2, 4, ... rows up to this many keep the number of distinct
# statements small, so that they stay in the connection's statement cache, and
# their parameters under the 999 of old SQLite builds.
_ROWS_PER_INSERT = 256


def _insert(
    connection: sqlite3.Connection,
    messages: Sequence[tuple[str, bytes]],
    visible_at: float,
) -> None:
    """Insert `(queue, body)` pairs as new messages visible from `visible_at`."""
    start = 0
    size = _ROWS_PER_INSERT
    while start < len(messages):
        while size > len(messages) - start:
            size //= 2
        parameters: list[object] = []
        for queue, body in messages[start : start + size]:
            parameters += (queue, body, visible_at)
        connection.execute(_insert_sql(size), parameters)
        start += size


@functools.lru_cache(maxsize=16)
def _insert_sql(row_count: int) -> str:
    values = ", ".join(["(?, ?, ?)"] * row_count)
    return f"INSERT INTO messages (queue, body, visible_at) VALUES {values}"


def _chunks(ids: list[int]) -> Iterator[list[int]]:
    for start in range(0, len(ids), _IDS_PER_STATEMENT):
        yield ids[start : start + _IDS_PER_STATEMENT]


def _marks(count: int) -> str:
    return ", ".join("?" * count)
