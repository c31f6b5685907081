"""MMOP, the control protocol between the master, the workers and clients.

MMOP carries control messages only (start this node, this worker is alive,
this task is complete). Data items never travel over it: they move through
the data stream. A connection starts with a mutual HMAC-SHA256 handshake
over a shared cluster secret. After that it carries frames, each a 4-byte
big-endian length and a UTF-8 JSON object whose "type" field names the
message, so decoding a frame never runs code.

Each message is a frozen, slotted dataclass registered under its wire name,
which one rule derives from the class name: `StartNodeRequest` travels as
`START-NODE-REQUEST`. `docs/mmop.md` is the specification: the handshake
byte by byte, every message, and the conversations between the peers.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import selectors
import socket
import struct
import threading
import time
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

from engine.errors import AuthenticationError, ProtocolError

__all__ = [
    "HANDSHAKE_TIMEOUT_S",
    "MAX_FRAME_BYTES",
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "SEND_TIMEOUT_S",
    "CompleteType",
    "Connection",
    "ConnectionClosedError",
    "ConnectionFailedError",
    "Heartbeat",
    "Message",
    "NodeCompleted",
    "NodeExited",
    "NodeFailed",
    "NodeStartFailed",
    "NodeStarted",
    "NodeStopped",
    "Ping",
    "Pong",
    "Ready",
    "RecipeInfo",
    "RecipeInfoRequest",
    "Rejected",
    "Shutdown",
    "StartNode",
    "StartNodeRequest",
    "StartNodeRequestFailed",
    "StartNodeRequestSucceeded",
    "StopNode",
    "StopWorkerRequest",
    "StopWorkerRequestFailed",
    "StopWorkerRequestSucceeded",
    "Welcome",
    "WorkerInfo",
    "WorkerInfoRequest",
    "WorkerStopping",
    "accept",
    "connect",
    "decode_message",
    "encode_message",
    "wire_name",
]

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = "MMOP/1"
# Default size limit of one frame's JSON body, in bytes.
MAX_FRAME_BYTES = 64 * 1024 * 1024
# Default time that `connect` and `accept` allow for the whole handshake, in
# seconds.
HANDSHAKE_TIMEOUT_S = 10.0
# Default maximum time that `Connection.send` waits for the peer to accept
# more bytes, in seconds.
SEND_TIMEOUT_S = 30.0

# The magic is always six ASCII bytes, so that any version can read another
# version's greeting and reject it by name.
_MAGIC = PROTOCOL_VERSION.encode("ascii")
_MAGIC_PREFIX = b"MMOP/"
_NONCE_BYTES = 32
_PROOF_BYTES = hashlib.sha256().digest_size
_ACCEPTED = b"\x01"
_REJECTED = b"\x02"
_LENGTH = struct.Struct(">I")
_MAX_LENGTH = 2**32 - 1
_RECEIVE_CHUNK_BYTES = 64 * 1024
_REPR_LIMIT = 60


class ConnectionClosedError(ProtocolError):
    """The MMOP connection is closed: the peer left, or this side closed it."""


class ConnectionFailedError(ProtocolError):
    """A TCP connection to the master could not be opened."""


# -- Messages -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    """Base of every MMOP message.

    Each subclass is a frozen, slotted dataclass that `_register` adds to
    `MESSAGE_TYPES` under its wire name.
    """


class _FieldSpec(NamedTuple):
    name: str
    annotation: Any
    is_required: bool


_SCALAR_TYPES = (str, int, float, bool, bytes)
_REGISTRY: dict[str, type[Message]] = {}
_FIELD_SPECS: dict[type[Message], tuple[_FieldSpec, ...]] = {}
# Read-only view of the registry: wire name to message class.
MESSAGE_TYPES: Mapping[str, type[Message]] = types.MappingProxyType(_REGISTRY)

_WORD_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_M = TypeVar("_M", bound=Message)


def wire_name(cls_or_message: type[Message] | Message) -> str:
    """Return the wire name of a message class or message.

    The rule splits the CamelCase class name before each upper-case letter
    that follows a lower-case letter or a digit, joins the words with hyphens
    and upper-cases them: `NodeStarted` is `NODE-STARTED`.
    Raises TypeError for anything but a `Message` subclass or instance.
    """
    is_class = isinstance(cls_or_message, type)
    cls = cls_or_message if is_class else type(cls_or_message)
    if not issubclass(cls, Message):
        raise TypeError(
            f"expected an MMOP message class or message, got {cls.__name__}"
        )
    return _wire_name_of(cls.__name__)


@functools.cache
def _wire_name_of(class_name: str) -> str:
    return _WORD_BOUNDARY.sub("-", class_name).upper()


def _register(cls: type[_M]) -> type[_M]:
    """Add a message dataclass to `MESSAGE_TYPES` under its wire name."""
    name = wire_name(cls)
    if name in _REGISTRY:
        raise TypeError(f"two MMOP message classes share the wire name {name!r}")

    hints = typing.get_type_hints(cls)
    specs = []
    for dataclass_field in dataclasses.fields(cls):
        name_in_class = dataclass_field.name
        if name_in_class == "type":
            raise TypeError(f"{cls.__name__}: the field name 'type' is reserved")
        _check_annotation(hints[name_in_class], f"{cls.__name__}.{name_in_class}")
        is_required = (
            dataclass_field.default is dataclasses.MISSING
            and dataclass_field.default_factory is dataclasses.MISSING
        )
        specs.append(_FieldSpec(name_in_class, hints[name_in_class], is_required))

    _REGISTRY[name] = cls
    _FIELD_SPECS[cls] = tuple(specs)
    return cls


def _check_annotation(annotation: Any, where: str) -> None:
    """Raise TypeError unless the protocol can check and encode the annotation."""
    if annotation is Any or annotation in _SCALAR_TYPES or annotation in (list, dict):
        return
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType):
        if len(args) == 2 and type(None) in args:
            _check_annotation(_without_none(annotation), where)
            return
    elif typing.get_origin(annotation) is list and len(args) == 1:
        _check_annotation(args[0], where)
        return
    elif typing.get_origin(annotation) is dict and len(args) == 2 and args[0] is str:
        _check_annotation(args[1], where)
        return
    raise TypeError(f"{where}: MMOP fields cannot have the type {annotation!r}")


def _without_none(annotation: types.UnionType) -> Any:
    return next(arg for arg in typing.get_args(annotation) if arg is not type(None))


def _require_at_least(message: Message, name: str, minimum: int) -> None:
    value = getattr(message, name)
    # `not >=` so that NaN fails the check too.
    if not value >= minimum:
        raise ValueError(
            f"invalid {name}={value!r} for {wire_name(message)}: "
            f"{name} must be {minimum} or more"
        )


def _require_more_than_zero(message: Message, name: str) -> None:
    value = getattr(message, name)
    if not value > 0:
        raise ValueError(
            f"invalid {name}={value!r} for {wire_name(message)}: "
            f"{name} must be more than 0"
        )


def _require_ids(message: Message, *names: str) -> None:
    for name in names:
        if getattr(message, name) == "":
            raise ValueError(
                f"invalid {name}='' for {wire_name(message)}: {name} must not be empty"
            )


# Worker to master.


@_register
@dataclass(frozen=True, slots=True)
class Ready(Message):
    """A worker registers with the master, or registers again after a restart."""

    hostname: str
    pid: int
    cores: int
    memory_bytes: int
    # Set only when the worker reconnects after the master restarted.
    worker_id: str | None = None
    # One dict per running node (node_id, node_type, pid, state), set on reconnect.
    nodes: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        _require_ids(self, "hostname", "worker_id")
        _require_at_least(self, "pid", 1)
        _require_at_least(self, "cores", 1)
        _require_at_least(self, "memory_bytes", 0)


@_register
@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    """A worker's periodic sign of life, with its stats and each node's stats."""

    worker_id: str
    # Percent, with no upper bound: per-process figures summed over several
    # cores pass 100.
    cpu_percent: float
    memory_bytes: int
    # One dict per node: node_id, node_type, pid, state, items_in, items_out,
    # failures, restarts, cpu_percent, memory_bytes.
    nodes: list[dict[str, Any]]

    def __post_init__(self) -> None:
        _require_ids(self, "worker_id")
        _require_at_least(self, "cpu_percent", 0)
        _require_at_least(self, "memory_bytes", 0)


@_register
@dataclass(frozen=True, slots=True)
class NodeStarted(Message):
    """A worker started a node process."""

    worker_id: str
    node_id: str
    node_type: str
    pid: int

    def __post_init__(self) -> None:
        _require_ids(self, "worker_id", "node_id", "node_type")
        _require_at_least(self, "pid", 1)


@_register
@dataclass(frozen=True, slots=True)
class NodeStartFailed(Message):
    """A worker could not start a node process."""

    worker_id: str
    node_id: str
    node_type: str
    reason: str

    def __post_init__(self) -> None:
        _require_ids(self, "worker_id", "node_id", "node_type")


@_register
@dataclass(frozen=True, slots=True)
class NodeExited(Message):
    """A node process ended without being asked to, by an exit code or a signal."""

    worker_id: str
    node_id: str
    node_type: str
    # Exactly one of exit_code and signal is set: the exit status of a process
    # that exited, or the number of the signal that killed it.
    exit_code: int | None
    signal: int | None
    will_restart: bool
    restart_in_s: float

    def __post_init__(self) -> None:
        _require_ids(self, "worker_id", "node_id", "node_type")
        _require_at_least(self, "restart_in_s", 0)
        if (self.exit_code is None) == (self.signal is None):
            raise ValueError(
                f"invalid exit_code={self.exit_code!r} and signal={self.signal!r} "
                "for NODE-EXITED: exactly one of them must be set"
            )


@_register
@dataclass(frozen=True, slots=True)
class NodeCompleted(Message):
    """A node finished its task: its source is exhausted, or its input drained."""

    worker_id: str
    node_id: str
    node_type: str
    stats: dict[str, Any]

    def __post_init__(self) -> None:
        _require_ids(self, "worker_id", "node_id", "node_type")


@_register
@dataclass(frozen=True, slots=True)
class NodeStopped(Message):
    """A node stopped on request after draining its current batch."""

    worker_id: str
    node_id: str
    node_type: str
    stats: dict[str, Any]

    def __post_init__(self) -> None:
        _require_ids(self, "worker_id", "node_id", "node_type")


@_register
@dataclass(frozen=True, slots=True)
class NodeFailed(Message):
    """A worker gave up on a node: restart budget spent, or recipe unusable."""

    worker_id: str
    node_id: str
    node_type: str
    reason: str
    stats: dict[str, Any]

    def __post_init__(self) -> None:
        _require_ids(self, "worker_id", "node_id", "node_type")


@_register
@dataclass(frozen=True, slots=True)
class WorkerStopping(Message):
    """A worker is shutting down and will drain its nodes."""

    worker_id: str
    reason: str

    def __post_init__(self) -> None:
        _require_ids(self, "worker_id")


@_register
@dataclass(frozen=True, slots=True)
class Pong(Message):
    """The reply to `Ping`, carrying its nonce back."""

    nonce: int

    def __post_init__(self) -> None:
        _require_at_least(self, "nonce", 0)


# Master to worker.


@_register
@dataclass(frozen=True, slots=True)
class Welcome(Message):
    """The master's reply to `Ready`: the worker's id and the data stream to use."""

    worker_id: str
    # May contain the broker's password, so never log it whole.
    stream_url: str
    heartbeat_interval_s: float

    def __post_init__(self) -> None:
        _require_ids(self, "worker_id", "stream_url")
        _require_more_than_zero(self, "heartbeat_interval_s")


@_register
@dataclass(frozen=True, slots=True)
class StartNode(Message):
    """A command to a worker: start one node process from a recipe."""

    node_id: str
    node_type: str
    # cloudpickle bytes, sent as base64 and kept out of repr and logs.
    recipe: bytes = field(repr=False)
    # True when the node type is already completing: drain, then finish.
    complete: bool
    # True when a process of this node started before, on a worker since lost
    # or in the run that this one resumes: a source then resumes after the
    # items the stream records as published.
    resume: bool = False

    def __post_init__(self) -> None:
        _require_ids(self, "node_id", "node_type")


@_register
@dataclass(frozen=True, slots=True)
class StopNode(Message):
    """A command to a worker: drain one node, then stop it."""

    node_id: str

    def __post_init__(self) -> None:
        _require_ids(self, "node_id")


@_register
@dataclass(frozen=True, slots=True)
class CompleteType(Message):
    """Every upstream of a node type is done: its nodes finish once drained."""

    node_type: str

    def __post_init__(self) -> None:
        _require_ids(self, "node_type")


@_register
@dataclass(frozen=True, slots=True)
class Shutdown(Message):
    """A command to a worker: drain every node, then exit."""

    drain_timeout_s: float

    def __post_init__(self) -> None:
        _require_at_least(self, "drain_timeout_s", 0)


@_register
@dataclass(frozen=True, slots=True)
class Ping(Message):
    """A liveness probe, to which the worker replies with `Pong` and the same nonce."""

    nonce: int

    def __post_init__(self) -> None:
        _require_at_least(self, "nonce", 0)


# Client to master, and the replies.


@_register
@dataclass(frozen=True, slots=True)
class StartNodeRequest(Message):
    """A client asks the master to start more nodes of a type."""

    node_type: str
    count: int = 1

    def __post_init__(self) -> None:
        _require_ids(self, "node_type")
        _require_at_least(self, "count", 1)


@_register
@dataclass(frozen=True, slots=True)
class StartNodeRequestSucceeded(Message):
    """The ids of the started nodes, in start order."""

    node_ids: list[str]


@_register
@dataclass(frozen=True, slots=True)
class StartNodeRequestFailed(Message):
    """The master could not start the requested nodes."""

    reason: str


@_register
@dataclass(frozen=True, slots=True)
class StopWorkerRequest(Message):
    """A client asks the master to shut a worker down."""

    worker_id: str

    def __post_init__(self) -> None:
        _require_ids(self, "worker_id")


@_register
@dataclass(frozen=True, slots=True)
class StopWorkerRequestSucceeded(Message):
    """The master sent `Shutdown` to the worker."""

    worker_id: str

    def __post_init__(self) -> None:
        _require_ids(self, "worker_id")


@_register
@dataclass(frozen=True, slots=True)
class StopWorkerRequestFailed(Message):
    """The master could not stop the worker."""

    reason: str


@_register
@dataclass(frozen=True, slots=True)
class RecipeInfoRequest(Message):
    """A client asks for the node counts of every node type."""


@_register
@dataclass(frozen=True, slots=True)
class RecipeInfo(Message):
    """Node counts per node type: queued, running, completed and failed."""

    types: dict[str, dict[str, int]]


@_register
@dataclass(frozen=True, slots=True)
class WorkerInfoRequest(Message):
    """A client asks for the state of every worker."""


@_register
@dataclass(frozen=True, slots=True)
class WorkerInfo(Message):
    """Per worker id: its host, its state and its node ids by node type."""

    workers: dict[str, dict[str, Any]]


@_register
@dataclass(frozen=True, slots=True)
class Rejected(Message):
    """A reply to a message that the receiver cannot take, with the reason."""

    reason: str


# -- Encoding -------------------------------------------------------------


class _FieldError(Exception):
    """A field value that does not match its annotation."""

    def __init__(self, text: str, path: str):
        super().__init__(text)
        # The field, or the item inside it, that failed: "nodes[2]".
        self.path = path


def encode_message(message: Message) -> bytes:
    """Encode a message as the UTF-8 JSON body of a frame, without the length.

    Raises TypeError when a field does not match its annotation, and
    ValueError when a value cannot be JSON (NaN, infinity, deep nesting).
    """
    specs = _FIELD_SPECS.get(type(message))
    if specs is None:
        raise TypeError(f"not a registered MMOP message: {type(message).__name__}")
    name = wire_name(message)

    body: dict[str, Any] = {"type": name}
    for spec in specs:
        value = getattr(message, spec.name)
        try:
            body[spec.name] = _convert(
                value, spec.annotation, spec.name, is_encoding=True
            )
        except _FieldError as exc:
            raise TypeError(f"cannot encode {name}: {exc}") from None

    try:
        text = json.dumps(body, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"cannot encode {name} as JSON: {exc}") from exc
    return text.encode("utf-8")


def decode_message(payload: bytes) -> Message:
    """Decode the JSON body of a frame into a message.

    Only JSON is parsed, so a payload can never run code. Fields that the
    message class does not declare are ignored, so that a newer peer may add
    optional fields. Raises ProtocolError naming the message and the field
    for invalid JSON, an unknown type, or a missing or mistyped field.
    """
    body = _parse_json_object(payload)
    name = body.get("type")
    if not isinstance(name, str):
        raise ProtocolError(
            "invalid message: the 'type' field is missing or not a string"
        )
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ProtocolError(
            f"unknown message type {_short_repr(name)}; this side speaks "
            f"{PROTOCOL_VERSION} and knows the types listed in docs/mmop.md"
        )

    values: dict[str, Any] = {}
    for spec in _FIELD_SPECS[cls]:
        if spec.name not in body:
            if spec.is_required:
                raise ProtocolError(
                    f"invalid {name} message: missing field {spec.name!r}"
                )
            continue
        try:
            values[spec.name] = _convert(
                body[spec.name], spec.annotation, spec.name, is_encoding=False
            )
        except _FieldError as exc:
            raise ProtocolError(f"invalid {name} message: {exc}") from None

    try:
        return cls(**values)
    except ValueError as exc:
        # The checks in __post_init__ name the message and the field already.
        raise ProtocolError(str(exc)) from exc
    except TypeError as exc:
        raise ProtocolError(f"invalid {name} message: {exc}") from exc


def _parse_json_object(payload: bytes) -> dict[str, Any]:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"invalid frame: the body is not UTF-8 ({exc})") from None
    try:
        body = json.loads(text, parse_constant=_reject_json_constant)
    except (ValueError, RecursionError) as exc:
        reason = str(exc) or "nested too deeply"
        raise ProtocolError(
            f"invalid frame: the body is not valid JSON ({reason})"
        ) from None
    if not isinstance(body, dict):
        raise ProtocolError(
            f"invalid frame: expected a JSON object, got {_describe(body)}"
        )
    return body


def _reject_json_constant(constant: str) -> None:
    raise ValueError(f"{constant} is not a JSON number")


def _convert(value: Any, annotation: Any, path: str, *, is_encoding: bool) -> Any:
    """Check a field value against its annotation and convert it for the wire.

    Encoding turns bytes into base64 text; decoding turns it back, and turns
    JSON integers in float fields into floats. Raises _FieldError.
    """
    if annotation is Any:
        return value

    if isinstance(annotation, types.UnionType):
        if value is None:
            return None
        try:
            return _convert(
                value, _without_none(annotation), path, is_encoding=is_encoding
            )
        except _FieldError as exc:
            if exc.path != path:
                raise
            raise _mistyped(path, annotation, value) from None

    origin = typing.get_origin(annotation) or annotation
    args = typing.get_args(annotation)
    if origin is list:
        if type(value) is not list:
            raise _mistyped(path, annotation, value)
        if not args:
            return value
        return [
            _convert(item, args[0], f"{path}[{index}]", is_encoding=is_encoding)
            for index, item in enumerate(value)
        ]
    if origin is dict:
        return _convert_dict(value, annotation, path, is_encoding=is_encoding)
    return _convert_scalar(value, annotation, path, is_encoding=is_encoding)


def _convert_dict(value: Any, annotation: Any, path: str, *, is_encoding: bool) -> Any:
    if type(value) is not dict:
        raise _mistyped(path, annotation, value)
    args = typing.get_args(annotation)
    converted = {}
    for key, item in value.items():
        # json.dumps would turn other keys into strings and break the round trip.
        if not isinstance(key, str):
            raise _FieldError(
                f"field {path!r} must have string keys, got {_describe(key)}", path
            )
        item_path = f"{path}[{_shorten(json.dumps(key))}]"
        converted[key] = (
            _convert(item, args[1], item_path, is_encoding=is_encoding)
            if args
            else item
        )
    return converted


def _convert_scalar(
    value: Any, annotation: Any, path: str, *, is_encoding: bool
) -> Any:
    if annotation is bool:
        if type(value) is bool:
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
    elif annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
            if math.isfinite(number):
                return number
            raise _FieldError(
                f"field {path!r} must be a finite number, got {_describe(value)}", path
            )
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif annotation is bytes:
        if is_encoding and isinstance(value, bytes):
            return base64.b64encode(value).decode("ascii")
        if not is_encoding and isinstance(value, str):
            try:
                return base64.b64decode(value, validate=True)
            except ValueError as exc:
                raise _FieldError(
                    f"field {path!r} is not valid base64 ({exc})", path
                ) from None
    raise _mistyped(path, annotation, value)


def _mistyped(path: str, annotation: Any, value: Any) -> _FieldError:
    return _FieldError(
        f"field {path!r} must be {_expected_text(annotation)}, got {_describe(value)}",
        path,
    )


def _expected_text(annotation: Any) -> str:
    if isinstance(annotation, types.UnionType):
        return f"{_expected_text(_without_none(annotation))} or null"
    origin = typing.get_origin(annotation) or annotation
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        bytes: "bytes (base64 text on the wire)",
        list: "an array",
        dict: "an object",
    }
    return names.get(origin, repr(annotation))


def _describe(value: Any) -> str:
    """Describe a value by its JSON type and a short repr, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"number {_short_repr(value)}"
    if isinstance(value, str):
        return f"string {_short_repr(value)}"
    if isinstance(value, list):
        return f"an array of {len(value)} items"
    if isinstance(value, dict):
        return f"an object with {len(value)} keys"
    return type(value).__name__


