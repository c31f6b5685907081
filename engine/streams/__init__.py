"""Data stream backends, chosen by the scheme of a stream URL.

- `sqlite:///relative/path.db` or `sqlite:////absolute/path.db`: the embedded
  durable stream, for one machine. `?lease_s=SECONDS` sets how long a pulled
  message stays hidden from other processes (default 300; a node renews the
  lease of its batch in progress).
- `amqp://user:password@host:5672/vhost`: RabbitMQ, for a cluster.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit

from engine.errors import StreamError
from engine.streams.base import Delivery, Stream

__all__ = [
    "Delivery",
    "Stream",
    "is_requeued_by_broker",
    "open_stream",
    "redact_url",
    "sqlite_file",
    "sqlite_path",
]

SCHEMES = ("sqlite", "amqp", "amqps")


def open_stream(url: str, owner: str = "", **options: object) -> Stream:
    """Open the stream that `url` names, as seen by the process `owner`.

    `owner` names the process that pulls messages, so that a supervisor can
    recover what that process pulled if it dies. Raises `StreamError` for a
    URL whose scheme is not known, and `StreamUnavailableError` when the
    stream cannot be reached.
    """
    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme == "sqlite":
        from engine.streams.sqlite import SQLiteStream

        path, _, query = url.partition("?")
        settings = {**_sqlite_options(url, query), **options}
        return SQLiteStream(sqlite_path(path), owner=owner, **settings)
    if scheme in ("amqp", "amqps"):
        from engine.streams.rabbitmq import RabbitMQStream

        return RabbitMQStream(url, owner=owner, **options)
    raise StreamError(
        f"invalid stream URL {redact_url(url)!r}: the scheme must be one of "
        f"{', '.join(SCHEMES)}; for example sqlite:///run.db "
        "or amqp://guest:guest@127.0.0.1:5672/"
    )


def is_requeued_by_broker(url: str) -> bool:
    """Return True when the stream at `url` requeues a dead process's messages.

    RabbitMQ requeues the unacknowledged messages of a connection as soon as
    it closes, so a supervisor has nothing to recover and need not connect.
    """
    return urlsplit(url).scheme in ("amqp", "amqps")


def _sqlite_options(url: str, query: str) -> dict[str, object]:
    """Read `lease_s` from the query of a SQLite URL, as in `?lease_s=60`."""
    options: dict[str, object] = {}
    for key, values in parse_qs(query, keep_blank_values=True).items():
        if key != "lease_s":
            raise StreamError(
                f"invalid option {key!r} in stream URL {url!r}; the SQLite stream "
                "takes only lease_s, for example sqlite:///run.db?lease_s=60"
            )
        try:
            options["lease_s"] = float(values[-1])
        except ValueError:
            raise StreamError(
                f"invalid lease_s={values[-1]!r} in stream URL {url!r}: expected "
                "seconds, for example ?lease_s=60"
            ) from None
    return options


def sqlite_file(url: str) -> Path | None:
    """Return the database file of a SQLite stream URL, or None for other streams.

    The query, such as `?lease_s=60`, is not part of the path.
    """
    if not url.startswith("sqlite:"):
        return None
    return Path(sqlite_path(url.partition("?")[0]))


def sqlite_path(url: str) -> str:
    """Return the file path of a `sqlite:///PATH` URL.

    Three slashes lead a relative path and four an absolute one, as in
    SQLAlchemy's URLs.
    """
    prefix = "sqlite:///"
    if not url.startswith(prefix) or len(url) == len(prefix):
        raise StreamError(
            f"invalid SQLite stream URL {url!r}: expected sqlite:///PATH, "
            "for example sqlite:///run.db or sqlite:////tmp/run.db"
        )
    return url[len(prefix) :]


def redact_url(url: str) -> str:
    """Return `url` with its password replaced by `***`, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
