"""The dashboard and the metrics of `ControlAPI`.

`GET /` and `GET /assets/<file-name>` serve the dashboard's files from the
package folder `engine/dashboard`, with headers that keep a browser from
caching or reinterpreting them. `GET /metrics` renders the Prometheus text of
`engine.metrics`, with the queue depths read from the data stream.
"""

from __future__ import annotations

import importlib.resources
import logging
from http import HTTPStatus
from typing import Any

from engine import metrics
from engine._api_views import Reply, RequestError
from engine.errors import StreamError
from engine.streams import redact_url

# The public module's logger, so that one name covers every part of the API.
logger = logging.getLogger("engine.api")

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


class DashboardMixin:
    """The dashboard and `/metrics` endpoints of `ControlAPI`.

    The handlers use the state that `ControlAPI.__init__` sets, and the
    stream helpers of `ViewsMixin`.
    """

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


def _content_headers(content_type: str) -> dict[str, str]:
    # The dashboard's files change with the installed package, and a browser
    # must not guess another type for them.
    headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
    if content_type.startswith("text/html"):
        headers["Content-Security-Policy"] = _DASHBOARD_POLICY
    return headers
