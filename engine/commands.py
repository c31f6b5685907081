"""The control commands: `engine status`, `engine scale` and the others.

Each command sends one request to the control API of a running master
(`engine master` or `engine run`) and prints the reply: tables on a terminal,
aligned text otherwise, or the JSON itself with `--json`. The API is found
through `--api`, `$MONOMYTH_API`, or the discovery file `.monomyth/control.json`
that the master writes into the folder it runs in. `docs/api.md` describes
the endpoints behind the commands.
"""

from __future__ import annotations

import functools
import http.client
import json
import os
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import click

from engine.api import (
    DEFAULT_API_PORT,
    DISCOVERY_FILE,
    MAX_COUNT,
    TOKEN_FILE,
    is_process_alive,
)
from engine.errors import EngineError

API_VARIABLE = "MONOMYTH_API"
SECRET_VARIABLE = "MONOMYTH_SECRET"
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


# Output.


@dataclass(frozen=True, slots=True)
class TextTable:
    """A titled table of text cells, whose numeric columns are right-aligned."""

    title: str
    headers: Sequence[str]
    rows: Sequence[Sequence[object]]


def _print_json(value: dict[str, Any]) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


def _print_tables(tables: list[TextTable]) -> None:
    """Print tables with rich on a terminal, and as aligned text otherwise."""
    if sys.stdout.isatty():
        _print_rich_tables(tables)
        return
    for number, table in enumerate(tables):
        if number:
            click.echo()
        for line in _plain_table_lines(table):
            click.echo(line)


