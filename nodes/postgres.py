"""A batched sink, a source helper and a migration runner for PostgreSQL.

`PostgresSink` applies each batch in one transaction, so a batch is either
stored whole or not at all, and with `dedupe=True` it stores each item at most
once even when the engine delivers it again. `read_postgres` yields the rows of
a query for a source node. `connect_postgres` opens a connection whose errors
name the server and hide the password, and `migrate_postgres` applies or
reverts the numbered SQL files of a folder.

psycopg is imported inside the functions that connect, because importing it
takes about 0.15 s and loads libpq: importing `nodes` in a pipeline file that
never uses PostgreSQL pays for neither.
"""

from __future__ import annotations

import logging
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from engine.context import Param
from engine.errors import (
    EngineError,
    ParameterError,
    PipelineError,
    StreamUnavailableError,
)
from nodes.sqlite import _as_bool, _as_statements, _check_statement

if TYPE_CHECKING:
    import psycopg
    from psycopg import sql

    from engine.context import NodeContext

logger = logging.getLogger(__name__)

T = TypeVar("T")
# One row of statement parameters: positional for `%s` placeholders, or
# named for `%(name)s` placeholders.
Row = Sequence[Any] | Mapping[str, Any]

# The table that records the ids of applied items, in the first schema of the
# connection's search_path unless the sink names another one.
APPLIED_TABLE = "monomyth_applied"
# The table that records which migrations are applied.
MIGRATIONS_TABLE = "public.monomyth_migrations"

_BACKOFF_FIRST_S = 0.1
_BACKOFF_MAX_S = 5.0
# Key text of the advisory lock that makes concurrent setups of a node's
# processes take turns, because two concurrent `CREATE TABLE IF NOT EXISTS`
# of one table can fail with a unique violation in the system catalog.
_SETUP_LOCK = "monomyth.PostgresSink.setup"
# Phrases of the FATAL connection errors that a retry can fix, because the
# server rejects connections only while it starts, stops or is full.
_TRANSIENT_REJECTIONS = (
    "starting up",
    "shutting down",
    "in recovery mode",
    "not yet accepting connections",
    "too many clients",
)
_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?")
_MIGRATION_FILE = re.compile(r"(\d+)_(\w+)\.(up|down)\.sql")
_URL_PASSWORD = re.compile(r"^(postgres(?:ql)?://[^:@/?#]*):[^@/?#]*@", re.IGNORECASE)
_KEY_PASSWORD = re.compile(
    r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]*)", re.IGNORECASE
)


