"""The control commands against a real `engine run` and `engine master`."""

from __future__ import annotations

import json
import signal
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.items import encode
from engine.streams import open_stream
from tests.end_to_end.conftest import PICKY_PIPELINE, engine_command, run_engine
from tests.helpers import wait_for

# Runs until interrupted: the source counts forever, slowly.
ENDLESS = """
import itertools
import time

from engine import Pipeline

pipeline = Pipeline("endless")


@pipeline.source(batch_size=10)
def numbers():
    for number in itertools.count():
        time.sleep(0.01)
        yield number


@pipeline.transform(after="numbers", batch_size=10)
def wait(number):
    time.sleep(0.01)
    return number


@pipeline.sink(after="wait", batch_size=10)
def drop(number):
    pass
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process(process: subprocess.Popen) -> tuple[str, str]:
    """Send SIGINT to `process`, wait for it and return its output."""
    process.send_signal(signal.SIGINT)
    try:
        return process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def engine_json(*args: str, cwd: Path) -> dict:
    result = run_engine(*args, "--json", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def endless_run(tmp_path: Path, write_pipeline) -> Iterator[subprocess.Popen]:
    """Yield `engine run` on the endless pipeline, once its API is discoverable."""
    pipeline = write_pipeline(ENDLESS)
    process = subprocess.Popen(
        [engine_command(), "run", str(pipeline)],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: (
                (tmp_path / ".monomyth" / "control.json").exists()
                or process.poll() is not None
            ),
            timeout_s=60,
            what="the discovery file of engine run",
        )
        assert process.poll() is None, process.communicate()
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_run_writes_private_discovery_files(tmp_path: Path, endless_run) -> None:
    folder = tmp_path / ".monomyth"

    content = json.loads((folder / "control.json").read_text())

    assert content["api"].startswith("http://127.0.0.1:")
    assert content["pid"] == endless_run.pid
    assert content["pipelines"] == ["endless"]
    for name in ("control.json", "control.token"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600

    stop_process(endless_run)

    assert endless_run.returncode == 130
    assert not (folder / "control.json").exists()
    assert not (folder / "control.token").exists()


def test_control_commands_against_run(tmp_path: Path, endless_run) -> None:
    status = engine_json("status", cwd=tmp_path)
    assert status["pipelines"]["endless"]["done"] is False
    assert set(status["types"]) == {"endless.numbers", "endless.wait", "endless.drop"}

    queues = engine_json("queues", cwd=tmp_path)
    assert set(queues["queues"]) >= {"endless.numbers-to-wait", "endless.wait-to-drop"}
    assert "endless.wait-fail" in queues["queues"]

    info = run_engine("recipe-info", cwd=tmp_path)
    assert info.returncode == 0, info.stderr
    assert "endless.wait" in info.stdout
    assert "RUNNING" in info.stdout

    workers = run_engine("worker-info", cwd=tmp_path)
    assert workers.returncode == 0, workers.stderr
    assert "worker-1" in workers.stdout

    plain = run_engine("status", cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    assert "Node types" in plain.stdout
    assert "endless.numbers" in plain.stdout

    stop_process(endless_run)
    assert endless_run.returncode == 130


def test_scale_up_and_down_through_run(tmp_path: Path, endless_run) -> None:
    def running_wait_processes() -> int:
        return engine_json("status", cwd=tmp_path)["types"]["endless.wait"]["running"]

    up = run_engine("scale", "endless.wait", "2", cwd=tmp_path)

    assert up.returncode == 0, up.stderr
    assert "started endless.wait#2" in up.stdout
    wait_for(
        lambda: running_wait_processes() == 2,
        timeout_s=60,
        interval_s=0.5,
        what="two running processes of endless.wait",
    )

    down = run_engine("scale", "endless.wait", "1", cwd=tmp_path)

    assert down.returncode == 0, down.stderr
    assert "stopping endless.wait#2" in down.stdout
    wait_for(
        lambda: (
            engine_json("recipe-info", cwd=tmp_path)["types"]["endless.wait"]["stopped"]
            == 1
        ),
        timeout_s=60,
        interval_s=0.5,
        what="endless.wait#2 drained and stopped",
    )
    assert running_wait_processes() == 1

    stop_process(endless_run)
    assert endless_run.returncode == 130


def test_control_errors_exit_one(tmp_path: Path, endless_run) -> None:
    unknown = run_engine("start-node", "endless.nope", cwd=tmp_path)
    unauthorized = run_engine(
        "start-node",
        "endless.wait",
        "--token-file",
        str(write_token(tmp_path)),
        cwd=tmp_path,
    )

    assert unknown.returncode == 1
    assert "Error: node type 'endless.nope' not found" in unknown.stderr
    assert "(HTTP 404)" in unknown.stderr
    assert unauthorized.returncode == 1
    assert "missing or invalid token" in unauthorized.stderr
    assert "(HTTP 401)" in unauthorized.stderr

    stop_process(endless_run)


def write_token(folder: Path) -> Path:
    path = folder / "wrong.token"
    path.write_text("not-the-secret\n")
    return path


def test_status_unreachable_api_exits_one(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"

    result = run_engine("status", "--api", url, cwd=tmp_path)

    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"Error: control API at {url} is not reachable (connection refused); "
        "start engine master or engine run, or pass --api URL"
    )
    assert "Traceback" not in result.stderr


def test_status_invalid_api_url_is_usage_error(tmp_path: Path) -> None:
    result = run_engine("status", "--api", "127.0.0.1:7601", cwd=tmp_path)

    assert result.returncode == 2
    assert "invalid control API URL '127.0.0.1:7601'" in result.stderr


def test_master_serves_api_and_removes_discovery(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [
            engine_command(),
            "master",
            "--bind",
            f"127.0.0.1:{free_port()}",
            "--api",
            "127.0.0.1:0",
        ],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    discovery = tmp_path / ".monomyth" / "control.json"
    try:
        wait_for(
            lambda: discovery.exists() or process.poll() is not None,
            timeout_s=60,
            what="the discovery file of engine master",
        )
        assert process.poll() is None, process.communicate()

        status = engine_json("status", cwd=tmp_path)
        url = json.loads(discovery.read_text())["api"]
        explicit = run_engine("status", "--api", url, cwd=tmp_path)
    finally:
        _, stderr = stop_process(process)

    assert status == {"nodes": {}, "pipelines": {}, "types": {}, "workers": {}}
    assert explicit.returncode == 0, explicit.stderr
    assert process.returncode == 0, stderr
    assert "control API listening on http://127.0.0.1:" in stderr
    assert not discovery.exists()


def test_master_api_beyond_loopback_needs_secret(tmp_path: Path) -> None:
    # 192.0.2.1 is a documentation address: the check fails before any bind.
    result = run_engine(
        "master",
        "--bind",
        f"127.0.0.1:{free_port()}",
        "--api",
        "192.0.2.1:7601",
        cwd=tmp_path,
    )

    assert result.returncode == 1
    assert "missing cluster secret for a control API bound to 192.0.2.1" in (
        result.stderr
    )
    assert not (tmp_path / ".monomyth" / "control.json").exists()


def test_master_invalid_api_address_is_usage_error(tmp_path: Path) -> None:
    result = run_engine("master", "--api", "nowhere", cwd=tmp_path)

    assert result.returncode == 2
    assert "invalid address 'nowhere'" in result.stderr


def test_fail_queue_reads_running_master_stream(tmp_path: Path) -> None:
    pipeline = tmp_path / "picky.py"
    pipeline.write_text(PICKY_PIPELINE)
    stream_url = f"sqlite:///{tmp_path / 'elsewhere' / 'picky.db'}"
    run = run_engine("run", str(pipeline), "--stream", stream_url, cwd=tmp_path)
    assert run.returncode == 3, run.stderr
    master_folder = tmp_path / "master"
    master_folder.mkdir()
    process = subprocess.Popen(
        [
            engine_command(),
            "master",
            str(pipeline),
            "--stream",
            stream_url,
            "--bind",
            f"127.0.0.1:{free_port()}",
            "--api",
            "127.0.0.1:0",
        ],
        cwd=master_folder,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    discovery = master_folder / ".monomyth" / "control.json"
    try:
        wait_for(
            lambda: discovery.exists() or process.poll() is not None,
            timeout_s=60,
            what="the discovery file of engine master",
        )
        assert process.poll() is None, process.communicate()
        listed = run_engine("fail-queue", "list", "picky.invert", cwd=master_folder)
    finally:
        stop_process(process)

    assert listed.returncode == 0, listed.stderr
    assert "2 failed items in picky.invert-fail" in listed.stdout
    assert not (master_folder / ".monomyth" / "picky.db").exists()


LEFTOVER = """
from engine import Pipeline

pipeline = Pipeline("leftover")


@pipeline.source()
def numbers():
    yield from range(3)


@pipeline.sink(after="numbers")
def drop(number):
    pass
"""


def test_master_rejects_items_of_unfinished_run(tmp_path: Path) -> None:
    (tmp_path / "leftover.py").write_text(LEFTOVER)
    stream_url = f"sqlite:///{tmp_path / 'cluster.db'}"
    stream = open_stream(stream_url, owner="test")
    stream.declare(["leftover.numbers-to-drop"])
    envelope = {"id": "numbers:0", "attempt": 1, "payload": 0}
    stream.publish([("leftover.numbers-to-drop", encode(envelope, "json"))])
    stream.close()

    result = run_engine(
        "master",
        "leftover.py",
        "--bind",
        f"127.0.0.1:{free_port()}",
        "--api",
        "off",
        "--workers",
        "0",
        "--exit-when-done",
        "--stream",
        stream_url,
        cwd=tmp_path,
        timeout_s=30,
    )

    assert result.returncode == 1
    assert "contains 1 messages of pipeline 'leftover'" in result.stderr
    assert "--resume" in result.stderr
