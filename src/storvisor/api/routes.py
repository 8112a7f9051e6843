"""The API contract, written once: every route with its method, path template, request and
response records and whether it changes state.

This table drives the server's dispatch (``storvisor.api.server``), the Python client
(``storvisor.api.client``) and the OpenAPI document (``storvisor.api.openapi``, served at
``GET /v1/openapi.json`` and kept in ``docs/openapi.json``). A route's ``name`` is the
``Management`` method it stands for (and the document's ``operationId``).

Paths are templates under ``API_PREFIX``: ``{pool}`` matches one percent-encoded segment,
decoded before use, so a name may hold ``/``. ``response`` is the record a success carries
(``many``: a JSON array of them; ``None``: 204 with no body); ``request`` is the record the
body must decode to (``None``: the route takes no body). ``flags`` are the boolean query
parameters a route accepts. ``access`` says which bearer tokens may call it on TCP.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from http import HTTPMethod
from typing import Any, Generic, TypeVar
from urllib.parse import quote

from storvisor.api.export_defs import ExportInfo
from storvisor.api.jobs import JobInfo
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
from storvisor.api.qos import QosSpecInfo, VolumeQos
from storvisor.api.status import ServiceStatus
from storvisor.engine.types import BackingSpec, FsckReport, PoolInfo, SnapshotInfo, VolumeInfo

_T = TypeVar("_T")

_PARAM_RE = re.compile(r"\{([a-z_]+)\}")


class Access(enum.StrEnum):
    """What a route does to the daemon's state: a read-only token may call ``READ`` routes."""

    READ = "read"
    WRITE = "write"


class Document:
    """The response type of a route answering a free-form JSON object (the OpenAPI
    document itself)."""


@dataclass(frozen=True, slots=True)
class Route(Generic[_T]):
    """One operation of the API (see the module docstring)."""

    name: str
    method: HTTPMethod
    path: str
    response: type[_T] | None
    summary: str
    request: type[Any] | None = None
    many: bool = False
    access: Access = Access.READ
    flags: tuple[str, ...] = ()
    accepted: bool = False  # answers 202: the work goes on as a job
    params: tuple[str, ...] = field(init=False)
    pattern: re.Pattern[str] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", tuple(_PARAM_RE.findall(self.path)))
        parts = _PARAM_RE.split(self.path)  # literal, name, literal, name, ..., literal
        regex = "".join(re.escape(p) if i % 2 == 0 else "([^/]+)" for i, p in enumerate(parts))
        object.__setattr__(self, "pattern", re.compile(f"^{re.escape(API_PREFIX)}{regex}$"))

    def url(self, *args: str, **flags: bool) -> str:
        """The path of a call with these parameters (percent-encoded) and the flags set."""
        if len(args) != len(self.params):
            raise TypeError(f"{self.name} takes {len(self.params)} path parameters")
        values = iter(quote(a, safe="") for a in args)
        path = API_PREFIX + _PARAM_RE.sub(lambda m: next(values), self.path)
        unknown = set(flags) - set(self.flags)
        if unknown:
            raise TypeError(f"{self.name} has no flag {sorted(unknown)[0]!r}")
        query = "&".join(f"{k}=1" for k, v in flags.items() if v)
        return f"{path}?{query}" if query else path


_POOL = "/pools/{pool}"
_VOL = "/pools/{pool}/volumes/{volume}"
_W = Access.WRITE
GET, POST, DELETE = HTTPMethod.GET, HTTPMethod.POST, HTTPMethod.DELETE

STATUS = Route("status", GET, "/status", ServiceStatus, "where the daemon serves")
OPENAPI = Route("openapi", GET, "/openapi.json", Document, "this API's OpenAPI document")

