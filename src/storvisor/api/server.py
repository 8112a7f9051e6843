"""The local REST/JSON API: a ``Service`` served over HTTP/1.0 on a Unix socket.

Resources (all under ``/v1``; path segments are percent-encoded, so an export name may hold
``/``)::

    GET    /status
    GET    /pools                                   POST  /pools            CreatePool
    GET    /pools/{pool}                            DELETE /pools/{pool}[?force=1]
    POST   /pools/{pool}/backings   BackingSpec     POST  /pools/{pool}/fsck
    POST   /pools/{pool}/reopen
    POST   /s3-pools                CreateS3Pool    POST  /s3-pools/import  ImportS3Pool
    POST   /pools/{pool}/endpoints  Endpoint        POST  .../endpoints/remove  Endpoint
    GET    /volumes                                 (every pool)
    GET    /pools/{pool}/volumes                    POST  /pools/{pool}/volumes   CreateVolume
    GET    /pools/{pool}/volumes/{vol}              DELETE /pools/{pool}/volumes/{vol}
    POST   /pools/{pool}/volumes/{vol}/extend       Resize
    POST   /pools/{pool}/volumes/{vol}/flatten
    POST   /pools/{pool}/volumes/{vol}/rollback     Rollback
    GET    /pools/{pool}/volumes/{vol}/libvirt-xml
    GET    /pools/{pool}/volumes/{vol}/snapshots    POST  .../snapshots      CreateSnapshot
    DELETE /pools/{pool}/volumes/{vol}/snapshots/{snap}
    POST   /pools/{pool}/volumes/{vol}/snapshots/{snap}/clones              CreateClone
    GET    /exports                                 POST  /exports          CreateExport
    GET    /exports/{name}                          DELETE /exports/{name}
    GET    /qos-specs                               POST  /qos-specs        CreateQosSpec
    GET    /qos-specs/{name}                        DELETE /qos-specs/{name}
    GET    /pools/{pool}/volumes/{vol}/qos          POST  .../qos           SetVolumeQos

A success answers 200 with the record (or list of records) as JSON, or 204 with no body. An
error answers ``{"error": {"type": ..., "message": ...}}``, ``type`` being the
``storvisor.errors`` class name, with the status ``status_for`` gives it: 404 (``NotFound``),
409 (``Conflict``), 400 (``InvalidArgument``, malformed body), 507 (``NoSpace``) and 500 for
every other ``StorvisorError``; 405 (method not allowed); 500 ``InternalError`` for anything
else (logged with its traceback here, never sent).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import socketserver
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

from storvisor.api.codec import JSONValue, decode, encode
from storvisor.api.exports import ExportKind
from storvisor.api.messages import (
    API_PREFIX,
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
    ImportS3Pool,
    LibvirtXml,
    Resize,
    Rollback,
    SetVolumeQos,
)
from storvisor.api.service import Service
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


@dataclass(frozen=True, slots=True)
class Request:
    """One parsed API call, handed to a route."""

    params: tuple[str, ...]  # the path parameters, decoded, in order
    query: dict[str, list[str]]
    body: JSONValue

    def parse(self, cls: type[_T]) -> _T:
        """The body as a ``cls`` record; ``InvalidArgument`` if it does not fit."""
        try:
            return decode(cls, self.body)
        except ProtocolError as e:
            raise InvalidArgument(f"malformed request body: {e}") from e

    def flag(self, name: str) -> bool:
        return self.query.get(name, ["0"])[-1].lower() in ("1", "true", "yes")


Handler = Callable[[Service, Request], object]


def _create_export(s: Service, r: Request) -> object:
    req = r.parse(CreateExport)
    if req.kind is ExportKind.NBD:
        return s.export_nbd(
            req.pool, req.volume, req.snapshot, name=req.name, read_only=req.read_only
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


def _import_s3_pool(s: Service, r: Request) -> object:
    req = r.parse(ImportS3Pool)
    return s.import_s3_pool(req.name, req.s3, force=req.force)


_P = "([^/]+)"
_ROUTES: list[tuple[str, re.Pattern[str], Handler]] = [
    (m, re.compile(f"^{API_PREFIX}{p}$"), h)
    for m, p, h in [
        ("GET", "/status", lambda s, r: s.status()),
        ("GET", "/pools", lambda s, r: s.pools()),
        ("POST", "/pools", _create_pool),
        ("POST", "/s3-pools", _create_s3_pool),
        (
            "POST",
            f"/pools/{_P}/endpoints",
            lambda s, r: s.add_endpoint(r.params[0], r.parse(Endpoint).url),
        ),
        (
            "POST",
            f"/pools/{_P}/endpoints/remove",
            lambda s, r: s.remove_endpoint(r.params[0], r.parse(Endpoint).url),
        ),
        ("POST", "/s3-pools/import", _import_s3_pool),
        ("GET", f"/pools/{_P}", lambda s, r: s.pool_info(r.params[0])),
        ("DELETE", f"/pools/{_P}", lambda s, r: s.delete_pool(r.params[0], force=r.flag("force"))),
        (
            "POST",
            f"/pools/{_P}/backings",
            lambda s, r: s.add_backing(r.params[0], r.parse(BackingSpec)),
        ),
        ("POST", f"/pools/{_P}/fsck", lambda s, r: s.fsck(r.params[0])),
        ("POST", f"/pools/{_P}/reopen", lambda s, r: s.reopen_pool(r.params[0])),
        ("GET", "/volumes", lambda s, r: s.volumes()),
        ("GET", f"/pools/{_P}/volumes", lambda s, r: s.volumes(r.params[0])),
        (
            "POST",
            f"/pools/{_P}/volumes",
            _create_volume,
        ),
        ("GET", f"/pools/{_P}/volumes/{_P}", lambda s, r: s.volume_info(*r.params)),
        ("DELETE", f"/pools/{_P}/volumes/{_P}", lambda s, r: s.delete_volume(*r.params)),
        (
            "POST",
            f"/pools/{_P}/volumes/{_P}/extend",
            lambda s, r: s.extend_volume(*r.params, r.parse(Resize).size),
        ),
        ("POST", f"/pools/{_P}/volumes/{_P}/flatten", lambda s, r: s.flatten(*r.params)),
        (
            "POST",
            f"/pools/{_P}/volumes/{_P}/rollback",
            lambda s, r: s.rollback(*r.params, r.parse(Rollback).snapshot),
        ),
        (
            "GET",
            f"/pools/{_P}/volumes/{_P}/libvirt-xml",
            lambda s, r: LibvirtXml(s.libvirt_xml(*r.params)),
        ),
        ("GET", f"/pools/{_P}/volumes/{_P}/snapshots", lambda s, r: s.snapshots(*r.params)),
        (
            "POST",
            f"/pools/{_P}/volumes/{_P}/snapshots",
            lambda s, r: s.create_snapshot(*r.params, r.parse(CreateSnapshot).name),
        ),
        (
            "DELETE",
            f"/pools/{_P}/volumes/{_P}/snapshots/{_P}",
            lambda s, r: s.delete_snapshot(*r.params),
        ),
        (
            "POST",
            f"/pools/{_P}/volumes/{_P}/snapshots/{_P}/clones",
            lambda s, r: s.clone(*r.params, r.parse(CreateClone).name),
        ),
        ("GET", "/exports", lambda s, r: s.exports()),
        ("POST", "/exports", _create_export),
        ("GET", f"/exports/{_P}", lambda s, r: s.export_info(r.params[0])),
        ("DELETE", f"/exports/{_P}", lambda s, r: s.remove_export(r.params[0])),
    ]
]


# -- QoS routes ---------------------------------------------------------------------------


def _create_qos_spec(s: Service, r: Request) -> object:
    req = r.parse(CreateQosSpec)
    return s.create_qos_spec(req.name, req.keys)


def _set_volume_qos(s: Service, r: Request) -> object:
    req = r.parse(SetVolumeQos)
    return s.set_volume_qos(*r.params, spec=req.spec, keys=req.keys)


_ROUTES.extend(
    (m, re.compile(f"^{API_PREFIX}{p}$"), h)
    for m, p, h in [
        ("GET", "/qos-specs", lambda s, r: s.qos_specs()),
        ("POST", "/qos-specs", _create_qos_spec),
        ("GET", f"/qos-specs/{_P}", lambda s, r: s.qos_spec(r.params[0])),
        ("DELETE", f"/qos-specs/{_P}", lambda s, r: s.delete_qos_spec(r.params[0])),
        ("GET", f"/pools/{_P}/volumes/{_P}/qos", lambda s, r: s.volume_qos(*r.params)),
        ("POST", f"/pools/{_P}/volumes/{_P}/qos", _set_volume_qos),
    ]
)


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


class _Handler(BaseHTTPRequestHandler):
    server: APIServer
    server_version = "storvisor"
    timeout = 60  # seconds a client may take to send its request (bounds shutdown)

    def address_string(self) -> str:
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
        # Match on the raw path, then decode each parameter: "%2F" stays inside its segment.
        matched_path = False
        for method, pattern, handler in _ROUTES:
            m = pattern.match(url.path)
            if m is None:
                continue
            matched_path = True
            if method != self.command:
                continue
            try:
                request = Request(
                    params=tuple(unquote(g) for g in m.groups()),
                    query=parse_qs(url.query),
                    body=self._read_body(),
                )
                result = handler(self.server.service, request)
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
                self._send_result(result)
            return
        if matched_path:
            self._send_error(
                HTTPStatus.METHOD_NOT_ALLOWED,
                "InvalidArgument",
                f"{self.command} is not allowed on {url.path}",
            )
        else:
            self._send_error(HTTPStatus.NOT_FOUND, "NotFound", f"no such resource: {url.path}")

    def _read_body(self) -> JSONValue:
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            raise InvalidArgument("request body too large")
        if length == 0:
            return None
        raw = self.rfile.read(length)
        try:
            body: JSONValue = json.loads(raw)
        except ValueError as e:
            raise InvalidArgument(f"request body is not JSON: {e}") from e
        return body

    def _send_result(self, result: object) -> None:
        if result is None:
            self.send_response(HTTPStatus.NO_CONTENT)
            self.end_headers()
            return
        self._send_json(HTTPStatus.OK, encode(result))

    def _send_error(self, status: HTTPStatus, kind: str, message: str) -> None:
        self._send_json(status, encode(ErrorBody(ErrorDetail(kind, message))))

    def _send_json(self, status: HTTPStatus, value: JSONValue) -> None:
        data = json.dumps(value).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class APIServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """The API on a Unix socket (mode 0600). ``start`` serves in a background thread;
    ``close`` stops serving, waits for running requests and removes the socket file.

    A stale socket file at ``path`` is replaced; the caller must hold the HOME lock, which
    guarantees no other daemon serves it.
    """

    daemon_threads = False
    block_on_close = True  # close() waits for requests in progress

    def __init__(self, path: str | os.PathLike[str], service: Service) -> None:
        self.path = Path(path)
        self.service = service
        self._thread: threading.Thread | None = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        super().__init__(str(self.path), _Handler)

    def server_bind(self) -> None:
        super().server_bind()
        os.chmod(self.path, 0o600)

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
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def handle_error(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: object
    ) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError):
            log.debug("API client went away: %s", exc)
            return
        log.exception("API connection failed")
