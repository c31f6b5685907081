"""The word-count example on PostgreSQL, and the migrations of its tables.

The example writes to the fixed schema `map_reduce`, so every test here that
touches it holds one PostgreSQL advisory lock for its whole run. Tests on
other xdist workers wait for the lock instead of emptying the table under
each other. Each of them starts and ends with the migrations reverted.
"""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path
from types import ModuleType

import psycopg

from tests.end_to_end.conftest import EXAMPLES, REPOSITORY, run_engine
from tests.end_to_end.test_wordcount import expected_counts, make_corpus
from tests.helpers import POSTGRES_DSN, require_service

WORDCOUNT = str(EXAMPLES / "wordcount.py")
MIGRATIONS = EXAMPLES / "migrations"
MIGRATE_SCRIPT = REPOSITORY / "scripts" / "migrate.py"
SECRET_PASSWORD = "s3cret-Pa55"


def read_counts(connection: psycopg.Connection) -> Counter:
    rows = connection.execute(
        "SELECT word, word_count FROM map_reduce.word_counts"
    ).fetchall()
    return Counter(dict(rows))


def schema_exists(connection: psycopg.Connection, name: str) -> bool:
    row = connection.execute(
        "SELECT count(*) FROM pg_namespace WHERE nspname = %s", (name,)
    ).fetchone()
    return row[0] == 1


