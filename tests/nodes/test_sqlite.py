"""Tests for the SQLite sink and source in nodes.sqlite."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

from engine.context import NodeContext, param
from engine.errors import ParameterError, PipelineError
from nodes.sqlite import SQLiteSink, read_sqlite

WORD_COUNTS_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS word_counts "
    "(word TEXT PRIMARY KEY, count INTEGER NOT NULL)"
)
UPSERT_COUNT = (
    "INSERT INTO word_counts(word, count) VALUES (?, ?) "
    "ON CONFLICT(word) DO UPDATE SET count = count + excluded.count"
)


class BatchContext(NodeContext):
    """A NodeContext that also takes `item_ids`, as the engine sets per batch.

    Being a subclass without __slots__, it accepts the attribute whether or
    not NodeContext declares the field.
    """


def make_context(params: dict[str, Any] | None = None) -> BatchContext:
    return BatchContext(pipeline="p", node="n", params=params or {})


def counts_sink(path: Any, dedupe: bool = False) -> SQLiteSink:
    sink = SQLiteSink(
        path,
        UPSERT_COUNT,
        rows=lambda counts: counts.items(),
        schema=WORD_COUNTS_SCHEMA,
        dedupe=dedupe,
    )
    # The engine sends each node object to its process with cloudpickle.
    return cloudpickle.loads(cloudpickle.dumps(sink))


def read_counts(path: Path) -> dict[str, int]:
    return {
        row["word"]: row["count"]
        for row in read_sqlite(path, "SELECT * FROM word_counts")
    }


def test_sqlite_sink_upserts_word_counts(tmp_path: Path) -> None:
    database = tmp_path / "counts.db"
    sink = counts_sink(database)
    ctx = make_context()
    sink.setup(ctx)

    sink([{"a": 1, "b": 2}, {"a": 3}], ctx)
    sink([{"b": 1, "c": 5}], ctx)
    sink.teardown(ctx)

    assert read_counts(database) == {"a": 4, "b": 3, "c": 5}


def test_sqlite_sink_rolls_back_failed_batch(tmp_path: Path) -> None:
    database = tmp_path / "counts.db"
    sink = counts_sink(database)
    ctx = make_context()
    sink.setup(ctx)
    sink([{"a": 1}], ctx)

    with pytest.raises(sqlite3.IntegrityError):
        sink([{"a": 10, "b": 2}, {"c": None}], ctx)
    sink([{"d": 4}], ctx)
    sink.teardown(ctx)

    assert read_counts(database) == {"a": 1, "d": 4}


def test_sqlite_sink_rolls_back_failing_rows(tmp_path: Path) -> None:
    database = tmp_path / "counts.db"

    def rows(item: dict[str, int]) -> list[tuple[str, int]]:
        if "poison" in item:
            raise KeyError("poison")
        return list(item.items())

    sink = SQLiteSink(database, UPSERT_COUNT, rows=rows, schema=WORD_COUNTS_SCHEMA)
    ctx = make_context()
    sink.setup(ctx)

    with pytest.raises(KeyError):
        sink([{"a": 1}, {"poison": 1}], ctx)
    sink.teardown(ctx)

    assert read_counts(database) == {}


def test_sqlite_sink_writes_items_as_rows(tmp_path: Path) -> None:
    database = tmp_path / "pairs.db"
    schema = ["CREATE TABLE pairs (key TEXT, value INTEGER)"]
    positional = SQLiteSink(database, "INSERT INTO pairs VALUES (?, ?)", schema=schema)
    named = SQLiteSink(database, "INSERT INTO pairs VALUES (:key, :value)")
    ctx = make_context()

    positional.setup(ctx)
    positional([["a", 1], ("b", 2)], ctx)
    positional.teardown(ctx)
    named.setup(ctx)
    named([{"key": "c", "value": 3}], ctx)
    named.teardown(ctx)

    rows = list(read_sqlite(database, "SELECT key, value FROM pairs ORDER BY key"))
    assert rows == [
        {"key": "a", "value": 1},
        {"key": "b", "value": 2},
        {"key": "c", "value": 3},
    ]


def test_sqlite_sink_rejects_scalar_item(tmp_path: Path) -> None:
    sink = SQLiteSink(
        tmp_path / "t.db", "INSERT INTO t VALUES (?)", schema="CREATE TABLE t (x)"
    )
    ctx = make_context()
    sink.setup(ctx)

    with pytest.raises(TypeError, match="pass rows="):
        sink(["text"], ctx)
    sink.teardown(ctx)


def test_sqlite_sink_uses_wal_journal(tmp_path: Path) -> None:
    database = tmp_path / "counts.db"
    sink = counts_sink(database)
    ctx = make_context()
    sink.setup(ctx)

    with sqlite3.connect(database) as connection:
        mode = connection.execute("PRAGMA journal_mode").fetchone()[0]
    sink.teardown(ctx)

    assert mode == "wal"


def test_sqlite_sink_dedupe_skips_applied_ids(tmp_path: Path) -> None:
    database = tmp_path / "counts.db"
    sink = counts_sink(database, dedupe=True)
    ctx = make_context()
    sink.setup(ctx)

    ctx.item_ids = ["m1", "m2"]
    sink([{"a": 1}, {"b": 1}], ctx)
    ctx.item_ids = ["m2", "m3", "m3"]
    sink([{"b": 1}, {"c": 1}, {"c": 1}], ctx)
    sink.teardown(ctx)

    assert read_counts(database) == {"a": 1, "b": 1, "c": 1}


def test_sqlite_sink_dedupe_survives_reopen(tmp_path: Path) -> None:
    database = tmp_path / "counts.db"
    ctx = make_context()
    first = counts_sink(database, dedupe=True)
    first.setup(ctx)
    ctx.item_ids = ["m1"]
    first([{"a": 1}], ctx)
    first.teardown(ctx)

    second = counts_sink(database, dedupe=True)
    second.setup(ctx)
    ctx.item_ids = ["m1", "m2"]
    second([{"a": 1}, {"b": 1}], ctx)
    second.teardown(ctx)

    assert read_counts(database) == {"a": 1, "b": 1}


def test_sqlite_sink_dedupe_rolls_back_ids(tmp_path: Path) -> None:
    database = tmp_path / "counts.db"
    sink = counts_sink(database, dedupe=True)
    ctx = make_context()
    sink.setup(ctx)

    ctx.item_ids = ["m1", "m2"]
    with pytest.raises(sqlite3.IntegrityError):
        sink([{"a": 1}, {"b": None}], ctx)
    ctx.item_ids = ["m1"]
    sink([{"a": 1}], ctx)
    sink.teardown(ctx)

    assert read_counts(database) == {"a": 1}


def test_sqlite_sink_dedupe_needs_item_ids(tmp_path: Path) -> None:
    sink = counts_sink(tmp_path / "counts.db", dedupe=True)
    ctx = NodeContext(pipeline="p", node="count", params={})

    # Setup raises when NodeContext has no item_ids field. When it has one,
    # the batch raises because the engine left it unset.
    with pytest.raises(PipelineError) as caught:
        sink.setup(ctx)
        sink([{"a": 1}], ctx)
    sink.teardown(ctx)

    assert "ctx.item_ids" in str(caught.value)
    assert "'count'" in str(caught.value)


def test_sqlite_sink_resolves_params(tmp_path: Path) -> None:
    database = tmp_path / "sub" / "counts.db"
    sink = SQLiteSink(
        param("output"),
        param("statement"),
        rows=lambda counts: counts.items(),
        schema=param("schema"),
        dedupe=param("dedupe"),
    )
    sink = cloudpickle.loads(cloudpickle.dumps(sink))
    ctx = make_context(
        {
            "output": str(database),
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

    assert read_counts(database) == {"a": 2}


def test_sqlite_sink_missing_param_raises(tmp_path: Path) -> None:
    sink = counts_sink(param("output"))

    with pytest.raises(ParameterError) as caught:
        sink.setup(make_context({"input": "in.txt"}))

    assert "'output'" in str(caught.value)
    assert "-p output=VALUE" in str(caught.value)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"statement": ""}, "invalid SQL statement"),
        ({"schema": 5}, "invalid schema"),
        ({"dedupe": "maybe"}, "invalid dedupe"),
        ({"rows": "items"}, "invalid rows"),
        ({"max_retries": -1}, "invalid max_retries"),
        ({"busy_timeout_s": -1.0}, "invalid busy_timeout_s"),
    ],
)
def test_sqlite_sink_rejects_invalid_settings(
    tmp_path: Path, arguments: dict[str, Any], message: str
) -> None:
    settings: dict[str, Any] = {"path": tmp_path / "t.db", "statement": "SELECT 1"}
    settings.update(arguments)

    with pytest.raises(ParameterError, match=message):
        SQLiteSink(**settings)


def test_sqlite_sink_retries_locked_database(tmp_path: Path) -> None:
    database = tmp_path / "counts.db"
    sink = SQLiteSink(
        database,
        UPSERT_COUNT,
        rows=lambda counts: counts.items(),
        schema=WORD_COUNTS_SCHEMA,
        busy_timeout_s=0.01,
        max_retries=3,
    )
    ctx = make_context()
    sink.setup(ctx)
    locker = sqlite3.connect(database, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    locker.execute("INSERT INTO word_counts VALUES ('held', 1)")
    # The first retry warning commits the other writer's transaction, so
    # the sink's next attempt finds the database free.
    release = CommitOnWarning(locker)
    logger = logging.getLogger("nodes.sqlite")
    logger.addHandler(release)

    try:
        sink([{"a": 1}], ctx)
    finally:
        logger.removeHandler(release)
        locker.close()
        sink.teardown(ctx)

    assert release.warning_count == 1
    assert read_counts(database) == {"held": 1, "a": 1}


def test_sqlite_sink_gives_up_when_locked(tmp_path: Path) -> None:
    database = tmp_path / "counts.db"
    sink = SQLiteSink(
        database,
        UPSERT_COUNT,
        rows=lambda counts: counts.items(),
        schema=WORD_COUNTS_SCHEMA,
        busy_timeout_s=0.0,
        max_retries=1,
    )
    ctx = make_context()
    sink.setup(ctx)
    locker = sqlite3.connect(database, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")

    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            sink([{"a": 1}], ctx)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
        sink.teardown(ctx)

    assert read_counts(database) == {}


def test_sqlite_sink_invalid_schema_fails_setup(tmp_path: Path) -> None:
    sink = SQLiteSink(
        tmp_path / "t.db",
        "INSERT INTO t VALUES (?)",
        schema=["CREATE TABLE t (x)", "CREATE TABLE t (x)"],
    )

    with pytest.raises(sqlite3.OperationalError, match="already exists"):
        sink.setup(make_context())

    with pytest.raises(RuntimeError, match="before setup"):
        sink([[1]], make_context())
    tables = list(read_sqlite(tmp_path / "t.db", "SELECT name FROM sqlite_master"))
    assert tables == []


def test_sqlite_sink_rejects_batch_before_setup(tmp_path: Path) -> None:
    sink = counts_sink(tmp_path / "counts.db")

    with pytest.raises(RuntimeError, match="before setup"):
        sink([{"a": 1}], make_context())


def test_read_sqlite_binds_query_params(tmp_path: Path) -> None:
    database = tmp_path / "counts.db"
    with sqlite3.connect(database) as connection:
        connection.execute("CREATE TABLE word_counts (word TEXT, count INTEGER)")
        connection.executemany(
            "INSERT INTO word_counts VALUES (?, ?)", [("a", 1), ("b", 5), ("c", 9)]
        )
    connection.close()

    rows = list(
        read_sqlite(
            database,
            "SELECT word FROM word_counts WHERE count > :minimum ORDER BY word",
            {"minimum": 2},
        )
    )

    assert rows == [{"word": "b"}, {"word": "c"}]


def test_read_sqlite_opens_read_only(tmp_path: Path) -> None:
    database = tmp_path / "counts.db"
    sqlite3.connect(database).close()

    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        list(read_sqlite(database, "CREATE TABLE t (x)"))


def test_read_sqlite_missing_file_raises(tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"

    with pytest.raises(ParameterError) as caught:
        read_sqlite(missing, "SELECT 1")

    assert repr(str(missing)) in str(caught.value)
    assert not missing.exists()


class CommitOnWarning(logging.Handler):
    """A log handler that commits `connection` at the first WARNING it gets."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        super().__init__(level=logging.WARNING)
        self.connection = connection
        self.warning_count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.warning_count += 1
        if self.connection.in_transaction:
            self.connection.execute("COMMIT")


