"""The loop inside a node process: pull a batch, transform, settle.

A worker starts `node_main` in a new process for each node. The process loads
its recipe, opens its own stream connection, runs the `setup` hook and then
loops until its task completes or its worker stops it:

- a source publishes what its generator yields, batch by batch, and
  completes when the generator is exhausted;
- a transform or sink pulls a batch, calls the node function on each item,
  and settles the batch: it publishes every result (and every failure
  record) and acknowledges the inputs in one atomic step of the stream, so
  that a crash anywhere redelivers the batch and leaves none of its results.

The process reports to its worker over a one-way pipe: ("started",),
("completed", stats), ("stopped", stats), ("recycle", reason),
("recipe-failed", reason) or ("error", reason). Its counters live in shared
memory that the worker reads at any time, even after the process died.
"""

from __future__ import annotations

import bisect
import ctypes
import logging
import multiprocessing
import os
import signal
import threading
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_for_ready
from typing import TYPE_CHECKING, Any

import psutil

from engine.context import NodeContext
from engine.errors import EngineError, RecipeError
from engine.items import (
    DecodingError,
    EncodingError,
    decode,
    derived_item_id,
    encode,
    source_item_id,
    source_position_key,
)
from engine.logs import configure_logging
from engine.recipe import Output, Recipe, load_recipe
from engine.streams import open_stream

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from engine.streams import Delivery, Stream

logger = logging.getLogger(__name__)

# Positions in the shared counter array of a node process, a RawArray of
# signed 64-bit integers that the worker allocates with COUNTER_SLOTS slots.
# `counters_to_stats` names every slot.
ITEMS_IN, ITEMS_OUT, FAILURES, RETRIES, BATCHES = range(5)
COUNTER_NAMES = ("items_in", "items_out", "failures", "retries", "batches")
# The last values passed to `NodeContext.report_progress`, in the node's units.
PROGRESS_DONE = 5
PROGRESS_TOTAL = 6
# Sum of the measured batch durations, in nanoseconds.
BATCH_DURATION_SUM_NS = 7
# Upper bounds, in seconds, of the batch duration histogram. Each bound has a
# slot that counts the batches longer than the previous bound and at most this
# one, so the slots are not cumulative. One more slot counts the batches over
# the last bound.
BATCH_DURATION_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_DURATION_COUNTS = 8
COUNTER_SLOTS = BATCH_DURATION_COUNTS + len(BATCH_DURATION_BUCKETS_S) + 1

# Size of the shared memory that contains the id of the item in flight.
IN_FLIGHT_BYTES = 256


class NodeProcessDiedError(EngineError):
    """A node process died while processing an item, more often than retries allow."""


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


class SharedFlag:
    """A flag in shared memory: the worker sets it, the node process reads it.

    It replaces `multiprocessing.Event`, whose semaphore outlives a worker
    killed with SIGKILL and makes the resource tracker warn about a leak.
    """

    def __init__(self, context: Any) -> None:
        self.cell = context.RawValue("b", 0)

    def set(self) -> None:
        self.cell.value = 1

    def is_set(self) -> bool:
        return bool(self.cell.value)


@dataclass(frozen=True, slots=True)
class NodeLaunch:
    """The arguments that a worker passes to a new node process."""

    node_id: str
    worker_id: str
    recipe: bytes
    stream_url: str
    process_index: int
    process_count: int
    log_level: str = "info"
    log_format: str = "text"
    # How often, per item id, a process of this node died while processing
    # the item: the worker counts it, a new process gets the counts.
    crash_counts: dict[str, int] = field(default_factory=dict)
    # Signal or exit code of the last such death, for the fail record.
    last_crash: str = ""
    # True when an earlier process of this node started: a source then skips
    # the items that the stream records as published, instead of starting over.
    resume_position: bool = False


