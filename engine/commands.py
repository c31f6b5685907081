"""The control commands: `engine status`, `engine scale` and the others.

Each command sends one request to the control API of a running master
(`engine master` or `engine run`) and prints the reply: tables on a terminal,
aligned text otherwise, or the JSON itself with `--json`. The API is found
through `--api`, `$MONOMYTH_API`, or the discovery file `.monomyth/control.json`
that the master writes into the folder it runs in. `docs/api.md` describes
the endpoints behind the commands.

The commands are built from private modules: `_commands_client` (the
`ControlClient`, and the options that find the API) and `_commands_tables`
(text tables and JSON output).
"""

from __future__ import annotations

from urllib.parse import quote

import click

from engine._commands_client import (
    API_VARIABLE,
    DEFAULT_API_URL,
    SECRET_VARIABLE,
    ControlClient,
    _client_command,
    make_client,
)
from engine._commands_tables import (
    TextTable,
    _error_summary,
    _print_json,
    _print_tables,
    _types_table,
    _workers_table,
)
from engine._pipeline_nodes import MAX_PROCESSES

__all__ = [
    "API_VARIABLE",
    "CONTROL_COMMANDS",
    "DEFAULT_API_URL",
    "SECRET_VARIABLE",
    "ControlClient",
    "TextTable",
    "make_client",
]


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
    """Show how many messages wait in each queue of the loaded pipelines.

    The depth counts messages pulled and not yet acknowledged as well. A
    message on an edge queue carries up to the target's batch_size items,
    and a message on a fail queue is one item.
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
    type=click.IntRange(1, MAX_PROCESSES),
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
    type=click.IntRange(1, MAX_PROCESSES),
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
@click.argument("count", metavar="N", type=click.IntRange(0, MAX_PROCESSES))
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
