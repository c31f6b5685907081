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

`NodeRunner` keeps its state and its setup and teardown here, and takes the
rest from mixins in private modules, one concept each: `_runtime_source`
(the source loop), `_runtime_consumer` (the pull loop of transforms and
sinks), `_runtime_batch` (the processing and settle of a batch),
`_runtime_failures` (retries, fail records and poison items) and
`_runtime_counters` (the shared counters and what they count).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import threading
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_for_ready
from typing import TYPE_CHECKING, Any

import psutil

from engine._runtime_batch import BatchMixin
from engine._runtime_consumer import (
    DRAIN_CHECK_MIN_S,
    FLAG_AFTER_BATCH_S,
    FLAG_CHECK_INTERVAL_S,
    IDLE_PULL_TIMEOUT_S,
    ConsumerMixin,
)
from engine._runtime_counters import (
    BATCH_DURATION_BUCKETS_S,
    BATCH_DURATION_COUNTS,
    BATCH_DURATION_SUM_NS,
    BATCH_IN_FLIGHT,
    BATCHES,
    COUNTER_NAMES,
    COUNTER_SLOTS,
    FAILURES,
    IN_FLIGHT_BYTES,
    ITEMS_IN,
    ITEMS_OUT,
    PROGRESS_DONE,
    PROGRESS_TOTAL,
    RETRIES,
    CountersMixin,
    counters_to_stats,
)
from engine._runtime_failures import FailureMixin, NodeProcessDiedError
from engine._runtime_source import SourceMixin
from engine.context import NodeContext
from engine.errors import EngineError, RecipeError
from engine.logs import configure_logging
from engine.recipe import Recipe, load_recipe
from engine.streams import open_stream

__all__ = [
    "BATCHES",
    "BATCH_DURATION_BUCKETS_S",
    "BATCH_DURATION_COUNTS",
    "BATCH_IN_FLIGHT",
    "BATCH_DURATION_SUM_NS",
    "COUNTER_NAMES",
    "COUNTER_SLOTS",
    "DRAIN_CHECK_MIN_S",
    "FAILURES",
    "FLAG_AFTER_BATCH_S",
    "FLAG_CHECK_INTERVAL_S",
    "IDLE_PULL_TIMEOUT_S",
    "IN_FLIGHT_BYTES",
    "ITEMS_IN",
    "ITEMS_OUT",
    "PROGRESS_DONE",
    "PROGRESS_TOTAL",
    "RETRIES",
    "LeaseKeeper",
    "NodeLaunch",
    "NodeProcessDiedError",
    "NodeRunner",
    "SharedFlag",
    "counters_to_stats",
    "node_main",
]

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from engine.streams import Delivery, Stream

logger = logging.getLogger(__name__)


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


class NodeRunner(SourceMixin, ConsumerMixin, BatchMixin, FailureMixin, CountersMixin):
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
        # The queues that every result goes to, or None when a route or an
        # edge filter chooses them per result.
        is_chosen = self.spec.route is not None or any(
            output.when is not None for output in recipe.outputs
        )
        self._fixed_queues: tuple[str, ...] | None = (
            None if is_chosen else tuple(output.queue for output in recipe.outputs)
        )
        # The batch size of the target of each output queue, which is the max
        # items of one message on that queue.
        self._pack_sizes = {
            output.queue: output.batch_size for output in recipe.outputs
        }
        # The envelopes of pulled messages, by delivery id, decoded by the
        # pull to count their items.
        self._unpacked: dict[int | str, list[dict[str, Any]]] = {}
        # The max items per message of the last pull. The next pull requests
        # as many messages as its missing items fill at that size.
        self._items_per_message = self.spec.settings.batch_size
        # The messages that the last settle pulled for the next batch.
        self._prefetched: list[Delivery] = []

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

    def stats(self) -> dict[str, Any]:
        """Return this process's counters."""
        return counters_to_stats(self.counters)
