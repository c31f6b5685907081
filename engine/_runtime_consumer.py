"""The loop of a transform or sink node: pull batches until the task completes.

The loop waits for a batch to fill, reads the complete flag that the
worker sets, and completes once upstream completed and its input queues
are drained.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from engine.items import DecodingError, unpack

if TYPE_CHECKING:
    from engine.streams import Delivery

# The time an idle transform spends on one pull and the wait after it, so that
# it does not spin on empty pulls.
IDLE_PULL_TIMEOUT_S = 0.2
# How often an idle node reads its complete flag while it waits between pulls.
FLAG_CHECK_INTERVAL_S = 0.02
# How long the first pull after a batch waits before the complete flag is read,
# because an upstream node usually completes right after its last batch. Then
# the pull goes on waiting for its batch to fill, up to batch_timeout_s in all.
FLAG_AFTER_BATCH_S = 0.02
# The first wait of a completing node whose inputs are not drained yet, such as
# items that a sibling process holds. Each wait doubles, up to IDLE_PULL_TIMEOUT_S.
DRAIN_CHECK_MIN_S = 0.01


class ConsumerMixin:
    """The pull loop of `NodeRunner` for transforms and sinks.

    Its methods use the state that `NodeRunner.__init__` sets.
    """

    def _run_consumer(self) -> tuple:
        settings = self.spec.settings
        queues = list(self.recipe.input_queues)
        drain_wait_s = DRAIN_CHECK_MIN_S
        first_wait_s = FLAG_AFTER_BATCH_S
        while True:
            if self._should_stop():
                return ("stopped", self.stats())
            is_completing = self.complete.is_set()
            if is_completing:
                # Upstream has completed, so only retries and redeliveries can
                # still arrive: waiting for the batch to fill gains nothing.
                deliveries = self._take_prefetched() or self._pull_items(
                    queues, settings.batch_size, 0.0
                )
            else:
                deliveries = self._pull_until_complete(queues, first_wait_s)
            if deliveries:
                started_ns = time.perf_counter_ns()
                self._process_batch(deliveries)
                self._record_batch_duration(time.perf_counter_ns() - started_ns)
                reason = self._memory_over_limit()
                if reason:
                    return ("recycle", reason)
                drain_wait_s = DRAIN_CHECK_MIN_S
                first_wait_s = FLAG_AFTER_BATCH_S
                continue
            # The flag is read before the pull: an empty pull after it was set,
            # and input queues that count 0, mean every upstream item was seen.
            if is_completing and self._inputs_drained(queues):
                return ("completed", self.stats())
            if is_completing:
                time.sleep(drain_wait_s)
                drain_wait_s = min(2 * drain_wait_s, IDLE_PULL_TIMEOUT_S)
                continue
            # Idle: the next pull waits in one piece, because each piece starts
            # polling the stream at short intervals again.
            first_wait_s = settings.batch_timeout_s
            if settings.batch_timeout_s < IDLE_PULL_TIMEOUT_S:
                # An idle node waits here instead of spinning on empty pulls.
                self._wait_for_complete(IDLE_PULL_TIMEOUT_S - settings.batch_timeout_s)

    def _inputs_drained(self, queues: list[str]) -> bool:
        return all(depth == 0 for depth in self.stream.depths(queues).values())

    def _pull_until_complete(
        self, queues: list[str], first_wait_s: float
    ) -> list[Delivery]:
        """Pull a batch, waiting up to batch_timeout_s for it to fill.

        After `first_wait_s` seconds of the wait the complete flag is read:
        once it is set, or a stop is requested, the pull returns what it has.
        """
        settings = self.spec.settings
        started = time.monotonic()
        first_wait_s = min(first_wait_s, settings.batch_timeout_s)
        deliveries = self._take_prefetched() or self._pull_items(
            queues, settings.batch_size, first_wait_s
        )
        count = self._count_items(deliveries)
        if count >= settings.batch_size:
            return deliveries
        if self.complete.is_set() or self.is_stop_requested:
            return deliveries
        remaining_s = settings.batch_timeout_s - (time.monotonic() - started)
        if remaining_s <= 0:
            return deliveries
        missing = settings.batch_size - count
        return deliveries + self._pull_items(
            queues, missing, remaining_s, batch_has_items=True
        )

    def _pull_items(
        self,
        queues: list[str],
        max_items: int,
        timeout_s: float,
        batch_has_items: bool = False,
    ) -> list[Delivery]:
        """Pull messages that contain up to `max_items` items, within `timeout_s`.

        A message contains one item or a pack of them. Each pull requests as
        many messages as the missing items fill at the size of the largest
        message of the last pull, rounded down and at least one. When the
        messages grew, the last ones can contain more items than the batch
        lacks. Those go back to their queue, so that a batch contains at
        most `max_items` items as long as no single message contains more.
        The first message stays, unless `batch_has_items` is True because
        the batch already contains the items of an earlier pull.
        """
        deadline = time.monotonic() + timeout_s
        deliveries: list[Delivery] = []
        sizes: list[int] = []
        while sum(sizes) < max_items:
            requested = max(1, (max_items - sum(sizes)) // self._items_per_message)
            remaining_s = max(0.0, deadline - time.monotonic())
            pulled = self.stream.pull(queues, requested, remaining_s)
            deliveries.extend(pulled)
            sizes.extend(self._decode_pulled(pulled))
            if len(pulled) < requested:
                # A pull waits until it has every requested message, so it
                # timed out, or found the queues empty at timeout 0.
                break
        self._return_surplus(deliveries, sizes, max_items, 0 if batch_has_items else 1)
        return deliveries

    def _return_surplus(
        self,
        deliveries: list[Delivery],
        sizes: list[int],
        max_items: int,
        kept_count: int,
    ) -> None:
        """Send the last messages back until the rest contain at most `max_items`.

        The first `kept_count` messages stay whatever they contain.
        """
        surplus: list[Delivery] = []
        while sum(sizes) > max_items and len(deliveries) > kept_count:
            surplus.append(deliveries.pop())
            sizes.pop()
            self._unpacked.pop(surplus[-1].delivery_id, None)
        if surplus:
            self.stream.reject(surplus, requeue=True)

    def _settle(
        self,
        deliveries: list[Delivery],
        messages: list[tuple[str, bytes]],
        delayed: dict[float, list[tuple[str, bytes]]],
    ) -> bool:
        """Settle a batch, and pull the next one in the same step where the stream can.

        The messages pulled this way start the next batch. A process that
        stops or recycles before that batch leaves them to `Stream.close`,
        which makes them visible again.
        """
        settle_and_pull = getattr(self.stream, "settle_and_pull", None)
        if settle_and_pull is None or self.is_stop_requested:
            return self.stream.settle(deliveries, messages, delayed)
        batch_size = self.spec.settings.batch_size
        requested = max(1, batch_size // self._items_per_message)
        is_settled, pulled = settle_and_pull(
            deliveries, messages, delayed, list(self.recipe.input_queues), requested
        )
        sizes = self._decode_pulled(pulled)
        self._return_surplus(pulled, sizes, batch_size, 1)
        self._prefetched = pulled
        return is_settled

    def _take_prefetched(self) -> list[Delivery]:
        """Return the messages that the last settle pulled, and forget them."""
        prefetched = self._prefetched
        self._prefetched = []
        return prefetched

    def _decode_pulled(self, pulled: list[Delivery]) -> list[int]:
        """Decode pulled messages and return their item counts.

        The largest count becomes the estimate of items per message that
        the next pull sizes its request by.
        """
        sizes = [self._decode_for_count(delivery) for delivery in pulled]
        if sizes:
            self._items_per_message = max(sizes)
        return sizes

    def _decode_for_count(self, delivery: Delivery) -> int:
        """Decode a pulled message for `_process_batch`; return its item count."""
        try:
            envelopes = unpack(delivery.body, self.recipe.serializer)
        except DecodingError:
            # `_process_batch` decodes it again and sends it to the fail queue.
            return 1
        self._unpacked[delivery.delivery_id] = envelopes
        return len(envelopes)

    def _count_items(self, deliveries: list[Delivery]) -> int:
        return sum(
            len(self._unpacked.get(delivery.delivery_id, ())) or 1
            for delivery in deliveries
        )

    def _wait_for_complete(self, timeout_s: float) -> None:
        """Sleep up to `timeout_s`, but wake once the complete flag is set or a
        stop is requested."""
        deadline = time.monotonic() + timeout_s
        while not (self.complete.is_set() or self.is_stop_requested):
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                return
            time.sleep(min(FLAG_CHECK_INTERVAL_S, remaining_s))

    def _should_stop(self) -> bool:
        return self.is_stop_requested

    def _memory_over_limit(self) -> str | None:
        limit = self.spec.settings.max_memory_bytes
        if limit is None:
            return None
        rss = self.process.memory_info().rss
        if rss <= limit:
            return None
        return f"resident memory {rss} bytes is over max_memory_bytes={limit}"
