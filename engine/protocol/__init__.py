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

The package keeps one concept per module: `registry` (the `Message` base,
wire names and field checks), `messages` (every message class), `encoding`
(JSON bodies and their validation), `connection` (the framed `Connection`)
and `handshake` (`connect` and `accept`). Import the names from
`engine.protocol`, which re-exports them.
"""

from __future__ import annotations

# The errors of the handshake and the connection, re-exported because callers
# catch them as `mmop.AuthenticationError` and `mmop.ProtocolError`.
from engine.errors import AuthenticationError as AuthenticationError
from engine.errors import ProtocolError as ProtocolError
from engine.protocol.connection import (
    MAX_FRAME_BYTES,
    SEND_TIMEOUT_S,
    Connection,
    ConnectionClosedError,
    ConnectionFailedError,
)
from engine.protocol.encoding import decode_message, encode_message
from engine.protocol.handshake import HANDSHAKE_TIMEOUT_S, accept, connect
from engine.protocol.messages import (
    CompleteType,
    Heartbeat,
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
)
from engine.protocol.registry import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    Message,
    wire_name,
)

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
