"""Sources and sinks for files: text in chunks of lines, JSON lines and CSV.

The `read_*` functions are source helpers: a source node calls one with a path
it resolved from the run parameters and yields what it yields:

    def read(ctx):
        yield from read_text_chunks(ctx.resolve(param("input")), lines_per_chunk=100)

The sinks are batched node objects. Each opens its file in `setup`, appends
each batch whole and fsyncs the file before the call returns, and closes the
file in `teardown`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from fnmatch import fnmatchcase
from itertools import islice
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from engine.context import Param
from engine.errors import ParameterError

if TYPE_CHECKING:
    from engine.context import NodeContext

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


def list_files(
    path: PathLike, pattern: str = "*", exclude: Iterable[str] = ()
) -> list[Path]:
    """List the files to read under `path`, sorted for a deterministic order.

    A file gives itself, regardless of `pattern` and `exclude`. A folder gives
    every regular file under it, recursively, whose name matches the glob
    `pattern` (case-sensitive) and whose path relative to the folder has no
    part in `exclude`, such as `("site-packages", "__pycache__")`.

    Raises `ParameterError` when `path` does not exist, and `OSError` when a
    folder under it cannot be listed.

    Limits: symbolic links to folders are not followed, which rules out
    cycles. Symbolic links to files are listed.
    """
    root = _as_path(path, "path")
    excluded = _as_name_set(exclude)

    if root.is_dir():
        return _walk_folder(root, pattern, excluded)
    if root.is_file():
        return [root]
    if root.exists():
        raise ParameterError(
            f"input path {str(root)!r} is neither a regular file nor a folder; "
            "pass an existing file or folder with -p input=PATH"
        )
    raise ParameterError(
        f"input path {str(root)!r} not found; "
        "pass an existing file or folder with -p input=PATH"
    )


def read_text_chunks(
    path: PathLike,
    lines_per_chunk: int = 10,
    pattern: str = "*",
    exclude: Iterable[str] = (),
    encoding: str = "utf-8",
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Read the text files under `path` in chunks of `lines_per_chunk` lines.

    Files come from `list_files(path, pattern, exclude)`. Each chunk is
    `{"path": str, "line": int, "text": str}`, where `line` is the 1-based
    number of its first line and `text` is its lines joined with their
    newlines kept. An empty file gives no chunk, and the last chunk of a file
    may be shorter.

    Lines end only at a newline. Universal newlines turn "\\r\\n" and a lone
    "\\r" into "\\n", so the chunks of a file joined together equal its decoded
    text with that translation. Bytes that do not decode become U+FFFD
    instead of raising.

    `progress`, such as `ctx.report_progress`, is called with the bytes read
    so far and the total size of the files: with 0 before the first chunk,
    after each chunk, and with the total at the end. The size of each file is
    taken when reading starts.

    Raises `ParameterError` at the call, before any file is read, when
    `lines_per_chunk` is below 1 or `path` does not exist.

    Limits: the bytes read within a file run ahead of the chunks yielded by
    up to the 8 KiB that the decoder reads at a time.
    """
    if isinstance(lines_per_chunk, bool) or not isinstance(lines_per_chunk, int):
        raise ParameterError(
            f"invalid lines_per_chunk={lines_per_chunk!r}: expected an integer"
        )
    if lines_per_chunk < 1:
        raise ParameterError(
            f"invalid lines_per_chunk={lines_per_chunk}: "
            "lines_per_chunk must be 1 or more"
        )
    files = list_files(path, pattern, exclude)
    return _iter_text_chunks(files, lines_per_chunk, encoding, progress)


def text_size_bytes(
    path: PathLike, pattern: str = "*", exclude: Iterable[str] = ()
) -> int:
    """Return the total size in bytes of the files that `list_files` lists.

    Progress displays compare it with the bytes read so far. Raises like
    `list_files`.
    """
    return sum(file.stat().st_size for file in list_files(path, pattern, exclude))


def read_json_lines(path: PathLike) -> Iterator[Any]:
    """Read a JSON lines file and yield the value on each line, in order.

    Blank lines are skipped. Raises `ParameterError` at the call when the
    file does not exist, and `ValueError` naming the file and the line number
    when a line is not valid JSON in UTF-8.
    """
    file = _require_file(path)
    return _iter_json_lines(file)


def read_csv(
    path: PathLike,
    *,
    fieldnames: Sequence[str] | None = None,
    dialect: str = "excel",
    encoding: str = "utf-8",
) -> Iterator[dict[str, str | None]]:
    """Read a CSV file and yield each row as a dict from field name to text.

    The first row is the header unless `fieldnames` is given. A row with
    fewer fields than the header gets None for the missing ones. Raises
    `ParameterError` at the call when the file does not exist, and
    `ValueError` naming the file and the line number when a row has more
    fields than the header, is malformed, or does not decode.
    """
    file = _require_file(path)
    names = list(fieldnames) if fieldnames is not None else None
    return _iter_csv_rows(file, names, dialect, encoding)


