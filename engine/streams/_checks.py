"""Checks of the arguments that every stream backend takes.

They raise TypeError or ValueError naming the bad value, before a call
reaches SQLite or the broker.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.streams.base import Delivery


def unique_queue_names(
    queues: Iterable[str], max_bytes: int | None = None
) -> list[str]:
    """Return the queue names without repeats, after checking each one.

    `max_bytes` limits the length of a name in UTF-8, when the backend has a
    limit.
    """
    if isinstance(queues, str):
        raise TypeError(
            f"invalid queues={queues!r}: expected a list of queue names, "
            f"for example [{queues!r}]"
        )
    names = list(dict.fromkeys(queues))
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"invalid queue name {name!r}: must be a non-empty string")
        if max_bytes is not None and len(name.encode()) > max_bytes:
            raise ValueError(
                f"invalid queue name {name!r}: must be at most "
                f"{max_bytes} bytes in UTF-8"
            )
    return names


def delivery_ids(deliveries: Sequence[Delivery]) -> list[int]:
    """Return the ids of `deliveries` as ints, without repeats."""
    return list(dict.fromkeys(int(delivery.delivery_id) for delivery in deliveries))


def check_delay(delay_s: float) -> None:
    """Raise unless `delay_s` is a finite number of seconds, 0 or more."""
    if isinstance(delay_s, bool) or not isinstance(delay_s, int | float):
        raise TypeError(
            f"invalid delay_s={delay_s!r}: expected a number of seconds, "
            f"got {type(delay_s).__name__}"
        )
    if not (math.isfinite(delay_s) and delay_s >= 0):
        raise ValueError(f"invalid delay_s={delay_s!r}: must be 0 or more")


def check_position(position: tuple[str, int]) -> None:
    """Raise unless `position` is a `(key, count)` pair with a count of 0 or more."""
    key, count = position
    if not isinstance(key, str) or not key:
        raise ValueError(f"invalid position key {key!r}: must be a non-empty string")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(
            f"invalid position {count!r} for key {key!r}: must be an int of 0 or more"
        )


def check_bodies(messages: Sequence[tuple[str, bytes]]) -> None:
    """Raise TypeError for a message body that is not bytes."""
    for queue, body in messages:
        if not isinstance(body, bytes | bytearray | memoryview):
            raise TypeError(
                f"invalid message body for queue {queue!r}: expected bytes, "
                f"got {type(body).__name__}; encode the item first"
            )
