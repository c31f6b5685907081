"""The memory that a node process shares with its worker, and its counters.

The counters of a node live in a RawArray that the worker allocates and
reads at any time, even after the process died. The id of the item in
flight lives in a second array of IN_FLIGHT_BYTES bytes.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine._runtime_batch import _Batch

# Positions in the shared counter array of a node process, a RawArray of
# signed 64-bit integers that the worker allocates with COUNTER_SLOTS slots.
# `counters_to_stats` names every slot.
ITEMS_IN, ITEMS_OUT, FAILURES, RETRIES, BATCHES = range(5)
COUNTER_NAMES = ("items_in", "items_out", "failures", "retries", "batches")
# The last values passed to `NodeContext.report_progress`, in the node's units.
PROGRESS_DONE = 5
PROGRESS_TOTAL = 6
# Sum of the measured batch durations, in nanoseconds.
BATCH_DURATION_SUM_NS = 7
# Upper bounds, in seconds, of the batch duration histogram. Each bound has a
# slot that counts the batches longer than the previous bound and at most this
# one, so the slots are not cumulative. One more slot counts the batches over
# the last bound.
BATCH_DURATION_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_DURATION_COUNTS = 8
COUNTER_SLOTS = BATCH_DURATION_COUNTS + len(BATCH_DURATION_BUCKETS_S) + 1

# Size of the shared memory that contains the id of the item in flight.
IN_FLIGHT_BYTES = 256

# The in-flight mark of a whole batch passed to a batched node at once. No
# item id has this form, so the worker counts such a death against the batch.
BATCH_IN_FLIGHT = "<batch>"


def counters_to_stats(counters: Sequence[int]) -> dict[str, Any]:
    """Return the shared counters of a node process as a dict.

    Besides the integer counters of COUNTER_NAMES, it contains `progress_done`
    and `progress_total`, `batch_duration_sum_s`, and
    `batch_duration_counts`: one count per bucket of BATCH_DURATION_BUCKETS_S
    and a last one for the batches over its largest bound, not cumulative.
    """
    stats: dict[str, Any] = {
        name: int(counters[i]) for i, name in enumerate(COUNTER_NAMES)
    }
    stats["progress_done"] = int(counters[PROGRESS_DONE])
    stats["progress_total"] = int(counters[PROGRESS_TOTAL])
    stats["batch_duration_sum_s"] = counters[BATCH_DURATION_SUM_NS] / 1e9
    stats["batch_duration_counts"] = [
        int(count) for count in counters[BATCH_DURATION_COUNTS:COUNTER_SLOTS]
    ]
    return stats


class CountersMixin:
    """The counting of `NodeRunner` in its shared counters.

    Its methods use the state that `NodeRunner.__init__` sets.
    """

    def _count_published(self, batch: _Batch) -> None:
        self.counters[ITEMS_OUT] += batch.results
        self.counters[FAILURES] += batch.failures
        self.counters[RETRIES] += sum(len(m) for m in batch.retries.values())
        if batch.outgoing or batch.retries:
            self.counters[BATCHES] += 1

    def _record_batch_duration(self, duration_ns: int) -> None:
        """Count one batch, from its pull to its ack, in the shared histogram."""
        bucket = bisect.bisect_left(BATCH_DURATION_BUCKETS_S, duration_ns / 1e9)
        self.counters[BATCH_DURATION_COUNTS + bucket] += 1
        self.counters[BATCH_DURATION_SUM_NS] += duration_ns

    def _store_progress(self, done: int, total: int) -> None:
        self.counters[PROGRESS_TOTAL] = total
        self.counters[PROGRESS_DONE] = done
