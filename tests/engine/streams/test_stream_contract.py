"""The contract of every stream backend, run on each through `stream`."""

from __future__ import annotations

import multiprocessing
import os
import queue
import time
import traceback

import pytest

from engine.streams import Stream, open_stream
from tests.engine.streams.conftest import QueueNames

# Long enough for a backend that delivers asynchronously to fill a batch that
# is already published; a full batch returns at once.
FILL_TIMEOUT_S = 5.0


def publish_numbered(stream: Stream, queue_name: str, count: int) -> list[bytes]:
    """Publish `count` bodies b"0", b"1", ... to `queue_name` and return them."""
    bodies = [str(number).encode() for number in range(count)]
    stream.publish([(queue_name, body) for body in bodies])
    return bodies


def consume_until_drained(
    url: str, queue_name: str, owner: str, results: multiprocessing.Queue
) -> None:
    """Pull and ack from `queue_name` until it is empty; report the bodies acked.

    Runs in a child process, which opens its own stream. Puts one tuple
    `(owner, bodies, error)` on `results`, with the traceback as `error`.
    """
    bodies: list[bytes] = []
    error = None
    try:
        stream = open_stream(url, owner=owner)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                batch = stream.pull([queue_name], 50, timeout_s=0.1)
                if batch:
                    stream.ack(batch)
                    bodies.extend(delivery.body for delivery in batch)
                elif stream.depth(queue_name) == 0:
                    break
        finally:
            stream.close()
    except Exception:
        error = traceback.format_exc()
    results.put((owner, bodies, error))


def test_pull_returns_published_bodies_in_order(
    stream: Stream, queue_names: QueueNames
) -> None:
    jobs = queue_names("jobs")
    stream.declare([jobs])
    bodies = publish_numbered(stream, jobs, 20)

    deliveries = stream.pull([jobs], 20, timeout_s=FILL_TIMEOUT_S)

    assert [delivery.body for delivery in deliveries] == bodies
    assert {delivery.queue for delivery in deliveries} == {jobs}
    assert not any(delivery.is_redelivered for delivery in deliveries)


def test_pull_respects_max_count(stream: Stream, queue_names: QueueNames) -> None:
    jobs = queue_names("jobs")
    stream.declare([jobs])
    bodies = publish_numbered(stream, jobs, 5)

    first = stream.pull([jobs], 2, timeout_s=FILL_TIMEOUT_S)
    rest = stream.pull([jobs], 10, timeout_s=0.5)

    assert [delivery.body for delivery in first] == bodies[:2]
    assert [delivery.body for delivery in rest] == bodies[2:]


def test_pull_empty_queue_returns_nothing(
    stream: Stream, queue_names: QueueNames
) -> None:
    jobs = queue_names("jobs")
    stream.declare([jobs])

    assert stream.pull([jobs], 10, timeout_s=0.2) == []


def test_ack_removes_messages(stream: Stream, queue_names: QueueNames) -> None:
    jobs = queue_names("jobs")
    stream.declare([jobs])
    publish_numbered(stream, jobs, 3)
    deliveries = stream.pull([jobs], 3, timeout_s=FILL_TIMEOUT_S)

    stream.ack(deliveries)

    assert len(deliveries) == 3
    assert stream.depth(jobs) == 0
    assert stream.pull([jobs], 3, timeout_s=0.2) == []


def test_reject_requeue_redelivers_message(
    stream: Stream, queue_names: QueueNames
) -> None:
    jobs = queue_names("jobs")
    stream.declare([jobs])
    stream.publish([(jobs, b"retry me")])
    [first] = stream.pull([jobs], 1, timeout_s=FILL_TIMEOUT_S)

    stream.reject([first], requeue=True)
    [second] = stream.pull([jobs], 1, timeout_s=FILL_TIMEOUT_S)

    assert second.body == b"retry me"
    assert second.is_redelivered
    assert not first.is_redelivered
    stream.ack([second])
    assert stream.depth(jobs) == 0


def test_reject_without_requeue_drops_message(
    stream: Stream, queue_names: QueueNames
) -> None:
    jobs = queue_names("jobs")
    stream.declare([jobs])
    stream.publish([(jobs, b"poison")])
    deliveries = stream.pull([jobs], 1, timeout_s=FILL_TIMEOUT_S)

    stream.reject(deliveries, requeue=False)

    assert len(deliveries) == 1
    assert stream.depth(jobs) == 0
    assert stream.pull([jobs], 1, timeout_s=0.2) == []


def test_depth_counts_pulled_messages(stream: Stream, queue_names: QueueNames) -> None:
    jobs = queue_names("jobs")
    stream.declare([jobs])
    publish_numbered(stream, jobs, 4)

    assert stream.depth(jobs) == 4
    deliveries = stream.pull([jobs], 3, timeout_s=FILL_TIMEOUT_S)
    assert len(deliveries) == 3
    assert stream.depth(jobs) == 4
    stream.ack(deliveries[:1])
    assert stream.depth(jobs) == 3


