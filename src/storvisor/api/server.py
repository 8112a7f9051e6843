"""The REST/JSON API: a ``Service`` served over HTTP/1.0 on a Unix socket (``APIServer``,
mode 0600, no token) and, when asked, on TCP (``TcpAPIServer``: TLS, and a bearer token of
``HOME/tokens.json`` on every request).

The routes (method, path, request and response records) are the table of
``storvisor.api.routes``; this module binds each to a ``Service`` call (``_HANDLERS``).
Path segments are percent-encoded, so an export name may hold ``/``.

and, outside ``/v1``, ``GET /metrics``: the Prometheus text format (``api/metrics.py``), or
501 with a JSON error when the ``prometheus_client`` library is not installed.

A success answers 200 with the record (or list of records) as JSON, or 204 with no body. An
error answers ``{"error": {"type": ..., "message": ...}}``, ``type`` being the
``storvisor.errors`` class name, with the status ``status_for`` gives it: 404 (``NotFound``),
409 (``Conflict``), 400 (``InvalidArgument``, malformed body), 507 (``NoSpace``) and 500 for
every other ``StorvisorError``; 405 (method not allowed); 500 ``InternalError`` for anything
else (logged with its traceback here, never sent).

A request is checked, in this order, before any handler runs (so a refused one changes
nothing): a token in the URL (400, on both sockets), the token on TCP (401 ``Unauthorized``
with ``WWW-Authenticate``), a ``.`` or ``..`` path segment (400), the route (404, 405), a
read-only token on a write route (403 ``Forbidden``), the query parameters (400 unless one of
the route's flags), the body: ``Content-Length`` above 1 MiB (413, from the header, the body
unread), chunked (411), a type other than ``application/json`` (415), then JSON that does not
decode strictly to the route's request record, unknown fields included (400).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import socketserver
import ssl
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

from storvisor.api import openapi, routes
from storvisor.api.codec import JSONValue, decode, encode
from storvisor.api.export_defs import ExportKind, TcpAddress
from storvisor.api.messages import (
    CreateClone,
    CreateExport,
    CreatePool,
    CreateQosSpec,
    CreateS3Pool,
    CreateSnapshot,
    CreateVolume,
    Endpoint,
    ErrorBody,
    ErrorDetail,
    ExportImage,
    ImportImage,
    ImportS3Pool,
    LibvirtXml,
    Resize,
    Rollback,
    SetCache,
    SetVolumeQos,
    Timeouts,
)
from storvisor.api.metrics import CONTENT_TYPE, MetricsUnavailable, render
from storvisor.api.routes import Access, Route
from storvisor.api.service import Service
from storvisor.api.tokens import TokenInfo, TokenStore, looks_like_token
from storvisor.engine.types import BackingSpec
from storvisor.errors import (
    Conflict,
    InvalidArgument,
    NoSpace,
    NotFound,
    ProtocolError,
    StorvisorError,
)

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_MAX_BODY = 1 << 20
_BOOLEANS = ("1", "true", "0", "false")
_TOKEN_PARAMS = frozenset({"token", "access_token", "bearer", "api_key", "apikey", "auth"})


@dataclass(frozen=True, slots=True)
class Request:
    """One parsed API call, handed to a route's handler."""

    params: tuple[str, ...]  # the path parameters, decoded, in order
    query: dict[str, list[str]]
    body: object  # the route's request record, decoded and checked; None without one

    def parse(self, cls: type[_T]) -> _T:
        """The body, a ``cls`` record (the route's ``request`` type)."""
        if not isinstance(self.body, cls):
            raise InvalidArgument(f"expected a {cls.__name__} request body")
        return self.body

    def flag(self, name: str) -> bool:
        return self.query.get(name, ["0"])[-1].lower() in ("1", "true")


Handler = Callable[[Service, Request], object]


def _create_export(s: Service, r: Request) -> object:
    req = r.parse(CreateExport)
    if req.kind is ExportKind.NBD:
        return s.export_nbd(
            req.pool, req.volume, req.snapshot, name=req.name, read_only=req.read_only
        )
    if req.kind in (ExportKind.SCSI, ExportKind.VHOST_SCSI):
        if req.snapshot is not None or req.read_only:
            raise InvalidArgument("a SCSI export is of a writable volume")
        if req.kind is ExportKind.SCSI:
            return s.export_scsi(req.pool, req.volume, name=req.name)
        volume = (req.pool, req.volume) if req.device is None else (None, None)
        return s.export_vhost_scsi(
            *volume, device=req.device, wwpn=req.wwpn, lun=req.lun, name=req.name
        )
    if req.socket is None:
        raise InvalidArgument("a vhost-user-blk export needs a socket path")
    if req.snapshot is not None:
        raise InvalidArgument("snapshots are exported over NBD only")
    return s.export_vhost_user_blk(
        req.pool,
        req.volume,
        req.socket,
        queues=req.queues,
        read_only=req.read_only,
        name=req.name,
    )


