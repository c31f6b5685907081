"""Encoding of MMOP messages as JSON frame bodies, and decoding with validation.

Both directions check each field against its annotation. Encoding raises
TypeError or ValueError, and decoding raises ProtocolError naming the
message and the field. Decoding parses JSON only, so it never runs code.
"""

from __future__ import annotations

import base64
import json
import math
import types
import typing
from typing import Any

from engine.errors import ProtocolError
from engine.protocol.registry import (
    _FIELD_SPECS,
    _REGISTRY,
    PROTOCOL_VERSION,
    Message,
    _without_none,
    wire_name,
)

_REPR_LIMIT = 60


class _FieldError(Exception):
    """A field value that does not match its annotation."""

    def __init__(self, text: str, path: str):
        super().__init__(text)
        # The field, or the item inside it, that failed: "nodes[2]".
        self.path = path


def encode_message(message: Message) -> bytes:
    """Encode a message as the UTF-8 JSON body of a frame, without the length.

    Raises TypeError when a field does not match its annotation, and
    ValueError when a value cannot be JSON (NaN, infinity, deep nesting).
    """
    specs = _FIELD_SPECS.get(type(message))
    if specs is None:
        raise TypeError(f"not a registered MMOP message: {type(message).__name__}")
    name = wire_name(message)

    body: dict[str, Any] = {"type": name}
    for spec in specs:
        value = getattr(message, spec.name)
        try:
            body[spec.name] = _convert(
                value, spec.annotation, spec.name, is_encoding=True
            )
        except _FieldError as exc:
            raise TypeError(f"cannot encode {name}: {exc}") from None

    try:
        text = json.dumps(body, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"cannot encode {name} as JSON: {exc}") from exc
    return text.encode("utf-8")


def decode_message(payload: bytes) -> Message:
    """Decode the JSON body of a frame into a message.

    Only JSON is parsed, so a payload can never run code. Fields that the
    message class does not declare are ignored, so that a newer peer may add
    optional fields. Raises ProtocolError naming the message and the field
    for invalid JSON, an unknown type, or a missing or mistyped field.
    """
    body = _parse_json_object(payload)
    name = body.get("type")
    if not isinstance(name, str):
        raise ProtocolError(
            "invalid message: the 'type' field is missing or not a string"
        )
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ProtocolError(
            f"unknown message type {_short_repr(name)}; this side speaks "
            f"{PROTOCOL_VERSION} and knows the types listed in docs/mmop.md"
        )

    values: dict[str, Any] = {}
    for spec in _FIELD_SPECS[cls]:
        if spec.name not in body:
            if spec.is_required:
                raise ProtocolError(
                    f"invalid {name} message: missing field {spec.name!r}"
                )
            continue
        try:
            values[spec.name] = _convert(
                body[spec.name], spec.annotation, spec.name, is_encoding=False
            )
        except _FieldError as exc:
            raise ProtocolError(f"invalid {name} message: {exc}") from None

    try:
        return cls(**values)
    except ValueError as exc:
        # The checks in __post_init__ name the message and the field already.
        raise ProtocolError(str(exc)) from exc
    except TypeError as exc:
        raise ProtocolError(f"invalid {name} message: {exc}") from exc


def _parse_json_object(payload: bytes) -> dict[str, Any]:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"invalid frame: the body is not UTF-8 ({exc})") from None
    try:
        body = json.loads(text, parse_constant=_reject_json_constant)
    except (ValueError, RecursionError) as exc:
        reason = str(exc) or "nested too deeply"
        raise ProtocolError(
            f"invalid frame: the body is not valid JSON ({reason})"
        ) from None
    if not isinstance(body, dict):
        raise ProtocolError(
            f"invalid frame: expected a JSON object, got {_describe(body)}"
        )
    return body


def _reject_json_constant(constant: str) -> None:
    raise ValueError(f"{constant} is not a JSON number")