def test_depths_counts_several_queues(stream: Stream, queue_names: QueueNames) -> None:
    first, second, empty = queue_names("a"), queue_names("b"), queue_names("c")
    stream.declare([first, second, empty])
    publish_numbered(stream, first, 2)
    publish_numbered(stream, second, 5)

    assert stream.depths([first, second, empty]) == {first: 2, second: 5, empty: 0}


def test_has_queue_follows_declare_and_delete(
    stream: Stream, queue_names: QueueNames
) -> None:
    jobs, never = queue_names("jobs"), queue_names("never")

    stream.declare([jobs])
    assert stream.has_queue(jobs) is True
    assert stream.has_queue(never) is False

    stream.delete_queues([jobs])
    assert stream.has_queue(jobs) is False


def test_delete_queues_removes_messages(
    stream: Stream, queue_names: QueueNames
) -> None:
    doomed, kept = queue_names("doomed"), queue_names("kept")
    stream.declare([doomed, kept])
    publish_numbered(stream, doomed, 3)
    publish_numbered(stream, kept, 2)
    stream.pull([doomed], 1, timeout_s=FILL_TIMEOUT_S)

    stream.delete_queues([doomed])
    stream.declare([doomed])

    assert stream.depth(doomed) == 0
    assert stream.pull([doomed], 10, timeout_s=0.2) == []
    assert stream.depth(kept) == 2


def test_close_without_ack_redelivers_messages(
    stream_url: str, stream: Stream, queue_names: QueueNames
) -> None:
    jobs = queue_names("jobs")
    stream.declare([jobs])
    bodies = publish_numbered(stream, jobs, 3)
    quitter = open_stream(stream_url, owner=f"{queue_names.prefix}-quitter")
    try:
        quitter_deliveries = quitter.pull([jobs], 3, timeout_s=FILL_TIMEOUT_S)
    finally:
        quitter.close()

    deliveries = stream.pull([jobs], 3, timeout_s=FILL_TIMEOUT_S)

    assert [delivery.body for delivery in quitter_deliveries] == bodies
    assert sorted(delivery.body for delivery in deliveries) == sorted(bodies)
    assert all(delivery.is_redelivered for delivery in deliveries)


def test_publish_to_several_queues(stream: Stream, queue_names: QueueNames) -> None:
    left, right = queue_names("left"), queue_names("right")
    stream.declare([left, right])

    stream.publish([(left, b"l1"), (right, b"r1"), (left, b"l2")])

    left_bodies = [d.body for d in stream.pull([left], 2, timeout_s=FILL_TIMEOUT_S)]
    right_deliveries = stream.pull([right], 1, timeout_s=FILL_TIMEOUT_S)
    assert left_bodies == [b"l1", b"l2"]
    assert [delivery.body for delivery in right_deliveries] == [b"r1"]
    assert right_deliveries[0].queue == right


def test_pull_from_several_queues(stream: Stream, queue_names: QueueNames) -> None:
    left, right = queue_names("left"), queue_names("right")
    stream.declare([left, right])
    stream.publish([(left, b"l1"), (right, b"r1"), (left, b"l2")])

    deliveries = stream.pull([left, right], 3, timeout_s=FILL_TIMEOUT_S)

    received = {(delivery.queue, delivery.body) for delivery in deliveries}
    assert received == {(left, b"l1"), (right, b"r1"), (left, b"l2")}


def test_publish_binary_bodies_round_trip(
    stream: Stream, queue_names: QueueNames
) -> None:
    jobs = queue_names("jobs")
    stream.declare([jobs])
    bodies = [
        bytes(range(256)),
        b"",
        b"\x00" * 17,
        "grüße, 世界".encode(),
        os.urandom(1 << 20),
    ]

    stream.publish([(jobs, body) for body in bodies])
    deliveries = stream.pull([jobs], len(bodies), timeout_s=FILL_TIMEOUT_S)

    assert [delivery.body for delivery in deliveries] == bodies
    assert all(type(delivery.body) is bytes for delivery in deliveries)


