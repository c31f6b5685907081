"""The graph of a pipeline: its edges, names, queues, checks and order.

Queue names derive from the graph: `<pipeline>.<from>-to-<to>` for an edge and
`<pipeline>.<node>-fail` for a node's failed items.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.errors import PipelineError
from engine.items import source_position_key

if TYPE_CHECKING:
    from engine._pipeline_nodes import NodeSpec


class GraphMixin:
    """The graph queries and checks of `Pipeline`.

    They use the `name`, `nodes` and `edges` that `Pipeline.__init__` sets.
    """

    def upstream(self, node: str) -> list[str]:
        """Return the names of the nodes whose results go to `node`."""
        return [edge.source for edge in self.edges if edge.target == node]

    def downstream(self, node: str) -> list[str]:
        """Return the names of the nodes that receive the results of `node`."""
        return [edge.target for edge in self.edges if edge.source == node]

    def node_type(self, node: str) -> str:
        """Return the cluster-wide type name of `node`: `<pipeline>.<node>`."""
        return f"{self.name}.{node}"

    def edge_queue(self, source: str, target: str) -> str:
        """Return the queue that carries the results of `source` to `target`."""
        return f"{self.name}.{source}-to-{target}"

    def fail_queue(self, node: str) -> str:
        """Return the queue that contains the items that failed in `node`."""
        return f"{self.name}.{node}-fail"

    def position_keys(self) -> list[str]:
        """Return the stream keys of the sources' positions, one per process."""
        return [
            source_position_key(self.node_type(name), index)
            for name, spec in self.nodes.items()
            if spec.kind == "source"
            for index in range(spec.settings.processes)
        ]

    def input_queues(self, node: str) -> list[str]:
        """Return the queues that `node` pulls from, one per incoming edge."""
        return [self.edge_queue(source, node) for source in self.upstream(node)]

    def data_queues(self) -> list[str]:
        """Return every edge queue of the pipeline, in declaration order."""
        return [self.edge_queue(edge.source, edge.target) for edge in self.edges]

    def all_queues(self) -> list[str]:
        """Return every queue of the pipeline: edge queues, then fail queues."""
        return self.data_queues() + [self.fail_queue(name) for name in self.nodes]

    def check(self) -> None:
        """Raise `PipelineError` if the graph cannot run as declared.

        Checks that edges name known nodes, that sources have no inputs and
        sinks no outputs, that every other node is connected both ways, and
        that the graph has no cycle.
        """
        if not self.nodes:
            raise PipelineError(
                f"pipeline {self.name!r} has no nodes; declare at least a source "
                "and a sink"
            )
        known = ", ".join(repr(name) for name in self.nodes)
        for edge in self.edges:
            for end in (edge.source, edge.target):
                if end not in self.nodes:
                    raise PipelineError(
                        f"edge {edge.source!r} -> {edge.target!r}: node {end!r} not "
                        f"found; known nodes are {known}"
                    )
        if not any(spec.kind == "source" for spec in self.nodes.values()):
            raise PipelineError(
                f"pipeline {self.name!r} has no source node; declare one with "
                "@pipeline.source()"
            )
        for spec in self.nodes.values():
            self._check_connections(spec)
        cycle = self._find_cycle()
        if cycle:
            path = " -> ".join(repr(name) for name in cycle)
            raise PipelineError(
                f"cycle {path} in pipeline {self.name!r}; a pipeline must be "
                f"acyclic, so remove one of these edges"
            )

    def _check_connections(self, spec: NodeSpec) -> None:
        has_inputs = bool(self.upstream(spec.name))
        has_outputs = bool(self.downstream(spec.name))
        if spec.kind == "source" and has_inputs:
            raise PipelineError(
                f"edge into source node {spec.name!r} from "
                f"{self.upstream(spec.name)[0]!r}: sources pull nothing; make "
                f"{spec.name!r} a transform"
            )
        if spec.kind == "sink" and has_outputs:
            raise PipelineError(
                f"edge from sink node {spec.name!r} to "
                f"{self.downstream(spec.name)[0]!r}: sinks place nothing "
                f"downstream; make {spec.name!r} a transform"
            )
        if spec.kind != "source" and not has_inputs:
            raise PipelineError(
                f"{spec.kind} node {spec.name!r} has no input; give it "
                "after='<upstream node>' or connect a node to it"
            )
        if spec.kind != "sink" and not has_outputs:
            raise PipelineError(
                f"{spec.kind} node {spec.name!r} sends its results nowhere; "
                "connect it to a downstream node, or make it a sink"
            )

    def _find_cycle(self) -> list[str] | None:
        state: dict[str, int] = {}  # 1 while on the current path, 2 once done
        path: list[str] = []

        def visit(node: str) -> list[str] | None:
            state[node] = 1
            path.append(node)
            for target in self.downstream(node):
                if state.get(target) == 1:
                    return path[path.index(target) :] + [target]
                if target not in state:
                    found = visit(target)
                    if found:
                        return found
            path.pop()
            state[node] = 2
            return None

        for name in self.nodes:
            if name not in state:
                found = visit(name)
                if found:
                    return found
        return None

    def topological_order(self) -> list[str]:
        """Return the node names so that each comes after its upstream nodes."""
        order: list[str] = []
        remaining = dict.fromkeys(self.nodes)
        while remaining:
            ready = [n for n in remaining if all(u in order for u in self.upstream(n))]
            if not ready:
                raise PipelineError(f"cycle in pipeline {self.name!r}")
            for name in ready:
                order.append(name)
                del remaining[name]
        return order
