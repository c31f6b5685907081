"""Tests of MMOP, the control protocol, over real sockets on 127.0.0.1."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import random
import re
import secrets
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import cloudpickle
import pytest

from engine.errors import AuthenticationError, ProtocolError
from engine.protocol import (
    MAX_FRAME_BYTES,
    MESSAGE_TYPES,
    CompleteType,
    Connection,
    ConnectionClosedError,
    ConnectionFailedError,
    Heartbeat,
    Message,
    NodeCompleted,
    NodeExited,
    NodeFailed,
    NodeStarted,
    NodeStartFailed,
    NodeStopped,
    Ping,
    Pong,
    Ready,
    RecipeInfo,
    RecipeInfoRequest,
    Rejected,
    Shutdown,
    StartNode,
    StartNodeRequest,
    StartNodeRequestFailed,
    StartNodeRequestSucceeded,
    StopNode,
    StopWorkerRequest,
    StopWorkerRequestFailed,
    StopWorkerRequestSucceeded,
    Welcome,
    WorkerInfo,
    WorkerInfoRequest,
    WorkerStopping,
    accept,
    connect,
    decode_message,
    encode_message,
    wire_name,
)
from tests.helpers import wait_for

SECRET = b"protocol-test-secret-5c1d"
OTHER_SECRET = b"protocol-test-other-secret-9e2f"
TIMEOUT_S = 5.0
# A short wait that the tests expect to time out.
SHORT_TIMEOUT_S = 0.2

NODE_STATS = {
    "node_id": "wordcount.map#2",
    "node_type": "wordcount.map",
    "pid": 5001,
    "state": "running",
    "items_in": 1200,
    "items_out": 9800,
    "failures": 1,
    "restarts": 0,
    "cpu_percent": 97.5,
    "memory_bytes": 48_000_000,
}
RECIPE = cloudpickle.dumps(lambda line: line.split())

# One example of each message class, in the order of docs/mmop.md.
EXAMPLES: list[Message] = [
    Ready(hostname="host-a", pid=4242, cores=8, memory_bytes=16 * 2**30),
    Ready(
        hostname="host-a",
        pid=4242,
        cores=8,
        memory_bytes=16 * 2**30,
        worker_id="worker-1",
        nodes=[{"node_id": "wordcount.map#2", "node_type": "wordcount.map"}],
    ),
    Heartbeat(
        worker_id="worker-1", cpu_percent=97.5, memory_bytes=2**30, nodes=[NODE_STATS]
    ),
    NodeStarted(
        worker_id="worker-1",
        node_id="wordcount.map#2",
        node_type="wordcount.map",
        pid=5001,
    ),
    NodeStartFailed(
        worker_id="worker-1",
        node_id="wordcount.map#2",
        node_type="wordcount.map",
        reason="recipe cannot be loaded: no module named 'wordcount'",
    ),
    NodeExited(
        worker_id="worker-1",
        node_id="wordcount.map#2",
        node_type="wordcount.map",
        exit_code=None,
        signal=9,
        will_restart=True,
        restart_in_s=0.5,
    ),
    NodeCompleted(
        worker_id="worker-1",
        node_id="wordcount.read#1",
        node_type="wordcount.read",
        stats={"items_in": 0, "items_out": 420},
    ),
    NodeStopped(
        worker_id="worker-1",
        node_id="wordcount.map#2",
        node_type="wordcount.map",
        stats={"items_in": 10, "items_out": 80},
    ),
    NodeFailed(
        worker_id="worker-1",
        node_id="wordcount.map#2",
        node_type="wordcount.map",
        reason="restart budget spent: 5 restarts in 60 s",
        stats={},
    ),
    WorkerStopping(worker_id="worker-1", reason="received SIGTERM"),
    Pong(nonce=17),
    Welcome(
        worker_id="worker-1",
        stream_url="sqlite:///tmp/run.db",
        heartbeat_interval_s=1.0,
    ),
    StartNode(
        node_id="wordcount.map#3",
        node_type="wordcount.map",
        recipe=RECIPE,
        complete=True,
        resume=True,
    ),
    StopNode(node_id="wordcount.map#3"),
    CompleteType(node_type="wordcount.map"),
    Shutdown(drain_timeout_s=30.0),
    Ping(nonce=17),
    StartNodeRequest(node_type="wordcount.map", count=3),
    StartNodeRequestSucceeded(
        node_ids=["wordcount.map#4", "wordcount.map#5", "wordcount.map#6"]
    ),
    StartNodeRequestFailed(reason="node type 'wordcount.mop' not found"),
    StopWorkerRequest(worker_id="worker-2"),
    StopWorkerRequestSucceeded(worker_id="worker-2"),
    StopWorkerRequestFailed(reason="worker 'worker-9' not found"),
    RecipeInfoRequest(),
    RecipeInfo(
        types={
            "wordcount.map": {"queued": 0, "running": 2, "completed": 1, "failed": 0}
        }
    ),
    WorkerInfoRequest(),
    WorkerInfo(
        workers={
            "worker-1": {
                "host": "host-a",
                "state": "running",
                "nodes": {"wordcount.map": ["wordcount.map#2"]},
            }
        }
    ),
    Rejected(reason="unknown message type 'LAUNCH'"),
]


# -- Fixtures and helpers -------------------------------------------------


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.create_server(("127.0.0.1", 0))
    sock.settimeout(TIMEOUT_S)
    yield sock
    sock.close()


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=4) as executor:
        yield executor


@pytest.fixture
def connection_pair(
    listener: socket.socket, pool: ThreadPoolExecutor
) -> Iterator[tuple[Connection, Connection]]:
    client, server = open_pair(listener, pool)
    yield client, server
    client.close()
    server.close()


@pytest.fixture
def raw_client(
    listener: socket.socket, pool: ThreadPoolExecutor
) -> Iterator[tuple[socket.socket, Connection]]:
    sock, server = open_raw_client(listener, pool)
    yield sock, server
    sock.close()
    server.close()


def port_of(listener: socket.socket) -> int:
    return listener.getsockname()[1]


def accept_one(listener: socket.socket, secret: bytes, **kwargs: Any) -> Connection:
    sock, _ = listener.accept()
    return accept(sock, secret, TIMEOUT_S, **kwargs)


def open_pair(
    listener: socket.socket,
    pool: ThreadPoolExecutor,
    client_kwargs: dict[str, Any] | None = None,
) -> tuple[Connection, Connection]:
    """Connect a client to a server through the real handshake."""
    server_future = pool.submit(accept_one, listener, SECRET)
    client = connect(
        "127.0.0.1", port_of(listener), SECRET, TIMEOUT_S, **(client_kwargs or {})
    )
    return client, server_future.result(timeout=TIMEOUT_S)


def open_raw_client(
    listener: socket.socket, pool: ThreadPoolExecutor, **server_kwargs: Any
) -> tuple[socket.socket, Connection]:
    """Connect a plain socket that does the handshake by hand, to send any bytes."""
    server_future = pool.submit(accept_one, listener, SECRET, **server_kwargs)
    sock = socket.create_connection(("127.0.0.1", port_of(listener)), TIMEOUT_S)
    greeting = receive_exactly(sock, 38)
    client_nonce = secrets.token_bytes(32)
    sock.sendall(client_nonce + sign(SECRET, b"client", greeting[6:], client_nonce))
    receive_exactly(sock, 33)
    return sock, server_future.result(timeout=TIMEOUT_S)


def sign(secret: bytes, role: bytes, first_nonce: bytes, second_nonce: bytes) -> bytes:
    data = role + first_nonce + second_nonce
    return hmac.new(secret, data, hashlib.sha256).digest()


def receive_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    # Each pass reads at least one byte or fails; the socket has a timeout.
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise AssertionError(f"peer closed after {len(data)} of {count} bytes")
        data += chunk
    return data


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def serve_once(
    listener: socket.socket,
    pool: ThreadPoolExecutor,
    behave: Callable[[socket.socket], None],
) -> Future[None]:
    """Play a fake server for one client: run `behave`, then read until EOF."""

    def serve() -> None:
        sock, _ = listener.accept()
        with sock:
            sock.settimeout(TIMEOUT_S)
            behave(sock)
            with contextlib.suppress(OSError):
                for _ in range(100):
                    if not sock.recv(1024):
                        break

    return pool.submit(serve)


def receive_until_closed(server: Connection, max_receives: int = 200) -> list[str]:
    """Receive until the connection closes; return the ProtocolError texts."""
    errors = []
    for _ in range(max_receives):
        try:
            server.receive(timeout_s=TIMEOUT_S)
        except ConnectionClosedError:
            return errors
        except ProtocolError as exc:
            errors.append(str(exc))
    pytest.fail(f"connection still open after {max_receives} receives")


def exception_texts(exc: BaseException) -> str:
    """Return str and repr of an exception and of every exception it chains."""
    texts = []
    current: BaseException | None = exc
    for _ in range(10):
        if current is None:
            break
        texts += [str(current), repr(current)]
        current = current.__cause__ or current.__context__
    return "\n".join(texts)


# -- Names and messages ---------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "expected"),
    [
        (StartNode, "START-NODE"),
        (NodeStarted, "NODE-STARTED"),
        (StartNodeRequest, "START-NODE-REQUEST"),
        (StartNodeRequestSucceeded, "START-NODE-REQUEST-SUCCEEDED"),
        (Rejected, "REJECTED"),
    ],
)
def test_wire_name_splits_camel_case(cls: type[Message], expected: str) -> None:
    assert wire_name(cls) == expected


def test_wire_name_accepts_message_instance() -> None:
    assert wire_name(Ping(nonce=1)) == "PING"


def test_wire_name_rejects_other_classes() -> None:
    with pytest.raises(TypeError, match="expected an MMOP message"):
        wire_name(dict)


def test_message_types_lists_every_message() -> None:
    expected = {
        "READY",
        "HEARTBEAT",
        "NODE-STARTED",
        "NODE-START-FAILED",
        "NODE-EXITED",
        "NODE-COMPLETED",
        "NODE-STOPPED",
        "NODE-FAILED",
        "WORKER-STOPPING",
        "PONG",
        "WELCOME",
        "START-NODE",
        "STOP-NODE",
        "COMPLETE-TYPE",
        "SHUTDOWN",
        "PING",
        "START-NODE-REQUEST",
        "START-NODE-REQUEST-SUCCEEDED",
        "START-NODE-REQUEST-FAILED",
        "STOP-WORKER-REQUEST",
        "STOP-WORKER-REQUEST-SUCCEEDED",
        "STOP-WORKER-REQUEST-FAILED",
        "RECIPE-INFO-REQUEST",
        "RECIPE-INFO",
        "WORKER-INFO-REQUEST",
        "WORKER-INFO",
        "REJECTED",
    }
    assert set(MESSAGE_TYPES) == expected
    for name, cls in MESSAGE_TYPES.items():
        assert wire_name(cls) == name


def test_message_types_is_read_only() -> None:
    with pytest.raises(TypeError):
        MESSAGE_TYPES["PING"] = Pong  # type: ignore[index]


def test_examples_cover_every_message_type() -> None:
    assert {wire_name(example) for example in EXAMPLES} == set(MESSAGE_TYPES)


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (
            lambda: StartNodeRequest(node_type="wordcount.map", count=0),
            "invalid count=0 for START-NODE-REQUEST: count must be 1 or more",
        ),
        (
            lambda: Ready(hostname="host-a", pid=0, cores=1, memory_bytes=0),
            "invalid pid=0 for READY: pid must be 1 or more",
        ),
        (
            lambda: Heartbeat(
                worker_id="worker-1", cpu_percent=float("nan"), memory_bytes=0, nodes=[]
            ),
            "invalid cpu_percent=nan for HEARTBEAT",
        ),
        (
            lambda: Welcome(
                worker_id="worker-1",
                stream_url="sqlite:///r.db",
                heartbeat_interval_s=0,
            ),
            "heartbeat_interval_s must be more than 0",
        ),
        (
            lambda: StopNode(node_id=""),
            "invalid node_id='' for STOP-NODE: node_id must not be empty",
        ),
        (
            lambda: Shutdown(drain_timeout_s=-1.0),
            "drain_timeout_s must be 0 or more",
        ),
        (
            lambda: NodeExited(
                worker_id="worker-1",
                node_id="wordcount.map#2",
                node_type="wordcount.map",
                exit_code=1,
                signal=9,
                will_restart=False,
                restart_in_s=0.0,
            ),
            "exactly one of them must be set",
        ),
    ],
)
def test_message_rejects_invalid_values(
    build: Callable[[], Message], expected: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(expected)):
        build()


def test_start_node_repr_hides_recipe() -> None:
    message = StartNode(
        node_id="wordcount.map#3",
        node_type="wordcount.map",
        recipe=b"recipe-body-bytes",
        complete=False,
    )
    assert "recipe-body-bytes" not in repr(message)


def test_encode_message_sends_recipe_as_base64() -> None:
    body = json.loads(encode_message(EXAMPLES[12]))
    assert body["type"] == "START-NODE"
    assert base64.b64decode(body["recipe"]) == RECIPE


@pytest.mark.parametrize("example", EXAMPLES, ids=wire_name)
def test_message_round_trips_over_socket(
    connection_pair: tuple[Connection, Connection], example: Message
) -> None:
    client, server = connection_pair

    client.send(example)
    received_by_server = server.receive(timeout_s=TIMEOUT_S)
    server.send(example)
    received_by_client = client.receive(timeout_s=TIMEOUT_S)

    assert received_by_server == example
    assert type(received_by_server) is type(example)
    assert received_by_client == example


# -- Handshake ------------------------------------------------------------


def test_handshake_connects_with_same_secret(
    connection_pair: tuple[Connection, Connection], listener: socket.socket
) -> None:
    client, server = connection_pair
    assert client.peer == ("127.0.0.1", port_of(listener))
    assert server.peer[0] == "127.0.0.1"
    assert not client.is_closed
    assert not server.is_closed


def test_handshake_follows_documented_bytes(
    listener: socket.socket, pool: ThreadPoolExecutor
) -> None:
    server_future = pool.submit(accept_one, listener, SECRET)
    with socket.create_connection(("127.0.0.1", port_of(listener)), TIMEOUT_S) as sock:
        greeting = receive_exactly(sock, 38)
        server_nonce = greeting[6:]
        client_nonce = secrets.token_bytes(32)
        sock.sendall(client_nonce + sign(SECRET, b"client", server_nonce, client_nonce))
        reply = receive_exactly(sock, 33)
        server_future.result(timeout=TIMEOUT_S).close()

    assert greeting[:6] == b"MMOP/1"
    assert reply[:1] == b"\x01"
    assert reply[1:] == sign(SECRET, b"server", client_nonce, server_nonce)


def test_handshake_sends_rejection_byte(
    listener: socket.socket, pool: ThreadPoolExecutor
) -> None:
    server_future = pool.submit(accept_one, listener, SECRET)
    with socket.create_connection(("127.0.0.1", port_of(listener)), TIMEOUT_S) as sock:
        greeting = receive_exactly(sock, 38)
        client_nonce = secrets.token_bytes(32)
        proof = sign(OTHER_SECRET, b"client", greeting[6:], client_nonce)
        sock.sendall(client_nonce + proof)
        reply = sock.recv(16)
        end = sock.recv(16)

    assert reply == b"\x02"
    assert end == b""
    with pytest.raises(AuthenticationError):
        server_future.result(timeout=TIMEOUT_S)


def test_handshake_wrong_secret_fails_both_sides(
    listener: socket.socket, pool: ThreadPoolExecutor
) -> None:
    server_future = pool.submit(accept_one, listener, SECRET)

    with pytest.raises(
        AuthenticationError, match="rejected this side's cluster secret"
    ):
        connect("127.0.0.1", port_of(listener), OTHER_SECRET, TIMEOUT_S)
    with pytest.raises(AuthenticationError, match="give both sides the same secret"):
        server_future.result(timeout=TIMEOUT_S)


def test_handshake_rejects_other_version(
    listener: socket.socket, pool: ThreadPoolExecutor
) -> None:
    serve_once(listener, pool, lambda sock: sock.sendall(b"MMOP/2" + bytes(32)))

    with pytest.raises(ProtocolError) as raised:
        connect("127.0.0.1", port_of(listener), SECRET, TIMEOUT_S)

    assert "protocol version mismatch" in str(raised.value)
    assert "speaks MMOP/2" in str(raised.value)
    assert "this side speaks MMOP/1" in str(raised.value)


def test_handshake_rejects_non_mmop_server(
    listener: socket.socket, pool: ThreadPoolExecutor
) -> None:
    http_reply = b"HTTP/1.1 400 Bad Request\r\n\r\n"
    serve_once(listener, pool, lambda sock: sock.sendall(http_reply))

    with pytest.raises(ProtocolError, match="is not an MMOP server"):
        connect("127.0.0.1", port_of(listener), SECRET, TIMEOUT_S)


def test_handshake_rejects_forged_server_proof(
    listener: socket.socket, pool: ThreadPoolExecutor
) -> None:
    def accept_anyone(sock: socket.socket) -> None:
        sock.sendall(b"MMOP/1" + secrets.token_bytes(32))
        receive_exactly(sock, 64)
        sock.sendall(b"\x01" + secrets.token_bytes(32))

    serve_once(listener, pool, accept_anyone)

    with pytest.raises(AuthenticationError, match="did not prove"):
        connect("127.0.0.1", port_of(listener), SECRET, TIMEOUT_S)


def test_handshake_times_out_on_silent_server(
    listener: socket.socket, pool: ThreadPoolExecutor
) -> None:
    serve_once(listener, pool, lambda sock: None)

    with pytest.raises(ProtocolError, match="timed out after 0.2 s"):
        connect("127.0.0.1", port_of(listener), SECRET, SHORT_TIMEOUT_S)


def test_accept_times_out_on_silent_client(
    listener: socket.socket, pool: ThreadPoolExecutor
) -> None:
    def accept_quickly() -> Connection:
        sock, _ = listener.accept()
        return accept(sock, SECRET, SHORT_TIMEOUT_S)

    server_future = pool.submit(accept_quickly)
    address = ("127.0.0.1", port_of(listener))
    with (
        socket.create_connection(address, TIMEOUT_S),
        pytest.raises(ProtocolError, match="timed out"),
    ):
        server_future.result(timeout=TIMEOUT_S)


def test_accept_reports_client_leaving_early(
    listener: socket.socket, pool: ThreadPoolExecutor
) -> None:
    server_future = pool.submit(accept_one, listener, SECRET)
    with socket.create_connection(("127.0.0.1", port_of(listener)), TIMEOUT_S) as sock:
        receive_exactly(sock, 38)

    with pytest.raises(ConnectionClosedError, match="during the MMOP handshake"):
        server_future.result(timeout=TIMEOUT_S)


def test_connect_refused_names_master_address() -> None:
    with socket.create_server(("127.0.0.1", 0)) as unused:
        port = unused.getsockname()[1]

    with pytest.raises(ConnectionFailedError) as raised:
        connect("127.0.0.1", port, SECRET, TIMEOUT_S)

    assert f"connection to master at 127.0.0.1:{port} failed" in str(raised.value)
    assert "(connection refused)" in str(raised.value)
    assert "check that the master is running" in str(raised.value)


def test_connect_rejects_empty_secret() -> None:
    with pytest.raises(ValueError, match="cluster secret is empty"):
        connect("127.0.0.1", 1, b"", TIMEOUT_S)


def test_connect_rejects_text_secret() -> None:
    with pytest.raises(TypeError, match="must be bytes, got str"):
        connect("127.0.0.1", 1, "text-secret", TIMEOUT_S)  # type: ignore[arg-type]


def test_errors_never_show_secret(
    listener: socket.socket, pool: ThreadPoolExecutor
) -> None:
    server_future = pool.submit(accept_one, listener, SECRET)
    with pytest.raises(AuthenticationError) as client_raised:
        connect("127.0.0.1", port_of(listener), OTHER_SECRET, TIMEOUT_S)
    server_error = server_future.exception(timeout=TIMEOUT_S)
    with pytest.raises(TypeError) as type_raised:
        connect("127.0.0.1", 1, SECRET.decode(), TIMEOUT_S)  # type: ignore[arg-type]

    for error in [client_raised.value, server_error, type_raised.value]:
        assert error is not None
        texts = exception_texts(error)
        assert SECRET.decode() not in texts
        assert OTHER_SECRET.decode() not in texts
        assert SECRET.hex() not in texts


# -- Framing --------------------------------------------------------------


def test_receive_rejects_oversized_frame_early(
    listener: socket.socket, pool: ThreadPoolExecutor
) -> None:
    sock, server = open_raw_client(listener, pool, max_frame_bytes=1024)
    with sock, server:
        # Only the length goes out: waiting for the body would time out instead.
        sock.sendall(struct.pack(">I", 2048))

        with pytest.raises(ProtocolError, match="frame of 2048 bytes .* exceeds"):
            server.receive(timeout_s=TIMEOUT_S)
        assert server.is_closed


def test_receive_rejects_length_over_default_limit(
    raw_client: tuple[socket.socket, Connection],
) -> None:
    sock, server = raw_client
    sock.sendall(struct.pack(">I", MAX_FRAME_BYTES + 1))

    with pytest.raises(ProtocolError, match="exceeds the limit of 67108864 bytes"):
        server.receive(timeout_s=TIMEOUT_S)


def test_send_rejects_message_over_limit(
    listener: socket.socket, pool: ThreadPoolExecutor
) -> None:
    client, server = open_pair(listener, pool, {"max_frame_bytes": 1024})
    with client, server:
        too_large = StartNode(
            node_id="wordcount.map#1",
            node_type="wordcount.map",
            recipe=bytes(2048),
            complete=False,
        )
        with pytest.raises(ProtocolError, match="exceed the frame limit of 1024"):
            client.send(too_large)

        client.send(Ping(nonce=1))
        assert server.receive(timeout_s=TIMEOUT_S) == Ping(nonce=1)


def test_send_rejects_mistyped_field(
    connection_pair: tuple[Connection, Connection],
) -> None:
    client, server = connection_pair

    with pytest.raises(TypeError, match="field 'node_id' must be a string"):
        client.send(StopNode(node_id=5))  # type: ignore[arg-type]

    client.send(Ping(nonce=2))
    assert server.receive(timeout_s=TIMEOUT_S) == Ping(nonce=2)


START_NODE_BAD_BASE64 = (
    b'{"type": "START-NODE", "node_id": "a#1", "node_type": "a",'
    b' "recipe": "not base64!", "complete": false}'
)
HEARTBEAT_BAD_NODES = (
    b'{"type": "HEARTBEAT", "worker_id": "worker-1", "cpu_percent": 1.5,'
    b' "memory_bytes": 10, "nodes": [5]}'
)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        pytest.param(b"\xff\xfe", "the body is not UTF-8", id="not-utf8"),
        pytest.param(b"{not json", "the body is not valid JSON", id="invalid-json"),
        pytest.param(b"", "the body is not valid JSON", id="empty"),
        pytest.param(b"[1, 2]", "expected a JSON object, got an array", id="array"),
        pytest.param(b'"PING"', "expected a JSON object, got string", id="string"),
        pytest.param(b'{"nonce": 1}', "'type' field is missing", id="no-type"),
        pytest.param(b'{"type": 5}', "'type' field is missing", id="type-number"),
        pytest.param(
            b'{"type": "LAUNCH-ROCKET"}',
            "unknown message type 'LAUNCH-ROCKET'",
            id="unknown-type",
        ),
        pytest.param(
            b'{"type": "PING"}',
            "invalid PING message: missing field 'nonce'",
            id="missing-field",
        ),
        pytest.param(
            b'{"type": "PING", "nonce": "7"}',
            "invalid PING message: field 'nonce' must be an integer, got string '7'",
            id="mistyped-field",
        ),
        pytest.param(
            b'{"type": "PING", "nonce": true}',
            "field 'nonce' must be an integer, got boolean true",
            id="boolean-for-integer",
        ),
        pytest.param(
            b'{"type": "PING", "nonce": -1}',
            "invalid nonce=-1 for PING: nonce must be 0 or more",
            id="negative-nonce",
        ),
        pytest.param(
            b'{"type": "PING", "nonce": NaN}', "NaN is not a JSON number", id="nan"
        ),
        pytest.param(
            START_NODE_BAD_BASE64,
            "invalid START-NODE message: field 'recipe' is not valid base64",
            id="bad-base64",
        ),
        pytest.param(
            HEARTBEAT_BAD_NODES,
            "field 'nodes[0]' must be an object, got number 5",
            id="mistyped-item",
        ),
        pytest.param(
            b"[" * 100_000 + b"]" * 100_000,
            "the body is not valid JSON",
            id="deep-nesting",
        ),
    ],
)
def test_receive_rejects_malformed_frame(
    raw_client: tuple[socket.socket, Connection], payload: bytes, expected: str
) -> None:
    sock, server = raw_client
    sock.sendall(frame(payload) + frame(encode_message(Ping(nonce=3))))

    with pytest.raises(ProtocolError, match=re.escape(expected)) as raised:
        server.receive(timeout_s=TIMEOUT_S)

    assert not isinstance(raised.value, ConnectionClosedError)
    assert server.receive(timeout_s=TIMEOUT_S) == Ping(nonce=3)


def test_receive_ignores_unknown_extra_fields(
    raw_client: tuple[socket.socket, Connection],
) -> None:
    sock, server = raw_client
    sock.sendall(frame(b'{"type": "PING", "nonce": 4, "added_in_a_later_version": 1}'))

    assert server.receive(timeout_s=TIMEOUT_S) == Ping(nonce=4)


def test_receive_fills_missing_optional_fields(
    raw_client: tuple[socket.socket, Connection],
) -> None:
    sock, server = raw_client
    body = {
        "type": "READY",
        "hostname": "host-a",
        "pid": 7,
        "cores": 2,
        "memory_bytes": 1024,
    }
    sock.sendall(frame(json.dumps(body).encode()))

    received = server.receive(timeout_s=TIMEOUT_S)

    assert received == Ready(hostname="host-a", pid=7, cores=2, memory_bytes=1024)
    assert received.worker_id is None
    assert received.nodes == []


def test_receive_converts_integer_for_float_field(
    raw_client: tuple[socket.socket, Connection],
) -> None:
    sock, server = raw_client
    sock.sendall(frame(b'{"type": "SHUTDOWN", "drain_timeout_s": 30}'))

    received = server.receive(timeout_s=TIMEOUT_S)

    assert received == Shutdown(drain_timeout_s=30.0)
    assert type(received.drain_timeout_s) is float


@pytest.mark.parametrize("split_at", [2, 6, 20])
def test_receive_timeout_mid_frame_keeps_sync(
    raw_client: tuple[socket.socket, Connection], split_at: int
) -> None:
    sock, server = raw_client
    data = frame(encode_message(Ping(nonce=42)))

    sock.sendall(data[:split_at])
    with pytest.raises(TimeoutError, match="no whole message"):
        server.receive(timeout_s=SHORT_TIMEOUT_S)
    sock.sendall(data[split_at:] + frame(encode_message(Ping(nonce=43))))

    assert server.receive(timeout_s=TIMEOUT_S) == Ping(nonce=42)
    assert server.receive(timeout_s=TIMEOUT_S) == Ping(nonce=43)


def test_receive_returns_frames_sent_together(
    raw_client: tuple[socket.socket, Connection],
) -> None:
    sock, server = raw_client
    sock.sendall(b"".join(frame(encode_message(Ping(nonce=n))) for n in range(5)))

    received = [server.receive(timeout_s=TIMEOUT_S) for _ in range(5)]

    assert received == [Ping(nonce=n) for n in range(5)]


def test_receive_raises_closed_on_peer_close(
    connection_pair: tuple[Connection, Connection],
) -> None:
    client, server = connection_pair
    client.close()

    with pytest.raises(ConnectionClosedError, match="closed the connection"):
        server.receive(timeout_s=TIMEOUT_S)
    assert server.is_closed


def test_receive_raises_closed_mid_frame(
    raw_client: tuple[socket.socket, Connection],
) -> None:
    sock, server = raw_client
    sock.sendall(frame(encode_message(Ping(nonce=5)))[:7])
    sock.shutdown(socket.SHUT_WR)

    with pytest.raises(ConnectionClosedError, match="in the middle of a frame"):
        server.receive(timeout_s=TIMEOUT_S)


def test_close_wakes_blocked_receiver(
    connection_pair: tuple[Connection, Connection], pool: ThreadPoolExecutor
) -> None:
    _, server = connection_pair
    # Long but finite, so that a broken close fails the test instead of hanging.
    receive_future = pool.submit(server.receive, 6 * TIMEOUT_S)
    wait_for(
        lambda: server._receive_lock.locked(),
        timeout_s=TIMEOUT_S,
        what="the receiving thread to block",
    )

    server.close()

    with pytest.raises(ConnectionClosedError):
        receive_future.result(timeout=TIMEOUT_S)


def test_send_after_close_raises_closed(
    connection_pair: tuple[Connection, Connection],
) -> None:
    client, _ = connection_pair
    client.close()

    with pytest.raises(ConnectionClosedError, match="is closed"):
        client.send(Ping(nonce=6))


def test_send_times_out_when_peer_stalls(
    listener: socket.socket, pool: ThreadPoolExecutor
) -> None:
    client, server = open_pair(
        listener, pool, {"send_timeout_s": SHORT_TIMEOUT_S, "max_frame_bytes": 2**23}
    )
    large = Rejected(reason="x" * 2**22)

    # The server never reads, so the socket buffers fill after a few sends.
    with client, server, pytest.raises(ConnectionClosedError) as raised:
        for _ in range(200):
            client.send(large)

    assert "the peer accepted no bytes for 0.2 s" in str(raised.value)
    assert client.is_closed


def test_connection_context_manager_closes(
    listener: socket.socket, pool: ThreadPoolExecutor
) -> None:
    client, server = open_pair(listener, pool)
    with client, server:
        assert not client.is_closed

    assert client.is_closed
    assert server.is_closed


def test_send_from_threads_keeps_frames_whole(
    connection_pair: tuple[Connection, Connection],
) -> None:
    client, server = connection_pair
    # Large messages make interleaved partial writes likely if the lock failed.
    padding = "x" * 200_000

    def send_batch(first_nonce: int) -> None:
        for nonce in range(first_nonce, first_nonce + 25):
            client.send(Rejected(reason=f"{nonce} {padding}"))

    threads = [threading.Thread(target=send_batch, args=(n * 100,)) for n in range(4)]
    for thread in threads:
        thread.start()
    received = [server.receive(timeout_s=TIMEOUT_S) for _ in range(100)]
    for thread in threads:
        thread.join(timeout=TIMEOUT_S)

    nonces = sorted(int(message.reason.split()[0]) for message in received)
    assert nonces == sorted(n * 100 + i for n in range(4) for i in range(25))


def test_logging_shows_type_only_at_debug(
    connection_pair: tuple[Connection, Connection],
    caplog: pytest.LogCaptureFixture,
) -> None:
    client, server = connection_pair
    caplog.set_level(logging.DEBUG, logger="engine.protocol")
    message = StartNode(
        node_id="wordcount.map#3",
        node_type="wordcount.map",
        recipe=b"recipe-body-must-not-be-logged",
        complete=False,
    )

    client.send(message)
    server.receive(timeout_s=TIMEOUT_S)

    records = [r for r in caplog.records if r.name == "engine.protocol"]
    text = "\n".join(record.getMessage() for record in records)
    assert [r.levelno for r in records] == [logging.DEBUG, logging.DEBUG]
    assert "sent START-NODE" in text
    assert "received START-NODE" in text
    assert base64.b64encode(message.recipe).decode() not in text
    assert "recipe-body" not in text
    assert SECRET.decode() not in text


# -- Fuzzing --------------------------------------------------------------


def random_garbage(rng: random.Random) -> bytes:
    """Build bytes that look more or less like frames."""
    parts = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(3)
        if kind == 0:
            parts.append(rng.randbytes(rng.randint(0, 64)))
        elif kind == 1:
            parts.append(frame(rng.randbytes(rng.randint(0, 64))))
        else:
            body = bytearray(encode_message(rng.choice(EXAMPLES)))
            for _ in range(rng.randint(1, 3)):
                body[rng.randrange(len(body))] = rng.randrange(256)
            parts.append(frame(bytes(body)))
    return b"".join(parts)


def test_receive_survives_random_bytes(
    listener: socket.socket, pool: ThreadPoolExecutor
) -> None:
    rng = random.Random(1729)
    for _ in range(60):
        sock, server = open_raw_client(listener, pool)
        with sock, server:
            with contextlib.suppress(OSError):
                sock.sendall(random_garbage(rng))
                sock.shutdown(socket.SHUT_WR)

            # Any exception but ProtocolError escapes and fails the test.
            receive_until_closed(server)

        assert server.is_closed


def random_json_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(8 if depth < 2 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 7, 2**31, -(2**63), 10**30])
    if kind == 3:
        return rng.choice([0.0, -2.5, 1e308, float("nan"), float("inf")])
    if kind == 4:
        return rng.choice(["", "worker-1", "wordcount.map#2", "\u00e9\u4e2d", "!!"])
    if kind == 5:
        return base64.b64encode(rng.randbytes(8)).decode()
    if kind == 6:
        return [random_json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {
        rng.choice(["a", "node_id", "pid"]): random_json_value(rng, depth + 1)
        for _ in range(rng.randint(0, 3))
    }


def random_message_body(rng: random.Random) -> dict[str, Any]:
    """Take a valid message body and drop or replace some of its fields."""
    body = json.loads(encode_message(rng.choice(EXAMPLES)))
    for name in list(body):
        if name == "type" and rng.random() < 0.9:
            continue
        roll = rng.random()
        if roll < 0.15:
            del body[name]
        elif roll < 0.45:
            body[name] = random_json_value(rng)
    if rng.random() < 0.2:
        body[rng.choice(["extra", "nodes", "count"])] = random_json_value(rng)
    return body


def test_receive_survives_random_json_messages(
    raw_client: tuple[socket.socket, Connection],
) -> None:
    sock, server = raw_client
    rng = random.Random(4104)
    accepted = 0
    rejected = 0

    for _ in range(400):
        sock.sendall(frame(json.dumps(random_message_body(rng)).encode()))
        try:
            server.receive(timeout_s=TIMEOUT_S)
            accepted += 1
        except ConnectionClosedError:
            raise
        except ProtocolError:
            rejected += 1

    assert accepted > 0
    assert rejected > 0
    assert not server.is_closed


def test_start_node_without_resume_defaults_false() -> None:
    body = json.loads(encode_message(EXAMPLES[12]))
    del body["resume"]

    message = decode_message(json.dumps(body).encode())

    assert isinstance(message, StartNode)
    assert message.resume is False
