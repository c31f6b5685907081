"""Tests of the control API: a real master and HTTP server on 127.0.0.1.

The workers here are bare MMOP connections that join the master and record
what it sends them, so no node process runs.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from engine import Pipeline
from engine import protocol as mmop
from engine.api import MAX_BODY_BYTES, ControlAPI
from engine.master import Master
from engine.streams import open_stream
from tests.helpers import wait_for

SECRET = b"control-api-test-secret"


def generate():
    yield 1


def passthrough(item):
    return item


def consume(item):
    pass


def build_pipeline() -> Pipeline:
    """Return pipeline `p`: source `a`, transform `b` (2 processes), sink `c`."""
    pipeline = Pipeline("p")
    pipeline.add("source", "a", generate)
    pipeline.add("transform", "b", passthrough, after="a", processes=2)
    pipeline.add("sink", "c", consume, after="b")
    return pipeline


class FakeWorker:
    """A worker made of one MMOP connection: it joins and records what it gets."""

    def __init__(self, master: Master, hostname: str = "fake-host") -> None:
        self.connection = mmop.connect("127.0.0.1", master.port, SECRET)
        self.connection.send(
            mmop.Ready(hostname=hostname, pid=os.getpid(), cores=4, memory_bytes=2**30)
        )
        welcome = self.connection.receive(timeout_s=10)
        assert isinstance(welcome, mmop.Welcome)
        self.worker_id = welcome.worker_id
        self.messages: list[mmop.Message] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while True:
            try:
                self.messages.append(self.connection.receive())
            except (mmop.ConnectionClosedError, mmop.ProtocolError, OSError):
                return

    def received(self, kind: type[mmop.Message]) -> list[Any]:
        return [m for m in list(self.messages) if isinstance(m, kind)]

    def started_ids(self) -> list[str]:
        return [m.node_id for m in self.received(mmop.StartNode)]

    def report(self, kind: type[mmop.Message], node_id: str, **fields: Any) -> None:
        """Send a node report such as NODE-STARTED about `node_id`."""
        node_type = node_id.rpartition("#")[0]
        self.connection.send(
            kind(
                worker_id=self.worker_id,
                node_id=node_id,
                node_type=node_type,
                **fields,
            )
        )

    def close(self) -> None:
        self.connection.close()


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: dict[str, Any] | None


def call(
    api: ControlAPI,
    method: str,
    path: str,
    body: dict[str, Any] | str | bytes | None = None,
    token: bytes | None = SECRET,
    headers: dict[str, str] | None = None,
) -> Response:
    """Send one HTTP request to the API and decode its JSON reply."""
    if isinstance(body, dict):
        body = json.dumps(body)
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = "Bearer " + token.decode()
    connection = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=all_headers)
        response = connection.getresponse()
        payload = response.read()
        return Response(
            status=response.status,
            headers={name.lower(): value for name, value in response.getheaders()},
            body=json.loads(payload) if payload else None,
        )
    finally:
        connection.close()


def send_raw(api: ControlAPI, data: bytes) -> tuple[str, dict[str, Any]]:
    """Send raw bytes and return the status line and JSON body of the reply."""
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    head, _, payload = b"".join(chunks).partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0].decode(), json.loads(payload)


@pytest.fixture
def master(tmp_path: Path) -> Iterator[Master]:
    master = Master(SECRET, f"sqlite:///{tmp_path}/s.db", worker_timeout_s=300)
    master.start()
    master.add_pipeline(build_pipeline(), {})
    yield master
    master.close()


@pytest.fixture
def api(master: Master) -> Iterator[ControlAPI]:
    api = ControlAPI(master, "127.0.0.1", 0, SECRET, master.stream_url)
    api.start()
    yield api
    api.close()


@pytest.fixture
def join_worker(master: Master) -> Iterator[Any]:
    """Yield a function that joins a fake worker to the master."""
    workers: list[FakeWorker] = []

    def join(hostname: str = "fake-host") -> FakeWorker:
        worker = FakeWorker(master, hostname)
        workers.append(worker)
        return worker

    yield join
    for worker in workers:
        worker.close()


def test_ping_answers_pong(api: ControlAPI) -> None:
    response = call(api, "GET", "/ping", token=None)

    assert response.status == 200
    assert response.headers["content-type"] == "application/json"
    assert response.body == {"ok": True, "pong": True}


def test_start_node_without_worker_queues(api: ControlAPI, join_worker) -> None:
    response = call(api, "POST", "/start-node/p.b", {"count": 2})

    assert response.status == 202
    assert response.body == {"node_ids": ["p.b#1", "p.b#2"], "queued": True}

    # The queued nodes go to the first worker that joins.
    worker = join_worker()
    wait_for(
        lambda: worker.started_ids() == ["p.b#1", "p.b#2"],
        timeout_s=10,
        what="START-NODE for both queued nodes",
    )


def test_start_node_with_worker_answers_created(api: ControlAPI, join_worker) -> None:
    worker = join_worker()

    response = call(api, "POST", "/start-node/p.b", {"count": 3})

    assert response.status == 201
    assert response.body == {"node_ids": ["p.b#1", "p.b#2", "p.b#3"], "queued": False}
    wait_for(
        lambda: len(worker.started_ids()) == 3,
        timeout_s=10,
        what="START-NODE for three nodes",
    )
    assert worker.received(mmop.StartNode)[0].node_type == "p.b"


def test_start_node_count_defaults_to_one(api: ControlAPI, join_worker) -> None:
    join_worker()

    response = call(api, "POST", "/start-node/p.c")

    assert response.status == 201
    assert response.body["node_ids"] == ["p.c#1"]


def test_start_node_balances_type_then_total(
    api: ControlAPI, master: Master, join_worker
) -> None:
    # Given worker-1 alone with three nodes: two of p.b and one of p.a.
    first = join_worker("host-1")
    assert call(api, "POST", "/start-node/p.b", {"count": 2}).status == 201
    assert call(api, "POST", "/start-node/p.a").status == 201
    second = join_worker("host-2")

    # With no p.c anywhere, the minimum of nodes in all wins: worker-2 has none.
    assert call(api, "POST", "/start-node/p.c").body["node_ids"] == ["p.c#1"]
    # The fewest of the type comes first: worker-1 has no p.c, though it has
    # three nodes in all and worker-2 one.
    assert call(api, "POST", "/start-node/p.c").body["node_ids"] == ["p.c#2"]
    # worker-2 has no p.b yet.
    assert call(api, "POST", "/start-node/p.b").body["node_ids"] == ["p.b#3"]

    workers = call(api, "GET", "/worker-info").body["workers"]
    assert workers[first.worker_id]["nodes"] == {
        "p.a": ["p.a#1"],
        "p.b": ["p.b#1", "p.b#2"],
        "p.c": ["p.c#2"],
    }
    assert workers[second.worker_id]["nodes"] == {
        "p.b": ["p.b#3"],
        "p.c": ["p.c#1"],
    }


def test_start_node_unknown_type_not_found(api: ControlAPI) -> None:
    response = call(api, "POST", "/start-node/p.nope")

    assert response.status == 404
    assert "node type 'p.nope' not found" in response.body["error"]
    assert "'p.a', 'p.b', 'p.c'" in response.body["error"]


@pytest.mark.parametrize("count", [0, 1001, -1, "2", True, 1.5, None, [1]])
def test_start_node_rejects_invalid_count(api: ControlAPI, count: Any) -> None:
    response = call(api, "POST", "/start-node/p.b", {"count": count})

    assert response.status == 400
    assert "invalid count=" in response.body["error"]
    assert call(api, "GET", "/recipe-info").body["types"]["p.b"]["queued"] == 0


def test_start_node_on_completed_type_conflicts(
    api: ControlAPI, master: Master, join_worker
) -> None:
    worker = join_worker()
    call(api, "POST", "/start-node/p.a")
    worker.report(mmop.NodeStarted, "p.a#1", pid=os.getpid())
    worker.report(mmop.NodeCompleted, "p.a#1", stats={})
    wait_for(
        lambda: (
            call(api, "GET", "/recipe-info").body["types"]["p.a"]["state"]
            == "completed"
        ),
        timeout_s=10,
        what="node type p.a completed",
    )

    response = call(api, "POST", "/start-node/p.a")

    assert response.status == 409
    assert "'p.a' has completed" in response.body["error"]


def test_recipe_info_counts_nodes_by_state(api: ControlAPI, join_worker) -> None:
    worker = join_worker()
    call(api, "POST", "/start-node/p.b", {"count": 2})
    worker.report(mmop.NodeStarted, "p.b#1", pid=os.getpid())
    worker.report(mmop.NodeFailed, "p.b#2", reason="boom", stats={})

    def entry() -> dict[str, Any]:
        return call(api, "GET", "/recipe-info", token=None).body["types"]["p.b"]

    wait_for(lambda: entry()["failed"] == 1, timeout_s=10, what="p.b#2 failed")
    info = entry()
    assert info["running"] == 1
    assert info["queued"] == 0
    assert info["completed"] == 0
    assert info["last_error"] == "boom"
    assert info["state"] == "running"


def test_worker_info_reports_each_worker(api: ControlAPI, join_worker) -> None:
    worker = join_worker("host-a")
    call(api, "POST", "/start-node/p.c")

    response = call(api, "GET", "/worker-info", token=None)

    assert response.status == 200
    entry = response.body["workers"][worker.worker_id]
    assert entry["hostname"] == "host-a"
    assert entry["state"] == "joined"
    assert entry["cores"] == 4
    assert entry["memory_bytes"] == 2**30
    assert entry["cpu_percent"] == 0.0
    assert entry["last_seen_s_ago"] >= 0
    assert entry["nodes"] == {"p.c": ["p.c#1"]}


def test_stop_worker_sends_shutdown(api: ControlAPI, join_worker) -> None:
    worker = join_worker()

    response = call(api, "POST", f"/stop-worker/{worker.worker_id}")

    assert response.status == 202
    assert response.body == {"worker_id": worker.worker_id}
    wait_for(
        lambda: worker.received(mmop.Shutdown),
        timeout_s=10,
        what="SHUTDOWN sent to the worker",
    )
    again = call(api, "POST", f"/stop-worker/{worker.worker_id}")
    assert again.status == 409
    assert "stopping, not joined" in again.body["error"]


def test_stop_worker_takes_drain_timeout(api: ControlAPI, join_worker) -> None:
    worker = join_worker()

    response = call(
        api, "POST", f"/stop-worker/{worker.worker_id}", {"drain_timeout_s": 2.5}
    )

    assert response.status == 202
    shutdowns = wait_for(
        lambda: worker.received(mmop.Shutdown), timeout_s=10, what="SHUTDOWN"
    )
    assert shutdowns[0].drain_timeout_s == 2.5


def test_stop_worker_unknown_id_not_found(api: ControlAPI) -> None:
    response = call(api, "POST", "/stop-worker/worker-99")

    assert response.status == 404
    assert "worker 'worker-99' not found" in response.body["error"]


def test_start_pipeline_starts_declared_processes(api: ControlAPI, join_worker) -> None:
    worker = join_worker()

    response = call(api, "POST", "/start-pipeline/p")

    assert response.status == 201
    assert response.body == {"node_ids": ["p.a#1", "p.b#1", "p.b#2", "p.c#1"]}
    wait_for(
        lambda: len(worker.started_ids()) == 4,
        timeout_s=10,
        what="START-NODE for the four nodes",
    )


def test_start_pipeline_unknown_name_not_found(api: ControlAPI) -> None:
    response = call(api, "POST", "/start-pipeline/other")

    assert response.status == 404
    assert (
        "pipeline 'other' not found; loaded pipelines are 'p'"
        in (response.body["error"])
    )


def test_status_reports_workers_types_pipelines(api: ControlAPI, join_worker) -> None:
    worker = join_worker()
    call(api, "POST", "/start-node/p.a")

    response = call(api, "GET", "/status", token=None)

    assert response.status == 200
    assert list(response.body["workers"]) == [worker.worker_id]
    assert set(response.body["types"]) == {"p.a", "p.b", "p.c"}
    assert response.body["types"]["p.a"]["processes"] == 1
    assert response.body["types"]["p.b"]["state"] == "pending"
    assert response.body["pipelines"] == {
        "p": {"done": False, "node_types": ["p.a", "p.b", "p.c"]}
    }


def test_queues_reports_every_queue_depth(api: ControlAPI, master: Master) -> None:
    stream = open_stream(master.stream_url, owner="test")
    try:
        stream.declare(["p.a-to-b"])
        stream.publish([("p.a-to-b", b"1"), ("p.a-to-b", b"2"), ("p.b-fail", b"3")])
    finally:
        stream.close()

    response = call(api, "GET", "/queues", token=None)

    assert response.status == 200
    assert response.body == {
        "queues": {
            "p.a-to-b": 2,
            "p.b-to-c": 0,
            "p.a-fail": 0,
            "p.b-fail": 1,
            "p.c-fail": 0,
        }
    }


def test_queues_unreachable_stream_unavailable(master: Master, tmp_path: Path) -> None:
    # A regular file where the stream's folder should be cannot be opened.
    (tmp_path / "blocker").write_text("")
    api = ControlAPI(
        master, "127.0.0.1", 0, SECRET, f"sqlite:///{tmp_path}/blocker/s.db"
    )
    api.start()
    try:
        response = call(api, "GET", "/queues")
        ping = call(api, "GET", "/ping")
    finally:
        api.close()

    assert response.status == 503
    assert "is not reachable" in response.body["error"]
    assert ping.status == 200


def test_stop_node_stops_newest_first(api: ControlAPI, join_worker) -> None:
    worker = join_worker()
    call(api, "POST", "/start-node/p.b", {"count": 3})

    response = call(api, "POST", "/stop-node/p.b", {"count": 2})

    assert response.status == 202
    assert response.body == {"node_ids": ["p.b#3", "p.b#2"]}
    wait_for(
        lambda: (
            [m.node_id for m in worker.received(mmop.StopNode)] == ["p.b#3", "p.b#2"]
        ),
        timeout_s=10,
        what="STOP-NODE for p.b#3 and p.b#2",
    )

    # A node asked to stop is not asked again.
    assert call(api, "POST", "/stop-node/p.b").body == {"node_ids": ["p.b#1"]}
    worker.report(mmop.NodeStopped, "p.b#3", stats={})
    wait_for(
        lambda: call(api, "GET", "/recipe-info").body["types"]["p.b"]["stopped"] == 1,
        timeout_s=10,
        what="p.b#3 counted as stopped",
    )


def test_stop_node_queued_node_stops_at_once(api: ControlAPI) -> None:
    call(api, "POST", "/start-node/p.b", {"count": 2})

    response = call(api, "POST", "/stop-node/p.b")

    assert response.status == 202
    assert response.body == {"node_ids": ["p.b#2"]}
    types = call(api, "GET", "/recipe-info").body["types"]
    assert types["p.b"]["stopped"] == 1
    assert types["p.b"]["queued"] == 1


def test_stop_node_unknown_type_not_found(api: ControlAPI) -> None:
    response = call(api, "POST", "/stop-node/p.zzz", {"count": 1})

    assert response.status == 404
    assert "node type 'p.zzz' not found" in response.body["error"]


def test_scale_starts_then_stops_nodes(api: ControlAPI, join_worker) -> None:
    worker = join_worker()

    up = call(api, "POST", "/scale/p.b", {"count": 3})
    down = call(api, "POST", "/scale/p.b", {"count": 1})
    same = call(api, "POST", "/scale/p.b", {"count": 1})

    assert up.status == 200
    assert up.body == {
        "node_type": "p.b",
        "count": 3,
        "started": ["p.b#1", "p.b#2", "p.b#3"],
        "stopping": [],
    }
    assert down.body["started"] == []
    assert down.body["stopping"] == ["p.b#3", "p.b#2"]
    assert same.body["started"] == []
    assert same.body["stopping"] == []
    wait_for(
        lambda: len(worker.received(mmop.StopNode)) == 2,
        timeout_s=10,
        what="STOP-NODE for two nodes",
    )


def test_scale_requires_count(api: ControlAPI) -> None:
    response = call(api, "POST", "/scale/p.b", {})

    assert response.status == 400
    assert "missing field 'count'" in response.body["error"]


def test_post_without_token_unauthorized(api: ControlAPI) -> None:
    missing = call(api, "POST", "/start-node/p.b", token=None)
    wrong = call(api, "POST", "/start-node/p.b", token=b"not-the-secret")
    other_scheme = call(
        api, "POST", "/start-node/p.b", token=None, headers={"Authorization": "Basic x"}
    )

    for response in (missing, wrong, other_scheme):
        assert response.status == 401
        assert "missing or invalid token" in response.body["error"]
        assert response.headers["www-authenticate"].startswith("Bearer")
    # Nothing started, and GET needs no token.
    types = call(api, "GET", "/recipe-info", token=None).body["types"]
    assert types["p.b"]["queued"] == 0


def test_token_never_logged(api: ControlAPI, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="engine")

    call(api, "POST", "/start-node/p.b")
    call(api, "POST", "/start-node/p.b", token=b"wrong-token")

    assert "control API POST /start-node/p.b" in caplog.text
    assert SECRET.decode() not in caplog.text
    assert "wrong-token" not in caplog.text


def test_api_without_token_accepts_post(master: Master) -> None:
    api = ControlAPI(master, "127.0.0.1", 0, None, master.stream_url)
    api.start()
    try:
        response = call(api, "POST", "/start-node/p.b", token=None)
    finally:
        api.close()

    assert response.status == 202


OVERSIZED = b"{" + b" " * MAX_BODY_BYTES + b"}"


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "error"),
    [
        ("GET", "/nowhere", None, 404, "path '/nowhere' not found"),
        ("GET", "/nowhere/deeper", None, 404, "path '/nowhere/deeper' not found"),
        ("GET", "/ping/extra", None, 404, "not found"),
        ("POST", "/start-node", None, 404, "POST /start-node/<node-type>"),
        ("GET", "/start-node/p.b", None, 405, "use POST /start-node/<node-type>"),
        ("POST", "/status", None, 405, "use GET /status"),
        ("DELETE", "/stop-worker/worker-1", None, 405, "method DELETE not allowed"),
        ("POST", "/start-node/p.b", b"{not json", 400, "invalid JSON"),
        ("POST", "/start-node/p.b", b"[1, 2]", 400, "expected a JSON object"),
        ("POST", "/start-node/p.b", b'{"count": NaN}', 400, "invalid JSON"),
        ("POST", "/start-node/p.b", b"\xff\xfe", 400, "invalid JSON"),
        ("POST", "/start-node/p.b", b'{"cuont": 2}', 400, "unknown field 'cuont'"),
        ("POST", "/start-pipeline/p", b'{"count": 2}', 400, "unknown field"),
        ("POST", "/start-node/p.b", OVERSIZED, 413, "exceeds the limit"),
        ("POST", "/stop-worker/bad$id", None, 400, "invalid worker id 'bad$id'"),
        ("POST", "/start-node/a%20b", None, 400, "invalid node type 'a b'"),
        ("POST", "/start-node/%2e%2e%2f", None, 400, "invalid node type '../'"),
        ("POST", "/start-pipeline/" + "x" * 201, None, 400, "invalid pipeline"),
        ("POST", "/stop-worker/worker-1", b'{"drain_timeout_s": -1}', 400, "drain"),
    ],
)
def test_malformed_request_answers_json_error(
    api: ControlAPI,
    method: str,
    path: str,
    body: bytes | None,
    status: int,
    error: str,
) -> None:
    response = call(api, method, path, body)

    assert response.status == status
    assert error in response.body["error"]
    assert call(api, "GET", "/ping").status == 200


def test_wrong_method_lists_allowed_methods(api: ControlAPI) -> None:
    on_get_endpoint = call(api, "PUT", "/queues")
    on_post_endpoint = call(api, "GET", "/scale/p.b")

    assert on_get_endpoint.status == 405
    assert on_get_endpoint.headers["allow"] == "GET, HEAD, OPTIONS"
    assert on_post_endpoint.headers["allow"] == "POST, OPTIONS"


def test_head_and_options_answer_without_body(api: ControlAPI) -> None:
    head = call(api, "HEAD", "/status")
    options = call(api, "OPTIONS", "/start-node/p.b", token=None)

    assert head.status == 200
    assert head.body is None
    assert options.status == 204
    assert options.headers["allow"] == "POST, OPTIONS"


def test_invalid_content_length_rejected(api: ControlAPI) -> None:
    status_line, body = send_raw(
        api,
        b"POST /start-node/p.b HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n",
    )

    assert status_line == "HTTP/1.1 400 Bad Request"
    assert "invalid Content-Length 'ten'" in body["error"]


def test_chunked_body_rejected(api: ControlAPI) -> None:
    status_line, body = send_raw(
        api,
        b"POST /start-node/p.b HTTP/1.1\r\nHost: x\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    )

    assert status_line == "HTTP/1.1 411 Length Required"
    assert "send Content-Length" in body["error"]


def test_malformed_request_line_answers_json(api: ControlAPI) -> None:
    status_line, body = send_raw(api, b"GET /ping extra HTTP/1.1\r\n\r\n")

    assert status_line == "HTTP/1.1 400 Bad Request"
    assert "Bad request syntax" in body["error"]
    assert call(api, "GET", "/ping").status == 200


def test_unknown_method_answers_json(api: ControlAPI) -> None:
    response = call(api, "BREW", "/ping")

    assert response.status == 501
    assert "method 'BREW' is not supported" in response.body["error"]


def test_keep_alive_serves_several_requests(api: ControlAPI) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
    try:
        statuses = []
        for path in ("/ping", "/nowhere", "/ping"):
            connection.request("GET", path)
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
    finally:
        connection.close()

    assert statuses == [200, 404, 200]


class BrokenMaster(Master):
    """A master whose recipe report fails, as a bug in it would."""

    def recipe_info(self) -> dict[str, dict[str, Any]]:
        raise RuntimeError("recipe report broke")


def test_handler_exception_answers_500(tmp_path: Path, caplog) -> None:
    master = BrokenMaster(SECRET, f"sqlite:///{tmp_path}/s.db")
    master.start()
    api = ControlAPI(master, "127.0.0.1", 0, SECRET, master.stream_url)
    api.start()
    try:
        with caplog.at_level(logging.ERROR, logger="engine.api"):
            broken = call(api, "GET", "/recipe-info")
        ping = call(api, "GET", "/ping")
    finally:
        api.close()
        master.close()

    assert broken.status == 500
    assert "RuntimeError: recipe report broke" in broken.body["error"]
    assert "control API request GET /recipe-info failed" in caplog.text
    assert "Traceback" in caplog.text
    assert ping.status == 200


def test_port_in_use_raises_engine_error(master: Master, api: ControlAPI) -> None:
    from engine.errors import EngineError

    second_api = ControlAPI(master, "127.0.0.1", api.port, SECRET, master.stream_url)

    with pytest.raises(EngineError, match="cannot listen on 127.0.0.1:"):
        second_api.start()


def test_discovery_files_private_and_removed(api: ControlAPI, tmp_path: Path) -> None:
    folder = tmp_path / ".monomyth"

    api.write_discovery(["p"], folder)

    content = json.loads((folder / "control.json").read_text())
    assert content == {
        "api": api.url,
        "pid": os.getpid(),
        "pipelines": ["p"],
        "stream": api.stream_url,
    }
    assert (folder / "control.token").read_bytes() == SECRET + b"\n"
    for name in ("control.json", "control.token"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
    api.close()
    assert not (folder / "control.json").exists()
    assert not (folder / "control.token").exists()


def test_discovery_files_of_other_process_kept(api: ControlAPI, tmp_path: Path) -> None:
    folder = tmp_path / ".monomyth"
    api.write_discovery(["p"], folder)
    # A later run in the same folder replaced the files.
    later = {"api": "http://127.0.0.1:1", "pid": os.getpid() + 1, "pipelines": []}
    (folder / "control.json").write_text(json.dumps(later))
    (folder / "control.token").write_text("later-token\n")

    api.close()

    assert json.loads((folder / "control.json").read_text()) == later
    assert (folder / "control.token").read_text() == "later-token\n"


def test_start_node_rejects_extra_source_process(api: ControlAPI) -> None:
    first = call(api, "POST", "/start-node/p.a")
    second = call(api, "POST", "/start-node/p.a")
    scaled = call(api, "POST", "/scale/p.a", {"count": 2})
    stopped = call(api, "POST", "/scale/p.a", {"count": 0})

    assert first.status == 202
    assert second.status == 409
    assert "source 'p.a' has started 1 of the 1 processes" in second.body["error"]
    assert scaled.status == 409
    assert "would publish its items again" in scaled.body["error"]
    assert stopped.status == 200
    assert stopped.body["stopping"] == ["p.a#1"]