class MigrationError(EngineError):
    """A migration file is missing, misnamed or failed to run. Fix the file."""


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
        if not isinstance(statement, Param):
            _check_statement(statement)
        if not isinstance(schema, Param):
            _as_statements(schema)
        if not isinstance(dedupe, Param):
            _as_bool(dedupe, "dedupe")
        if rows is not None and not callable(rows):
            raise ParameterError(
                f"invalid rows={rows!r} for PostgresSink: expected a function "
                "from an item to its parameter rows, such as "
                "rows=lambda counts: counts.items()"
            )
        if dedupe_table is not None:
            _check_table_name(dedupe_table, "dedupe_table")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int):
            raise ParameterError(
                f"invalid max_retries={max_retries!r} for PostgresSink: "
                "expected an integer"
            )
        if max_retries < 0:
            raise ParameterError(
                f"invalid max_retries={max_retries} for PostgresSink: "
                "max_retries must be 0 or more"
            )
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
        self._statement = _check_statement(ctx.resolve(self.statement))
        statements = _as_statements(ctx.resolve(self.schema))
        self._is_deduped = _as_bool(ctx.resolve(self.dedupe), "dedupe")
        if self._is_deduped and not hasattr(ctx, "item_ids"):
            raise PipelineError(_missing_item_ids_message(ctx))
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
        item_ids = self._batch_item_ids(items, ctx) if self._is_deduped else None

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
                cursor.executemany(self._statement, self._iter_rows(pending))
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

    def _iter_rows(self, items: list[Any]) -> Iterator[Row]:
        for item in items:
            if self.rows is not None:
                yield from self.rows(item)
            elif isinstance(item, list | tuple | Mapping):
                yield item
            else:
                raise TypeError(
                    f"PostgresSink got an item of type {type(item).__name__}: "
                    f"{item!r}; expected a list, tuple or dict of statement "
                    "parameters, or pass rows= to map each item to its rows"
                )

    def _run_with_retries(self, operation: Callable[[psycopg.Connection], T]) -> T:
        """Run `operation` on the connection, reconnecting after transient errors."""
        import psycopg

        retry = 0
        while True:
            try:
                if self._connection is None:
                    self._connection = _open_connection(
                        self._dsn, self._application_name, self.connect_timeout_s
                    )
                return operation(self._connection)
            except psycopg.Error as exc:
                if self._connection is None and _is_rejected(exc):
                    raise ParameterError(_rejected_message(self._dsn, exc)) from exc
                problem = self._transient_problem(exc)
                if problem is None:
                    raise
                if retry == self.max_retries and self._connection is not None:
                    raise
                if retry == self.max_retries:
                    raise _unreachable_error(self._dsn, exc, retry + 1) from exc
                reason = _error_reason(exc, self._dsn)
            retry += 1
            delay_s = _backoff_s(retry)
            logger.warning(
                "PostgreSQL at %s: %s (%s); retry %d of %d in %.2f s",
                _server_address(self._dsn),
                problem,
                reason,
                retry,
                self.max_retries,
                delay_s,
            )
            time.sleep(delay_s)

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


def connect_postgres(
    dsn: str,
    *,
    autocommit: bool = True,
    application_name: str = "monomyth",
    max_retries: int = 3,
    connect_timeout_s: float = 10.0,
) -> psycopg.Connection:
    """Open a connection to PostgreSQL, retrying while the server is unreachable.

    Use it in pipeline hooks and scripts, as `with connect_postgres(dsn) as
    connection:`, which closes the connection at the end of the block. It
    retries up to `max_retries` times, with the backoff of `PostgresSink`,
    logging a WARNING for each retry. Raises `StreamUnavailableError` when the server
    stays unreachable, and `ParameterError` for an invalid DSN or a connection
    that the server rejects. Their messages name the server's host and port,
    and show the DSN with its password as `***`.
    """
    import psycopg

    dsn = _check_dsn(dsn)
    retry = 0
    while True:
        try:
            connection = _open_connection(dsn, application_name, connect_timeout_s)
        except psycopg.OperationalError as exc:
            if _is_rejected(exc):
                raise ParameterError(_rejected_message(dsn, exc)) from exc
            if retry == max_retries:
                raise _unreachable_error(dsn, exc, retry + 1) from exc
            retry += 1
            delay_s = _backoff_s(retry)
            logger.warning(
                "connection to PostgreSQL at %s failed (%s); retry %d of %d in %.2f s",
                _server_address(dsn),
                _error_reason(exc, dsn),
                retry,
                max_retries,
                delay_s,
            )
            time.sleep(delay_s)
            continue
        connection.autocommit = autocommit
        return connection


def read_postgres(
    dsn: str, query: str, params: Sequence[Any] | Mapping[str, Any] = ()
) -> Iterator[dict[str, Any]]:
    """Run a query on PostgreSQL and yield each row as a dict.

    The query runs in a read-only transaction, and the rows stream from the
    server one at a time, so a large result need not fit in memory. Keys are
    the column names of the query. Bind values with `%s` placeholders and a
    sequence, or `%(name)s` placeholders and a dict.

    Raises `ParameterError` at the call for an invalid DSN or query. The
    first iteration raises `StreamUnavailableError` when the server cannot be
    reached, and `psycopg.Error` when the query fails.
    """
    _check_dsn(dsn)
    _check_statement(query)
    return _iter_query_rows(dsn, query, params)


