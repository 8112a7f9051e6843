"""Plain records the engine hands to the layers above (API, CLI, exports).

They are frozen and hold only values, so they can cross a thread or process boundary and be
rendered as JSON by ``dataclasses.asdict``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class BackingKind(enum.StrEnum):
    FILE = "file"
    BLOCK = "block"


@dataclass(frozen=True, slots=True)
class BackingSpec:
    """A backing device to add to a pool: an existing file or block device (a LUN), or, with
    ``size``, a sparse regular file created (or grown) to that many bytes.

    A device or existing file that carries a signature (a file system, a partition table,
    swap, an LVM physical volume, a RAID member...) is refused unless ``force`` is set; a
    forced one has its signatures erased. Another storvisor pool's header is refused even
    with ``force`` (``storvisor pool delete`` releases a device)."""

    path: str
    size: int | None = None
    force: bool = False


@dataclass(frozen=True, slots=True)
class BackingInfo:
    path: str
    kind: BackingKind
    size: int  # bytes usable for clusters


@dataclass(frozen=True, slots=True)
class PoolStats:
    """Space of a pool in bytes. ``provisioned`` is the sum of volume sizes (may exceed
    ``capacity``: thin provisioning); ``allocated + free == capacity``."""

    capacity: int
    allocated: int
    provisioned: int
    free: int


class PoolState(enum.StrEnum):
    """Whether a pool serves. ``OFFLINE``: it could not be opened (a backing device missing,
    unreadable, shorter than recorded, or carrying another identity); its volumes are not
    served and ``reason`` says why until ``Home.reopen_pool`` succeeds. ``DEGRADED``: it
    serves, with a problem ``reason`` names (a backing device failed or stalled a read, a
    write or a sync; after a failed sync its flushes fail) until ``Home.reopen_pool``.
    ``OPENING``: it is being opened (an S3 pool takes its lease and reads its catalog over
    the network); it serves once the open ends, or turns ``OFFLINE``."""

    ONLINE = "online"
    DEGRADED = "degraded"
    OFFLINE = "offline"
    OPENING = "opening"

    @property
    def serves(self) -> bool:
        """Whether a pool in this state serves its volumes (online or degraded)."""
        return self in (PoolState.ONLINE, PoolState.DEGRADED)


class BackingOp(enum.StrEnum):
    """What a backing device was asked to do when it failed."""

    READ = "read"
    WRITE = "write"
    SYNC = "sync"


@dataclass(frozen=True, slots=True)
class IoErrorCounts:
    """Backing I/O failures of a pool since it was opened: requests whose read, write or
    sync of a backing device failed, and operations that did not complete within the
    pool's I/O timeout (counted also under their kind)."""

    read: int = 0
    write: int = 0
    sync: int = 0
    timeout: int = 0


class EndpointState(enum.StrEnum):
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class EndpointInfo:
    """One S3 endpoint of a pool: its state and counters."""

    url: str
    state: EndpointState
    requests: int
    errors: int
    latency_ms: float
    """Moving average of the latency of its successful requests."""


@dataclass(frozen=True, slots=True)
class FetchProgress:
    """An imported S3 pool's data objects not in its local image yet (``engine/hydration.py``)."""

    left: int
    total: int
    """The objects the import found in the bucket."""


@dataclass(frozen=True, slots=True)
class PoolInfo:
    """A pool. An offline pool has the devices its catalog records (size 0 when they cannot
    be opened) and zero space."""

    name: str
    cluster_size: int
    backings: tuple[BackingInfo, ...]
    stats: PoolStats
    state: PoolState = PoolState.ONLINE
    reason: str = ""
    endpoints: tuple[EndpointInfo, ...] = ()
    """An S3 pool's endpoints (none for a pool of local devices)."""
    cache: CacheInfo | None = None
    """The pool's cache tier (``engine/cache.py``), None when it has none."""
    fetching: FetchProgress | None = None
    """An imported S3 pool whose objects are still being fetched; None once all are local."""


class CacheMode(enum.StrEnum):
    """How a pool's cache tier acknowledges writes (``engine/cache.py``)."""

    WRITEBACK = "writeback"
    WRITETHROUGH = "writethrough"
    NONE = "none"

    @classmethod
    def parse(cls, text: str) -> CacheMode:
        """Raises ``InvalidArgument`` for anything but the three names."""
        try:
            return cls(text)
        except ValueError:
            from storvisor.errors import InvalidArgument

            names = ", ".join(m.value for m in cls)
            raise InvalidArgument(f"unknown cache mode {text!r} (one of {names})") from None


@dataclass(frozen=True, slots=True)
class CacheInfo:
    """A pool's cache tier: its device, mode and counters since the pool was opened."""

    device: str
    mode: CacheMode
    size: int
    """Bytes of cached data the device holds at most (its lines)."""
    line_size: int
    used: int
    """Bytes of lines in use."""
    dirty: int
    """Bytes of lines written in writeback mode and not yet destaged to the backing."""
    hits: int
    misses: int
    hit_ratio: float
    destaged: int
    """Bytes destaged since the pool was opened."""
    destage_rate: float
    """Bytes per second destaged over the last ten seconds."""
    state: str
    """"ok", or "failed: REASON" when the cache device failed (the pool's flushes then fail
    until it is reopened)."""


@dataclass(frozen=True, slots=True)
class VolumeInfo:
    pool: str
    name: str
    size: int
    allocated: int  # bytes of clusters this volume owns (not shared with its parent)
    origin: str | None  # "VOL@SNAP" for a linked clone until flattened, else None
    serial: str  # stable identifier, reported as the virtio-blk GET_ID serial
    created: float  # Unix time


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    pool: str
    volume: str
    name: str
    size: int
    created: float
    clones: tuple[str, ...]  # names of volumes cloned from this snapshot


@dataclass(frozen=True, slots=True)
class FsckReport:
    """What ``Pool.fsck`` found. Cluster numbers are pool-wide physical cluster indexes."""

    pool: str
    clusters_total: int
    clusters_used: int
    leaked: tuple[int, ...]  # marked used but referenced by no map
    doubly_owned: tuple[int, ...]  # referenced more often than their refcount allows
    dangling: tuple[str, ...]  # maps pointing outside the pool or to missing parents
    errors: tuple[str, ...]  # any other inconsistency, one line each

    @property
    def clean(self) -> bool:
        return not (self.leaked or self.doubly_owned or self.dangling or self.errors)
