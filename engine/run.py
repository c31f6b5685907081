"""`engine run`: a whole pipeline on this machine, with no service to install.

    engine run PIPELINE.py              LocalRun: master (threads) and display
    └── engine worker --master -              the worker: engine/local_worker.py
        └── forkserver                        see engine/forkserver.py
            ├── node process worker-1/<pipeline>.<node>#1
            └── ...

The run uses the same master, worker and MMOP as a cluster, over loopback
with a secret generated for the run, and the embedded SQLite stream. It ends
when every node type has completed or failed. Ctrl-C drains the worker: each
node finishes and acks its batch, runs `teardown` and exits, so nothing pulled
is lost. A second Ctrl-C kills the worker and its nodes; what they had pulled
stays in the stream file and is delivered again when its lease expires.

The run's control API listens on a free loopback port, and the discovery file
`.monomyth/control.json` lets `engine status` and the other control commands
find it when they run in the same folder. With `hold`, the master and the API
keep serving after the summary, with every node stopped, until Ctrl-C: the
dashboard and `/metrics` then show the final counters.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.discovery import write_stream_record
from engine.errors import EngineError, ParameterError
from engine.loader import load_pipeline
from engine.master import Master, TypeState
from engine.progress import ProgressDisplay, format_summary
from engine.streams import open_stream, redact_url, sqlite_file

if TYPE_CHECKING:
    from engine.api import ControlAPI
    from engine.local_worker import LocalWorker

logger = logging.getLogger(__name__)

REFRESH_INTERVAL_S = 0.5

# How often a run starts a new worker after its worker died, before it gives
# up and leaves the rest to --resume.
MAX_WORKER_RESTARTS = 3

# How long past its drain timeout the worker may take to exit before the run
# kills it: the worker needs a moment to kill its own nodes and report.
WORKER_EXIT_GRACE_S = 10.0
# A second interrupt this soon after the first counts as the same one. A
# signal sent to a process and then to its process group, as `timeout` sends
# it, arrives twice, and would otherwise kill the nodes instead of draining.
REPEAT_INTERRUPT_MIN_S = 0.5


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """The outcome of a run."""

    # One of "completed", "failed", "interrupted".
    status: str
    has_node_failures: bool
    failed_items: int
    elapsed_s: float


def default_stream_url(pipeline_name: str) -> str:
    """Return the embedded stream URL of a pipeline: `.monomyth/<name>.db` here."""
    return f"sqlite:///.monomyth/{pipeline_name}.db"


class LocalRun:
    """Run one pipeline file with a master and one worker on this machine.

    `local_worker` is the worker process, started by the caller before it
    imported this module. The run connects it to its master, and the caller
    kills it if the run fails before that (`LocalWorker.has_master`).
    """

    def __init__(
        self,
        path: str | Path,
        overrides: dict[str, str],
        local_worker: LocalWorker,
        stream_url: str | None = None,
        pipeline_name: str | None = None,
        purge: bool = False,
        resume: bool = False,
        drain_timeout_s: float = 60.0,
        display: ProgressDisplay | None = None,
        hold: bool = False,
    ) -> None:
        self.local_worker = local_worker
        self.worker_restarts = 0
        self.pipeline = load_pipeline(path, pipeline_name)
        self.pipeline.check()
        self.path = Path(path).resolve()
        self.stream_url = stream_url or default_stream_url(self.pipeline.name)
        if purge and resume:
            raise ParameterError(
                "--purge and --resume exclude each other: --purge deletes the "
                "items left in the stream, --resume processes them"
            )
        if resume:
            overrides = self._resumed_overrides(overrides)
        self.overrides = dict(overrides)
        self.params = self.pipeline.resolve_params(overrides)
        self.purge = purge
        self.resume = resume
        # The source nodes to run: all of them, unless --resume finds fewer
        # unfinished.
        self.sources_to_run: list[str] | None = [
            name for name, spec in self.pipeline.nodes.items() if spec.kind == "source"
        ]
        self.lock_file: Any = None
        self.drain_timeout_s = drain_timeout_s
        self.display = display or ProgressDisplay(f"pipeline {self.pipeline.name}")
        self.hold = hold
        self.interrupts = 0
        self.first_interrupt_at = 0.0
        self.worker: subprocess.Popen | None = None
        self.master: Master | None = None

    def execute(self) -> RunOutcome:
        """Run the pipeline to its end and print the summary."""
        self._lock_stream()
        write_stream_record(self.pipeline.name, self.stream_url)
        stream = open_stream(self.stream_url, owner="engine-run")
        try:
            self._prepare_queues(stream)
            if not self.resume:
                for hook in self.pipeline.start_hooks:
                    run_hook(hook, self.params, "on_start", self.pipeline.name)
            started = time.monotonic()
            secret = self.local_worker.secret
            self.master = Master(secret.encode(), self.stream_url)
            self.master.start()
            control: ControlAPI | None = None
            # SIGTERM, the stop signal of service managers and containers,
            # drains the run as Ctrl-C does.
            previous = {
                number: signal.signal(number, self._on_interrupt)
                for number in (signal.SIGINT, signal.SIGTERM)
            }
            try:
                try:
                    self.master.add_pipeline(self.pipeline, self.params)
                    # The worker connects while this process imports and
                    # starts the control API.
                    self.local_worker.send_master_address(
                        self.master.port, self.display.print_log
                    )
                    self.worker = self.local_worker.process
                    control = self._start_control_api(secret)
                    self.master.start_pipeline(
                        self.pipeline.name,
                        sources=self.sources_to_run,
                        resume_sources=self.resume,
                    )
                    with self.display:
                        status = self._watch(stream)
                        self._stop_worker()
                        self._show(stream)
                finally:
                    # A held run counts Ctrl-C until the hold ends, so that
                    # one pressed while the nodes drain ends the run.
                    if not self.hold:
                        _restore_handlers(previous)
                if not self.hold:
                    self._close_services(control)
                outcome = self._finish(stream, status, time.monotonic() - started)
                if self.hold and not self.interrupts:
                    assert control is not None
                    self._hold_until_interrupted(control.url)
            finally:
                _restore_handlers(previous)
                self._close_services(control)
            return outcome
        finally:
            stream.close()

    def _start_control_api(self, secret: str) -> ControlAPI:
        from engine.api import ControlAPI

        control = ControlAPI(
            self.master, "127.0.0.1", 0, secret.encode(), self.stream_url
        )
        control.start()
        control.write_discovery([self.pipeline.name])
        return control

    def _close_services(self, control: ControlAPI | None) -> None:
        """Stop the control API and the master; calling it again does nothing."""
        if control is not None:
            control.close()
        self.master.close()

    def _lock_stream(self) -> None:
        self.lock_file = lock_stream(self.stream_url, self.pipeline.name)

    def _record_file(self, kind: str) -> Path | None:
        """Return the file beside the stream file that records `kind` of runs."""
        path = sqlite_file(self.stream_url)
        if path is None:
            return None
        return path.with_name(f"{path.name}.{self.pipeline.name}.{kind}")

    def _record_overrides(self) -> None:
        """Write this run's -p values, which a later --resume runs with."""
        path = self._record_file("params")
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.overrides))

    def _resumed_overrides(self, overrides: dict[str, str]) -> dict[str, str]:
        """Return the -p values of the run that --resume continues.

        Raises `ParameterError` when `overrides` gives another value for a
        parameter, because the sources skip items by their position in what
        the earlier values made them yield.
        """
        path = self._record_file("params")
        if path is None or not path.exists():
            return overrides
        try:
            recorded = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            logger.warning("ignoring the unreadable parameter record %s: %s", path, exc)
            return overrides
        changed = sorted(
            key for key in overrides if recorded.get(key, None) != overrides[key]
        )
        if changed:
            earlier = " ".join(
                f"-p {key}={recorded[key]}" if key in recorded else f"no -p {key}"
                for key in changed
            )
            raise ParameterError(
                f"--resume continues the earlier run with its parameters ({earlier}), "
                "but this command gives "
                + " ".join(f"-p {key}={overrides[key]}" for key in changed)
                + "; drop those -p options, or run without --resume"
            )
        if recorded:
            logger.info(
                "resuming with the parameters of the earlier run: %s",
                " ".join(f"-p {key}={value}" for key, value in recorded.items()),
            )
        return {**recorded, **overrides}

    def _sources_file(self) -> Path | None:
        """Return the file that names the sources an unfinished run cut off."""
        return self._record_file("unfinished")

    def _record_unfinished_sources(self, names: list[str]) -> None:
        """Write the sources that this run has not finished, for a later --resume.

        A run writes every source at its start, so that a run killed outright
        leaves them all recorded, and the ones left unfinished at its end.
        """
        path = self._sources_file()
        if path is None:
            return
        if names:
            path.write_text(json.dumps(names))
        else:
            path.unlink(missing_ok=True)

    def _read_unfinished_sources(self) -> list[str]:
        path = self._sources_file()
        if path is None or not path.exists():
            return []
        try:
            names = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            logger.warning(
                "ignoring the unreadable record of unfinished sources %s: %s",
                path,
                exc,
            )
            return []
        return [name for name in names if name in self.pipeline.nodes]

    def _prepare_queues(self, stream: Any) -> None:
        queues = self.pipeline.data_queues()
        stream.declare(self.pipeline.all_queues())
        if self.resume and hasattr(stream, "recover_queues"):
            # This run holds the run lock, so the processes that leased these items
            # are gone.
            stream.recover_queues(queues)
        leftover = sum(stream.depths(queues).values())
        if self.resume:
            self._prepare_resume(leftover)
            return
        if leftover and not self.purge:
            raise EngineError(
                f"stream {redact_url(self.stream_url)} contains {leftover} messages "
                f"of pipeline {self.pipeline.name!r} left by an earlier run that did "
                "not finish (or replayed from a fail queue); pass --resume to "
                "process them and finish the earlier run's sources, or --purge to "
                "delete them before this run"
            )
        if leftover:
            logger.warning(
                "deleting %d messages left by an earlier run of pipeline %s",
                leftover,
                self.pipeline.name,
            )
            stream.delete_queues(queues)
            stream.declare(queues)
        self._record_unfinished_sources(self.sources_to_run or [])
        self._record_overrides()

    def _prepare_resume(self, leftover: int) -> None:
        """Choose the sources that --resume runs again, or raise if nothing is left."""
        unfinished = self._read_unfinished_sources()
        if not leftover and not unfinished:
            raise EngineError(
                f"nothing to resume: stream {redact_url(self.stream_url)} contains no "
                f"items of pipeline {self.pipeline.name!r} and its sources finished; "
                "run it without --resume"
            )
        self.sources_to_run = unfinished
        if unfinished:
            names = ", ".join(repr(name) for name in unfinished)
            message = (
                f"the sources {names} of the earlier run did not finish; they run "
                "again and skip the items they published, so their generators "
                "must yield the same items in the same order"
            )
            logger.info(message)
            self.display.print(message)
        logger.info(
            "resuming pipeline %s with the %d messages left in the stream",
            self.pipeline.name,
            leftover,
        )

    def _on_interrupt(self, signum: int, frame: object) -> None:
        now = time.monotonic()
        if self.interrupts == 0:
            self.first_interrupt_at = now
        elif (
            self.interrupts == 1
            and now - self.first_interrupt_at < REPEAT_INTERRUPT_MIN_S
        ):
            return
        self.interrupts += 1

    def _watch(self, stream: Any) -> str:
        """Show progress until the pipeline ends, the worker dies, or Ctrl-C."""
        name = self.pipeline.name
        handled_interrupts = 0
        kill_deadline = math.inf
        while True:
            self._show(stream)
            if self.interrupts > handled_interrupts:
                handled_interrupts = self.interrupts
                if handled_interrupts == 1:
                    self.display.print(
                        "interrupted: draining nodes (press Ctrl-C again to kill them)"
                    )
                    self.master.shutdown_workers(self.drain_timeout_s)
                    # The worker escalates by itself after the drain timeout;
                    # this bounds the wait if the worker is too busy to do so.
                    kill_deadline = (
                        time.monotonic() + self.drain_timeout_s + WORKER_EXIT_GRACE_S
                    )
                else:
                    self.display.print("interrupted again: killing the worker")
                    self._kill_worker()
            if time.monotonic() > kill_deadline and self.worker.poll() is None:
                message = (
                    "the worker did not stop within the drain timeout of "
                    f"{self.drain_timeout_s:g} s; killing it"
                )
                logger.warning(message)
                self.display.print(message)
                self._kill_worker()
                kill_deadline = math.inf
            if self.worker.poll() is not None:
                if handled_interrupts:
                    return "interrupted"
                if self.master.is_pipeline_done(name):
                    return "done"
                if self.worker_restarts >= MAX_WORKER_RESTARTS:
                    raise EngineError(
                        f"the worker exited with code {self.worker.returncode} "
                        f"before pipeline {name!r} finished, after "
                        f"{self.worker_restarts} restarts; see its log lines "
                        "above, then run the same command with --resume to "
                        "process the items left in the stream"
                    )
                self._replace_worker(stream)
            if not handled_interrupts and self.master.wait_pipeline(
                name, REFRESH_INTERVAL_S
            ):
                return "done"
            if handled_interrupts:
                time.sleep(REFRESH_INTERVAL_S)

    def _replace_worker(self, stream: Any) -> None:
        """Start a new worker for the nodes of the one that died."""
        self.worker_restarts += 1
        message = (
            f"the worker exited with code {self.worker.returncode}; starting "
            f"a new worker (restart {self.worker_restarts} of "
            f"{MAX_WORKER_RESTARTS})"
        )
        logger.warning(message)
        self.display.print(message)

        # Its nodes notice the death only after a moment: kill them all now,
        # so that what they pulled can be made visible at once.
        self._kill_worker()
        self.worker.wait()
        recover = getattr(stream, "recover_queues", None)
        if recover is not None:
            released = recover(self.pipeline.data_queues())
            logger.info(
                "%d messages of the dead worker's nodes visible again", released
            )
        self.master.release_exited_worker(self.worker.pid)

        self.local_worker = self.local_worker.replacement()
        self.local_worker.send_master_address(self.master.port, self.display.print_log)
        self.worker = self.local_worker.process

    def _show(self, stream: Any) -> None:
        stats = self.master.type_stats(self.master.pipelines[self.pipeline.name])
        try:
            depths = stream.depths(self.pipeline.data_queues())
        except EngineError as exc:
            logger.debug("reading queue depths failed: %s", exc)
            depths = {}
        self.display.update(stats, depths)

    def _stop_worker(self) -> None:
        if self.worker.poll() is None:
            self.master.shutdown_workers(self.drain_timeout_s)
        deadline = time.monotonic() + self.drain_timeout_s + WORKER_EXIT_GRACE_S
        while self.worker.poll() is None:
            if self.interrupts >= 2 or time.monotonic() > deadline:
                self._kill_worker()
                break
            # `wait` returns within milliseconds of the exit. Its timeout only
            # bounds how long a second Ctrl-C waits to be seen.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.worker.wait(timeout=0.05)
        self.worker.wait()

    def _hold_until_interrupted(self, api_url: str) -> None:
        """Keep the master and the control API serving until Ctrl-C."""
        self.display.print(
            f"holding: the dashboard at {api_url}/ and the metrics at "
            f"{api_url}/metrics show the final state; press Ctrl-C to exit"
        )
        # The signal handler runs in this thread between two timed waits.
        while not self.interrupts:
            time.sleep(REFRESH_INTERVAL_S)
        logger.info("hold ended by Ctrl-C")

    def _kill_worker(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.worker.pid, signal.SIGKILL)

    def _finish(self, stream: Any, status: str, elapsed_s: float) -> RunOutcome:
        stats = self.master.type_stats(self.master.pipelines[self.pipeline.name])
        has_node_failures = any(
            entry["state"] == TypeState.FAILED.value for entry in stats.values()
        )
        fail_queues = [self.pipeline.fail_queue(node) for node in self.pipeline.nodes]
        fail_depths = stream.depths(fail_queues)
        if status == "interrupted":
            outcome = "interrupted"
        elif has_node_failures:
            outcome = "failed"
        else:
            outcome = "completed"
            # Every edge queue is empty now; the fail queues stay for inspection.
            # The sources' positions stay too, so that a --resume after a
            # fail-queue replay does not run the sources again from the start.
            stream.delete_queues(self.pipeline.data_queues())
        self._record_unfinished_sources(
            []
            if outcome == "completed"
            else [
                entry["node"]
                for entry in stats.values()
                if entry["kind"] == "source" and entry["state"] != "completed"
            ]
        )
        self.display.print(
            format_summary(self.pipeline.name, stats, fail_depths, elapsed_s, outcome)
        )
        if outcome == "completed":
            for hook in self.pipeline.completion_hooks:
                run_hook(hook, self.params, "on_complete", self.pipeline.name)
        return RunOutcome(
            status=outcome,
            has_node_failures=has_node_failures,
            # This run's failures only: a fail queue may hold older ones too.
            failed_items=sum(entry["failures"] for entry in stats.values()),
            elapsed_s=elapsed_s,
        )


