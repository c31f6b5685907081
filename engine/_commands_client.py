"""The client side of the control commands: `ControlClient` and its options.

`make_client` finds the control API and its token from the options, the
environment and the discovery file, and `_client_command` adds those
options to a command.
"""

from __future__ import annotations

import functools
import http.client
import json
import os
import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click

from engine.discovery import (
    DEFAULT_API_PORT,
    DISCOVERY_FILE,
    SECRET_VARIABLE,
    TOKEN_FILE,
    is_process_alive,
)
from engine.errors import EngineError

API_VARIABLE = "MONOMYTH_API"
DEFAULT_API_URL = f"http://127.0.0.1:{DEFAULT_API_PORT}"


class ControlClient:
    """Send JSON requests to a control API and return the decoded replies.

    `token` goes with POST requests only, as `Authorization: Bearer`.
    `timeout_s` bounds connecting and each read. Every failure raises
    `EngineError` with a message for the operator.
    """

    def __init__(
        self, url: str, token: bytes | None, timeout_s: float, note: str = ""
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        # Appended to the not-reachable message, such as a stale discovery file.
        self.note = note
        # No proxy: the API is reached directly, and the token must not pass
        # through a proxy named by $http_proxy.
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def get(self, path: str) -> dict[str, Any]:
        """Send GET `path` and return the JSON reply."""
        return self.request("GET", path)[1]

    def post(self, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict]:
        """Send POST `path` with a JSON body, and return the status and reply."""
        return self.request("POST", path, body or {})

    def request(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> tuple[int, dict[str, Any]]:
        """Send one request and return the status and JSON object of the reply."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if method == "POST" and self.token:
            request.add_header("Authorization", "Bearer " + self.token.decode())
        try:
            with self.opener.open(request, timeout=self.timeout_s) as response:
                return response.status, self._decode(response.read())
        except urllib.error.HTTPError as exc:
            raise EngineError(self._describe_http_error(exc)) from exc
        except urllib.error.URLError as exc:
            raise EngineError(self._unreachable(exc.reason)) from exc
        except (OSError, http.client.HTTPException) as exc:
            raise EngineError(self._unreachable(exc)) from exc

    def _decode(self, payload: bytes) -> dict[str, Any]:
        try:
            value = json.loads(payload)
        except ValueError as exc:
            raise EngineError(
                f"control API at {self.url} sent a reply that is not JSON ({exc}); "
                "check that --api names a Monomyth master"
            ) from exc
        if not isinstance(value, dict):
            raise EngineError(
                f"control API at {self.url} sent a JSON {type(value).__name__} "
                "instead of an object; check that --api names a Monomyth master"
            )
        return value

    def _describe_http_error(self, error: urllib.error.HTTPError) -> str:
        try:
            text = self._decode(error.read()).get("error") or error.reason
        except EngineError:
            text = error.reason
        return f"{text} (HTTP {error.code})"

    def _unreachable(self, reason: object) -> str:
        if isinstance(reason, ConnectionRefusedError):
            detail = "connection refused"
        elif isinstance(reason, TimeoutError):
            detail = f"no reply within {self.timeout_s} s"
        elif isinstance(reason, socket.gaierror):
            detail = f"host name not resolved: {reason.strerror}"
        elif isinstance(reason, OSError) and reason.strerror:
            detail = reason.strerror.lower()
        else:
            detail = str(reason) or type(reason).__name__
        return (
            f"control API at {self.url} is not reachable ({detail}); start engine "
            f"master or engine run, or pass --api URL{self.note}"
        )


def _read_discovery() -> dict[str, Any] | None:
    try:
        content = json.loads(DISCOVERY_FILE.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise EngineError(
            f"cannot read the discovery file {str(DISCOVERY_FILE)!r} ({exc}); "
            "delete it, or pass --api URL"
        ) from exc
    if not isinstance(content, dict) or not isinstance(content.get("api"), str):
        raise EngineError(
            f"invalid discovery file {str(DISCOVERY_FILE)!r}: expected a JSON "
            'object with an "api" URL; delete it, or pass --api URL'
        )
    return content


def _check_url(url: str, source: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise click.BadParameter(
            f"invalid control API URL {url!r} from {source}: expected "
            "http://HOST:PORT, for example http://127.0.0.1:7601",
            param_hint="--api",
        )
    return url


def _read_token(path: Path) -> bytes:
    token = path.read_text().strip()
    if not token:
        raise click.BadParameter(
            f"token file {str(path)!r} is empty; write the cluster secret into it",
            param_hint="--token-file",
        )
    return token.encode()


def make_client(
    api_url: str | None, token_file: Path | None, timeout_s: float
) -> ControlClient:
    """Build a client from the common options, the environment and the discovery file.

    The URL is `api_url` (the --api option or $MONOMYTH_API), else the one
    in `.monomyth/control.json`, else http://127.0.0.1:7601. The token is
    read from `token_file`, else from `.monomyth/control.token` when the URL
    is the one in the discovery file, else from $MONOMYTH_SECRET. The local
    token file is never sent to another URL.
    """
    discovery = _read_discovery()
    note = ""
    if api_url:
        url = _check_url(api_url, f"--api or ${API_VARIABLE}")
    elif discovery is not None:
        url = _check_url(discovery["api"], str(DISCOVERY_FILE))
        if not is_process_alive(discovery.get("pid")):
            note = (
                f"; {DISCOVERY_FILE} names it, but process {discovery.get('pid')} "
                "that wrote the file is gone, so delete the file"
            )
    else:
        url = DEFAULT_API_URL

    if token_file is not None:
        token: bytes | None = _read_token(token_file)
    elif discovery is not None and discovery["api"] == url and TOKEN_FILE.exists():
        token = _read_token(TOKEN_FILE)
    else:
        token = os.environ.get(SECRET_VARIABLE, "").strip().encode() or None
    return ControlClient(url, token, timeout_s, note)


def _client_command(function: Callable[..., None]) -> Callable[..., None]:
    """Add the common options, and pass a `client` in their place."""

    @functools.wraps(function)
    def wrapper(
        api_url: str | None, token_file: Path | None, timeout_s: float, **kwargs: Any
    ) -> None:
        function(client=make_client(api_url, token_file, timeout_s), **kwargs)

    options = [
        click.option(
            "--api",
            "api_url",
            envvar=API_VARIABLE,
            metavar="URL",
            help=f"Base URL of the master's control API; default: ${API_VARIABLE}, "
            f"else the URL in {DISCOVERY_FILE} of the current folder, else "
            f"{DEFAULT_API_URL}.",
        ),
        click.option(
            "--token-file",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help=f"File holding the API token, the cluster secret; default: "
            f"{TOKEN_FILE} when the URL is the one in {DISCOVERY_FILE}, else "
            f"${SECRET_VARIABLE}. Only POST requests send it.",
        ),
        click.option(
            "--timeout",
            "timeout_s",
            type=click.FloatRange(min=0.1),
            default=10.0,
            show_default=True,
            help="Seconds to wait for the control API to connect and to reply.",
        ),
        click.option(
            "--json",
            "as_json",
            is_flag=True,
            help="Print the API's JSON reply instead of text.",
        ),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper
