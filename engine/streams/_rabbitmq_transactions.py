"""Settling batches and storing positions in AMQP transactions.

The transactions run on the consume channel of `RabbitMQStream`, because a
delivery can be acked only on the channel that received it. `settle`
publishes a batch's results, acks its deliveries and commits, and
`publish(..., position=...)` stores a source's position with its messages.
`_commit` states what RabbitMQ guarantees about a commit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from engine.errors import StreamError, StreamUnavailableError
from engine.streams._rabbitmq_checks import _queue_names
from engine.streams._rabbitmq_connection import _ConsumeChannelLostError
from engine.streams._rabbitmq_publisher import CONFIRM_TIMEOUT_S, _do_nothing
from engine.streams._rabbitmq_queues import (
    DELAYED_SUFFIX,
    _missing_queues_message,
    _routing,
)

if TYPE_CHECKING:
    import pika

    from engine.streams._rabbitmq_checks import _Batch

# The public module's logger, so that one name covers every part of the stream.
logger = logging.getLogger("engine.streams.rabbitmq")


class TransactionMixin:
    """The transactions of `RabbitMQStream`: settle, positions and commits.

    Its operations run under the stream's lock, through `_run`, and use the
    state that `RabbitMQStream.__init__` sets.
    """

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
        even a part of them in one queue. And tx.commit-ok means that the
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
