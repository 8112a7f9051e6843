"""The management service: every operation the CLI and the API offer, typed.

A ``Service`` owns one ``Home`` (and so its lock) and the export definitions kept there. In
the daemon it also owns an ``ExportRuntime`` that serves the exports; without one (a CLI
command run while no daemon is up) export commands only record definitions, which the daemon
starts at its next start.

All methods return the engine's frozen records (or the export records of
``storvisor.api.exports``) and raise only ``storvisor.errors`` exceptions: ``NotFound`` for a
missing pool, volume, snapshot or export, ``Conflict`` for duplicates and objects in use
(deleting an exported volume among them), ``InvalidArgument`` for malformed input. Calls are
serialised by one lock, so the API server may call from several threads; a snapshot waits for
its volume's I/O in flight outside it.

``Management`` is the protocol both ``Service`` and ``storvisor.api.client.Client`` implement;
the CLI is written against it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Protocol

from storvisor.api.export_defs import (
    SCSI_KINDS,
    ExportInfo,
    ExportKind,
    ExportSpec,
    ExportState,
    ExportStore,
    check_export_name,
)
from storvisor.api.exports import (
    NBD_SOCKET,
    ExportRuntime,
    export_uris,
    forget_lio_objects,
    without,
)
from storvisor.api.images import check_output_image, convert, image_info
from storvisor.api.jobs import Cleanup, JobInfo, JobManager, JobProgress
from storvisor.api.messages import Timeouts
from storvisor.api.metrics import (
    ExportSample,
    MetricsSample,
    PoolSample,
    QosWait,
    Restarts,
)
from storvisor.api.qos import QosKey, QosManager, QosSpecInfo, VolumeQos
from storvisor.api.status import API_SOCKET, POOL_WAIT, ServiceStatus
from storvisor.engine.device import BlockDevice
from storvisor.engine.home import Home
from storvisor.engine.qos import ThrottledDevice
from storvisor.engine.s3 import S3Spec
from storvisor.engine.types import (
    BackingSpec,
    CacheMode,
    FsckReport,
    IoErrorCounts,
    PoolInfo,
    SnapshotInfo,
    VolumeInfo,
)
from storvisor.errors import (
    Conflict,
    CorruptMetadata,
    InvalidArgument,
    NotFound,
    StateError,
    StorvisorError,
)

log = logging.getLogger(__name__)

DEMO_POOL = "default"
DEMO_BACKING = "default-pool.img"
DEMO_POOL_SIZE = 64 << 30
DEMO_VOLUME = "demo"
DEMO_VOLUME_SIZE = 1 << 30
DEMO_EXPORT = "demo"


class Management(Protocol):
    """The operations of storvisor's management API (see ``Service`` for the contracts)."""

    def status(self) -> ServiceStatus: ...
    def create_pool(
        self, name: str, backings: Sequence[BackingSpec], cluster_size: int | None = None
    ) -> PoolInfo: ...
    def create_s3_pool(
        self,
        name: str,
        spec: S3Spec,
        *,
        object_size: int | None = None,
        size: int | None = None,
        cluster_size: int | None = None,
    ) -> PoolInfo: ...
    def import_s3_pool(self, name: str, spec: S3Spec, *, force: bool = False) -> PoolInfo: ...
    def add_endpoint(self, pool: str, url: str) -> PoolInfo: ...
    def remove_endpoint(self, pool: str, url: str) -> PoolInfo: ...
    def set_cache(self, pool: str, device: str | None, mode: CacheMode) -> PoolInfo: ...
    def flush_cache(self, pool: str) -> PoolInfo: ...
    def pools(self) -> list[PoolInfo]: ...
    def pool_info(self, name: str) -> PoolInfo: ...
    def delete_pool(self, name: str, *, force: bool = False) -> None: ...
    def reopen_pool(self, name: str) -> PoolInfo: ...
    def set_timeouts(
        self, pool: str, *, io: float | None = None, data: float | None = None
    ) -> Timeouts: ...
    def add_backing(self, pool: str, spec: BackingSpec) -> PoolInfo: ...
    def create_volume(self, pool: str, name: str, size: int) -> VolumeInfo: ...
    def volumes(self, pool: str | None = None) -> list[VolumeInfo]: ...
    def volume_info(self, pool: str, name: str) -> VolumeInfo: ...
    def delete_volume(self, pool: str, name: str) -> None: ...
    def extend_volume(self, pool: str, name: str, size: int) -> VolumeInfo: ...
    def clone(self, pool: str, volume: str, snapshot: str, new: str) -> VolumeInfo: ...
    def flatten(self, pool: str, volume: str) -> VolumeInfo: ...
    def start_flatten(self, pool: str, volume: str) -> JobInfo: ...
    def create_snapshot(self, pool: str, volume: str, snapshot: str) -> SnapshotInfo: ...
    def snapshots(self, pool: str, volume: str) -> list[SnapshotInfo]: ...
    def delete_snapshot(self, pool: str, volume: str, snapshot: str) -> None: ...
    def rollback(self, pool: str, volume: str, snapshot: str) -> VolumeInfo: ...
    def fsck(self, pool: str) -> FsckReport: ...
    def export_nbd(
        self,
        pool: str,
        volume: str,
        snapshot: str | None = None,
        *,
        name: str | None = None,
        read_only: bool = False,
    ) -> ExportInfo: ...
    def export_vhost_user_blk(
        self,
        pool: str,
        volume: str,
        socket: str,
        *,
        queues: int = 1,
        read_only: bool = False,
        name: str | None = None,
    ) -> ExportInfo: ...
    def export_scsi(self, pool: str, volume: str, *, name: str | None = None) -> ExportInfo: ...
    def export_vhost_scsi(
        self,
        pool: str | None,
        volume: str | None,
        *,
        device: str | None = None,
        wwpn: str | None = None,
        lun: int | None = None,
        name: str | None = None,
    ) -> ExportInfo: ...
    def exports(self) -> list[ExportInfo]: ...
    def export_info(self, name: str) -> ExportInfo: ...
    def remove_export(self, name: str) -> None: ...
    def libvirt_xml(self, pool: str, volume: str) -> str: ...
    def create_qos_spec(self, name: str, keys: Sequence[QosKey]) -> QosSpecInfo: ...
    def qos_specs(self) -> list[QosSpecInfo]: ...
    def qos_spec(self, name: str) -> QosSpecInfo: ...
    def delete_qos_spec(self, name: str) -> None: ...
    def volume_qos(self, pool: str, volume: str) -> VolumeQos: ...
    def set_volume_qos(
        self, pool: str, volume: str, *, spec: str | None = None, keys: Sequence[QosKey] = ()
    ) -> VolumeQos: ...
    def import_image(
        self, pool: str, volume: str, path: str, fmt: str | None = None
    ) -> JobInfo: ...
    def export_image(
        self, pool: str, volume: str, snapshot: str | None, path: str, fmt: str
    ) -> JobInfo: ...
    def jobs(self) -> list[JobInfo]: ...
    def job(self, job_id: str) -> JobInfo: ...
    def cancel_job(self, job_id: str) -> JobInfo: ...
    def close(self) -> None: ...


