"""`engine master`: the master as a long-running process of a cluster."""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from engine.api import ControlAPI
from engine.discovery import write_stream_record
from engine.errors import EngineError
from engine.loader import load_pipeline
from engine.master import Master, TypeState
from engine.run import lock_stream, run_hook
from engine.streams import open_stream, redact_url

if TYPE_CHECKING:
    from engine.pipeline import Pipeline

logger = logging.getLogger(__name__)

DEFAULT_SECRET_FILE = Path(".monomyth/secret")


def is_loopback(host: str) -> bool:
    """Return True when `host` names a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ensure_secret(host: str, secret: bytes | None, secret_file: Path | None) -> bytes:
    """Return the cluster secret, creating one for a loopback master.

    Raises `EngineError` when a master bound beyond loopback has none.
    """
    if secret is not None:
        return secret
    if not is_loopback(host):
        raise EngineError(
            f"missing cluster secret for a master bound to {host}: pass "
            "--secret-file PATH or set $MONOMYTH_SECRET, and give the workers the "
            "same secret"
        )
    path = secret_file or DEFAULT_SECRET_FILE
    if path.exists() and path.read_text().strip():
        # A restarted master keeps the secret that its workers already hold.
        logger.info("cluster secret read from %s", path)
        return path.read_text().strip().encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    text = secrets.token_hex(32)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text + "\n")
    logger.info(
        "new cluster secret written to %s; start workers with --secret-file %s",
        path,
        path,
    )
    return text.encode()


def absolute_stream_url(url: str) -> str:
    """Return `url` with a relative SQLite path made absolute.

    Workers resolve the URL from the master's WELCOME in their own working
    folder, so a relative path would give each of them a file of its own.
    """
    if not url.startswith("sqlite:///") or url.startswith("sqlite:////"):
        return url
    path, _, query = url[len("sqlite:///") :].partition("?")
    absolute = f"sqlite:///{Path(path).resolve()}"
    return f"{absolute}?{query}" if query else absolute


def serve_master(
    pipeline_files: tuple[Path, ...],
    host: str,
    port: int,
    secret: bytes | None,
    secret_file: Path | None,
    stream_url: str,
    overrides: dict[str, str],
    exit_when_done: bool,
    worker_timeout_s: float,
    min_workers: int = 1,
    api_address: tuple[str, int] | None = None,
) -> int:
    """Run a master until SIGINT or SIGTERM, or until its pipelines finish.

    With `api_address`, the control API listens there too, and its
    discovery files are written to `.monomyth/` in the current folder.
    Returns the exit code. It is 4 when a node type failed, and 3 when the
    master exits because its pipelines finished but left items in a fail
    queue. Otherwise it is 0.
    """
    pipelines = []
    for path in pipeline_files:
        pipeline = load_pipeline(path)
        pipeline.check()
        pipelines.append((pipeline, pipeline.resolve_params(_own(pipeline, overrides))))
    stream_url = absolute_stream_url(stream_url)
    for pipeline, _ in pipelines:
        write_stream_record(pipeline.name, stream_url)
    # Held until this process ends: no engine run may share the stream file.
    locks = [lock_stream(stream_url, pipeline.name) for pipeline, _ in pipelines]
    key = ensure_secret(host, secret, secret_file)
    if api_address is not None and secret is None and not is_loopback(api_address[0]):
        raise EngineError(
            f"missing cluster secret for a control API bound to {api_address[0]}: "
            "pass --secret-file PATH or set $MONOMYTH_SECRET, and send it as the "
            "bearer token of POST requests; or bind the API to 127.0.0.1"
        )
    master = Master(
        key, stream_url, host=host, port=port, worker_timeout_s=worker_timeout_s
    )
    master.start()
    control: ControlAPI | None = None
    if api_address is not None:
        control = ControlAPI(master, *api_address, key, stream_url)
        try:
            control.start()
        except EngineError:
            master.close()
            raise
        control.write_discovery([pipeline.name for pipeline, _ in pipelines])
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        logger.info("signal %d received; stopping workers", signum)
        stop.set()

    previous = {
        number: signal.signal(number, on_signal)
        for number in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        for pipeline, params in pipelines:
            master.add_pipeline(pipeline, params)
        if min_workers and pipelines:
            logger.info("waiting for %d workers to join", min_workers)
            if not master.wait_workers(min_workers, stop):
                # Stopped while it waited: the workers that joined stop too.
                master.shutdown_workers(drain_timeout_s=60.0)
                return 0
        for pipeline, params in pipelines:
            # Workers that kept running while the master was away report
            # their nodes on joining: carry on with those instead of anew.
            if master.has_nodes(pipeline.name):
                master.resume_pipeline(pipeline.name)
                continue
            _reject_leftover_items(stream_url, pipeline)
            for hook in pipeline.start_hooks:
                run_hook(hook, params, "on_start", pipeline.name)
            master.start_pipeline(pipeline.name)
        names = [pipeline.name for pipeline, _ in pipelines]
        is_done = False
        while not stop.wait(0.5):
            if exit_when_done and all(master.is_pipeline_done(n) for n in names):
                logger.info("every pipeline finished; stopping workers")
                is_done = True
                break
        master.shutdown_workers(drain_timeout_s=60.0)
        stats = master.type_stats()
        failed = [
            node_type
            for node_type, entry in stats.items()
            if entry["state"] == TypeState.FAILED.value
        ]
        for pipeline, params in pipelines:
            states = {stats[t]["state"] for t in master.pipelines[pipeline.name]}
            if states == {TypeState.COMPLETED.value}:
                for hook in pipeline.completion_hooks:
                    run_hook(hook, params, "on_complete", pipeline.name)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if control is not None:
            control.close()
        master.close()
        for lock in locks:
            if lock is not None:
                lock.close()
    if failed:
        return 4
    if is_done and _count_failed_items(stream_url, [p for p, _ in pipelines]):
        return 3
    return 0


def _reject_leftover_items(stream_url: str, pipeline: Pipeline) -> None:
    """Raise when the edge queues of a pipeline that starts anew hold items.

    Such items come from an earlier run whose master and workers all stopped
    before it finished. A new run would process them beside the items that
    its sources publish again, so they would count twice.
    """
    stream = open_stream(stream_url, owner=f"engine-master-{os.getpid()}")
    try:
        stream.declare(pipeline.data_queues())
        leftover = sum(stream.depths(pipeline.data_queues()).values())
    finally:
        stream.close()
    if leftover:
        raise EngineError(
            f"stream {redact_url(stream_url)} contains {leftover} messages of "
            f"pipeline {pipeline.name!r} left by an earlier run that did not "
            "finish, and no worker reports nodes of that run to continue; "
            "finish that run on this host with engine run PIPELINE_FILE --stream "
            "URL --resume, or start a new run there with --purge, which deletes "
            "them first"
        )


def _count_failed_items(stream_url: str, pipelines: list) -> int:
    """Log and return the items that the pipelines' fail queues contain."""
    queues = [p.fail_queue(node) for p in pipelines for node in p.nodes]
    stream = open_stream(stream_url, owner=f"engine-master-{os.getpid()}")
    try:
        depths = stream.depths(queues)
    finally:
        stream.close()
    for queue, depth in depths.items():
        if depth:
            logger.warning(
                "%d failed items kept in queue %s; see engine fail-queue list",
                depth,
                queue,
            )
    return sum(depths.values())


def _own(pipeline: object, overrides: dict[str, str]) -> dict[str, str]:
    # With several pipelines, each takes the parameters it declares.
    declared = getattr(pipeline, "params", {})
    return {key: value for key, value in overrides.items() if key in declared}