def merge_counts(batch: list[dict[str, int]]) -> list[dict[str, int]]:
    merged: dict[str, int] = {}
    for counts in batch:
        for word, number in counts.items():
            merged[word] = merged.get(word, 0) + number
    return [merged]


def test_sqlite_sink_combine_merges_new_items(tmp_path: Path) -> None:
    database = tmp_path / "counts.db"
    seen: list[int] = []

    def combine(batch: list[dict[str, int]]) -> list[dict[str, int]]:
        seen.append(len(batch))
        return merge_counts(batch)

    sink = SQLiteSink(
        database,
        UPSERT_COUNT,
        rows=lambda counts: counts.items(),
        schema=WORD_COUNTS_SCHEMA,
        dedupe=True,
        combine=combine,
    )
    ctx = make_context()
    sink.setup(ctx)

    ctx.item_ids = ["m1", "m2"]
    sink([{"a": 1, "b": 2}, {"a": 3}], ctx)
    ctx.item_ids = ["m2", "m3"]
    sink([{"a": 3}, {"b": 1}], ctx)
    sink.teardown(ctx)

    assert read_counts(database) == {"a": 4, "b": 3}
    # The second batch reached combine without its item applied before.
    assert seen == [2, 1]


def test_sqlite_sink_rejects_uncallable_combine(tmp_path: Path) -> None:
    with pytest.raises(ParameterError, match="invalid combine=3 for SQLiteSink"):
        SQLiteSink(tmp_path / "x.db", UPSERT_COUNT, combine=3)  # type: ignore[arg-type]
