"""The RabbitMQ stream: durable queues on a RabbitMQ broker, through pika.

Each stream opens one `pika.BlockingConnection` with three channels:

- the consume channel carries one consumer per pulled queue, with manual
  acknowledgements. The broker pushes up to the prefetch count of messages
  ahead, and `pull` keeps what it does not return in a buffer for the next
  pull. Buffered messages are unacked, so closing the stream requeues them.
  The channel is in transaction mode (`tx.select`), because a batch can be
  acked only on the channel that received it: `settle` publishes a batch's
  results on it, acks the batch and commits, so that a process that dies
  before the commit leaves its batch unacked and its results unpublished.
  In this mode every ack and reject waits for a commit, so `ack` and
  `reject` commit too.
- the publish channel is in confirm mode. A batch is published in one go, and
  `publish` returns when the broker has confirmed every message of it.
- the admin channel declares, counts and deletes queues. A failed passive
  declare closes its channel, and a separate channel keeps that failure away
  from the deliveries.

Every queue `q` has a holding queue `q.delayed` for `publish(..., delay_s)`.
A delayed message carries its delay as its expiration, and the holding queue
dead-letters it to `q` when it expires. This needs no broker plugin.

pika works only while one of its methods runs, but a node spends most of its
time in the user's transform. A helper thread therefore lets pika send and
check heartbeats between the stream's calls, and a lock keeps pika from
running in two threads at once. A long heartbeat timeout would also keep the
connection through a long transform, but the broker would then notice a dead
node late, and requeue its messages late.

A connection lost to the broker is opened again with backoff, and the failed
call runs once more. Deliveries pulled on the lost connection are void: the
broker delivers them again, acking them only logs a warning, and settling
them returns False.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, TypeVar

import pika
import pika.exceptions

from engine.errors import StreamError, StreamUnavailableError
from engine.streams import redact_url
from engine.streams.base import Delivery

if TYPE_CHECKING:
    from types import TracebackType

    from pika.adapters.blocking_connection import BlockingChannel

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Messages of one delay in seconds, as `(queue, body)` pairs. A delay of 0
# publishes them at once.
_Batch = tuple[float, Sequence[tuple[str, bytes]]]

# basic.qos carries the prefetch count in a 16-bit field.
MAX_PREFETCH = 65535

# Maximum time that `publish` waits for the broker's confirms, and that a
# commit waits for tx.commit-ok. A broker under a memory or disk alarm blocks
# publishers and replies to neither until the alarm ends.
CONFIRM_TIMEOUT_S = 60.0

# Reconnect attempt k waits min(2 ** (k - 2), BACKOFF_MAX_S) seconds first,
# and the first attempt does not wait: 0, 1, 2, 4, 8 s for five attempts.
BACKOFF_MAX_S = 16.0

# Suffix of the holding queue that keeps a queue's delayed messages.
DELAYED_SUFFIX = ".delayed"

# AMQP 0-9-1 sends a queue name as a short string of at most 255 bytes, and
# the holding queue's name adds the suffix.
MAX_QUEUE_NAME_BYTES = 255 - len(DELAYED_SUFFIX)

_PERSISTENT = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)

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


class RabbitMQStream:
    """Durable queues on a RabbitMQ broker, for the nodes of a cluster.

    `url` is an `amqp://user:password@host:port/vhost` URL. `owner` names the
    node process and becomes the connection name that the broker shows, so an
    operator can tell which node opened a connection. `prefetch` is how many
    messages the broker may push ahead of the pulls. It defaults to the
    `max_count` of each pull, and a pull always allows its `max_count`.
    `heartbeat_s` is the AMQP heartbeat timeout in seconds. `connect_attempts`
    bounds the attempts to connect, at start and after a connection is lost.

    Each process opens its own stream. A connection must never cross a fork:
    a stream used in a process other than the one that opened it raises
    `StreamError`. Within a process, threads may share a stream, because its
    calls are serialized.

    Raises `StreamUnavailableError` when the broker cannot be reached or
    rejects the credentials, and `StreamError` for an invalid URL.

    Limits: a transform that holds the GIL for longer than the heartbeat
    timeout, in one call into a C extension, still loses the connection; use
    a larger `heartbeat_s` for such transforms. `depth` does not count
    messages that other connections pulled and have not acked.
    """

    def __init__(
        self,
        url: str,
        owner: str = "",
        prefetch: int | None = None,
        heartbeat_s: int = 60,
        connect_attempts: int = 5,
    ) -> None:
        if prefetch is not None and not 1 <= prefetch <= MAX_PREFETCH:
            raise ValueError(
                f"invalid prefetch={prefetch!r}: must be from 1 to {MAX_PREFETCH}"
            )
        if not isinstance(heartbeat_s, int) or heartbeat_s < 1:
            raise ValueError(
                f"invalid heartbeat_s={heartbeat_s!r}: must be a whole number "
                "of seconds, 1 or more"
            )
        if connect_attempts < 1:
            raise ValueError(
                f"invalid connect_attempts={connect_attempts!r}: must be 1 or more"
            )
        self.url = url
        self.owner = owner or f"pid-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.prefetch = prefetch
        self.heartbeat_s = heartbeat_s
        self.connect_attempts = connect_attempts

        self._parameters = self._connection_parameters(url)
        self._address = f"{self._parameters.host}:{self._parameters.port}"
        self._pid = os.getpid()
        self._is_closed = False
        # Serializes every use of the connection, by callers and by the
        # heartbeat thread alike.
        self._lock = threading.RLock()

        self._connection: pika.BlockingConnection | None = None
        self._consume_channel: BlockingChannel | None = None
        self._publish_channel: BlockingChannel | None = None
        self._admin_channel: BlockingChannel | None = None
        # Set by the heartbeat thread when pika failed there, so that the next
        # call opens a new connection.
        self._is_lost = False

        # Delivery ids of the current consume channel are its delivery tags
        # plus `_tag_base`, which is the highest id issued before the channel
        # opened. So an id never names a message of a later channel.
        self._tag_base = 0
        self._last_id = 0
        self._consumer_tags: dict[str, str] = {}
        self._queues_by_tag: dict[str, str] = {}
        # Messages pushed by the broker and not yet returned by `pull`.
        self._buffer: deque[Delivery] = deque()
        # Queue of each message returned by `pull` and not yet acked or rejected.
        self._held: dict[int, str] = {}
        self._prefetch_count = 0
        # True when acks or rejects were sent on the consume channel since its
        # last commit. They take effect only at the next commit.
        self._has_uncommitted = False
        # Queues that this connection found to exist, so that `settle` checks
        # each target queue once rather than in every transaction.
        self._known_queues: set[str] = set()
        # Called by `settle` just before it commits. Tests set it to stop a
        # process in the middle of a transaction.
        self._before_commit: Callable[[], None] | None = None

        # Publish sequence numbers that the broker has not confirmed yet.
        self._unconfirmed: set[int] = set()
        self._publish_seq = 0
        self._nacked_count = 0
        self._returned_queues: list[str] = []

        self._connect()
        self._stop_heartbeats = threading.Event()
        self._heartbeat_thread = threading.Thread(
            target=self._service_heartbeats,
            name=f"rabbitmq-heartbeat-{self.owner}",
            daemon=True,
        )
        self._heartbeat_thread.start()

    def __repr__(self) -> str:
        return f"RabbitMQStream({redact_url(self.url)!r}, owner={self.owner!r})"

    def __enter__(self) -> RabbitMQStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def declare(self, queues: Iterable[str]) -> None:
        """Create durable queues, each with its holding queue for delays.

        Raises `StreamError` when a queue exists with other arguments.
        """
        names = _queue_names(queues)
        self._run("declare queues", lambda: self._declare(names))
        logger.debug("declared queues %s", names)

    def publish(
        self,
        messages: Sequence[tuple[str, bytes]],
        delay_s: float = 0.0,
        position: tuple[str, int] | None = None,
    ) -> None:
        """Publish `(queue, body)` pairs as persistent messages.

        Returns when the broker has confirmed every message, so they are
        durable. With `delay_s` more than 0, each message waits in its
        queue's holding queue, which dead-letters it back to the queue once
        its expiration of `delay_s` seconds passes. Raises `StreamError` when
        a queue does not exist or the broker rejects (nacks) a message, after
        the other messages of the batch were published. A batch interrupted
        by a lost connection is published again in full, so some of its
        messages may arrive twice.

        With `position=(key, count)`, the messages and `count` go in one AMQP
        transaction instead, `count` as the only message of the queue `key`
        (declared with `x-max-length` 1, so each position replaces the last).
        A connection lost during that call publishes the batch again only if
        the stored position shows that the broker discarded it.

        Limits: the holding queue expires messages in order, so a message
        waits at least `delay_s` seconds, and longer when a message published
        before it to the same queue has a longer delay.
        """
        _check_delay(delay_s)
        _check_bodies(messages)
        targets = _queue_names(queue for queue, _ in messages)
        if position is not None:
            _check_position(position)
            self._publish_with_position(messages, delay_s, position)
            return
        if not messages:
            return

        self._run("publish", lambda: self._publish(messages, targets, delay_s))
        logger.debug(
            "published %d messages to %s delay_s=%s", len(messages), targets, delay_s
        )

    def read_position(self, key: str) -> int:
        """Return the count last stored under `key` by `publish`, or 0."""
        _check_position((key, 0))
        return self._run("read position", lambda: self._read_position(key))

    def pull(
        self, queues: Sequence[str], max_count: int, timeout_s: float
    ) -> list[Delivery]:
        """Pull up to `max_count` messages from `queues`.

        Returns the buffered messages first, then waits up to `timeout_s`
        seconds for the broker to push enough to fill the batch. A queue
        that does not exist yields nothing. Messages stay unacked until
        `ack` or `reject`, and the broker delivers them again if this
        stream's connection closes first.
        """
        names = _queue_names(queues)
        if not names:
            raise ValueError("invalid queues=[]: name at least one queue to pull")
        if max_count < 1:
            raise ValueError(f"invalid max_count={max_count!r}: must be 1 or more")
        if not (math.isfinite(timeout_s) and timeout_s >= 0):
            raise ValueError(f"invalid timeout_s={timeout_s!r}: must be 0 or more")

        deliveries = self._run("pull", lambda: self._pull(names, max_count, timeout_s))
        logger.debug("pulled %d messages from %s", len(deliveries), names)
        return deliveries

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge messages, which the broker then deletes.

        Skips, with a warning, deliveries of a lost connection (the broker
        delivers them again) and deliveries that this stream does not hold.
        """
        ids = _delivery_ids(deliveries)
        if ids:
            self._run("ack", lambda: self._ack_or_reject("ack", ids, requeue=False))

    def reject(self, deliveries: Sequence[Delivery], requeue: bool) -> None:
        """Reject messages: requeue them for delivery again, or drop them.

        A requeued message comes back marked redelivered. Skips, like `ack`,
        deliveries of a lost connection and deliveries not held.
        """
        ids = _delivery_ids(deliveries)
        if ids:
            self._run("reject", lambda: self._ack_or_reject("reject", ids, requeue))

    def settle(
        self,
        deliveries: Sequence[Delivery],
        messages: Sequence[tuple[str, bytes]],
        delayed: Mapping[float, Sequence[tuple[str, bytes]]] | None = None,
    ) -> bool:
        """Publish `messages` and the `delayed` ones, and ack `deliveries`, atomically.

        `delayed` maps a delay in seconds to `(queue, body)` pairs, which wait
        in holding queues as with `publish(..., delay_s)`. Everything goes in
        one AMQP transaction on the channel that received the deliveries, so
        a process that dies before the commit leaves the deliveries unacked
        and nothing published. Returns True once the broker has committed.

        Returns False and publishes nothing when a delivery is not held as
        the call starts: one of a lost connection, or one already acked or
        rejected. The deliveries still held are then requeued. When the
        connection is lost during the call, the stream reconnects and returns
        False too, because every delivery is then void. The broker has then
        either committed the whole transaction or discarded it (and delivers
        the batch again), so the caller has nothing left to do for this batch
        in either case.

        Raises `StreamError` when a queue does not exist, before anything is
        published. A queue deleted during the call makes the broker drop the
        messages to it while it commits the rest, and `StreamError` follows
        the commit. Raises `StreamUnavailableError` when the broker cannot be
        reached again, or sends no tx.commit-ok within `CONFIRM_TIMEOUT_S`,
        which leaves the outcome to the broker, whole or nothing, as above.

        Limits: the transaction is atomic when this process or its connection
        fails, but RabbitMQ does not keep it atomic when the broker itself
        fails during the commit: the results may then survive in some queues
        only, and acked deliveries may come back (see `_commit`). With no
        deliveries, a connection lost during the call makes it publish the
        messages again, so some may arrive twice, as with `publish`.
        """
        batches = _settle_batches(messages, delayed)
        ids = _delivery_ids(deliveries)
        if not ids and not batches:
            return True

        is_settled = self._run("settle", lambda: self._settle(ids, batches))
        if is_settled:
            logger.debug(
                "settled %d deliveries and published %d messages",
                len(ids),
                sum(len(pairs) for _, pairs in batches),
            )
        return is_settled

    def extend_lease(
        self, deliveries: Sequence[Delivery], lease_s: float | None = None
    ) -> None:
        """Do nothing: a pulled message stays unacked until its connection closes.

        The stream takes the call so that a node runtime can treat every
        backend alike.
        """
        # NOTE: RabbitMQ has no lease, but since 3.8.15 it closes a channel
        # that keeps a delivery unacked for longer than `consumer_timeout`
        # (30 minutes by default on RabbitMQ 3.10). The stream then reconnects,
        # and the broker delivers the batch again. A transform that may run
        # longer needs a larger `consumer_timeout` in rabbitmq.conf.

    def depth(self, queue: str) -> int:
        """Return the number of messages in `queue` that may still be processed.

        Counts the messages ready in the queue and in its holding queue, and
        those that this stream pulled or has in its buffer. A queue that
        does not exist counts 0.
        """
        return self.depths([queue])[queue]

    def depths(self, queues: Sequence[str]) -> dict[str, int]:
        """Return `depth` for each of `queues`, in one call."""
        names = _queue_names(queues)
        if not names:
            return {}
        # NOTE: AMQP reports only the messages ready in a queue, so the count
        # misses messages that other connections pulled and have not acked.
        # The management HTTP API counts those from statistics sampled every
        # 5 s by default, so its 0 cannot prove a queue drained either. So a
        # node process may complete when its own count is 0, but its node
        # type is complete only when all its processes are: a process that
        # holds messages has not completed yet.
        return self._run("count messages", lambda: self._depths(names))

    def delete_queues(self, queues: Iterable[str]) -> None:
        """Delete the queues, their holding queues and every message in them.

        Messages of these queues that this stream pulled or buffered are
        dropped, and acking them later only logs a warning.
        """
        names = _queue_names(queues)
        if names:
            self._run("delete queues", lambda: self._delete(names))
            logger.debug("deleted queues %s", names)

    def recover(self, owner: str) -> int:
        """Return 0: the broker requeues a connection's unacked messages itself.

        RabbitMQ requeues them as soon as the socket of a dead process closes,
        or after missed heartbeats when its host is gone.
        """
        return 0

    def close(self) -> None:
        """Close the connection, so that the broker requeues every unacked message.

        Calling it again does nothing. In a process other than the one that
        opened the stream, it only marks the stream closed, because the
        connection belongs to the parent.
        """
        if os.getpid() != self._pid:
            # A fork copies the lock in whatever state it was, so skip it.
            self._is_closed = True
            return
        with self._lock:
            if self._is_closed:
                return
            self._is_closed = True
        self._stop_heartbeats.set()
        self._heartbeat_thread.join(timeout=5.0)
        with self._lock:
            self._drop_connection()
        logger.debug("RabbitMQ stream closed owner=%s", self.owner)

    # Connection handling.

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

    def _reopen_publish_channel(self) -> None:
        """Open the publish channel, in confirm mode, on the current connection."""
        assert self._connection is not None
        if self._publish_channel is not None and self._publish_channel.is_open:
            self._publish_channel.close()
        self._unconfirmed.clear()
        self._publish_seq = 0
        channel = self._connection.channel()

        # BlockingChannel waits for the confirm of each message before it
        # publishes the next. Confirm mode on the underlying asynchronous
        # channel lets `_publish` send a whole batch and then wait once.
        is_selected: list[bool] = []
        impl = channel._impl
        impl.add_on_return_callback(self._on_returned)
        impl.confirm_delivery(
            ack_nack_callback=self._on_confirm,
            callback=lambda _frame: is_selected.append(True),
        )
        deadline = time.monotonic() + CONFIRM_TIMEOUT_S
        while not is_selected:
            if time.monotonic() > deadline:
                raise pika.exceptions.AMQPConnectionError(
                    "timed out waiting for the broker to enable publisher confirms"
                )
            self._connection.process_data_events(time_limit=0.01)
        self._publish_channel = channel

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

    # Operations, run under the lock by `_run`.

    def _declare(self, names: list[str]) -> None:
        for name in names:
            self._admin("declare queue", name, lambda c, n=name: _declare_queue(c, n))
            self._admin(
                "declare queue",
                name + DELAYED_SUFFIX,
                lambda c, n=name: _declare_holding_queue(c, n),
            )
            self._known_queues.add(name)

    def _admin(
        self,
        action: str,
        queue: str,
        call: Callable[[BlockingChannel], T],
        is_missing_ok: bool = False,
    ) -> T | None:
        """Run `call` on the admin channel, and reopen it if the broker closes it.

        Raises `StreamError` with the broker's reply, or returns None for a
        queue not found when `is_missing_ok`. The consume channel and its
        deliveries stay valid either way.
        """
        assert self._admin_channel is not None and self._connection is not None
        try:
            return call(self._admin_channel)
        except pika.exceptions.ChannelClosedByBroker as exc:
            self._admin_channel = self._connection.channel()
            if is_missing_ok and exc.reply_code == 404:
                return None
            raise StreamError(
                f"{action} {queue!r} failed: RabbitMQ replied "
                f"{exc.reply_code} {exc.reply_text}"
            ) from exc

    def _publish(
        self, messages: Sequence[tuple[str, bytes]], targets: list[str], delay_s: float
    ) -> None:
        assert self._publish_channel is not None
        if delay_s > 0:
            self._prepare_delay(targets)
        suffix, properties = _routing(delay_s)

        self._nacked_count = 0
        self._returned_queues.clear()
        impl = self._publish_channel._impl
        for queue, body in messages:
            impl.basic_publish(
                "", queue + suffix, bytes(body), properties, mandatory=True
            )
            self._publish_seq += 1
            self._unconfirmed.add(self._publish_seq)
        self._wait_for_confirms(len(messages))

        if self._returned_queues:
            missing = [name.removesuffix(suffix) for name in self._returned_queues]
            raise StreamError(_missing_queues_message(list(dict.fromkeys(missing))))
        if self._nacked_count:
            raise StreamError(
                f"publish failed for {self._nacked_count} of {len(messages)} "
                "messages: RabbitMQ rejected them (nack); see the broker's log "
                "and publish the batch again"
            )

    def _prepare_delay(self, targets: list[str]) -> None:
        # A holding queue dead-letters a message to its queue even when that
        # queue does not exist, which drops the message, so check the queues
        # first. Declaring the holding queue again costs one round trip, and
        # covers queues that another program declared.
        missing = [name for name in targets if self._count_ready(name) is None]
        if missing:
            raise StreamError(_missing_queues_message(missing))
        for name in targets:
            self._admin(
                "declare queue",
                name + DELAYED_SUFFIX,
                lambda c, n=name: _declare_holding_queue(c, n),
            )

    def _wait_for_confirms(self, count: int) -> None:
        assert self._connection is not None and self._publish_channel is not None
        deadline = time.monotonic() + CONFIRM_TIMEOUT_S
        while self._unconfirmed:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                self._drop_connection()
                raise StreamUnavailableError(
                    f"publish of {count} messages to RabbitMQ at {self._address} "
                    f"timed out after {CONFIRM_TIMEOUT_S} s waiting for the "
                    "broker's confirms; the broker may be blocking publishers "
                    "under a memory or disk alarm"
                )
            self._connection.process_data_events(time_limit=remaining_s)
            if self._publish_channel.is_closed:
                reason = self._publish_channel._closing_reason
                if isinstance(reason, pika.exceptions.ChannelClosedByBroker):
                    raise reason
                raise pika.exceptions.ChannelWrongStateError(repr(reason))

    def _on_confirm(self, frame: pika.frame.Method) -> None:
        method = frame.method
        if method.multiple:
            confirmed = {seq for seq in self._unconfirmed if seq <= method.delivery_tag}
        else:
            confirmed = {method.delivery_tag} & self._unconfirmed
        self._unconfirmed -= confirmed
        if isinstance(method, pika.spec.Basic.Nack):
            self._nacked_count += len(confirmed)
        if not self._unconfirmed and self._connection is not None:
            # A timer event makes `process_data_events` return now, where the
            # confirm alone would let it wait out its time limit.
            self._connection.call_later(0, _do_nothing)

    def _on_returned(
        self,
        _channel: object,
        method: pika.spec.Basic.Return,
        _properties: pika.BasicProperties,
        _body: bytes,
    ) -> None:
        self._returned_queues.append(method.routing_key)

    def _settle(self, ids: list[int], batches: list[_Batch]) -> bool:
        held_ids, stale_count, unknown_count = self._sort_ids(ids)
        if stale_count or unknown_count:
            self._requeue_unsettled(held_ids, stale_count, unknown_count)
            return False

        self._check_targets(batches)
        # NOTE: a message that the broker refuses with a channel error, such
        # as one above its max_message_size, closes the consume channel. That
        # looks like a lost channel, so settle returns False for its batch
        # each time, where `publish` raises StreamError.
        self._send_settlement(held_ids, batches)
        if self._before_commit is not None:
            self._before_commit()
        self._commit("settle")
        self._forget(held_ids)

        if self._returned_queues:
            # So a queue was deleted since this stream last found it.
            dropped = [
                name.removesuffix(DELAYED_SUFFIX) for name in self._returned_queues
            ]
            self._known_queues.difference_update(dropped)
            listed = ", ".join(repr(name) for name in dict.fromkeys(dropped))
            raise StreamError(
                f"settle committed its batch, but RabbitMQ dropped {len(dropped)} "
                f"messages to queue {listed}, which no longer exists; declare the "
                "queues before publishing to them"
            )
        return True

    def _publish_with_position(
        self,
        messages: Sequence[tuple[str, bytes]],
        delay_s: float,
        position: tuple[str, int],
    ) -> None:
        key, count = position
        batches: list[_Batch] = [(float(delay_s), messages)] if messages else []
        batches.append((0.0, [(key, str(count).encode())]))
        attempts = 0

        def publish() -> None:
            nonlocal attempts
            attempts += 1
            self._declare_position_queue(key)
            # A retry follows a lost connection, after which the broker has
            # committed the whole transaction or none of it.
            if attempts > 1 and self._read_position(key) == count:
                return
            self._check_targets(batches)
            self._send_settlement([], batches)
            self._commit("publish")

        self._run("publish", publish)
        logger.debug(
            "published %d messages delay_s=%s position=%s",
            len(messages),
            delay_s,
            position,
        )

    def _declare_position_queue(self, key: str) -> None:
        if key in self._known_queues:
            return
        self._admin(
            "declare position queue",
            key,
            lambda channel: channel.queue_declare(
                key, durable=True, arguments={"x-max-length": 1}
            ),
        )
        self._known_queues.add(key)

    def _read_position(self, key: str) -> int:
        """Read the position message of `key` and put it back in its queue."""
        self._declare_position_queue(key)
        assert self._admin_channel is not None
        method, _properties, body = self._admin_channel.basic_get(key, auto_ack=False)
        if method is None:
            return 0
        self._admin_channel.basic_nack(method.delivery_tag, requeue=True)
        try:
            return int(body)
        except ValueError:
            raise StreamError(
                f"position queue {key!r} contains {body[:40]!r}, not a count; "
                "delete the queue, and its source starts over"
            ) from None

    def _requeue_unsettled(
        self, held_ids: list[int], stale_count: int, unknown_count: int
    ) -> None:
        """Requeue the deliveries of a batch that `settle` cannot settle."""
        if held_ids:
            self._send_rejects(held_ids, requeue=True)
            self._commit("requeue")
            self._forget(held_ids)
        logger.warning(
            "skipped settle of %d deliveries: %d are from a lost connection to "
            "RabbitMQ, %d are not held by this stream, and %d were requeued",
            len(held_ids) + stale_count + unknown_count,
            stale_count,
            unknown_count,
            len(held_ids),
        )

    def _check_targets(self, batches: list[_Batch]) -> None:
        """Raise `StreamError` before a transaction that names a missing queue.

        Inside a transaction, RabbitMQ returns a message to a missing queue
        only at the commit, and commits the rest of the transaction all the
        same.
        """
        targets = _queue_names(
            queue for delay_s, pairs in batches if delay_s == 0 for queue, _ in pairs
        )
        unknown = [name for name in targets if name not in self._known_queues]
        missing = [name for name in unknown if self._count_ready(name) is None]
        if missing:
            raise StreamError(_missing_queues_message(missing, "settle"))
        self._known_queues.update(targets)
        for delay_s, pairs in batches:
            if delay_s > 0:
                self._prepare_delay(_queue_names(queue for queue, _ in pairs))

    def _send_settlement(self, held_ids: list[int], batches: list[_Batch]) -> None:
        """Publish `batches` and ack `held_ids` in the open transaction."""
        assert self._consume_channel is not None
        self._returned_queues.clear()
        self._has_uncommitted = True
        impl = self._consume_channel._impl
        for delay_s, pairs in batches:
            suffix, properties = _routing(delay_s)
            for queue, body in pairs:
                impl.basic_publish(
                    "", queue + suffix, bytes(body), properties, mandatory=True
                )
        if held_ids:
            self._send_acks(held_ids)

    def _commit(self, action: str) -> None:
        """Commit the transaction of the consume channel.

        What RabbitMQ guarantees (its "Broker Semantics" page, for RabbitMQ
        2.8.0 and later): tx.commit-ok means that every effect of the
        transaction is visible and that the broker has taken responsibility
        for the messages published in it. Returned messages arrive before
        tx.commit-ok. A transaction whose channel closes before the commit,
        because its process died or its connection was lost, is discarded,
        and the broker requeues the messages that the channel held unacked
        (test_rabbitmq_settle_killed_before_commit checks this on 3.10).

        What it does not guarantee: atomicity when the broker itself fails
        during the commit. The results may then survive in some queues only,
        even a part of them in one queue. And tx.commit-ok says that the
        broker received the acks, not that it stored them, so a broker that
        fails afterwards may deliver acked messages again beside their
        results.
        """
        assert self._connection is not None and self._consume_channel is not None
        connection = self._connection
        is_committed: list[bool] = []

        def on_commit_ok(_frame: pika.frame.Method) -> None:
            is_committed.append(True)
            # Makes `process_data_events` return now, as in `_on_confirm`.
            connection.call_later(0, _do_nothing)

        # BlockingChannel.tx_commit would wait for tx.commit-ok without a
        # time limit, through a memory or disk alarm of any length.
        self._consume_channel._impl.tx_commit(on_commit_ok)
        deadline = time.monotonic() + CONFIRM_TIMEOUT_S
        while not is_committed:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                self._drop_connection()
                raise StreamUnavailableError(
                    f"{action} on RabbitMQ at {self._address} timed out after "
                    f"{CONFIRM_TIMEOUT_S} s waiting for the broker to commit; the "
                    "broker applies the whole transaction or none of it, and may "
                    "be blocking publishers under a memory or disk alarm"
                )
            connection.process_data_events(time_limit=remaining_s)
            if self._consume_channel.is_closed:
                raise _ConsumeChannelLostError(
                    "the broker closed the consume channel: "
                    f"{self._consume_channel._closing_reason!r}"
                )
        self._has_uncommitted = False

    def _commit_pending(self, action: str) -> None:
        """Commit the acks and rejects sent since the last commit, if any."""
        if self._has_uncommitted:
            self._commit(action)

    def _pull(
        self, names: list[str], max_count: int, timeout_s: float
    ) -> list[Delivery]:
        assert self._connection is not None and self._consume_channel is not None
        self._set_prefetch(len(self._held) + max(self.prefetch or 0, max_count))
        self._consume_from(names)
        # Messages released by `_consume_from` go back to their queues only
        # at a commit.
        self._commit_pending("release messages")

        deadline = time.monotonic() + timeout_s
        deliveries = self._take_buffered(max_count)
        while len(deliveries) < max_count:
            remaining_s = deadline - time.monotonic()
            # Poll once even at timeout 0, for messages already received.
            self._connection.process_data_events(time_limit=max(0.0, remaining_s))
            if self._consume_channel.is_closed:
                raise _ConsumeChannelLostError(
                    "the broker closed the consume channel: "
                    f"{self._consume_channel._closing_reason!r}"
                )
            deliveries.extend(self._take_buffered(max_count - len(deliveries)))
            if remaining_s <= 0:
                break
        for delivery in deliveries:
            self._held[int(delivery.delivery_id)] = delivery.queue
        self._commit_pending("release messages")
        return deliveries

    def _set_prefetch(self, count: int) -> None:
        # With global_qos the limit covers the whole channel, so held and
        # buffered messages together. Adding the held count lets a caller pull
        # again before acking, and still bounds the buffer to one batch.
        count = min(count, MAX_PREFETCH)
        if count != self._prefetch_count:
            assert self._consume_channel is not None
            self._consume_channel.basic_qos(prefetch_count=count, global_qos=True)
            self._prefetch_count = count

    def _consume_from(self, names: list[str]) -> None:
        assert self._consume_channel is not None
        for queue in [name for name in self._consumer_tags if name not in names]:
            self._cancel_consumer(queue)
        # Includes messages of a consumer that the broker cancelled.
        self._release_buffered(lambda delivery: delivery.queue not in names, True)
        for queue in names:
            if queue in self._consumer_tags or self._count_ready(queue) is None:
                continue
            tag = self._consume_channel.basic_consume(queue, self._on_message)
            self._consumer_tags[queue] = tag
            self._queues_by_tag[tag] = queue
            self._known_queues.add(queue)

    def _cancel_consumer(self, queue: str) -> None:
        assert self._consume_channel is not None
        tag = self._consumer_tags.pop(queue)
        self._queues_by_tag.pop(tag, None)
        # pika itself requeues the messages that it received for the consumer
        # and has not dispatched to `_on_message`, with rejects that wait for
        # a commit.
        self._consume_channel.basic_cancel(tag)
        self._has_uncommitted = True

    def _release_buffered(
        self, is_released: Callable[[Delivery], bool], requeue: bool
    ) -> None:
        """Reject the buffered messages that `is_released` selects."""
        assert self._consume_channel is not None
        kept: deque[Delivery] = deque()
        for delivery in self._buffer:
            if is_released(delivery):
                tag = int(delivery.delivery_id) - self._tag_base
                self._consume_channel.basic_nack(tag, requeue=requeue)
                self._has_uncommitted = True
            else:
                kept.append(delivery)
        self._buffer = kept

    def _on_message(
        self,
        _channel: BlockingChannel,
        method: pika.spec.Basic.Deliver,
        _properties: pika.BasicProperties,
        body: bytes,
    ) -> None:
        delivery_id = self._tag_base + method.delivery_tag
        self._last_id = max(self._last_id, delivery_id)
        queue = self._queues_by_tag.get(method.consumer_tag)
        if queue is None:
            # The consumer was cancelled while this message was on its way.
            # The reject takes effect at the next commit, and until then the
            # message stays unacked on this channel.
            assert self._consume_channel is not None
            self._consume_channel.basic_nack(method.delivery_tag, requeue=True)
            self._has_uncommitted = True
            return
        self._buffer.append(Delivery(queue, body, delivery_id, method.redelivered))

    def _on_consumer_cancelled(self, frame: pika.frame.Method) -> None:
        # The broker cancels a consumer when its queue is deleted.
        queue = self._queues_by_tag.pop(frame.method.consumer_tag, None)
        if queue is not None:
            self._consumer_tags.pop(queue, None)
            self._known_queues.discard(queue)
            logger.info("RabbitMQ cancelled the consumer of queue %s", queue)

    def _take_buffered(self, count: int) -> list[Delivery]:
        taken = []
        while self._buffer and len(taken) < count:
            taken.append(self._buffer.popleft())
        return taken

    def _ack_or_reject(self, action: str, ids: list[int], requeue: bool) -> None:
        held_ids, stale_count, unknown_count = self._sort_ids(ids)
        if stale_count:
            logger.warning(
                "skipped %s of %d deliveries from a lost connection to RabbitMQ; "
                "the broker delivers them again",
                action,
                stale_count,
            )
        if unknown_count:
            logger.warning(
                "skipped %s of %d deliveries that this stream does not hold",
                action,
                unknown_count,
            )
        if not held_ids:
            return

        if action == "ack":
            self._send_acks(held_ids)
        else:
            self._send_rejects(held_ids, requeue)
        self._commit(action)
        self._forget(held_ids)
        if action == "ack":
            logger.debug("acked %d messages", len(held_ids))
        else:
            logger.debug("rejected %d messages requeue=%s", len(held_ids), requeue)

    def _sort_ids(self, ids: list[int]) -> tuple[list[int], int, int]:
        """Return the held ids, and the counts of stale and unknown ids."""
        stale_count = sum(1 for delivery_id in ids if delivery_id <= self._tag_base)
        held_ids = [delivery_id for delivery_id in ids if delivery_id in self._held]
        unknown_count = len(ids) - stale_count - len(held_ids)
        return held_ids, stale_count, unknown_count

    def _send_acks(self, held_ids: list[int]) -> None:
        """Send the acks of `held_ids`, which take effect at the next commit."""
        assert self._consume_channel is not None
        self._has_uncommitted = True
        if self._is_contiguous(held_ids):
            # One ack with multiple=True covers every held tag up to the last.
            self._consume_channel.basic_ack(
                max(held_ids) - self._tag_base, multiple=True
            )
            return
        for delivery_id in held_ids:
            self._consume_channel.basic_ack(delivery_id - self._tag_base)

    def _send_rejects(self, held_ids: list[int], requeue: bool) -> None:
        """Send the rejects of `held_ids`, which take effect at the next commit."""
        assert self._consume_channel is not None
        self._has_uncommitted = True
        for delivery_id in held_ids:
            self._consume_channel.basic_nack(
                delivery_id - self._tag_base, requeue=requeue
            )

    def _forget(self, held_ids: list[int]) -> None:
        for delivery_id in held_ids:
            del self._held[delivery_id]

    def _is_contiguous(self, ids: list[int]) -> bool:
        """Return True when `ids` are all the unacked ids up to their maximum."""
        highest = max(ids)
        outstanding = sum(1 for delivery_id in self._held if delivery_id <= highest)
        outstanding += sum(
            1 for delivery in self._buffer if int(delivery.delivery_id) <= highest
        )
        return outstanding == len(ids)

    def _depths(self, names: list[str]) -> dict[str, int]:
        assert self._connection is not None
        counts: dict[str, int] = {}
        for name in names:
            # Count the holding queue first: a message that moves to the main
            # queue in between is then counted twice, never missed.
            delayed = self._count_ready(name + DELAYED_SUFFIX) or 0
            counts[name] = delayed + (self._count_ready(name) or 0)
        # Dispatch the deliveries that arrived before the counts.
        self._connection.process_data_events(time_limit=0)
        for delivery in self._buffer:
            if delivery.queue in counts:
                counts[delivery.queue] += 1
        for queue in self._held.values():
            if queue in counts:
                counts[queue] += 1
        return counts

    def _count_ready(self, queue: str) -> int | None:
        """Return the messages ready in `queue`, or None when it does not exist."""
        if queue in self._consumer_tags:
            # On the consume channel, each delivery made before the count
            # arrives ahead of the reply, so `_depths` finds it in the buffer.
            assert self._consume_channel is not None
            result = self._consume_channel.queue_declare(queue, passive=True)
        else:
            result = self._admin(
                "count messages in queue",
                queue,
                lambda channel: channel.queue_declare(queue, passive=True),
                is_missing_ok=True,
            )
        return None if result is None else result.method.message_count

    def _delete(self, names: list[str]) -> None:
        assert self._consume_channel is not None
        for name in names:
            if name in self._consumer_tags:
                self._cancel_consumer(name)
            self._release_buffered(lambda delivery, n=name: delivery.queue == n, False)
            dropped = [
                delivery_id
                for delivery_id, queue in self._held.items()
                if queue == name
            ]
            self._send_rejects(dropped, requeue=False)
            self._forget(dropped)
            # Commit while the queue exists: RabbitMQ leaves undefined what a
            # transaction does with a queue deleted before its commit.
            self._commit_pending("drop messages")
            self._known_queues.discard(name)
            for doomed in (name, name + DELAYED_SUFFIX):
                self._admin(
                    "delete queue", doomed, lambda c, q=doomed: c.queue_delete(q)
                )