def _iter_query_rows(
    dsn: str, query: str, params: Sequence[Any] | Mapping[str, Any]
) -> Iterator[dict[str, Any]]:
    from psycopg.rows import dict_row

    connection = connect_postgres(
        dsn, autocommit=False, application_name="monomyth/read_postgres"
    )
    try:
        connection.read_only = True
        with connection.cursor(row_factory=dict_row) as cursor:
            # Without parameters, psycopg sends the query as it is, so a `%`
            # in it needs no escaping.
            yield from cursor.stream(query, params or None)
    finally:
        connection.close()


@dataclass(frozen=True, slots=True)
class Migration:
    """One numbered migration: the SQL files that apply and revert it."""

    # The digits that start the file names, such as "0001". Migrations run in
    # the numeric order of their versions.
    version: str
    name: str
    up_path: Path
    down_path: Path

    @property
    def label(self) -> str:
        """The migration's file name stem, such as `0001_map_reduce`."""
        return f"{self.version}_{self.name}"


def find_migrations(folder: str | os.PathLike[str]) -> list[Migration]:
    """Return the migrations in `folder`, oldest version first.

    Each migration is a pair of files, `NNNN_name.up.sql` and
    `NNNN_name.down.sql`. Raises `MigrationError` for a missing folder, a
    `.sql` file with another name, a file without its pair, or two
    migrations with one version number.
    """
    root = Path(folder)
    if not root.is_dir():
        raise MigrationError(f"migrations folder {str(root)!r} not found")

    pairs: dict[tuple[str, str], dict[str, Path]] = {}
    for path in sorted(root.glob("*.sql")):
        match = _MIGRATION_FILE.fullmatch(path.name)
        if match is None:
            raise MigrationError(
                f"invalid migration file name {path.name!r} in {str(root)!r}; "
                "expected NNNN_name.up.sql or NNNN_name.down.sql"
            )
        version, name, direction = match.groups()
        pairs.setdefault((version, name), {})[direction] = path

    migrations = []
    for (version, name), paths in pairs.items():
        for direction in ("up", "down"):
            if direction not in paths:
                raise MigrationError(
                    f"missing migration file {version}_{name}.{direction}.sql "
                    f"in {str(root)!r}; each migration needs an up and a down file"
                )
        migrations.append(Migration(version, name, paths["up"], paths["down"]))
    migrations.sort(key=lambda migration: int(migration.version))

    for earlier, later in zip(migrations, migrations[1:], strict=False):
        if int(earlier.version) == int(later.version):
            raise MigrationError(
                f"migrations {earlier.label!r} and {later.label!r} in "
                f"{str(root)!r} have the same version; renumber one of them"
            )
    return migrations


def migrate_postgres(
    dsn: str,
    folder: str | os.PathLike[str],
    direction: Literal["up", "down"],
    *,
    table: str = MIGRATIONS_TABLE,
) -> list[Migration]:
    """Apply the migrations of `folder` that are not applied, or revert them.

    `up` applies each pending migration, oldest first; `down` reverts each
    applied one, newest first. Each migration runs in its own transaction
    together with its row in `table`, so a failed file leaves nothing of
    itself behind. An advisory lock makes concurrent runs take turns, so a
    migration never runs twice. Returns the migrations applied or reverted:
    an empty list when there was nothing to do.

    Raises `MigrationError` naming the file when one fails or the folder is
    invalid, and the errors of `connect_postgres`.

    Limits: a file must not contain BEGIN or COMMIT, which would end the
    migration's transaction early. Projects that share one database need a
    `table` each when their versions overlap.
    """
    if direction not in ("up", "down"):
        raise ParameterError(
            f"invalid migration direction {direction!r}: expected 'up' or 'down'"
        )
    migrations = find_migrations(folder)
    table_name = _table_identifier(_check_table_name(table, "table"))

    done = []
    with connect_postgres(dsn, application_name="monomyth/migrate") as connection:
        _create_migrations_table(connection, table, table_name)
        applied = _applied_versions(connection, table_name)
        if direction == "up":
            steps = [m for m in migrations if m.version not in applied]
        else:
            _check_known_versions(applied, migrations, folder)
            steps = [m for m in reversed(migrations) if m.version in applied]

        for migration in steps:
            if _run_migration(connection, migration, direction, table, table_name):
                done.append(migration)
    return done


