"""The control API: HTTP/JSON endpoints on the master, for operators and tools.

    engine master or engine run         ControlAPI
    └── thread control-api              accepts HTTP connections
        └── thread per connection       parses, authenticates, replies

Every endpoint takes and returns JSON; `docs/api.md` lists them. GET
endpoints only read the master's state and are open to anyone who can reach
the port. POST endpoints change it and, when the API has a token (the
cluster secret), require `Authorization: Bearer <token>`. A request the API
cannot take gets a 4xx status and `{"error": "..."}` naming the problem. An
unexpected exception in a handler is logged and gets a 500 reply, and the
server keeps serving.

`GET /` serves the dashboard, a page that polls the JSON endpoints, from the
files in `engine/dashboard/`. `GET /metrics` returns the Prometheus
exposition text of `engine.metrics`.

`write_discovery` writes `.monomyth/control.json` and the token beside it,
so that the `engine` control commands started in the same folder find the
API without options. `close` stops the server and removes those files.
"""

from __future__ import annotations

import contextlib
import hmac
import importlib.resources
import json
import logging
import math
import os
import re
import selectors
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from engine import metrics
from engine.errors import EngineError, StreamError
from engine.master import WorkerState
from engine.streams import open_stream, redact_url

if TYPE_CHECKING:
    from engine.master import Master
    from engine.streams import Stream

logger = logging.getLogger(__name__)

DEFAULT_API_PORT = 7601
MAX_BODY_BYTES = 64 * 1024
MAX_COUNT = 1000
# Seconds that a connection may stay silent before the server closes it, so a
# stalled client does not hold a thread forever.
CONNECTION_TIMEOUT_S = 30.0

CONTROL_FOLDER = Path(".monomyth")
DISCOVERY_FILE = CONTROL_FOLDER / "control.json"
TOKEN_FILE = CONTROL_FOLDER / "control.token"

# Node types, pipeline names and worker ids are made of these characters.
_ID = re.compile(r"[A-Za-z0-9_.-]{1,200}")

# The files of the dashboard, in the package folder engine/dashboard, and
# their Content-Type. `GET /assets/<file-name>` serves only these.
DASHBOARD_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# The page may load scripts, styles and data from the API itself only.
_DASHBOARD_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)


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


@dataclass(frozen=True, slots=True)
class Route:
    """One endpoint: its method, path shape and handler."""

    method: str
    # The first path segment, such as "start-node".
    name: str
    # The label of the id in the second segment ("node type"), or "" for none.
    id_label: str
    handler: Callable[[ControlAPI, str, dict[str, Any]], Reply]
    is_mutating: bool = False
    # The JSON body members that the endpoint accepts.
    fields: tuple[str, ...] = ()

    @property
    def shape(self) -> str:
        suffix = f"/<{self.id_label.replace(' ', '-')}>" if self.id_label else ""
        return f"{self.method} /{self.name}{suffix}"


