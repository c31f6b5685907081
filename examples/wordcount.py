"""Word count, the map-reduce example.

A source reads text files in chunks of 10 lines, a map node counts the words
of each batch of chunks, and a sink adds the counts into a table. A word is a
whitespace-separated token, lowercased. By default the table is the SQLite
table `word_counts(word TEXT PRIMARY KEY, count INTEGER)`. With
`-p sink=postgres` it is the PostgreSQL table
`map_reduce.word_counts(word TEXT PRIMARY KEY, word_count BIGINT NOT NULL)`.

    engine run examples/wordcount.py
    engine run examples/wordcount.py -p input=books/ -p output=counts.db
    engine run examples/wordcount.py -p sink=postgres

Parameters:
    input   a file, or a folder whose files are all read; default: the .py
            files of this Python's standard library, without site-packages
    output  the SQLite file of the counts; default: wordcount.db
    lines   lines per chunk; default: 10
    sink    where the counts go: sqlite or postgres; default: sqlite
    dsn     the PostgreSQL database for sink=postgres; default:
            postgresql://postgres@127.0.0.1:5432/test

With sink=postgres, the run first applies the migrations in
examples/migrations that the database lacks, as `python scripts/migrate.py
up` does, then empties the table.
"""

import sqlite3
import sysconfig
from collections import Counter
from pathlib import Path

from engine import ParameterError, Pipeline, param
from nodes import (
    PostgresSink,
    SQLiteSink,
    connect_postgres,
    list_files,
    migrate_postgres,
    read_text_chunks,
)

STANDARD_LIBRARY = sysconfig.get_paths()["stdlib"]
EXCLUDED_FOLDERS = ("site-packages", "dist-packages", "__pycache__")
SINKS = ("sqlite", "postgres")
MIGRATIONS = Path(__file__).resolve().parent / "migrations"

pipeline = Pipeline(
    "wordcount",
    params={
        "input": STANDARD_LIBRARY,
        "output": "wordcount.db",
        "lines": 10,
        "sink": "sqlite",
        "dsn": "postgresql://postgres@127.0.0.1:5432/test",
    },
)


def file_pattern(params: dict) -> str:
    """Return the glob of the files to count: .py files in the standard library."""
    is_stdlib = Path(params["input"]).resolve() == Path(STANDARD_LIBRARY).resolve()
    return "*.py" if is_stdlib else "*"


@pipeline.check_params
def check_input(params: dict) -> None:
    if params["sink"] not in SINKS:
        choices = ", ".join(repr(sink) for sink in SINKS)
        raise ParameterError(
            f"invalid sink={params['sink']!r}: expected one of {choices}, "
            "as in -p sink=postgres"
        )
    if params["lines"] < 1:
        raise ParameterError(
            f"invalid lines={params['lines']!r}: expected 1 or more lines per chunk"
        )
    files = list_files(params["input"], file_pattern(params), EXCLUDED_FOLDERS)
    if not files:
        raise ParameterError(
            f"no files to count under input path {params['input']!r}; pass a "
            "file or a folder that holds files with -p input=PATH"
        )


@pipeline.on_start
def create_table(params: dict) -> None:
    if params["sink"] == "postgres":
        prepare_postgres(params["dsn"])
        return
    # Each run counts from zero; the sink's record of applied items goes too.
    with sqlite3.connect(params["output"]) as database:
        database.execute("DROP TABLE IF EXISTS word_counts")
        database.execute("DROP TABLE IF EXISTS monomyth_applied")
        database.execute(
            "CREATE TABLE word_counts(word TEXT PRIMARY KEY, count INTEGER NOT NULL)"
        )
    database.close()


def prepare_postgres(dsn: str) -> None:
    """Create the tables when they are missing, and empty them for a new run."""
    for migration in migrate_postgres(dsn, MIGRATIONS, "up"):
        print(f"applied migration {migration.label}")
    with connect_postgres(dsn) as connection:
        connection.execute(
            "TRUNCATE map_reduce.word_counts, map_reduce.monomyth_applied"
        )


