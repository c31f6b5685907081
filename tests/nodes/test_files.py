"""Tests for the file sources and sinks in nodes.files."""

from __future__ import annotations

import json
import math
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

from engine.context import NodeContext, param
from engine.errors import ParameterError
from nodes.files import (
    CsvSink,
    JsonLinesSink,
    list_files,
    read_csv,
    read_json_lines,
    read_text_chunks,
    text_size_bytes,
)


def make_context(params: dict[str, Any] | None = None) -> NodeContext:
    return NodeContext(pipeline="p", node="n", params=params or {})


def run_sink(sink: Any, batches: list[list[Any]], params: dict[str, Any]) -> None:
    """Run `sink` as a node process would: unpickle, setup, batches, teardown."""
    node = cloudpickle.loads(cloudpickle.dumps(sink))
    ctx = make_context(params)
    node.setup(ctx)
    try:
        for batch in batches:
            node(batch, ctx)
    finally:
        node.teardown(ctx)


def write_files(root: Path, contents: dict[str, bytes]) -> None:
    for relative, data in contents.items():
        file = root / relative
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(data)


def chunk_texts(path: Path, lines_per_chunk: int) -> list[tuple[int, str]]:
    chunks = read_text_chunks(path, lines_per_chunk=lines_per_chunk)
    return [(chunk["line"], chunk["text"]) for chunk in chunks]


# list_files


def test_list_files_sorts_nested_folders(tmp_path: Path) -> None:
    write_files(tmp_path, {"b.txt": b"", "a/z.txt": b"", "a/b/c.txt": b""})

    files = list_files(tmp_path)

    assert files == [
        tmp_path / "a" / "b" / "c.txt",
        tmp_path / "a" / "z.txt",
        tmp_path / "b.txt",
    ]


def test_list_files_filters_by_pattern(tmp_path: Path) -> None:
    write_files(tmp_path, {"a.py": b"", "b.txt": b"", "sub/c.py": b""})

    files = list_files(tmp_path, pattern="*.py")

    assert files == [tmp_path / "a.py", tmp_path / "sub" / "c.py"]


def test_list_files_skips_excluded_parts(tmp_path: Path) -> None:
    write_files(
        tmp_path,
        {
            "keep.py": b"",
            "site-packages/lib.py": b"",
            "pkg/__pycache__/mod.pyc": b"",
            "pkg/mod.py": b"",
            "pkg/skip.py": b"",
        },
    )

    files = list_files(tmp_path, exclude=("site-packages", "__pycache__", "skip.py"))

    assert files == [tmp_path / "keep.py", tmp_path / "pkg" / "mod.py"]


def test_list_files_excludes_single_string_whole(tmp_path: Path) -> None:
    write_files(tmp_path, {"s/a.txt": b"", "t/b.txt": b""})

    files = list_files(tmp_path, exclude="s")

    assert files == [tmp_path / "t" / "b.txt"]


def test_list_files_file_gives_itself(tmp_path: Path) -> None:
    write_files(tmp_path, {"__pycache__/data.bin": b"x"})
    file = tmp_path / "__pycache__" / "data.bin"

    files = list_files(file, pattern="*.txt", exclude=("__pycache__",))

    assert files == [file]


def test_list_files_missing_path_raises(tmp_path: Path) -> None:
    missing = tmp_path / "nope"

    with pytest.raises(ParameterError) as caught:
        list_files(missing)

    assert repr(str(missing)) in str(caught.value)
    assert "-p input=PATH" in str(caught.value)


