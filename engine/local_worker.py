"""The worker process of `engine run`, started before the run's master listens.

`engine run` starts its worker first thing, so that the worker's interpreter
and forkserver import the engine while the run imports its own modules, loads
the pipeline file and runs the `on_start` hooks: on two cores the two start-ups
overlap. The worker then waits for the master's address on its standard input
(`engine worker --master -`), which `send_master_address` writes once the
master listens. A run that fails before then kills the worker, which has not
connected to anything or started a node.

This module imports only the standard library and `engine.discovery`, so that
the worker does not wait for the engine's own imports.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from engine.discovery import SECRET_VARIABLE

logger = logging.getLogger(__name__)


class LocalWorker:
    """The worker process of one `engine run`, and the secret of the run."""

    def __init__(
        self,
        pipeline_folder: Path,
        log_level: str,
        log_format: str,
        drain_timeout_s: float,
        secret: str | None = None,
    ) -> None:
        # Generated here, because the worker gets it before the master exists.
        self.secret = secret or secrets.token_hex(32)
        self.has_master = False
        self._settings = (pipeline_folder, log_level, log_format, drain_timeout_s)

        env = dict(os.environ)
        env[SECRET_VARIABLE] = self.secret
        # Modules beside the pipeline file import on the worker as they do in
        # the run's own process.
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(pipeline_folder), env.get("PYTHONPATH", "")) if p
        )

        command = [
            sys.executable,
            "-m",
            "engine",
            "--log-level",
            log_level,
            "--log-format",
            log_format,
            "worker",
            "--master",
            "-",
            "--exit-with-master",
            "--drain-timeout",
            str(drain_timeout_s),
        ]
        # A session of its own keeps Ctrl-C away from the worker and its nodes:
        # the run decides how they stop.
        self.process = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        logger.debug("worker process started pid=%d", self.process.pid)

    def send_master_address(self, port: int, print_line: Callable[[str], None]) -> None:
        """Send the worker the port of its master, which listens on 127.0.0.1.

        From then on, each line that the worker writes goes to `print_line`.
        """
        threading.Thread(
            target=self._forward_output,
            args=(print_line,),
            name="worker-output",
            daemon=True,
        ).start()
        self.has_master = True
        try:
            self.process.stdin.write(f"127.0.0.1:{port}\n".encode())
            self.process.stdin.close()
        except BrokenPipeError:
            # The run reports the worker's exit code, and its output the reason.
            logger.debug(
                "worker pid=%d exited before it got the master's port",
                self.process.pid,
            )

    def replacement(self) -> LocalWorker:
        """Start another worker with the same settings and secret as this one."""
        return LocalWorker(*self._settings, secret=self.secret)

    def kill(self) -> None:
        """Kill the worker, its forkserver and its nodes, and wait for it."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        # Reads the output to its end, which also closes the pipes.
        self.process.communicate()

    def _forward_output(self, print_line: Callable[[str], None]) -> None:
        for line in iter(self.process.stdout.readline, b""):
            print_line(line.decode("utf-8", "replace").rstrip("\n"))
