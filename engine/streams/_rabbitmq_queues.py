"""Queue administration for `RabbitMQStream`: declare, count and delete queues.

Every queue `q` has a holding queue `q.delayed` for delayed messages, which
dead-letters them to `q` when they expire. Most declares, counts and deletes
run on the admin channel through `_admin`, which reopens that channel when
the broker closes it on a failure, so the consume channel and its
deliveries stay valid.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import pika
import pika.exceptions

from engine.errors import StreamError

if TYPE_CHECKING:
    from pika.adapters.blocking_connection import BlockingChannel

T = TypeVar("T")

# Suffix of the holding queue that keeps a queue's delayed messages.
DELAYED_SUFFIX = ".delayed"

_PERSISTENT = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)


class QueueAdminMixin:
    """The queue administration of `RabbitMQStream`, and its depth counts.

    Its operations run under the stream's lock, through `_run`, and use the
    state that `RabbitMQStream.__init__` sets.
    """

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