def _short_repr(value: Any) -> str:
    try:
        text = repr(value)
    except ValueError:
        # repr of an int with more than 4300 digits raises ValueError.
        return f"<{type(value).__name__} too long to show>"
    return _shorten(text)


def _shorten(text: str) -> str:
    if len(text) <= _REPR_LIMIT:
        return text
    return text[: _REPR_LIMIT - 3] + "..."


# -- Handshake ------------------------------------------------------------


def _check_secret(secret: bytes) -> None:
    # The messages name the type only: the value must never reach a log.
    if not isinstance(secret, bytes):
        raise TypeError(
            f"the cluster secret must be bytes, got {type(secret).__name__}"
        )
    if not secret:
        raise ValueError(
            "the cluster secret is empty; give both sides the same non-empty secret"
        )


def _check_connection_settings(max_frame_bytes: int, send_timeout_s: float) -> None:
    if not 1 <= max_frame_bytes <= _MAX_LENGTH:
        raise ValueError(
            f"invalid max_frame_bytes={max_frame_bytes!r}: it must be between 1 "
            f"and {_MAX_LENGTH}, the largest length that 4 bytes can carry"
        )
    if not send_timeout_s > 0:
        raise ValueError(
            f"invalid send_timeout_s={send_timeout_s!r}: it must be more than 0"
        )