def run_migrate(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(MIGRATE_SCRIPT), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def load_migrate_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("migrate", MIGRATE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_wordcount_postgres_matches_single_process_count(
    tmp_path: Path, map_reduce_lock: psycopg.Connection
) -> None:
    corpus = tmp_path / "corpus"
    paths = make_corpus(corpus)

    result = run_engine(
        "run",
        WORDCOUNT,
        "-p",
        "sink=postgres",
        "-p",
        f"dsn={POSTGRES_DSN}",
        "-p",
        f"input={corpus}",
        cwd=tmp_path,
    )

    assert result.returncode == 0, result.stderr + result.stdout
    assert read_counts(map_reduce_lock) == expected_counts(paths)
    assert "applied migration 0001_map_reduce" in result.stdout
    assert "PostgreSQL table map_reduce.word_counts" in result.stdout
    assert "the ten most frequent" in result.stdout
    assert not (tmp_path / "wordcount.db").exists()


def test_wordcount_postgres_run_twice_counts_once(
    tmp_path: Path, map_reduce_lock: psycopg.Connection
) -> None:
    text = tmp_path / "one.txt"
    text.write_text("a b a\nThe the\n")
    args = (
        "run",
        WORDCOUNT,
        "-p",
        "sink=postgres",
        "-p",
        f"dsn={POSTGRES_DSN}",
        "-p",
        f"input={text}",
        "-p",
        "lines=1",
    )

    first = run_engine(*args, cwd=tmp_path)
    second = run_engine(*args, cwd=tmp_path)

    assert first.returncode == 0, first.stderr + first.stdout
    assert second.returncode == 0, second.stderr + second.stdout
    assert "applied migration" not in second.stdout
    assert read_counts(map_reduce_lock) == Counter({"a": 2, "b": 1, "the": 2})


def test_migrate_script_up_twice_applies_once(
    tmp_path: Path, map_reduce_lock: psycopg.Connection
) -> None:
    first = run_migrate("up", "--dsn", POSTGRES_DSN, cwd=tmp_path)
    second = run_migrate("up", "--dsn", POSTGRES_DSN, cwd=tmp_path)

    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == ["applied 0001_map_reduce"]
    assert second.returncode == 0, second.stderr
    assert "nothing to apply" in second.stdout
    assert read_counts(map_reduce_lock) == Counter()


def test_migrate_script_down_removes_schema(
    tmp_path: Path, map_reduce_lock: psycopg.Connection
) -> None:
    up = run_migrate("up", cwd=tmp_path)
    has_schema_after_up = schema_exists(map_reduce_lock, "map_reduce")
    down = run_migrate("down", cwd=tmp_path)
    down_again = run_migrate("down", cwd=tmp_path)

    assert up.returncode == 0, up.stderr
    assert has_schema_after_up
    assert down.returncode == 0, down.stderr
    assert down.stdout.splitlines() == ["reverted 0001_map_reduce"]
    assert not schema_exists(map_reduce_lock, "map_reduce")
    assert down_again.returncode == 0, down_again.stderr
    assert "nothing to revert" in down_again.stdout


def test_migrate_script_status_lists_versions(
    tmp_path: Path, map_reduce_lock: psycopg.Connection
) -> None:
    pending = run_migrate("status", cwd=tmp_path)
    run_migrate("up", cwd=tmp_path)
    applied = run_migrate("status", cwd=tmp_path)

    assert pending.returncode == 0, pending.stderr
    assert "0001_map_reduce  pending" in pending.stdout
    assert applied.returncode == 0, applied.stderr
    assert "0001_map_reduce  applied 20" in applied.stdout
    assert "public.monomyth_migrations" in applied.stdout


def test_apply_migrations_importable(map_reduce_lock: psycopg.Connection) -> None:
    migrate = load_migrate_script()

    first = migrate.apply_migrations(POSTGRES_DSN, "up")
    second = migrate.apply_migrations(POSTGRES_DSN, "up")
    reverted = migrate.apply_migrations(POSTGRES_DSN, "down")

    assert [migration.label for migration in first] == ["0001_map_reduce"]
    assert second == []
    assert [migration.label for migration in reverted] == ["0001_map_reduce"]
    assert not schema_exists(map_reduce_lock, "map_reduce")


def test_migrate_script_failed_migration_exits_1(tmp_path: Path) -> None:
    require_service("PostgreSQL", 5432)
    suffix = uuid.uuid4().hex[:12]
    ledger = f"public.monomyth_test_ledger_{suffix}"
    folder = tmp_path / "migrations"
    folder.mkdir()
    (folder / "0001_broken.up.sql").write_text(
        f"CREATE TABLE public.monomyth_test_never_{suffix} (x INT);\n"
        "INSERT INTO no_such_table VALUES (1);\n"
    )
    (folder / "0001_broken.down.sql").write_text("SELECT 1;\n")

    try:
        result = run_migrate(
            "up", "--folder", str(folder), "--table", ledger, cwd=tmp_path
        )
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as connection:
            leftover = connection.execute(
                "SELECT to_regclass(%s)", (f"public.monomyth_test_never_{suffix}",)
            ).fetchone()[0]
    finally:
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as connection:
            connection.execute(f"DROP TABLE IF EXISTS {ledger}")

    assert result.returncode == 1
    assert "0001_broken.up.sql" in result.stderr
    assert "no_such_table" in result.stderr
    assert "Traceback" not in result.stderr
    assert leftover is None


def test_migrate_script_refused_connection_exits_1(tmp_path: Path) -> None:
    port = free_port()
    dsn = f"postgresql://postgres:{SECRET_PASSWORD}@127.0.0.1:{port}/test"

    result = run_migrate("up", "--dsn", dsn, cwd=tmp_path)

    assert result.returncode == 1
    assert f"127.0.0.1:{port}" in result.stderr
    assert "start the server" in result.stderr
    assert SECRET_PASSWORD not in result.stderr
    assert "Traceback" not in result.stderr


def test_wordcount_postgres_refused_connection_exits_1(tmp_path: Path) -> None:
    text = tmp_path / "one.txt"
    text.write_text("a b a\n")
    port = free_port()
    dsn = f"postgresql://postgres:{SECRET_PASSWORD}@127.0.0.1:{port}/test"

    result = run_engine(
        "run",
        WORDCOUNT,
        "-p",
        "sink=postgres",
        "-p",
        f"dsn={dsn}",
        "-p",
        f"input={text}",
        cwd=tmp_path,
    )

    assert result.returncode == 1
    assert f"127.0.0.1:{port}" in result.stderr
    assert SECRET_PASSWORD not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_wordcount_invalid_sink_exits_2(tmp_path: Path) -> None:
    result = run_engine("run", WORDCOUNT, "-p", "sink=mysql", cwd=tmp_path)

    assert result.returncode == 2
    assert "invalid sink='mysql'" in result.stderr
    assert "'sqlite', 'postgres'" in result.stderr
    assert "Traceback" not in result.stderr