class JsonLinesSink:
    """A batched sink that appends each item to a file as one line of JSON.

    `path` may be a `Param`, resolved in `setup`; missing parent folders are
    created. Non-ASCII text is written as UTF-8, not as escapes. A batch is
    serialized in full before anything is written, so an item that is not
    JSON-serializable fails the batch with nothing of it on disk.

    Limits: one process writes each file. The part of a batch whose write
    failed is truncated away, which is only safe while no other process
    appends to the file, so run this node with one process per output path.
    The file keeps no item ids, so a process killed after its write and
    before its acknowledgement leaves the batch in the file, and the
    redelivered batch is appended a second time.
    """

    batched = True

    def __init__(self, path: PathLike | Param) -> None:
        self.path = path
        self._output: _AppendOnlyFile | None = None

    def setup(self, ctx: NodeContext) -> None:
        """Open the output file for appending."""
        self._output = _AppendOnlyFile.open(_as_path(ctx.resolve(self.path), "path"))

    def __call__(self, items: list[Any], ctx: NodeContext) -> None:
        """Append one JSON line per item, then fsync the file."""
        lines = [json.dumps(item, ensure_ascii=False) + "\n" for item in items]
        _require_open(self._output, self).append("".join(lines).encode("utf-8"))

    def teardown(self, ctx: NodeContext) -> None:
        """Close the output file."""
        if self._output is not None:
            self._output.close()
            self._output = None


class CsvSink:
    """A batched sink that appends each item, a dict, to a CSV file as a row.

    `path` and `fieldnames` may be given as a `Param`, resolved in `setup`.
    The header row is written with the first batch when the file is new or
    empty. An existing file must start with the same header, because rows
    appended under a different header would be read back under the wrong
    names. A missing key is written as an empty field, and a key outside
    `fieldnames` fails the batch with a `ValueError` and nothing of it on disk.

    Limits: one process writes each file, and a batch redelivered after a
    crash is appended a second time, as for `JsonLinesSink`.
    """

    batched = True

    def __init__(
        self,
        path: PathLike | Param,
        fieldnames: Sequence[str] | Param,
        *,
        dialect: str = "excel",
    ) -> None:
        self.path = path
        self.fieldnames = fieldnames
        self.dialect = dialect
        self._output: _AppendOnlyFile | None = None
        self._resolved_fieldnames: list[str] = []

    def setup(self, ctx: NodeContext) -> None:
        """Resolve the settings, check an existing header and open the file."""
        path = _as_path(ctx.resolve(self.path), "path")
        fieldnames = ctx.resolve(self.fieldnames)
        if (
            isinstance(fieldnames, str)
            or not isinstance(fieldnames, Sequence)
            or not fieldnames
            or not all(isinstance(name, str) for name in fieldnames)
        ):
            raise ParameterError(
                f"invalid fieldnames={fieldnames!r} for CsvSink: "
                "expected a list of column names, such as ['word', 'count']"
            )
        self._resolved_fieldnames = list(fieldnames)

        self._check_header(path)
        self._output = _AppendOnlyFile.open(path)

    def __call__(self, items: list[dict[str, Any]], ctx: NodeContext) -> None:
        """Append one row per item, after the header if the file is empty."""
        output = _require_open(self._output, self)
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, self._resolved_fieldnames, dialect=self.dialect)
        if output.size_bytes() == 0:
            writer.writeheader()
        writer.writerows(items)
        output.append(buffer.getvalue().encode("utf-8"))

    def teardown(self, ctx: NodeContext) -> None:
        """Close the output file."""
        if self._output is not None:
            self._output.close()
            self._output = None

    def _check_header(self, path: Path) -> None:
        if not path.is_file() or path.stat().st_size == 0:
            return
        with path.open(encoding="utf-8", errors="replace", newline="") as file:
            header = next(csv.reader(file, dialect=self.dialect), [])
        if header != self._resolved_fieldnames:
            raise ParameterError(
                f"CSV file {str(path)!r} has the header {header!r}, "
                f"but the sink writes {self._resolved_fieldnames!r}; "
                "pass another output path or matching fieldnames"
            )


class _AppendOnlyFile:
    """An output file that appends whole batches and truncates a failed one away."""

    def __init__(self, path: Path, file: IO[bytes]) -> None:
        self.path = path
        self._file = file

    @classmethod
    def open(cls, path: Path) -> _AppendOnlyFile:
        path.parent.mkdir(parents=True, exist_ok=True)
        is_new = not path.exists()
        # Unbuffered, so that the bytes of a failed write cannot linger in a
        # buffer and reach the file with the next batch.
        file = path.open("ab", buffering=0)
        if is_new:
            # The new directory entry is durable only once its folder is synced.
            _fsync_folder(path.parent)
        logger.debug("output file %s opened", path)
        return cls(path, file)

    def size_bytes(self) -> int:
        return os.fstat(self._file.fileno()).st_size

    def append(self, data: bytes) -> None:
        size_before = self.size_bytes()
        try:
            remaining = memoryview(data)
            while remaining:
                # A raw write may take fewer bytes than it is given.
                written = self._file.write(remaining)
                if not written:
                    raise OSError(f"write to {self.path} made no progress")
                remaining = remaining[written:]
            os.fsync(self._file.fileno())
        except BaseException:
            self._truncate_to(size_before)
            raise

    def close(self) -> None:
        self._file.close()

    def _truncate_to(self, size_bytes: int) -> None:
        # A failed write may have left part of the batch on disk. The engine
        # retries the batch, so that part would appear twice unless removed.
        try:
            self._file.truncate(size_bytes)
            os.fsync(self._file.fileno())
        except OSError:
            logger.exception(
                "failed to truncate %s to %d bytes after a failed write; "
                "the file may end with part of a batch",
                self.path,
                size_bytes,
            )


