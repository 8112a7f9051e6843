"""A client of the local REST API on ``HOME/api.sock``, implementing ``Management``.

Every method sends one request on a fresh connection and returns the same typed record the
service returns. An error answer is re-raised as the ``storvisor.errors`` class it names
(``StorvisorError`` for an unknown or internal one); a connection that fails mid-way raises
``DaemonUnavailable``, the ``LocalFailure`` of this link.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

from storvisor import errors
from storvisor.api.codec import JSONValue, decode, decode_list, encode
from storvisor.api.exports import ExportInfo, ExportKind
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
    ImportS3Pool,
    LibvirtXml,
    Resize,
    Rollback,
    SetVolumeQos,
)
from storvisor.api.qos import QosKey, QosSpecInfo, VolumeQos
from storvisor.api.service import API_SOCKET, ServiceStatus
from storvisor.engine.s3 import S3Spec
from storvisor.engine.types import BackingSpec, FsckReport, PoolInfo, SnapshotInfo, VolumeInfo
from storvisor.errors import LocalFailure, ProtocolError, StorvisorError

_T = TypeVar("_T")

_ERRORS: dict[str, type[StorvisorError]] = {
    name: cls
    for name, cls in vars(errors).items()
    if isinstance(cls, type) and issubclass(cls, StorvisorError)
}
"""Every class of ``storvisor.errors`` by name: what an error answer's ``type`` may name."""


class DaemonUnavailable(LocalFailure):
    """The daemon's API socket does not answer (no daemon, or one still starting or gone)."""


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


def _q(segment: str) -> str:
    return quote(segment, safe="")


