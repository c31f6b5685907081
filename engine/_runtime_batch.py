"""The processing of one batch: decode, call the node function, settle.

The results and the failure records of a batch, and the ack of its
inputs, commit in one `settle` of the stream. The results on each edge
travel packed, several items to a message.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from engine._runtime_counters import BATCH_IN_FLIGHT, BATCHES, ITEMS_IN
from engine.errors import EngineError
from engine.items import (
    DecodingError,
    EncodingError,
    derived_item_id,
    encode,
    pack,
    unpack,
)
from engine.recipe import Output

if TYPE_CHECKING:
    from engine.streams import Delivery

# Every log line of the runtime names `engine.runtime`, whichever part writes it.
logger = logging.getLogger("engine.runtime")


class BatchMixin:
    """The batch processing of `NodeRunner`.

    Its methods use the state that `NodeRunner.__init__` sets.
    """

    def _process_batch(self, deliveries: list[Delivery]) -> None:
        batch = _Batch()
        envelopes: list[tuple[Delivery, dict[str, Any]]] = []
        for delivery in deliveries:
            try:
                unpacked = self._unpack(delivery)
            except DecodingError as exc:
                envelope = {
                    "id": f"undecodable:{delivery.delivery_id}",
                    "attempt": 1,
                    "payload": delivery.body.decode("utf-8", "replace"),
                }
                self._fail(envelope, delivery, exc, batch, retry=False)
                continue
            envelopes.extend((delivery, envelope) for envelope in unpacked)

        self.counters[ITEMS_IN] += len(envelopes)
        self.lease_keeper.deliveries = deliveries
        # After a process of this node died in a batched call, a redelivered
        # batch may hold the item that killed it: take such a batch one item
        # at a time, so that a death names its item. Items redelivered after
        # a stop or a lost connection are no suspects.
        has_batch_died = BATCH_IN_FLIGHT in self.launch.crash_counts
        is_suspect = has_batch_died and any(
            delivery.is_redelivered for delivery in deliveries
        )
        if self.spec.is_batched and not is_suspect:
            self._mark_in_flight(BATCH_IN_FLIGHT)
            # The messages may contain more items than the batch size in all,
            # but the function never gets more than batch_size at once.
            size = self.spec.settings.batch_size
            for start in range(0, len(envelopes), size):
                self._call_batched(envelopes[start : start + size], batch)
            self._mark_in_flight("")
        else:
            for delivery, envelope in envelopes:
                if self._has_crashed_too_often(delivery, envelope, batch):
                    continue
                self._mark_in_flight(envelope.get("id", ""))
                if self.spec.is_batched:
                    self._call_batched([(delivery, envelope)], batch)
                else:
                    self._call_one(delivery, envelope, batch)
            self._mark_in_flight("")

        # The results and the ack of the inputs commit together. A crash
        # before leaves nothing published and the inputs delivered again, so
        # results never exist twice, even those a batched node combined from
        # many inputs.
        is_settled = self._settle(
            deliveries, self._packed(batch.outgoing), batch.retries
        )
        self.lease_keeper.deliveries = []
        if not is_settled:
            logger.warning(
                "node %s dropped the results of a batch of %d items, which the "
                "stream no longer held (a lease expired or the connection was "
                "lost); they are delivered again",
                self.launch.node_id,
                len(envelopes),
            )
            return
        self._count_published(batch)
        if not (batch.outgoing or batch.retries):
            # A sink's batch publishes nothing, and counts all the same.
            self.counters[BATCHES] += 1
        logger.debug(
            "batch done node=%s in=%d out=%d failed=%d",
            self.launch.node_id,
            len(envelopes),
            batch.results,
            batch.failures,
        )

    def _unpack(self, delivery: Delivery) -> list[dict[str, Any]]:
        """Return the envelopes of a message, decoded once per delivery."""
        envelopes = self._unpacked.pop(delivery.delivery_id, None)
        if envelopes is None:
            envelopes = unpack(delivery.body, self.recipe.serializer)
        return envelopes

    def _packed(self, messages: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        """Pack the results on each edge into messages of up to its batch size.

        The other messages, the failure records, stay one item each. The
        items of an edge keep their order.
        """
        sizes = self._pack_sizes
        packed: list[tuple[str, bytes]] = []
        bodies: dict[str, list[bytes]] = {}
        for queue, body in messages:
            if queue in sizes:
                bodies.setdefault(queue, []).append(body)
            else:
                packed.append((queue, body))
        serializer = self.recipe.serializer
        for queue, queue_bodies in bodies.items():
            size = sizes[queue]
            for start in range(0, len(queue_bodies), size):
                body = pack(queue_bodies[start : start + size], serializer)
                packed.append((queue, body))
        return packed

    def _call_one(
        self, delivery: Delivery, envelope: dict[str, Any], batch: _Batch
    ) -> None:
        item_id = envelope.get("id", "")
        self.context.item_ids = [item_id]
        # A failed item publishes none of its results, so they are cut off
        # the batch again. That costs less than staging each item's results.
        published = len(batch.outgoing)
        results = batch.results
        try:
            self._place_results(
                item_id, self._call_function(envelope["payload"]), batch, envelope
            )
        except EncodingError as exc:
            del batch.outgoing[published:]
            batch.results = results
            # The same result fails to encode on every attempt.
            self._fail(envelope, delivery, exc, batch, retry=False)
        except Exception as exc:
            del batch.outgoing[published:]
            batch.results = results
            self._fail(envelope, delivery, exc, batch, retry=True)

    def _call_function(self, payload: Any) -> list[Any]:
        function = self.spec.function
        if self.spec.takes_context:
            value = function(payload, self.context)
        else:
            value = function(payload)
        if self.spec.kind == "sink":
            return []
        if _is_generator(value):
            return list(value)
        return [] if value is None else [value]

    def _call_batched(
        self, envelopes: list[tuple[Delivery, dict[str, Any]]], batch: _Batch
    ) -> None:
        if not envelopes:
            return
        staged = _Batch()
        try:
            self._apply_batch(envelopes, staged)
        except Exception as exc:
            if len(envelopes) == 1:
                delivery, envelope = envelopes[0]
                self._fail(envelope, delivery, exc, batch, retry=True)
                return
            # Find the bad items: apply the batch again one item at a time.
            logger.debug(
                "batch failed in node %s (%s); retrying its %d items one by one",
                self.launch.node_id,
                exc,
                len(envelopes),
            )
            for pair in envelopes:
                self._call_batched([pair], batch)
            return
        batch.merge(staged)

    def _apply_batch(
        self, envelopes: list[tuple[Delivery, dict[str, Any]]], staged: _Batch
    ) -> None:
        payloads = [envelope["payload"] for _, envelope in envelopes]
        item_ids = [envelope.get("id", "") for _, envelope in envelopes]
        self.context.item_ids = item_ids
        function = self.spec.function
        if self.spec.takes_context:
            value = function(payloads, self.context)
        else:
            value = function(payloads)
        if self.spec.kind == "sink" or value is None:
            return
        if not isinstance(value, list | tuple) and not _is_generator(value):
            # A str or a dict is iterable too, and would be sent on as its
            # characters or its keys.
            raise TypeError(
                f"batched transform {self.spec.name!r} returned "
                f"{type(value).__name__}, not a list of results; return a list, "
                "such as [total] for one result per batch"
            )
        batch_id = derived_item_id("|".join(sorted(item_ids)), "batch", 0)
        self._place_results(batch_id, list(value), staged, envelopes[0][1])

    def _place_results(
        self,
        parent_id: str,
        results: list[Any],
        staged: _Batch,
        parent: dict[str, Any] | None,
    ) -> None:
        """Encode `results` for the edges that the route and filters choose.

        Only the results that go to at least one edge count as published.
        """
        serializer = self.recipe.serializer
        fixed_queues = self._fixed_queues
        name = self.spec.name
        outgoing = staged.outgoing
        published = 0
        for index, result in enumerate(results):
            if parent is None:
                item_id = parent_id
            else:
                item_id = derived_item_id(parent_id, name, index)
            body = encode({"id": item_id, "attempt": 1, "payload": result}, serializer)
            if fixed_queues is not None:
                outgoing.extend((queue, body) for queue in fixed_queues)
                published += 1
                continue
            outputs = self._choose_outputs(result)
            for output in outputs:
                outgoing.append((output.queue, body))
            if outputs:
                published += 1
        staged.results += published

    def _choose_outputs(self, result: Any) -> list[Output]:
        outputs = self.recipe.outputs
        if self.spec.route is not None:
            chosen = self.spec.route(result)
            if chosen is None:
                return []
            names = _route_names(self.spec.name, chosen)
            known = {output.target for output in outputs}
            unknown = sorted(names - known)
            if unknown:
                raise EngineError(
                    f"route of node {self.spec.name!r} returned {unknown[0]!r}, "
                    "which is not a downstream node; expected one of "
                    + ", ".join(repr(name) for name in sorted(known))
                )
            outputs = tuple(output for output in outputs if output.target in names)
        return [
            output for output in outputs if output.when is None or output.when(result)
        ]


class _Batch:
    """The output of one batch, published together before the ack."""

    __slots__ = ("outgoing", "retries", "results", "failures")

    def __init__(self) -> None:
        # (queue, body) pairs: results on their edges plus failure records.
        self.outgoing: list[tuple[str, bytes]] = []
        # Retry messages by their delay in seconds.
        self.retries: dict[float, list[tuple[str, bytes]]] = {}
        self.results = 0
        self.failures = 0

    def merge(self, other: _Batch) -> None:
        self.outgoing.extend(other.outgoing)
        for delay_s, messages in other.retries.items():
            self.retries.setdefault(delay_s, []).extend(messages)
        self.results += other.results
        self.failures += other.failures


def _is_generator(value: Any) -> bool:
    return hasattr(value, "__next__") and hasattr(value, "send")


def _route_names(node: str, chosen: Any) -> set[str]:
    """Return the node names that a route returned, or raise for another value."""
    if isinstance(chosen, str):
        return {chosen}
    if isinstance(chosen, (list, tuple, set, frozenset)) and all(
        isinstance(name, str) for name in chosen
    ):
        return set(chosen)
    raise EngineError(
        f"route of node {node!r} returned {chosen!r}; expected a node name, "
        "a list of node names, or None to drop the result"
    )
