"""Apply, revert or list the migrations of the word-count example's tables.

\b
    python scripts/migrate.py up        create schema map_reduce and its tables
    python scripts/migrate.py down      drop them again
    python scripts/migrate.py status    list each migration, applied or pending

The migrations are the numbered SQL files of examples/migrations, and the
table public.monomyth_migrations records which of them are applied, so `up`
twice does nothing the second time. Each file runs in its own transaction.
`examples/wordcount.py -p sink=postgres` applies them itself when they are
missing.

\b
Exit codes:
  0  done, or nothing to do
  1  the database cannot be reached, or a migration failed (the message
     names the file)
  2  invalid command line
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal, TypeVar

import click

from engine.errors import EngineError
from engine.logs import LOG_LEVELS, configure_logging
from nodes.migrations import (
    MIGRATIONS_TABLE,
    Migration,
    migrate_postgres,
    migration_status,
)
from nodes.postgres_connection import redact_dsn

MIGRATIONS = Path(__file__).resolve().parents[1] / "examples" / "migrations"
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"

T = TypeVar("T")


def apply_migrations(
    dsn: str,
    direction: Literal["up", "down"],
    folder: str | Path = MIGRATIONS,
    table: str = MIGRATIONS_TABLE,
) -> list[Migration]:
    """Apply the pending migrations of `folder` (`up`) or revert them (`down`).

    Returns the migrations applied or reverted, oldest first for `up` and
    newest first for `down`, and an empty list when there was nothing to do.
    Raises `MigrationError` naming the file that failed,
    `StreamUnavailableError` when the server cannot be reached and
    `ParameterError` for an invalid DSN or a rejected connection.
    """
    return migrate_postgres(dsn, folder, direction, table=table)


dsn_option = click.option(
    "--dsn",
    default=DEFAULT_DSN,
    show_default=True,
    help="PostgreSQL connection string of the database to migrate.",
)
folder_option = click.option(
    "--folder",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=MIGRATIONS,
    show_default="examples/migrations",
    help="Folder of NNNN_name.up.sql and NNNN_name.down.sql files.",
)
table_option = click.option(
    "--table",
    default=MIGRATIONS_TABLE,
    show_default=True,
    help="Table, as schema.name, that records the applied migrations.",
)


@click.group(help=__doc__)
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    default="warning",
    show_default=True,
    help="Lowest level of log records to show, such as connection retries.",
)
def main(log_level: str) -> None:
    """Apply, revert or list migrations."""
    configure_logging(log_level)


@main.command()
@dsn_option
@folder_option
@table_option
def up(dsn: str, folder: Path, table: str) -> None:
    """Apply every pending migration, oldest first."""
    applied = _run(lambda: apply_migrations(dsn, "up", folder, table))
    for migration in applied:
        click.echo(f"applied {migration.label}")
    if not applied:
        click.echo(f"nothing to apply: every migration is applied on {redact_dsn(dsn)}")


@main.command()
@dsn_option
@folder_option
@table_option
def down(dsn: str, folder: Path, table: str) -> None:
    """Revert every applied migration, newest first."""
    reverted = _run(lambda: apply_migrations(dsn, "down", folder, table))
    for migration in reverted:
        click.echo(f"reverted {migration.label}")
    if not reverted:
        click.echo(f"nothing to revert: no migration is applied on {redact_dsn(dsn)}")


@main.command()
@dsn_option
@folder_option
@table_option
def status(dsn: str, folder: Path, table: str) -> None:
    """List each migration with the time it was applied, or as pending."""
    states = _run(lambda: migration_status(dsn, folder, table=table))
    click.echo(f"migrations of {redact_dsn(dsn)}, recorded in {table}:")
    width = max((len(migration.label) for migration, _ in states), default=0)
    for migration, applied_at in states:
        state = (
            "pending"
            if applied_at is None
            else f"applied {applied_at.isoformat(sep=' ', timespec='seconds')}"
        )
        click.echo(f"  {migration.label:<{width}}  {state}")


def _run(action: Callable[[], T]) -> T:
    try:
        return action()
    except EngineError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