def _create_volume(s: Service, r: Request) -> object:
    req = r.parse(CreateVolume)
    return s.create_volume(r.params[0], req.name, req.size)


def _set_timeouts(s: Service, pool: str, req: Timeouts) -> object:
    return s.set_timeouts(pool, io=req.io, data=req.data)


def _create_pool(s: Service, r: Request) -> object:
    req = r.parse(CreatePool)
    return s.create_pool(req.name, req.backings, req.cluster_size)


def _create_s3_pool(s: Service, r: Request) -> object:
    req = r.parse(CreateS3Pool)
    return s.create_s3_pool(
        req.name,
        req.s3,
        object_size=req.object_size,
        size=req.size,
        cluster_size=req.cluster_size,
    )


def _set_cache(s: Service, pool: str, req: SetCache) -> object:
    return s.set_cache(pool, req.device, req.mode)


def _import_s3_pool(s: Service, r: Request) -> object:
    req = r.parse(ImportS3Pool)
    return s.import_s3_pool(req.name, req.s3, force=req.force)


_HANDLERS: dict[Route[Any], Handler] = {
    routes.STATUS: lambda s, r: s.status(),
    routes.OPENAPI: lambda s, r: openapi.document(),
    routes.POOLS: lambda s, r: s.pools(),
    routes.CREATE_POOL: _create_pool,
    routes.CREATE_S3_POOL: _create_s3_pool,
    routes.IMPORT_S3_POOL: _import_s3_pool,
    routes.ADD_ENDPOINT: lambda s, r: s.add_endpoint(r.params[0], r.parse(Endpoint).url),
    routes.REMOVE_ENDPOINT: lambda s, r: s.remove_endpoint(r.params[0], r.parse(Endpoint).url),
    routes.SET_CACHE: lambda s, r: _set_cache(s, r.params[0], r.parse(SetCache)),
    routes.FLUSH_CACHE: lambda s, r: s.flush_cache(r.params[0]),
    routes.POOL_INFO: lambda s, r: s.pool_info(r.params[0]),
    routes.DELETE_POOL: lambda s, r: s.delete_pool(r.params[0], force=r.flag("force")),
    routes.ADD_BACKING: lambda s, r: s.add_backing(r.params[0], r.parse(BackingSpec)),
    routes.FSCK: lambda s, r: s.fsck(r.params[0]),
    routes.REOPEN_POOL: lambda s, r: s.reopen_pool(r.params[0]),
    routes.SET_TIMEOUTS: lambda s, r: _set_timeouts(s, r.params[0], r.parse(Timeouts)),
    routes.VOLUMES: lambda s, r: s.volumes(),
    routes.POOL_VOLUMES: lambda s, r: s.volumes(r.params[0]),
    routes.CREATE_VOLUME: _create_volume,
    routes.VOLUME_INFO: lambda s, r: s.volume_info(*r.params),
    routes.DELETE_VOLUME: lambda s, r: s.delete_volume(*r.params),
    routes.EXTEND_VOLUME: lambda s, r: s.extend_volume(
        r.params[0], r.params[1], r.parse(Resize).size
    ),
    routes.FLATTEN: lambda s, r: s.flatten(*r.params),
    routes.ROLLBACK: lambda s, r: s.rollback(r.params[0], r.params[1], r.parse(Rollback).snapshot),
    routes.LIBVIRT_XML: lambda s, r: LibvirtXml(s.libvirt_xml(*r.params)),
    routes.SNAPSHOTS: lambda s, r: s.snapshots(*r.params),
    routes.CREATE_SNAPSHOT: lambda s, r: s.create_snapshot(
        r.params[0], r.params[1], r.parse(CreateSnapshot).name
    ),
    routes.DELETE_SNAPSHOT: lambda s, r: s.delete_snapshot(*r.params),
    routes.CLONE: lambda s, r: s.clone(
        r.params[0], r.params[1], r.params[2], r.parse(CreateClone).name
    ),
    routes.EXPORTS: lambda s, r: s.exports(),
    routes.CREATE_EXPORT: _create_export,
    routes.EXPORT_INFO: lambda s, r: s.export_info(r.params[0]),
    routes.REMOVE_EXPORT: lambda s, r: s.remove_export(r.params[0]),
}


# -- QoS routes ---------------------------------------------------------------------------


