"""The base of MMOP messages, their registry by wire name, and shared checks.

`_register` adds a message class to `MESSAGE_TYPES` under its wire name and
records its fields for the encoder, after checking that each field's type
is one the encoder can check and encode. The `_require_*` helpers are the
value checks that the messages run in `__post_init__`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

# The protocol version that the handshake announces.
PROTOCOL_VERSION = "MMOP/1"


@dataclass(frozen=True, slots=True)
class Message:
    """Base of every MMOP message.

    Each subclass is a frozen, slotted dataclass that `_register` adds to
    `MESSAGE_TYPES` under its wire name.
    """


class _FieldSpec(NamedTuple):
    name: str
    annotation: Any
    is_required: bool


_SCALAR_TYPES = (str, int, float, bool, bytes)
_REGISTRY: dict[str, type[Message]] = {}
_FIELD_SPECS: dict[type[Message], tuple[_FieldSpec, ...]] = {}
# Read-only view of the registry: wire name to message class.
MESSAGE_TYPES: Mapping[str, type[Message]] = types.MappingProxyType(_REGISTRY)

_WORD_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_M = TypeVar("_M", bound=Message)


def wire_name(cls_or_message: type[Message] | Message) -> str:
    """Return the wire name of a message class or message.

    The rule splits the CamelCase class name before each upper-case letter
    that follows a lower-case letter or a digit, joins the words with hyphens
    and upper-cases them: `NodeStarted` is `NODE-STARTED`.
    Raises TypeError for anything but a `Message` subclass or instance.
    """
    is_class = isinstance(cls_or_message, type)
    cls = cls_or_message if is_class else type(cls_or_message)
    if not issubclass(cls, Message):
        raise TypeError(
            f"expected an MMOP message class or message, got {cls.__name__}"
        )
    return _wire_name_of(cls.__name__)


@functools.cache
def _wire_name_of(class_name: str) -> str:
    return _WORD_BOUNDARY.sub("-", class_name).upper()


def _register(cls: type[_M]) -> type[_M]:
    """Add a message dataclass to `MESSAGE_TYPES` under its wire name."""
    name = wire_name(cls)
    if name in _REGISTRY:
        raise TypeError(f"two MMOP message classes share the wire name {name!r}")

    hints = typing.get_type_hints(cls)
    specs = []
    for dataclass_field in dataclasses.fields(cls):
        name_in_class = dataclass_field.name
        if name_in_class == "type":
            raise TypeError(f"{cls.__name__}: the field name 'type' is reserved")
        _check_annotation(hints[name_in_class], f"{cls.__name__}.{name_in_class}")
        is_required = (
            dataclass_field.default is dataclasses.MISSING
            and dataclass_field.default_factory is dataclasses.MISSING
        )
        specs.append(_FieldSpec(name_in_class, hints[name_in_class], is_required))

    _REGISTRY[name] = cls
    _FIELD_SPECS[cls] = tuple(specs)
    return cls


def _check_annotation(annotation: Any, where: str) -> None:
    """Raise TypeError unless the protocol can check and encode the annotation."""
    if annotation is Any or annotation in _SCALAR_TYPES or annotation in (list, dict):
        return
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType):
        if len(args) == 2 and type(None) in args:
            _check_annotation(_without_none(annotation), where)
            return
    elif typing.get_origin(annotation) is list and len(args) == 1:
        _check_annotation(args[0], where)
        return
    elif typing.get_origin(annotation) is dict and len(args) == 2 and args[0] is str:
        _check_annotation(args[1], where)
        return
    raise TypeError(f"{where}: MMOP fields cannot have the type {annotation!r}")


def _without_none(annotation: types.UnionType) -> Any:
    return next(arg for arg in typing.get_args(annotation) if arg is not type(None))


def _require_at_least(message: Message, name: str, minimum: int) -> None:
    value = getattr(message, name)
    # `not >=` so that NaN fails the check too.
    if not value >= minimum:
        raise ValueError(
            f"invalid {name}={value!r} for {wire_name(message)}: "
            f"{name} must be {minimum} or more"
        )


def _require_more_than_zero(message: Message, name: str) -> None:
    value = getattr(message, name)
    if not value > 0:
        raise ValueError(
            f"invalid {name}={value!r} for {wire_name(message)}: "
            f"{name} must be more than 0"
        )


def _require_ids(message: Message, *names: str) -> None:
    for name in names:
        if getattr(message, name) == "":
            raise ValueError(
                f"invalid {name}='' for {wire_name(message)}: {name} must not be empty"
            )
