"""The reports of a worker on its nodes: the heartbeat and each node's report.

A node report contains the node's state, restarts, counters, CPU and
memory. The heartbeat adds the worker's own CPU and memory to those of its
nodes.
"""

from __future__ import annotations

import contextlib
from typing import Any

import psutil

from engine import protocol as mmop
from engine._worker_nodes import ManagedNode, NodeState, _psutil_process
from engine.runtime import counters_to_stats


class HeartbeatMixin:
    """The reports of `Worker` on its nodes, for heartbeats and READY.

    Its methods use the state that `Worker.__init__` sets.
    """

    def _active_nodes(self) -> list[ManagedNode]:
        done = (NodeState.COMPLETED, NodeState.STOPPED, NodeState.FAILED)
        return [node for node in self.nodes.values() if node.state not in done]

    def _alive_nodes(self) -> list[ManagedNode]:
        return [node for node in self.nodes.values() if node.is_alive]

    def _stats(self, node: ManagedNode) -> dict[str, Any]:
        return counters_to_stats(node.counters)

    def _node_report(self, node: ManagedNode) -> dict[str, Any]:
        report: dict[str, Any] = {
            "node_id": node.node_id,
            "node_type": node.node_type,
            "pid": node.pid,
            "state": node.state.value,
            "restarts": node.restarts,
            "has_started": node.has_started,
            "last_error": node.last_error,
            "params_digest": node.header.params_digest,
            "cpu_percent": 0.0,
            "memory_bytes": 0,
            **self._stats(node),
        }
        if node.is_alive:
            with contextlib.suppress(psutil.Error):
                process = _psutil_process(node.pid)
                report["cpu_percent"] = process.cpu_percent(None)
                report["memory_bytes"] = process.memory_info().rss
        return report

    def _send_heartbeat(self) -> None:
        nodes = [self._node_report(node) for node in self.nodes.values()]
        # The worker's own use plus that of its node processes.
        cpu_percent = self.process.cpu_percent(None)
        cpu_percent += sum(report["cpu_percent"] for report in nodes)
        memory_bytes = self.process.memory_info().rss
        memory_bytes += sum(report["memory_bytes"] for report in nodes)
        self._send(
            mmop.Heartbeat(
                worker_id=self.worker_id,
                cpu_percent=cpu_percent,
                memory_bytes=memory_bytes,
                nodes=nodes,
            )
        )
