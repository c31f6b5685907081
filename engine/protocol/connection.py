"""The framed MMOP connection that carries messages after the handshake.

A frame is a 4-byte big-endian length and a JSON body from
`engine.protocol.encoding`. `Connection` sends and receives frames on a
non-blocking socket, so that a receive timeout in one thread never cuts
short a send in another.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import struct
import threading
import time
import typing

from engine.errors import ProtocolError
from engine.protocol.encoding import decode_message, encode_message
from engine.protocol.registry import Message, wire_name

# Logs on `engine.protocol`, the logger that docs/mmop.md names.
logger = logging.getLogger(__package__)

# Default size limit of one frame's JSON body, in bytes.
MAX_FRAME_BYTES = 64 * 1024 * 1024
# Default maximum time that `Connection.send` waits for the peer to accept
# more bytes, in seconds.
SEND_TIMEOUT_S = 30.0
_LENGTH = struct.Struct(">I")
_MAX_LENGTH = 2**32 - 1
_RECEIVE_CHUNK_BYTES = 64 * 1024


class ConnectionClosedError(ProtocolError):
    """The MMOP connection is closed: the peer left, or this side closed it."""


class ConnectionFailedError(ProtocolError):
    """A TCP connection to the master could not be opened."""


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


def _format_address(host: str, port: int) -> str:
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


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