def _declare_queue(channel: BlockingChannel, name: str) -> None:
    channel.queue_declare(name, durable=True)


def _declare_holding_queue(channel: BlockingChannel, name: str) -> None:
    """Declare the queue where the delayed messages of `name` wait."""
    channel.queue_declare(
        name + DELAYED_SUFFIX,
        durable=True,
        arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": name},
    )


def _queue_names(queues: Iterable[str]) -> list[str]:
    if isinstance(queues, str):
        raise TypeError(
            f"invalid queues={queues!r}: expected a list of queue names, "
            f"for example [{queues!r}]"
        )
    names = list(dict.fromkeys(queues))
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"invalid queue name {name!r}: must be a non-empty string")
        if len(name.encode()) > MAX_QUEUE_NAME_BYTES:
            raise ValueError(
                f"invalid queue name {name!r}: must be at most "
                f"{MAX_QUEUE_NAME_BYTES} bytes in UTF-8"
            )
    return names


def _delivery_ids(deliveries: Sequence[Delivery]) -> list[int]:
    return list(dict.fromkeys(int(delivery.delivery_id) for delivery in deliveries))


def _check_delay(delay_s: float) -> None:
    if isinstance(delay_s, bool) or not isinstance(delay_s, int | float):
        raise TypeError(
            f"invalid delay_s={delay_s!r}: expected a number of seconds, "
            f"got {type(delay_s).__name__}"
        )
    if not (math.isfinite(delay_s) and delay_s >= 0):
        raise ValueError(f"invalid delay_s={delay_s!r}: must be 0 or more")