def _proof(
    secret: bytes, role: bytes, first_nonce: bytes, second_nonce: bytes
) -> bytes:
    return hmac.new(secret, role + first_nonce + second_nonce, hashlib.sha256).digest()


def _format_address(host: str, port: int) -> str:
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


class _HandshakeChannel:
    """Exact-size reads and writes on a blocking socket, under one deadline.

    Every failure becomes a ProtocolError that names the peer.
    """

    def __init__(self, sock: socket.socket, peer_label: str, timeout_s: float):
        self.sock = sock
        self.peer_label = peer_label
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s

    def send(self, data: bytes) -> None:
        with self._translated_errors():
            self._set_remaining_timeout()
            self.sock.sendall(data)

    def receive_exactly(self, count: int) -> bytes:
        received = bytearray()
        with self._translated_errors():
            # Each pass reads at least one byte, or raises at the deadline or EOF.
            while len(received) < count:
                self._set_remaining_timeout()
                chunk = self.sock.recv(count - len(received))
                if not chunk:
                    raise ConnectionClosedError(
                        f"the {self.peer_label} closed the connection "
                        "during the MMOP handshake"
                    )
                received += chunk
        return bytes(received)

    def _set_remaining_timeout(self) -> None:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        self.sock.settimeout(remaining)

    @contextlib.contextmanager
    def _translated_errors(self) -> typing.Iterator[None]:
        try:
            yield
        except TimeoutError as exc:
            raise ProtocolError(
                f"MMOP handshake with the {self.peer_label} timed out after "
                f"{self.timeout_s} s; check that both sides run {PROTOCOL_VERSION} "
                "at this address"
            ) from exc
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise ConnectionClosedError(
                f"connection to the {self.peer_label} failed during the MMOP "
                f"handshake ({reason})"
            ) from exc


