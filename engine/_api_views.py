"""The JSON endpoints of `ControlAPI`: status, queues, graph and node control.

`ViewsMixin` contains the handlers of the endpoints that read or change the
master's state, and the checks of their request bodies. A handler returns a
`Reply`, or raises `RequestError` for a request that it rejects.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from engine._pipeline_nodes import MAX_PROCESSES
from engine.errors import EngineError, StreamError
from engine.master import WorkerState
from engine.streams import open_stream, redact_url

if TYPE_CHECKING:
    from engine.master import Master
    from engine.streams import Stream

# The maximum number of processes in one start-node or scale request.
MAX_COUNT = MAX_PROCESSES


class RequestError(Exception):
    """A request that the API rejects with a 4xx status and a JSON error."""

    def __init__(
        self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


@dataclass(frozen=True, slots=True)
class Reply:
    """A status and JSON body to send, and a summary for the log line.

    A reply with `content` sends those bytes as `content_type` instead of
    the JSON body.
    """

    status: HTTPStatus
    body: dict[str, Any]
    summary: str = ""
    content: bytes | None = None
    content_type: str = "application/json"


class ViewsMixin:
    """The JSON endpoints of `ControlAPI`, and the helpers of their handlers.

    The handlers use the state that `ControlAPI.__init__` sets.
    """

    # Handlers. Each takes the id from the path ("" for none) and the body.

    def ping(self, _: str, body: dict[str, Any]) -> Reply:
        return Reply(HTTPStatus.OK, {"ok": True, "pong": True})

    def recipe_info(self, _: str, body: dict[str, Any]) -> Reply:
        return Reply(HTTPStatus.OK, {"types": self.master.recipe_info()})

    def worker_info(self, _: str, body: dict[str, Any]) -> Reply:
        return Reply(HTTPStatus.OK, {"workers": self.master.worker_info()})

    def status(self, _: str, body: dict[str, Any]) -> Reply:
        master = self.master
        with master.lock:
            pipelines = {
                name: {
                    "done": master.is_pipeline_done(name),
                    "node_types": list(node_types),
                }
                for name, node_types in master.pipelines.items()
            }
            result = {
                "workers": master.worker_info(),
                "types": master.type_stats(),
                "nodes": master.node_stats(),
                "pipelines": pipelines,
            }
        return Reply(HTTPStatus.OK, result)

    def queues(self, _: str, body: dict[str, Any]) -> Reply:
        names = self._queue_names()
        try:
            depths = self._open_stream().depths(names) if names else {}
        except StreamError as exc:
            raise RequestError(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"data stream {redact_url(self.stream_url)} is not reachable: {exc}",
            ) from exc
        return Reply(HTTPStatus.OK, {"queues": {name: depths[name] for name in names}})

    def graph(self, _: str, body: dict[str, Any]) -> Reply:
        master = self.master
        with master.lock:
            pipelines = {
                name: _pipeline_graph(master, node_types)
                for name, node_types in master.pipelines.items()
            }
        return Reply(HTTPStatus.OK, {"pipelines": pipelines})

    def start_node(self, node_type: str, body: dict[str, Any]) -> Reply:
        count = _count(body, minimum=1)
        master = self.master
        with master.lock:
            self._require_type(node_type)
            self._require_source_room(node_type, count)
            node_ids = self._apply(lambda: master.start_nodes(node_type, count))
            record = master.types[node_type]
            is_queued = any(record.nodes[n].worker_id is None for n in node_ids)
        status = HTTPStatus.ACCEPTED if is_queued else HTTPStatus.CREATED
        summary = ("queued " if is_queued else "started ") + ", ".join(node_ids)
        return Reply(status, {"node_ids": node_ids, "queued": is_queued}, summary)

    def stop_node(self, node_type: str, body: dict[str, Any]) -> Reply:
        count = _count(body, minimum=1)
        with self.master.lock:
            self._require_type(node_type)
            node_ids = self.master.stop_nodes(node_type, count)
        summary = "stopping " + (", ".join(node_ids) or "no node")
        return Reply(HTTPStatus.ACCEPTED, {"node_ids": node_ids}, summary)

    def scale(self, node_type: str, body: dict[str, Any]) -> Reply:
        if "count" not in body:
            raise RequestError(
                HTTPStatus.BAD_REQUEST,
                "missing field 'count': send {\"count\": N}, the number of "
                f"processes wanted, from 0 to {MAX_COUNT}",
            )
        count = _count(body, minimum=0)
        master = self.master
        with master.lock:
            self._require_type(node_type)
            active = len(master.active_node_ids(node_type))
            self._require_source_room(node_type, count - active)
            started, stopping = self._apply(
                lambda: master.scale_nodes(node_type, count)
            )
        reply = {
            "node_type": node_type,
            "count": count,
            "started": started,
            "stopping": stopping,
        }
        summary = f"to {count}: started {len(started)}, stopping {len(stopping)}"
        return Reply(HTTPStatus.OK, reply, summary)

    def stop_worker(self, worker_id: str, body: dict[str, Any]) -> Reply:
        drain_timeout_s = _drain_timeout(body)
        master = self.master
        with master.lock:
            worker = master.workers.get(worker_id)
            if worker is None:
                known = ", ".join(repr(w) for w in master.workers) or "none"
                raise RequestError(
                    HTTPStatus.NOT_FOUND,
                    f"worker {worker_id!r} not found; known workers are {known}",
                )
            if worker.state != WorkerState.JOINED:
                raise RequestError(
                    HTTPStatus.CONFLICT,
                    f"worker {worker_id!r} is {worker.state.value}, not joined; "
                    "only a joined worker can be stopped",
                )
            master.stop_worker(worker_id, drain_timeout_s)
        return Reply(HTTPStatus.ACCEPTED, {"worker_id": worker_id}, "draining")

    def start_pipeline(self, name: str, body: dict[str, Any]) -> Reply:
        master = self.master
        with master.lock:
            if name not in master.pipelines:
                known = ", ".join(repr(p) for p in master.pipelines) or "none"
                raise RequestError(
                    HTTPStatus.NOT_FOUND,
                    f"pipeline {name!r} not found; loaded pipelines are {known}",
                )
            node_ids = self._apply(lambda: master.start_pipeline(name))
        return Reply(
            HTTPStatus.CREATED, {"node_ids": node_ids}, "started " + ", ".join(node_ids)
        )

    # Helpers of the handlers.

    def _require_type(self, node_type: str) -> None:
        if node_type not in self.master.types:
            known = ", ".join(repr(t) for t in self.master.types) or "none"
            raise RequestError(
                HTTPStatus.NOT_FOUND,
                f"node type {node_type!r} not found; known types are {known}",
            )

    def _require_source_room(self, node_type: str, starting: int) -> None:
        """Reject starting source processes beyond those the pipeline declares.

        Each source process publishes its whole share of the input, chosen
        by `ctx.process_index` and `ctx.process_count`, so one more process
        would publish items that the others publish too.
        """
        record = self.master.types[node_type]
        # A type that is done gets the master's own reason.
        if record.kind != "source" or starting <= 0 or record.is_done:
            return
        created = record.next_number - 1
        if created + starting > record.processes:
            raise RequestError(
                HTTPStatus.CONFLICT,
                f"source {node_type!r} has started {created} of the "
                f"{record.processes} processes that its pipeline declares; "
                "another would publish its items again, so change processes= "
                "in the pipeline file and start a new run instead",
            )

    def _apply(self, action: Callable[[], Any]) -> Any:
        # The handlers check that the type or pipeline exists first, so an
        # `EngineError` here means its state forbids the action.
        try:
            return action()
        except EngineError as exc:
            raise RequestError(HTTPStatus.CONFLICT, str(exc)) from exc

    def _queue_names(self) -> list[str]:
        """Return every edge queue and fail queue of the loaded pipelines."""
        names: list[str] = []
        with self.master.lock:
            for node_types in self.master.pipelines.values():
                for node_type in node_types:
                    names += self.master.types[node_type].input_queues
                # The fail queue of node type `p.n` is `p.n-fail`, the name
                # that `Pipeline.fail_queue` gives it.
                names += [f"{node_type}-fail" for node_type in node_types]
        return list(dict.fromkeys(names))

    def _open_stream(self) -> Stream:
        with self.stream_lock:
            if self.stream is None:
                self.stream = open_stream(self.stream_url, owner="control-api")
            return self.stream


def _count(body: dict[str, Any], minimum: int) -> int:
    count = body.get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int):
        raise RequestError(
            HTTPStatus.BAD_REQUEST,
            f"invalid count={count!r}: count must be an integer from {minimum} "
            f"to {MAX_COUNT}",
        )
    if not minimum <= count <= MAX_COUNT:
        raise RequestError(
            HTTPStatus.BAD_REQUEST,
            f"invalid count={count}: count must be from {minimum} to {MAX_COUNT}",
        )
    return count


def _drain_timeout(body: dict[str, Any]) -> float:
    value = body.get("drain_timeout_s", 60.0)
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if not is_number or not math.isfinite(value) or value < 0:
        raise RequestError(
            HTTPStatus.BAD_REQUEST,
            f"invalid drain_timeout_s={value!r}: expected a number of seconds, "
            "0 or more",
        )
    return float(value)


def _pipeline_graph(master: Master, node_types: list[str]) -> dict[str, Any]:
    """Return the node types of a pipeline with their columns, and its edges.

    A type's column is the length of the longest path to it from a source,
    so that every edge leads to a later column. Call it under the lock.
    """
    columns: dict[str, int] = {}

    def column(node_type: str) -> int:
        if node_type not in columns:
            upstream = master.types[node_type].upstream
            # Pipelines are acyclic, so the recursion ends at the sources.
            columns[node_type] = 1 + max(map(column, upstream), default=-1)
        return columns[node_type]

    nodes = []
    edges = []
    for node_type in node_types:
        record = master.types[node_type]
        nodes.append(
            {
                "node_type": node_type,
                "node": record.node,
                "kind": record.kind,
                "column": column(node_type),
                "fail_queue": f"{node_type}-fail",
            }
        )
        for source, queue in zip(record.upstream, record.input_queues, strict=True):
            edges.append({"from": source, "to": node_type, "queue": queue})
    return {"nodes": nodes, "edges": edges}
