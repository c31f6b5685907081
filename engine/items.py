"""Items between nodes: the envelope, its encodings and its ids.

Every item is an envelope `{"id", "attempt", "payload"}`, plus `"errors"`
once an attempt failed. A message on a data queue contains one envelope, or
a pack of several. The results that one batch sends along one edge travel as
one message, so that the stream moves a batch where it would move each item.
JSON is the default encoding, so that decoding an item from a queue can
never run code; a pipeline opts in to pickle with
`Pipeline(..., serializer="pickle")`.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from typing import Any

from engine.errors import EngineError


class EncodingError(EngineError):
    """An item cannot be encoded with the pipeline's serializer."""


class DecodingError(EngineError):
    """A message on a queue is not a valid item envelope."""


SERIALIZERS = ("json", "pickle")

# Made once: json.dumps with options builds a new encoder on each call, which
# costs about a third of encoding a small envelope.
_JSON_ENCODER = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, allow_nan=False
)
_JSON_DECODER = json.JSONDecoder()
# The C encoder that `_JSON_ENCODER` uses, made once and called without the
# Python layers of `JSONEncoder.encode`, which cost about as much again as
# the encoding of a small envelope. It keeps no markers of the containers it
# is inside, so a value that contains itself raises RecursionError. None
# where the interpreter lacks it.
_C_ENCODER = (
    json.encoder.c_make_encoder(
        None,
        _JSON_ENCODER.default,
        json.encoder.encode_basestring,
        None,
        ":",
        ",",
        False,
        False,
        False,
    )
    if json.encoder.c_make_encoder is not None
    else None
)


def _encode_json(value: Any) -> str:
    if _C_ENCODER is None:
        return _JSON_ENCODER.encode(value)
    return "".join(_C_ENCODER(value, 0))


def _check_serializer(serializer: str) -> None:
    if serializer not in SERIALIZERS:
        raise EngineError(
            f"invalid serializer {serializer!r}: expected 'json' or 'pickle'"
        )


def encode(envelope: dict[str, Any], serializer: str) -> bytes:
    """Encode an envelope; raises `EncodingError` naming the value's problem."""
    _check_serializer(serializer)
    if serializer == "pickle":
        try:
            return pickle.dumps(envelope, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise EncodingError(f"item cannot be pickled: {exc}") from exc
    try:
        return _encode_json(envelope).encode()
    except RecursionError as exc:
        raise EncodingError(
            "item is nested too deeply or contains itself; return dicts, lists, "
            "str, int, float, bool or None without cycles"
        ) from exc
    except (TypeError, ValueError) as exc:
        raise EncodingError(
            f"item is not JSON-serializable ({exc}); return dicts, lists, str, "
            "int, float, bool or None, or declare Pipeline(..., "
            "serializer='pickle')"
        ) from exc


def decode(body: bytes, serializer: str) -> dict[str, Any]:
    """Decode a message body into an envelope; raises `DecodingError`."""
    envelope = _load(body, serializer)
    if not isinstance(envelope, dict) or "payload" not in envelope:
        raise DecodingError(
            f"message is not an item envelope: {body[:80]!r}; only the engine "
            "should publish to a pipeline's queues"
        )
    return envelope


def pack(bodies: list[bytes], serializer: str) -> bytes:
    """Return one message body that contains the encoded envelopes `bodies`.

    One envelope stays as it is. In JSON, a pack is the array of the
    envelopes, joined without decoding them again; in pickle, the pickled
    list of their bodies.
    """
    if len(bodies) == 1:
        return bodies[0]
    if serializer == "pickle":
        return pickle.dumps(bodies, protocol=pickle.HIGHEST_PROTOCOL)
    return b"[" + b",".join(bodies) + b"]"


def unpack(body: bytes, serializer: str) -> list[dict[str, Any]]:
    """Decode a message body into its envelopes, one or a pack of them.

    Raises `DecodingError` when the body, or any envelope of a pack, is not
    valid: a pack is decoded whole or not at all.
    """
    value = _load(body, serializer)
    if serializer == "pickle" and isinstance(value, list):
        value = [_load(part, serializer) for part in value]
    envelopes = value if isinstance(value, list) else [value]
    for envelope in envelopes:
        if not isinstance(envelope, dict) or "payload" not in envelope:
            raise DecodingError(
                f"message is not an item envelope or a pack of them: "
                f"{body[:80]!r}; only the engine should publish to a pipeline's "
                "queues"
            )
    if not envelopes:
        raise DecodingError(
            "message is an empty pack; only the engine should publish to a "
            "pipeline's queues"
        )
    return envelopes


def _load(body: bytes, serializer: str) -> Any:
    """Decode `body` with `serializer`; raises `DecodingError` when it is invalid."""
    _check_serializer(serializer)
    try:
        return pickle.loads(body) if serializer == "pickle" else _loads(body)
    except Exception as exc:
        raise DecodingError(f"message is not a valid {serializer} item: {exc}") from exc


def _loads(body: bytes) -> Any:
    """Decode JSON as `json.loads` does, faster for the UTF-8 that `encode` writes.

    `json.loads` of bytes first guesses their encoding, which costs about a
    third of decoding a small envelope.
    """
    try:
        return _JSON_DECODER.decode(body.decode())
    except ValueError:
        # A byte order mark, UTF-16 or UTF-32, or invalid JSON: json.loads
        # accepts the first three and raises the error for the last.
        return json.loads(body)


def source_item_id(node: str, position: int, process_index: int = 0) -> str:
    """Return the id of the item that source `node` yielded at `position`.

    Each process of a source with several processes yields its own items, so
    the ids of the processes after the first name their `process_index`.
    """
    if process_index:
        return f"{node}#{process_index}:{position}"
    return f"{node}:{position}"


def source_position_key(node_type: str, process_index: int) -> str:
    """Return the stream key of how many items one source process published."""
    return f"{node_type}-position-{process_index}"


def derived_item_id(parent_id: str, node: str, index: int) -> str:
    """Return the id of the `index`-th result of `node` for item `parent_id`.

    The same input always gives the same ids, so a sink can recognize an item
    it applied before, whatever crashed and redelivered in between.
    """
    digest = hashlib.blake2b(
        f"{parent_id}\x00{node}\x00{index}".encode(), digest_size=12
    ).hexdigest()
    return f"{node}:{digest}"
