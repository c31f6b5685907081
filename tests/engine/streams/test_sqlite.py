"""Behaviour of the SQLite stream beyond the contract: leases, crashes, locks."""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import re
import signal
import sqlite3
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine.errors import StreamError, StreamUnavailableError
from engine.streams import open_stream
from engine.streams.sqlite import SQLiteStream
from tests.helpers import wait_for

QUEUE = "jobs"

OpenSQLite = Callable[..., SQLiteStream]


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    """Yield the path of a stream file that does not exist yet."""
    return str(tmp_path / "streams" / "stream.db")


@pytest.fixture
def open_sqlite(db_path: str) -> Iterator[OpenSQLite]:
    """Yield a function that opens streams on `db_path`; close them afterwards."""
    opened: list[SQLiteStream] = []

    def open_one(**options: object) -> SQLiteStream:
        stream = SQLiteStream(db_path, **options)
        opened.append(stream)
        return stream

    yield open_one
    for stream in opened:
        stream.close()


def pull_then_kill_self(
    path: str, owner: str, lease_s: float, pulled: multiprocessing.Value
) -> None:
    """Pull 5 messages, store how many in `pulled`, and die by SIGKILL."""
    stream = SQLiteStream(path, owner=owner, lease_s=lease_s)
    pulled.value = len(stream.pull([QUEUE], 5, timeout_s=30))
    os.kill(os.getpid(), signal.SIGKILL)


def publish_and_consume(
    path: str,
    index: int,
    process_count: int,
    barrier: multiprocessing.Barrier,
    publishers_done: multiprocessing.Value,
    results: multiprocessing.Queue,
) -> None:
    """Publish 250 messages in batches while pulling and acking the queue.

    Runs in one of `process_count` child processes that open the same new
    file at once. Stops when every process has published and the queue is
    empty, and puts `(index, bodies acked, traceback or None)` on `results`.
    """
    bodies: list[bytes] = []
    error = None
    try:
        to_publish = [f"{index}-{number}".encode() for number in range(250)]
        barrier.wait(timeout=60)
        stream = SQLiteStream(path, owner=f"mixer-{index}")
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if to_publish:
                    stream.publish([(QUEUE, body) for body in to_publish[:10]])
                    del to_publish[:10]
                    if not to_publish:
                        with publishers_done.get_lock():
                            publishers_done.value += 1
                batch = stream.pull([QUEUE], 10, timeout_s=0.01)
                if batch:
                    stream.ack(batch)
                    bodies.extend(delivery.body for delivery in batch)
                elif (
                    publishers_done.value == process_count and stream.depth(QUEUE) == 0
                ):
                    break
        finally:
            stream.close()
    except Exception:
        error = traceback.format_exc()
    results.put((index, bodies, error))


def run_pull_then_kill_self(path: str, owner: str, lease_s: float) -> int:
    """Run `pull_then_kill_self` in a child; return how many messages it pulled."""
    context = multiprocessing.get_context("spawn")
    pulled = context.Value("i", -1)
    child = context.Process(
        target=pull_then_kill_self, args=(path, owner, lease_s, pulled)
    )
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("the child that pulls and kills itself did not exit in 60 s")
    assert child.exitcode == -signal.SIGKILL
    return pulled.value


def test_recover_releases_killed_process_messages(open_sqlite: OpenSQLite) -> None:
    stream = open_sqlite(owner="survivor")
    bodies = [str(number).encode() for number in range(5)]
    stream.publish([(QUEUE, body) for body in bodies])

    pulled = run_pull_then_kill_self(stream.path, "victim", lease_s=300.0)

    assert pulled == 5
    assert stream.pull([QUEUE], 5, timeout_s=0) == []
    assert stream.recover("victim") == 5
    deliveries = stream.pull([QUEUE], 5, timeout_s=5)
    assert [delivery.body for delivery in deliveries] == bodies
    assert all(delivery.is_redelivered for delivery in deliveries)
    assert stream.recover("victim") == 0


def test_lease_expiry_redelivers_killed_process_messages(
    open_sqlite: OpenSQLite,
) -> None:
    stream = open_sqlite(owner="survivor")
    bodies = [str(number).encode() for number in range(5)]
    stream.publish([(QUEUE, body) for body in bodies])

    pulled = run_pull_then_kill_self(stream.path, "victim", lease_s=0.5)
    deliveries = []

    def pull_more() -> bool:
        deliveries.extend(stream.pull([QUEUE], 5, timeout_s=0))
        return len(deliveries) >= 5

    wait_for(pull_more, timeout_s=30, what="5 messages redelivered after the lease")
    assert pulled == 5
    assert sorted(delivery.body for delivery in deliveries) == bodies
    assert all(delivery.is_redelivered for delivery in deliveries)


