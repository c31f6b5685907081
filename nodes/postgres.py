"""A batched sink for PostgreSQL.

`PostgresSink` applies each batch in one transaction, so a batch is either
stored whole or not at all, and with `dedupe=True` it stores each item at most
once even when the engine delivers it again. Connecting and reading are in
`nodes.postgres_connection`, and the migration runner is in
`nodes.migrations`. This module re-exports their public names as well, so
that imports such as `from nodes.postgres import migrate_postgres` work.

psycopg is imported inside the functions that connect, because importing it
takes about 0.15 s and loads libpq: importing `nodes` in a pipeline file that
never uses PostgreSQL pays for neither.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
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
from nodes.migrations import (
    MIGRATIONS_TABLE,
    Migration,
    MigrationError,
    find_migrations,
    migrate_postgres,
    migration_status,
)
from nodes.postgres_connection import (
    _BACKOFF_FIRST_S,
    _BACKOFF_MAX_S,
    _check_dsn,
    _check_table_name,
    _error_reason,
    _invalid_dsn_message,
    _is_rejected,
    _open_connection,
    _rejected_message,
    _server_address,
    _table_identifier,
    _unreachable_error,
    connect_postgres,
    read_postgres,
    redact_dsn,
)

if TYPE_CHECKING:
    import psycopg
    from psycopg import sql

    from engine.context import NodeContext

__all__ = [
    "APPLIED_TABLE",
    "MIGRATIONS_TABLE",
    "Migration",
    "MigrationError",
    "PostgresSink",
    "connect_postgres",
    "find_migrations",
    "migrate_postgres",
    "migration_status",
    "read_postgres",
    "redact_dsn",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# The table that records the ids of applied items, in the first schema of the
# connection's search_path unless the sink names another one.
APPLIED_TABLE = "monomyth_applied"

# Key text of the advisory lock that makes concurrent setups of a node's
# processes take turns, because two concurrent `CREATE TABLE IF NOT EXISTS`
# of one table can fail with a unique violation in the system catalog.
_SETUP_LOCK = "monomyth.PostgresSink.setup"


class PostgresSink:
    """A batched sink that runs one SQL statement per row of each item.

    `rows(item)` returns the parameter rows of an item, as an iterable of
    tuples for `%s` placeholders, or of dicts for `%(name)s` placeholders.
    Without `rows`, the item itself is the only row and must be a list, a
    tuple or a dict. Each batch runs `executemany(statement, rows)` over the
    rows of all its items, in one transaction: an error anywhere rolls the
    whole batch back.

    `dsn` is a libpq connection string, as a URL such as
    `postgresql://postgres@127.0.0.1:5432/test` or as `key=value` settings.
    `schema` is one SQL statement or a sequence of them, run in one
    transaction in `setup`, such as `CREATE TABLE IF NOT EXISTS ...`. `dsn`,
    `statement`, `schema` and `dedupe` may be given as a `Param`.

    With `dedupe=True`, the sink records the id of each applied item in a
    table, in the batch's transaction, and skips items whose id is recorded
    there. A batch that is delivered again after a crash between commit and
    acknowledgement then changes nothing. The ids come from `ctx.item_ids`,
    which the engine sets for each batch. The table is `dedupe_table`, as
    `name` or `schema.name`. By default it is `monomyth_applied` in the first
    schema of the connection's search_path. `setup` creates it when missing.
    The ids are the same on every run of a pipeline, so a new run into the
    same database skips every item: empty that table in an `on_start` hook,
    as examples/wordcount.py does, to apply them again.

    A lost connection (a server restart, a network failure), a deadlock or a
    serialization failure makes the sink retry the transaction up to
    `max_retries` times, reconnecting as needed. The wait before a retry
    doubles from 0.1 s up to 5 s, less a random jitter of up to half. Each
    retry logs a WARNING. When the server stays unreachable, the sink raises
    `StreamUnavailableError`. When the server rejects the connection (an
    unknown user or database, a wrong password), the sink raises
    `ParameterError` at once. Other database errors raise the `psycopg.Error`
    as it is. Messages and logs show the DSN with its password as `***`.
    """

    batched = True

    def __init__(
        self,
        dsn: str | Param,
        statement: str | Param,
        rows: Callable[[Any], Iterable[Row]] | None = None,
        schema: str | Sequence[str] | Param = (),
        dedupe: bool | Param = False,
        *,
        dedupe_table: str | None = None,
        max_retries: int = 5,
        connect_timeout_s: float = 10.0,
    ) -> None:
        if not isinstance(dsn, Param) and (not isinstance(dsn, str) or not dsn):
            raise ParameterError(_invalid_dsn_message(dsn))
        check_sink_arguments(statement, schema, dedupe, rows, "PostgresSink")
        if dedupe_table is not None:
            _check_table_name(dedupe_table, "dedupe_table")
        check_max_retries(max_retries, "PostgresSink")
        if not isinstance(connect_timeout_s, int | float) or connect_timeout_s <= 0:
            raise ParameterError(
                f"invalid connect_timeout_s={connect_timeout_s!r} for "
                "PostgresSink: expected a number of seconds above 0"
            )

        self.dsn = dsn
        self.statement = statement
        self.rows = rows
        self.schema = schema
        self.dedupe = dedupe
        self.dedupe_table = dedupe_table
        self.max_retries = max_retries
        self.connect_timeout_s = connect_timeout_s
        # Set by setup in the node process, after the engine unpickled the sink.
        # The connection is in autocommit mode, so every transaction is an
        # explicit `connection.transaction()` block.
        self._connection: psycopg.Connection | None = None
        self._dsn = ""
        self._statement = ""
        self._is_deduped = False
        self._applied_table: sql.Composable | None = None
        self._application_name = "monomyth"
        # True from the end of a successful setup until teardown.
        self._is_set_up = False

    def setup(self, ctx: NodeContext) -> None:
        """Resolve the settings, connect and create the schema."""
        self._dsn = _check_dsn(ctx.resolve(self.dsn))
        self._statement = check_statement(ctx.resolve(self.statement))
        statements = as_statements(ctx.resolve(self.schema))
        self._is_deduped = resolve_dedupe(self.dedupe, ctx, "PostgresSink")
        # pg_stat_activity shows this name, so that a DBA can tell the
        # connections of each node process apart.
        self._application_name = (
            f"monomyth/{ctx.pipeline}.{ctx.node}#{ctx.process_index + 1}"
        )

        try:
            self._run_with_retries(
                lambda connection: self._prepare_database(connection, statements)
            )
        except BaseException:
            self._close_connection()
            raise
        self._is_set_up = True
        logger.debug(
            "connected to PostgreSQL at %s for node %s",
            _server_address(self._dsn),
            ctx.node,
        )

    def __call__(self, items: list[Any], ctx: NodeContext) -> None:
        """Apply the batch in one transaction, retrying on a lost connection."""
        if not self._is_set_up:
            raise RuntimeError(
                "PostgresSink got a batch before setup or after teardown; "
                "the engine calls setup(ctx) first in each node process"
            )
        item_ids = (
            batch_item_ids(items, ctx, "PostgresSink") if self._is_deduped else None
        )

        # NOTE: without dedupe, a connection lost during COMMIT can apply a
        # batch twice, because the sink cannot tell whether the commit reached
        # the server before it retries. dedupe=True makes the retry harmless.
        applied_count = self._run_with_retries(
            lambda connection: self._apply(connection, items, item_ids)
        )
        logger.debug(
            "batch applied to PostgreSQL items=%d skipped=%d",
            applied_count,
            len(items) - applied_count,
        )

    def teardown(self, ctx: NodeContext) -> None:
        """Close the connection."""
        self._close_connection()
        self._is_set_up = False

    def _close_connection(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _prepare_database(
        self, connection: psycopg.Connection, statements: list[str]
    ) -> None:
        from psycopg import sql

        with connection.transaction():
            connection.execute(
                "SELECT pg_advisory_xact_lock(hashtext(%s))", (_SETUP_LOCK,)
            )
            for statement in statements:
                connection.execute(statement)
            if self._is_deduped:
                self._applied_table = self._resolve_applied_table(connection)
                connection.execute(
                    sql.SQL(
                        "CREATE TABLE IF NOT EXISTS {} (id TEXT PRIMARY KEY)"
                    ).format(self._applied_table)
                )

    def _resolve_applied_table(self, connection: psycopg.Connection) -> sql.Composable:
        if self.dedupe_table is not None:
            return _table_identifier(self.dedupe_table)
        from psycopg import sql

        schema = connection.execute("SELECT current_schema()").fetchone()[0]
        if schema is None:
            raise ParameterError(
                "PostgresSink(dedupe=True) found no existing schema in the "
                "search_path of its connection to record applied items in; "
                "create one, or pass dedupe_table='schema.table'"
            )
        return sql.Identifier(schema, APPLIED_TABLE)

    def _apply(
        self,
        connection: psycopg.Connection,
        items: list[Any],
        item_ids: list[str] | None,
    ) -> int:
        with connection.transaction():
            pending = items
            if item_ids is not None:
                pending = self._claim_new_items(connection, items, item_ids)
            with connection.cursor() as cursor:
                cursor.executemany(
                    self._statement, iter_rows(pending, self.rows, "PostgresSink")
                )
        return len(pending)

    def _claim_new_items(
        self, connection: psycopg.Connection, items: list[Any], item_ids: list[str]
    ) -> list[Any]:
        from psycopg import sql

        # RETURNING lists only the ids inserted now: a recorded id conflicts
        # and returns nothing, because its item was applied before.
        query = sql.SQL(
            "INSERT INTO {} (id) SELECT unnest(%s::text[]) "
            "ON CONFLICT (id) DO NOTHING RETURNING id"
        ).format(self._applied_table)
        new_ids = {row[0] for row in connection.execute(query, (item_ids,))}

        new_items = []
        for item, item_id in zip(items, item_ids, strict=True):
            if item_id in new_ids:
                # An id repeated within the batch is applied once.
                new_ids.discard(item_id)
                new_items.append(item)
        return new_items

    def _run_with_retries(self, operation: Callable[[psycopg.Connection], T]) -> T:
        """Run `operation` on the connection, reconnecting after transient errors."""
        return retry_with_backoff(
            lambda: operation(self._connect()),
            describe_transient=self._describe_transient,
            max_retries=self.max_retries,
            first_delay_s=_BACKOFF_FIRST_S,
            max_delay_s=_BACKOFF_MAX_S,
            logger=logger,
            give_up=self._error_after_last_retry,
        )

    def _connect(self) -> psycopg.Connection:
        if self._connection is None:
            self._connection = _open_connection(
                self._dsn, self._application_name, self.connect_timeout_s
            )
        return self._connection

    def _describe_transient(self, exc: Exception) -> str | None:
        import psycopg

        if not isinstance(exc, psycopg.Error):
            return None
        if self._connection is None and _is_rejected(exc):
            raise ParameterError(_rejected_message(self._dsn, exc)) from exc
        problem = self._transient_problem(exc)
        if problem is None:
            return None
        return (
            f"PostgreSQL at {_server_address(self._dsn)}: {problem} "
            f"({_error_reason(exc, self._dsn)})"
        )

    def _error_after_last_retry(
        self, exc: Exception, attempts: int
    ) -> Exception | None:
        # Without a connection, the server stayed unreachable. With one, the
        # last transaction's own error is raised as it is.
        if self._connection is None:
            return _unreachable_error(self._dsn, exc, attempts)
        return None

    def _transient_problem(self, exc: psycopg.Error) -> str | None:
        """Describe a transient error, or return None for an error to raise.

        Closes and drops a broken connection, so that the next attempt
        reconnects. After this call, `self._connection` is None exactly when
        the problem is the connection.
        """
        connection = self._connection
        if connection is None:
            return "connection failed"
        if connection.broken or connection.closed:
            connection.close()
            self._connection = None
            return "connection lost"
        sqlstate = getattr(exc, "sqlstate", None) or ""
        # Class 40 is a transaction that the server rolled back, such as a
        # deadlock between two sink processes updating the same rows.
        if sqlstate.startswith("40"):
            return f"transaction rolled back, SQLSTATE {sqlstate}"
        return None
