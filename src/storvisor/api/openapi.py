"""The OpenAPI 3.1 document of the API, generated from the route table (``routes.ROUTES``) and
the type hints of the records it names.

Each record (frozen dataclass) becomes a component schema of the same name, closed
(``additionalProperties: false``: the server refuses unknown fields); an enum becomes a string
schema listing its values; ``X | None`` a union with ``null``. Every operation documents its
success answer and, as ``default``, the ``ErrorBody`` of every error answer.

``document()`` is deterministic: ``docs/openapi.json`` is its output (``make openapi``
rewrites it, a test fails when it is stale).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from typing import Any

from storvisor import __version__
from storvisor.api.codec import INT_MAX, INT_MIN, JSONValue
from storvisor.api.messages import API_PREFIX, ErrorBody
from storvisor.api.routes import ROUTES, Access, Document, Route

_SCALARS: dict[object, dict[str, JSONValue]] = {
    int: {"type": "integer", "minimum": INT_MIN, "maximum": INT_MAX},
    float: {"type": "number"},
    str: {"type": "string"},
    bool: {"type": "boolean"},
    type(None): {"type": "null"},
}

_DESCRIPTION = """\
The management API of storvisor. It listens on the Unix socket HOME/api.sock (mode 0600, no \
token needed) and, when `storvisor serve --api-tcp` asks for it, on TCP with TLS, where every \
call needs `Authorization: Bearer TOKEN` (`storvisor token create`). A read-only token may \
call the operations marked `x-storvisor-access: read`. Errors answer an `ErrorBody`: 400 bad \
input, 401 no or unknown token, 403 a read-only token on a write, 404, 405, 409 conflict, \
411 a body without Content-Length, 413 body too large, 415 not JSON, 507 no space, 500 a \
failure of the daemon's side."""


class _Schemas:
    def __init__(self) -> None:
        self.components: dict[str, JSONValue] = {}
        self._owners: dict[str, object] = {}

    def ref(self, tp: Any) -> dict[str, JSONValue]:
        """The schema of the type ``tp``, registering the records and enums it names."""
        origin = typing.get_origin(tp)
        if origin in (types.UnionType, typing.Union):
            return {"anyOf": [self.ref(arg) for arg in typing.get_args(tp)]}
        if origin in (tuple, list):
            return {"type": "array", "items": self.ref(typing.get_args(tp)[0])}
        if tp in _SCALARS:
            return dict(_SCALARS[tp])
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            return self._named(tp, lambda: {"type": "string", "enum": [m.value for m in tp]})
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            return self._named(tp, lambda: self._record(tp))
        raise TypeError(f"no JSON schema for {tp!r}")

    def _named(self, tp: type, build: typing.Callable[[], JSONValue]) -> dict[str, JSONValue]:
        name = tp.__name__
        owner = self._owners.setdefault(name, tp)
        if owner is not tp:
            raise TypeError(f"two API types are named {name}: {owner!r} and {tp!r}")
        if name not in self.components:
            self.components[name] = None  # a placeholder: a record may name itself
            self.components[name] = build()
        return {"$ref": f"#/components/schemas/{name}"}

    def _record(self, cls: type[Any]) -> JSONValue:
        hints = typing.get_type_hints(cls)
        properties: dict[str, JSONValue] = {}
        required: list[JSONValue] = []
        for f in dataclasses.fields(cls):
            properties[f.name] = self.ref(hints[f.name])
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                required.append(f.name)
        schema: dict[str, JSONValue] = {"type": "object"}
        if cls.__doc__ and not cls.__doc__.startswith(f"{cls.__name__}("):
            schema["description"] = " ".join(cls.__doc__.split())
        schema |= {"properties": properties, "required": required, "additionalProperties": False}
        return schema


def _json(schema: JSONValue) -> dict[str, JSONValue]:
    return {"application/json": {"schema": schema}}


def _operation(route: Route[Any], schemas: _Schemas) -> dict[str, JSONValue]:
    op: dict[str, JSONValue] = {
        "operationId": route.name,
        "summary": route.summary,
        "x-storvisor-access": route.access.value,
    }
    parameters: list[JSONValue] = [
        {"name": p, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
        for p in route.params
    ]
    parameters += [
        {"name": f, "in": "query", "required": False, "schema": {"type": "boolean"}}
        for f in route.flags
    ]
    if parameters:
        op["parameters"] = parameters
    if route.request is not None:
        op["requestBody"] = {"required": True, "content": _json(schemas.ref(route.request))}
    responses: dict[str, JSONValue] = {}
    if route.response is None:
        responses["204"] = {"description": "done"}
    elif route.response is Document:
        responses["200"] = {"description": "a JSON document", "content": _json({"type": "object"})}
    else:
        schema = schemas.ref(route.response)
        if route.many:
            schema = {"type": "array", "items": schema}
        code = "202" if route.accepted else "200"
        responses[code] = {"description": route.response.__name__, "content": _json(schema)}
    responses["default"] = {"$ref": "#/components/responses/Error"}
    op["responses"] = responses
    if route.access is Access.WRITE:
        op["description"] = "Needs a read-write token on TCP."
    return op


def document() -> dict[str, JSONValue]:
    """The OpenAPI 3.1 document of every route in ``routes.ROUTES``."""
    schemas = _Schemas()
    paths: dict[str, dict[str, JSONValue]] = {}
    for route in ROUTES:
        item = paths.setdefault(API_PREFIX + route.path, {})
        item[route.method.lower()] = _operation(route, schemas)
    error = schemas.ref(ErrorBody)
    return {
        "openapi": "3.1.0",
        "info": {"title": "storvisor", "version": __version__, "description": _DESCRIPTION},
        "paths": dict(paths),
        "components": {
            "schemas": dict(sorted(schemas.components.items())),
            "responses": {"Error": {"description": "an error", "content": _json(error)}},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


def render() -> str:
    """``document()`` as the text of ``docs/openapi.json``."""
    return json.dumps(document(), indent=2) + "\n"
