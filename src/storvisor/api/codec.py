"""JSON encoding of the records the API exchanges, both ways, typed.

``encode`` turns a frozen dataclass (or a list of them) into JSON-ready values; ``decode``
rebuilds the dataclass from parsed JSON using its type hints, so a client hands its callers
the same records the service returns and no untyped dict leaves the API package.

Supported field types: ``int``, ``float``, ``str``, ``bool``, ``None``, ``enum`` members,
nested dataclasses, ``tuple[X, ...]``, ``list[X]`` and ``X | None``. Anything that does not
fit raises ``ProtocolError`` (the peer sent something this version does not understand). A
field the record does not have is ignored, unless ``strict`` (the server decoding a request:
an unknown field is a mistake of the caller, never silently dropped; so is an integer outside
the signed 64-bit range).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

from storvisor.errors import ProtocolError

_T = TypeVar("_T")

INT_MIN, INT_MAX = -(1 << 63), (1 << 63) - 1
"""The integers a request may carry (what SQLite, C and most JSON peers hold)."""

JSONValue = None | bool | int | float | str | list["JSONValue"] | dict[str, "JSONValue"]
"""A value ``json.dumps`` accepts and ``json.loads`` produces."""


def encode(value: object) -> JSONValue:
    """Render a record, a list of records, or a plain value as JSON-ready values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return encode(value.value)
    if isinstance(value, list | tuple):
        return [encode(item) for item in value]
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def decode(cls: type[_T], data: JSONValue, *, strict: bool = False) -> _T:
    """Build a ``cls`` record from parsed JSON. Raises ``ProtocolError`` on a mismatch (with
    ``strict``, an unknown field too)."""
    return cast(_T, _decode(cls, data, cls.__name__, strict))


def decode_list(cls: type[_T], data: JSONValue) -> list[_T]:
    """Build a list of ``cls`` records from a parsed JSON array."""
    if not isinstance(data, list):
        raise ProtocolError(f"expected a list of {cls.__name__}, got {type(data).__name__}")
    return [decode(cls, item) for item in data]


def _decode(tp: Any, data: JSONValue, where: str, strict: bool = False) -> object:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if data is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _decode(arg, data, where, strict)
            except ProtocolError:
                continue
        raise ProtocolError(f"{where}: {data!r} does not match {tp}")
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if not isinstance(data, list):
            raise ProtocolError(f"{where}: expected a list, got {type(data).__name__}")
        items = [_decode(args[0], item, f"{where}[]", strict) for item in data]
        return tuple(items) if origin is tuple else items
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(data, dict):
            raise ProtocolError(f"{where}: expected an object, got {type(data).__name__}")
        return _decode_record(tp, data, where, strict)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(data)
        except ValueError as e:
            raise ProtocolError(f"{where}: {data!r} is not a {tp.__name__}") from e
    if tp is float and isinstance(data, int | float) and not isinstance(data, bool):
        return float(data)
    if tp is int and type(data) is int and strict and not INT_MIN <= data <= INT_MAX:
        raise ProtocolError(f"{where}: {data} is out of range (a signed 64-bit integer)")
    if tp in (int, str, bool) and type(data) is tp:
        return data
    if tp is type(None) and data is None:
        return None
    raise ProtocolError(f"{where}: {data!r} is not a {getattr(tp, '__name__', tp)}")


def _decode_record(
    cls: type[Any], data: Mapping[str, JSONValue], where: str, strict: bool
) -> object:
    hints = typing.get_type_hints(cls)
    if strict:
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ProtocolError(f"{where}: unknown field {unknown[0]!r}")
    kwargs: dict[str, object] = {}
    for field in dataclasses.fields(cls):
        if field.name not in data:
            if (
                field.default is dataclasses.MISSING
                and field.default_factory is dataclasses.MISSING
            ):
                raise ProtocolError(f"{where}: missing field {field.name!r}")
            continue
        kwargs[field.name] = _decode(
            hints[field.name], data[field.name], f"{where}.{field.name}", strict
        )
    return cls(**kwargs)


def save_json(path: Path, doc: object, *, mode: int | None = None) -> None:
    """Replace the JSON file ``path`` with ``doc`` atomically and durably: a temporary file
    beside it, fsync, rename over it, fsync of the directory. ``mode``: the file's
    permissions, set before anything is written. Raises ``OSError``."""
    save_text(path, json.dumps(doc, indent=2) + "\n", mode=mode)


def save_text(path: Path, text: str, *, mode: int | None = None) -> None:
    """Replace the file ``path`` with ``text`` as ``save_json`` does. Raises ``OSError``."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        if mode is not None:
            os.fchmod(f.fileno(), mode)
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