def _run_server_handshake(channel: _HandshakeChannel, secret: bytes) -> None:
    server_nonce = secrets.token_bytes(_NONCE_BYTES)
    channel.send(_MAGIC + server_nonce)

    reply = channel.receive_exactly(_NONCE_BYTES + _PROOF_BYTES)
    client_nonce = reply[:_NONCE_BYTES]
    client_proof = reply[_NONCE_BYTES:]
    expected = _proof(secret, b"client", server_nonce, client_nonce)
    if not hmac.compare_digest(client_proof, expected):
        # Tell the client before closing, so that it reports a wrong secret
        # instead of a reset connection.
        with contextlib.suppress(ProtocolError):
            channel.send(_REJECTED)
        raise AuthenticationError(
            f"authentication failed: the cluster secret of the {channel.peer_label} "
            "differs from this side's; give both sides the same secret"
        )

    channel.send(_ACCEPTED + _proof(secret, b"server", client_nonce, server_nonce))


def _run_client_handshake(channel: _HandshakeChannel, secret: bytes) -> None:
    _check_magic(channel.receive_exactly(len(_MAGIC)), channel.peer_label)
    server_nonce = channel.receive_exactly(_NONCE_BYTES)

    client_nonce = secrets.token_bytes(_NONCE_BYTES)
    channel.send(client_nonce + _proof(secret, b"client", server_nonce, client_nonce))

    verdict = channel.receive_exactly(1)
    if verdict == _REJECTED:
        raise AuthenticationError(
            f"authentication failed: the {channel.peer_label} rejected this side's "
            "cluster secret; give both sides the same secret"
        )
    if verdict != _ACCEPTED:
        raise ProtocolError(
            f"invalid MMOP handshake reply {verdict!r} from the {channel.peer_label}"
        )

    server_proof = channel.receive_exactly(_PROOF_BYTES)
    expected = _proof(secret, b"server", client_nonce, server_nonce)
    if not hmac.compare_digest(server_proof, expected):
        raise AuthenticationError(
            f"authentication failed: the {channel.peer_label} did not prove that it "
            "holds the cluster secret; check that the address belongs to your master"
        )


