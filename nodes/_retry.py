"""A retry loop with exponential backoff and jitter.

`SQLiteSink`, `PostgresSink` and `connect_postgres` retry through it. Each
caller decides which errors are transient and writes the text of its
WARNING. It also passes its own logger, so that each retry is logged under
the name of the module that retries, such as `nodes.sqlite`.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def retry_with_backoff(
    operation: Callable[[], T],
    *,
    describe_transient: Callable[[Exception], str | None],
    max_retries: int,
    first_delay_s: float,
    max_delay_s: float,
    logger: logging.Logger,
    give_up: Callable[[Exception, int], Exception | None] | None = None,
) -> T:
    """Run `operation` and return its result, retrying after transient errors.

    `describe_transient(exc)` returns what went wrong, as the start of the
    WARNING logged for a retry, or None for an error to raise at once. It may
    also raise an error of its own in place of `exc`. The wait before retry
    `n` is `first_delay_s * 2 ** (n - 1)`, at most `max_delay_s`, less a
    random jitter of up to half.

    When the last of `max_retries` retries fails with a transient error, the
    error is raised as it is, unless `give_up(exc, attempts)` returns another
    error to raise in its place, chained to `exc`.
    """
    retry = 0
    while True:
        try:
            return operation()
        except Exception as exc:
            problem = describe_transient(exc)
            if problem is None:
                raise
            if retry == max_retries:
                replacement = give_up(exc, retry + 1) if give_up else None
                if replacement is None:
                    raise
                raise replacement from exc
        retry += 1
        delay_s = _backoff_delay_s(retry, first_delay_s, max_delay_s)
        logger.warning(
            "%s; retry %d of %d in %.2f s", problem, retry, max_retries, delay_s
        )
        time.sleep(delay_s)


def _backoff_delay_s(retry: int, first_delay_s: float, max_delay_s: float) -> float:
    """Return the wait in seconds before retry number `retry`, counted from 1."""
    delay_s = min(first_delay_s * 2 ** (retry - 1), max_delay_s)
    # Random jitter spreads out the processes that failed together, such as
    # the writers that waited on one lock or lost one server.
    return delay_s * random.uniform(0.5, 1.0)
