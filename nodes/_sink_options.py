"""The options that `SQLiteSink` and `PostgresSink` share, checked and applied.

Both sinks take a statement, a schema, `rows`, `dedupe` and `max_retries`.
This module checks those values, both in the constructor and after `setup`
resolves a `Param`, maps items to parameter rows, and takes the item ids of
a batch for `dedupe=True`. Each message names the sink, given as `sink`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from engine.context import Param
from engine.errors import ParameterError, PipelineError

if TYPE_CHECKING:
    from engine.context import NodeContext

# One row of statement parameters: positional, or named for placeholders such
# as `:name` in SQLite and `%(name)s` in PostgreSQL.
Row = Sequence[Any] | Mapping[str, Any]


def check_sink_arguments(
    statement: str | Param,
    schema: str | Sequence[str] | Param,
    dedupe: bool | Param,
    rows: Callable[[Any], Iterable[Row]] | None,
    sink: str,
) -> None:
    """Raise `ParameterError` for an invalid shared argument of a sink.

    A `Param` is checked later, when `setup` resolves it.
    """
    if not isinstance(statement, Param):
        check_statement(statement)
    if not isinstance(schema, Param):
        as_statements(schema)
    if not isinstance(dedupe, Param):
        as_bool(dedupe, "dedupe")
    if rows is not None and not callable(rows):
        raise ParameterError(
            f"invalid rows={rows!r} for {sink}: expected a function "
            "from an item to its parameter rows, such as "
            "rows=lambda counts: counts.items()"
        )


def check_max_retries(max_retries: Any, sink: str) -> None:
    """Raise `ParameterError` unless `max_retries` is an integer of 0 or more."""
    if isinstance(max_retries, bool) or not isinstance(max_retries, int):
        raise ParameterError(
            f"invalid max_retries={max_retries!r} for {sink}: expected an integer"
        )
    if max_retries < 0:
        raise ParameterError(
            f"invalid max_retries={max_retries} for {sink}: "
            "max_retries must be 0 or more"
        )


def check_statement(statement: Any) -> str:
    """Check that `statement` is a non-empty string, and return it."""
    if not isinstance(statement, str) or not statement.strip():
        raise ParameterError(
            f"invalid SQL statement {statement!r}: expected a non-empty string"
        )
    return statement


def as_statements(schema: Any) -> list[str]:
    """Convert a schema, one statement or a sequence of them, to a list."""
    if isinstance(schema, str):
        return [check_statement(schema)]
    if not isinstance(schema, Sequence):
        raise ParameterError(
            f"invalid schema={schema!r}: expected an SQL statement or a list of them"
        )
    return [check_statement(statement) for statement in schema]


def as_bool(value: Any, name: str) -> bool:
    """Convert `value`, a bool or text such as "yes", to a bool."""
    # A run parameter given on the command line may be text, such as "true".
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "0", "no"):
        return False
    raise ParameterError(f"invalid {name}={value!r}: expected true or false")


def resolve_dedupe(dedupe: bool | Param, ctx: NodeContext, sink: str) -> bool:
    """Resolve `dedupe` in `setup`, and check that the engine sets item ids.

    Raises `PipelineError` for `dedupe=True` when `ctx` has no `item_ids`.
    """
    is_deduped = as_bool(ctx.resolve(dedupe), "dedupe")
    if is_deduped and not hasattr(ctx, "item_ids"):
        raise PipelineError(_missing_item_ids_message(ctx, sink))
    return is_deduped


def batch_item_ids(items: list[Any], ctx: NodeContext, sink: str) -> list[str]:
    """Return the id of each item of a batch, as text, from `ctx.item_ids`."""
    item_ids = getattr(ctx, "item_ids", None)
    if item_ids is None or (items and not item_ids):
        raise PipelineError(_missing_item_ids_message(ctx, sink))
    if len(item_ids) != len(items):
        raise RuntimeError(
            f"ctx.item_ids has {len(item_ids)} ids for a batch of "
            f"{len(items)} items in node {ctx.node!r}; the engine must "
            "give one id per item"
        )
    return [str(item_id) for item_id in item_ids]


def iter_rows(
    items: list[Any], rows: Callable[[Any], Iterable[Row]] | None, sink: str
) -> Iterator[Row]:
    """Yield the parameter rows of `items`: `rows(item)`, or each item itself."""
    for item in items:
        if rows is not None:
            yield from rows(item)
        elif isinstance(item, list | tuple | Mapping):
            yield item
        else:
            raise TypeError(
                f"{sink} got an item of type {type(item).__name__}: "
                f"{item!r}; expected a list, tuple or dict of statement "
                "parameters, or pass rows= to map each item to its rows"
            )


def _missing_item_ids_message(ctx: NodeContext, sink: str) -> str:
    return (
        f"{sink}(dedupe=True) in node {ctx.node!r} needs the item ids "
        "of each batch in ctx.item_ids, and this engine does not set them; "
        "pass dedupe=False"
    )
