"""A batched sink and a source helper for SQLite databases.

`SQLiteSink` applies each batch in one transaction, so a batch is either
stored whole or not at all, and with `dedupe=True` it stores each item at most
once even when the engine delivers it again. `read_sqlite` yields the rows of
a query for a source node.
"""

from __future__ import annotations

import logging
import os
import random
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from engine.context import Param
from engine.errors import ParameterError, PipelineError

if TYPE_CHECKING:
    from engine.context import NodeContext

logger = logging.getLogger(__name__)

T = TypeVar("T")
PathLike = str | os.PathLike[str]
# One row of statement parameters: positional, or named for `:name` placeholders.
Row = Sequence[Any] | Mapping[str, Any]

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
    for each batch.

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
        if not isinstance(statement, Param):
            _check_statement(statement)
        if not isinstance(schema, Param):
            _as_statements(schema)
        if not isinstance(dedupe, Param):
            _as_bool(dedupe, "dedupe")
        if rows is not None and not callable(rows):
            raise ParameterError(
                f"invalid rows={rows!r} for SQLiteSink: expected a function "
                "from an item to its parameter rows, such as "
                "rows=lambda counts: counts.items()"
            )
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
        if isinstance(max_retries, bool) or not isinstance(max_retries, int):
            raise ParameterError(
                f"invalid max_retries={max_retries!r} for SQLiteSink: "
                "expected an integer"
            )
        if max_retries < 0:
            raise ParameterError(
                f"invalid max_retries={max_retries} for SQLiteSink: "
                "max_retries must be 0 or more"
            )

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
        self._statement = _check_statement(ctx.resolve(self.statement))
        statements = _as_statements(ctx.resolve(self.schema))
        self._is_deduped = _as_bool(ctx.resolve(self.dedupe), "dedupe")
        if self._is_deduped and not hasattr(ctx, "item_ids"):
            raise PipelineError(_missing_item_ids_message(ctx))
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
        item_ids = self._batch_item_ids(items, ctx) if self._is_deduped else None

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
            connection.executemany(self._statement, self._iter_rows(merged))
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

    def _iter_rows(self, items: list[Any]) -> Iterator[Row]:
        for item in items:
            if self.rows is not None:
                yield from self.rows(item)
            elif isinstance(item, list | tuple | Mapping):
                yield item
            else:
                raise TypeError(
                    f"SQLiteSink got an item of type {type(item).__name__}: "
                    f"{item!r}; expected a list, tuple or dict of statement "
                    "parameters, or pass rows= to map each item to its rows"
                )

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
        for retry in range(1, self.max_retries + 1):
            try:
                return operation()
            except sqlite3.OperationalError as exc:
                if not _is_locked_error(exc):
                    raise
                delay_s = min(_BACKOFF_FIRST_S * 2 ** (retry - 1), _BACKOFF_MAX_S)
                # Random jitter spreads out processes that waited on one lock.
                delay_s *= random.uniform(0.5, 1.0)
                logger.warning(
                    "database %s is locked (%s); retry %d of %d in %.2f s",
                    self._path,
                    exc,
                    retry,
                    self.max_retries,
                    delay_s,
                )
                time.sleep(delay_s)
        return operation()

    def _batch_item_ids(self, items: list[Any], ctx: NodeContext) -> list[str]:
        item_ids = getattr(ctx, "item_ids", None)
        if item_ids is None or (items and not item_ids):
            raise PipelineError(_missing_item_ids_message(ctx))
        if len(item_ids) != len(items):
            raise RuntimeError(
                f"ctx.item_ids has {len(item_ids)} ids for a batch of "
                f"{len(items)} items in node {ctx.node!r}; the engine must "
                "give one id per item"
            )
        return [str(item_id) for item_id in item_ids]

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
    _check_statement(query)
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


def _missing_item_ids_message(ctx: NodeContext) -> str:
    return (
        f"SQLiteSink(dedupe=True) in node {ctx.node!r} needs the item ids "
        "of each batch in ctx.item_ids, and this engine does not set them; "
        "pass dedupe=False"
    )


def _as_path(value: Any) -> Path:
    if isinstance(value, Param):
        raise TypeError(
            f"path={value!r} is a Param that was not resolved; "
            "pass ctx.resolve(path) instead"
        )
    if not isinstance(value, str | os.PathLike):
        raise ParameterError(f"invalid path={value!r}: expected a file path")
    return Path(value)


def _check_statement(statement: Any) -> str:
    if not isinstance(statement, str) or not statement.strip():
        raise ParameterError(
            f"invalid SQL statement {statement!r}: expected a non-empty string"
        )
    return statement


def _as_statements(schema: Any) -> list[str]:
    if isinstance(schema, str):
        return [_check_statement(schema)]
    if not isinstance(schema, Sequence):
        raise ParameterError(
            f"invalid schema={schema!r}: expected an SQL statement or a list of them"
        )
    return [_check_statement(statement) for statement in schema]


def _as_bool(value: Any, name: str) -> bool:
    # A run parameter given on the command line may be text, such as "true".
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "0", "no"):
        return False
    raise ParameterError(f"invalid {name}={value!r}: expected true or false")
