"""Built-in sources and sinks: text, JSON lines and CSV files, SQLite and PostgreSQL.

Sources are helpers that a source node calls and yields from. Sinks are
batched node objects that open their file or database in `setup`.
`migrate_postgres` applies the numbered SQL migrations of a folder.
"""

from nodes.files import (
    CsvSink,
    JsonLinesSink,
    list_files,
    read_csv,
    read_json_lines,
    read_text_chunks,
    text_size_bytes,
)
from nodes.migrations import (
    Migration,
    MigrationError,
    find_migrations,
    migrate_postgres,
    migration_status,
)
from nodes.postgres import PostgresSink
from nodes.postgres_connection import connect_postgres, read_postgres, redact_dsn
from nodes.sqlite import SQLiteSink, read_sqlite

__all__ = [
    # Text files
    "list_files",
    "read_text_chunks",
    "text_size_bytes",
    # JSON lines
    "JsonLinesSink",
    "read_json_lines",
    # CSV
    "CsvSink",
    "read_csv",
    # SQLite
    "SQLiteSink",
    "read_sqlite",
    # PostgreSQL
    "PostgresSink",
    "read_postgres",
    "connect_postgres",
    "redact_dsn",
    "Migration",
    "MigrationError",
    "find_migrations",
    "migrate_postgres",
    "migration_status",
]
