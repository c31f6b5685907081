"""Word count, the map-reduce example.

A source reads text files in chunks of 10 lines, a map node counts the words
of each chunk, and a sink adds the counts into the SQLite table
`word_counts(word TEXT PRIMARY KEY, count INTEGER)`. A word is a
whitespace-separated token, lowercased.

    engine run examples/wordcount.py
    engine run examples/wordcount.py -p input=books/ -p output=counts.db

Parameters:
    input   a file, or a folder whose files are all read; default: the .py
            files of this Python's standard library, without site-packages
    output  the SQLite file of the counts; default: wordcount.db
    lines   lines per chunk; default: 10
"""

import sqlite3
import sysconfig
from collections import Counter
from pathlib import Path

from engine import ParameterError, Pipeline, param
from nodes import SQLiteSink, list_files, read_text_chunks

STANDARD_LIBRARY = sysconfig.get_paths()["stdlib"]
EXCLUDED_FOLDERS = ("site-packages", "dist-packages", "__pycache__")

pipeline = Pipeline(
    "wordcount",
    params={"input": STANDARD_LIBRARY, "output": "wordcount.db", "lines": 10},
)


def file_pattern(params: dict) -> str:
    """Return the glob of the files to count: .py files in the standard library."""
    is_stdlib = Path(params["input"]).resolve() == Path(STANDARD_LIBRARY).resolve()
    return "*.py" if is_stdlib else "*"


@pipeline.check_params
def check_input(params: dict) -> None:
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
    # Each run counts from zero; the sink's record of applied items goes too.
    with sqlite3.connect(params["output"]) as database:
        database.execute("DROP TABLE IF EXISTS word_counts")
        database.execute("DROP TABLE IF EXISTS monomyth_applied")
        database.execute(
            "CREATE TABLE word_counts(word TEXT PRIMARY KEY, count INTEGER NOT NULL)"
        )
    database.close()


@pipeline.source(batch_size=200)
def read(ctx):
    params = ctx.params
    yield from read_text_chunks(
        params["input"],
        lines_per_chunk=params["lines"],
        pattern=file_pattern(params),
        exclude=EXCLUDED_FOLDERS,
    )


@pipeline.transform(after="read", processes=2, batch_size=200)
def count(chunk):
    return dict(Counter(chunk["text"].lower().split()))


pipeline.add(
    "sink",
    "store",
    SQLiteSink(
        path=param("output"),
        statement=(
            "INSERT INTO word_counts(word, count) VALUES (?, ?) "
            "ON CONFLICT(word) DO UPDATE SET count = count + excluded.count"
        ),
        rows=lambda counts: counts.items(),
        # Skips a chunk's counts that were applied before a crash redelivered it.
        dedupe=True,
    ),
    after="count",
    batch_size=200,
)


@pipeline.on_complete
def print_top_words(params: dict) -> None:
    with sqlite3.connect(params["output"]) as database:
        rows = database.execute(
            "SELECT word, count FROM word_counts ORDER BY count DESC, word LIMIT 10"
        ).fetchall()
        total = database.execute("SELECT COUNT(*) FROM word_counts").fetchone()[0]
    database.close()
    print(f"{total} distinct words in {params['output']}; the ten most frequent:")
    for word, number in rows:
        print(f"  {number:>10}  {word}")