def _check_magic(magic: bytes, peer_label: str) -> None:
    if magic == _MAGIC:
        return
    if magic.startswith(_MAGIC_PREFIX):
        version = magic.decode("ascii", errors="backslashreplace")
        raise ProtocolError(
            f"protocol version mismatch: the {peer_label} speaks {version}, "
            f"this side speaks {PROTOCOL_VERSION}; run the same Monomyth version "
            "on both sides"
        )
    raise ProtocolError(
        f"the {peer_label} is not an MMOP server: its greeting starts with "
        f"{magic!r}; check the address and port"
    )


def connect(
    host: str,
    port: int,
    secret: bytes,
    timeout_s: float = HANDSHAKE_TIMEOUT_S,
    *,
    max_frame_bytes: int = MAX_FRAME_BYTES,
    send_timeout_s: float = SEND_TIMEOUT_S,
) -> Connection:
    """Open an authenticated MMOP connection to the master at host:port.

    Workers and clients call this. `timeout_s` bounds the TCP connect and,
    separately, the handshake. `max_frame_bytes` and `send_timeout_s` go to
    the `Connection`.

    Raises ConnectionFailedError when no TCP connection can be opened, and
    AuthenticationError when the two sides hold different secrets. Raises
    ConnectionClosedError when the master drops the connection during the
    handshake. Raises ProtocolError for a wrong version, for a peer that is
    not an MMOP master, and for a handshake that timed out.
    """
    _check_secret(secret)
    _check_connection_settings(max_frame_bytes, send_timeout_s)
    address = _format_address(host, port)
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except ConnectionRefusedError as exc:
        raise ConnectionFailedError(
            f"connection to master at {address} failed (connection refused); "
            "check that the master is running and the address is right"
        ) from exc
    except TimeoutError as exc:
        raise ConnectionFailedError(
            f"connection to master at {address} timed out after {timeout_s} s; "
            "check that the master is running and that no firewall drops the packets"
        ) from exc
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConnectionFailedError(
            f"connection to master at {address} failed ({reason}); "
            "check that the master is running and the address is right"
        ) from exc

    try:
        channel = _HandshakeChannel(sock, f"master at {address}", timeout_s)
        _run_client_handshake(channel, secret)
        connection = Connection(
            sock,
            peer=(host, port),
            max_frame_bytes=max_frame_bytes,
            send_timeout_s=send_timeout_s,
        )
    except BaseException:
        sock.close()
        raise
    logger.debug("connected to master at %s", address)
    return connection