def _convert(value: Any, annotation: Any, path: str, *, is_encoding: bool) -> Any:
    """Check a field value against its annotation and convert it for the wire.

    Encoding turns bytes into base64 text; decoding turns it back, and turns
    JSON integers in float fields into floats. Raises _FieldError.
    """
    if annotation is Any:
        return value

    if isinstance(annotation, types.UnionType):
        if value is None:
            return None
        try:
            return _convert(
                value, _without_none(annotation), path, is_encoding=is_encoding
            )
        except _FieldError as exc:
            if exc.path != path:
                raise
            raise _mistyped(path, annotation, value) from None

    origin = typing.get_origin(annotation) or annotation
    args = typing.get_args(annotation)
    if origin is list:
        if type(value) is not list:
            raise _mistyped(path, annotation, value)
        if not args:
            return value
        return [
            _convert(item, args[0], f"{path}[{index}]", is_encoding=is_encoding)
            for index, item in enumerate(value)
        ]
    if origin is dict:
        return _convert_dict(value, annotation, path, is_encoding=is_encoding)
    return _convert_scalar(value, annotation, path, is_encoding=is_encoding)


def _convert_dict(value: Any, annotation: Any, path: str, *, is_encoding: bool) -> Any:
    if type(value) is not dict:
        raise _mistyped(path, annotation, value)
    args = typing.get_args(annotation)
    converted = {}
    for key, item in value.items():
        # json.dumps would turn other keys into strings and break the round trip.
        if not isinstance(key, str):
            raise _FieldError(
                f"field {path!r} must have string keys, got {_describe(key)}", path
            )
        item_path = f"{path}[{_shorten(json.dumps(key))}]"
        converted[key] = (
            _convert(item, args[1], item_path, is_encoding=is_encoding)
            if args
            else item
        )
    return converted


def _convert_scalar(
    value: Any, annotation: Any, path: str, *, is_encoding: bool
) -> Any:
    if annotation is bool:
        if type(value) is bool:
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
    elif annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
            if math.isfinite(number):
                return number
            raise _FieldError(
                f"field {path!r} must be a finite number, got {_describe(value)}", path
            )
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif annotation is bytes:
        if is_encoding and isinstance(value, bytes):
            return base64.b64encode(value).decode("ascii")
        if not is_encoding and isinstance(value, str):
            try:
                return base64.b64decode(value, validate=True)
            except ValueError as exc:
                raise _FieldError(
                    f"field {path!r} is not valid base64 ({exc})", path
                ) from None
    raise _mistyped(path, annotation, value)


def _mistyped(path: str, annotation: Any, value: Any) -> _FieldError:
    return _FieldError(
        f"field {path!r} must be {_expected_text(annotation)}, got {_describe(value)}",
        path,
    )


def _expected_text(annotation: Any) -> str:
    if isinstance(annotation, types.UnionType):
        return f"{_expected_text(_without_none(annotation))} or null"
    origin = typing.get_origin(annotation) or annotation
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        bytes: "bytes (base64 text on the wire)",
        list: "an array",
        dict: "an object",
    }
    return names.get(origin, repr(annotation))


def _describe(value: Any) -> str:
    """Describe a value by its JSON type and a short repr, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"number {_short_repr(value)}"
    if isinstance(value, str):
        return f"string {_short_repr(value)}"
    if isinstance(value, list):
        return f"an array of {len(value)} items"
    if isinstance(value, dict):
        return f"an object with {len(value)} keys"
    return type(value).__name__


def _short_repr(value: Any) -> str:
    try:
        text = repr(value)
    except ValueError:
        # repr of an int with more than 4300 digits raises ValueError.
        return f"<{type(value).__name__} too long to show>"
    return _shorten(text)


def _shorten(text: str) -> str:
    if len(text) <= _REPR_LIMIT:
        return text
    return text[: _REPR_LIMIT - 3] + "..."