class ControlAPI:
    """Serve the master's control API over HTTP/1.1 from a daemon thread.

    `token` is the bearer token that POST requests must carry. With None,
    every client may change the master's state. `stream_url` is the master's data
    stream, opened on the first `GET /queues` to read queue depths.
    `port` 0 picks a free port; read the `port` property after `start`.
    """

    def __init__(
        self,
        master: Master,
        host: str,
        port: int,
        token: bytes | None,
        stream_url: str,
    ) -> None:
        self.master = master
        self.host = host
        self.requested_port = port
        self.token = token
        self.stream_url = stream_url
        self.server: _Server | None = None
        self.thread: threading.Thread | None = None
        self.stream: Stream | None = None
        self.discovery: DiscoveryFile | None = None
        # Serializes opening the stream, so that concurrent requests open one.
        self.stream_lock = threading.Lock()
        # Whether the last scrape of /metrics failed to read queue depths, so
        # that a stream that stays down is logged once, not at every scrape.
        self.is_stream_down = False

    @property
    def port(self) -> int:
        """Return the TCP port that the API listens on."""
        if self.server is None:
            raise EngineError("the control API is not listening; call start() first")
        return self.server.server_address[1]

    @property
    def url(self) -> str:
        """Return the base URL at which a client on this host reaches the API."""
        host = self.host
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        """Bind the port and start serving in a daemon thread.

        Raises `EngineError` when the address cannot be bound, for example
        because another process listens on it.
        """
        server_class = _Server6 if ":" in self.host else _Server
        try:
            server = server_class((self.host, self.requested_port), _Handler)
        except OSError as exc:
            raise EngineError(
                f"control API cannot listen on {self.host}:{self.requested_port} "
                f"({exc.strerror or exc}); pass --api HOST:PORT with a free port, "
                "or --api off"
            ) from exc
        server.api = self
        self.server = server
        self.thread = threading.Thread(
            target=server.serve_until_stopped, name="control-api", daemon=True
        )
        self.thread.start()
        logger.info("control API listening on %s", self.url)

    def write_discovery(
        self, pipelines: list[str], folder: Path = CONTROL_FOLDER
    ) -> None:
        """Write the discovery files of this API into `folder`.

        Call it after `start`, once the API serves requests. `close` removes
        the files.
        """
        self.discovery = DiscoveryFile(
            self.url, self.token, pipelines, folder, self.stream_url
        )
        self.discovery.write()

    def close(self) -> None:
        """Stop serving, close the stream and remove the discovery files.

        Safe to call more than once.
        """
        if self.discovery is not None:
            self.discovery.remove()
            self.discovery = None
        if self.server is not None:
            self.server.stop()
            if self.thread is not None:
                self.thread.join()
            self.server.server_close()
            self.server = None
        with self.stream_lock:
            if self.stream is not None:
                with contextlib.suppress(Exception):
                    self.stream.close()
                self.stream = None

    def is_authorized(self, header: str | None) -> bool:
        """Return True when `header` carries the bearer token, or none is set."""
        if self.token is None:
            return True
        scheme, _, presented = (header or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(presented.strip().encode(), self.token)

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

    def metrics(self, _: str, body: dict[str, Any]) -> Reply:
        names = self._queue_names()
        depths: dict[str, int] | None
        try:
            depths = self._open_stream().depths(names) if names else {}
        except StreamError as exc:
            depths = None
            if not self.is_stream_down:
                logger.warning(
                    "metrics without queue depths: data stream %s is not reachable: %s",
                    redact_url(self.stream_url),
                    exc,
                )
        else:
            if self.is_stream_down:
                logger.info(
                    "data stream %s reachable again", redact_url(self.stream_url)
                )
        self.is_stream_down = depths is None
        text = metrics.render_metrics(self.master, depths)
        return Reply(
            HTTPStatus.OK, {}, content=text.encode(), content_type=metrics.CONTENT_TYPE
        )

    def dashboard(self, _: str, body: dict[str, Any]) -> Reply:
        return self.asset("index.html", body)

    def asset(self, name: str, body: dict[str, Any]) -> Reply:
        content_type = DASHBOARD_FILES.get(name)
        if content_type is None:
            known = ", ".join(repr(f) for f in DASHBOARD_FILES)
            raise RequestError(
                HTTPStatus.NOT_FOUND,
                f"dashboard file {name!r} not found; the files are {known}",
            )
        folder = importlib.resources.files("engine").joinpath("dashboard")
        content = folder.joinpath(name).read_bytes()
        return Reply(HTTPStatus.OK, {}, content=content, content_type=content_type)

    def start_node(self, node_type: str, body: dict[str, Any]) -> Reply:
        count = _count(body, minimum=1)
        master = self.master
        with master.lock:
            self._require_type(node_type)
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


ROUTES = (
    Route("GET", "", "", ControlAPI.dashboard),
    Route("GET", "dashboard", "", ControlAPI.dashboard),
    Route("GET", "assets", "file name", ControlAPI.asset),
    Route("GET", "ping", "", ControlAPI.ping),
    Route("GET", "status", "", ControlAPI.status),
    Route("GET", "graph", "", ControlAPI.graph),
    Route("GET", "metrics", "", ControlAPI.metrics),
    Route("GET", "recipe-info", "", ControlAPI.recipe_info),
    Route("GET", "worker-info", "", ControlAPI.worker_info),
    Route("GET", "queues", "", ControlAPI.queues),
    Route("POST", "start-node", "node type", ControlAPI.start_node, True, ("count",)),
    Route("POST", "stop-node", "node type", ControlAPI.stop_node, True, ("count",)),
    Route("POST", "scale", "node type", ControlAPI.scale, True, ("count",)),
    Route(
        "POST",
        "stop-worker",
        "worker id",
        ControlAPI.stop_worker,
        True,
        ("drain_timeout_s",),
    ),
    Route("POST", "start-pipeline", "pipeline name", ControlAPI.start_pipeline, True),
)
_ROUTES_BY_NAME = {route.name: route for route in ROUTES}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # `handle_request` polls once: the serving loop waits on the socket itself.
    timeout = 0.0
    api: ControlAPI

    def __init__(self, address: tuple[str, int], handler: type) -> None:
        self.is_stopping = False
        # `stop` writes a byte here, so that the serving loop wakes at once.
        # Made first, because a failed bind calls `server_close`.
        self.wake_reader, self.wake_writer = socket.socketpair()
        super().__init__(address, handler)

    def serve_until_stopped(self) -> None:
        """Serve requests until `stop` is called.

        Unlike `serve_forever`, whose `shutdown` waits for the next poll of
        the listening socket, this loop wakes as soon as `stop` is called.
        """
        with selectors.DefaultSelector() as selector:
            selector.register(self, selectors.EVENT_READ)
            selector.register(self.wake_reader, selectors.EVENT_READ)
            while not self.is_stopping:
                for key, _ in selector.select():
                    if key.fileobj is self and not self.is_stopping:
                        self.handle_request()

    def stop(self) -> None:
        """Make `serve_until_stopped` return; the caller joins its thread."""
        self.is_stopping = True
        self.wake_writer.send(b"\0")

    def server_close(self) -> None:
        super().server_close()
        self.wake_reader.close()
        self.wake_writer.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Handlers catch their own errors, so what arrives here is a connection
        # that failed, such as a client gone before the reply. socketserver
        # would print the traceback to stderr.
        logger.debug(
            "control API connection from %s failed",
            client_address[0],
            exc_info=True,
        )


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    """Parse one request, route it and send the JSON reply."""

    protocol_version = "HTTP/1.1"
    server_version = "monomyth-control/1"
    sys_version = ""
    timeout = CONNECTION_TIMEOUT_S
    server: _Server

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_OPTIONS(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        path = urlsplit(self.path).path
        try:
            body = self._read_body()
            route, item_id = self._route(path)
            if self.command == "OPTIONS":
                self._send(HTTPStatus.NO_CONTENT, None, {"Allow": _allow(route)})
                return
            if route.is_mutating and not self.server.api.is_authorized(
                self.headers.get("Authorization")
            ):
                raise RequestError(
                    HTTPStatus.UNAUTHORIZED,
                    "missing or invalid token: send the header 'Authorization: "
                    "Bearer <token>' with the cluster secret, as the engine "
                    "commands do with --token-file",
                    {"WWW-Authenticate": 'Bearer realm="monomyth"'},
                )
            reply = route.handler(self.server.api, item_id, _fields(body, route))
        except RequestError as exc:
            self._send(exc.status, {"error": str(exc)}, exc.headers)
            self._log(path, exc.status, str(exc))
            return
        except Exception as exc:
            logger.exception("control API request %s %s failed", self.command, path)
            error = f"internal error: {type(exc).__name__}: {exc}; see the master's log"
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": error})
            return
        if reply.content is None:
            self._send(reply.status, reply.body)
        else:
            self._send_payload(
                reply.status,
                reply.content,
                reply.content_type,
                _content_headers(reply.content_type),
            )
        self._log(path, reply.status, reply.summary)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise RequestError(
                HTTPStatus.LENGTH_REQUIRED,
                "chunked request bodies are not accepted; send Content-Length",
            )
        text = self.headers.get("Content-Length", "0").strip()
        if not text.isdigit():
            self.close_connection = True
            raise RequestError(
                HTTPStatus.BAD_REQUEST,
                f"invalid Content-Length {text!r}: expected a number of bytes",
            )
        length = int(text)
        if length > MAX_BODY_BYTES:
            # The body stays unread, so the connection cannot carry another request.
            self.close_connection = True
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"request body of {length} bytes exceeds the limit of "
                f"{MAX_BODY_BYTES} bytes",
            )
        return self.rfile.read(length) if length else b""

    def _route(self, path: str) -> tuple[Route, str]:
        segments = path.split("/")[1:]
        route = _ROUTES_BY_NAME.get(segments[0]) if segments else None
        expected = 2 if route and route.id_label else 1
        if route is None or len(segments) != expected:
            shapes = ", ".join(r.shape for r in ROUTES)
            raise RequestError(
                HTTPStatus.NOT_FOUND,
                f"path {path!r} not found; the endpoints are {shapes}",
            )
        allowed = (route.method, "HEAD") if route.method == "GET" else (route.method,)
        if self.command not in (*allowed, "OPTIONS"):
            raise RequestError(
                HTTPStatus.METHOD_NOT_ALLOWED,
                f"method {self.command} not allowed on {path!r}; use {route.shape}",
                {"Allow": _allow(route)},
            )
        if not route.id_label:
            return route, ""
        item_id = unquote(segments[1])
        if not _ID.fullmatch(item_id):
            raise RequestError(
                HTTPStatus.BAD_REQUEST,
                f"invalid {route.id_label} {item_id!r}: expected 1 to 200 "
                "letters, digits and the characters . _ -",
            )
        return route, item_id

    def _send(
        self,
        status: HTTPStatus,
        body: dict[str, Any] | None,
        headers: dict[str, str] | None = None,
    ) -> None:
        payload = None if body is None else json.dumps(body).encode() + b"\n"
        self._send_payload(status, payload, "application/json", headers)

    def _send_payload(
        self,
        status: HTTPStatus,
        payload: bytes | None,
        content_type: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        if payload is not None:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload or b"")))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and payload:
            self.wfile.write(payload)

    def send_error(
        self, code: int, message: str | None = None, explain: str | None = None
    ) -> None:
        """Send a JSON error for a request that http.server itself rejects."""
        # http.server calls this for a malformed request line or header, an
        # over-long URI, and a method that no do_* handler serves.
        status = HTTPStatus(code)
        text = message or status.phrase
        if status == HTTPStatus.NOT_IMPLEMENTED:
            text = f"method {self.command!r} is not supported; use GET or POST"
        self.close_connection = True
        self._send(status, {"error": text})
        logger.debug("control API rejected a request: %d %s", code, text)

    def _log(self, path: str, status: int, summary: str) -> None:
        client = self.client_address[0]
        route = _ROUTES_BY_NAME.get(path.split("/")[1] if "/" in path else "")
        if status == HTTPStatus.UNAUTHORIZED:
            logger.warning(
                "control API %s %s from %s rejected: missing or invalid token",
                self.command,
                path,
                client,
            )
        elif route is not None and route.is_mutating and self.command == "POST":
            logger.info(
                "control API %s %s from %s: %d %s",
                self.command,
                path,
                client,
                status,
                summary,
            )
        else:
            logger.debug(
                "control API %s %s from %s: %d", self.command, path, client, status
            )

    def log_message(self, message_format: str, *args: Any) -> None:
        # `_log` writes one line per request instead of http.server's stderr lines.
        logger.debug("control API: " + message_format, *args)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