def accept(
    sock: socket.socket,
    secret: bytes,
    timeout_s: float = HANDSHAKE_TIMEOUT_S,
    *,
    max_frame_bytes: int = MAX_FRAME_BYTES,
    send_timeout_s: float = SEND_TIMEOUT_S,
) -> Connection:
    """Run the server side of the handshake on a socket from `listener.accept()`.

    The master calls this for each incoming connection. It waits up to
    `timeout_s` for the client, so call it off the thread that accepts.
    `max_frame_bytes` and `send_timeout_s` go to the `Connection`. On
    any failure the socket is closed and the error raised: AuthenticationError
    for a different secret, ConnectionClosedError when the client leaves, and
    ProtocolError when the handshake times out.
    """
    try:
        _check_secret(secret)
        _check_connection_settings(max_frame_bytes, send_timeout_s)
        try:
            host, port = sock.getpeername()[:2]
        except OSError as exc:
            raise ConnectionClosedError(
                "the peer closed the connection before the MMOP handshake"
            ) from exc
        channel = _HandshakeChannel(
            sock, f"peer at {_format_address(host, port)}", timeout_s
        )
        _run_server_handshake(channel, secret)
        return Connection(
            sock,
            peer=(host, port),
            max_frame_bytes=max_frame_bytes,
            send_timeout_s=send_timeout_s,
        )
    except BaseException:
        sock.close()
        raise


