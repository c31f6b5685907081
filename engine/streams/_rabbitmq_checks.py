"""Checks and conversions of the arguments that `RabbitMQStream` takes.

They raise TypeError or ValueError naming the bad value, before a call
reaches the broker.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from engine.streams._checks import (
    check_bodies,
    check_delay,
    check_position,
    delivery_ids,
    unique_queue_names,
)
from engine.streams._rabbitmq_queues import DELAYED_SUFFIX

# Messages of one delay in seconds, as `(queue, body)` pairs. A delay of 0
# publishes them at once.
_Batch = tuple[float, Sequence[tuple[str, bytes]]]

# AMQP 0-9-1 sends a queue name as a short string of at most 255 bytes, and
# the holding queue's name adds the suffix.
MAX_QUEUE_NAME_BYTES = 255 - len(DELAYED_SUFFIX)


def _queue_names(queues: Iterable[str]) -> list[str]:
    return unique_queue_names(queues, MAX_QUEUE_NAME_BYTES)


def _check_position(position: tuple[str, int]) -> None:
    check_position(position)
    _queue_names([position[0]])


_delivery_ids = delivery_ids
_check_delay = check_delay
_check_bodies = check_bodies


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