def counters_to_stats(counters: Sequence[int]) -> dict[str, Any]:
    """Return the shared counters of a node process as a dict.

    Besides the integer counters of COUNTER_NAMES, it contains `progress_done`
    and `progress_total`, `batch_duration_sum_s`, and
    `batch_duration_counts`: one count per bucket of BATCH_DURATION_BUCKETS_S
    and a last one for the batches over its largest bound, not cumulative.
    """
    stats: dict[str, Any] = {
        name: int(counters[i]) for i, name in enumerate(COUNTER_NAMES)
    }
    stats["progress_done"] = int(counters[PROGRESS_DONE])
    stats["progress_total"] = int(counters[PROGRESS_TOTAL])
    stats["batch_duration_sum_s"] = counters[BATCH_DURATION_SUM_NS] / 1e9
    stats["batch_duration_counts"] = [
        int(count) for count in counters[BATCH_DURATION_COUNTS:COUNTER_SLOTS]
    ]
    return stats


def node_main(
    launch: NodeLaunch,
    status: Connection,
    complete: SharedFlag,
    counters: Any,
    in_flight: Any,
) -> None:
    """Run one node until it completes, is stopped, or fails; the process entry."""
    configure_logging(launch.log_level, launch.log_format)  # type: ignore[arg-type]
    multiprocessing.current_process().name = f"{launch.worker_id}/{launch.node_id}"
    # The worker coordinates shutdown: Ctrl-C in a terminal reaches the whole
    # process group, but a node stops only when its worker sends SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Blocked in the forkserver, which this process may be a fork of.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    _ask_for_sigterm_on_parent_death()

    try:
        recipe = load_recipe(launch.recipe)
    except RecipeError as exc:
        status.send(("recipe-failed", str(exc)))
        os._exit(3)

    runner = NodeRunner(launch, recipe, status, complete, counters, in_flight)
    signal.signal(signal.SIGTERM, runner.request_stop)
    _stop_when_worker_exits(runner)
    try:
        outcome = runner.run()
    except Exception as exc:
        logger.exception("node %s crashed", launch.node_id)
        status.send(("error", f"{type(exc).__name__}: {exc}"))
        os._exit(1)
    try:
        status.send(outcome)
        status.close()
    except OSError:
        # The worker died first; the node drained and has nothing to report to.
        logger.info("node %s %s; its worker is gone", launch.node_id, outcome[0])


def _stop_when_worker_exits(runner: NodeRunner) -> None:
    """Start a thread that makes `runner` drain once the worker has exited.

    The worker need not be the parent process: a node forked by the
    forkserver learns of the worker's death, even by SIGKILL, from the
    sentinel that multiprocessing gives it.
    """
    worker = multiprocessing.parent_process()
    if worker is None:
        return

    def watch() -> None:
        wait_for_ready([worker.sentinel])
        logger.warning(
            "node %s lost its worker (pid %d); draining",
            runner.launch.node_id,
            worker.pid,
        )
        runner.request_stop()

    threading.Thread(target=watch, name="worker-watch", daemon=True).start()


def _ask_for_sigterm_on_parent_death() -> None:
    # Linux only: the kernel sends SIGTERM when the parent dies, even by SIGKILL:
    # the worker, or the forkserver that forked this process.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        logger.debug("prctl(PR_SET_PDEATHSIG) is not available")


class LeaseKeeper:
    """Extend the lease of the batch in progress, so a long batch stays ours.

    Runs in a daemon thread of the node process; the streams serialize calls
    from several threads of one process.
    """

    def __init__(self, stream: Stream, interval_s: float) -> None:
        self.stream = stream
        self.interval_s = interval_s
        self.deliveries: list[Delivery] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(
            target=self._run, name="lease-keeper", daemon=True
        )

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()

    def _run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            deliveries = self.deliveries
            if not deliveries:
                continue
            try:
                self.stream.extend_lease(deliveries)
            except EngineError as exc:
                logger.warning(
                    "extending the lease of %d items failed: %s", len(deliveries), exc
                )