POOLS = Route("pools", GET, "/pools", PoolInfo, "list pools", many=True)
CREATE_POOL = Route("create_pool", POST, "/pools", PoolInfo, "create a pool", CreatePool, access=_W)
CREATE_S3_POOL = Route(
    "create_s3_pool",
    POST,
    "/s3-pools",
    PoolInfo,
    "create a pool whose data and metadata live in an S3 bucket",
    CreateS3Pool,
    access=_W,
)
IMPORT_S3_POOL = Route(
    "import_s3_pool",
    POST,
    "/s3-pools/import",
    PoolInfo,
    "open an S3 pool another host released (force: take a dead host's lease)",
    ImportS3Pool,
    access=_W,
)
ADD_ENDPOINT = Route(
    "add_endpoint",
    POST,
    f"{_POOL}/endpoints",
    PoolInfo,
    "add a mirror endpoint to an S3 pool",
    Endpoint,
    access=_W,
)
REMOVE_ENDPOINT = Route(
    "remove_endpoint",
    POST,
    f"{_POOL}/endpoints/remove",
    PoolInfo,
    "remove a mirror endpoint from an S3 pool",
    Endpoint,
    access=_W,
)
SET_CACHE = Route(
    "set_cache",
    POST,
    f"{_POOL}/cache",
    PoolInfo,
    "attach a cache tier to a pool, change its mode, or detach it (mode none) after destaging",
    SetCache,
    access=_W,
)
FLUSH_CACHE = Route(
    "flush_cache",
    POST,
    f"{_POOL}/cache/flush",
    PoolInfo,
    "destage everything a pool's writeback cache holds to its backing devices",
    access=_W,
)
POOL_INFO = Route("pool_info", GET, _POOL, PoolInfo, "show a pool")
DELETE_POOL: Route[None] = Route(
    "delete_pool",
    DELETE,
    _POOL,
    None,
    "delete a pool (force: with its volumes)",
    access=_W,
    flags=("force",),
)
ADD_BACKING = Route(
    "add_backing",
    POST,
    f"{_POOL}/backings",
    PoolInfo,
    "add a backing device to a pool",
    BackingSpec,
    access=_W,
)
FSCK = Route("fsck", POST, f"{_POOL}/fsck", FsckReport, "check a pool's consistency")
REOPEN_POOL = Route(
    "reopen_pool", POST, f"{_POOL}/reopen", PoolInfo, "bring an offline pool online", access=_W
)
SET_TIMEOUTS = Route(
    "set_timeouts",
    POST,
    f"{_POOL}/timeouts",
    Timeouts,
    "set a pool's timeouts: io for syncs, data for reads and writes (0: none)",
    Timeouts,
    access=_W,
)

VOLUMES = Route("volumes", GET, "/volumes", VolumeInfo, "list every pool's volumes", many=True)
POOL_VOLUMES = Route(
    "pool_volumes", GET, f"{_POOL}/volumes", VolumeInfo, "list a pool's volumes", many=True
)
CREATE_VOLUME = Route(
    "create_volume",
    POST,
    f"{_POOL}/volumes",
    VolumeInfo,
    "create a thin volume",
    CreateVolume,
    access=_W,
)
VOLUME_INFO = Route("volume_info", GET, _VOL, VolumeInfo, "show a volume")
DELETE_VOLUME: Route[None] = Route(
    "delete_volume", DELETE, _VOL, None, "delete a volume", access=_W
)
EXTEND_VOLUME = Route(
    "extend_volume",
    POST,
    f"{_VOL}/extend",
    VolumeInfo,
    "grow a volume (online)",
    Resize,
    access=_W,
)
FLATTEN = Route(
    "flatten",
    POST,
    f"{_VOL}/flatten",
    VolumeInfo,
    "make a clone independent of its origin",
    access=_W,
)
ROLLBACK = Route(
    "rollback",
    POST,
    f"{_VOL}/rollback",
    VolumeInfo,
    "return a volume to a snapshot's contents",
    Rollback,
    access=_W,
)
LIBVIRT_XML = Route(
    "libvirt_xml",
    GET,
    f"{_VOL}/libvirt-xml",
    LibvirtXml,
    "the libvirt disk XML of a volume's vhost-user-blk export",
)
SNAPSHOTS = Route(
    "snapshots", GET, f"{_VOL}/snapshots", SnapshotInfo, "list a volume's snapshots", many=True
)
CREATE_SNAPSHOT = Route(
    "create_snapshot",
    POST,
    f"{_VOL}/snapshots",
    SnapshotInfo,
    "create a read-only snapshot",
    CreateSnapshot,
    access=_W,
)
DELETE_SNAPSHOT: Route[None] = Route(
    "delete_snapshot",
    DELETE,
    f"{_VOL}/snapshots/{{snapshot}}",
    None,
    "delete a snapshot",
    access=_W,
)
CLONE = Route(
    "clone",
    POST,
    f"{_VOL}/snapshots/{{snapshot}}/clones",
    VolumeInfo,
    "create a linked clone of a snapshot",
    CreateClone,
    access=_W,
)