def test_publish_delay_hides_message(open_sqlite: OpenSQLite) -> None:
    stream = open_sqlite()

    stream.publish([(QUEUE, b"later")], delay_s=3600)

    assert stream.pull([QUEUE], 1, timeout_s=0.1) == []
    assert stream.depth(QUEUE) == 1


def test_publish_delay_elapses_then_visible(open_sqlite: OpenSQLite) -> None:
    stream = open_sqlite()

    stream.publish([(QUEUE, b"soon")], delay_s=0.2)
    deliveries = wait_for(
        lambda: stream.pull([QUEUE], 1, timeout_s=0),
        timeout_s=30,
        what="the delayed message to become visible",
    )

    assert [delivery.body for delivery in deliveries] == [b"soon"]
    assert not deliveries[0].is_redelivered


def test_stream_reopen_keeps_messages(db_path: str) -> None:
    with SQLiteStream(db_path) as stream:
        stream.declare([QUEUE])
        stream.publish([(QUEUE, b"kept"), (QUEUE, b"also kept")])

    with SQLiteStream(db_path) as reopened:
        deliveries = reopened.pull([QUEUE], 2, timeout_s=5)
        reopened.ack(deliveries)

    assert [delivery.body for delivery in deliveries] == [b"kept", b"also kept"]


def test_stream_new_file_concurrent_processes(db_path: str) -> None:
    process_count = 4
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(process_count)
    publishers_done = context.Value("i", 0)
    results = context.Queue()
    children = [
        context.Process(
            target=publish_and_consume,
            args=(db_path, index, process_count, barrier, publishers_done, results),
            name=f"mixer-{index}",
        )
        for index in range(process_count)
    ]
    for child in children:
        child.start()
    try:
        reports = [results.get(timeout=90) for _ in children]
    except queue.Empty:
        exit_codes = [child.exitcode for child in children]
        pytest.fail(f"a child sent no report in 90 s; exit codes {exit_codes}")
    finally:
        for child in children:
            child.join(timeout=30)
            if child.is_alive():
                child.kill()

    errors = [error for _, _, error in reports if error]
    acked = [body for _, bodies, _ in reports for body in bodies]
    expected = [
        f"{index}-{number}".encode()
        for index in range(process_count)
        for number in range(250)
    ]
    assert errors == []
    assert [child.exitcode for child in children] == [0] * process_count
    assert sorted(acked) == sorted(expected)


def test_ack_after_lost_lease_keeps_claim(
    open_sqlite: OpenSQLite, caplog: pytest.LogCaptureFixture
) -> None:
    slow = open_sqlite(owner="slow", lease_s=0.2)
    fast = open_sqlite(owner="fast")
    slow.publish([(QUEUE, b"contested")])
    slow_deliveries = slow.pull([QUEUE], 1, timeout_s=5)
    fast_deliveries = wait_for(
        lambda: fast.pull([QUEUE], 1, timeout_s=0),
        timeout_s=30,
        what="the message redelivered after the lease",
    )

    with caplog.at_level(logging.WARNING, logger="engine.streams.sqlite"):
        slow.ack(slow_deliveries)

    assert fast.depth(QUEUE) == 1
    assert "ack skipped 1 of 1 messages" in caplog.text
    assert fast_deliveries[0].is_redelivered
    fast.ack(fast_deliveries)
    assert fast.depth(QUEUE) == 0


def test_extend_lease_keeps_messages_hidden(open_sqlite: OpenSQLite) -> None:
    holder = open_sqlite(owner="holder", lease_s=0.2)
    other = open_sqlite(owner="other")
    holder.publish([(QUEUE, b"extended"), (QUEUE, b"canary")])
    extended, canary = holder.pull([QUEUE], 2, timeout_s=5)

    holder.extend_lease([extended], lease_s=3600)
    # Both messages were pulled together, so once the canary's lease has
    # expired, the other message's first lease has expired too.
    redelivered = wait_for(
        lambda: other.pull([QUEUE], 2, timeout_s=0),
        timeout_s=30,
        what="the canary redelivered after its lease",
    )

    assert [delivery.body for delivery in redelivered] == [b"canary"]
    assert other.pull([QUEUE], 2, timeout_s=0) == []
    holder.ack([extended])
    assert other.depth(QUEUE) == 1


