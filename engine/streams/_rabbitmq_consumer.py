"""Consuming for `RabbitMQStream`: prefetch, pull buffering, ack and reject.

The broker pushes messages to one consumer per pulled queue, and `_pull`
keeps those it does not return in a buffer for the next pull. The consume
channel is in transaction mode, so every ack and reject takes effect at a
commit.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from engine.streams._rabbitmq_connection import _ConsumeChannelLostError
from engine.streams.base import Delivery

if TYPE_CHECKING:
    import pika
    from pika.adapters.blocking_connection import BlockingChannel

# The public module's logger, so that one name covers every part of the stream.
logger = logging.getLogger("engine.streams.rabbitmq")


# basic.qos carries the prefetch count in a 16-bit field.
MAX_PREFETCH = 65535


class ConsumerMixin:
    """The consuming of `RabbitMQStream`: pull, the buffer, ack and reject.

    Its operations run under the stream's lock, through `_run`, and use the
    state that `RabbitMQStream.__init__` sets.
    """

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