def _walk_folder(root: Path, pattern: str, excluded: frozenset[str]) -> list[Path]:
    found: list[Path] = []
    for folder, subfolders, names in os.walk(root, onerror=_raise_error):
        # Pruning in place keeps os.walk out of excluded folders altogether.
        subfolders[:] = [name for name in subfolders if name not in excluded]
        for name in names:
            if name in excluded or not fnmatchcase(name, pattern):
                continue
            file = Path(folder, name)
            if file.is_file():
                found.append(file)
    return sorted(found)


def _iter_text_chunks(
    files: list[Path],
    lines_per_chunk: int,
    encoding: str,
    progress: Callable[[int, int], None] | None,
) -> Iterator[dict[str, Any]]:
    sizes = [file.stat().st_size for file in files] if progress else []
    total_bytes = sum(sizes)
    done_bytes = 0
    if progress:
        progress(0, total_bytes)
    for index, file in enumerate(files):
        # newline=None selects universal newlines. Iteration then splits on
        # "\n" only, unlike str.splitlines, which also splits on "\f" and others.
        with file.open(encoding=encoding, errors="replace", newline=None) as text:
            first_line = 1
            while lines := list(islice(text, lines_per_chunk)):
                yield {"path": str(file), "line": first_line, "text": "".join(lines)}
                first_line += len(lines)
                if progress:
                    # The binary buffer's position counts the bytes decoded so far.
                    position = min(text.buffer.tell(), sizes[index])
                    progress(done_bytes + position, total_bytes)
        if progress:
            done_bytes += sizes[index]
    if progress:
        progress(done_bytes, total_bytes)


def _iter_json_lines(file: Path) -> Iterator[Any]:
    with file.open("rb") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except ValueError as exc:
                raise ValueError(
                    f"invalid JSON on line {line_number} of {str(file)!r}: {exc}"
                ) from exc


def _iter_csv_rows(
    file: Path, fieldnames: list[str] | None, dialect: str, encoding: str
) -> Iterator[dict[str, str | None]]:
    extra = object()
    with file.open(encoding=encoding, newline="") as text:
        reader = csv.DictReader(
            text, fieldnames=fieldnames, restkey=extra, dialect=dialect
        )
        rows = iter(reader)
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError) as exc:
                raise ValueError(
                    f"invalid CSV on line {reader.line_num} of {str(file)!r}: {exc}"
                ) from exc
            if extra in row:
                raise ValueError(
                    f"invalid CSV on line {reader.line_num} of {str(file)!r}: "
                    f"{len(reader.fieldnames or ()) + len(row[extra])} fields, "
                    f"but the header has {len(reader.fieldnames or ())}"
                )
            yield row


def _as_path(value: Any, name: str) -> Path:
    if isinstance(value, Param):
        raise TypeError(
            f"{name}={value!r} is a Param that was not resolved; "
            f"pass ctx.resolve({name}) instead"
        )
    if not isinstance(value, str | os.PathLike):
        raise ParameterError(f"invalid {name}={value!r}: expected a file path")
    # Path("") is the current folder, so an empty -p value would read or write there.
    if isinstance(value, str) and not value:
        raise ParameterError(
            f"invalid {name}='': expected a file or folder path, not an empty string"
        )
    return Path(value)


def _as_name_set(exclude: Iterable[str]) -> frozenset[str]:
    # A lone string would otherwise exclude each of its characters.
    if isinstance(exclude, str):
        return frozenset((exclude,))
    return frozenset(exclude)


def _require_file(path: PathLike) -> Path:
    file = _as_path(path, "path")
    if not file.is_file():
        raise ParameterError(
            f"input file {str(file)!r} not found; "
            "pass an existing file with -p input=PATH"
        )
    return file


def _require_open(output: _AppendOnlyFile | None, sink: object) -> _AppendOnlyFile:
    if output is None:
        raise RuntimeError(
            f"{type(sink).__name__} got a batch before setup or after teardown; "
            "the engine calls setup(ctx) first in each node process"
        )
    return output


def _fsync_folder(folder: Path) -> None:
    # os.open cannot open a folder on Windows, so only POSIX systems sync it.
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _raise_error(exc: OSError) -> None:
    raise exc