def migration_status(
    dsn: str, folder: str | os.PathLike[str], *, table: str = MIGRATIONS_TABLE
) -> list[tuple[Migration, datetime | None]]:
    """Return each migration of `folder` with the time it was applied, or None.

    Reads only: a database without `table` has every migration pending.
    """
    migrations = find_migrations(folder)
    table_name = _table_identifier(_check_table_name(table, "table"))

    with connect_postgres(dsn, application_name="monomyth/migrate") as connection:
        exists = connection.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0]
        applied = _applied_versions(connection, table_name) if exists else {}
    return [(migration, applied.get(migration.version)) for migration in migrations]


def _create_migrations_table(
    connection: psycopg.Connection, table: str, table_name: sql.Composable
) -> None:
    from psycopg import sql

    with connection.transaction():
        _lock_migrations(connection, table)
        connection.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (version TEXT PRIMARY KEY, "
                "name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            ).format(table_name)
        )


def _applied_versions(
    connection: psycopg.Connection, table_name: sql.Composable
) -> dict[str, datetime]:
    from psycopg import sql

    query = sql.SQL("SELECT version, applied_at FROM {}").format(table_name)
    return dict(connection.execute(query).fetchall())


def _check_known_versions(
    applied: Mapping[str, datetime],
    migrations: list[Migration],
    folder: str | os.PathLike[str],
) -> None:
    known = {migration.version for migration in migrations}
    unknown = sorted(version for version in applied if version not in known)
    if unknown:
        raise MigrationError(
            f"migration {unknown[0]} is applied, but {str(folder)!r} contains no "
            "files for it, so it cannot be reverted; restore its files first"
        )


def _run_migration(
    connection: psycopg.Connection,
    migration: Migration,
    direction: Literal["up", "down"],
    table: str,
    table_name: sql.Composable,
) -> bool:
    """Apply or revert one migration; return False when another run did it first."""
    import psycopg
    from psycopg import sql

    path = migration.up_path if direction == "up" else migration.down_path
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise MigrationError(f"migration file {str(path)!r} is empty")

    with connection.transaction():
        _lock_migrations(connection, table)
        # Check again under the lock: a concurrent run may have done it.
        is_applied = migration.version in _applied_versions(connection, table_name)
        if is_applied == (direction == "up"):
            return False
        try:
            connection.execute(text)
        except psycopg.Error as exc:
            raise MigrationError(
                f"migration file {path.name!r} failed: {_error_reason(exc, '')}; "
                "it was rolled back, so fix the file and run again"
            ) from exc
        if direction == "up":
            record = sql.SQL("INSERT INTO {} (version, name) VALUES (%s, %s)")
            connection.execute(
                record.format(table_name), (migration.version, migration.name)
            )
        else:
            delete = sql.SQL("DELETE FROM {} WHERE version = %s")
            connection.execute(delete.format(table_name), (migration.version,))
    logger.info(
        "migration %s %s",
        migration.label,
        "applied" if direction == "up" else "reverted",
    )
    return True


def _lock_migrations(connection: psycopg.Connection, table: str) -> None:
    connection.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (table,))


def redact_dsn(dsn: str) -> str:
    """Return `dsn` with its password replaced by `***`, for logs and errors."""
    dsn = _URL_PASSWORD.sub(r"\1:***@", dsn)
    return _KEY_PASSWORD.sub(r"\1***", dsn)


def _open_connection(
    dsn: str, application_name: str, connect_timeout_s: float
) -> psycopg.Connection:
    import psycopg

    return psycopg.connect(
        dsn,
        autocommit=True,
        application_name=application_name,
        # libpq takes whole seconds, and treats 0 as no timeout.
        connect_timeout=max(1, round(connect_timeout_s)),
    )