class Service:
    """Management operations over one HOME. See the module docstring.

    ``runtime`` is given by the daemon only; ``start_exports`` then serves every recorded
    export. ``close`` stops the exports, then flushes and closes every pool and drops the
    HOME lock; the service is unusable afterwards.
    """

    def __init__(self, home: Home, runtime: ExportRuntime | None = None) -> None:
        self.home = home
        self._runtime = runtime
        self._store = ExportStore(home.path)
        self._specs = self._store.load()
        self._real_sockets: dict[str, str] = {}
        self._broken: dict[str, str] = {}
        self._lock = threading.RLock()
        self._closed = False
        self._qos = QosManager(home.path, lambda pool, vol: self.volume_info(pool, vol).size)
        self._jobs = JobManager(home.path, self._undo)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Service:
        """Open HOME for offline use (no export servers). Raises ``Conflict`` when another
        process (normally the daemon) holds the HOME lock."""
        return cls(Home(path))

    # -- status -------------------------------------------------------------------------

    def status(self) -> ServiceStatus:
        """Describe this service."""
        tcp = self._runtime.nbd_tcp if self._runtime is not None else None
        return ServiceStatus(
            home=str(self.home.path),
            pid=os.getpid(),
            daemon=self._runtime is not None,
            api_socket=str(self.home.path / API_SOCKET),
            nbd_socket=str(self.home.path / NBD_SOCKET),
            nbd_tcp=f"{tcp.host}:{tcp.port}" if tcp is not None else None,
        )

    def metrics_sample(self) -> MetricsSample:
        """The counters and gauges of ``api/metrics.py``, as they are now."""
        with self._lock:
            pools = []
            for info in sorted(self.home.pools(), key=lambda p: p.name):
                buckets: tuple[int, ...] = ()
                commit_ns = 0
                errors = IoErrorCounts()
                if info.state.serves:
                    with contextlib.suppress(StorvisorError):
                        pool = self.home.pool(info.name)
                        buckets, commit_ns = pool.commit_times.snapshot()
                        errors = pool.io_errors
                pools.append(PoolSample(info, buckets, commit_ns, errors))
            waits = tuple(QosWait(*w) for w in self._qos.waited())
            runtime = self._runtime
            if runtime is None:
                return MetricsSample((), tuple(pools), waits, ())
            exports = tuple(
                ExportSample(
                    spec.name,
                    spec.kind.value,
                    spec.pool,
                    spec.volume,
                    stats.totals(),
                    stats.in_flight(),
                    stats.connections,
                )
                for spec, stats in runtime.io_stats()
            )
            restarts = tuple(Restarts(*r) for r in runtime.restarts())
            return MetricsSample(exports, tuple(pools), waits, restarts)

    # -- pools --------------------------------------------------------------------------

    def create_pool(
        self, name: str, backings: Sequence[BackingSpec], cluster_size: int | None = None
    ) -> PoolInfo:
        """Create a pool over ``backings``. ``Conflict`` if it exists; ``InvalidArgument``
        for a bad name, no backing, or a bad cluster size."""
        if not backings:
            raise InvalidArgument("a pool needs at least one backing device")
        with self._lock:
            return self.home.create_pool(name, backings, cluster_size)

    def create_s3_pool(
        self,
        name: str,
        spec: S3Spec,
        *,
        object_size: int | None = None,
        size: int | None = None,
        cluster_size: int | None = None,
    ) -> PoolInfo:
        """Create a pool in an S3 bucket, with this process's AWS credentials (``Home.
        create_s3_pool``). ``Conflict`` (name taken, bucket not empty), ``NotFound`` (no
        bucket), ``InvalidArgument`` (credentials refused, bad sizes), ``IOFailure`` (no
        endpoint answers). Takes no lock of the service's: it waits on the network."""
        return self.home.create_s3_pool(
            name, spec, size=size, object_size=object_size, cluster_size=cluster_size
        )

    def import_s3_pool(self, name: str, spec: S3Spec, *, force: bool = False) -> PoolInfo:
        """Open here an S3 pool released by another HOME (``force``: its holder is gone).
        ``Conflict`` (name taken, lease held), ``NotFound``, ``InvalidArgument``,
        ``IOFailure``. Takes no lock of the service's: it waits on the network."""
        return self.home.import_s3_pool(name, spec, force=force)

    def add_endpoint(self, pool: str, url: str) -> PoolInfo:
        """Serve an S3 pool through one more endpoint, online, once it answers for the
        bucket. ``NotFound``, ``InvalidArgument`` (not an S3 pool), ``Conflict`` (listed),
        ``IOFailure`` (it does not answer). Takes no lock of the service's: the check of
        the endpoint waits up to the pool's timeout."""
        return self.home.add_endpoint(pool, url)

    def remove_endpoint(self, pool: str, url: str) -> PoolInfo:
        """Stop using an endpoint of an S3 pool, online. ``NotFound`` (no such pool or
        endpoint), ``InvalidArgument`` (not an S3 pool), ``Conflict`` (its last one)."""
        with self._lock:
            return self.home.remove_endpoint(pool, url)

    def set_cache(self, pool: str, device: str | None, mode: CacheMode) -> PoolInfo:
        """Attach a cache tier (``device``: ``PATH[:SIZE]``), change its mode, or detach it
        (``CacheMode.NONE``) after destaging (``Home.set_cache``). Takes no lock of the
        service's: the other calls go on while it waits for the destage or for an S3
        import's objects."""
        return self.home.set_cache(pool, device, mode)

    def flush_cache(self, pool: str) -> PoolInfo:
        """Destage everything the pool's cache holds (``Home.flush_cache``). Takes no lock of
        the service's: ``pool show``, the metrics and every other call go on while it waits
        for the destage."""
        return self.home.flush_cache(pool)

    def pools(self) -> list[PoolInfo]:
        """Every pool with its state, sorted by name; an offline pool never fails the list."""
        with self._lock:
            return sorted(self.home.pools(), key=lambda p: p.name)

    def pool_info(self, name: str) -> PoolInfo:
        """One pool with its state (``NotFound``)."""
        with self._lock:
            return self.home.pool_info(name)

    def reopen_pool(self, name: str) -> PoolInfo:
        """Open an offline pool again once its devices are back, and start its exports that
        are not serving (those that still fail stay ``broken`` with their reason). Raises
        ``NotFound``, ``PoolOffline`` (a ``CorruptMetadata``) if it is still offline."""
        info = self.home.reopen_pool(name)  # the open waits without the service's lock
        self._start_pool_exports(name)
        return info

    def delete_pool(self, name: str, *, force: bool = False) -> None:
        """Delete a pool. ``Conflict`` if it has volumes (unless ``force``) or exports. An
        S3 pool's objects are erased without the service's lock (``Home.remove_pool``)."""
        with self._locked(name):
            self.home.pool_info(name)
            self._refuse_if_exported(name, None, None, f"pool {name}")
            rest = self.home.remove_pool(name, force=force)
        rest()

    def add_backing(self, pool: str, spec: BackingSpec) -> PoolInfo:
        """Add a backing device to a pool, online."""
        with self._locked(pool):
            return self.home.pool(pool).add_backing(spec)

    # -- volumes ------------------------------------------------------------------------

    def create_volume(self, pool: str, name: str, size: int) -> VolumeInfo:
        """Create a thin volume of ``size`` bytes (``Conflict`` if the name is taken)."""
        if size <= 0:
            raise InvalidArgument(f"invalid volume size {size}: must be positive")
        with self._locked(pool):
            return self.home.pool(pool).create_volume(name, size)

    def volumes(self, pool: str | None = None) -> list[VolumeInfo]:
        """The volumes of ``pool``, or of every pool that serves (neither offline nor being
        opened), sorted by pool then name. ``PoolOffline`` if the named ``pool`` is offline."""
        with self._locked(pool):
            names = (
                [pool]
                if pool is not None
                else [p.name for p in self.home.pools() if p.state.serves]
            )
            found: list[VolumeInfo] = []
            for name in names:
                found.extend(self.home.pool(name).volumes())
            return sorted(found, key=lambda v: (v.pool, v.name))

    def volume_info(self, pool: str, name: str) -> VolumeInfo:
        with self._locked(pool):
            return self.home.pool(pool).volume_info(name)

    def delete_volume(self, pool: str, name: str) -> None:
        """Delete a volume. ``Conflict`` if it (or one of its snapshots) is exported."""
        with self._locked(pool):
            p = self.home.pool(pool)
            p.volume_info(name)
            self._refuse_if_exported(pool, name, None, f"volume {pool}/{name}")
            p.delete_volume(name)
            self._qos.forget_volume(pool, name)

    def extend_volume(self, pool: str, name: str, size: int) -> VolumeInfo:
        """Grow a volume online; its vhost-user-blk front-ends and SCSI LUNs are told the
        new size.
        ``InvalidArgument`` if ``size`` is smaller than the current size."""
        with self._locked(pool):
            info = self.home.pool(pool).extend_volume(name, size)
            self._qos.refresh(pool, name)
            if self._runtime is not None:
                self._runtime.notify_resized(
                    [
                        s.name
                        for s in self._specs
                        if s.kind is not ExportKind.NBD
                        and (s.pool, s.volume, s.snapshot) == (pool, name, None)
                    ]
                )
            return info

    def clone(self, pool: str, volume: str, snapshot: str, new: str) -> VolumeInfo:
        """Create the writable linked clone ``new`` of ``volume@snapshot`` in the same pool."""
        with self._locked(pool):
            return self.home.pool(pool).clone(volume, snapshot, new)

    def flatten(self, pool: str, volume: str) -> VolumeInfo:
        """Copy the data a clone shares with its origin so it no longer depends on it."""
        with self._locked(pool):
            return self.home.pool(pool).flatten(volume)

    def start_flatten(self, pool: str, volume: str) -> JobInfo:
        """``flatten`` as a job, with progress; cancelling it keeps the clusters copied so
        far (the volume stays a consistent clone and a later flatten goes on from there)."""
        with self._locked(pool):
            p = self.home.pool(pool)
            p.volume_info(volume)
        job_id = self._jobs.create("flatten", f"{pool}/{volume}", Cleanup())

        def work(progress: JobProgress) -> None:
            def report(done: int, total: int) -> None:
                progress.update(done, total)
                progress.check()

            p.flatten(volume, report)

        return self._jobs.run(job_id, work)

    # -- snapshots ----------------------------------------------------------------------

    def create_snapshot(self, pool: str, volume: str, snapshot: str) -> SnapshotInfo:
        """Taken outside the service's lock: it waits for the volume's reads and writes in
        flight, which a stalled device may hold up for as long as it stalls."""
        with self._locked(pool):
            p = self.home.pool(pool)
        return p.create_snapshot(volume, snapshot)

    def snapshots(self, pool: str, volume: str) -> list[SnapshotInfo]:
        with self._locked(pool):
            return self.home.pool(pool).snapshots(volume)

    def delete_snapshot(self, pool: str, volume: str, snapshot: str) -> None:
        """Delete a snapshot; ``Conflict`` if it is exported."""
        with self._locked(pool):
            p = self.home.pool(pool)
            self._snapshot_info(pool, volume, snapshot)
            self._refuse_if_exported(pool, volume, snapshot, f"snapshot {pool}/{volume}@{snapshot}")
            p.delete_snapshot(volume, snapshot)

    def rollback(self, pool: str, volume: str, snapshot: str) -> VolumeInfo:
        """Return a volume to a snapshot's contents; ``Conflict`` while it has open handles
        (a vhost-user-blk export or a connected NBD client)."""
        with self._locked(pool):
            return self.home.pool(pool).rollback(volume, snapshot)

    def set_timeouts(
        self, pool: str, *, io: float | None = None, data: float | None = None
    ) -> Timeouts:
        """Set a pool's sync timeout (``io``, positive) and its read and write timeout
        (``data``, 0: none); None keeps a value. Returns both as they are now (durable).
        Raises ``NotFound``, ``InvalidArgument``, ``PoolOffline``."""
        with self._locked(pool):
            p = self.home.pool(pool)
            if io is not None:
                p.set_io_timeout(io)
            if data is not None:
                p.set_data_timeout(data)
            return Timeouts(p.io_timeout, p.data_timeout)

    def fsck(self, pool: str) -> FsckReport:
        with self._locked(pool):
            return self.home.pool(pool).fsck()

    # -- exports ------------------------------------------------------------------------

    def export_nbd(
        self,
        pool: str,
        volume: str,
        snapshot: str | None = None,
        *,
        name: str | None = None,
        read_only: bool = False,
    ) -> ExportInfo:
        """Export a volume (or, read-only, a snapshot) over NBD under ``name`` (default
        ``POOL/VOL[@SNAP]``). ``Conflict`` if the name is taken; ``NotFound`` if the target
        does not exist. Without the daemon the export is recorded for its next start."""
        spec = ExportSpec(
            name=name or (f"{pool}/{volume}@{snapshot}" if snapshot else f"{pool}/{volume}"),
            kind=ExportKind.NBD,
            pool=pool,
            volume=volume,
            snapshot=snapshot,
            read_only=read_only or snapshot is not None,
        )
        return self._add_export(spec)

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
        """Serve a volume as a vhost-user-blk device on the Unix socket ``socket`` (an
        absolute path) with ``queues`` virtqueues. ``name`` defaults to
        ``vhost-user-blk:POOL/VOL``. ``Conflict`` if the name or socket is taken."""
        if not os.path.isabs(socket):
            raise InvalidArgument(f"vhost-user socket path must be absolute: {socket!r}")
        if not 1 <= queues <= 64:
            raise InvalidArgument(f"invalid queue count {queues}: expected 1 to 64")
        with self._locked(pool):
            real = os.path.realpath(socket)
            for s in self._specs:
                if s.socket is not None and self._real_socket(s.socket) == real:
                    raise Conflict(f"socket {socket} is already used by export {s.name}")
            spec = ExportSpec(
                name=name or f"vhost-user-blk:{pool}/{volume}",
                kind=ExportKind.VHOST_USER_BLK,
                pool=pool,
                volume=volume,
                read_only=read_only,
                socket=socket,
                queues=queues,
            )
            return self._add_export(spec)

    def export_scsi(self, pool: str, volume: str, *, name: str | None = None) -> ExportInfo:
        """Serve a volume as a local SCSI disk: a LIO TCMU backstore on a tcm_loop LUN,
        which the host sees as ``/dev/sdX`` (the export's ``uris``: that and its
        ``/dev/disk/by-id`` path). ``name`` defaults to ``scsi/POOL/VOL``. Raises
        ``Conflict``, ``NotFound``, ``LioUnavailable`` (no LIO here, or not root)."""
        spec = ExportSpec(
            name=name or f"scsi/{pool}/{volume}", kind=ExportKind.SCSI, pool=pool, volume=volume
        )
        return self._add_export(spec)

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
        """Serve a volume (a TCMU backstore) or the host block device ``device`` (an iblock
        backstore) as LUN ``lun`` of the LIO vhost-scsi target ``wwpn``, for QEMU's
        ``vhost-scsi-pci``. The target is created if absent (a new WWPN when None); several
        exports may share it, and ``lun`` defaults to the lowest one its other exports leave
        free. ``name`` defaults to ``vhost-scsi/POOL/VOL`` or ``vhost-scsi/DEVICE``. Raises
        ``InvalidArgument`` (both or neither of a volume and a device, a bad WWPN or LUN),
        ``Conflict`` (name, LUN or device in use), ``NotFound``, ``LioUnavailable``."""
        from storvisor.exports.lio import check_wwpn, generate_wwpn

        if (device is None) == (pool is None or volume is None):
            raise InvalidArgument("export a volume (POOL/VOL) or a host block device, not both")
        if device is not None and not os.path.isabs(device):
            raise InvalidArgument(f"block device path must be absolute: {device!r}")
        if lun is not None and not 0 <= lun <= 16383:
            raise InvalidArgument(f"invalid LUN {lun}: expected 0 to 16383")
        with self._locked(pool):
            wwpn = check_wwpn(wwpn) if wwpn is not None else generate_wwpn()
            taken = {s.lun for s in self._specs if s.wwpn == wwpn}
            if lun is None:
                lun = min(set(range(len(taken) + 1)) - taken)
            elif lun in taken:
                raise Conflict(f"LUN {lun} of {wwpn} is used by another export")
            default = f"{pool}/{volume}" if device is None else os.path.basename(device)
            spec = ExportSpec(
                name=name or f"vhost-scsi/{default}",
                kind=ExportKind.VHOST_SCSI,
                pool=pool or "",
                volume=volume or "",
                wwpn=wwpn,
                lun=lun,
                device=device,
            )
            return self._add_export(spec)

    def exports(self) -> list[ExportInfo]:
        """Every export definition with its state, sorted by name."""
        with self._lock:
            return [self._export_info(s) for s in sorted(self._specs, key=lambda s: s.name)]

    def export_info(self, name: str) -> ExportInfo:
        with self._lock:
            return self._export_info(self._spec(name))

    def remove_export(self, name: str) -> None:
        """Stop an export (disconnecting its clients) and forget its definition. When this
        returns, its connections have closed their volume handles and every write they
        completed is durable (the volume's pool is flushed), as after any management
        operation. An export that did not serve (broken, or no daemon) had no connections:
        its pool is not flushed (nor waited for while it is being opened)."""
        with self._lock:
            rest = without(self._specs, name)
            spec = next(s for s in self._specs if s.name == name)
            served = self._runtime is not None and self._runtime.is_active(name)
            if self._runtime is not None:
                self._runtime.deactivate(name, forget=True)
            elif spec.kind in SCSI_KINDS:
                forget_lio_objects(spec)
            self._store.save(rest)
            self._specs = rest
            self._broken.pop(name, None)
            if served and spec.device is None:
                with contextlib.suppress(NotFound, CorruptMetadata):  # nothing left to flush
                    self.home.pool(spec.pool).flush()

    def libvirt_xml(self, pool: str, volume: str) -> str:
        """The libvirt ``<disk type='vhostuser'>`` element for the volume's vhost-user-blk
        export, with the ``<memoryBacking>`` the domain needs. ``NotFound`` if the volume has
        no vhost-user-blk export."""
        from storvisor.integrations.libvirt import vhost_user_disk_xml

        with self._locked(pool):
            info = self.home.pool(pool).volume_info(volume)
            for spec in self._specs:
                if spec.kind is ExportKind.VHOST_USER_BLK and (spec.pool, spec.volume) == (
                    pool,
                    volume,
                ):
                    return vhost_user_disk_xml(
                        spec.socket or "",
                        queues=spec.queues,
                        read_only=spec.read_only,
                        serial=info.serial,
                    )
            raise NotFound(
                f"volume {pool}/{volume} has no vhost-user-blk export "
                f"(storvisor export vhost-user-blk {pool}/{volume} --socket PATH)"
            )

    # -- QoS ----------------------------------------------------------------------------

    def create_qos_spec(self, name: str, keys: Sequence[QosKey]) -> QosSpecInfo:
        """Create the named QoS spec. ``Conflict`` if it exists; ``InvalidArgument`` for a
        bad name or key (unknown, not a number, negative, absurd, a total key with its read
        or write key)."""
        with self._lock:
            return self._qos.create_spec(name, keys)

    def qos_specs(self) -> list[QosSpecInfo]:
        """Every named QoS spec, sorted by name."""
        with self._lock:
            return self._qos.specs()

    def qos_spec(self, name: str) -> QosSpecInfo:
        with self._lock:
            return self._qos.spec(name)

    def delete_qos_spec(self, name: str) -> None:
        """Delete a named spec. ``Conflict`` while a volume uses it."""
        with self._lock:
            self._qos.delete_spec(name)

    def volume_qos(self, pool: str, volume: str) -> VolumeQos:
        with self._locked(pool):
            self.home.pool(pool).volume_info(volume)
            return self._qos.volume(pool, volume)

    def set_volume_qos(
        self, pool: str, volume: str, *, spec: str | None = None, keys: Sequence[QosKey] = ()
    ) -> VolumeQos:
        """Give a volume a named spec or one-off ``keys`` (neither: no limit). Running
        exports of the volume follow at their next request."""
        with self._locked(pool):
            self.home.pool(pool).volume_info(volume)
            return self._qos.set_volume(pool, volume, spec=spec, keys=keys)

    # -- daemon -------------------------------------------------------------------------

    def start_exports(self, pool_wait: float = POOL_WAIT) -> None:
        """Serve every recorded export (daemon only: ``StateError`` without a runtime). A
        definition that cannot start is logged and reported as ``broken`` by ``exports``; the
        others still start. Every pool is opened first, all side by side (``Home.open_all``),
        and this waits up to ``pool_wait`` seconds for those the exports use: a pool whose
        device or S3 endpoints do not answer holds up the start for that long at most, not
        for one pool after another. The exports of a pool still opening then are ``broken``
        ("being opened") until its open ends; they start then, or say why the pool is
        offline."""
        runtime = self._require_runtime()
        self._jobs.recover()  # a job cut by a crash: its exports and partial result go first
        self.home.open_all()
        deadline = time.monotonic() + pool_wait
        late = {
            pool
            for pool in sorted({s.pool for s in self._specs if s.device is None})
            if not self.home.wait_opened(pool, deadline - time.monotonic())
        }
        with self._lock:
            for spec in self._specs:
                if spec.device is None and spec.pool in late:
                    self._broken[spec.name] = f"pool {spec.pool!r} is being opened"
                    log.warning("export %s waits for pool %s to open", spec.name, spec.pool)
                    continue
                self._start(runtime, spec)
        for pool in sorted(late):
            threading.Thread(
                target=self._start_once_open, args=(pool,), name=f"start-{pool}", daemon=True
            ).start()

    def _start_once_open(self, pool: str) -> None:
        """Start the exports of ``pool`` once its open ends (they say why if it failed)."""
        with contextlib.suppress(StorvisorError):
            self.home.pool(pool)
        self._start_pool_exports(pool)

    def _start_pool_exports(self, pool: str) -> None:
        """Start the exports of ``pool`` that do not serve (those that fail stay ``broken``
        with their reason)."""
        with self._lock:
            if self._runtime is None or self._closed:
                return
            for spec in self._specs:
                if spec.pool == pool and not self._runtime.is_active(spec.name):
                    self._start(self._runtime, spec)

    def _start(self, runtime: ExportRuntime, spec: ExportSpec) -> None:
        try:
            self._activate(runtime, spec)
        except StorvisorError as e:
            self._broken[spec.name] = str(e)
            log.warning("export %s (%s) not started: %s", spec.name, spec.target, e)
        else:
            log.info("export %s: %s over %s", spec.name, spec.target, spec.kind)

    def ensure_demo(self) -> ExportInfo | None:
        """Make sure the demo set-up exists: pool ``default`` on a 64G sparse file in HOME,
        volume ``default/demo`` (1G), exported over NBD as ``demo``. Idempotent. None (and
        a warning in the log) when pool ``default`` exists but is offline or still being
        opened."""
        with self._lock:
            pools = {p.name: p for p in self.home.pools()}
            if DEMO_POOL not in pools:
                backing = BackingSpec(str(self.home.path / DEMO_BACKING), DEMO_POOL_SIZE)
                self.home.create_pool(DEMO_POOL, [backing])
                log.info("created pool %s on %s", DEMO_POOL, backing.path)
            elif not pools[DEMO_POOL].state.serves:
                log.warning(
                    "pool %s is %s (%s): the demo volume is not served",
                    DEMO_POOL,
                    pools[DEMO_POOL].state,
                    pools[DEMO_POOL].reason,
                )
                return None
            pool = self.home.pool(DEMO_POOL)
            if DEMO_VOLUME not in {v.name for v in pool.volumes()}:
                pool.create_volume(DEMO_VOLUME, DEMO_VOLUME_SIZE)
                log.info("created volume %s/%s", DEMO_POOL, DEMO_VOLUME)
            for spec in self._specs:
                if spec.name == DEMO_EXPORT:
                    return self._export_info(spec)
            return self.export_nbd(DEMO_POOL, DEMO_VOLUME, name=DEMO_EXPORT)

    # -- jobs ---------------------------------------------------------------------------

    def import_image(self, pool: str, volume: str, path: str, fmt: str | None = None) -> JobInfo:
        """Create ``POOL/VOLUME`` from the disk image at ``path`` (any format ``qemu-img``
        reads; ``fmt`` forces one) as a job; zeros and holes of the image stay unallocated.
        If the job fails or is cancelled, the volume is deleted. Daemon only."""
        self._require_runtime()
        image_fmt, size = image_info(path, fmt)
        size = -(-size // 512) * 512
        export = f"job-import-{os.urandom(4).hex()}"
        cleanup = Cleanup(exports=(export,), volumes=(f"{pool}/{volume}",))
        with self._locked(pool):
            p = self.home.pool(pool)  # NotFound before anything is recorded
            # checked here, not left to create_volume: abandoning the job deletes the volume
            # its cleanup names, which must never be one that was there before
            with contextlib.suppress(NotFound):
                p.volume_info(volume)
                raise Conflict(f"volume {pool}/{volume} already exists")
            job_id = self._jobs.create("import", f"{pool}/{volume}", cleanup)
            try:
                self.create_volume(pool, volume, size)
                uri = self.export_nbd(pool, volume, name=export).uris[0]
            except BaseException:
                self._jobs.abandon(job_id)
                raise

        def work(progress: JobProgress) -> None:
            arguments = ["-n", "--target-is-zero", "-f", image_fmt, "-O", "raw", path, uri]
            convert(arguments, size, progress)

        return self._jobs.run(job_id, work)

    def export_image(
        self, pool: str, volume: str, snapshot: str | None, path: str, fmt: str
    ) -> JobInfo:
        """Write a volume (or snapshot) to a new image file ``path`` in format ``fmt`` as a
        job; unallocated ranges stay holes. A failed or cancelled job removes the file.
        Daemon only."""
        self._require_runtime()
        check_output_image(path, fmt)
        target = f"{pool}/{volume}" + (f"@{snapshot}" if snapshot else "")
        export = f"job-export-{os.urandom(4).hex()}"
        with self._lock:
            job_id = self._jobs.create(
                "export-image", target, Cleanup(exports=(export,), files=(path,))
            )
            try:
                uri = self.export_nbd(pool, volume, snapshot, name=export, read_only=True).uris[0]
                size = self.volume_info(pool, volume).size
                if snapshot is not None:
                    size = next(i.size for i in self.snapshots(pool, volume) if i.name == snapshot)
            except BaseException:
                self._jobs.abandon(job_id)
                raise

        def work(progress: JobProgress) -> None:
            convert(["-f", "raw", "-O", fmt, uri, path], size, progress)

        return self._jobs.run(job_id, work)

    def jobs(self) -> list[JobInfo]:
        """Running jobs and the most recent finished ones, oldest first."""
        return self._jobs.list()

    def job(self, job_id: str) -> JobInfo:
        return self._jobs.get(job_id)

    def cancel_job(self, job_id: str) -> JobInfo:
        """Stop a running job; what it created is removed. ``Conflict`` if it has ended."""
        return self._jobs.cancel(job_id)

    def _undo(self, cleanup: Cleanup) -> None:
        for name in cleanup.exports:
            with contextlib.suppress(NotFound):
                self.remove_export(name)
        for ref in cleanup.volumes:
            pool, _, volume = ref.partition("/")
            with contextlib.suppress(NotFound):
                self.delete_volume(pool, volume)
        for path in cleanup.files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def close(self) -> None:
        """Stop every export, flush and close every pool, release the HOME lock."""
        self._jobs.close()  # before the lock: a job undoing itself takes it
        with self._lock:
            self._closed = True
            try:
                if self._runtime is not None:
                    self._runtime.close()
            finally:
                self._qos.close()
                self.home.close()

    # -- helpers ------------------------------------------------------------------------

    def _require_runtime(self) -> ExportRuntime:
        if self._runtime is None:
            raise StateError("this operation needs the running daemon (storvisor serve)")
        return self._runtime

    @contextlib.contextmanager
    def _locked(self, pool: str | None) -> Iterator[None]:
        """The service's lock, taken once pool ``pool`` is open: its first open (an S3
        pool's waits on the network), or the wait for an open under way, runs before, so
        that the other calls go on meanwhile. What the open raises is left to the caller's
        own ``home.pool``, which raises it again (an offline pool stays offline)."""
        if pool:
            with contextlib.suppress(StorvisorError):
                self.home.pool(pool)
        with self._lock:
            yield

    def _spec(self, name: str) -> ExportSpec:
        for spec in self._specs:
            if spec.name == name:
                return spec
        raise NotFound(f"no export named {name!r}")

    def _snapshot_info(self, pool: str, volume: str, snapshot: str) -> SnapshotInfo:
        for snap in self.home.pool(pool).snapshots(volume):
            if snap.name == snapshot:
                return snap
        raise NotFound(f"no snapshot {pool}/{volume}@{snapshot}")

    def _refuse_if_exported(
        self, pool: str, volume: str | None, snapshot: str | None, what: str
    ) -> None:
        users = [
            s.name
            for s in self._specs
            if s.pool == pool
            and (volume is None or s.volume == volume)
            and (snapshot is None or s.snapshot == snapshot)
        ]
        if users:
            raise Conflict(
                f"{what} is exported ({', '.join(sorted(users))}); remove the export first"
            )

    def _real_socket(self, path: str) -> str:
        """The resolved path of an exported socket, resolved once (the check of a new
        export's socket compares it with every other export's)."""
        real = self._real_sockets.get(path)
        if real is None:
            real = self._real_sockets[path] = os.path.realpath(path)
        return real

    def _add_export(self, spec: ExportSpec) -> ExportInfo:
        check_export_name(spec.name)
        with self._locked(spec.pool or None):
            if any(s.name == spec.name for s in self._specs):
                raise Conflict(f"export {spec.name!r} already exists")
            if spec.device is not None:
                if any(s.device == spec.device for s in self._specs):
                    raise Conflict(f"device {spec.device} is already exported")
                serial = ""
            else:
                serial = self.home.pool(spec.pool).volume_info(spec.volume).serial
            if spec.snapshot is not None:
                self._snapshot_info(spec.pool, spec.volume, spec.snapshot)
            if self._runtime is not None:
                self._activate(self._runtime, spec, serial)
            try:
                self._store.save([*self._specs, spec])
            except OSError:
                if self._runtime is not None:
                    self._runtime.deactivate(spec.name, forget=True)
                raise
            self._specs.append(spec)
            return self._export_info(spec)

    def _activate(
        self, runtime: ExportRuntime, spec: ExportSpec, serial: str | None = None
    ) -> None:
        if spec.device is not None:  # a host block device: no volume

            def no_volume() -> BlockDevice:
                raise StateError(f"export {spec.name} has no volume")

            runtime.activate(spec, no_volume, "")
            self._broken.pop(spec.name, None)
            return
        pool = self.home.pool(spec.pool)
        if serial is None:
            serial = pool.volume_info(spec.volume).serial
        if spec.snapshot is not None:
            self._snapshot_info(spec.pool, spec.volume, spec.snapshot)

        qos = self._qos.block(spec.pool, spec.volume)  # one per volume, for every export

        def open_volume() -> BlockDevice:
            return ThrottledDevice(pool.open_volume(spec.volume, spec.snapshot), qos)

        runtime.activate(spec, open_volume, serial)
        self._broken.pop(spec.name, None)

    def _export_info(self, spec: ExportSpec) -> ExportInfo:
        if self._runtime is None:
            return ExportInfo(
                spec,
                ExportState.INACTIVE,
                export_uris(spec, self.home.path / NBD_SOCKET),
                "the daemon is not running; the export starts with `storvisor serve`",
            )
        uris = self._runtime.uris(spec)
        if self._runtime.is_active(spec.name):
            return ExportInfo(spec, ExportState.ACTIVE, uris)
        return ExportInfo(spec, ExportState.BROKEN, uris, self._broken.get(spec.name, ""))