class NodeRunner:
    """The node loop of one process, with its stream, context and counters."""

    def __init__(
        self,
        launch: NodeLaunch,
        recipe: Recipe,
        status: Connection,
        complete: SharedFlag,
        counters: Any,
        in_flight: Any = None,
    ) -> None:
        self.launch = launch
        # Shared memory with the id of the item being processed, so that the
        # worker can count a death against the item in flight.
        self.in_flight = in_flight
        self.recipe = recipe
        self.spec = recipe.spec
        self.status = status
        self.complete = complete
        self.counters = counters
        self.is_stop_requested = False
        self.process = psutil.Process()
        self.context = NodeContext(
            pipeline=recipe.pipeline,
            node=self.spec.name,
            params=recipe.params,
            process_index=launch.process_index,
            process_count=launch.process_count,
            logger=logging.getLogger(f"node.{recipe.node_type}"),
            progress_hook=self._store_progress,
        )
        self.stream: Stream | None = None
        # Items of a source that an earlier process of it published.
        self.skip_count = 0

    def request_stop(self, signum: int = 0, frame: object = None) -> None:
        """Ask the loop to stop after the current batch (the SIGTERM handler)."""
        self.is_stop_requested = True

    def run(self) -> tuple:
        """Run setup, the node loop and teardown; return the outcome to report."""
        owner = f"{self.launch.node_id}@{os.getpid()}"
        self.stream = open_stream(self.launch.stream_url, owner=owner)
        queues = [*self.recipe.input_queues, self.recipe.fail_queue]
        queues += [output.queue for output in self.recipe.outputs]
        self.stream.declare(queues)

        lease_s = getattr(self.stream, "lease_s", None)
        self.lease_keeper = LeaseKeeper(self.stream, (lease_s or 300.0) / 3)
        if self.spec.kind != "source":
            self.lease_keeper.start()

        if self.spec.kind == "source":
            self.skip_count = self._prepare_position()
        if self.spec.setup is not None:
            self.context.state = self.spec.setup(self.context)
        # The worker passes resume_position=True to the processes after the
        # first that reports "started", so the position was reset for this run.
        self.status.send(("started",))
        logger.debug("node %s running pid=%d", self.launch.node_id, os.getpid())
        try:
            if self.spec.kind == "source":
                outcome = self._run_source()
            else:
                outcome = self._run_consumer()
        finally:
            self.lease_keeper.stop()
            self._teardown()
            self.stream.close()
        return outcome

    def _teardown(self) -> None:
        if self.spec.teardown is None:
            return
        try:
            self.spec.teardown(self.context)
        except Exception:
            # Every item is acked by now: a failed teardown loses nothing, so
            # the node keeps its outcome instead of crashing and restarting.
            logger.exception("teardown of node %s failed", self.launch.node_id)

    # Sources.

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
            envelope = {"id": item_id, "attempt": 1, "payload": payload}
            try:
                self._place_results(item_id, [payload], batch, parent=None)
            except Exception as exc:
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
        self.stream.publish(batch.outgoing, position=position)
        self._count_published(batch)

    def _count_published(self, batch: _Batch) -> None:
        self.counters[ITEMS_OUT] += batch.results
        self.counters[FAILURES] += batch.failures
        self.counters[RETRIES] += sum(len(m) for m in batch.retries.values())
        if batch.outgoing or batch.retries:
            self.counters[BATCHES] += 1

    # Transforms and sinks.

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
                deliveries = self.stream.pull(queues, settings.batch_size, 0.0)
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

    def _record_batch_duration(self, duration_ns: int) -> None:
        """Count one batch, from its pull to its ack, in the shared histogram."""
        bucket = bisect.bisect_left(BATCH_DURATION_BUCKETS_S, duration_ns / 1e9)
        self.counters[BATCH_DURATION_COUNTS + bucket] += 1
        self.counters[BATCH_DURATION_SUM_NS] += duration_ns

    def _store_progress(self, done: int, total: int) -> None:
        self.counters[PROGRESS_TOTAL] = total
        self.counters[PROGRESS_DONE] = done

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
        deliveries = self.stream.pull(queues, settings.batch_size, first_wait_s)
        if len(deliveries) >= settings.batch_size:
            return deliveries
        if self.complete.is_set() or self.is_stop_requested:
            return deliveries
        remaining_s = settings.batch_timeout_s - (time.monotonic() - started)
        if remaining_s <= 0:
            return deliveries
        count = settings.batch_size - len(deliveries)
        return deliveries + self.stream.pull(queues, count, remaining_s)

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

    def _process_batch(self, deliveries: list[Delivery]) -> None:
        serializer = self.recipe.serializer
        batch = _Batch()
        envelopes: list[tuple[Delivery, dict[str, Any]]] = []
        for delivery in deliveries:
            try:
                envelopes.append((delivery, decode(delivery.body, serializer)))
            except DecodingError as exc:
                envelope = {
                    "id": f"undecodable:{delivery.delivery_id}",
                    "attempt": 1,
                    "payload": delivery.body.decode("utf-8", "replace"),
                }
                self._fail(envelope, delivery, exc, batch, retry=False)

        self.counters[ITEMS_IN] += len(deliveries)
        self.lease_keeper.deliveries = deliveries
        # A redelivered batch may hold the item that killed the last process:
        # take it one item at a time, so that a death names its item.
        is_suspect = any(delivery.is_redelivered for delivery in deliveries)
        if self.spec.is_batched and not is_suspect:
            self._call_batched(envelopes, batch)
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
        is_settled = self.stream.settle(deliveries, batch.outgoing, batch.retries)
        self.lease_keeper.deliveries = []
        if not is_settled:
            logger.warning(
                "node %s dropped the results of a batch of %d items, which the "
                "stream no longer held (a lease expired or the connection was "
                "lost); they are delivered again",
                self.launch.node_id,
                len(deliveries),
            )
            return
        self._count_published(batch)
        if not (batch.outgoing or batch.retries):
            # A sink's batch publishes nothing, and counts all the same.
            self.counters[BATCHES] += 1
        logger.debug(
            "batch done node=%s in=%d out=%d failed=%d",
            self.launch.node_id,
            len(deliveries),
            batch.results,
            batch.failures,
        )

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

    def _call_one(
        self, delivery: Delivery, envelope: dict[str, Any], batch: _Batch
    ) -> None:
        item_id = envelope.get("id", "")
        self.context.item_ids = [item_id]
        staged = _Batch()
        try:
            results = self._call_function(envelope["payload"])
            self._place_results(item_id, results, staged, envelope)
        except EncodingError as exc:
            # The same result fails to encode on every attempt.
            self._fail(envelope, delivery, exc, batch, retry=False)
            return
        except Exception as exc:
            self._fail(envelope, delivery, exc, batch, retry=True)
            return
        batch.merge(staged)

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
        """Encode `results` for the edges that the route and filters choose."""
        serializer = self.recipe.serializer
        for index, result in enumerate(results):
            if parent is None:
                item_id = parent_id
            else:
                item_id = derived_item_id(parent_id, self.spec.name, index)
            body = encode({"id": item_id, "attempt": 1, "payload": result}, serializer)
            for output in self._choose_outputs(result):
                staged.outgoing.append((output.queue, body))
        staged.results += len(results)

    def _choose_outputs(self, result: Any) -> list[Output]:
        outputs = self.recipe.outputs
        if self.spec.route is not None:
            chosen = self.spec.route(result)
            if chosen is None:
                return []
            names = {chosen} if isinstance(chosen, str) else set(chosen)
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

    def stats(self) -> dict[str, Any]:
        """Return this process's counters."""
        return counters_to_stats(self.counters)


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