def _print_rich_tables(tables: list[TextTable]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for table in tables:
        grid = Table(title=table.title, title_justify="left")
        numeric = _numeric_columns(table)
        for index, header in enumerate(table.headers):
            # The first column contains ids, which must stay whole to be copied.
            grid.add_column(
                header,
                justify="right" if index in numeric else "left",
                no_wrap=index == 0,
            )
        for row in table.rows:
            grid.add_row(*(str(cell) for cell in row))
        console.print(grid)


def _plain_table_lines(table: TextTable) -> list[str]:
    if not table.rows:
        return [table.title, "  (none)"]
    cells = [list(table.headers)] + [[str(c) for c in row] for row in table.rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(table.headers))]
    numeric = _numeric_columns(table)
    lines = [table.title]
    for row in cells:
        padded = [
            cell.rjust(width) if index in numeric else cell.ljust(width)
            for index, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  " + "  ".join(padded).rstrip())
    return lines


def _numeric_columns(table: TextTable) -> set[int]:
    return {
        index
        for index in range(len(table.headers))
        if table.rows and all(isinstance(row[index], int | float) for row in table.rows)
    }


def _mebibytes(value: int) -> str:
    return f"{value / 2**20:.1f} MiB"


def _error_summary(text: str, limit: int = 60) -> str:
    # The last line of a traceback names the exception and its message.
    line = text.strip().splitlines()[-1] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _workers_table(workers: dict[str, dict[str, Any]]) -> TextTable:
    rows = []
    for worker_id, worker in sorted(workers.items()):
        nodes = ", ".join(
            f"{node_type} x{len(ids)}"
            for node_type, ids in sorted(worker["nodes"].items())
        )
        rows.append(
            [
                worker_id,
                worker["hostname"],
                worker["state"],
                worker["cores"],
                round(worker["cpu_percent"], 1),
                _mebibytes(worker["process_memory_bytes"]),
                f"{worker['last_seen_s_ago']:.1f} s",
                nodes or "-",
            ]
        )
    headers = ["WORKER", "HOST", "STATE", "CORES", "CPU %", "MEMORY", "LAST SEEN"]
    return TextTable("Workers", [*headers, "NODES"], rows)


def _types_table(types: dict[str, dict[str, Any]]) -> TextTable:
    rows = [
        [
            node_type,
            entry["state"],
            entry["running"],
            entry["processes"],
            entry["items_in"],
            entry["items_out"],
            entry["failures"],
            entry["restarts"],
        ]
        for node_type, entry in sorted(types.items())
    ]
    headers = ["NODE TYPE", "STATE", "RUNNING", "PROCESSES", "IN", "OUT"]
    return TextTable("Node types", [*headers, "FAILURES", "RESTARTS"], rows)


# Commands.


@click.command()
@_client_command
def status(client: ControlClient, as_json: bool) -> None:
    """Show the pipelines, workers and node types of the running master."""
    reply = client.get("/status")
    if as_json:
        _print_json(reply)
        return
    pipelines = TextTable(
        "Pipelines",
        ["PIPELINE", "STATE", "NODE TYPES"],
        [
            [name, "done" if entry["done"] else "running", len(entry["node_types"])]
            for name, entry in sorted(reply["pipelines"].items())
        ],
    )
    _print_tables(
        [pipelines, _workers_table(reply["workers"]), _types_table(reply["types"])]
    )


@click.command()
@_client_command
def queues(client: ControlClient, as_json: bool) -> None:
    """Show how many items wait in each queue of the loaded pipelines.

    The depth counts items pulled and not yet acknowledged as well.
    """
    reply = client.get("/queues")
    if as_json:
        _print_json(reply)
        return
    rows = [[name, depth] for name, depth in reply["queues"].items()]
    _print_tables([TextTable("Queues", ["QUEUE", "DEPTH"], rows)])


@click.command("recipe-info")
@_client_command
def recipe_info(client: ControlClient, as_json: bool) -> None:
    """Show per node type its state and its nodes queued, running and done."""
    reply = client.get("/recipe-info")
    if as_json:
        _print_json(reply)
        return
    rows = [
        [
            node_type,
            entry["state"],
            entry["queued"],
            entry["running"],
            entry["completed"],
            entry["stopped"],
            entry["failed"],
            _error_summary(entry["last_error"]) or "-",
        ]
        for node_type, entry in sorted(reply["types"].items())
    ]
    headers = ["NODE TYPE", "STATE", "QUEUED", "RUNNING", "COMPLETED", "STOPPED"]
    _print_tables([TextTable("Node types", [*headers, "FAILED", "LAST ERROR"], rows)])


@click.command("worker-info")
@_client_command
def worker_info(client: ControlClient, as_json: bool) -> None:
    """Show each worker: host, state, cores, CPU, memory and its nodes."""
    reply = client.get("/worker-info")
    if as_json:
        _print_json(reply)
        return
    _print_tables([_workers_table(reply["workers"])])


@click.command("start-node")
@click.argument("node_type", metavar="TYPE")
@click.option(
    "--count",
    type=click.IntRange(1, MAX_COUNT),
    default=1,
    show_default=True,
    help="Number of node processes to start.",
)
@_client_command
def start_node(
    client: ControlClient, as_json: bool, node_type: str, count: int
) -> None:
    """Start more processes of node type TYPE, such as wordcount.map.

    The master places each on the worker with the fewest nodes of that type,
    then the fewest in all. With no worker joined, the nodes wait until one
    joins.
    """
    _, reply = client.post(_path("start-node", node_type), {"count": count})
    if as_json:
        _print_json(reply)
    elif reply.get("queued"):
        click.echo(f"queued until a worker joins: {', '.join(reply['node_ids'])}")
    else:
        click.echo(f"started {', '.join(reply['node_ids'])}")


@click.command("stop-node")
@click.argument("node_type", metavar="TYPE")
@click.option(
    "--count",
    type=click.IntRange(1, MAX_COUNT),
    default=1,
    show_default=True,
    help="Number of node processes to stop, newest first.",
)
@_client_command
def stop_node(client: ControlClient, as_json: bool, node_type: str, count: int) -> None:
    """Stop processes of node type TYPE, newest first.

    Each finishes and acknowledges its current batch before it exits.
    """
    _, reply = client.post(_path("stop-node", node_type), {"count": count})
    if as_json:
        _print_json(reply)
    elif reply["node_ids"]:
        click.echo(f"stopping {', '.join(reply['node_ids'])}")
    else:
        click.echo(f"no running process of {node_type} to stop")


@click.command()
@click.argument("node_type", metavar="TYPE")
@click.argument("count", metavar="N", type=click.IntRange(0, MAX_COUNT))
@_client_command
def scale(client: ControlClient, as_json: bool, node_type: str, count: int) -> None:
    """Start or stop processes of node type TYPE until N of them run.

    Processes asked to stop earlier do not count. Stopped processes finish
    their current batch first, so the count drops once they have drained.
    """
    _, reply = client.post(_path("scale", node_type), {"count": count})
    if as_json:
        _print_json(reply)
    elif reply["started"]:
        click.echo(f"{node_type}: started {', '.join(reply['started'])}")
    elif reply["stopping"]:
        click.echo(f"{node_type}: stopping {', '.join(reply['stopping'])}")
    else:
        click.echo(f"{node_type}: already {count} processes")


@click.command("start-pipeline")
@click.argument("name")
@_client_command
def start_pipeline(client: ControlClient, as_json: bool, name: str) -> None:
    """Start every node type of loaded pipeline NAME with its declared processes.

    Each call starts that many more processes.
    """
    _, reply = client.post(_path("start-pipeline", name))
    if as_json:
        _print_json(reply)
    else:
        click.echo(f"started {len(reply['node_ids'])} nodes of pipeline {name}")


@click.command("stop-worker")
@click.argument("worker_id", metavar="ID")
@click.option(
    "--drain-timeout",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="Seconds that the worker's nodes get to finish their batch before "
    "they are killed.",
)
@_client_command
def stop_worker(
    client: ControlClient, as_json: bool, worker_id: str, drain_timeout: float
) -> None:
    """Drain and stop worker ID, such as worker-2.

    Its unfinished nodes are queued for the other workers.
    """
    body = {"drain_timeout_s": drain_timeout}
    _, reply = client.post(_path("stop-worker", worker_id), body)
    if as_json:
        _print_json(reply)
    else:
        click.echo(f"worker {reply['worker_id']} is draining and will stop")


def _path(endpoint: str, item_id: str) -> str:
    return f"/{endpoint}/{quote(item_id, safe='')}"


CONTROL_COMMANDS = (
    status,
    queues,
    recipe_info,
    worker_info,
    start_node,
    stop_node,
    scale,
    start_pipeline,
    stop_worker,
)
