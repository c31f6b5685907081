"""The loop of a source node: publish what its generator yields, batch by batch.

Each batch is published together with the source's position, so that a
restarted process skips the items that an earlier one published.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Generator, Iterable
from typing import Any

from engine._runtime_batch import _Batch
from engine.errors import EngineError
from engine.items import source_item_id, source_position_key

# Every log line of the runtime names `engine.runtime`, whichever part writes it.
logger = logging.getLogger("engine.runtime")


class SourceMixin:
    """The source loop of `NodeRunner`.

    Its methods use the state that `NodeRunner.__init__` sets.
    """

    def _prepare_position(self) -> int:
        """Return how many items an earlier process of this source published.

        The first process of a run starts from 0 and stores 0, so that a
        position left by an earlier run is never read as this run's.
        """
        key = source_position_key(self.recipe.node_type, self.launch.process_index)
        if not self.launch.resume_position:
            self.stream.publish([], position=(key, 0))
            return 0
        published = self.stream.read_position(key)
        if published:
            logger.info(
                "node %s skips the first %d items of its source, which an earlier "
                "process published",
                self.launch.node_id,
                published,
            )
        return published

    def _run_source(self) -> tuple:
        items = self._call_source()
        key = source_position_key(self.recipe.node_type, self.launch.process_index)
        batch = _Batch()
        deadline = time.monotonic() + self.spec.settings.batch_timeout_s
        position = 0
        for position, payload in enumerate(items, start=1):
            # The generator must yield the same items in the same order on
            # every run, as the item ids already assume.
            if position <= self.skip_count:
                continue
            item_id = source_item_id(
                self.spec.name, position - 1, self.launch.process_index
            )
            try:
                self._place_results(item_id, [payload], batch, parent=None)
            except Exception as exc:
                envelope = {"id": item_id, "attempt": 1, "payload": payload}
                self._fail(envelope, None, exc, batch, retry=False)
            is_full = position % self.spec.settings.batch_size == 0
            if is_full or time.monotonic() >= deadline:
                self._publish(batch, (key, position))
                batch = _Batch()
                deadline = time.monotonic() + self.spec.settings.batch_timeout_s
            if self._should_stop():
                self._publish(batch, (key, position))
                return ("stopped", self.stats())
        if position > self.skip_count:
            self._publish(batch, (key, position))
        return ("completed", self.stats())

    def _call_source(self) -> Iterable[Any]:
        function = self.spec.function
        items = function(self.context) if self.spec.takes_context else function()
        if items is None:
            return ()
        if inspect.isgenerator(items):
            return _watch_return(items, self.launch.node_id)
        try:
            return iter(items)
        except TypeError:
            raise EngineError(
                f"source node {self.spec.name!r} returned {type(items).__name__}, "
                "not an iterable; make it a generator function that yields items"
            ) from None

    def _publish(self, batch: _Batch, position: tuple[str, int]) -> None:
        """Publish a source batch and the source's new position atomically."""
        # A source fails its items without retries, so a batch has none.
        self.stream.publish(self._packed(batch.outgoing), position=position)
        self._count_published(batch)


def _watch_return(generator: Generator[Any, Any, Any], node_id: str) -> Iterable[Any]:
    """Yield what `generator` yields, and warn if it also returns a value.

    A generator's `return value` ends it and publishes nothing, which looks
    like an empty source when the function meant to return its items.
    """
    value = yield from generator
    if value is not None:
        logger.warning(
            "source %s returned %s from its generator, which publishes nothing; "
            "yield the items instead",
            node_id,
            type(value).__name__,
        )