def test_stream_concurrent_consumers_ack_once(
    stream_url: str, stream: Stream, queue_names: QueueNames
) -> None:
    jobs = queue_names("jobs")
    stream.declare([jobs])
    bodies: list[bytes] = []
    for start in range(0, 2000, 100):
        batch = [str(number).encode() for number in range(start, start + 100)]
        stream.publish([(jobs, body) for body in batch])
        bodies.extend(batch)

    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    consumers = [
        context.Process(
            target=consume_until_drained,
            args=(stream_url, jobs, f"{queue_names.prefix}-consumer-{index}", results),
            name=f"consumer-{index}",
        )
        for index in range(3)
    ]
    for consumer in consumers:
        consumer.start()
    try:
        reports = [results.get(timeout=90) for _ in consumers]
    except queue.Empty:
        exit_codes = [consumer.exitcode for consumer in consumers]
        pytest.fail(f"a consumer sent no report in 90 s; exit codes {exit_codes}")
    finally:
        for consumer in consumers:
            consumer.join(timeout=30)
            if consumer.is_alive():
                consumer.kill()

    errors = [error for _, _, error in reports if error]
    acked = [body for _, consumer_bodies, _ in reports for body in consumer_bodies]
    assert errors == []
    assert [consumer.exitcode for consumer in consumers] == [0, 0, 0]
    assert len(acked) == len(bodies)
    assert sorted(acked) == sorted(bodies)
    assert stream.depth(jobs) == 0


def test_settle_publishes_results_and_acks_inputs(
    stream: Stream, queue_names: QueueNames
) -> None:
    inputs, results = queue_names("inputs"), queue_names("results")
    stream.declare([inputs, results])
    publish_numbered(stream, inputs, 3)
    deliveries = stream.pull([inputs], 3, timeout_s=FILL_TIMEOUT_S)

    settled = stream.settle(
        deliveries, [(results, delivery.body + b"!") for delivery in deliveries]
    )

    assert settled is True
    assert stream.depths([inputs, results]) == {inputs: 0, results: 3}
    pulled = stream.pull([results], 3, timeout_s=FILL_TIMEOUT_S)
    assert [delivery.body for delivery in pulled] == [b"0!", b"1!", b"2!"]
    assert stream.pull([inputs], 3, timeout_s=0.2) == []


def test_settle_delays_delayed_messages(
    stream: Stream, queue_names: QueueNames
) -> None:
    inputs, retries = queue_names("inputs"), queue_names("retries")
    stream.declare([inputs, retries])
    stream.publish([(inputs, b"flaky")])
    deliveries = stream.pull([inputs], 1, timeout_s=FILL_TIMEOUT_S)

    assert stream.settle(deliveries, [], {3600.0: [(retries, b"later")]})

    assert stream.depths([inputs, retries]) == {inputs: 0, retries: 1}
    assert stream.pull([retries], 1, timeout_s=0.2) == []


def test_settle_without_deliveries_publishes(
    stream: Stream, queue_names: QueueNames
) -> None:
    results = queue_names("results")
    stream.declare([results])

    assert stream.settle([], [(results, b"from a source")])

    pulled = stream.pull([results], 1, timeout_s=FILL_TIMEOUT_S)
    assert [delivery.body for delivery in pulled] == [b"from a source"]


def test_settle_rejects_text_body_and_keeps_inputs(
    stream: Stream, queue_names: QueueNames
) -> None:
    inputs, results = queue_names("inputs"), queue_names("results")
    stream.declare([inputs, results])
    stream.publish([(inputs, b"kept")])
    deliveries = stream.pull([inputs], 1, timeout_s=FILL_TIMEOUT_S)

    with pytest.raises(TypeError, match="expected bytes"):
        stream.settle(deliveries, [(results, "text")])  # type: ignore[list-item]

    assert stream.depths([inputs, results]) == {inputs: 1, results: 0}
    stream.ack(deliveries)
    assert stream.depth(inputs) == 0


def test_publish_stores_position(stream: Stream, queue_names: QueueNames) -> None:
    results, key = queue_names("results"), queue_names("position")
    stream.declare([results])

    stream.publish([(results, b"a"), (results, b"b")], position=(key, 2))
    stream.publish([(results, b"c")], position=(key, 3))

    assert stream.read_position(key) == 3
    assert stream.read_position(key) == 3
    assert stream.depth(results) == 3
    pulled = stream.pull([results], 3, timeout_s=FILL_TIMEOUT_S)
    assert [delivery.body for delivery in pulled] == [b"a", b"b", b"c"]


def test_position_without_messages_resets(
    stream: Stream, queue_names: QueueNames
) -> None:
    key = queue_names("position")
    stream.publish([], position=(key, 40))

    stream.publish([], position=(key, 0))

    assert stream.read_position(key) == 0


def test_read_position_unknown_key_is_zero(
    stream: Stream, queue_names: QueueNames
) -> None:
    assert stream.read_position(queue_names("never-published")) == 0


def test_delete_queues_deletes_position_key(
    stream: Stream, queue_names: QueueNames
) -> None:
    key = queue_names("position")
    stream.publish([], position=(key, 7))

    stream.delete_queues([key])

    assert stream.read_position(key) == 0
