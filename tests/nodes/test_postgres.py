"""Tests for the PostgreSQL sink, source and migration runner in nodes.postgres.

Each test that needs the server works in a schema of its own, named with a
random suffix and dropped afterwards, because the database persists between
runs and xdist runs tests side by side.
"""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cloudpickle
import psycopg
import pytest
from psycopg import sql

from engine.context import NodeContext, param
from engine.errors import ParameterError, PipelineError, StreamUnavailableError
from nodes.postgres import (
    MigrationError,
    PostgresSink,
    find_migrations,
    migrate_postgres,
    migration_status,
    read_postgres,
    redact_dsn,
)
from tests.helpers import POSTGRES_DSN, require_service

WORD_COUNTS_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS word_counts "
    "(word TEXT PRIMARY KEY, word_count BIGINT NOT NULL)"
)
UPSERT_COUNT = (
    "INSERT INTO word_counts (word, word_count) VALUES (%s, %s) "
    "ON CONFLICT (word) DO UPDATE "
    "SET word_count = word_counts.word_count + EXCLUDED.word_count"
)
SECRET_PASSWORD = "s3cret-Pa55"


@dataclass(frozen=True)
class Schema:
    """A schema of the test's own, and a DSN whose search_path starts there."""

    name: str
    dsn: str


@pytest.fixture
def schema() -> Iterator[Schema]:
    require_service("PostgreSQL", 5432)
    name = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    try:
        yield Schema(name, f"{POSTGRES_DSN}?options=-csearch_path%3D{name}")
    finally:
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as connection:
            connection.execute(
                sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name))
            )


def make_context(params: dict[str, Any] | None = None, node: str = "n") -> NodeContext:
    return NodeContext(pipeline="p", node=node, params=params or {})


def counts_sink(dsn: Any, dedupe: bool = False, **options: Any) -> PostgresSink:
    sink = PostgresSink(
        dsn,
        UPSERT_COUNT,
        rows=lambda counts: counts.items(),
        schema=WORD_COUNTS_SCHEMA,
        dedupe=dedupe,
        **options,
    )
    # The engine sends each node object to its process with cloudpickle.
    return cloudpickle.loads(cloudpickle.dumps(sink))


def read_counts(schema: Schema) -> dict[str, int]:
    rows = read_postgres(schema.dsn, "SELECT word, word_count FROM word_counts")
    return {row["word"]: row["word_count"] for row in rows}


def table_exists(schema: str, table: str) -> bool:
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as connection:
        found = connection.execute(
            "SELECT to_regclass(%s)", (f'"{schema}".{table}',)
        ).fetchone()[0]
    return found is not None


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_postgres_sink_upserts_word_counts(schema: Schema) -> None:
    sink = counts_sink(schema.dsn)
    ctx = make_context()
    sink.setup(ctx)

    sink([{"a": 1, "b": 2}, {"a": 3}], ctx)
    sink([{"b": 1, "c": 5}], ctx)
    sink.teardown(ctx)

    assert read_counts(schema) == {"a": 4, "b": 3, "c": 5}


def test_postgres_sink_rolls_back_failed_batch(schema: Schema) -> None:
    sink = counts_sink(schema.dsn)
    ctx = make_context()
    sink.setup(ctx)
    sink([{"a": 1}], ctx)

    with pytest.raises(psycopg.errors.NotNullViolation):
        sink([{"a": 10, "b": 2}, {"c": None}], ctx)
    sink([{"d": 4}], ctx)
    sink.teardown(ctx)

    assert read_counts(schema) == {"a": 1, "d": 4}


def test_postgres_sink_rolls_back_failing_rows(schema: Schema) -> None:
    def rows(item: dict[str, int]) -> list[tuple[str, int]]:
        if "poison" in item:
            raise KeyError("poison")
        return list(item.items())

    sink = PostgresSink(schema.dsn, UPSERT_COUNT, rows=rows, schema=WORD_COUNTS_SCHEMA)
    ctx = make_context()
    sink.setup(ctx)

    with pytest.raises(KeyError):
        sink([{"a": 1}, {"poison": 1}], ctx)
    sink([{"b": 1}], ctx)
    sink.teardown(ctx)

    assert read_counts(schema) == {"b": 1}


def test_postgres_sink_writes_items_as_rows(schema: Schema) -> None:
    table = "CREATE TABLE pairs (key TEXT, value INTEGER)"
    positional = PostgresSink(
        schema.dsn, "INSERT INTO pairs VALUES (%s, %s)", schema=[table]
    )
    named = PostgresSink(schema.dsn, "INSERT INTO pairs VALUES (%(key)s, %(value)s)")
    ctx = make_context()

    positional.setup(ctx)
    positional([["a", 1], ("b", 2)], ctx)
    positional.teardown(ctx)
    named.setup(ctx)
    named([{"key": "c", "value": 3}], ctx)
    named.teardown(ctx)

    rows = list(read_postgres(schema.dsn, "SELECT key, value FROM pairs ORDER BY key"))
    assert rows == [
        {"key": "a", "value": 1},
        {"key": "b", "value": 2},
        {"key": "c", "value": 3},
    ]


