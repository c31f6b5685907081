"""The word-count example, run through `engine run` on generated corpora."""

from __future__ import annotations

import random
import sqlite3
from collections import Counter
from pathlib import Path

import pytest

from tests.end_to_end.conftest import EXAMPLES, run_engine

WORDCOUNT = str(EXAMPLES / "wordcount.py")


def read_counts(database: Path) -> Counter:
    with sqlite3.connect(database) as connection:
        rows = connection.execute("SELECT word, count FROM word_counts").fetchall()
    connection.close()
    return Counter(dict(rows))


def expected_counts(paths: list[Path]) -> Counter:
    counts: Counter = Counter()
    for path in paths:
        text = path.read_bytes().decode("utf-8", errors="replace")
        counts.update(text.lower().split())
    return counts


def make_corpus(root: Path, seed: int = 11) -> list[Path]:
    """Write a corpus of awkward files: empty, unterminated, CRLF, bad bytes."""
    rng = random.Random(seed)
    words = ["Alpha", "beta", "GAMMA", "delta", "épée", "naïve", "x", "Ωmega", "42"]
    paths = []
    for index in range(12):
        folder = root / f"part{index % 3}" / ("deep" if index % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        lines = [
            " ".join(rng.choice(words) for _ in range(rng.randint(0, 12)))
            for _ in range(rng.randint(1, 45))
        ]
        path = folder / f"file{index}.txt"
        path.write_text("\n".join(lines) + ("\n" if index % 4 else ""))
        paths.append(path)
    empty = root / "empty.txt"
    empty.write_text("")
    crlf = root / "crlf.txt"
    crlf.write_bytes(b"One two\r\nthree One\r\n\r\nfour")
    invalid = root / "latin1.txt"
    invalid.write_bytes(b"caf\xe9 CAF\xe9 ok\n\xff\xfe bytes\nend")
    return [*paths, empty, crlf, invalid]


def test_wordcount_matches_single_process_count(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    paths = make_corpus(corpus)
    output = tmp_path / "counts.db"

    result = run_engine(
        "run",
        WORDCOUNT,
        "-p",
        f"input={corpus}",
        "-p",
        f"output={output}",
        cwd=tmp_path,
    )

    assert result.returncode == 0, result.stderr + result.stdout
    assert read_counts(output) == expected_counts(paths)
    assert "the ten most frequent" in result.stdout


def test_wordcount_single_file_input(tmp_path: Path) -> None:
    text = tmp_path / "one.txt"
    text.write_text("the cat\nThe dog\n\nthe end")
    output = tmp_path / "counts.db"

    result = run_engine(
        "run",
        WORDCOUNT,
        "-p",
        f"input={text}",
        "-p",
        f"output={output}",
        "-p",
        "lines=1",
        cwd=tmp_path,
    )

    assert result.returncode == 0, result.stderr
    assert read_counts(output) == Counter({"the": 3, "cat": 1, "dog": 1, "end": 1})


def test_wordcount_run_twice_counts_once(tmp_path: Path) -> None:
    text = tmp_path / "one.txt"
    text.write_text("a b a\n")
    output = tmp_path / "counts.db"
    args = ("run", WORDCOUNT, "-p", f"input={text}", "-p", f"output={output}")

    first = run_engine(*args, cwd=tmp_path)
    second = run_engine(*args, cwd=tmp_path)

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert read_counts(output) == Counter({"a": 2, "b": 1})


def test_wordcount_missing_input_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder"

    result = run_engine("run", WORDCOUNT, "-p", f"input={missing}", cwd=tmp_path)

    assert result.returncode == 2
    assert str(missing) in result.stderr
    assert "-p input=PATH" in result.stderr
    assert "Traceback" not in result.stderr


def test_wordcount_unknown_parameter_exits_2(tmp_path: Path) -> None:
    result = run_engine("run", WORDCOUNT, "-p", "inptu=x", cwd=tmp_path)

    assert result.returncode == 2
    assert "unknown parameter 'inptu'" in result.stderr
    assert "'input'" in result.stderr


@pytest.mark.parametrize("value", ["0", "ten"])
def test_wordcount_invalid_lines_exits_2(tmp_path: Path, value: str) -> None:
    result = run_engine("run", WORDCOUNT, "-p", f"lines={value}", cwd=tmp_path)

    assert result.returncode == 2
    assert "lines" in result.stderr


def test_basic_example_results_checked(tmp_path: Path) -> None:
    result = run_engine(
        "run", str(EXAMPLES / "basic.py"), "-p", "count=300", cwd=tmp_path
    )

    assert result.returncode == 0, result.stderr
    assert "all 300 results match" in result.stdout
    assert (tmp_path / "basic.jsonl").exists()
