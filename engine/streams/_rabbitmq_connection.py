"""Connecting `RabbitMQStream` to the broker, with reconnects and heartbeats.

`_run` runs each operation of the stream under its lock. When the connection
is lost, it opens a new one with backoff and runs the operation once more.
A helper thread lets pika send and check heartbeats between the stream's
calls.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

import pika
import pika.exceptions

from engine.errors import StreamError, StreamUnavailableError
from engine.streams import redact_url

# The public module's logger, so that one name covers every part of the stream.
logger = logging.getLogger("engine.streams.rabbitmq")

T = TypeVar("T")

# Reconnect attempt k waits min(2 ** (k - 2), BACKOFF_MAX_S) seconds first,
# and the first attempt does not wait: 0, 1, 2, 4, 8 s for five attempts.
BACKOFF_MAX_S = 16.0

# Failures after which the connection is opened again and the call retried.
_CONNECTION_ERRORS = (
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.ConnectionWrongStateError,
    pika.exceptions.ChannelWrongStateError,
    OSError,
)

_FALLBACK_HINT = (
    "start the broker, or use the embedded stream: --stream sqlite:///run.db"
)


class _ConsumeChannelLostError(Exception):
    """The broker closed the consume channel, for example on an ack timeout."""


class ConnectionMixin:
    """The connection handling of `RabbitMQStream`, with its retry of operations.

    Its methods use the state that `RabbitMQStream.__init__` sets.
    """

    def _connection_parameters(self, url: str) -> pika.URLParameters:
        try:
            parameters = pika.URLParameters(url)
        except (ValueError, TypeError) as exc:
            raise StreamError(
                f"invalid RabbitMQ stream URL {redact_url(url)!r}: {exc}; "
                "expected amqp://user:password@host:5672/vhost"
            ) from exc
        parameters.heartbeat = self.heartbeat_s
        # `_connect` retries with its own backoff and log lines.
        parameters.connection_attempts = 1
        parameters.client_properties = {"connection_name": self.owner}
        return parameters

    def _connect(self) -> None:
        """Open the first connection, or raise `StreamUnavailableError`."""
        for attempt in range(1, self.connect_attempts + 1):
            try:
                self._open_connection()
            except (pika.exceptions.AMQPError, OSError) as exc:
                reason = self._check_retryable(exc)
                if attempt == self.connect_attempts:
                    raise StreamUnavailableError(
                        f"connection to RabbitMQ at {self._address} failed "
                        f"({reason}); {_FALLBACK_HINT}"
                    ) from exc
                delay_s = _backoff_s(attempt + 1)
                logger.warning(
                    "connection to RabbitMQ at %s failed (%s); "
                    "retry %d of %d in %.1f s",
                    self._address,
                    reason,
                    attempt,
                    self.connect_attempts - 1,
                    delay_s,
                )
                time.sleep(delay_s)
            else:
                logger.info(
                    "connected to RabbitMQ at %s owner=%s heartbeat_s=%d",
                    redact_url(self.url),
                    self.owner,
                    self.heartbeat_s,
                )
                return

    def _reconnect(self, reason: str) -> None:
        """Replace a lost connection, or raise `StreamUnavailableError`."""
        self._drop_connection()
        for attempt in range(1, self.connect_attempts + 1):
            delay_s = _backoff_s(attempt)
            logger.warning(
                "connection to RabbitMQ at %s lost; retry %d of %d in %.1f s (%s)",
                self._address,
                attempt,
                self.connect_attempts,
                delay_s,
                reason,
            )
            time.sleep(delay_s)
            try:
                self._open_connection()
            except (pika.exceptions.AMQPError, OSError) as exc:
                reason = self._check_retryable(exc)
                continue
            logger.info("reconnected to RabbitMQ at %s", self._address)
            return
        raise StreamUnavailableError(
            f"connection to RabbitMQ at {self._address} lost, and "
            f"{self.connect_attempts} attempts to reconnect failed ({reason}); "
            f"{_FALLBACK_HINT}"
        )

    def _check_retryable(self, exc: BaseException) -> str:
        """Return why connecting failed, or raise when retrying cannot help."""
        user = self._parameters.credentials.username
        if isinstance(
            exc,
            pika.exceptions.AuthenticationError
            | pika.exceptions.ProbableAuthenticationError,
        ):
            raise StreamUnavailableError(
                f"connection to RabbitMQ at {self._address} failed: the broker "
                f"refused the credentials of user {user!r}; check the user and "
                f"password in the stream URL {redact_url(self.url)}"
            ) from exc
        if isinstance(exc, pika.exceptions.ProbableAccessDeniedError):
            raise StreamUnavailableError(
                f"connection to RabbitMQ at {self._address} failed: user {user!r} "
                f"may not use virtual host {self._parameters.virtual_host!r}, or it "
                f"does not exist ({_describe(exc)}); check the stream URL "
                f"{redact_url(self.url)}"
            ) from exc
        return _describe(exc)

    def _open_connection(self) -> None:
        connection = pika.BlockingConnection(self._parameters)
        try:
            consume_channel = connection.channel()
            consume_channel.add_on_cancel_callback(self._on_consumer_cancelled)
            consume_channel._impl.add_on_return_callback(self._on_returned)
            consume_channel.tx_select()
            self._connection = connection
            self._consume_channel = consume_channel
            self._admin_channel = connection.channel()
            self._reopen_publish_channel()
        except BaseException:
            self._connection = None
            _close_quietly(connection)
            raise

    def _drop_connection(self) -> None:
        """Close the connection and void every delivery of its channels."""
        connection = self._connection
        self._connection = None
        self._consume_channel = self._publish_channel = self._admin_channel = None
        if connection is not None:
            _close_quietly(connection)
        self._tag_base = self._last_id
        self._consumer_tags.clear()
        self._queues_by_tag.clear()
        self._buffer.clear()
        self._held.clear()
        self._prefetch_count = 0
        # Closing the channel discards its open transaction.
        self._has_uncommitted = False
        self._known_queues.clear()
        self._unconfirmed.clear()
        self._publish_seq = 0
        self._is_lost = False

    def _run(self, action: str, operation: Callable[[], T]) -> T:
        """Run `operation` under the lock, and reconnect and retry once if it fails."""
        if os.getpid() != self._pid:
            raise StreamError(
                f"cannot {action}: this RabbitMQ stream was opened in process "
                f"{self._pid} and is used in process {os.getpid()}; open a stream "
                "in each process"
            )
        with self._lock:
            if self._is_closed:
                raise StreamError(f"cannot {action}: the RabbitMQ stream is closed")
            lost_reason = self._lost_reason()
            if lost_reason:
                self._reconnect(lost_reason)
            try:
                return operation()
            except (
                pika.exceptions.AMQPError,
                OSError,
                _ConsumeChannelLostError,
            ) as exc:
                lost_reason = self._check_lost(action, exc)
            self._reconnect(lost_reason)
            try:
                return operation()
            except (
                pika.exceptions.AMQPError,
                OSError,
                _ConsumeChannelLostError,
            ) as exc:
                lost_reason = self._check_lost(action, exc)
                self._drop_connection()
                raise StreamUnavailableError(
                    f"{action} failed: the connection to RabbitMQ at {self._address} "
                    f"was lost again after a reconnect ({lost_reason}); "
                    f"{_FALLBACK_HINT}"
                ) from exc

    def _check_lost(self, action: str, exc: BaseException) -> str:
        """Return why the connection is lost, or raise `StreamError` for `exc`.

        A lost connection or consume channel voids the deliveries, and the
        caller reconnects. Other failures leave the deliveries valid.
        """
        if isinstance(exc, pika.exceptions.ChannelClosedByBroker):
            if self._consume_channel is not None and self._consume_channel.is_closed:
                return f"the broker closed the consume channel: {_describe(exc)}"
            # So the broker closed the publish channel, because `_admin`
            # handles the failures of the admin channel.
            try:
                self._reopen_publish_channel()
            except (pika.exceptions.AMQPError, OSError):
                self._is_lost = True
            raise StreamError(
                f"{action} failed: RabbitMQ closed the channel "
                f"({exc.reply_code} {exc.reply_text})"
            ) from exc
        if isinstance(exc, (*_CONNECTION_ERRORS, _ConsumeChannelLostError)):
            return _describe(exc)
        raise StreamError(f"{action} failed: {_describe(exc)}") from exc

    def _lost_reason(self) -> str:
        """Return why the connection is unusable, or "" when it is fine."""
        if self._connection is None:
            return "not connected"
        if self._is_lost or self._connection.is_closed:
            return "connection closed"
        assert self._consume_channel is not None
        if self._consume_channel.is_closed:
            return "the broker closed the consume channel"
        return ""

    def _service_heartbeats(self) -> None:
        """Let pika send and check heartbeats while the caller is busy.

        Runs in a daemon thread. Processing events also dispatches deliveries
        into the buffer, which is harmless under the lock.
        """
        interval_s = max(0.1, self.heartbeat_s / 4)
        while not self._stop_heartbeats.wait(interval_s):
            if not self._lock.acquire(timeout=interval_s):
                continue
            try:
                connection = self._connection
                if connection is not None and connection.is_open:
                    connection.process_data_events(time_limit=0)
            except (pika.exceptions.AMQPError, OSError) as exc:
                # The next call on the stream reconnects.
                self._is_lost = True
                logger.debug("heartbeat thread found the connection lost: %r", exc)
            except Exception:
                self._is_lost = True
                logger.exception("heartbeat thread failed owner=%s", self.owner)
            finally:
                self._lock.release()


def _backoff_s(attempt: int) -> float:
    if attempt <= 1:
        return 0.0
    return min(2.0 ** (attempt - 2), BACKOFF_MAX_S)


def _describe(exc: BaseException) -> str:
    """Return a short reason for a connection failure, for messages and logs."""
    for cause in _causes(exc):
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, ConnectionResetError):
            return "connection reset"
        if isinstance(cause, TimeoutError):
            return "timed out"
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror.lower()
        if isinstance(cause, pika.exceptions.ConnectionClosedByBroker):
            return f"closed by the broker: {cause.reply_code} {cause.reply_text}"
        if isinstance(cause, pika.exceptions.ConnectionClosed):
            return f"connection closed: {cause.reply_code} {cause.reply_text}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else repr(exc)


def _causes(exc: BaseException, depth: int = 0) -> Iterable[BaseException]:
    """Yield `exc` and the exceptions nested in its arguments and causes."""
    yield exc
    if depth >= 4:
        return
    nested = [arg for arg in exc.args if isinstance(arg, BaseException)]
    # pika's connection workflow keeps the socket error in `exception`, and a
    # failed workflow keeps the error of each attempt in `exceptions`.
    nested.append(getattr(exc, "exception", None))
    nested.extend(getattr(exc, "exceptions", ()))
    nested.append(exc.__cause__)
    nested = [inner for inner in nested if isinstance(inner, BaseException)]
    for inner in nested:
        yield from _causes(inner, depth + 1)


def _close_quietly(connection: pika.BlockingConnection) -> None:
    if connection.is_closed:
        return
    try:
        connection.close()
    except (pika.exceptions.AMQPError, OSError) as exc:
        logger.debug("closing a RabbitMQ connection failed: %r", exc)
