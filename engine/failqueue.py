"""`engine fail-queue`: list, show, replay or purge a node's failed items.

A node's fail queue contains the items whose processing raised more often than
the node's retries allow, each with its error history. Reading the queue
puts every item back, so listing changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from engine.discovery import is_process_alive, read_discovery, read_stream_record
from engine.errors import EngineError
from engine.streams import Delivery, Stream, open_stream, redact_url

# Items read from a fail queue at a time; listing reads at most `--limit`.
READ_BATCH = 500


def fail_queue_name(node: str) -> str:
    """Return the fail queue of `node`, given as `pipeline.node` or a queue name."""
    if node.endswith("-fail"):
        return node
    if "." not in node:
        raise click.BadParameter(
            f"invalid node {node!r}: expected PIPELINE.NODE, for example "
            "wordcount.count",
            param_hint="NODE",
        )
    return f"{node}-fail"


def default_stream(node: str) -> str:
    """Return the stream of the pipeline of `node`, as run from this folder.

    That is the stream of the master or run whose discovery file in
    `.monomyth/` names the pipeline, while that process runs. Otherwise it is
    the stream of the pipeline's latest run from this folder, as
    `.monomyth/<pipeline>.stream` records it. Without that record it is the
    file that `engine run` uses, `.monomyth/<pipeline>.db`, which must exist,
    because opening a missing one would create an empty stream and report no
    failed items.
    """
    pipeline = node.split(".", 1)[0]
    discovery = _running_discovery()
    if discovery is not None and pipeline in discovery.get("pipelines", []):
        stream_url = discovery.get("stream")
        if isinstance(stream_url, str) and stream_url:
            return stream_url
    recorded = read_stream_record(pipeline)
    if recorded is not None:
        return recorded
    path = Path(".monomyth") / f"{pipeline}.db"
    if not path.exists():
        raise EngineError(
            f"no stream of pipeline {pipeline!r} here: {str(path)!r} does not "
            "exist and no running master in this folder serves the pipeline; run "
            "the command in the folder of the run, or pass --stream URL"
        )
    return f"sqlite:///{path}"


def _running_discovery() -> dict | None:
    content = read_discovery()
    if content is None or not is_process_alive(content.get("pid")):
        return None
    return content


@contextmanager
def _held(stream: Stream, queue: str, limit: int) -> Iterator[list[Delivery]]:
    """Pull up to `limit` items; put back those that the caller did not ack."""
    deliveries: list[Delivery] = []
    while len(deliveries) < limit:
        batch = stream.pull([queue], min(READ_BATCH, limit - len(deliveries)), 0.2)
        if not batch:
            break
        deliveries.extend(batch)
    try:
        yield deliveries
    finally:
        # The caller removes from the list what it acked.
        if deliveries:
            stream.reject(deliveries, requeue=True)


def _decode(delivery: Delivery) -> dict[str, Any] | None:
    """Return a failure record, or None for one that is not JSON (pickled)."""
    try:
        record = json.loads(delivery.body)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _describe(delivery: Delivery) -> dict[str, Any]:
    record = _decode(delivery)
    if record is None:
        # Pickled records stay undecoded here, so their id and errors are unknown.
        return {
            "id": "?",
            "payload": repr(delivery.body[:200]),
            "errors": [],
            "stored_bytes": len(delivery.body),
        }
    return record


def _as_count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _summary(record: dict[str, Any]) -> str:
    if "stored_bytes" in record:
        return (
            f"?  pickled item of {record['stored_bytes']} bytes, not decoded: "
            f"{record['payload'][:80]}"
        )
    errors = record.get("errors") or [{}]
    last = errors[-1]
    message = str(last.get("message", "")).splitlines()[0:1]
    # An attempt that killed its node process leaves no error of its own: the
    # last error then counts every attempt in its `attempt` member.
    attempts = max(len(errors), _as_count(last.get("attempt")))
    return (
        f"{record.get('id', '?')}  attempts={attempts}  "
        f"{last.get('type', '?')}: {message[0] if message else ''}"
    )


@click.group("fail-queue")
def fail_queue() -> None:
    """List, show, replay or purge the failed items of a node.

    NODE is PIPELINE.NODE, such as wordcount.count. Items whose pipeline uses
    serializer='pickle' are shown as stored bytes.
    """


_stream_option = click.option(
    "--stream",
    "stream_url",
    metavar="URL",
    help="Data stream URL; default: the stream of the master running in the "
    "current folder, else sqlite:///.monomyth/<pipeline>.db there.",
)


def _open(node: str, stream_url: str | None) -> tuple[Stream, str]:
    queue = fail_queue_name(node)
    url = stream_url or default_stream(node)
    stream = open_stream(url, owner="engine-fail-queue")
    try:
        has_queue = stream.has_queue(queue)
    except BaseException:
        stream.close()
        raise
    if not has_queue:
        stream.close()
        raise EngineError(
            f"node {node!r} has no fail queue {queue!r} in the stream "
            f"{redact_url(url)}; check the PIPELINE.NODE name, which "
            "engine status lists while the pipeline runs"
        )
    return stream, queue


@fail_queue.command("list")
@click.argument("node")
@_stream_option
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Maximum number of items to list.",
)
def list_items(node: str, stream_url: str | None, limit: int) -> None:
    """List the failed items of NODE: id, attempts and last error."""
    stream, queue = _open(node, stream_url)
    try:
        total = stream.depth(queue)
        with _held(stream, queue, limit) as deliveries:
            for delivery in deliveries:
                click.echo(_summary(_describe(delivery)))
        click.echo(f"{total} failed items in {queue}")
    finally:
        stream.close()


@fail_queue.command()
@click.argument("node")
@click.argument("item_id")
@_stream_option
def show(node: str, item_id: str, stream_url: str | None) -> None:
    """Show one failed item of NODE as JSON, with its whole error history."""
    stream, queue = _open(node, stream_url)
    try:
        with _held(stream, queue, stream.depth(queue)) as deliveries:
            for delivery in deliveries:
                record = _describe(delivery)
                if record.get("id") == item_id:
                    click.echo(json.dumps(record, indent=2, ensure_ascii=False))
                    return
        raise EngineError(
            f"item {item_id!r} not found in {queue}; list the ids with "
            f"engine fail-queue list {node}"
        )
    finally:
        stream.close()


@fail_queue.command()
@click.argument("node")
@click.option(
    "--id",
    "item_ids",
    multiple=True,
    metavar="ID",
    help="Replay only this item; repeat for several. Default: every item.",
)
@_stream_option
def replay(node: str, item_ids: tuple[str, ...], stream_url: str | None) -> None:
    """Put failed items of NODE back on the queue they failed from.

    A replayed item starts again at attempt 1 and keeps its error history.
    A running pipeline processes it; otherwise run `engine run PIPELINE.py
    --resume`, which processes what the stream contains without running the
    sources again. A fail queue may contain several records of one item, as
    after runs that failed it again: the item goes back once, with its
    newest record, and its older records are deleted.
    """
    stream, queue = _open(node, stream_url)
    try:
        with _held(stream, queue, stream.depth(queue)) as deliveries:
            chosen = []
            pickled_count = 0
            source_ids = []
            for delivery in deliveries:
                record = _decode(delivery)
                if record is None:
                    pickled_count += 1
                    continue
                if item_ids and record.get("id") not in item_ids:
                    continue
                if not record.get("queue"):
                    source_ids.append(str(record.get("id")))
                    continue
                chosen.append((delivery, record))
            _echo_skipped(pickled_count, source_ids)
            # The newest record of each item, by the order of the fail queue.
            newest = {record.get("id"): record for _, record in chosen}
            messages = []
            for record in newest.values():
                target = record.pop("queue")
                record["attempt"] = 1
                messages.append((target, json.dumps(record).encode()))
            if messages:
                stream.publish(messages)
                # Ack only after the replayed items are stored on their queues.
                stream.ack([delivery for delivery, _ in chosen])
                for delivery, _ in chosen:
                    deliveries.remove(delivery)
        dropped = len(chosen) - len(messages)
        click.echo(
            f"replayed {len(messages)} items from {queue}"
            + (f" and deleted {dropped} older records of them" if dropped else "")
        )
    finally:
        stream.close()


def _echo_skipped(pickled_count: int, source_ids: list[str]) -> None:
    """Report the failed items that replay cannot put back, one line per reason."""
    if pickled_count:
        click.echo(
            f"skipped {pickled_count} items that are not JSON: replay supports "
            "pipelines with the default serializer only",
            err=True,
        )
    if source_ids:
        first_ids = ", ".join(source_ids[:5])
        more = f" and {len(source_ids) - 5} more" if len(source_ids) > 5 else ""
        click.echo(
            f"skipped {len(source_ids)} items that failed in a source, which has "
            f"no input queue to replay to: {first_ids}{more}",
            err=True,
        )


@fail_queue.command()
@click.argument("node")
@_stream_option
@click.option("--yes", is_flag=True, help="Purge without asking for confirmation.")
def purge(node: str, stream_url: str | None, yes: bool) -> None:
    """Delete every failed item of NODE for good."""
    stream, queue = _open(node, stream_url)
    try:
        depth = stream.depth(queue)
        if not yes:
            click.confirm(f"delete {depth} failed items from {queue}?", abort=True)
        purged = 0
        while True:
            batch = stream.pull([queue], READ_BATCH, 0.2)
            if not batch:
                break
            stream.ack(batch)
            purged += len(batch)
        click.echo(f"purged {purged} items from {queue}")
    finally:
        stream.close()
