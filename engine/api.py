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

`ControlAPI` is assembled from mixins in private modules, one concept each:
`_api_views` (the JSON endpoints), `_api_dashboard` (the dashboard's files
and `/metrics`) and `_api_server` (the routes, the HTTP server and the
request handler). `engine.discovery` reads and writes the discovery files.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from engine._api_dashboard import DASHBOARD_FILES, DashboardMixin
from engine._api_server import (
    CONNECTION_TIMEOUT_S,
    MAX_BODY_BYTES,
    ROUTES,
    Route,
    _Handler,
    _Server,
    _Server6,
)
from engine._api_views import MAX_COUNT, Reply, RequestError, ViewsMixin
from engine.discovery import (
    CONTROL_FOLDER,
    DEFAULT_API_PORT,
    DISCOVERY_FILE,
    TOKEN_FILE,
    DiscoveryFile,
    is_process_alive,
)
from engine.errors import EngineError

if TYPE_CHECKING:
    from engine.master import Master
    from engine.streams import Stream

__all__ = [
    "CONNECTION_TIMEOUT_S",
    "CONTROL_FOLDER",
    "DASHBOARD_FILES",
    "DEFAULT_API_PORT",
    "DISCOVERY_FILE",
    "MAX_BODY_BYTES",
    "MAX_COUNT",
    "ROUTES",
    "TOKEN_FILE",
    "ControlAPI",
    "DiscoveryFile",
    "Reply",
    "RequestError",
    "Route",
    "is_process_alive",
]

logger = logging.getLogger(__name__)


class ControlAPI(ViewsMixin, DashboardMixin):
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