@pipeline.source(batch_size=200)
def read(ctx):
    params = ctx.params
    yield from read_text_chunks(
        params["input"],
        lines_per_chunk=params["lines"],
        pattern=file_pattern(params),
        exclude=EXCLUDED_FOLDERS,
        # Bytes read of the total: the progress bar of engine run.
        progress=ctx.report_progress,
    )


# Batched: the node counts a whole batch of chunks and sends one count, so far
# fewer and smaller items travel to the sink. The stream publishes that count
# and acks the batch in one atomic step, so a crash never counts a chunk twice.
@pipeline.transform(after="read", processes=2, batch_size=200, batched=True)
def count(chunks):
    counts = Counter()
    for chunk in chunks:
        counts.update(chunk["text"].lower().split())
    return [dict(counts)]


class ChosenSink:
    """The sink that the run parameter `sink` names, chosen in each node process."""

    batched = True

    def __init__(self, sinks: dict) -> None:
        self.sinks = sinks
        self.chosen = None

    def setup(self, ctx) -> None:
        self.chosen = self.sinks[ctx.params["sink"]]
        self.chosen.setup(ctx)

    def __call__(self, items: list, ctx) -> None:
        self.chosen(items, ctx)

    def teardown(self, ctx) -> None:
        if self.chosen is not None:
            self.chosen.teardown(ctx)


def merge_counts(batch: list) -> list:
    """Return the word counts of a batch of counts as one count."""
    total: Counter = Counter()
    for counts in batch:
        total.update(counts)
    return [total]


pipeline.add(
    "sink",
    "store",
    ChosenSink(
        {
            "sqlite": SQLiteSink(
                path=param("output"),
                statement=(
                    "INSERT INTO word_counts(word, count) VALUES (?, ?) "
                    "ON CONFLICT(word) DO UPDATE SET count = count + excluded.count"
                ),
                rows=lambda counts: counts.items(),
                # Skips counts applied before a crash redelivered them.
                dedupe=True,
                # One upsert per distinct word of a batch, not per chunk.
                combine=merge_counts,
            ),
            # NOTE: PostgreSQL text cannot contain the NUL character, so a
            # chunk with a NUL in a word fails and goes to the fail queue.
            "postgres": PostgresSink(
                dsn=param("dsn"),
                statement=(
                    "INSERT INTO map_reduce.word_counts (word, word_count) "
                    "VALUES (%s, %s) ON CONFLICT (word) DO UPDATE SET "
                    "word_count = map_reduce.word_counts.word_count "
                    "+ EXCLUDED.word_count"
                ),
                rows=lambda counts: counts.items(),
                dedupe=True,
                dedupe_table="map_reduce.monomyth_applied",
            ),
        }
    ),
    after="count",
    batch_size=200,
)


@pipeline.on_complete
def print_top_words(params: dict) -> None:
    if params["sink"] == "postgres":
        place = "PostgreSQL table map_reduce.word_counts"
        with connect_postgres(params["dsn"]) as connection:
            rows = connection.execute(
                "SELECT word, word_count FROM map_reduce.word_counts "
                "ORDER BY word_count DESC, word LIMIT 10"
            ).fetchall()
            total = connection.execute(
                "SELECT count(*) FROM map_reduce.word_counts"
            ).fetchone()[0]
    else:
        place = params["output"]
        with sqlite3.connect(params["output"]) as database:
            rows = database.execute(
                "SELECT word, count FROM word_counts ORDER BY count DESC, word LIMIT 10"
            ).fetchall()
            total = database.execute("SELECT COUNT(*) FROM word_counts").fetchone()[0]
        database.close()
    print(f"{total} distinct words in {place}; the ten most frequent:")
    for word, number in rows:
        print(f"  {number:>10}  {word}")