def _content_headers(content_type: str) -> dict[str, str]:
    # The dashboard's files change with the installed package, and a browser
    # must not guess another type for them.
    headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
    if content_type.startswith("text/html"):
        headers["Content-Security-Policy"] = _DASHBOARD_POLICY
    return headers


def _allow(route: Route) -> str:
    methods = [route.method, "HEAD"] if route.method == "GET" else [route.method]
    return ", ".join([*methods, "OPTIONS"])


def _fields(body: bytes, route: Route) -> dict[str, Any]:
    """Decode a request body into a JSON object with only the route's fields."""
    if route.method != "POST" or not body.strip():
        return {}
    try:
        value = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(
            HTTPStatus.BAD_REQUEST, f"invalid JSON in the request body: {exc}"
        ) from exc
    if not isinstance(value, dict):
        raise RequestError(
            HTTPStatus.BAD_REQUEST,
            f"invalid request body: expected a JSON object, got {type(value).__name__}",
        )
    unknown = [name for name in value if name not in route.fields]
    if unknown:
        accepted = ", ".join(repr(f) for f in route.fields) or "none"
        raise RequestError(
            HTTPStatus.BAD_REQUEST,
            f"unknown field {unknown[0]!r} for {route.shape}; accepted fields "
            f"are {accepted}",
        )
    return value


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


