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

`RabbitMQStream` is assembled from mixins in private modules, one concept
each: `_rabbitmq_connection` (connect, reconnect, heartbeats),
`_rabbitmq_publisher` (publish with confirms), `_rabbitmq_transactions`
(settle and positions), `_rabbitmq_consumer` (pull, ack and reject),
`_rabbitmq_queues` (declare, count and delete) and `_rabbitmq_checks`
(argument checks). `RabbitMQStream.__init__` sets the state of all of them.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from engine.streams import redact_url
from engine.streams._rabbitmq_checks import (
    MAX_QUEUE_NAME_BYTES,
    _check_bodies,
    _check_delay,
    _check_position,
    _delivery_ids,
    _queue_names,
    _settle_batches,
)
from engine.streams._rabbitmq_connection import BACKOFF_MAX_S, ConnectionMixin
from engine.streams._rabbitmq_consumer import MAX_PREFETCH, ConsumerMixin
from engine.streams._rabbitmq_publisher import CONFIRM_TIMEOUT_S, PublisherMixin
from engine.streams._rabbitmq_queues import DELAYED_SUFFIX, QueueAdminMixin
from engine.streams._rabbitmq_transactions import TransactionMixin

if TYPE_CHECKING:
    from types import TracebackType

    import pika
    from pika.adapters.blocking_connection import BlockingChannel

    from engine.streams.base import Delivery

__all__ = [
    "BACKOFF_MAX_S",
    "CONFIRM_TIMEOUT_S",
    "DELAYED_SUFFIX",
    "MAX_PREFETCH",
    "MAX_QUEUE_NAME_BYTES",
    "RabbitMQStream",
]

logger = logging.getLogger(__name__)


class RabbitMQStream(
    ConnectionMixin, QueueAdminMixin, PublisherMixin, TransactionMixin, ConsumerMixin
):
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
        only, and acked deliveries may come back (see `_commit` in
        `engine/streams/_rabbitmq_transactions.py`). With no
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

    def has_queue(self, queue: str) -> bool:
        """Return True when `queue` exists on the broker."""
        names = _queue_names([queue])
        return self._run("check queue", lambda: self._count_ready(names[0]) is not None)

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
