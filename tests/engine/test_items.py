"""Tests of item envelopes: JSON and pickle encodings, and item ids."""

from __future__ import annotations

import json
import pickle
from typing import Any

import pytest

from engine.items import (
    DecodingError,
    EncodingError,
    decode,
    derived_item_id,
    encode,
    pack,
    source_item_id,
    unpack,
)

# Labels recorded each time a `Tripwire` is unpickled. A decoder that never
# runs code leaves the list empty.
TRIPPED: list[str] = []


def trip(label: str) -> str:
    TRIPPED.append(label)
    return label


class Tripwire:
    """An object whose unpickling calls `trip`, as a hostile payload would."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (trip, ("unpickled",))


def envelope(payload: Any) -> dict[str, Any]:
    return {"id": "read:0", "attempt": 1, "payload": payload}


# JSON.


def test_json_round_trip_keeps_envelope() -> None:
    original = envelope({"text": "héllo wörld", "counts": [1, 2.5, None, True]})

    assert decode(encode(original, "json"), "json") == original


def test_json_encoding_is_compact_utf8() -> None:
    body = encode(envelope("é"), "json")

    assert body == '{"id":"read:0","attempt":1,"payload":"é"}'.encode()


def test_json_round_trip_keeps_errors_field() -> None:
    original = envelope(3) | {"errors": ["ValueError: bad item"]}

    assert decode(encode(original, "json"), "json") == original


def test_json_encode_rejects_set() -> None:
    with pytest.raises(EncodingError) as excinfo:
        encode(envelope({"a", "b"}), "json")

    message = str(excinfo.value)
    assert "item is not JSON-serializable" in message
    assert "set" in message
    assert "serializer='pickle'" in message


def test_json_encode_rejects_object() -> None:
    with pytest.raises(EncodingError, match="serializer='pickle'"):
        encode(envelope(object()), "json")


def test_json_encode_rejects_value_that_contains_itself() -> None:
    loop: list[Any] = []
    loop.append(loop)

    with pytest.raises(EncodingError, match="contains itself"):
        encode(envelope(loop), "json")


def test_json_decode_rejects_garbage() -> None:
    with pytest.raises(DecodingError, match="message is not a valid json item"):
        decode(b"\x00\xffnot json", "json")


@pytest.mark.parametrize(
    "body",
    [b"[1, 2]", b'"text"', b"42", b"null", b'{"id": "read:0", "attempt": 1}'],
    ids=["list", "string", "number", "null", "no-payload"],
)
def test_json_decode_rejects_non_envelope(body: bytes) -> None:
    with pytest.raises(DecodingError, match="message is not an item envelope"):
        decode(body, "json")


def test_json_decode_never_unpickles() -> None:
    body = pickle.dumps(envelope(Tripwire()))
    TRIPPED.clear()

    with pytest.raises(DecodingError, match="message is not a valid json item"):
        decode(body, "json")

    assert TRIPPED == []


def test_pickle_decode_runs_tripwire() -> None:
    # The payload of the test above is live: the pickle decoder runs it.
    body = pickle.dumps(envelope(Tripwire()))
    TRIPPED.clear()

    decoded = decode(body, "pickle")

    assert TRIPPED == ["unpickled"]
    assert decoded["payload"] == "unpickled"


# Pickle.


def test_pickle_round_trip_keeps_types() -> None:
    original = envelope({"words": {"a", "b"}, "pair": (1, 2), "key": {3: "three"}})

    decoded = decode(encode(original, "pickle"), "pickle")

    assert decoded == original
    assert isinstance(decoded["payload"]["pair"], tuple)
    assert isinstance(decoded["payload"]["words"], set)


def test_pickle_encode_rejects_lambda() -> None:
    with pytest.raises(EncodingError, match="item cannot be pickled"):
        encode(envelope(lambda item: item), "pickle")


def test_pickle_decode_rejects_garbage() -> None:
    with pytest.raises(DecodingError, match="message is not a valid pickle item"):
        decode(b"not a pickle", "pickle")


def test_pickle_decode_rejects_non_envelope() -> None:
    with pytest.raises(DecodingError, match="message is not an item envelope"):
        decode(pickle.dumps(["read:0", 1, "payload"]), "pickle")


def test_pickle_decode_rejects_json_body() -> None:
    body = json.dumps(envelope(1)).encode()

    with pytest.raises(DecodingError, match="message is not a valid pickle item"):
        decode(body, "pickle")


# Packs.


@pytest.mark.parametrize("serializer", ["json", "pickle"])
def test_pack_round_trip_keeps_envelopes_in_order(serializer: str) -> None:
    envelopes = [
        {"id": f"read:{index}", "attempt": 1, "payload": {"n": index, "t": "é"}}
        for index in range(5)
    ]
    bodies = [encode(item, serializer) for item in envelopes]

    assert unpack(pack(bodies, serializer), serializer) == envelopes


@pytest.mark.parametrize("serializer", ["json", "pickle"])
def test_pack_of_one_is_the_envelope_itself(serializer: str) -> None:
    body = encode(envelope("alone"), serializer)

    assert pack([body], serializer) == body
    assert unpack(body, serializer) == [envelope("alone")]
    # A single envelope is also what the fail queue tools decode.
    assert decode(pack([body], serializer), serializer) == envelope("alone")


def test_json_pack_is_an_array_of_the_envelopes() -> None:
    bodies = [encode(envelope(1), "json"), encode(envelope(2), "json")]

    assert json.loads(pack(bodies, "json")) == [envelope(1), envelope(2)]


@pytest.mark.parametrize(
    "body",
    [b"[]", b'[{"id": "a", "attempt": 1, "payload": 1}, 2]', b"[[1]]", b'"text"'],
    ids=["empty", "one-not-envelope", "nested-list", "string"],
)
def test_unpack_rejects_pack_with_a_non_envelope(body: bytes) -> None:
    with pytest.raises(DecodingError, match="envelope|empty pack"):
        unpack(body, "json")


def test_unpack_rejects_garbage() -> None:
    with pytest.raises(DecodingError, match="message is not a valid json item"):
        unpack(b"[{broken", "json")


def test_pickle_unpack_rejects_pack_of_non_bytes() -> None:
    body = pickle.dumps([envelope(1)])

    with pytest.raises(DecodingError, match="message is not a valid pickle item"):
        unpack(body, "pickle")


def test_json_unpack_never_unpickles() -> None:
    body = pickle.dumps([pickle.dumps(envelope(Tripwire()))])
    TRIPPED.clear()

    with pytest.raises(DecodingError):
        unpack(body, "json")

    assert TRIPPED == []


# Ids.


def test_source_item_id_names_node_and_position() -> None:
    assert source_item_id("read", 0) == "read:0"
    assert source_item_id("read", 41) == "read:41"


def test_source_item_id_names_later_processes() -> None:
    assert source_item_id("read", 41, process_index=0) == "read:41"
    assert source_item_id("read", 41, process_index=2) == "read#2:41"


def test_derived_item_id_deterministic() -> None:
    first = derived_item_id("read:7", "count", 0)
    second = derived_item_id("read:7", "count", 0)

    assert first == second


def test_derived_item_id_prefixed_by_node() -> None:
    item_id = derived_item_id("read:7", "count", 0)

    assert item_id.startswith("count:")
    assert len(item_id) == len("count:") + 24


@pytest.mark.parametrize(
    "changed",
    [
        ("read:8", "count", 0),
        ("read:7", "store", 0),
        ("read:7", "count", 1),
    ],
    ids=["parent", "node", "index"],
)
def test_derived_item_id_differs_per_input(changed: tuple[str, str, int]) -> None:
    assert derived_item_id(*changed) != derived_item_id("read:7", "count", 0)


def test_derived_item_ids_distinct_across_many() -> None:
    ids = {
        derived_item_id(source_item_id("read", position), node, index)
        for position in range(50)
        for node in ("count", "store")
        for index in range(10)
    }

    assert len(ids) == 50 * 2 * 10


def test_derived_item_id_separates_fields() -> None:
    # Joining the fields without a separator would make these two collide.
    assert derived_item_id("read:1", "ab", 2) != derived_item_id("read:1a", "b", 2)
