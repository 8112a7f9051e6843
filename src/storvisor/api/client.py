"""A client of the REST API, implementing ``Management``: on the local Unix socket
``HOME/api.sock``, or (``Client.remote``) on a daemon's TCP address, over TLS with a bearer
token.

Every method sends one request on a fresh connection and returns the same typed record the
service returns. An error answer is re-raised as the ``storvisor.errors`` class it names
(``StorvisorError`` for an unknown or internal one, ``AccessDenied`` for 401 and 403); a
connection that fails mid-way raises ``DaemonUnavailable``, the ``LocalFailure`` of this link,
and a server whose certificate cannot be trusted ``UntrustedDaemon``.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from storvisor import errors
from storvisor.api import routes
from storvisor.api.codec import JSONValue, decode, decode_list, encode
from storvisor.api.export_defs import ExportInfo, ExportKind
from storvisor.api.jobs import JobInfo
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
    ExportImage,
    ImportImage,
    ImportS3Pool,
    Resize,
    Rollback,
    SetCache,
    SetVolumeQos,
    Timeouts,
)
from storvisor.api.qos import QosKey, QosSpecInfo, VolumeQos
from storvisor.api.routes import Route
from storvisor.api.status import API_SOCKET, ServiceStatus
from storvisor.api.tls import (
    cert_fingerprint,
    client_context,
    fingerprints_match,
    format_fingerprint,
    parse_fingerprint,
)
from storvisor.engine.s3 import S3Spec
from storvisor.engine.types import (
    BackingSpec,
    CacheMode,
    FsckReport,
    PoolInfo,
    SnapshotInfo,
    VolumeInfo,
)
from storvisor.errors import InvalidArgument, LocalFailure, ProtocolError, StorvisorError

_T = TypeVar("_T")

_ERRORS: dict[str, type[StorvisorError]] = {
    name: cls
    for name, cls in vars(errors).items()
    if isinstance(cls, type) and issubclass(cls, StorvisorError)
}
"""Every class of ``storvisor.errors`` by name: what an error answer's ``type`` may name."""


class DaemonUnavailable(LocalFailure):
    """The daemon's API socket does not answer (no daemon, or one still starting or gone)."""


class UntrustedDaemon(LocalFailure):
    """The server's TLS certificate is not trusted (no CA vouches for it, or its
    fingerprint is not the pinned one): nothing was sent to it."""


class AccessDenied(StorvisorError):
    """The daemon refused the token: none, unknown or revoked (401), or read-only (403)."""


_ERRORS["Unauthorized"] = _ERRORS["Forbidden"] = AccessDenied


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class _PinnedConnection(http.client.HTTPSConnection):
    """HTTPS that trusts exactly one certificate, by its SHA-256 fingerprint."""

    def __init__(
        self, host: str, port: int, context: ssl.SSLContext, pinned: bytes, timeout: float | None
    ) -> None:
        super().__init__(host, port, context=context, timeout=timeout)
        self._pinned = pinned

    def connect(self) -> None:
        super().connect()
        assert isinstance(self.sock, ssl.SSLSocket)
        der = self.sock.getpeercert(binary_form=True) or b""
        got = cert_fingerprint(der)
        if not fingerprints_match(got, self._pinned):
            self.close()
            raise UntrustedDaemon(
                f"the daemon at {self.host}:{self.port} presented a certificate with SHA-256 "
                f"fingerprint {format_fingerprint(got)}, not the pinned "
                f"{format_fingerprint(self._pinned)}"
            )


def _connection_factory(
    url: str, ca_file: Path | None, fingerprint: str | None
) -> Callable[[float | None], http.client.HTTPConnection]:
    parts = urlsplit(url)
    if parts.scheme != "https":
        raise InvalidArgument(
            f"invalid API URL {url!r}: the API on TCP is served over TLS, use https://HOST:PORT"
        )
    try:
        host, port = parts.hostname, parts.port or 443
    except ValueError as e:
        raise InvalidArgument(f"invalid API URL {url!r}: {e}") from None
    if not host or parts.path not in ("", "/") or parts.query or parts.username:
        raise InvalidArgument(f"invalid API URL {url!r}: expected https://HOST:PORT")
    pinned = parse_fingerprint(fingerprint) if fingerprint is not None else None
    context = client_context(ca_file, pinned)
    if pinned is not None:
        return lambda timeout: _PinnedConnection(host, port, context, pinned, timeout)
    return lambda timeout: http.client.HTTPSConnection(host, port, context=context, timeout=timeout)


