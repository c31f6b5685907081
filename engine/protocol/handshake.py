"""The authenticated MMOP handshake, and `connect` and `accept` that run it.

Both sides prove with HMAC-SHA256 over fresh nonces that they hold the same
cluster secret, before either side decodes a frame. `docs/mmop.md` gives the
handshake byte by byte.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import secrets
import socket
import time
import typing

from engine.errors import AuthenticationError, ProtocolError
from engine.protocol.connection import (
    MAX_FRAME_BYTES,
    SEND_TIMEOUT_S,
    Connection,
    ConnectionClosedError,
    ConnectionFailedError,
    _check_connection_settings,
    _format_address,
)
from engine.protocol.registry import PROTOCOL_VERSION

# Logs on `engine.protocol`, the logger that docs/mmop.md names.
logger = logging.getLogger(__package__)

# Default time that `connect` and `accept` allow for the whole handshake, in
# seconds.
HANDSHAKE_TIMEOUT_S = 10.0

# The magic is always six ASCII bytes, so that any version can read another
# version's greeting and reject it by name.
_MAGIC = PROTOCOL_VERSION.encode("ascii")
_MAGIC_PREFIX = b"MMOP/"
_NONCE_BYTES = 32
_PROOF_BYTES = hashlib.sha256().digest_size
_ACCEPTED = b"\x01"
_REJECTED = b"\x02"


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


def _proof(
    secret: bytes, role: bytes, first_nonce: bytes, second_nonce: bytes
) -> bytes:
    return hmac.new(secret, role + first_nonce + second_nonce, hashlib.sha256).digest()


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
                f"{self.timeout_s:.1f} s; check that both sides run {PROTOCOL_VERSION} "
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
            f"connection to master at {address} timed out after {timeout_s:.1f} s; "
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