def test_postgres_sink_rejects_scalar_item(schema: Schema) -> None:
    sink = PostgresSink(
        schema.dsn, "INSERT INTO t VALUES (%s)", schema="CREATE TABLE t (x TEXT)"
    )
    ctx = make_context()
    sink.setup(ctx)

    with pytest.raises(TypeError, match="pass rows="):
        sink(["text"], ctx)
    sink.teardown(ctx)


def test_postgres_sink_dedupe_skips_applied_ids(schema: Schema) -> None:
    sink = counts_sink(schema.dsn, dedupe=True)
    ctx = make_context()
    sink.setup(ctx)

    ctx.item_ids = ["m1", "m2"]
    sink([{"a": 1}, {"b": 1}], ctx)
    ctx.item_ids = ["m2", "m3", "m3"]
    sink([{"b": 1}, {"c": 1}, {"c": 1}], ctx)
    sink.teardown(ctx)

    assert read_counts(schema) == {"a": 1, "b": 1, "c": 1}
    # Without dedupe_table, the ids go to the first schema of the search_path.
    assert table_exists(schema.name, "monomyth_applied")


def test_postgres_sink_dedupe_survives_reopen(schema: Schema) -> None:
    ctx = make_context()
    first = counts_sink(schema.dsn, dedupe=True)
    first.setup(ctx)
    ctx.item_ids = ["m1"]
    first([{"a": 1}], ctx)
    first.teardown(ctx)

    second = counts_sink(schema.dsn, dedupe=True)
    second.setup(ctx)
    ctx.item_ids = ["m1", "m2"]
    second([{"a": 1}, {"b": 1}], ctx)
    second.teardown(ctx)

    assert read_counts(schema) == {"a": 1, "b": 1}


def test_postgres_sink_dedupe_rolls_back_ids(schema: Schema) -> None:
    sink = counts_sink(schema.dsn, dedupe=True)
    ctx = make_context()
    sink.setup(ctx)

    ctx.item_ids = ["m1", "m2"]
    with pytest.raises(psycopg.errors.NotNullViolation):
        sink([{"a": 1}, {"b": None}], ctx)
    ctx.item_ids = ["m1"]
    sink([{"a": 1}], ctx)
    sink.teardown(ctx)

    assert read_counts(schema) == {"a": 1}


def test_postgres_sink_dedupe_table_chosen(schema: Schema) -> None:
    other = f"{schema.name}_ids"
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(other)))
    sink = counts_sink(schema.dsn, dedupe=True, dedupe_table=f"{other}.Applied_Ids")
    ctx = make_context()

    try:
        sink.setup(ctx)
        ctx.item_ids = ["m1"]
        sink([{"a": 1}], ctx)
        sink([{"a": 1}], ctx)
        sink.teardown(ctx)
        has_chosen_table = table_exists(other, "applied_ids")
    finally:
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as connection:
            connection.execute(
                sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(other))
            )

    assert read_counts(schema) == {"a": 1}
    assert has_chosen_table
    assert not table_exists(schema.name, "monomyth_applied")


def test_postgres_sink_dedupe_needs_item_ids(schema: Schema) -> None:
    sink = counts_sink(schema.dsn, dedupe=True)
    ctx = make_context(node="count")
    sink.setup(ctx)

    with pytest.raises(PipelineError) as caught:
        sink([{"a": 1}], ctx)
    sink.teardown(ctx)

    assert "ctx.item_ids" in str(caught.value)
    assert "'count'" in str(caught.value)


def test_postgres_sink_resolves_params(schema: Schema) -> None:
    sink = PostgresSink(
        param("dsn"),
        param("statement"),
        rows=lambda counts: counts.items(),
        schema=param("schema"),
        dedupe=param("dedupe"),
    )
    sink = cloudpickle.loads(cloudpickle.dumps(sink))
    ctx = make_context(
        {
            "dsn": schema.dsn,
            "statement": UPSERT_COUNT,
            "schema": WORD_COUNTS_SCHEMA,
            "dedupe": "true",
        }
    )
    sink.setup(ctx)

    ctx.item_ids = ["m1"]
    sink([{"a": 2}], ctx)
    sink([{"a": 2}], ctx)
    sink.teardown(ctx)

    assert read_counts(schema) == {"a": 2}


