"""The HTTP side of `ControlAPI`: its routes, server and request handler.

`ROUTES` maps each endpoint's method and path to its handler. `_Server`
serves connections from the API's thread, a thread per connection, and
`_Handler` parses a request, checks its token, calls the handler of its
route and sends the reply.
"""

from __future__ import annotations

import json
import logging
import re
import selectors
import socket
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from engine._api_dashboard import DashboardMixin, _content_headers
from engine._api_views import Reply, RequestError, ViewsMixin

if TYPE_CHECKING:
    from engine.api import ControlAPI

# The public module's logger, so that one name covers every part of the API.
logger = logging.getLogger("engine.api")

MAX_BODY_BYTES = 64 * 1024
# Seconds that a connection may stay silent before the server closes it, so a
# stalled client does not hold a thread forever.
CONNECTION_TIMEOUT_S = 30.0

# Node types, pipeline names and worker ids are made of these characters.
_ID = re.compile(r"[A-Za-z0-9_.-]{1,200}")


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


ROUTES = (
    Route("GET", "", "", DashboardMixin.dashboard),
    Route("GET", "dashboard", "", DashboardMixin.dashboard),
    Route("GET", "assets", "file name", DashboardMixin.asset),
    Route("GET", "ping", "", ViewsMixin.ping),
    Route("GET", "status", "", ViewsMixin.status),
    Route("GET", "graph", "", ViewsMixin.graph),
    Route("GET", "metrics", "", DashboardMixin.metrics),
    Route("GET", "recipe-info", "", ViewsMixin.recipe_info),
    Route("GET", "worker-info", "", ViewsMixin.worker_info),
    Route("GET", "queues", "", ViewsMixin.queues),
    Route("POST", "start-node", "node type", ViewsMixin.start_node, True, ("count",)),
    Route("POST", "stop-node", "node type", ViewsMixin.stop_node, True, ("count",)),
    Route("POST", "scale", "node type", ViewsMixin.scale, True, ("count",)),
    Route(
        "POST",
        "stop-worker",
        "worker id",
        ViewsMixin.stop_worker,
        True,
        ("drain_timeout_s",),
    ),
    Route("POST", "start-pipeline", "pipeline name", ViewsMixin.start_pipeline, True),
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
