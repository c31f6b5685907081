"""The tables and indexes of the SQLite stream's file.

A stream runs these idempotent statements each time it opens the file, which
also migrates a file written by an earlier version.
"""

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS queues (
        name TEXT PRIMARY KEY
    ) WITHOUT ROWID
    """,
    # AUTOINCREMENT keeps ids unique for the life of the file, so a stale
    # delivery id can never name a newer message.
    """
    CREATE TABLE IF NOT EXISTS messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        queue TEXT NOT NULL,
        body BLOB NOT NULL,
        visible_at REAL NOT NULL,
        owner TEXT,
        delivery_count INTEGER NOT NULL DEFAULT 0
    )
    """,
    # Two indexes serve the pull query: visible messages of one queue in the
    # order (visible_at, id), since every index entry ends with the rowid.
    # The first holds the messages that no process has pulled, the second
    # those pulled and not yet acked, whose visible_at is the end of their
    # lease. A pull moves a message from the first to the second, and an ack
    # deletes it from the second: one index change each, where a single index
    # of all messages and one of their owners took three and two.
    """
    CREATE INDEX IF NOT EXISTS messages_waiting
        ON messages (queue, visible_at) WHERE owner IS NULL
    """,
    # Also serves `recover`: it stays as small as the messages in flight.
    """
    CREATE INDEX IF NOT EXISTS messages_pulled
        ON messages (queue, visible_at) WHERE owner IS NOT NULL
    """,
    # The indexes of files written by earlier versions, which the two above
    # replace.
    "DROP INDEX IF EXISTS messages_by_visibility",
    "DROP INDEX IF EXISTS messages_by_owner",
    # The position of each source process: how many items it has published.
    """
    CREATE TABLE IF NOT EXISTS positions (
        key TEXT PRIMARY KEY,
        position INTEGER NOT NULL
    ) WITHOUT ROWID
    """,
)
