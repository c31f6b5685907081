"""Progress of a run: a live table on a terminal, plain lines otherwise.

rich is imported only for the live table, and only once the display starts,
which `engine run` does after it has started its worker.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.live import Live
    from rich.table import Table

# Seconds between plain progress lines when the output is not a terminal.
PLAIN_INTERVAL_S = 5.0


class RateMeter:
    """Items per second of each node type, over a sliding window of samples."""

    def __init__(self, window_s: float = 5.0) -> None:
        self.window_s = window_s
        self.samples: dict[str, deque[tuple[float, int]]] = {}

    def update(self, stats: dict[str, dict[str, Any]]) -> dict[str, float]:
        """Record the counters of `stats` now and return the rate per type."""
        now = time.monotonic()
        rates = {}
        for node_type, entry in stats.items():
            samples = self.samples.setdefault(node_type, deque())
            samples.append((now, _processed(entry)))
            while len(samples) > 2 and now - samples[0][0] > self.window_s:
                samples.popleft()
            first_time, first_count = samples[0]
            elapsed = now - first_time
            rates[node_type] = (
                (samples[-1][1] - first_count) / elapsed if elapsed else 0.0
            )
        return rates


def _processed(entry: dict[str, Any]) -> int:
    # Sources have no input: their progress is what they produce.
    return entry["items_out"] if entry["kind"] == "source" else entry["items_in"]


class ProgressDisplay:
    """Show per-node progress: a table in place, or periodic lines."""

    def __init__(self, title: str, stream: TextIO | None = None) -> None:
        self.title = title
        self.stream = stream or sys.stdout
        self.is_live = self.stream.isatty()
        self.meter = RateMeter()
        self.started = time.monotonic()
        self.last_plain = 0.0
        self.live: Live | None = None

    def __enter__(self) -> ProgressDisplay:
        if self.is_live:
            from rich.console import Console
            from rich.live import Live

            self.live = Live(
                console=Console(file=self.stream),
                auto_refresh=False,
                redirect_stderr=True,
                redirect_stdout=True,
                transient=False,
            )
            self.live.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)
            self.live = None

    def print(self, text: str) -> None:
        """Print a line above the live table, or plainly."""
        if self.live is not None:
            self.live.console.print(text, markup=False, highlight=False)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def print_log(self, text: str) -> None:
        """Print a log line of the worker: above the live table, or on stderr."""
        if self.live is not None:
            self.live.console.print(text, markup=False, highlight=False)
        else:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()

    def update(self, stats: dict[str, dict[str, Any]], depths: dict[str, int]) -> None:
        """Show the latest counters of every node type."""
        rates = self.meter.update(stats)
        if self.live is not None:
            self.live.update(self._table(stats, depths, rates), refresh=True)
            return
        now = time.monotonic()
        if now - self.last_plain < PLAIN_INTERVAL_S:
            return
        self.last_plain = now
        elapsed = now - self.started
        for node_type, entry in stats.items():
            percent = _percent(entry)
            self.print(
                f"progress {node_type} state={entry['state']} "
                f"processes={entry['running']}/{entry['processes']} "
                f"in={entry['items_in']} out={entry['items_out']} "
                f"rate={rates.get(node_type, 0.0):.0f}/s "
                f"queue={_queue_depth(entry, depths)} "
                f"failed={entry['failures']} restarts={entry['restarts']} "
                + ("" if percent is None else f"read={percent:.1f}% ")
                + f"elapsed={elapsed:.1f}s"
            )

    def _table(
        self,
        stats: dict[str, dict[str, Any]],
        depths: dict[str, int],
        rates: dict[str, float],
    ) -> RenderableType:
        from rich.console import Group
        from rich.table import Table

        elapsed = time.monotonic() - self.started
        table = Table(title=f"{self.title}  {elapsed:.1f} s", title_justify="left")
        for column in ("node", "state", "procs", "in", "out", "rate/s", "queue"):
            table.add_column(
                column, justify="left" if column in ("node", "state") else "right"
            )
        table.add_column("failed", justify="right")
        table.add_column("restarts", justify="right")
        for node_type, entry in stats.items():
            table.add_row(
                entry["node"],
                entry["state"],
                f"{entry['running']}/{entry['processes']}",
                f"{entry['items_in']:,}",
                f"{entry['items_out']:,}",
                f"{rates.get(node_type, 0.0):,.0f}",
                f"{_queue_depth(entry, depths):,}",
                f"{entry['failures']:,}",
                f"{entry['restarts']}",
            )
        bars = _progress_bars(stats)
        return Group(table, bars) if bars is not None else table


def _percent(entry: dict[str, Any]) -> float | None:
    """Return the share of its input that a node type read, or None if unknown."""
    total = entry.get("progress_total", 0)
    if not total:
        return None
    return min(100.0, 100.0 * entry.get("progress_done", 0) / total)


def _progress_bars(stats: dict[str, dict[str, Any]]) -> Table | None:
    """Return a bar per node type that reports the total size of its input."""
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    grid = Table.grid(padding=(0, 1))
    for entry in stats.values():
        percent = _percent(entry)
        if percent is None:
            continue
        done = entry["progress_done"]
        total = entry["progress_total"]
        grid.add_row(
            entry["node"],
            ProgressBar(total=total, completed=min(done, total), width=40),
            f"{percent:5.1f}%",
            f"{done:,} of {total:,} read",
        )
    return grid if grid.row_count else None


def _queue_depth(entry: dict[str, Any], depths: dict[str, int]) -> int:
    return sum(depths.get(queue, 0) for queue in entry["input_queues"])


def format_summary(
    pipeline: str,
    stats: dict[str, dict[str, Any]],
    fail_depths: dict[str, int],
    elapsed_s: float,
    outcome: str,
) -> str:
    """Return the end-of-run summary: one line per node, then totals."""
    width = max([len(entry["node"]) for entry in stats.values()] + [4])
    lines = [f"pipeline {pipeline} {outcome} in {elapsed_s:.1f} s"]
    lines.append(
        f"  {'node':<{width}}  {'state':<10} {'in':>10} {'out':>10} "
        f"{'failed':>8} {'restarts':>8}"
    )
    for entry in stats.values():
        state = entry["state"]
        if outcome == "interrupted" and state not in ("completed", "failed"):
            # The interrupt stopped this type's nodes before their input ended.
            state = "stopped"
        lines.append(
            f"  {entry['node']:<{width}}  {state:<10} "
            f"{entry['items_in']:>10} {entry['items_out']:>10} "
            f"{entry['failures']:>8} {entry['restarts']:>8}"
        )
        if entry["last_error"]:
            lines.append(f"    last error: {entry['last_error']}")
    for queue, depth in fail_depths.items():
        if depth:
            lines.append(f"  {depth} failed items kept in queue {queue}")
    return "\n".join(lines)
