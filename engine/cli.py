"""Run Monomyth pipelines: on this machine with `engine run`, or on a cluster
with `engine master` and `engine worker`, which the operator commands
(`engine status`, `queues`, `scale`, `fail-queue` and others) control.

Exit codes:

\b
  0    the run completed and no item failed
  1    an error stopped the command (the message names it)
  2    invalid command line or run parameter
  3    the run completed, but some items ended in a fail queue
  4    a node failed: it could not start, or crashed past its restart budget
  130  interrupted by Ctrl-C or SIGTERM
"""

from __future__ import annotations

import enum
import logging
import os
import sys
from pathlib import Path

import click

from engine.discovery import SECRET_VARIABLE
from engine.errors import EngineError, ParameterError
from engine.logs import LOG_LEVELS, configure_logging

logger = logging.getLogger(__name__)


class ExitCode(enum.IntEnum):
    """Exit codes of every engine command."""

    OK = 0
    """The command or run completed and no item failed."""
    ERROR = 1
    """An error stopped the command; the message on stderr names it."""
    USAGE = 2
    """An invalid argument, option or run parameter."""
    ITEMS_FAILED = 3
    """The run completed, but some items ended in a fail queue."""
    NODE_FAILED = 4
    """A node could not start, or crashed more often than its restart budget."""
    INTERRUPTED = 130
    """Stopped by Ctrl-C (SIGINT) or SIGTERM."""


def _parse_params(values: tuple[str, ...]) -> dict[str, str]:
    params: dict[str, str] = {}
    for value in values:
        key, separator, text = value.partition("=")
        if not separator or not key:
            raise click.BadParameter(
                f"invalid parameter {value!r}: expected KEY=VALUE, for example "
                "-p input=book.txt",
                param_hint="-p/--param",
            )
        if key in params:
            raise click.BadParameter(
                f"parameter {key!r} given twice ({params[key]!r} and {text!r}); "
                "give each parameter once",
                param_hint="-p/--param",
            )
        params[key] = text
    return params


def _parse_address(value: str, option: str) -> tuple[str, int]:
    host, separator, port = value.rpartition(":")
    if not separator or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(
            f"invalid address {value!r}: expected HOST:PORT, for example "
            "127.0.0.1:7600",
            param_hint=option,
        )
    return host, int(port)


def _read_master_address() -> tuple[str, int]:
    """Read the HOST:PORT line of `engine worker --master -` from standard input."""
    line = sys.stdin.readline().strip()
    if not line:
        raise EngineError(
            "standard input ended before the master's address arrived; with "
            "--master -, write a line HOST:PORT to the worker's standard input"
        )
    return _parse_address(line, "--master")


def _parse_api_address(value: str) -> tuple[str, int] | None:
    if value.strip().lower() == "off":
        return None
    host, separator, port = value.rpartition(":")
    if not separator or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise click.BadParameter(
            f"invalid address {value!r}: expected HOST:PORT, for example "
            "127.0.0.1:7601 (port 0 picks a free port), or off",
            param_hint="--api",
        )
    return host.strip("[]"), int(port)


def _read_secret(secret_file: Path | None) -> bytes | None:
    if secret_file is not None:
        secret = secret_file.read_text().strip()
        if not secret:
            raise click.BadParameter(
                f"secret file {str(secret_file)!r} is empty; write the cluster "
                "secret into it",
                param_hint="--secret-file",
            )
        return secret.encode()
    secret = os.environ.get(SECRET_VARIABLE, "").strip()
    return secret.encode() if secret else None


class _EngineGroup(click.Group):
    """The `engine` group, which imports the operator commands on first use.

    `engine run` and `engine worker` start every run, so they skip importing
    the HTTP client and the fail-queue code that only the operator commands
    (`engine status`, `engine fail-queue` and the others) need.
    """

    has_operator_commands = False

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None and not self.has_operator_commands:
            self._add_operator_commands()
            command = super().get_command(ctx, cmd_name)
        return command

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._add_operator_commands()
        return super().list_commands(ctx)

    def _add_operator_commands(self) -> None:
        if self.has_operator_commands:
            return
        from engine.commands import CONTROL_COMMANDS
        from engine.failqueue import fail_queue

        self.add_command(fail_queue)
        for command in CONTROL_COMMANDS:
            self.add_command(command)
        self.has_operator_commands = True


