"""The master's metrics in the Prometheus text exposition format, version 0.0.4.

`GET /metrics` of the control API returns `render_metrics(master, depths)`.
The counters and batch duration histograms come from the workers'
heartbeats, summed per node type by the master. The gauges count workers and
node processes by state, and report the queue depths that the API reads
from the data stream at each scrape.

The text is written here rather than through `prometheus_client`, which
keeps the engine free of a dependency for about a hundred lines. The tests
parse the output with `prometheus_client`'s parser.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.master import NodeState, WorkerState
from engine.runtime import BATCH_DURATION_BUCKETS_S

if TYPE_CHECKING:
    from engine.master import Master

# The Content-Type of the exposition format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Per node type: the metric name, the key in `Master.type_stats` and the help.
_TYPE_COUNTERS = (
    (
        "monomyth_items_processed_total",
        "items_in",
        "Items that the nodes of a type pulled from their input queues and "
        "processed; 0 for sources.",
    ),
    (
        "monomyth_items_produced_total",
        "items_out",
        "Results that the nodes of a type published downstream.",
    ),
    (
        "monomyth_items_failed_total",
        "failures",
        "Items that the nodes of a type sent to the fail queue after their "
        "last attempt.",
    ),
    (
        "monomyth_items_retried_total",
        "retries",
        "Failed attempts that the nodes of a type published again for a retry.",
    ),
    (
        "monomyth_node_restarts_total",
        "restarts",
        "Restarts of crashed node processes of a type.",
    ),
)


@dataclass(slots=True)
class MetricFamily:
    """One metric: its HELP and TYPE lines and its samples."""

    name: str
    kind: str
    help: str
    # (sample name, labels, value); the sample name carries a histogram's
    # `_bucket`, `_sum` or `_count` suffix.
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    def add(self, value: float, suffix: str = "", **labels: str) -> None:
        self.samples.append((self.name + suffix, labels, value))


def render_metrics(master: Master, depths: dict[str, int] | None) -> str:
    """Return the exposition text of the master's metrics.

    `depths` maps each queue to its depth; None means that the data stream
    could not be reached, which `monomyth_stream_up` reports as 0.
    """
    return format_families(collect_families(master, depths))


def collect_families(
    master: Master, depths: dict[str, int] | None
) -> list[MetricFamily]:
    """Read the master's state into metric families, under its lock."""
    with master.lock:
        stats = master.type_stats()
        durations = master.batch_durations()
        workers = [worker.state for worker in master.workers.values()]
        processes = {
            node_type: [node.state for node in record.nodes.values()]
            for node_type, record in master.types.items()
        }

    families = []
    for name, key, text in _TYPE_COUNTERS:
        family = MetricFamily(name, "counter", text)
        for node_type, entry in stats.items():
            family.add(entry[key], node_type=node_type)
        families.append(family)

    families.append(_batch_duration_family(stats, durations))
    families.append(_progress_family(stats))
    families.append(_state_family(processes))

    family = MetricFamily(
        "monomyth_workers", "gauge", "Workers known to the master, by state."
    )
    for state in WorkerState:
        family.add(workers.count(state), state=state.value)
    families.append(family)

    families += _queue_families(depths)
    return families


def _batch_duration_family(
    stats: dict[str, dict], durations: dict[str, tuple[list[int], float]]
) -> MetricFamily:
    family = MetricFamily(
        "monomyth_batch_duration_seconds",
        "histogram",
        "Time that a node process took for one batch, from the pull result "
        "to the ack; transforms and sinks only.",
    )
    for node_type, entry in stats.items():
        if entry["kind"] == "source":
            continue
        counts, total_s = durations[node_type]
        cumulative = 0
        for bound, count in zip(BATCH_DURATION_BUCKETS_S, counts[:-1], strict=True):
            cumulative += count
            family.add(cumulative, "_bucket", node_type=node_type, le=_number(bound))
        cumulative += counts[-1]
        family.add(cumulative, "_bucket", node_type=node_type, le="+Inf")
        family.add(total_s, "_sum", node_type=node_type)
        family.add(cumulative, "_count", node_type=node_type)
    return family


def _progress_family(stats: dict[str, dict]) -> MetricFamily:
    family = MetricFamily(
        "monomyth_progress_ratio",
        "gauge",
        "Share of its input that a node type reported as read, from 0 to 1; "
        "only for types that report a total.",
    )
    for node_type, entry in stats.items():
        if entry["progress_total"] > 0:
            ratio = min(entry["progress_done"] / entry["progress_total"], 1.0)
            family.add(ratio, node_type=node_type)
    return family


def _state_family(processes: dict[str, list[NodeState]]) -> MetricFamily:
    family = MetricFamily(
        "monomyth_node_processes",
        "gauge",
        "Node processes of a type, by state; finished ones included.",
    )
    for node_type, states in processes.items():
        for state in NodeState:
            family.add(states.count(state), node_type=node_type, state=state.value)
    return family


def _queue_families(depths: dict[str, int] | None) -> list[MetricFamily]:
    up = MetricFamily(
        "monomyth_stream_up",
        "gauge",
        "1 when the data stream answered the queue depth request of this "
        "scrape, else 0.",
    )
    up.add(0 if depths is None else 1)
    depth = MetricFamily(
        "monomyth_queue_depth",
        "gauge",
        "Messages waiting in a queue plus those pulled and not yet acked "
        "(on RabbitMQ only those waiting); a message on an edge queue "
        "carries up to the target's batch_size items.",
    )
    for queue, value in (depths or {}).items():
        depth.add(value, queue=queue)
    return [depth, up]


def format_families(families: Iterable[MetricFamily]) -> str:
    """Return the exposition text of `families`, ending with a newline."""
    lines = []
    for family in families:
        lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for name, labels, value in family.samples:
            lines.append(f"{name}{_format_labels(labels)} {_number(value)}")
    return "\n".join(lines) + "\n"


def _format_labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    pairs = ",".join(
        f'{name}="{_escape_label(value)}"' for name, value in labels.items()
    )
    return "{" + pairs + "}"


def _escape_label(value: str) -> str:
    # The format escapes exactly these three characters in label values.
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)
