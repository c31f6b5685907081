"""Publishing with publisher confirms, on the publish channel of `RabbitMQStream`.

The channel is in confirm mode, and `_publish` sends a whole batch before
it waits once for the broker's confirms of every message.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import pika
import pika.exceptions

from engine.errors import StreamError, StreamUnavailableError
from engine.streams._rabbitmq_queues import (
    DELAYED_SUFFIX,
    _declare_holding_queue,
    _missing_queues_message,
    _routing,
)

# Maximum time that `publish` waits for the broker's confirms, and that a
# commit waits for tx.commit-ok. A broker under a memory or disk alarm blocks
# publishers and replies to neither until the alarm ends.
CONFIRM_TIMEOUT_S = 60.0


class PublisherMixin:
    """The publishing with confirms of `RabbitMQStream`, and its publish channel.

    Its operations run under the stream's lock, through `_run`, and use the
    state that `RabbitMQStream.__init__` sets.
    """

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


def _do_nothing() -> None:
    pass