class Client:
    """Talks to the daemon at ``socket_path``. ``timeout`` bounds each request (``None``:
    wait as long as the operation takes, e.g. a flatten or an fsck)."""

    def __init__(self, socket_path: str | os.PathLike[str], timeout: float | None = None) -> None:
        self.socket_path = str(socket_path)
        self.where = self.socket_path
        self.timeout = timeout
        self._headers: dict[str, str] = {}
        self._connect: Callable[[float | None], http.client.HTTPConnection] = lambda t: (
            _UnixConnection(self.socket_path, t)
        )

    @classmethod
    def remote(
        cls,
        url: str,
        token: str,
        *,
        ca_file: Path | None = None,
        fingerprint: str | None = None,
        timeout: float | None = None,
    ) -> Client:
        """A client of the daemon at ``url`` (``https://HOST:PORT``) with a bearer token. The
        server's certificate must be signed by a CA of ``ca_file`` (default: the system's)
        for HOST, or have the SHA-256 ``fingerprint`` (then no CA or host name is checked).
        Raises ``InvalidArgument`` for a bad URL, token, CA file or fingerprint."""
        if not token or any(c.isspace() for c in token) or not token.isprintable():
            raise InvalidArgument("the API token is empty or holds spaces or control characters")
        client = cls(url, timeout)
        client._connect = _connection_factory(url, ca_file, fingerprint)
        client._headers = {"Authorization": f"Bearer {token}"}
        return client

    @classmethod
    def for_home(cls, home: str | os.PathLike[str]) -> Client | None:
        """A client of the daemon serving ``home``, or ``None`` if none answers there."""
        path = Path(home) / API_SOCKET
        if not path.exists():
            return None
        client = cls(path)
        try:
            client._call(routes.STATUS, timeout=5.0)
        except DaemonUnavailable:
            return None
        return client

    # -- transport ----------------------------------------------------------------------

    def _call(
        self,
        route: Route[Any],
        *params: str,
        body: object = None,
        flags: Mapping[str, bool] | None = None,
        timeout: float | None = None,
    ) -> JSONValue:
        conn = self._connect(timeout if timeout is not None else self.timeout)
        try:
            headers = {"Accept": "application/json", **self._headers}
            data = None
            if body is not None:
                data = json.dumps(encode(body)).encode()
                headers["Content-Type"] = "application/json"
            conn.request(route.method, route.url(*params, **(flags or {})), data, headers)
            response = conn.getresponse()
            raw = response.read()
            status = response.status
        except ssl.SSLCertVerificationError as e:
            raise UntrustedDaemon(
                f"cannot verify the certificate of the daemon at {self.where}: "
                f"{e.verify_message or e}; give --ca-file, or --fingerprint to pin it"
            ) from e
        except (OSError, http.client.HTTPException) as e:
            raise DaemonUnavailable(f"no answer from the daemon at {self.where}: {e}") from e
        finally:
            conn.close()
        value: JSONValue = None
        if raw:
            try:
                value = json.loads(raw)
            except ValueError as e:
                raise ProtocolError(f"the daemon answered {status} with non-JSON data") from e
        if status >= 400:
            try:
                detail = decode(ErrorBody, value).error
            except ProtocolError:
                raise StorvisorError(f"the daemon answered {status}") from None
            raise _ERRORS.get(detail.type, StorvisorError)(detail.message)
        return value

    def _one(self, route: Route[_T], *params: str, body: object = None) -> _T:
        """Call a route answering one record."""
        assert route.response is not None and not route.many
        return decode(route.response, self._call(route, *params, body=body))

    def metrics(self) -> str:
        """``GET /metrics``: the daemon's metrics in the Prometheus text format. Raises
        ``StorvisorError`` with the daemon's message if it cannot give them (501: the
        ``prometheus_client`` library is not installed there), ``DaemonUnavailable``."""
        conn = self._connect(self.timeout)
        try:
            conn.request("GET", "/metrics", headers=dict(self._headers))
            response = conn.getresponse()
            raw = response.read()
            status = response.status
        except (OSError, http.client.HTTPException) as e:
            raise DaemonUnavailable(f"no answer from the daemon at {self.where}: {e}") from e
        finally:
            conn.close()
        if status != 200:
            try:
                detail = decode(ErrorBody, json.loads(raw)).error
            except (ValueError, ProtocolError):
                raise StorvisorError(f"the daemon answered {status} to GET /metrics") from None
            raise _ERRORS.get(detail.type, StorvisorError)(detail.message)
        return raw.decode()

    def _list(self, route: Route[_T], *params: str) -> list[_T]:
        """Call a route answering a list of records."""
        assert route.response is not None and route.many
        return decode_list(route.response, self._call(route, *params))

    # -- Management ---------------------------------------------------------------------

    def status(self) -> ServiceStatus:
        return self._one(routes.STATUS)

    def openapi(self) -> dict[str, JSONValue]:
        """The daemon's OpenAPI document."""
        doc = self._call(routes.OPENAPI)
        if not isinstance(doc, dict):
            raise ProtocolError("the OpenAPI document is not a JSON object")
        return doc

    def create_pool(
        self, name: str, backings: Sequence[BackingSpec], cluster_size: int | None = None
    ) -> PoolInfo:
        return self._one(routes.CREATE_POOL, body=CreatePool(name, tuple(backings), cluster_size))

    def create_s3_pool(
        self,
        name: str,
        spec: S3Spec,
        *,
        object_size: int | None = None,
        size: int | None = None,
        cluster_size: int | None = None,
    ) -> PoolInfo:
        body = CreateS3Pool(name, spec, object_size, size, cluster_size)
        return self._one(routes.CREATE_S3_POOL, body=body)

    def import_s3_pool(self, name: str, spec: S3Spec, *, force: bool = False) -> PoolInfo:
        return self._one(routes.IMPORT_S3_POOL, body=ImportS3Pool(name, spec, force))

    def add_endpoint(self, pool: str, url: str) -> PoolInfo:
        return self._one(routes.ADD_ENDPOINT, pool, body=Endpoint(url))

    def remove_endpoint(self, pool: str, url: str) -> PoolInfo:
        return self._one(routes.REMOVE_ENDPOINT, pool, body=Endpoint(url))

    def set_cache(self, pool: str, device: str | None, mode: CacheMode) -> PoolInfo:
        return self._one(routes.SET_CACHE, pool, body=SetCache(mode, device))

    def flush_cache(self, pool: str) -> PoolInfo:
        return self._one(routes.FLUSH_CACHE, pool)

    def pools(self) -> list[PoolInfo]:
        return self._list(routes.POOLS)

    def pool_info(self, name: str) -> PoolInfo:
        return self._one(routes.POOL_INFO, name)

    def delete_pool(self, name: str, *, force: bool = False) -> None:
        self._call(routes.DELETE_POOL, name, flags={"force": force})

    def reopen_pool(self, name: str) -> PoolInfo:
        return self._one(routes.REOPEN_POOL, name)

    def set_timeouts(
        self, pool: str, *, io: float | None = None, data: float | None = None
    ) -> Timeouts:
        return self._one(routes.SET_TIMEOUTS, pool, body=Timeouts(io, data))

    def add_backing(self, pool: str, spec: BackingSpec) -> PoolInfo:
        return self._one(routes.ADD_BACKING, pool, body=spec)

    def create_volume(self, pool: str, name: str, size: int) -> VolumeInfo:
        return self._one(routes.CREATE_VOLUME, pool, body=CreateVolume(name, size))

    def volumes(self, pool: str | None = None) -> list[VolumeInfo]:
        if pool is None:
            return self._list(routes.VOLUMES)
        return self._list(routes.POOL_VOLUMES, pool)

    def volume_info(self, pool: str, name: str) -> VolumeInfo:
        return self._one(routes.VOLUME_INFO, pool, name)

    def delete_volume(self, pool: str, name: str) -> None:
        self._call(routes.DELETE_VOLUME, pool, name)

    def extend_volume(self, pool: str, name: str, size: int) -> VolumeInfo:
        return self._one(routes.EXTEND_VOLUME, pool, name, body=Resize(size))

    def clone(self, pool: str, volume: str, snapshot: str, new: str) -> VolumeInfo:
        return self._one(routes.CLONE, pool, volume, snapshot, body=CreateClone(new))

    def flatten(self, pool: str, volume: str) -> VolumeInfo:
        return self._one(routes.FLATTEN, pool, volume)

    def create_snapshot(self, pool: str, volume: str, snapshot: str) -> SnapshotInfo:
        return self._one(routes.CREATE_SNAPSHOT, pool, volume, body=CreateSnapshot(snapshot))

    def snapshots(self, pool: str, volume: str) -> list[SnapshotInfo]:
        return self._list(routes.SNAPSHOTS, pool, volume)

    def delete_snapshot(self, pool: str, volume: str, snapshot: str) -> None:
        self._call(routes.DELETE_SNAPSHOT, pool, volume, snapshot)

    def rollback(self, pool: str, volume: str, snapshot: str) -> VolumeInfo:
        return self._one(routes.ROLLBACK, pool, volume, body=Rollback(snapshot))

    def fsck(self, pool: str) -> FsckReport:
        return self._one(routes.FSCK, pool)

    def export_nbd(
        self,
        pool: str,
        volume: str,
        snapshot: str | None = None,
        *,
        name: str | None = None,
        read_only: bool = False,
    ) -> ExportInfo:
        req = CreateExport(ExportKind.NBD, pool, volume, snapshot, name, read_only)
        return self._one(routes.CREATE_EXPORT, body=req)

    def export_vhost_user_blk(
        self,
        pool: str,
        volume: str,
        socket: str,
        *,
        queues: int = 1,
        read_only: bool = False,
        name: str | None = None,
    ) -> ExportInfo:
        req = CreateExport(
            ExportKind.VHOST_USER_BLK, pool, volume, None, name, read_only, socket, queues
        )
        return self._one(routes.CREATE_EXPORT, body=req)

    def export_scsi(self, pool: str, volume: str, *, name: str | None = None) -> ExportInfo:
        return self._one(
            routes.CREATE_EXPORT, body=CreateExport(ExportKind.SCSI, pool, volume, name=name)
        )

    def export_vhost_scsi(
        self,
        pool: str | None,
        volume: str | None,
        *,
        device: str | None = None,
        wwpn: str | None = None,
        lun: int | None = None,
        name: str | None = None,
    ) -> ExportInfo:
        req = CreateExport(
            ExportKind.VHOST_SCSI,
            pool or "",
            volume or "",
            name=name,
            wwpn=wwpn,
            lun=lun,
            device=device,
        )
        return self._one(routes.CREATE_EXPORT, body=req)

    def exports(self) -> list[ExportInfo]:
        return self._list(routes.EXPORTS)

    def export_info(self, name: str) -> ExportInfo:
        return self._one(routes.EXPORT_INFO, name)

    def remove_export(self, name: str) -> None:
        self._call(routes.REMOVE_EXPORT, name)

    def libvirt_xml(self, pool: str, volume: str) -> str:
        return self._one(routes.LIBVIRT_XML, pool, volume).xml

    # -- QoS --

    def create_qos_spec(self, name: str, keys: Sequence[QosKey]) -> QosSpecInfo:
        return self._one(routes.CREATE_QOS_SPEC, body=CreateQosSpec(name, tuple(keys)))

    def qos_specs(self) -> list[QosSpecInfo]:
        return self._list(routes.QOS_SPECS)

    def qos_spec(self, name: str) -> QosSpecInfo:
        return self._one(routes.QOS_SPEC, name)

    def delete_qos_spec(self, name: str) -> None:
        self._call(routes.DELETE_QOS_SPEC, name)

    def volume_qos(self, pool: str, volume: str) -> VolumeQos:
        return self._one(routes.VOLUME_QOS, pool, volume)

    def set_volume_qos(
        self, pool: str, volume: str, *, spec: str | None = None, keys: Sequence[QosKey] = ()
    ) -> VolumeQos:
        req = SetVolumeQos(spec, tuple(keys))
        return self._one(routes.SET_VOLUME_QOS, pool, volume, body=req)

    def close(self) -> None:
        """Nothing to release: every request uses its own connection."""

    # -- jobs ---------------------------------------------------------------------------

    def import_image(self, pool: str, volume: str, path: str, fmt: str | None = None) -> JobInfo:
        return self._one(routes.IMPORT_IMAGE, pool, body=ImportImage(volume, path, fmt))

    def export_image(
        self, pool: str, volume: str, snapshot: str | None, path: str, fmt: str
    ) -> JobInfo:
        return self._one(routes.EXPORT_IMAGE, pool, volume, body=ExportImage(path, fmt, snapshot))

    def start_flatten(self, pool: str, volume: str) -> JobInfo:
        return self._one(routes.START_FLATTEN, pool, volume)

    def jobs(self) -> list[JobInfo]:
        return self._list(routes.JOBS)

    def job(self, job_id: str) -> JobInfo:
        return self._one(routes.JOB, job_id)

    def cancel_job(self, job_id: str) -> JobInfo:
        return self._one(routes.CANCEL_JOB, job_id)