def _create_qos_spec(s: Service, r: Request) -> object:
    req = r.parse(CreateQosSpec)
    return s.create_qos_spec(req.name, req.keys)


def _set_volume_qos(s: Service, r: Request) -> object:
    req = r.parse(SetVolumeQos)
    return s.set_volume_qos(*r.params, spec=req.spec, keys=req.keys)


_HANDLERS.update(
    {
        routes.QOS_SPECS: lambda s, r: s.qos_specs(),
        routes.CREATE_QOS_SPEC: _create_qos_spec,
        routes.QOS_SPEC: lambda s, r: s.qos_spec(r.params[0]),
        routes.DELETE_QOS_SPEC: lambda s, r: s.delete_qos_spec(r.params[0]),
        routes.VOLUME_QOS: lambda s, r: s.volume_qos(*r.params),
        routes.SET_VOLUME_QOS: _set_volume_qos,
    }
)

# -- job routes (``Route.accepted``: a started job answers 202) ----------------------------


def _import_image(s: Service, r: Request) -> object:
    req = r.parse(ImportImage)
    return s.import_image(r.params[0], req.volume, req.path, req.format)


def _export_image(s: Service, r: Request) -> object:
    req = r.parse(ExportImage)
    pool, volume = r.params
    return s.export_image(pool, volume, req.snapshot, req.path, req.format)


_HANDLERS.update(
    {
        routes.IMPORT_IMAGE: _import_image,
        routes.EXPORT_IMAGE: _export_image,
        routes.START_FLATTEN: lambda s, r: s.start_flatten(*r.params),
        routes.JOBS: lambda s, r: s.jobs(),
        routes.JOB: lambda s, r: s.job(r.params[0]),
        routes.CANCEL_JOB: lambda s, r: s.cancel_job(r.params[0]),
    }
)

_ROUTES: list[tuple[Route[Any], Handler]] = [(route, _HANDLERS[route]) for route in routes.ROUTES]
"""Every route of the table with its handler (a route without one fails here, at import)."""


# -- metrics ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Raw:
    """An answer that is not JSON."""

    status: HTTPStatus
    content_type: str
    data: bytes


def _metrics(s: Service, r: Request) -> object:
    try:
        return _Raw(HTTPStatus.OK, CONTENT_TYPE, render(s.metrics_sample()))
    except MetricsUnavailable as e:
        body = json.dumps(encode(ErrorBody(ErrorDetail(_error_type(e), str(e))))) + "\n"
        return _Raw(HTTPStatus.NOT_IMPLEMENTED, "application/json", body.encode())


METRICS_PATH = "/metrics"
"""Outside ``/v1`` and the route table: its answer is text, not a JSON record."""


_STATUSES: tuple[tuple[type[StorvisorError], HTTPStatus], ...] = (
    (NotFound, HTTPStatus.NOT_FOUND),
    (Conflict, HTTPStatus.CONFLICT),
    (InvalidArgument, HTTPStatus.BAD_REQUEST),
    (NoSpace, HTTPStatus.INSUFFICIENT_STORAGE),
)


def status_for(exc: StorvisorError) -> HTTPStatus:
    """The HTTP status of an error answer: the user can act on ``NotFound``, ``Conflict``,
    ``InvalidArgument`` and ``NoSpace``; every other class (``IOFailure``, ``StateError``,
    ``CorruptMetadata``, ...) is a failure of the daemon's side, 500."""
    for cls, status in _STATUSES:
        if isinstance(exc, cls):
            return status
    return HTTPStatus.INTERNAL_SERVER_ERROR


def _error_type(exc: StorvisorError) -> str:
    """The name of the nearest ``storvisor.errors`` class of ``exc`` (a subclass defined
    elsewhere, such as ``engine.home.PoolOffline``, is sent as its base)."""
    for cls in type(exc).__mro__:
        if cls.__module__ == StorvisorError.__module__:
            return cls.__name__
    return StorvisorError.__name__


class _Refused(Exception):
    """A request refused before any handler runs (nothing has changed)."""

    def __init__(self, status: HTTPStatus, message: str, kind: str = "InvalidArgument") -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


