"""The contract that every data stream backend fulfils.

A stream contains durable named queues of opaque byte messages. A node process
opens its own stream (never one inherited across a fork), pulls a batch, and
settles it: publishes the results and acknowledges the batch as one step.
Messages pulled by a process that dies without acknowledging them become
visible again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message pulled from a queue and not yet acknowledged."""

    queue: str
    body: bytes
    # Backend-specific handle that `ack` and `reject` take back.
    delivery_id: int | str
    # True when the message was pulled before by a process that did not ack it.
    is_redelivered: bool = False


@runtime_checkable
class Stream(Protocol):
    """Durable queues of byte messages, with at-least-once delivery."""

    def declare(self, queues: Iterable[str]) -> None:
        """Create the queues if they do not exist yet."""

    def publish(
        self,
        messages: Sequence[tuple[str, bytes]],
        delay_s: float = 0.0,
        position: tuple[str, int] | None = None,
    ) -> None:
        """Publish `(queue, body)` pairs; they are durable when this returns.

        With `delay_s` above 0, the messages become visible only that many
        seconds later (for retry backoff). With `position=(key, count)`, the
        stream stores `count` under `key` atomically with the messages: a
        source records how many items it has published, so that a restarted
        process of it skips them.
        """

    def read_position(self, key: str) -> int:
        """Return the count last stored under `key` by `publish`, or 0."""

    def pull(
        self, queues: Sequence[str], max_count: int, timeout_s: float
    ) -> list[Delivery]:
        """Pull up to `max_count` messages from `queues`.

        Waits up to `timeout_s` seconds to fill the batch, and returns what
        it has then, possibly nothing.
        """

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge messages: they are removed for good."""

    def settle(
        self,
        deliveries: Sequence[Delivery],
        messages: Sequence[tuple[str, bytes]],
        delayed: Mapping[float, Sequence[tuple[str, bytes]]] | None = None,
    ) -> bool:
        """Publish `messages` and the `delayed` ones, and ack `deliveries`, atomically.

        `delayed` maps a delay in seconds to the `(queue, body)` pairs that
        become visible after it. Either all of it happens or none of it: a
        process that dies during the call leaves its deliveries unacked and
        nothing published, so that a batch's results never exist beside its
        redelivered inputs. Returns False, with nothing published, when the
        stream no longer holds every delivery, as after a lost lease. The
        deliveries it still owns are then made visible again.
        """

    def extend_lease(self, deliveries: Sequence[Delivery]) -> None:
        """Keep pulled messages from being delivered elsewhere for a while longer."""

    def reject(self, deliveries: Sequence[Delivery], requeue: bool) -> None:
        """Reject messages: make them visible again, or drop them."""

    def depth(self, queue: str) -> int:
        """Return the number of messages in `queue`, pulled or not."""

    def depths(self, queues: Sequence[str]) -> dict[str, int]:
        """Return the number of messages in each of `queues`, pulled or not.

        A backend may count every queue in one request, so prefer this to
        calling `depth` in a loop. A queue that does not exist counts 0.
        """

    def has_queue(self, queue: str) -> bool:
        """Return True when `queue` was declared and not deleted since."""

    def delete_queues(self, queues: Iterable[str]) -> None:
        """Delete the queues and every message in them."""

    def recover(self, owner: str) -> int:
        """Make the messages pulled by the dead process `owner` visible again.

        Returns how many messages were recovered. Backends whose broker
        redelivers on connection loss return 0.
        """

    def close(self) -> None:
        """Close the connection; unacknowledged messages become visible again."""
