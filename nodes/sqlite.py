"""A batched sink and a source helper for SQLite databases.

`SQLiteSink` applies each batch in one transaction, so a batch is either
stored whole or not at all, and with `dedupe=True` it stores each item at most
once even when the engine delivers it again. `read_sqlite` yields the rows of
a query for a source node.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from engine.context import Param
from engine.errors import ParameterError
from nodes._retry import retry_with_backoff
from nodes._sink_options import (
    Row,
    as_statements,
    batch_item_ids,
    check_max_retries,
    check_sink_arguments,
    check_statement,
    iter_rows,
    resolve_dedupe,
)

if TYPE_CHECKING:
    from engine.context import NodeContext

logger = logging.getLogger(__name__)

T = TypeVar("T")
PathLike = str | os.PathLike[str]

# The table in the sink's own database that records the ids of applied items.
APPLIED_TABLE = "monomyth_applied"

_BACKOFF_FIRST_S = 0.05
_BACKOFF_MAX_S = 2.0


class SQLiteSink:
    """A batched sink that runs one SQL statement per row of each item.

    `rows(item)` returns the parameter rows of an item, as an iterable of
    tuples, or of dicts for named parameters. Without `rows`, the item itself
    is the only row and must be a list, a tuple or a dict. Each batch runs
    `executemany(statement, rows)` over the rows of all its items, in one
    transaction: an error anywhere rolls the whole batch back.

    `schema` is one SQL statement or a sequence of them, run in one
    transaction in `setup`, such as `CREATE TABLE IF NOT EXISTS ...`. `path`,
    `statement`, `schema` and `dedupe` may be given as a `Param`.

    With `dedupe=True`, the sink records the id of each applied item in the
    table `monomyth_applied` of the same database, in the batch's
    transaction, and skips items whose id is recorded there. A batch that is
    delivered again after a crash between commit and acknowledgement then
    changes nothing. The ids come from `ctx.item_ids`, which the engine sets
    for each batch. They are the same on every run of a pipeline, so a new
    run into the same database skips every item: empty `monomyth_applied` in
    an `on_start` hook, as examples/wordcount.py does, to apply them again.

    `combine(items)`, when given, merges the new items of a batch (after
    dedupe) into fewer items before their rows are built, such as the word
    counts of many chunks into one count: fewer rows to upsert, and the batch
    still applies in one transaction.

    When the database is locked, SQLite waits up to `busy_timeout_s` seconds,
    and then the sink retries the transaction up to `max_retries` times with
    exponential backoff from 0.05 s to at most 2 s. The last failure raises
    `sqlite3.OperationalError`.
    """

    batched = True

    def __init__(
        self,
        path: PathLike | Param,
        statement: str | Param,
        rows: Callable[[Any], Iterable[Row]] | None = None,
        schema: str | Sequence[str] | Param = (),
        dedupe: bool | Param = False,
        *,
        combine: Callable[[list[Any]], list[Any]] | None = None,
        busy_timeout_s: float = 5.0,
        max_retries: int = 5,
    ) -> None:
        check_sink_arguments(statement, schema, dedupe, rows, "SQLiteSink")
        if combine is not None and not callable(combine):
            raise ParameterError(
                f"invalid combine={combine!r} for SQLiteSink: expected a function "
                "from the list of a batch's items to a list of merged items"
            )
        if busy_timeout_s < 0:
            raise ParameterError(
                f"invalid busy_timeout_s={busy_timeout_s!r} for SQLiteSink: "
                "busy_timeout_s must be 0 or more"
            )
        check_max_retries(max_retries, "SQLiteSink")

        self.path = path
        self.statement = statement
        self.rows = rows
        self.combine = combine
        self.schema = schema
        self.dedupe = dedupe
        self.busy_timeout_s = busy_timeout_s
        self.max_retries = max_retries
        # Set by setup in the node process, after the engine unpickled the sink.
        self._connection: sqlite3.Connection | None = None
        self._path: Path | None = None
        self._statement = ""
        self._is_deduped = False

    def setup(self, ctx: NodeContext) -> None:
        """Resolve the settings, open the database and create the schema."""
        self._path = _as_path(ctx.resolve(self.path))
        self._statement = check_statement(ctx.resolve(self.statement))
        statements = as_statements(ctx.resolve(self.schema))
        self._is_deduped = resolve_dedupe(self.dedupe, ctx, "SQLiteSink")
        if self._is_deduped:
            statements.append(
                f"CREATE TABLE IF NOT EXISTS {APPLIED_TABLE} "
                "(id TEXT PRIMARY KEY) WITHOUT ROWID"
            )

        self._path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None leaves transactions to the explicit BEGIN below.
        connection = sqlite3.connect(
            self._path, timeout=self.busy_timeout_s, isolation_level=None
        )
        try:
            self._prepare_database(connection, statements)
        except BaseException:
            connection.close()
            raise
        self._connection = connection
        logger.debug("database %s opened for node %s", self._path, ctx.node)

    def __call__(self, items: list[Any], ctx: NodeContext) -> None:
        """Apply the batch in one transaction, retrying while it is locked."""
        connection = self._require_connection()
        item_ids = (
            batch_item_ids(items, ctx, "SQLiteSink") if self._is_deduped else None
        )

        applied_count = self._retry_locked(
            lambda: self._apply(connection, items, item_ids)
        )
        logger.debug(
            "batch applied to %s items=%d skipped=%d",
            self._path,
            applied_count,
            len(items) - applied_count,
        )

    def teardown(self, ctx: NodeContext) -> None:
        """Close the database connection."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _prepare_database(
        self, connection: sqlite3.Connection, statements: list[str]
    ) -> None:
        mode = self._retry_locked(
            lambda: connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        )
        if mode != "wal":
            logger.warning(
                "database %s stays in journal mode %s, not WAL; "
                "readers will block its writers",
                self._path,
                mode,
            )

        if statements:
            self._retry_locked(lambda: self._run_schema(connection, statements))

    def _apply(
        self,
        connection: sqlite3.Connection,
        items: list[Any],
        item_ids: list[str] | None,
    ) -> int:
        # IMMEDIATE takes the write lock at BEGIN, where the busy timeout
        # applies, instead of failing at the first write of a read transaction.
        connection.execute("BEGIN IMMEDIATE")
        try:
            pending = items
            if item_ids is not None:
                pending = self._claim_new_items(connection, items, item_ids)
            merged = self.combine(pending) if self.combine and pending else pending
            connection.executemany(
                self._statement, iter_rows(merged, self.rows, "SQLiteSink")
            )
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        return len(pending)

    def _claim_new_items(
        self, connection: sqlite3.Connection, items: list[Any], item_ids: list[str]
    ) -> list[Any]:
        new_items = []
        for item, item_id in zip(items, item_ids, strict=True):
            cursor = connection.execute(
                f"INSERT OR IGNORE INTO {APPLIED_TABLE} (id) VALUES (?)",
                (item_id,),
            )
            # rowcount is 0 when the id is recorded already, because the item
            # was applied before.
            if cursor.rowcount == 1:
                new_items.append(item)
        return new_items

    def _run_schema(
        self, connection: sqlite3.Connection, statements: list[str]
    ) -> None:
        connection.execute("BEGIN IMMEDIATE")
        try:
            for statement in statements:
                connection.execute(statement)
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise

    def _retry_locked(self, operation: Callable[[], T]) -> T:
        return retry_with_backoff(
            operation,
            describe_transient=self._describe_locked,
            max_retries=self.max_retries,
            first_delay_s=_BACKOFF_FIRST_S,
            max_delay_s=_BACKOFF_MAX_S,
            logger=logger,
        )

    def _describe_locked(self, exc: Exception) -> str | None:
        if isinstance(exc, sqlite3.OperationalError) and _is_locked_error(exc):
            return f"database {self._path} is locked ({exc})"
        return None

    def _require_connection(self) -> sqlite3.Connection:
        if self._connection is None:
            raise RuntimeError(
                "SQLiteSink got a batch before setup or after teardown; "
                "the engine calls setup(ctx) first in each node process"
            )
        return self._connection