class _Handler(BaseHTTPRequestHandler):
    server: APIServer | TcpAPIServer
    server_version = "storvisor"
    timeout = 60  # seconds a client may take to send its request (bounds shutdown)

    def setup(self) -> None:
        super().setup()
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()  # here, in this connection's thread, under timeout

    def address_string(self) -> str:
        if isinstance(self.client_address, tuple):
            return f"{self.client_address[0]}:{self.client_address[1]}"
        return "api.sock"

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s", format % args)

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors found by ``http.server`` itself (a malformed request line, an unknown
        method) are answered in the API's JSON shape too."""
        self.close_connection = True
        self._send_error(HTTPStatus(code), "InvalidArgument", message or HTTPStatus(code).phrase)

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        try:
            token = self._authenticate(url.query)
            if url.path == METRICS_PATH:  # scraped with a token on TCP, like every route
                if self.command != "GET":
                    raise _Refused(
                        HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} is not allowed on /metrics"
                    )
                if url.query:
                    raise _Refused(HTTPStatus.BAD_REQUEST, "/metrics takes no query parameters")
                result = _metrics(self.server.service, Request((), {}, None))
                accepted = False
            else:
                route, handler, params = self._route(url.path)
                if token is not None and token.read_only and route.access is Access.WRITE:
                    raise _Refused(
                        HTTPStatus.FORBIDDEN,
                        f"token {token.name} is read-only: {self.command} {url.path} changes state",
                        "Forbidden",
                    )
                request = Request(params, self._query(route, url.query), self._read_body(route))
                result = handler(self.server.service, request)
                accepted = route.accepted
        except _Refused as e:
            headers = {}
            if e.status is HTTPStatus.UNAUTHORIZED:
                headers["WWW-Authenticate"] = 'Bearer realm="storvisor"'
            self._send_error(e.status, e.kind, str(e), headers)
        except StorvisorError as e:
            status = status_for(e)
            if status is HTTPStatus.INTERNAL_SERVER_ERROR:
                log.error("%s %s failed: %s: %s", self.command, url.path, type(e).__name__, e)
            self._send_error(status, _error_type(e), str(e))
        except Exception as e:
            log.exception("%s %s failed", self.command, url.path)
            self._send_error(
                HTTPStatus.INTERNAL_SERVER_ERROR, "InternalError", f"internal error: {e}"
            )
        else:
            self._send_result(result, accepted=accepted)

    def _authenticate(self, query: str) -> TokenInfo | None:
        """The caller's token on TCP (401 without a valid one); ``None`` on the Unix socket,
        whose mode 0600 is its access control. A token in the URL is refused on both: URLs
        end up in logs and shell histories."""
        if looks_like_token(unquote(query)) or any(
            name.lower() in _TOKEN_PARAMS for name in parse_qs(query, keep_blank_values=True)
        ):
            raise _Refused(
                HTTPStatus.BAD_REQUEST,
                "a token must be sent in the Authorization header (Bearer), never in the URL",
            )
        tokens = self.server.tokens
        if tokens is None:
            return None
        scheme, _, token = (self.headers.get("Authorization") or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _Refused(
                HTTPStatus.UNAUTHORIZED,
                "this API needs a bearer token (Authorization: Bearer TOKEN; "
                "see 'storvisor token create')",
                "Unauthorized",
            )
        info = tokens.verify(token.strip())
        if info is None:
            raise _Refused(HTTPStatus.UNAUTHORIZED, "unknown or revoked token", "Unauthorized")
        return info

    def _route(self, path: str) -> tuple[Route[Any], Handler, tuple[str, ...]]:
        """The route ``path`` names with its decoded parameters (404, 405 otherwise)."""
        # Match on the raw path, then decode each parameter: "%2F" stays inside its segment.
        if any(unquote(segment) in (".", "..") for segment in path.split("/")):
            raise _Refused(
                HTTPStatus.BAD_REQUEST, f"'.' and '..' are not allowed in a path: {path}"
            )
        matched_path = False
        for route, handler in _ROUTES:
            m = route.pattern.match(path)
            if m is None:
                continue
            matched_path = True
            if route.method == self.command:
                return route, handler, tuple(unquote(g) for g in m.groups())
        if matched_path:
            raise _Refused(
                HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} is not allowed on {path}"
            )
        raise _Refused(HTTPStatus.NOT_FOUND, f"no such resource: {path}", "NotFound")

    @staticmethod
    def _query(route: Route[Any], text: str) -> dict[str, list[str]]:
        """The query parameters: only the route's flags are allowed."""
        try:
            query = parse_qs(text, keep_blank_values=True, strict_parsing=bool(text))
        except ValueError:
            raise _Refused(HTTPStatus.BAD_REQUEST, f"malformed query string: {text!r}") from None
        for name, values in query.items():
            if name not in route.flags:
                allowed = ", ".join(route.flags) or "none"
                raise _Refused(
                    HTTPStatus.BAD_REQUEST,
                    f"unknown query parameter {name!r} (allowed here: {allowed})",
                )
            if len(values) != 1 or values[0].lower() not in _BOOLEANS:
                raise _Refused(
                    HTTPStatus.BAD_REQUEST,
                    f"query parameter {name!r} takes one of true, false, 1, 0",
                )
        return query

    def _read_body(self, route: Route[Any]) -> object:
        """The request record of ``route``, decoded strictly; a body that is too large is
        refused from its ``Content-Length`` without being read."""
        if self.headers.get("Transfer-Encoding"):
            raise _Refused(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length")
        text = (self.headers.get("Content-Length") or "0").strip()
        if not text.isdigit():
            raise _Refused(HTTPStatus.BAD_REQUEST, f"invalid Content-Length: {text!r}")
        length = int(text)
        if length > _MAX_BODY:
            raise _Refused(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"request body too large: {length} bytes (at most {_MAX_BODY})",
            )
        if route.request is None:
            if length:
                raise _Refused(
                    HTTPStatus.BAD_REQUEST, f"{self.command} {route.path} takes no request body"
                )
            return None
        ctype = (self.headers.get("Content-Type") or "").partition(";")[0].strip().lower()
        if ctype != "application/json":
            raise _Refused(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                f"the request body must be application/json, not {ctype or 'untyped'}",
            )
        raw = self.rfile.read(length)
        if len(raw) < length:
            raise ConnectionResetError("the client sent less than its Content-Length")
        try:
            value: JSONValue = json.loads(raw) if raw else None
        except ValueError as e:
            raise _Refused(HTTPStatus.BAD_REQUEST, f"request body is not JSON: {e}") from e
        try:
            return decode(route.request, value, strict=True)
        except ProtocolError as e:
            raise _Refused(HTTPStatus.BAD_REQUEST, f"malformed request body: {e}") from e

    def _send_result(self, result: object, *, accepted: bool = False) -> None:
        if isinstance(result, _Raw):
            self.send_response(result.status)
            self.send_header("Content-Type", result.content_type)
            self.send_header("Content-Length", str(len(result.data)))
            self.end_headers()
            self.wfile.write(result.data)
            return
        if result is None:
            self.send_response(HTTPStatus.NO_CONTENT)
            self.end_headers()
            return
        self._send_json(HTTPStatus.ACCEPTED if accepted else HTTPStatus.OK, encode(result))

    def _send_error(
        self, status: HTTPStatus, kind: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        self._send_json(status, encode(ErrorBody(ErrorDetail(kind, message))), headers)

    def _send_json(
        self, status: HTTPStatus, value: JSONValue, headers: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(value).encode() + b"\n"
        self.send_response(status)
        for name, text in (headers or {}).items():
            self.send_header(name, text)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _Serving(socketserver.BaseServer):
    """What both servers share: ``start`` serves in a background thread; ``close`` stops
    serving and waits for running requests."""

    service: Service
    tokens: TokenStore | None
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.serve_forever, name="storvisor-api", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()

    def handle_error(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: object
    ) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | ssl.SSLError | TimeoutError):
            log.debug("API client %s went away: %s", client_address, exc)
            return
        log.exception("API connection failed")


class APIServer(_Serving, socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """The API on a Unix socket (mode 0600, no token). ``close`` also removes the socket
    file.

    A stale socket file at ``path`` is replaced; the caller must hold the HOME lock, which
    guarantees no other daemon serves it.
    """

    daemon_threads = False
    block_on_close = True  # close() waits for requests in progress

    def __init__(self, path: str | os.PathLike[str], service: Service) -> None:
        self.path = Path(path)
        self.service = service
        self.tokens = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        super().__init__(str(self.path), _Handler)

    def server_bind(self) -> None:
        super().server_bind()
        os.chmod(self.path, 0o600)

    def close(self) -> None:
        super().close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class TcpAPIServer(_Serving, socketserver.ThreadingMixIn, socketserver.TCPServer):
    """The API on TCP: TLS (``context``) and a bearer token of ``tokens`` on every request.
    The TLS handshake runs in the connection's thread, bounded by the handler's timeout.
    Raises ``OSError`` if the address cannot be bound."""

    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True

    def __init__(
        self, address: TcpAddress, service: Service, context: ssl.SSLContext, tokens: TokenStore
    ) -> None:
        self.service = service
        self.tokens = tokens
        self.context = context
        self.fingerprint = ""  # of the certificate, as the banner prints it
        if ":" in address.host:
            self.address_family = socket.AF_INET6
        super().__init__((address.host, address.port), _Handler)

    @property
    def address(self) -> TcpAddress:
        """The address bound (the port chosen when 0 was asked)."""
        host, port = self.server_address[:2]
        return TcpAddress(str(host), int(port))

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, peer = super().get_request()
        return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), peer
