"""Placement of nodes on workers and the completion cascade of node types.

`PlacementMixin` is a part of `Master` and uses its lock, records and
`_send`. It queues nodes, places each on the joined worker with the fewest
nodes of its type, then the fewest in all, stops and scales nodes, and marks
a node type completing once every type upstream of it is done. The nodes of
a worker that is gone are queued again for the other workers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from engine import protocol as mmop
from engine._master_records import (
    NodeRecord,
    NodeState,
    TypeRecord,
    TypeState,
    WorkerRecord,
    WorkerState,
)
from engine.errors import EngineError
from engine.recipe import build_recipe, params_digest

if TYPE_CHECKING:
    from engine.pipeline import Pipeline

# Every log line of the master names `engine.master`, whichever part writes it.
logger = logging.getLogger("engine.master")


class PlacementMixin:
    """The `Master` methods that queue, place, stop and complete nodes."""

    # Pipelines and recipes.

    def add_pipeline(self, pipeline: Pipeline, params: dict[str, Any]) -> None:
        """Build and hold the recipes of every node of a checked pipeline."""
        pipeline.check()
        recipes = {
            name: build_recipe(pipeline, name, params) for name in pipeline.nodes
        }
        digest = params_digest(params)
        with self.lock:
            if pipeline.name in self.pipelines:
                raise EngineError(
                    f"pipeline {pipeline.name!r} is loaded already; give the "
                    "other pipeline another name"
                )
            names = []
            for name, spec in pipeline.nodes.items():
                node_type = pipeline.node_type(name)
                self.types[node_type] = TypeRecord(
                    node_type=node_type,
                    pipeline=pipeline.name,
                    node=name,
                    kind=spec.kind,
                    recipe=recipes[name],
                    processes=spec.settings.processes,
                    upstream=[pipeline.node_type(n) for n in pipeline.upstream(name)],
                    downstream=[
                        pipeline.node_type(n) for n in pipeline.downstream(name)
                    ],
                    input_queues=pipeline.input_queues(name),
                    params_digest=digest,
                )
                names.append(node_type)
            self.pipelines[pipeline.name] = names
        logger.info("pipeline %s loaded with %d node types", pipeline.name, len(names))

    def start_pipeline(
        self,
        name: str,
        sources: Collection[str] | None = None,
        resume_sources: bool = False,
    ) -> list[str]:
        """Start every node type of pipeline `name` with its declared processes.

        `sources` names the source nodes to run, all when None. The others
        count as completed at once, so the other nodes process what the
        stream contains already and complete. With `resume_sources`, the
        sources skip the items that the stream records as published by an
        earlier run. Nodes wait in the queued state until a worker joins.
        Returns the new node ids.
        """
        with self.lock:
            if name not in self.pipelines:
                raise EngineError(
                    f"pipeline {name!r} not found; loaded pipelines are "
                    + (", ".join(repr(p) for p in self.pipelines) or "none")
                )
            node_ids = []
            for node_type in self.pipelines[name]:
                record = self.types[node_type]
                if record.kind != "source":
                    node_ids += self.start_nodes(node_type, record.processes)
                elif sources is None or record.node in sources:
                    node_ids += self.start_nodes(
                        node_type, record.processes, resume=resume_sources
                    )
                else:
                    record.state = TypeState.COMPLETED
            for node_type in self.pipelines[name]:
                self._complete_if_ready(self.types[node_type])
            return node_ids

    def has_nodes(self, name: str) -> bool:
        """Return True when workers reported nodes of pipeline `name` already."""
        with self.lock:
            return any(self.types[t].nodes for t in self.pipelines[name])

    def resume_pipeline(self, name: str) -> list[str]:
        """Start only the processes that pipeline `name` lacks after a restart.

        Types whose nodes completed are left alone; for the others, as many
        nodes start as the declared process count exceeds the live ones.
        """
        live = (NodeState.QUEUED, NodeState.RUNNING, NodeState.RESTARTING)
        with self.lock:
            node_ids = []
            for node_type in self.pipelines[name]:
                record = self.types[node_type]
                if record.is_done or record.count(NodeState.COMPLETED):
                    continue
                running = sum(1 for n in record.nodes.values() if n.state in live)
                if running < record.processes:
                    # They replace processes lost while the master was down, so
                    # a source continues after the items it published.
                    node_ids += self.start_nodes(
                        node_type, record.processes - running, resume=True
                    )
            logger.info(
                "pipeline %s resumed with the workers' nodes; %d nodes started",
                name,
                len(node_ids),
            )
            return node_ids

    def start_nodes(
        self, node_type: str, count: int = 1, resume: bool = False
    ) -> list[str]:
        """Queue `count` new processes of `node_type`, placed on workers when free.

        With `resume`, a source skips the items that the stream records as
        published by the process of the same number in an earlier run.
        """
        with self.lock:
            record = self._type_record(node_type)
            if record.is_done:
                raise EngineError(
                    f"node type {node_type!r} has {record.state.value}; start the "
                    "pipeline again to run it"
                )
            if record.state == TypeState.PENDING:
                record.state = TypeState.RUNNING
            node_ids = []
            for _ in range(count):
                node_id = f"{node_type}#{record.next_number}"
                record.next_number += 1
                record.nodes[node_id] = NodeRecord(
                    node_id, node_type, None, has_started=resume
                )
                node_ids.append(node_id)
            self._place_queued()
            return node_ids

    def _place_queued(self) -> None:
        """Send START-NODE for every queued node that has no worker yet."""
        for record in self.types.values():
            for node in record.nodes.values():
                if node.state == NodeState.QUEUED and node.worker_id is None:
                    worker = self._choose_worker(record.node_type)
                    if worker is None:
                        return
                    self._send_start(worker, record, node)

    def _choose_worker(self, node_type: str) -> WorkerRecord | None:
        candidates = [
            w
            for w in self.workers.values()
            if w.state == WorkerState.JOINED and w.connection
        ]
        if not candidates:
            return None

        def load(worker: WorkerRecord) -> tuple[int, int, str]:
            of_type = total = 0
            for record in self.types.values():
                for node in record.nodes.values():
                    if node.worker_id == worker.worker_id and node.state in (
                        NodeState.QUEUED,
                        NodeState.RUNNING,
                        NodeState.RESTARTING,
                    ):
                        total += 1
                        of_type += record.node_type == node_type
            return (of_type, total, worker.worker_id)

        return min(candidates, key=load)

    def _type_record(self, node_type: str) -> TypeRecord:
        """Return the record of `node_type`, raising `EngineError` if it is unknown."""
        record = self.types.get(node_type)
        if record is None:
            known = ", ".join(repr(t) for t in self.types) or "none"
            raise EngineError(
                f"node type {node_type!r} not found; known types are {known}"
            )
        return record

    def _send_start(
        self, worker: WorkerRecord, record: TypeRecord, node: NodeRecord
    ) -> None:
        node.worker_id = worker.worker_id
        node.state = NodeState.QUEUED
        is_completing = record.state == TypeState.COMPLETING
        message = mmop.StartNode(
            node_id=node.node_id,
            node_type=record.node_type,
            recipe=record.recipe,
            complete=is_completing,
            resume=node.has_started,
        )
        logger.debug("START-NODE %s sent to %s", node.node_id, worker.worker_id)
        self._send(worker, message)

    # Completion.

    def _update_type(self, record: TypeRecord) -> None:
        """Mark a type done when no node of it is left, then cascade."""
        if record.is_done or not record.nodes:
            return
        live = (NodeState.QUEUED, NodeState.RUNNING, NodeState.RESTARTING)
        if any(node.state in live for node in record.nodes.values()):
            return
        if any(node.state == NodeState.COMPLETED for node in record.nodes.values()):
            record.state = TypeState.COMPLETED
        elif all(node.state == NodeState.STOPPED for node in record.nodes.values()):
            return
        else:
            record.state = TypeState.FAILED
        if record.count(NodeState.FAILED):
            record.state = TypeState.FAILED
        logger.info("node type %s %s", record.node_type, record.state.value)
        for node_type in record.downstream:
            self._complete_if_ready(self.types[node_type])

    def _complete_if_ready(self, record: TypeRecord) -> None:
        # A source completes when its generator is exhausted, not on request.
        if record.kind == "source":
            return
        if record.state not in (TypeState.PENDING, TypeState.RUNNING):
            return
        if not all(self.types[t].is_done for t in record.upstream):
            return
        record.state = TypeState.COMPLETING
        logger.info("node type %s completing: its upstream is done", record.node_type)
        for worker in self.workers.values():
            if worker.state == WorkerState.JOINED:
                self._send(worker, mmop.CompleteType(node_type=record.node_type))

    def is_pipeline_done(self, name: str) -> bool:
        """Return True when every node type of pipeline `name` is done."""
        with self.lock:
            return all(self.types[t].is_done for t in self.pipelines[name])

    def wait_pipeline(self, name: str, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for pipeline `name` to finish; True if it did."""
        deadline = time.monotonic() + timeout_s
        with self.changed:
            while not self.is_pipeline_done(name):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.changed.wait(remaining)
            return True

    def _release_nodes(self, worker: WorkerRecord) -> None:
        """Queue the unfinished nodes of a gone worker for the other workers."""
        if self.is_stopping:
            return
        released = 0
        for record in self.types.values():
            if record.is_done:
                continue
            for node in record.nodes.values():
                if node.node_id in self.stop_requested_ids:
                    continue
                if node.worker_id == worker.worker_id and node.state in (
                    NodeState.QUEUED,
                    NodeState.RUNNING,
                    NodeState.RESTARTING,
                    NodeState.STOPPED,
                ):
                    node.worker_id = None
                    node.state = NodeState.QUEUED
                    node.pid = None
                    node.carry_counters()
                    released += 1
        if released:
            logger.info(
                "%d nodes of worker %s queued for other workers",
                released,
                worker.worker_id,
            )
        self._place_queued()
        self.changed.notify_all()

    # Stopping and scaling the nodes of a type.

    def _stop_requested_ids(self) -> set[str]:
        """Return the ids of nodes sent STOP-NODE that may still be draining."""
        # Ids stay after NODE-STOPPED arrives, which is harmless because
        # `active_node_ids` checks the node's state first.
        return self.stop_requested_ids

    def active_node_ids(self, node_type: str) -> list[str]:
        """Return the ids of the live nodes of `node_type` not asked to stop.

        Live nodes are queued, running or restarting. The ids come oldest
        first. Raises `EngineError` for an unknown node type.
        """
        with self.lock:
            record = self._type_record(node_type)
            stopping = self._stop_requested_ids()
            live = (NodeState.QUEUED, NodeState.RUNNING, NodeState.RESTARTING)
            return [
                node.node_id
                for node in record.nodes.values()
                if node.state in live and node.node_id not in stopping
            ]

    def stop_nodes(self, node_type: str, count: int = 1) -> list[str]:
        """Drain and stop up to `count` of the newest live nodes of `node_type`.

        A node placed on a worker gets STOP-NODE: it finishes its batch and
        exits, and counts as stopped once its worker reports NODE-STOPPED. A
        node still queued for want of a worker is stopped at once. Returns
        the ids of the nodes asked to stop, newest first, which are fewer
        than `count` when fewer are live. Raises `EngineError` for an unknown
        node type.

        Limits: stopping every node of a type leaves the type running, so
        the types downstream of it never complete.
        """
        with self.lock:
            newest_first = self.active_node_ids(node_type)[::-1][:count]
            record = self.types[node_type]
            for node_id in newest_first:
                node = record.nodes[node_id]
                worker = self.workers.get(node.worker_id or "")
                if worker is None:
                    node.state = NodeState.STOPPED
                    continue
                self._stop_requested_ids().add(node_id)
                logger.debug("STOP-NODE %s sent to %s", node_id, worker.worker_id)
                self._send(worker, mmop.StopNode(node_id=node_id))
            if newest_first:
                self._update_type(record)
                self.changed.notify_all()
            return newest_first

    def scale_nodes(self, node_type: str, count: int) -> tuple[list[str], list[str]]:
        """Start or stop nodes of `node_type` until `count` of them are live.

        Nodes already asked to stop do not count. Returns the ids of the
        nodes started and of those asked to stop, and one of the two lists
        is empty.
        Raises `EngineError` for an unknown node type, and for a type that
        has completed or failed when nodes would have to start.
        """
        with self.lock:
            active = len(self.active_node_ids(node_type))
            if count > active:
                return self.start_nodes(node_type, count - active), []
            return [], self.stop_nodes(node_type, active - count)