def test_postgres_sink_missing_param_raises() -> None:
    sink = counts_sink(param("dsn"))

    with pytest.raises(ParameterError) as caught:
        sink.setup(make_context({"input": "in.txt"}))

    assert "'dsn'" in str(caught.value)
    assert "-p dsn=VALUE" in str(caught.value)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"dsn": ""}, "invalid dsn"),
        ({"statement": ""}, "invalid SQL statement"),
        ({"schema": 5}, "invalid schema"),
        ({"dedupe": "maybe"}, "invalid dedupe"),
        ({"rows": "items"}, "invalid rows"),
        ({"dedupe_table": "a.b.c"}, "invalid dedupe_table"),
        ({"dedupe_table": "ids; DROP TABLE x"}, "invalid dedupe_table"),
        ({"max_retries": -1}, "invalid max_retries"),
        ({"connect_timeout_s": 0}, "invalid connect_timeout_s"),
    ],
)
def test_postgres_sink_rejects_invalid_settings(
    arguments: dict[str, Any], message: str
) -> None:
    settings: dict[str, Any] = {"dsn": POSTGRES_DSN, "statement": "SELECT 1"}
    settings.update(arguments)

    with pytest.raises(ParameterError, match=message):
        PostgresSink(**settings)


def test_postgres_sink_invalid_dsn_hides_password() -> None:
    dsn = f"host=127.0.0.1 password={SECRET_PASSWORD} garbage"
    sink = counts_sink(dsn)

    with pytest.raises(ParameterError) as caught:
        sink.setup(make_context())

    assert "invalid dsn" in str(caught.value)
    assert SECRET_PASSWORD not in str(caught.value)


def test_postgres_sink_refused_connection_raises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    dsn = f"postgresql://postgres:{SECRET_PASSWORD}@127.0.0.1:{port}/test"
    sink = counts_sink(dsn, max_retries=1)
    caplog.set_level(logging.WARNING, logger="nodes.postgres")

    with pytest.raises(StreamUnavailableError) as caught:
        sink.setup(make_context())

    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message
    assert "connection refused" in message
    assert "start the server" in message
    assert "postgres:***@" in message
    assert SECRET_PASSWORD not in message
    assert "retry 1 of 1" in caplog.text
    assert SECRET_PASSWORD not in caplog.text
    with pytest.raises(RuntimeError, match="before setup"):
        sink([{"a": 1}], make_context())


def test_postgres_sink_rejected_connection_raises() -> None:
    require_service("PostgreSQL", 5432)
    role = f"no_such_role_{uuid.uuid4().hex[:8]}"
    sink = counts_sink(f"postgresql://{role}@127.0.0.1:5432/test")

    with pytest.raises(ParameterError) as caught:
        sink.setup(make_context())

    assert "rejected the connection" in str(caught.value)
    assert role in str(caught.value)


def test_postgres_sink_reconnects_after_lost_connection(
    schema: Schema, caplog: pytest.LogCaptureFixture
) -> None:
    node = f"store_{uuid.uuid4().hex[:8]}"
    sink = counts_sink(schema.dsn, dedupe=True)
    ctx = make_context(node=node)
    sink.setup(ctx)
    ctx.item_ids = ["m1"]
    sink([{"a": 1}], ctx)
    caplog.set_level(logging.WARNING, logger="nodes.postgres")

    # Given the server ends the sink's session, as a restart would,
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as admin:
        ended = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = %s",
            (f"monomyth/p.{node}#1",),
        ).fetchall()
    # when the next batch runs, then the sink reconnects and applies it.
    ctx.item_ids = ["m1", "m2"]
    sink([{"a": 1}, {"b": 1}], ctx)
    sink.teardown(ctx)

    assert ended == [(True,)]
    assert "connection lost" in caplog.text
    assert "retry 1 of 5" in caplog.text
    assert read_counts(schema) == {"a": 1, "b": 1}


def test_postgres_sink_invalid_schema_fails_setup(schema: Schema) -> None:
    sink = PostgresSink(
        schema.dsn,
        "INSERT INTO t VALUES (%s)",
        schema=["CREATE TABLE t (x TEXT)", "CREATE TABLE t (x TEXT)"],
    )

    with pytest.raises(psycopg.errors.DuplicateTable):
        sink.setup(make_context())
    sink.teardown(make_context())

    assert not table_exists(schema.name, "t")


def test_postgres_sink_rejects_batch_before_setup() -> None:
    sink = counts_sink(POSTGRES_DSN)

    with pytest.raises(RuntimeError, match="before setup"):
        sink([{"a": 1}], make_context())


