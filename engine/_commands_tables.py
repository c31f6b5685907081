"""The output of the control commands: text tables and JSON.

Tables print with rich on a terminal and as aligned text otherwise.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import click


@dataclass(frozen=True, slots=True)
class TextTable:
    """A titled table of text cells, whose numeric columns are right-aligned."""

    title: str
    headers: Sequence[str]
    rows: Sequence[Sequence[object]]


def _print_json(value: dict[str, Any]) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


def _print_tables(tables: list[TextTable]) -> None:
    """Print tables with rich on a terminal, and as aligned text otherwise."""
    if sys.stdout.isatty():
        _print_rich_tables(tables)
        return
    for number, table in enumerate(tables):
        if number:
            click.echo()
        for line in _plain_table_lines(table):
            click.echo(line)


def _print_rich_tables(tables: list[TextTable]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for table in tables:
        grid = Table(title=table.title, title_justify="left")
        numeric = _numeric_columns(table)
        for index, header in enumerate(table.headers):
            # The first column contains ids, which must stay whole to be copied.
            grid.add_column(
                header,
                justify="right" if index in numeric else "left",
                no_wrap=index == 0,
            )
        for row in table.rows:
            grid.add_row(*(str(cell) for cell in row))
        console.print(grid)


def _plain_table_lines(table: TextTable) -> list[str]:
    if not table.rows:
        return [table.title, "  (none)"]
    cells = [list(table.headers)] + [[str(c) for c in row] for row in table.rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(table.headers))]
    numeric = _numeric_columns(table)
    lines = [table.title]
    for row in cells:
        padded = [
            cell.rjust(width) if index in numeric else cell.ljust(width)
            for index, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  " + "  ".join(padded).rstrip())
    return lines


def _numeric_columns(table: TextTable) -> set[int]:
    return {
        index
        for index in range(len(table.headers))
        if table.rows and all(isinstance(row[index], int | float) for row in table.rows)
    }


def _mebibytes(value: int) -> str:
    return f"{value / 2**20:.1f} MiB"


def _error_summary(text: str, limit: int = 60) -> str:
    # The last line of a traceback names the exception and its message.
    line = text.strip().splitlines()[-1] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _workers_table(workers: dict[str, dict[str, Any]]) -> TextTable:
    rows = []
    for worker_id, worker in sorted(workers.items()):
        nodes = ", ".join(
            f"{node_type} x{len(ids)}"
            for node_type, ids in sorted(worker["nodes"].items())
        )
        rows.append(
            [
                worker_id,
                worker["hostname"],
                worker["state"],
                worker["cores"],
                round(worker["cpu_percent"], 1),
                _mebibytes(worker["process_memory_bytes"]),
                f"{worker['last_seen_s_ago']:.1f} s",
                nodes or "-",
            ]
        )
    headers = ["WORKER", "HOST", "STATE", "CORES", "CPU %", "MEMORY", "LAST SEEN"]
    return TextTable("Workers", [*headers, "NODES"], rows)


def _types_table(types: dict[str, dict[str, Any]]) -> TextTable:
    rows = [
        [
            node_type,
            entry["state"],
            entry["running"],
            entry["processes"],
            entry["items_in"],
            entry["items_out"],
            entry["failures"],
            entry["restarts"],
        ]
        for node_type, entry in sorted(types.items())
    ]
    headers = ["NODE TYPE", "STATE", "RUNNING", "PROCESSES", "IN", "OUT"]
    return TextTable("Node types", [*headers, "FAILURES", "RESTARTS"], rows)