def test_list_files_rejects_empty_path(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("a\n")

    with pytest.raises(ParameterError) as caught:
        list_files("")

    assert "invalid path=''" in str(caught.value)


def test_list_files_rejects_unresolved_param() -> None:
    with pytest.raises(TypeError, match="ctx.resolve"):
        list_files(param("input"))  # type: ignore[arg-type]


# read_text_chunks


def test_text_chunks_split_at_line_count(tmp_path: Path) -> None:
    file = tmp_path / "a.txt"
    file.write_text("".join(f"line {n}\n" for n in range(1, 26)))

    chunks = list(read_text_chunks(file, lines_per_chunk=10))

    assert [chunk["line"] for chunk in chunks] == [1, 11, 21]
    assert [chunk["text"].count("\n") for chunk in chunks] == [10, 10, 5]
    assert chunks[1]["text"].startswith("line 11\n")
    assert all(chunk["path"] == str(file) for chunk in chunks)


def test_text_chunks_skip_empty_file(tmp_path: Path) -> None:
    write_files(tmp_path, {"empty.txt": b"", "one.txt": b"x\n"})

    chunks = list(read_text_chunks(tmp_path))

    assert [chunk["path"] for chunk in chunks] == [str(tmp_path / "one.txt")]


def test_text_chunks_keep_unterminated_last_line(tmp_path: Path) -> None:
    file = tmp_path / "a.txt"
    file.write_bytes(b"one\ntwo\nthree")

    assert chunk_texts(file, 2) == [(1, "one\ntwo\n"), (3, "three")]


def test_text_chunks_replace_invalid_utf8(tmp_path: Path) -> None:
    file = tmp_path / "latin1.txt"
    file.write_bytes(b"caf\xe9 ok\n\xff\xfe end\n")

    chunks = chunk_texts(file, 10)

    assert chunks == [(1, "caf\ufffd ok\n\ufffd\ufffd end\n")]


def test_text_chunks_translate_crlf_newlines(tmp_path: Path) -> None:
    file = tmp_path / "dos.txt"
    file.write_bytes(b"a\r\nb\r\nc\r\n")

    assert chunk_texts(file, 2) == [(1, "a\nb\n"), (3, "c\n")]


def test_text_chunks_split_only_on_newline(tmp_path: Path) -> None:
    file = tmp_path / "separators.txt"
    file.write_text("a\fb\x1cc\u2028d\x85e\nf\n", encoding="utf-8", newline="")

    chunks = chunk_texts(file, 1)

    assert chunks == [(1, "a\fb\x1cc\u2028d\x85e\n"), (2, "f\n")]


def test_text_chunks_reject_zero_lines_per_chunk(tmp_path: Path) -> None:
    with pytest.raises(ParameterError, match="lines_per_chunk=0"):
        read_text_chunks(tmp_path, lines_per_chunk=0)


def test_text_chunks_check_path_at_call(tmp_path: Path) -> None:
    with pytest.raises(ParameterError, match="not found"):
        read_text_chunks(tmp_path / "missing")


def test_text_chunks_match_whole_file_counts(tmp_path: Path) -> None:
    files = write_corpus(tmp_path, random.Random(20240517))

    for lines_per_chunk in (1, 3, 10, 1000):
        chunks = list(read_text_chunks(tmp_path, lines_per_chunk=lines_per_chunk))
        texts_by_path: dict[str, list[str]] = {}
        for chunk in chunks:
            texts_by_path.setdefault(chunk["path"], []).append(chunk["text"])

        for file in files:
            whole = file.read_text(encoding="utf-8", errors="replace")
            parts = texts_by_path.get(str(file), [])
            chunk_words = Counter(
                word for text in parts for word in text.lower().split()
            )
            assert chunk_words == Counter(whole.lower().split()), file
            assert "".join(parts) == whole, file
            line_count = len(whole.splitlines(keepends=True))
            assert len(parts) == math.ceil(line_count / lines_per_chunk), file


def write_corpus(root: Path, rng: random.Random) -> list[Path]:
    """Write seeded random text files in nested folders and return their paths."""
    vocabulary = ["alpha", "Beta", "GAMMA", "délta", "naïve", "x", "42", "a-b", "Ωmega"]
    files = []
    for index in range(40):
        depth = rng.randrange(4)
        folder = root.joinpath(*(f"d{rng.randrange(3)}" for _ in range(depth)))
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for _ in range(rng.randrange(60)):
            words = rng.choices(vocabulary, k=rng.randrange(8))
            separator = rng.choice([" ", "  ", "\t"])
            lines.append(separator.join(words).encode("utf-8"))
        newline = rng.choice([b"\n", b"\r\n"])
        data = newline.join(lines)
        if lines and rng.random() < 0.7:
            data += newline
        if rng.random() < 0.2:
            data = data.replace(b"x", b"x\xff", 1)
        file = folder / f"f{index}.txt"
        file.write_bytes(data)
        files.append(file)
    return files


# text_size_bytes


def test_text_size_bytes_sums_listed_files(tmp_path: Path) -> None:
    write_files(tmp_path, {"a.txt": b"abc", "b/c.txt": b"12345", "b/d.log": b"zz"})

    assert text_size_bytes(tmp_path) == 10
    assert text_size_bytes(tmp_path, pattern="*.txt") == 8
    assert text_size_bytes(tmp_path, exclude=("b",)) == 3


# JSON lines


def test_json_lines_sink_round_trips_items(tmp_path: Path) -> None:
    output = tmp_path / "out" / "items.jsonl"
    items = [{"word": "naïve", "count": 2}, [1, 2.5, None], "text", 7, True, None]

    run_sink(JsonLinesSink(output), [items[:2], items[2:]], {})

    assert list(read_json_lines(output)) == items
    assert "naïve" in output.read_text(encoding="utf-8")


def test_json_lines_sink_escapes_embedded_newlines(tmp_path: Path) -> None:
    output = tmp_path / "items.jsonl"

    run_sink(JsonLinesSink(output), [[{"text": "a\nb"}, 2]], {})

    lines = output.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [{"text": "a\nb"}, 2]


def test_json_lines_sink_appends_across_runs(tmp_path: Path) -> None:
    output = tmp_path / "items.jsonl"

    run_sink(JsonLinesSink(output), [[1, 2]], {})
    run_sink(JsonLinesSink(output), [[3]], {})

    assert list(read_json_lines(output)) == [1, 2, 3]


def test_json_lines_sink_keeps_failed_batch_out(tmp_path: Path) -> None:
    output = tmp_path / "items.jsonl"
    sink = cloudpickle.loads(cloudpickle.dumps(JsonLinesSink(output)))
    ctx = make_context()
    sink.setup(ctx)

    sink([{"ok": 1}], ctx)
    with pytest.raises(TypeError):
        sink([{"ok": 2}, {"bad": {1, 2}}], ctx)
    sink([{"ok": 3}], ctx)
    sink.teardown(ctx)

    assert list(read_json_lines(output)) == [{"ok": 1}, {"ok": 3}]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_json_lines_sink_raises_on_full_device() -> None:
    sink = JsonLinesSink("/dev/full")
    ctx = make_context()
    sink.setup(ctx)

    try:
        with pytest.raises(OSError):
            sink([{"x": 1}], ctx)
    finally:
        sink.teardown(ctx)


def test_json_lines_sink_resolves_path_param(tmp_path: Path) -> None:
    output = tmp_path / "items.jsonl"

    run_sink(JsonLinesSink(param("output")), [[{"a": 1}]], {"output": str(output)})

    assert list(read_json_lines(output)) == [{"a": 1}]


def test_json_lines_sink_missing_param_raises(tmp_path: Path) -> None:
    sink = JsonLinesSink(param("output"))

    with pytest.raises(ParameterError) as caught:
        sink.setup(make_context({"input": "x"}))

    assert "'output'" in str(caught.value)
    assert "-p output=VALUE" in str(caught.value)


def test_json_lines_sink_rejects_batch_before_setup(tmp_path: Path) -> None:
    sink = JsonLinesSink(tmp_path / "items.jsonl")

    with pytest.raises(RuntimeError, match="before setup"):
        sink([1], make_context())


def test_read_json_lines_names_bad_line(tmp_path: Path) -> None:
    file = tmp_path / "bad.jsonl"
    file.write_text('{"a": 1}\n{"a": \n')

    with pytest.raises(ValueError) as caught:
        list(read_json_lines(file))

    assert "line 2" in str(caught.value)
    assert repr(str(file)) in str(caught.value)


def test_read_json_lines_names_invalid_utf8(tmp_path: Path) -> None:
    file = tmp_path / "bad.jsonl"
    file.write_bytes(b'"ok"\n"\xff"\n')

    with pytest.raises(ValueError, match="line 2"):
        list(read_json_lines(file))


def test_read_json_lines_skips_blank_lines(tmp_path: Path) -> None:
    file = tmp_path / "items.jsonl"
    file.write_text('1\n\n  \n{"a": [2]}\r\n')

    assert list(read_json_lines(file)) == [1, {"a": [2]}]


def test_read_json_lines_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(ParameterError, match="not found"):
        read_json_lines(tmp_path / "missing.jsonl")


# CSV


def test_csv_sink_round_trips_rows(tmp_path: Path) -> None:
    output = tmp_path / "rows.csv"
    sink = CsvSink(param("output"), ["word", "count"])
    params = {"output": str(output)}

    run_sink(sink, [[{"word": "a,b", "count": 1}], [{"word": 'say "hi"'}]], params)
    run_sink(sink, [[{"word": "two\nlines", "count": 3}]], params)

    assert list(read_csv(output)) == [
        {"word": "a,b", "count": "1"},
        {"word": 'say "hi"', "count": ""},
        {"word": "two\nlines", "count": "3"},
    ]
    assert output.read_text().count("word,count") == 1


def test_csv_sink_writes_header_to_empty_file(tmp_path: Path) -> None:
    output = tmp_path / "rows.csv"
    output.touch()

    run_sink(CsvSink(output, ["a"]), [[{"a": 1}]], {})

    assert output.read_text().splitlines() == ["a", "1"]


def test_csv_sink_rejects_mismatched_header(tmp_path: Path) -> None:
    output = tmp_path / "rows.csv"
    output.write_text("word,total\r\nx,1\r\n")
    sink = CsvSink(output, ["word", "count"])

    with pytest.raises(ParameterError) as caught:
        sink.setup(make_context())

    assert "['word', 'total']" in str(caught.value)
    assert "['word', 'count']" in str(caught.value)


def test_csv_sink_rejects_invalid_fieldnames(tmp_path: Path) -> None:
    sink = CsvSink(tmp_path / "rows.csv", "word,count")

    with pytest.raises(ParameterError, match="invalid fieldnames"):
        sink.setup(make_context())


def test_csv_sink_keeps_failed_batch_out(tmp_path: Path) -> None:
    output = tmp_path / "rows.csv"
    sink = CsvSink(output, ["a"])
    ctx = make_context()
    sink.setup(ctx)

    with pytest.raises(ValueError, match="not in fieldnames"):
        sink([{"a": 1}, {"a": 2, "b": 3}], ctx)
    sink([{"a": 4}], ctx)
    sink.teardown(ctx)

    assert list(read_csv(output)) == [{"a": "4"}]


def test_read_csv_names_line_with_extra_fields(tmp_path: Path) -> None:
    file = tmp_path / "rows.csv"
    file.write_text("a,b\n1,2\n3,4,5\n")

    with pytest.raises(ValueError) as caught:
        list(read_csv(file))

    assert "line 3" in str(caught.value)
    assert "3 fields" in str(caught.value)


def test_read_csv_fills_missing_fields_with_none(tmp_path: Path) -> None:
    file = tmp_path / "rows.csv"
    file.write_text("a,b\n1\n")

    assert list(read_csv(file)) == [{"a": "1", "b": None}]


def test_read_csv_uses_given_fieldnames(tmp_path: Path) -> None:
    file = tmp_path / "rows.tsv"
    file.write_text("1\t2\n")

    rows = list(read_csv(file, fieldnames=["x", "y"], dialect="excel-tab"))

    assert rows == [{"x": "1", "y": "2"}]


def test_read_csv_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(ParameterError, match="not found"):
        read_csv(tmp_path / "missing.csv")