@click.group(cls=_EngineGroup, help=__doc__)
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    default="info",
    show_default=True,
    help="Lowest level of log records to show; debug also shows tracebacks.",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Log records as text lines or as one JSON object per line.",
)
@click.version_option(package_name="monomyth")
@click.pass_context
def cli(context: click.Context, log_level: str, log_format: str) -> None:
    """Run Monomyth pipelines on one machine or a cluster."""
    configure_logging(log_level, log_format)  # type: ignore[arg-type]
    context.obj = {"log_level": log_level.lower(), "log_format": log_format}


@cli.command()
@click.argument(
    "pipeline_file", type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option(
    "-p",
    "--param",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="Set a run parameter of the pipeline; repeat for several.",
)
@click.option(
    "--stream",
    "stream_url",
    metavar="URL",
    help="Data stream URL: sqlite:///relative/path.db, sqlite:////absolute/path.db "
    "(four slashes) or amqp://user:password@host:5672/vhost; default "
    "sqlite:///.monomyth/<pipeline>.db in the current folder.",
)
@click.option(
    "--pipeline",
    "pipeline_name",
    metavar="NAME",
    help="Which pipeline to run when the file defines several.",
)
@click.option(
    "--purge",
    is_flag=True,
    help="Delete items that an earlier, unfinished run left in the stream.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Process the items that an earlier, unfinished run left in the "
    "stream (or that fail-queue replay put back), and run the sources that "
    "did not finish, which skip the items they published.",
)
@click.option(
    "--drain-timeout",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="Seconds that nodes get to finish their batch on Ctrl-C or at the "
    "end, before they are killed.",
)
@click.option(
    "--hold",
    is_flag=True,
    help="After the run ends and the summary is printed, keep the control API "
    "and its dashboard serving the final state until Ctrl-C.",
)
@click.pass_context
def run(
    context: click.Context,
    pipeline_file: Path,
    params: tuple[str, ...],
    stream_url: str | None,
    pipeline_name: str | None,
    purge: bool,
    resume: bool,
    drain_timeout: float,
    hold: bool,
) -> None:
    """Run PIPELINE_FILE on this machine: a master, a worker and its nodes.

    Shows live progress per node and ends with a summary. Needs no service:
    the data stream is an SQLite file.
    """
    from engine.local_worker import LocalWorker

    overrides = _parse_params(params)
    # Started before the imports below: the worker starts up meanwhile.
    local_worker = LocalWorker(
        pipeline_file.resolve().parent,
        context.obj["log_level"],
        context.obj["log_format"],
        drain_timeout,
    )
    try:
        from engine.run import LocalRun

        try:
            local_run = LocalRun(
                pipeline_file,
                overrides,
                local_worker,
                stream_url=stream_url,
                pipeline_name=pipeline_name,
                purge=purge,
                resume=resume,
                drain_timeout_s=drain_timeout,
                hold=hold,
            )
        except ParameterError as exc:
            raise click.UsageError(str(exc)) from exc
        outcome = local_run.execute()
    finally:
        if not local_worker.has_master:
            local_worker.kill()
    if outcome.status == "interrupted":
        context.exit(ExitCode.INTERRUPTED)
    if outcome.has_node_failures:
        context.exit(ExitCode.NODE_FAILED)
    if outcome.failed_items:
        context.exit(ExitCode.ITEMS_FAILED)


@cli.command()
@click.option(
    "--master",
    "master_address",
    required=True,
    metavar="HOST:PORT",
    help="Address of the master's MMOP port; - reads it from standard input, "
    "as the worker of `engine run` does.",
)
@click.option(
    "--secret-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help=f"File holding the cluster secret; default: ${SECRET_VARIABLE}.",
)
@click.option(
    "--stream",
    "stream_url",
    metavar="URL",
    help="Data stream URL for this worker's nodes; default: the master's.",
)
@click.option(
    "--exit-with-master",
    is_flag=True,
    help="Drain and exit when the master connection closes, instead of reconnecting.",
)
@click.option(
    "--connect-timeout",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    help="Seconds to keep trying the first connection to the master.",
)
@click.option(
    "--drain-timeout",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="Seconds that nodes get to finish their batch on shutdown, before "
    "they are killed.",
)
@click.pass_context
def worker(
    context: click.Context,
    master_address: str,
    secret_file: Path | None,
    stream_url: str | None,
    exit_with_master: bool,
    connect_timeout: float,
    drain_timeout: float,
) -> None:
    """Run the nodes that a master starts on this host, one process each."""
    from engine.forkserver import start_forkserver

    if master_address != "-":
        host, port = _parse_address(master_address, "--master")
    secret = _read_secret(secret_file)
    if secret is None:
        raise click.UsageError(
            f"missing cluster secret: pass --secret-file PATH or set "
            f"${SECRET_VARIABLE}, the same as the master's"
        )
    # The forkserver imports the node runtime while this process imports the
    # worker and registers with the master.
    start_forkserver(stream_url)
    from engine.worker import Worker

    if master_address == "-":
        host, port = _read_master_address()
    supervisor = Worker(
        host,
        port,
        secret,
        stream_url=stream_url,
        exit_with_master=exit_with_master,
        connect_timeout_s=connect_timeout,
        drain_timeout_s=drain_timeout,
        log_level=context.obj["log_level"],
        log_format=context.obj["log_format"],
    )
    supervisor.connect()
    context.exit(supervisor.run())


@cli.command()
@click.argument(
    "pipeline_files",
    nargs=-1,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
)
@click.option(
    "--bind",
    default="127.0.0.1:7600",
    show_default=True,
    metavar="HOST:PORT",
    help="Address that the MMOP port listens on.",
)
@click.option(
    "--secret-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help=f"File holding the cluster secret; default: ${SECRET_VARIABLE}, or on "
    "loopback a new secret written to .monomyth/secret.",
)
@click.option(
    "--stream",
    "stream_url",
    default="sqlite:///.monomyth/cluster.db",
    show_default=True,
    metavar="URL",
    help="Data stream URL that the workers' nodes use: amqp://user:password@"
    "host:5672/vhost, or for workers on this host sqlite:///path.db, where a "
    "relative path starts at the master's folder.",
)
@click.option(
    "-p",
    "--param",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="Set a run parameter of the pipelines; repeat for several.",
)
@click.option(
    "--exit-when-done",
    is_flag=True,
    help="Stop the workers and exit once every pipeline has finished; the exit "
    "code is then 3 when a fail queue contains items, as with engine run.",
)
@click.option(
    "--workers",
    "min_workers",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="Workers to wait for before starting the pipelines' nodes, so that "
    "the first to join does not take them all.",
)
@click.option(
    "--worker-timeout",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds of silence after which a worker is declared lost.",
)
@click.option(
    "--api",
    "api_address",
    default="127.0.0.1:7601",
    show_default=True,
    metavar="HOST:PORT|off",
    help="Address that the HTTP control API listens on (port 0 picks a free "
    "port), or off for no API. Beyond loopback it needs the cluster secret.",
)
def master(
    pipeline_files: tuple[Path, ...],
    bind: str,
    secret_file: Path | None,
    stream_url: str,
    params: tuple[str, ...],
    exit_when_done: bool,
    min_workers: int,
    worker_timeout: float,
    api_address: str,
) -> None:
    """Run the master: load PIPELINE_FILES and start their nodes on workers."""
    from engine.cluster import serve_master

    host, port = _parse_address(bind, "--bind")
    api = _parse_api_address(api_address)
    secret = _read_secret(secret_file) if secret_file and secret_file.exists() else None
    secret = secret or _read_secret(None)
    try:
        code = serve_master(
            pipeline_files,
            host,
            port,
            secret,
            secret_file,
            stream_url,
            _parse_params(params),
            exit_when_done,
            worker_timeout,
            min_workers,
            api,
        )
    except ParameterError as exc:
        raise click.UsageError(str(exc)) from exc
    click.get_current_context().exit(code)


def main(args: list[str] | None = None) -> None:
    """Run the `engine` command; the console-script entry point."""
    _run(cli, args, "engine")


def worker_main(args: list[str] | None = None) -> None:
    """Run `engine-worker`, the same as `engine worker`."""
    _run(cli, ["worker", *(sys.argv[1:] if args is None else args)], "engine-worker")


def master_main(args: list[str] | None = None) -> None:
    """Run `engine-master`, the same as `engine master`."""
    _run(cli, ["master", *(sys.argv[1:] if args is None else args)], "engine-master")


def _run(group: click.Group, args: list[str] | None, name: str) -> None:
    try:
        # Without standalone mode, click returns the code of `context.exit`.
        code = group.main(args=args, prog_name=name, standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(ExitCode.INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(ExitCode.USAGE if exc.exit_code == 2 else exc.exit_code)
    except EngineError as exc:
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            logger.exception("command failed")
        click.echo(f"Error: {exc}", err=True)
        sys.exit(ExitCode.ERROR)
    sys.exit(code if isinstance(code, int) else ExitCode.OK)


if __name__ == "__main__":
    main()