def _check_position(position: tuple[str, int]) -> None:
    key, count = position
    _queue_names([key])
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(
            f"invalid position {count!r} for key {key!r}: must be an int of 0 or more"
        )


def _check_bodies(messages: Sequence[tuple[str, bytes]]) -> None:
    for queue, body in messages:
        if not isinstance(body, bytes | bytearray | memoryview):
            raise TypeError(
                f"invalid message body for queue {queue!r}: expected bytes, "
                f"got {type(body).__name__}; encode the item first"
            )


def _settle_batches(
    messages: Sequence[tuple[str, bytes]],
    delayed: Mapping[float, Sequence[tuple[str, bytes]]] | None,
) -> list[_Batch]:
    """Check the messages of a `settle`, and return the non-empty batches."""
    if delayed is None:
        delayed = {}
    if not isinstance(delayed, Mapping):
        raise TypeError(
            f"invalid delayed={delayed!r}: expected a mapping of delay_s to "
            "(queue, body) pairs, for example {5.0: [('jobs', b'retry')]}"
        )
    batches: list[_Batch] = []
    for delay_s, pairs in [(0.0, messages), *delayed.items()]:
        _check_delay(delay_s)
        _check_bodies(pairs)
        _queue_names(queue for queue, _ in pairs)
        if pairs:
            batches.append((float(delay_s), pairs))
    return batches


def _routing(delay_s: float) -> tuple[str, pika.BasicProperties]:
    """Return the queue suffix and the properties of messages delayed by `delay_s`."""
    if delay_s <= 0:
        return "", _PERSISTENT
    properties = pika.BasicProperties(
        delivery_mode=pika.DeliveryMode.Persistent,
        expiration=str(max(1, math.ceil(delay_s * 1000))),
    )
    return DELAYED_SUFFIX, properties


def _missing_queues_message(names: list[str], action: str = "publish") -> str:
    listed = ", ".join(repr(name) for name in names)
    return (
        f"{action} failed: queue {listed} not found on RabbitMQ; declare the "
        "queues before publishing to them"
    )


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


def _do_nothing() -> None:
    pass