def _check_dsn(dsn: Any) -> str:
    from psycopg.conninfo import conninfo_to_dict

    if isinstance(dsn, Param):
        raise TypeError(
            f"dsn={dsn!r} is a Param that was not resolved; "
            "pass ctx.resolve(dsn) instead"
        )
    if not isinstance(dsn, str) or not dsn:
        raise ParameterError(_invalid_dsn_message(dsn))
    try:
        conninfo_to_dict(dsn)
    except Exception:
        # psycopg's message quotes the DSN with its password, so leave it out.
        raise ParameterError(_invalid_dsn_message(dsn)) from None
    return dsn


def _invalid_dsn_message(dsn: Any) -> str:
    redacted = redact_dsn(dsn) if isinstance(dsn, str) else dsn
    return (
        f"invalid dsn={redacted!r}: expected a PostgreSQL connection string such as "
        "postgresql://postgres@127.0.0.1:5432/test or 'host=127.0.0.1 dbname=test'"
    )


def _server_address(dsn: str) -> str:
    """Return the `host:port` that libpq connects to for `dsn`."""
    from psycopg.conninfo import conninfo_to_dict

    settings = conninfo_to_dict(dsn)
    host = settings.get("host") or os.environ.get("PGHOST") or "localhost"
    port = settings.get("port") or os.environ.get("PGPORT") or "5432"
    return f"{host}:{port}"


def _error_reason(exc: BaseException, dsn: str) -> str:
    """Return the first line of a psycopg error, without the DSN's password."""
    from psycopg.conninfo import conninfo_to_dict

    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    reason = lines[0]
    # A connection error reads 'connection failed: connection to server at
    # "HOST", port PORT failed: REASON'. Keep the reason, because the callers
    # name the address themselves.
    if "failed: " in reason:
        reason = reason.rsplit("failed: ", 1)[1]
    reason = reason.removeprefix("FATAL:").strip()
    password = conninfo_to_dict(dsn).get("password") if dsn else None
    if password:
        reason = reason.replace(str(password), "***")
    return reason[:1].lower() + reason[1:]


def _is_rejected(exc: BaseException) -> bool:
    """Tell whether the server rejected a connection for a reason that lasts."""
    message = str(exc)
    if "FATAL:" not in message:
        return False
    return not any(phrase in message for phrase in _TRANSIENT_REJECTIONS)


def _rejected_message(dsn: str, exc: BaseException) -> str:
    return (
        f"PostgreSQL at {_server_address(dsn)} rejected the connection "
        f"({_error_reason(exc, dsn)}); check the user, password and database "
        f"of the DSN {redact_dsn(dsn)!r}"
    )


def _unreachable_error(
    dsn: str, exc: BaseException, attempts: int
) -> StreamUnavailableError:
    return StreamUnavailableError(
        f"connection to PostgreSQL at {_server_address(dsn)} failed "
        f"({_error_reason(exc, dsn)}) after {attempts} attempts; start the "
        f"server, or check the DSN {redact_dsn(dsn)!r}"
    )


def _backoff_s(retry: int) -> float:
    delay_s = min(_BACKOFF_FIRST_S * 2 ** (retry - 1), _BACKOFF_MAX_S)
    # Random jitter spreads out the processes that lost one server together.
    return delay_s * random.uniform(0.5, 1.0)


def _check_table_name(name: Any, argument: str) -> str:
    if not isinstance(name, str) or not _TABLE_NAME.fullmatch(name):
        raise ParameterError(
            f"invalid {argument}={name!r}: expected a table name or "
            "schema.table, of letters, digits and '_'"
        )
    return name


def _table_identifier(name: str) -> sql.Composable:
    from psycopg import sql

    # PostgreSQL folds unquoted names to lowercase; quoting keeps the case,
    # so fold first to name the same table as the unquoted SQL does.
    return sql.Identifier(*name.lower().split("."))


def _missing_item_ids_message(ctx: NodeContext) -> str:
    return (
        f"PostgresSink(dedupe=True) in node {ctx.node!r} needs the item ids "
        "of each batch in ctx.item_ids, and this engine does not set them; "
        "pass dedupe=False"
    )
