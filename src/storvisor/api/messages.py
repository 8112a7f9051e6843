"""Request and error bodies of the local REST API (responses are the service's records).

Every body is a frozen dataclass, encoded and decoded by ``storvisor.api.codec``.
"""

from __future__ import annotations

from dataclasses import dataclass

from storvisor.api.export_defs import ExportKind
from storvisor.api.qos import QosKey
from storvisor.engine.s3 import S3Spec
from storvisor.engine.types import BackingSpec, CacheMode

API_PREFIX = "/v1"


@dataclass(frozen=True, slots=True)
class CreatePool:
    name: str
    backings: tuple[BackingSpec, ...]
    cluster_size: int | None = None


@dataclass(frozen=True, slots=True)
class CreateS3Pool:
    name: str
    s3: S3Spec
    object_size: int | None = None
    size: int | None = None
    cluster_size: int | None = None


@dataclass(frozen=True, slots=True)
class ImportS3Pool:
    name: str
    s3: S3Spec
    force: bool = False


@dataclass(frozen=True, slots=True)
class Endpoint:
    url: str


@dataclass(frozen=True, slots=True)
class SetCache:
    """``device``: ``PATH[:SIZE]`` of the cache device (needed for a new cache only)."""

    mode: CacheMode
    device: str | None = None


@dataclass(frozen=True, slots=True)
class CreateVolume:
    name: str
    size: int


@dataclass(frozen=True, slots=True)
class Timeouts:
    """A pool's timeouts, in seconds: ``io`` bounds a sync of its backing devices (a flush),
    ``data`` a volume's read or write (0: no bound). In a request, a field left out (None)
    keeps its value; a reply has both."""

    io: float | None = None
    data: float | None = None


@dataclass(frozen=True, slots=True)
class Resize:
    size: int


@dataclass(frozen=True, slots=True)
class CreateSnapshot:
    name: str


@dataclass(frozen=True, slots=True)
class Rollback:
    snapshot: str


@dataclass(frozen=True, slots=True)
class CreateClone:
    name: str


@dataclass(frozen=True, slots=True)
class CreateExport:
    """``socket`` and ``queues`` apply to vhost-user-blk; ``snapshot`` to NBD only;
    ``wwpn``, ``lun`` and ``device`` (a host block device instead of a volume: ``pool`` and
    ``volume`` empty) to vhost-scsi."""

    kind: ExportKind
    pool: str
    volume: str
    snapshot: str | None = None
    name: str | None = None
    read_only: bool = False
    socket: str | None = None
    queues: int = 1
    wwpn: str | None = None
    lun: int | None = None
    device: str | None = None


@dataclass(frozen=True, slots=True)
class LibvirtXml:
    xml: str


@dataclass(frozen=True, slots=True)
class CreateQosSpec:
    name: str
    keys: tuple[QosKey, ...]


@dataclass(frozen=True, slots=True)
class SetVolumeQos:
    """A named ``spec``, or one-off ``keys``; neither clears the volume's QoS."""

    spec: str | None = None
    keys: tuple[QosKey, ...] = ()


@dataclass(frozen=True, slots=True)
class ErrorDetail:
    type: str  # the storvisor.errors class name, or "InternalError"
    message: str


@dataclass(frozen=True, slots=True)
class ErrorBody:
    error: ErrorDetail


@dataclass(frozen=True, slots=True)
class ImportImage:
    """Create volume ``volume`` from the image file ``path`` (absolute, on the daemon's host);
    ``format`` forces the image format instead of probing it."""

    volume: str
    path: str
    format: str | None = None


@dataclass(frozen=True, slots=True)
class ExportImage:
    """Write the volume (or its snapshot) to a new image file ``path`` in ``format``."""

    path: str
    format: str
    snapshot: str | None = None