# -- Connection -----------------------------------------------------------


class Connection:
    """An authenticated MMOP connection that sends and receives messages.

    `connect` and `accept` build it once the handshake succeeded. Several
    threads may call `send` at once. `receive` serves one thread at a time,
    and another thread may call `close` to wake it. The connection is a
    context manager that closes it on exit.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        peer: tuple[str, int],
        max_frame_bytes: int = MAX_FRAME_BYTES,
        send_timeout_s: float = SEND_TIMEOUT_S,
    ):
        _check_connection_settings(max_frame_bytes, send_timeout_s)
        self._sock = sock
        self._peer = peer
        self._peer_text = _format_address(*peer)
        self._max_frame_bytes = max_frame_bytes
        self._send_timeout_s = send_timeout_s
        self._send_lock = threading.Lock()
        self._receive_lock = threading.Lock()
        # Received bytes not yet returned; always starts at a frame boundary,
        # so a receive that times out mid-frame keeps the stream in sync.
        self._buffer = bytearray()

        # Guards the three fields below. The file descriptor stays open while
        # any thread uses it, because closing it under a thread that waits in
        # epoll drops it from the wait set, and that thread would never wake.
        self._state_lock = threading.Lock()
        self._is_closed = False
        self._socket_users = 0
        self._is_socket_released = False

        # Non-blocking, because a socket timeout applies to every thread, so a
        # receive timeout would also cut a concurrent send short. Waits go
        # through a selector instead.
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @property
    def peer(self) -> tuple[str, int]:
        """The (host, port) of the other side."""
        return self._peer

    @property
    def is_closed(self) -> bool:
        """True once either side closed the connection, or an error closed it."""
        return self._is_closed

    def __repr__(self) -> str:
        state = "closed" if self._is_closed else "open"
        return f"<Connection peer={self._peer_text} {state}>"

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection, and wake threads blocked in `receive` or `send`.

        Those threads raise ConnectionClosedError. Calling `close` again does
        nothing.
        """
        with self._state_lock:
            if self._is_closed:
                return
            self._is_closed = True
        # shutdown wakes every thread that waits on the socket.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._release_socket_if_unused()

    def _release_socket_if_unused(self) -> None:
        with self._state_lock:
            if self._socket_users or self._is_socket_released:
                return
            self._is_socket_released = True
        self._sock.close()

    @contextlib.contextmanager
    def _using_socket(self) -> typing.Iterator[None]:
        """Keep the file descriptor open for the block.

        Raises ConnectionClosedError when the connection is already closed.
        """
        with self._state_lock:
            if self._is_closed:
                raise ConnectionClosedError(
                    f"connection to {self._peer_text} is closed"
                )
            self._socket_users += 1
        try:
            yield
        finally:
            with self._state_lock:
                self._socket_users -= 1
                is_closed = self._is_closed
            if is_closed:
                self._release_socket_if_unused()

    def send(self, message: Message) -> None:
        """Send one message; safe to call from several threads at once.

        Raises TypeError or ValueError when the message cannot be encoded, and
        ProtocolError when it is larger than `max_frame_bytes`. In both cases
        nothing was sent and the connection stays usable.

        Raises ConnectionClosedError when the connection is closed. It also
        raises it when the peer accepts no bytes for `send_timeout_s`, and
        then closes the connection, because a partly sent frame cannot be
        taken back.
        """
        payload = encode_message(message)
        name = wire_name(message)
        if len(payload) > self._max_frame_bytes:
            raise ProtocolError(
                f"cannot send {name}: its {len(payload)} bytes exceed the frame "
                f"limit of {self._max_frame_bytes} bytes; make the message smaller "
                "(for a recipe, keep large data out of the node's functions)"
            )
        frame = _LENGTH.pack(len(payload)) + payload

        with self._send_lock, self._using_socket():
            self._send_frame(frame, name)
        logger.debug("sent %s to %s bytes=%d", name, self._peer_text, len(payload))

    def _send_frame(self, frame: bytes, name: str) -> None:
        view = memoryview(frame)
        # Each pass sends at least one byte, or raises after send_timeout_s
        # without progress.
        while view:
            if self._is_closed:
                raise ConnectionClosedError(
                    f"connection to {self._peer_text} is closed"
                )
            try:
                view = view[self._sock.send(view) :]
                continue
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                reason = exc.strerror or type(exc).__name__
                raise self._closed_by_error(
                    f"sending {name} to {self._peer_text} failed ({reason})"
                ) from exc

            if not self._wait_until_ready(selectors.EVENT_WRITE, self._send_timeout_s):
                raise self._closed_by_error(
                    f"sending {name} to {self._peer_text} timed out: the peer "
                    f"accepted no bytes for {self._send_timeout_s} s; closed the "
                    "connection"
                )

    def receive(self, timeout_s: float | None = None) -> Message:
        """Return the next message, waiting up to `timeout_s` seconds.

        `None` waits until a message arrives or the connection closes.
        Raises TimeoutError when no whole message arrived in time. Bytes of a
        partly received frame stay buffered, so the next call continues it.
        Raises ProtocolError for a malformed frame or an unknown or invalid
        message. The frame is then consumed and the connection stays usable,
        so the receiver may reply `Rejected` and go on.
        Raises ConnectionClosedError when the peer closed the connection, when
        `close` was called, or when a frame's length exceeds `max_frame_bytes`.
        That last case also closes the connection, because the stream cannot
        be followed without reading the oversized body.
        """
        if timeout_s is not None and not timeout_s >= 0:
            raise ValueError(f"invalid timeout_s={timeout_s!r}: it must be 0 or more")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s

        if not self._receive_lock.acquire(
            timeout=-1 if timeout_s is None else timeout_s
        ):
            raise TimeoutError(
                f"no message from {self._peer_text} within {timeout_s} s, "
                "because another thread is receiving on this connection"
            )
        try:
            payload = self._receive_frame(deadline, timeout_s)
        finally:
            self._receive_lock.release()

        message = decode_message(payload)
        logger.debug(
            "received %s from %s bytes=%d",
            wire_name(message),
            self._peer_text,
            len(payload),
        )
        return message

    def _receive_frame(self, deadline: float | None, timeout_s: float | None) -> bytes:
        # Each pass returns a frame, reads at least one byte, or raises at the
        # deadline or at the end of the stream.
        while True:
            payload = self._pop_frame()
            if payload is not None:
                return payload

            remaining = None
            if deadline is not None:
                remaining = max(0.0, deadline - time.monotonic())
            with self._using_socket():
                if not self._wait_until_ready(selectors.EVENT_READ, remaining):
                    raise TimeoutError(
                        f"no whole message from {self._peer_text} within {timeout_s} s"
                    )
                self._read_available()

    def _pop_frame(self) -> bytes | None:
        if len(self._buffer) < _LENGTH.size:
            return None
        (length,) = _LENGTH.unpack_from(self._buffer)
        if length > self._max_frame_bytes:
            self._buffer.clear()
            self.close()
            raise ConnectionClosedError(
                f"frame of {length} bytes from {self._peer_text} exceeds the limit of "
                f"{self._max_frame_bytes} bytes; closed the connection without "
                "reading the frame"
            )
        end = _LENGTH.size + length
        if len(self._buffer) < end:
            return None
        payload = bytes(self._buffer[_LENGTH.size : end])
        del self._buffer[:end]
        return payload

    def _read_available(self) -> None:
        if self._is_closed:
            raise ConnectionClosedError(f"connection to {self._peer_text} is closed")
        try:
            chunk = self._sock.recv(_RECEIVE_CHUNK_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise self._closed_by_error(
                f"receiving from {self._peer_text} failed ({reason})"
            ) from exc

        if not chunk:
            where = " in the middle of a frame" if self._buffer else ""
            self.close()
            raise ConnectionClosedError(
                f"the peer at {self._peer_text} closed the connection{where}"
            )
        self._buffer += chunk

    def _wait_until_ready(self, event: int, timeout_s: float | None) -> bool:
        """Return True once the socket is ready for `event`, False on timeout.

        Call it inside `_using_socket`, so that the descriptor stays open.
        """
        with selectors.DefaultSelector() as selector:
            selector.register(self._sock, event)
            return bool(selector.select(timeout_s))

    def _closed_by_error(self, text: str) -> ConnectionClosedError:
        """Close the connection and return the error to raise for it."""
        if self._is_closed:
            return ConnectionClosedError(f"connection to {self._peer_text} is closed")
        self.close()
        return ConnectionClosedError(text)
