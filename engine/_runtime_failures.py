"""The failures of items in a node: retries, fail records and poison items.

A failed item is retried with backoff, up to the node's `retries`, and
then goes to the fail queue with its errors. An item that killed its
node process too often goes there at once.
"""

from __future__ import annotations

import logging
import time
import traceback
from typing import TYPE_CHECKING, Any

from engine._runtime_counters import IN_FLIGHT_BYTES
from engine.errors import EngineError
from engine.items import EncodingError, encode

if TYPE_CHECKING:
    from engine._runtime_batch import _Batch
    from engine.streams import Delivery

# Every log line of the runtime names `engine.runtime`, whichever part writes it.
logger = logging.getLogger("engine.runtime")


class NodeProcessDiedError(EngineError):
    """A node process died while processing an item, more often than retries allow."""

    # Its public home, which the traceback in a fail record names.
    __module__ = "engine.runtime"


class FailureMixin:
    """The handling of failed and poison items of `NodeRunner`.

    Its methods use the state that `NodeRunner.__init__` sets.
    """

    def _mark_in_flight(self, item_id: str) -> None:
        if self.in_flight is not None:
            self.in_flight.value = item_id.encode()[: IN_FLIGHT_BYTES - 1]

    def _has_crashed_too_often(
        self, delivery: Delivery, envelope: dict[str, Any], batch: _Batch
    ) -> bool:
        """Send an item that killed its process too often to the fail queue."""
        crashes = self.launch.crash_counts.get(envelope.get("id", ""), 0)
        if crashes <= self.spec.settings.retries:
            return False
        times = "once" if crashes == 1 else f"{crashes} times"
        error = NodeProcessDiedError(
            f"the node process died {times} while processing this item "
            f"(last: {self.launch.last_crash or 'unknown'}); it is not retried"
        )
        record = dict(envelope)
        record["attempt"] = max(int(envelope.get("attempt", 1)), crashes)
        self._fail(record, delivery, error, batch, retry=False)
        return True

    def _fail(
        self,
        envelope: dict[str, Any],
        delivery: Delivery | None,
        exc: BaseException,
        batch: _Batch,
        retry: bool,
    ) -> None:
        """Stage a retry of the item, or its record for the fail queue."""
        attempt = int(envelope.get("attempt", 1))
        error = {
            "node": self.spec.name,
            "node_id": self.launch.node_id,
            "attempt": attempt,
            "type": type(exc).__name__,
            "message": str(exc),
            "traceback": self._format_traceback(exc),
            "time": time.time(),
        }
        record = dict(envelope)
        record["errors"] = [*envelope.get("errors", []), error]
        settings = self.spec.settings
        if retry and delivery is not None and attempt <= settings.retries:
            record["attempt"] = attempt + 1
            delay_s = settings.retry_backoff_s * 2 ** (attempt - 1)
            batch.retries.setdefault(delay_s, []).append(
                (delivery.queue, self._encode_record(record))
            )
            logger.debug(
                "item %s failed in %s attempt=%d; retrying in %.1f s",
                envelope.get("id"),
                self.launch.node_id,
                attempt,
                delay_s,
            )
            return
        record["queue"] = delivery.queue if delivery is not None else None
        batch.outgoing.append((self.recipe.fail_queue, self._encode_record(record)))
        batch.failures += 1
        logger.debug(
            "item %s failed in %s after %d attempts: %s",
            envelope.get("id"),
            self.launch.node_id,
            attempt,
            error["type"],
        )

    def _format_traceback(self, exc: BaseException) -> str:
        text = "".join(traceback.format_exception(exc))
        if not self.recipe.source_file:
            return text
        # The functions of the pipeline file travel by value, and cloudpickle
        # names their file "<dynamic-code>".
        return text.replace(
            'File "<dynamic-code>"', f'File "{self.recipe.source_file}"'
        )

    def _encode_record(self, record: dict[str, Any]) -> bytes:
        try:
            return encode(record, self.recipe.serializer)
        except EncodingError:
            # The payload itself is what failed to encode: keep its repr.
            record["payload"] = repr(record.get("payload"))
            return encode(record, "json")