def read_sqlite(
    path: PathLike, query: str, params: Sequence[Any] | Mapping[str, Any] = ()
) -> Iterator[dict[str, Any]]:
    """Run a query on a SQLite database and yield each row as a dict.

    The database is opened read-only, so a typo in `path` cannot create an
    empty database. Keys are the column names of the query. Raises
    `ParameterError` at the call when the file does not exist, and
    `sqlite3.Error` from the first iteration when the query fails.
    """
    file = _as_path(path)
    if not file.is_file():
        raise ParameterError(
            f"database {str(file)!r} not found; "
            "pass an existing SQLite file with -p input=PATH"
        )
    check_statement(query)
    return _iter_query_rows(file, query, params)


def _iter_query_rows(
    file: Path, query: str, params: Sequence[Any] | Mapping[str, Any]
) -> Iterator[dict[str, Any]]:
    connection = sqlite3.connect(f"{file.resolve().as_uri()}?mode=ro", uri=True)
    try:
        connection.row_factory = sqlite3.Row
        for row in connection.execute(query, params):
            yield dict(row)
    finally:
        connection.close()


def _is_locked_error(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        # Extended codes such as SQLITE_BUSY_SNAPSHOT carry the primary code
        # in their low byte.
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


def _as_path(value: Any) -> Path:
    if isinstance(value, Param):
        raise TypeError(
            f"path={value!r} is a Param that was not resolved; "
            "pass ctx.resolve(path) instead"
        )
    if not isinstance(value, str | os.PathLike):
        raise ParameterError(f"invalid path={value!r}: expected a file path")
    return Path(value)
