"""Read-only views of the master's records, for clients and metrics.

`StatsMixin` is a part of `Master` and reads its records under its lock.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from engine._master_records import STAT_KEYS, NodeState
from engine.runtime import BATCH_DURATION_BUCKETS_S


class StatsMixin:
    """The `Master` methods that report states, counters and durations."""

    def recipe_info(self) -> dict[str, dict[str, Any]]:
        """Return, per node type, its state and nodes queued, running and done."""
        with self.lock:
            return {
                node_type: {
                    "state": record.state.value,
                    "queued": record.count(NodeState.QUEUED),
                    "running": record.count(NodeState.RUNNING)
                    + record.count(NodeState.RESTARTING),
                    "completed": record.count(NodeState.COMPLETED),
                    "stopped": record.count(NodeState.STOPPED),
                    "failed": record.count(NodeState.FAILED),
                    "last_error": record.last_error,
                }
                for node_type, record in self.types.items()
            }

    def worker_info(self) -> dict[str, dict[str, Any]]:
        """Return, per worker, its host, state and node ids by type."""
        with self.lock:
            info: dict[str, dict[str, Any]] = {}
            for worker_id, worker in self.workers.items():
                nodes: dict[str, list[str]] = {}
                for record in self.types.values():
                    for node in record.nodes.values():
                        if node.worker_id == worker_id and node.state in (
                            NodeState.QUEUED,
                            NodeState.RUNNING,
                            NodeState.RESTARTING,
                        ):
                            nodes.setdefault(record.node_type, []).append(node.node_id)
                info[worker_id] = {
                    "hostname": worker.hostname,
                    "pid": worker.pid,
                    "state": worker.state.value,
                    "cores": worker.cores,
                    "memory_bytes": worker.memory_bytes,
                    "cpu_percent": worker.cpu_percent,
                    "process_memory_bytes": worker.process_memory_bytes,
                    "last_seen_s_ago": round(time.monotonic() - worker.last_seen, 3),
                    "nodes": nodes,
                }
            return info

    def type_stats(self, names: Iterable[str] | None = None) -> dict[str, dict]:
        """Return, per node type, its state, counters summed over its nodes, and
        its processes by state."""
        with self.lock:
            result = {}
            for node_type in names or self.types:
                record = self.types[node_type]
                totals = dict.fromkeys(STAT_KEYS, 0)
                restarts = progress_done = progress_total = 0
                for node in record.nodes.values():
                    for key in STAT_KEYS:
                        totals[key] += node.stats.get(key, 0)
                    restarts += node.restarts
                    progress_done += node.progress_done
                    progress_total += node.progress_total
                result[node_type] = {
                    "node": record.node,
                    "kind": record.kind,
                    "state": record.state.value,
                    "running": record.count(NodeState.RUNNING),
                    "processes": len(record.nodes),
                    "restarts": restarts,
                    "last_error": record.last_error,
                    "input_queues": list(record.input_queues),
                    **totals,
                    "progress_done": progress_done,
                    "progress_total": progress_total,
                }
            return result

    def node_stats(self) -> dict[str, dict[str, Any]]:
        """Return, per node id, its type, worker, state and counters."""
        with self.lock:
            return {
                node.node_id: {
                    "node_type": record.node_type,
                    "worker_id": node.worker_id,
                    "state": node.state.value,
                    "pid": node.pid,
                    "restarts": node.restarts,
                    "cpu_percent": node.cpu_percent,
                    "memory_bytes": node.memory_bytes,
                    **{key: node.stats.get(key, 0) for key in STAT_KEYS},
                    "progress_done": node.progress_done,
                    "progress_total": node.progress_total,
                }
                for record in self.types.values()
                for node in record.nodes.values()
            }

    def batch_durations(self) -> dict[str, tuple[list[int], float]]:
        """Return, per node type, its batch duration histogram summed over nodes.

        Each value is the count per bucket of BATCH_DURATION_BUCKETS_S plus
        one for the batches over its largest bound, not cumulative, and the
        sum of the durations in seconds.
        """
        with self.lock:
            result = {}
            for node_type, record in self.types.items():
                counts = [0] * (len(BATCH_DURATION_BUCKETS_S) + 1)
                total_s = 0.0
                for node in record.nodes.values():
                    for index, count in enumerate(node.batch_duration_counts):
                        counts[index] += count
                    total_s += node.batch_duration_sum_s
                result[node_type] = (counts, total_s)
            return result