class DiscoveryFile:
    """`.monomyth/control.json` and `.monomyth/control.token` of a running API.

    The `engine` control commands read them to find the API and its token.
    Both files are created with mode 0600, because the token is the cluster
    secret. Without a token, only `control.json` is written. `remove` deletes
    the files only while they still name this process, so a later run in the
    same folder keeps its own files.
    """

    def __init__(
        self,
        api_url: str,
        token: bytes | None,
        pipelines: list[str],
        folder: Path,
        stream_url: str = "",
    ) -> None:
        self.api_url = api_url
        self.token = token
        self.pipelines = pipelines
        # The master's data stream, for `engine fail-queue`. The file is
        # private to its user, like the token, because the URL may hold a
        # password.
        self.stream_url = stream_url
        self.path = folder / DISCOVERY_FILE.name
        self.token_path = folder / TOKEN_FILE.name

    def write(self) -> None:
        """Write both files, replacing those of an earlier process."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        content = {
            "api": self.api_url,
            "pid": os.getpid(),
            "pipelines": self.pipelines,
            "stream": self.stream_url,
        }
        if self.token is not None:
            _write_private(self.token_path, self.token + b"\n")
        _write_private(self.path, json.dumps(content, indent=2).encode() + b"\n")
        logger.debug("control API discovery file written to %s", self.path)

    def remove(self) -> None:
        """Delete both files if this process wrote them last."""
        try:
            content = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        if not isinstance(content, dict) or content.get("pid") != os.getpid():
            return
        with contextlib.suppress(OSError):
            if self.token and self.token_path.read_bytes().strip() == self.token:
                self.token_path.unlink()
        with contextlib.suppress(OSError):
            self.path.unlink()


def is_process_alive(pid: object) -> bool:
    """Return True when `pid`, as read from a discovery file, names a process."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # The process exists but belongs to another user.
        return True
    return True


def _write_private(path: Path, data: bytes) -> None:
    # Write a temporary file and rename it, so a reader never sees half a file.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)
    os.replace(temporary, path)
