"""Checks and conversions of the arguments that `RabbitMQStream` takes.

They raise TypeError or ValueError naming the bad value, before a call
reaches the broker.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from engine.streams._rabbitmq_queues import DELAYED_SUFFIX

if TYPE_CHECKING:
    from engine.streams.base import Delivery

# Messages of one delay in seconds, as `(queue, body)` pairs. A delay of 0
# publishes them at once.
_Batch = tuple[float, Sequence[tuple[str, bytes]]]

# AMQP 0-9-1 sends a queue name as a short string of at most 255 bytes, and
# the holding queue's name adds the suffix.
MAX_QUEUE_NAME_BYTES = 255 - len(DELAYED_SUFFIX)


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
