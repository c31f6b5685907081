"""Fixtures for whole runs through the installed `engine` command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import POSTGRES_DSN, require_service

REPOSITORY = Path(__file__).resolve().parents[2]
EXAMPLES = REPOSITORY / "examples"
MIGRATIONS = EXAMPLES / "migrations"
# Key of the advisory lock that serializes the tests using schema map_reduce.
MAP_REDUCE_LOCK = 0x6D6D_6D61_7072_6564
# Longer than any one test using the schema takes, and shorter than
# pytest-timeout, so a test stuck behind a lost lock holder fails clearly.
LOCK_TIMEOUT = "100s"

# Pipeline "picky": its transform fails on 0 and 5 of ten numbers, with no retry.
PICKY_PIPELINE = """
from engine import Pipeline


pipeline = Pipeline("picky", params={})


@pipeline.source()
def numbers():
    yield from range(10)


@pipeline.transform(after="numbers", retries=0)
def invert(number):
    return 1 / (number % 5)


@pipeline.sink(after="invert")
def drop(value):
    pass
"""


def engine_command() -> str:
    """Return the path of the installed `engine` console script."""
    beside_python = Path(sys.executable).parent / "engine"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("engine")
    if found is None:
        pytest.fail("the engine console script is not installed; run pip install -e .")
    return found


def run_engine(
    *args: str, cwd: Path, timeout_s: float = 90.0
) -> subprocess.CompletedProcess[str]:
    """Run `engine ARGS...` in `cwd` and return its exit code and output."""
    environment = dict(os.environ)
    environment.pop("MONOMYTH_SECRET", None)
    return subprocess.run(
        [engine_command(), *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def write_pipeline(tmp_path: Path):
    """Yield a function that writes a pipeline file into the test's folder."""

    def write(source: str, name: str = "pipeline.py") -> Path:
        path = tmp_path / name
        path.write_text(source)
        return path

    return write


@pytest.fixture
def map_reduce_lock():
    """Hold the map_reduce lock, with the migrations reverted at both ends.

    The word-count example writes to the fixed schema `map_reduce`, so every
    test that touches it holds one PostgreSQL advisory lock for its whole run.
    """
    require_service("PostgreSQL", 5432)
    import psycopg

    from nodes.migrations import migrate_postgres

    with psycopg.connect(POSTGRES_DSN, autocommit=True) as connection:
        connection.execute(f"SET lock_timeout = '{LOCK_TIMEOUT}'")
        connection.execute("SELECT pg_advisory_lock(%s)", (MAP_REDUCE_LOCK,))
        try:
            migrate_postgres(POSTGRES_DSN, MIGRATIONS, "down")
            yield connection
        finally:
            migrate_postgres(POSTGRES_DSN, MIGRATIONS, "down")
            connection.execute("SELECT pg_advisory_unlock(%s)", (MAP_REDUCE_LOCK,))
