"""Connecting to PostgreSQL and reading from it, with DSN checks and redaction.

`connect_postgres` opens a connection whose errors name the server and hide
the password, retrying while the server is unreachable. `read_postgres`
yields the rows of a query for a source node. `PostgresSink` and the
migration runner in `nodes.migrations` use the DSN checks, error reasons and
table name checks of this module.

psycopg is imported inside the functions that use it, so that a pipeline
file that never uses PostgreSQL does not load it and libpq.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from engine.context import Param
from engine.errors import ParameterError, StreamUnavailableError
from nodes._retry import retry_with_backoff
from nodes._sink_options import check_statement

if TYPE_CHECKING:
    import psycopg
    from psycopg import sql

logger = logging.getLogger(__name__)

# The first and the maximum wait before a retry of connect_postgres or
# PostgresSink.
_BACKOFF_FIRST_S = 0.1
_BACKOFF_MAX_S = 5.0
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
_URL_PASSWORD = re.compile(r"^(postgres(?:ql)?://[^:@/?#]*):[^@/?#]*@", re.IGNORECASE)
_KEY_PASSWORD = re.compile(
    r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]*)", re.IGNORECASE
)


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
    dsn = _check_dsn(dsn)
    connection = retry_with_backoff(
        lambda: _open_connection(dsn, application_name, connect_timeout_s),
        describe_transient=lambda exc: _describe_connect_failure(dsn, exc),
        max_retries=max_retries,
        first_delay_s=_BACKOFF_FIRST_S,
        max_delay_s=_BACKOFF_MAX_S,
        logger=logger,
        give_up=lambda exc, attempts: _unreachable_error(dsn, exc, attempts),
    )
    connection.autocommit = autocommit
    return connection


def _describe_connect_failure(dsn: str, exc: Exception) -> str | None:
    import psycopg

    if not isinstance(exc, psycopg.OperationalError):
        return None
    if _is_rejected(exc):
        raise ParameterError(_rejected_message(dsn, exc)) from exc
    return (
        f"connection to PostgreSQL at {_server_address(dsn)} failed "
        f"({_error_reason(exc, dsn)})"
    )


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
    check_statement(query)
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