def test_read_postgres_binds_query_params(schema: Schema) -> None:
    with psycopg.connect(schema.dsn, autocommit=True) as connection:
        connection.execute("CREATE TABLE counts (word TEXT, n INTEGER)")
        connection.execute("INSERT INTO counts VALUES ('a', 1), ('b', 5), ('c', 9)")

    positional = list(
        read_postgres(
            schema.dsn, "SELECT word FROM counts WHERE n > %s ORDER BY word", (2,)
        )
    )
    named = list(
        read_postgres(
            schema.dsn,
            "SELECT word FROM counts WHERE n < %(maximum)s ORDER BY word",
            {"maximum": 6},
        )
    )
    literal = list(read_postgres(schema.dsn, "SELECT 'x%' AS pattern"))

    assert positional == [{"word": "b"}, {"word": "c"}]
    assert named == [{"word": "a"}, {"word": "b"}]
    assert literal == [{"pattern": "x%"}]


def test_read_postgres_runs_read_only(schema: Schema) -> None:
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        list(read_postgres(schema.dsn, "CREATE TABLE t (x TEXT)"))

    assert not table_exists(schema.name, "t")


def test_read_postgres_refused_connection_raises() -> None:
    port = free_port()
    dsn = f"host=127.0.0.1 port={port} user=postgres password={SECRET_PASSWORD}"
    rows = read_postgres(dsn, "SELECT 1")

    with pytest.raises(StreamUnavailableError) as caught:
        next(rows)

    assert f"127.0.0.1:{port}" in str(caught.value)
    assert SECRET_PASSWORD not in str(caught.value)


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        ("postgresql://bob:pw@db:5432/x", "postgresql://bob:***@db:5432/x"),
        ("postgres://bob@db/x", "postgres://bob@db/x"),
        (
            "postgresql://db/x?password=pw&sslmode=off",
            "postgresql://db/x?password=***&sslmode=off",
        ),
        ("host=db password=pw user=bob", "host=db password=*** user=bob"),
        ("host=db password = 'p w' user=bob", "host=db password = *** user=bob"),
    ],
)
def test_redact_dsn_hides_password(dsn: str, shown: str) -> None:
    assert redact_dsn(dsn) == shown


def write_migration(folder: Path, label: str, up: str, down: str) -> None:
    (folder / f"{label}.up.sql").write_text(up)
    (folder / f"{label}.down.sql").write_text(down)


def test_migrate_postgres_applies_in_order(schema: Schema, tmp_path: Path) -> None:
    write_migration(
        tmp_path,
        "0002_add_total",
        "ALTER TABLE t ADD total INT;",
        "ALTER TABLE t DROP total;",
    )
    write_migration(tmp_path, "0001_create", "CREATE TABLE t (x INT);", "DROP TABLE t;")
    table = f"{schema.name}.migrations"

    first = migrate_postgres(schema.dsn, tmp_path, "up", table=table)
    second = migrate_postgres(schema.dsn, tmp_path, "up", table=table)
    states = migration_status(schema.dsn, tmp_path, table=table)
    reverted = migrate_postgres(schema.dsn, tmp_path, "down", table=table)

    assert [m.label for m in first] == ["0001_create", "0002_add_total"]
    assert second == []
    assert [(m.label, at is not None) for m, at in states] == [
        ("0001_create", True),
        ("0002_add_total", True),
    ]
    assert [m.label for m in reverted] == ["0002_add_total", "0001_create"]
    assert not table_exists(schema.name, "t")


def test_migrate_postgres_rolls_back_failed_file(
    schema: Schema, tmp_path: Path
) -> None:
    write_migration(
        tmp_path,
        "0001_broken",
        "CREATE TABLE t (x INT); INSERT INTO no_such_table VALUES (1);",
        "DROP TABLE t;",
    )
    table = f"{schema.name}.migrations"

    with pytest.raises(MigrationError) as caught:
        migrate_postgres(schema.dsn, tmp_path, "up", table=table)
    states = migration_status(schema.dsn, tmp_path, table=table)

    assert "0001_broken.up.sql" in str(caught.value)
    assert "no_such_table" in str(caught.value)
    assert not table_exists(schema.name, "t")
    assert [at for _, at in states] == [None]


def test_migration_status_reads_only(schema: Schema, tmp_path: Path) -> None:
    write_migration(tmp_path, "0001_create", "CREATE TABLE t (x INT);", "DROP TABLE t;")

    states = migration_status(schema.dsn, tmp_path, table=f"{schema.name}.ledger")

    assert [(m.label, at) for m, at in states] == [("0001_create", None)]
    assert not table_exists(schema.name, "ledger")


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (["0001_a.up.sql"], "missing migration file 0001_a.down.sql"),
        (["notes.sql"], "invalid migration file name 'notes.sql'"),
        (
            ["1_a.up.sql", "1_a.down.sql", "01_b.up.sql", "01_b.down.sql"],
            "have the same version",
        ),
    ],
)
def test_find_migrations_rejects_bad_folder(
    tmp_path: Path, files: list[str], message: str
) -> None:
    for name in files:
        (tmp_path / name).write_text("SELECT 1;")

    with pytest.raises(MigrationError, match=message):
        find_migrations(tmp_path)