EXPORTS = Route("exports", GET, "/exports", ExportInfo, "list exports", many=True)
CREATE_EXPORT = Route(
    "create_export",
    POST,
    "/exports",
    ExportInfo,
    "export a volume or snapshot (NBD), a volume (vhost-user-blk, scsi) or a volume or host "
    "block device (vhost-scsi)",
    CreateExport,
    access=_W,
)
EXPORT_INFO = Route("export_info", GET, "/exports/{name}", ExportInfo, "show an export")
REMOVE_EXPORT: Route[None] = Route(
    "remove_export", DELETE, "/exports/{name}", None, "stop an export and forget it", access=_W
)

QOS_SPECS = Route("qos_specs", GET, "/qos-specs", QosSpecInfo, "list QoS specs", many=True)
CREATE_QOS_SPEC = Route(
    "create_qos_spec",
    POST,
    "/qos-specs",
    QosSpecInfo,
    "create a named QoS spec",
    CreateQosSpec,
    access=_W,
)
QOS_SPEC = Route("qos_spec", GET, "/qos-specs/{name}", QosSpecInfo, "show a QoS spec")
DELETE_QOS_SPEC: Route[None] = Route(
    "delete_qos_spec",
    DELETE,
    "/qos-specs/{name}",
    None,
    "delete a QoS spec no volume uses",
    access=_W,
)
VOLUME_QOS = Route("volume_qos", GET, f"{_VOL}/qos", VolumeQos, "show a volume's QoS")
SET_VOLUME_QOS = Route(
    "set_volume_qos",
    POST,
    f"{_VOL}/qos",
    VolumeQos,
    "limit a volume with a named QoS spec or one-off keys (neither: unlimited)",
    SetVolumeQos,
    access=_W,
)

IMPORT_IMAGE = Route(
    "import_image",
    POST,
    f"{_POOL}/imports",
    JobInfo,
    "create a volume from a disk image file (a job)",
    ImportImage,
    access=_W,
    accepted=True,
)
EXPORT_IMAGE = Route(
    "export_image",
    POST,
    f"{_VOL}/image-exports",
    JobInfo,
    "write a volume or snapshot to a new disk image file (a job)",
    ExportImage,
    access=_W,
    accepted=True,
)
START_FLATTEN = Route(
    "start_flatten",
    POST,
    f"{_VOL}/flatten-job",
    JobInfo,
    "flatten a clone as a job, with progress",
    access=_W,
    accepted=True,
)
JOBS = Route("jobs", GET, "/jobs", JobInfo, "list running and recent jobs", many=True)
JOB = Route("job", GET, "/jobs/{id}", JobInfo, "show a job's state and progress")
CANCEL_JOB = Route(
    "cancel_job", POST, "/jobs/{id}/cancel", JobInfo, "cancel a running job", access=_W
)

ROUTES: tuple[Route[Any], ...] = (
    STATUS,
    OPENAPI,
    POOLS,
    CREATE_POOL,
    CREATE_S3_POOL,
    IMPORT_S3_POOL,
    ADD_ENDPOINT,
    REMOVE_ENDPOINT,
    SET_CACHE,
    FLUSH_CACHE,
    POOL_INFO,
    DELETE_POOL,
    ADD_BACKING,
    FSCK,
    REOPEN_POOL,
    SET_TIMEOUTS,
    VOLUMES,
    POOL_VOLUMES,
    CREATE_VOLUME,
    VOLUME_INFO,
    DELETE_VOLUME,
    EXTEND_VOLUME,
    FLATTEN,
    ROLLBACK,
    LIBVIRT_XML,
    SNAPSHOTS,
    CREATE_SNAPSHOT,
    DELETE_SNAPSHOT,
    CLONE,
    EXPORTS,
    CREATE_EXPORT,
    EXPORT_INFO,
    REMOVE_EXPORT,
    QOS_SPECS,
    CREATE_QOS_SPEC,
    QOS_SPEC,
    DELETE_QOS_SPEC,
    VOLUME_QOS,
    SET_VOLUME_QOS,
    IMPORT_IMAGE,
    EXPORT_IMAGE,
    START_FLATTEN,
    JOBS,
    JOB,
    CANCEL_JOB,
)
"""Every route: the whole API."""