@pytest.mark.parametrize(
    "url",
    ["sqlite://run.db", "sqlite:///", "postgres://127.0.0.1/run", "run.db"],
)
def test_open_stream_rejects_invalid_url(url: str) -> None:
    with pytest.raises(StreamError) as excinfo:
        open_stream(url)

    assert repr(url) in str(excinfo.value)


def test_stream_locked_file_raises_unavailable(open_sqlite: OpenSQLite) -> None:
    stream = open_sqlite(busy_retry_s=0.3)
    stream.publish([(QUEUE, b"before")])
    holder = sqlite3.connect(stream.path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(StreamUnavailableError) as excinfo:
            stream.publish([(QUEUE, b"blocked")])
        depth_while_locked = stream.depth(QUEUE)
    finally:
        holder.close()

    assert repr(stream.path) in str(excinfo.value)
    assert isinstance(excinfo.value.__cause__, sqlite3.OperationalError)
    assert depth_while_locked == 1
    stream.publish([(QUEUE, b"after")])
    assert stream.depth(QUEUE) == 2


def test_stream_corrupt_file_raises_error(db_path: str) -> None:
    os.makedirs(os.path.dirname(db_path))
    with open(db_path, "wb") as file:
        file.write(b"this is not a database\n" * 200)

    with pytest.raises(StreamError) as excinfo:
        SQLiteStream(db_path)

    assert repr(db_path) in str(excinfo.value)
    assert not isinstance(excinfo.value, StreamUnavailableError)
    assert isinstance(excinfo.value.__cause__, sqlite3.DatabaseError)


def use_inherited_stream(stream: SQLiteStream) -> None:
    """Exit 0 when the stream inherited over fork raises StreamError, else 1."""
    try:
        stream.depth(QUEUE)
    except StreamError:
        os._exit(0)
    os._exit(1)


def test_stream_forked_child_raises_error(open_sqlite: OpenSQLite) -> None:
    stream = open_sqlite()
    stream.publish([(QUEUE, b"parent's")])
    child = multiprocessing.get_context("fork").Process(
        target=use_inherited_stream, args=(stream,)
    )

    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()

    assert child.exitcode == 0
    assert stream.depth(QUEUE) == 1


def test_stream_closed_raises_error(open_sqlite: OpenSQLite) -> None:
    stream = open_sqlite()
    stream.close()
    stream.close()

    with pytest.raises(StreamError, match="is closed"):
        stream.depth(QUEUE)


def test_pull_rejects_invalid_arguments(open_sqlite: OpenSQLite) -> None:
    stream = open_sqlite()

    with pytest.raises(ValueError, match="max_count=0"):
        stream.pull([QUEUE], 0, timeout_s=0)
    with pytest.raises(ValueError, match="timeout_s=-1"):
        stream.pull([QUEUE], 1, timeout_s=-1)
    with pytest.raises(TypeError, match="expected a list of queue names"):
        stream.pull(QUEUE, 1, timeout_s=0)


def test_publish_rejects_text_body(open_sqlite: OpenSQLite) -> None:
    stream = open_sqlite()

    with pytest.raises(TypeError, match="expected bytes, got str"):
        stream.publish([(QUEUE, "text")])

    assert stream.depth(QUEUE) == 0


def test_settle_after_lost_lease_publishes_nothing(
    open_sqlite: OpenSQLite, caplog: pytest.LogCaptureFixture
) -> None:
    slow = open_sqlite(owner="slow", lease_s=0.2)
    fast = open_sqlite(owner="fast")
    slow.publish([(QUEUE, b"contested"), (QUEUE, b"still held")])
    contested, held = slow.pull([QUEUE], 2, timeout_s=5)
    slow.extend_lease([held], lease_s=3600)
    taken = wait_for(
        lambda: fast.pull([QUEUE], 2, timeout_s=0),
        timeout_s=30,
        what="the message redelivered after its lease",
    )

    with caplog.at_level(logging.WARNING, logger="engine.streams.sqlite"):
        settled = slow.settle([contested, held], [("results", b"result")])

    assert settled is False
    assert [delivery.body for delivery in taken] == [b"contested"]
    assert fast.depth("results") == 0
    assert "no longer owns 1 of them" in caplog.text
    released = fast.pull([QUEUE], 2, timeout_s=5)
    assert [delivery.body for delivery in released] == [b"still held"]
    fast.ack([*taken, *released])
    assert fast.depth(QUEUE) == 0


def test_settle_and_pull_takes_next_batch(open_sqlite: OpenSQLite) -> None:
    node = open_sqlite(owner="node")
    other = open_sqlite(owner="other")
    node.publish([(QUEUE, b"first"), (QUEUE, b"second"), (QUEUE, b"third")])
    (first,) = node.pull([QUEUE], 1, timeout_s=5)

    is_settled, pulled = node.settle_and_pull(
        [first], [("results", b"result")], None, [QUEUE], 1
    )

    assert is_settled is True
    assert [delivery.body for delivery in pulled] == [b"second"]
    assert other.depth("results") == 1
    # The pulled message is leased to the node, so the other stream can pull
    # only the third, but the depth counts both.
    assert other.depth(QUEUE) == 2
    (third,) = other.pull([QUEUE], 5, timeout_s=0)
    assert third.body == b"third"
    node.ack(pulled)
    other.ack([third])
    assert other.depth(QUEUE) == 0


def test_settle_and_pull_after_lost_lease_pulls_nothing(
    open_sqlite: OpenSQLite,
) -> None:
    slow = open_sqlite(owner="slow", lease_s=0.2)
    fast = open_sqlite(owner="fast")
    slow.publish([(QUEUE, b"contested")])
    (contested,) = slow.pull([QUEUE], 1, timeout_s=5)
    taken = wait_for(
        lambda: fast.pull([QUEUE], 1, timeout_s=0),
        timeout_s=30,
        what="the message redelivered after its lease",
    )
    fast.publish([(QUEUE, b"waiting")])

    is_settled, pulled = slow.settle_and_pull(
        [contested], [("results", b"result")], None, [QUEUE], 1
    )

    assert is_settled is False
    assert pulled == []
    assert fast.depth("results") == 0
    (waiting,) = fast.pull([QUEUE], 5, timeout_s=0)
    assert waiting.body == b"waiting"
    fast.ack([*taken, waiting])
    assert fast.depth(QUEUE) == 0


def settle_until_killed(path: str, paused: multiprocessing.Event) -> None:
    """Pull 3 messages and settle them, pausing for good halfway.

    Temporary triggers on this process's own connection call `pause` at the
    first moment when the inputs are gone and a result exists, whichever of
    the two writes comes second. The parent kills this process there.
    """
    stream = SQLiteStream(path, owner="settler")
    deliveries = stream.pull([QUEUE], 3, timeout_s=30)

    def pause() -> None:
        paused.set()
        time.sleep(60)

    connection = stream._connection
    connection.create_function("pause", 0, pause)
    connection.execute(
        "CREATE TEMP TRIGGER pause_after_insert AFTER INSERT ON main.messages "
        "WHEN NEW.queue = 'results' AND NOT EXISTS "
        f"(SELECT 1 FROM main.messages WHERE queue = '{QUEUE}') "
        "BEGIN SELECT pause(); END"
    )
    connection.execute(
        "CREATE TEMP TRIGGER pause_after_delete AFTER DELETE ON main.messages "
        f"WHEN OLD.queue = '{QUEUE}' AND EXISTS "
        "(SELECT 1 FROM main.messages WHERE queue = 'results') "
        "BEGIN SELECT pause(); END"
    )
    stream.settle(deliveries, [("results", delivery.body) for delivery in deliveries])


def test_settle_killed_mid_transaction_changes_nothing(
    open_sqlite: OpenSQLite,
) -> None:
    stream = open_sqlite(owner="survivor")
    bodies = [b"a", b"b", b"c"]
    stream.publish([(QUEUE, body) for body in bodies])
    context = multiprocessing.get_context("spawn")
    paused = context.Event()
    child = context.Process(target=settle_until_killed, args=(stream.path, paused))
    child.start()
    try:
        assert paused.wait(timeout=60), "the settling child never reached its pause"
    finally:
        child.kill()
        child.join(timeout=60)

    assert stream.recover("settler") == 3
    assert stream.depths([QUEUE, "results"]) == {QUEUE: 3, "results": 0}
    deliveries = stream.pull([QUEUE], 3, timeout_s=5)
    assert [delivery.body for delivery in deliveries] == bodies
    assert all(delivery.is_redelivered for delivery in deliveries)


def test_publish_stores_position_with_messages(open_sqlite: OpenSQLite) -> None:
    stream = open_sqlite()

    stream.publish([(QUEUE, b"a"), (QUEUE, b"b")], position=("read-position-0", 2))
    stream.publish([], position=("read-position-0", 5))

    assert stream.read_position("read-position-0") == 5
    assert stream.read_position("read-position-1") == 0
    assert stream.depth(QUEUE) == 2


def test_delete_queues_deletes_position(open_sqlite: OpenSQLite) -> None:
    stream = open_sqlite()
    stream.publish([], position=("read-position-0", 7))

    stream.delete_queues(["read-position-0"])

    assert stream.read_position("read-position-0") == 0


@pytest.mark.parametrize(
    ("position", "expected"),
    [
        (("", 1), "invalid position key ''"),
        (("key", -1), "invalid position -1 for key 'key'"),
        (("key", 1.5), "invalid position 1.5 for key 'key'"),
        (("key", True), "invalid position True for key 'key'"),
    ],
)
def test_publish_rejects_invalid_position(
    open_sqlite: OpenSQLite, position: tuple, expected: str
) -> None:
    stream = open_sqlite()

    with pytest.raises(ValueError, match=re.escape(expected)):
        stream.publish([(QUEUE, b"a")], position=position)

    assert stream.depth(QUEUE) == 0


def test_publish_and_settle_many_keep_order(open_sqlite: OpenSQLite) -> None:
    # More messages than one INSERT statement takes, in a count that needs
    # statements of several sizes.
    stream = open_sqlite()
    bodies = [str(number).encode() for number in range(700)]
    stream.publish([(QUEUE, body) for body in bodies])

    deliveries = stream.pull([QUEUE], 700, timeout_s=0)
    results = [("results", body + b"!") for body in bodies[:301]]
    assert stream.settle(deliveries, results, {60.0: [("results", b"later")]})

    assert [delivery.body for delivery in deliveries] == bodies
    pulled = stream.pull(["results"], 400, timeout_s=0)
    assert [delivery.body for delivery in pulled] == [body for _, body in results]
    assert stream.depths([QUEUE, "results"]) == {QUEUE: 0, "results": 302}


def test_pull_orders_expired_leases_among_waiting_messages(
    open_sqlite: OpenSQLite,
) -> None:
    first = open_sqlite(owner="first", lease_s=0.3)
    second = open_sqlite(owner="second")
    first.publish([(QUEUE, b"a")])
    stale = first.pull([QUEUE], 1, 0)
    assert [delivery.body for delivery in stale] == [b"a"]
    second.publish([(QUEUE, b"b")])
    time.sleep(0.5)
    # The lease of a ended after b was published, so a comes after b.
    second.publish([(QUEUE, b"c")])

    deliveries = second.pull([QUEUE], 3, timeout_s=0)

    assert [delivery.body for delivery in deliveries] == [b"b", b"a", b"c"]
    assert [delivery.is_redelivered for delivery in deliveries] == [
        False,
        True,
        False,
    ]
    assert not first.settle(stale, [(QUEUE, b"result")])
    assert second.depth(QUEUE) == 3


def test_stream_replaces_indexes_of_earlier_versions(db_path: str) -> None:
    # A file as versions before the split of the pull index wrote it.
    os.makedirs(os.path.dirname(db_path))
    connection = sqlite3.connect(db_path, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute(
        "CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, "
        "queue TEXT NOT NULL, body BLOB NOT NULL, visible_at REAL NOT NULL, "
        "owner TEXT, delivery_count INTEGER NOT NULL DEFAULT 0)"
    )
    connection.execute(
        "CREATE INDEX messages_by_visibility ON messages (queue, visible_at)"
    )
    connection.execute(
        "CREATE INDEX messages_by_owner ON messages (owner) WHERE owner IS NOT NULL"
    )
    connection.execute(
        "INSERT INTO messages (queue, body, visible_at, owner, delivery_count) "
        "VALUES (?, ?, 0, NULL, 0), (?, ?, 0, 'gone', 1)",
        (QUEUE, b"waiting", QUEUE, b"pulled"),
    )

    stream = SQLiteStream(db_path)
    try:
        indexes = {
            name
            for (name,) in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'index' "
                "AND tbl_name = 'messages'"
            )
        }
        assert indexes == {"messages_waiting", "messages_pulled"}
        assert stream.depth(QUEUE) == 2
        assert stream.recover("gone") == 1
        deliveries = stream.pull([QUEUE], 2, timeout_s=0)
        assert [delivery.body for delivery in deliveries] == [b"waiting", b"pulled"]
    finally:
        stream.close()
        connection.close()
