"""A runner for numbered SQL migrations on PostgreSQL.

A migrations folder contains pairs of files, `NNNN_name.up.sql` and
`NNNN_name.down.sql`. `migrate_postgres` applies the pending ones or reverts
the applied ones, and records each in a table. `migration_status` reads
that table. `scripts/migrate.py` is the command line for both.

psycopg is imported inside the functions that use it, so that a pipeline
file that never uses PostgreSQL does not load it and libpq.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from engine.errors import EngineError, ParameterError
from nodes.postgres_connection import (
    _check_table_name,
    _error_reason,
    _table_identifier,
    connect_postgres,
)

if TYPE_CHECKING:
    import psycopg
    from psycopg import sql

logger = logging.getLogger(__name__)

# The table that records which migrations are applied.
MIGRATIONS_TABLE = "public.monomyth_migrations"
_MIGRATION_FILE = re.compile(r"(\d+)_(\w+)\.(up|down)\.sql")


class MigrationError(EngineError):
    """A migration file is missing, misnamed or failed to run. Fix the file."""


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
