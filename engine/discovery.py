"""The discovery files of a running control API, and its default port.

A master writes `.monomyth/control.json` and `.monomyth/control.token` into
the folder it runs in, so that the `engine` control commands started there
find its control API and token without options.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_API_PORT = 7601

# The environment variable that contains the cluster secret, which is also
# the control API's token.
SECRET_VARIABLE = "MONOMYTH_SECRET"

CONTROL_FOLDER = Path(".monomyth")
DISCOVERY_FILE = CONTROL_FOLDER / "control.json"
TOKEN_FILE = CONTROL_FOLDER / "control.token"


class DiscoveryFile:
    """`.monomyth/control.json` and `.monomyth/control.token` of a running API.

    The `engine` control commands read them to find the API and its token.
    Both files are created with mode 0600, because the token is the cluster
    secret. Without a token, only `control.json` is written. `remove` deletes
    the files only while they still name this process, so a later run in the
    same folder keeps its own files.
    """

    def __init__(
        self,
        api_url: str,
        token: bytes | None,
        pipelines: list[str],
        folder: Path,
        stream_url: str = "",
    ) -> None:
        self.api_url = api_url
        self.token = token
        self.pipelines = pipelines
        # The master's data stream, for `engine fail-queue`. The file is
        # private to its user, like the token, because the URL may hold a
        # password.
        self.stream_url = stream_url
        self.path = folder / DISCOVERY_FILE.name
        self.token_path = folder / TOKEN_FILE.name

    def write(self) -> bool:
        """Write both files, replacing those of a process that has ended.

        Returns False, writes nothing and logs a warning when the files name
        another process that is still running, such as a second `engine run`
        in the same folder: the commands keep finding the first one.
        """
        owner = self._live_owner()
        if owner is not None:
            logger.warning(
                "%s names the control API of process %d, which still runs, so "
                "this process's control API is not written there; pass "
                "--api %s to the engine commands to reach it",
                self.path,
                owner,
                self.api_url,
            )
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        content = {
            "api": self.api_url,
            "pid": os.getpid(),
            "pipelines": self.pipelines,
            "stream": self.stream_url,
        }
        if self.token is not None:
            _write_private(self.token_path, self.token + b"\n")
        _write_private(self.path, json.dumps(content, indent=2).encode() + b"\n")
        logger.debug("control API discovery file written to %s", self.path)
        return True

    def _live_owner(self) -> int | None:
        """Return the PID in the file if it names another running process."""
        content = read_discovery(self.path) or {}
        pid = content.get("pid")
        if pid == os.getpid() or not is_process_alive(pid):
            return None
        return pid

    def remove(self) -> None:
        """Delete both files if this process wrote them last."""
        content = read_discovery(self.path)
        if content is None or content.get("pid") != os.getpid():
            return
        with contextlib.suppress(OSError):
            if self.token and self.token_path.read_bytes().strip() == self.token:
                self.token_path.unlink()
        with contextlib.suppress(OSError):
            self.path.unlink()


def read_discovery(path: Path = DISCOVERY_FILE) -> dict | None:
    """Return the JSON object of a discovery file, or None if missing or invalid."""
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


def write_stream_record(pipeline: str, stream_url: str) -> None:
    """Store the stream URL of the latest run of `pipeline` in this folder.

    `engine fail-queue` reads it after the run or master has ended, when no
    discovery file names the stream any more. The file is private to its
    user, because the URL may hold a password.
    """
    CONTROL_FOLDER.mkdir(parents=True, exist_ok=True)
    _write_private(CONTROL_FOLDER / f"{pipeline}.stream", stream_url.encode() + b"\n")


def read_stream_record(pipeline: str) -> str | None:
    """Return the stream URL that `write_stream_record` stored, or None."""
    try:
        text = (CONTROL_FOLDER / f"{pipeline}.stream").read_text().strip()
    except OSError:
        return None
    return text or None


def is_process_alive(pid: object) -> bool:
    """Return True when `pid`, as read from a discovery file, names a process."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # The process exists but belongs to another user.
        return True
    return True


def _write_private(path: Path, data: bytes) -> None:
    # Write a temporary file and rename it, so a reader never sees half a file.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)
    os.replace(temporary, path)