def lock_stream(stream_url: str, pipeline: str) -> Any:
    """Take the lock file of a pipeline on a SQLite stream, so runs cannot mix.

    Returns the open lock file, which holds the lock until it is closed or
    the process ends, or None for other streams. Raises `EngineError` when
    another `engine run` or `engine master` of the pipeline uses the file.
    """
    path = sqlite_file(stream_url)
    if path is None:
        return None
    lock_path = path.with_name(f"{path.name}.{pipeline}.lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock_file = lock_path.open("a+")
    except OSError as exc:
        raise EngineError(
            f"cannot create the run lock {str(lock_path)!r} beside the stream "
            f"{redact_url(stream_url)}: {exc.strerror}; pass a --stream whose "
            "folder can be created and written"
        ) from None
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.seek(0)
        holder = lock_file.read().strip() or "unknown"
        lock_file.close()
        raise EngineError(
            f"another run of pipeline {pipeline!r} uses the stream "
            f"{redact_url(stream_url)} (pid {holder}); wait for it to end, or "
            "give this run its own --stream"
        ) from None
    lock_file.seek(0)
    lock_file.truncate()
    lock_file.write(str(os.getpid()))
    lock_file.flush()
    return lock_file


def run_hook(hook: Any, params: dict[str, Any], kind: str, pipeline: str) -> None:
    """Run a start or completion hook; raises `EngineError` naming it if it fails."""
    try:
        hook(params)
    except EngineError:
        raise
    except Exception as exc:
        name = getattr(hook, "__name__", repr(hook))
        raise EngineError(
            f"{kind} hook {name!r} of pipeline {pipeline!r} failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def _restore_handlers(previous: dict[int, Any]) -> None:
    for number, handler in previous.items():
        signal.signal(number, handler)