class Client:
    """Talks to the daemon at ``socket_path``. ``timeout`` bounds each request (``None``:
    wait as long as the operation takes, e.g. a flatten or an fsck)."""

    def __init__(self, socket_path: str | os.PathLike[str], timeout: float | None = None) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout

    @classmethod
    def for_home(cls, home: str | os.PathLike[str]) -> Client | None:
        """A client of the daemon serving ``home``, or ``None`` if none answers there."""
        path = Path(home) / API_SOCKET
        if not path.exists():
            return None
        client = cls(path)
        try:
            client._call("GET", "/status", timeout=5.0)
        except DaemonUnavailable:
            return None
        return client

    # -- transport ----------------------------------------------------------------------

    def _call(
        self, method: str, path: str, body: object = None, *, timeout: float | None = None
    ) -> JSONValue:
        conn = _UnixConnection(self.socket_path, timeout if timeout is not None else self.timeout)
        try:
            headers = {"Accept": "application/json"}
            data = None
            if body is not None:
                data = json.dumps(encode(body)).encode()
                headers["Content-Type"] = "application/json"
            conn.request(method, API_PREFIX + path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
            status = response.status
        except (OSError, http.client.HTTPException) as e:
            raise DaemonUnavailable(f"no answer from the daemon at {self.socket_path}: {e}") from e
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

    def _get(self, cls: type[_T], method: str, path: str, body: object = None) -> _T:
        return decode(cls, self._call(method, path, body))

    def _list(self, cls: type[_T], path: str) -> list[_T]:
        return decode_list(cls, self._call("GET", path))

    @staticmethod
    def _vol(pool: str, volume: str) -> str:
        return f"/pools/{_q(pool)}/volumes/{_q(volume)}"

    # -- Management ---------------------------------------------------------------------

    def status(self) -> ServiceStatus:
        return self._get(ServiceStatus, "GET", "/status")

    def create_pool(
        self, name: str, backings: Sequence[BackingSpec], cluster_size: int | None = None
    ) -> PoolInfo:
        return self._get(
            PoolInfo, "POST", "/pools", CreatePool(name, tuple(backings), cluster_size)
        )

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
        return self._get(PoolInfo, "POST", "/s3-pools", body)

    def import_s3_pool(self, name: str, spec: S3Spec, *, force: bool = False) -> PoolInfo:
        return self._get(PoolInfo, "POST", "/s3-pools/import", ImportS3Pool(name, spec, force))

    def add_endpoint(self, pool: str, url: str) -> PoolInfo:
        return self._get(PoolInfo, "POST", f"/pools/{_q(pool)}/endpoints", Endpoint(url))

    def remove_endpoint(self, pool: str, url: str) -> PoolInfo:
        return self._get(PoolInfo, "POST", f"/pools/{_q(pool)}/endpoints/remove", Endpoint(url))

    def pools(self) -> list[PoolInfo]:
        return self._list(PoolInfo, "/pools")

    def pool_info(self, name: str) -> PoolInfo:
        return self._get(PoolInfo, "GET", f"/pools/{_q(name)}")

    def delete_pool(self, name: str, *, force: bool = False) -> None:
        self._call("DELETE", f"/pools/{_q(name)}" + ("?force=1" if force else ""))

    def reopen_pool(self, name: str) -> PoolInfo:
        return self._get(PoolInfo, "POST", f"/pools/{_q(name)}/reopen")

    def add_backing(self, pool: str, spec: BackingSpec) -> PoolInfo:
        return self._get(PoolInfo, "POST", f"/pools/{_q(pool)}/backings", spec)

    def create_volume(self, pool: str, name: str, size: int) -> VolumeInfo:
        return self._get(VolumeInfo, "POST", f"/pools/{_q(pool)}/volumes", CreateVolume(name, size))

    def volumes(self, pool: str | None = None) -> list[VolumeInfo]:
        path = "/volumes" if pool is None else f"/pools/{_q(pool)}/volumes"
        return self._list(VolumeInfo, path)

    def volume_info(self, pool: str, name: str) -> VolumeInfo:
        return self._get(VolumeInfo, "GET", self._vol(pool, name))

    def delete_volume(self, pool: str, name: str) -> None:
        self._call("DELETE", self._vol(pool, name))

    def extend_volume(self, pool: str, name: str, size: int) -> VolumeInfo:
        return self._get(VolumeInfo, "POST", self._vol(pool, name) + "/extend", Resize(size))

    def clone(self, pool: str, volume: str, snapshot: str, new: str) -> VolumeInfo:
        path = self._vol(pool, volume) + f"/snapshots/{_q(snapshot)}/clones"
        return self._get(VolumeInfo, "POST", path, CreateClone(new))

    def flatten(self, pool: str, volume: str) -> VolumeInfo:
        return self._get(VolumeInfo, "POST", self._vol(pool, volume) + "/flatten")

    def create_snapshot(self, pool: str, volume: str, snapshot: str) -> SnapshotInfo:
        path = self._vol(pool, volume) + "/snapshots"
        return self._get(SnapshotInfo, "POST", path, CreateSnapshot(snapshot))

    def snapshots(self, pool: str, volume: str) -> list[SnapshotInfo]:
        return self._list(SnapshotInfo, self._vol(pool, volume) + "/snapshots")

    def delete_snapshot(self, pool: str, volume: str, snapshot: str) -> None:
        self._call("DELETE", self._vol(pool, volume) + f"/snapshots/{_q(snapshot)}")

    def rollback(self, pool: str, volume: str, snapshot: str) -> VolumeInfo:
        path = self._vol(pool, volume) + "/rollback"
        return self._get(VolumeInfo, "POST", path, Rollback(snapshot))

    def fsck(self, pool: str) -> FsckReport:
        return self._get(FsckReport, "POST", f"/pools/{_q(pool)}/fsck")

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
        return self._get(ExportInfo, "POST", "/exports", req)

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
        return self._get(ExportInfo, "POST", "/exports", req)

    def exports(self) -> list[ExportInfo]:
        return self._list(ExportInfo, "/exports")

    def export_info(self, name: str) -> ExportInfo:
        return self._get(ExportInfo, "GET", f"/exports/{_q(name)}")

    def remove_export(self, name: str) -> None:
        self._call("DELETE", f"/exports/{_q(name)}")

    def libvirt_xml(self, pool: str, volume: str) -> str:
        return self._get(LibvirtXml, "GET", self._vol(pool, volume) + "/libvirt-xml").xml

    # -- QoS --

    def create_qos_spec(self, name: str, keys: Sequence[QosKey]) -> QosSpecInfo:
        return self._get(QosSpecInfo, "POST", "/qos-specs", CreateQosSpec(name, tuple(keys)))

    def qos_specs(self) -> list[QosSpecInfo]:
        return self._list(QosSpecInfo, "/qos-specs")

    def qos_spec(self, name: str) -> QosSpecInfo:
        return self._get(QosSpecInfo, "GET", f"/qos-specs/{_q(name)}")

    def delete_qos_spec(self, name: str) -> None:
        self._call("DELETE", f"/qos-specs/{_q(name)}")

    def volume_qos(self, pool: str, volume: str) -> VolumeQos:
        return self._get(VolumeQos, "GET", self._vol(pool, volume) + "/qos")

    def set_volume_qos(
        self, pool: str, volume: str, *, spec: str | None = None, keys: Sequence[QosKey] = ()
    ) -> VolumeQos:
        req = SetVolumeQos(spec, tuple(keys))
        return self._get(VolumeQos, "POST", self._vol(pool, volume) + "/qos", req)

    def close(self) -> None:
        """Nothing to release: every request uses its own connection."""
