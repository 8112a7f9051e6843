"""A pool: backing devices cut into clusters, and the thin volumes, snapshots and clones on them.

Theory of operation
-------------------
Every volume is a chain of *layers*. A layer maps virtual clusters to physical clusters (or to
an explicit zero); the volume's writable ``top`` layer sits over its parents. Taking a
snapshot freezes the top layer under the snapshot's name and gives the volume a new, empty
top whose parent is the frozen one; a linked clone is a new volume whose top's parent is a
snapshot's layer. Neither copies a map, so both cost O(1) in the volume's size.

A physical cluster belongs to exactly one layer's map (its refcount is 1); sharing happens
through the chain. Writing to a cluster another layer owns allocates a cluster in the top
layer and copies the untouched part of the old cluster into it (copy-on-write); writing to an
unmapped cluster fills the rest of the new cluster with zeros. Discard and write-zeroes free
clusters the top owns and leave an explicit zero where a parent still has data.

A snapshot with linked clones cannot be deleted until they are flattened or deleted.
Deleting a snapshot drops its name; its layer is then *hidden*. A hidden layer with no child is
freed (and its parent is looked at in turn); a hidden layer with one child is merged into that
child (the child takes every entry it lacks); a hidden layer with several children (the layers
left by rollbacks) stays until only one depends on it.

All metadata lives in memory (``Layer.map`` dicts, and per open volume a merged *view* of its
chain, so a read costs one dict lookup) and reaches the SQLite catalog through ``Batch``es.
``flush`` makes data durable first (``fdatasync`` of every backing device), then commits the
batch in one transaction. A background thread commits pending metadata every half second; it
makes durable only the clusters allocated since the last commit (``Backing.sync_clusters``),
the data the new metadata points at, and leaves in-place overwrites to the next flush, as a
disk with a volatile cache may. A cluster released by a batch is reused only after that batch
committed.

Failing devices
---------------
A backing device that fails a read or a write fails that request only, with the errno the
device gave (``IOFailure``): an allocating write that failed gives its cluster back and
publishes no mapping, so no metadata ever points at data that was not written. Every such
failure is counted (``io_errors``), logged once per kind, and makes the pool *degraded*
with the reason (``info().state``); the pool keeps serving.

A failed sync is worse: the kernel may already have dropped the dirty pages it could not
write back, and a later ``fdatasync`` reports success for the pages that remain ("fsyncgate").
So the first failed or timed-out sync fails its flush and *latches*: the pool stays degraded,
every later flush and FUA write fails with EIO, and no batch is committed, until
``recover`` (``Home.reopen_pool``) syncs every device successfully again and returns the
pool to its last commit, as a crash would: a cluster allocated since may hold anything, so
no mapping to it may survive. A sync that does not complete within ``io_timeout`` seconds
fails its flush with ETIMEDOUT the same way (the stalled system call is left to finish in
its own thread; ``recover`` refuses while it runs).

Reads and writes are bounded only when the pool's ``data_timeout`` is set (0, the default,
leaves them unbounded: the device's own timeout applies, and the hot path hands nothing to
another thread). With it, a volume's reads and writes run on the pool's I/O threads through
bounce buffers (``engine/bounded.py``) and fail with ETIMEDOUT past it. A read that timed
out leaves nothing behind. A write that timed out may still land, after writes the client
issues next: it latches the pool as a failed sync does, and ``recover`` refuses while it
runs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from queue import SimpleQueue

from storvisor.engine.allocator import Allocator, group_clusters
from storvisor.engine.backing import Backing, Header, phys_number, split_phys, sync_directory
from storvisor.engine.bounded import IoThreads
from storvisor.engine.cache import Cache, CacheSpec, wipe_device
from storvisor.engine.catalog import ZERO, Batch, Catalog
from storvisor.engine.fsck import Memory, check_pool
from storvisor.engine.iostats import LatencyHistogram
from storvisor.engine.journal import RECORDS, UNMAPPED, Journal
from storvisor.engine.layers import LayerTree
from storvisor.engine.types import (
    BackingOp,
    BackingSpec,
    CacheInfo,
    CacheMode,
    FetchProgress,
    FsckReport,
    IoErrorCounts,
    PoolInfo,
    PoolState,
    PoolStats,
    SnapshotInfo,
    VolumeInfo,
)
from storvisor.engine.volume import Volume, VolumeState
from storvisor.errors import (
    Conflict,
    CorruptMetadata,
    InvalidArgument,
    IOFailure,
    NotFound,
    StateError,
    StorvisorError,
    Unavailable,
)

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
MIN_CLUSTER = 4096
MAX_CLUSTER = 2 << 20
DEFAULT_CLUSTER = 64 << 10
COMMIT_INTERVAL = 0.5
"""Seconds between background commits (the contract is at most one second)."""
DEFAULT_IO_TIMEOUT = 30.0
"""Seconds a sync of the backing devices may take before its flush fails (ETIMEDOUT)."""
MIN_TIMEOUT = 0.1
MAX_TIMEOUT = 7 * 86400.0
"""The shortest and longest I/O or data timeout a pool takes, in seconds (a week: longer
waits are "never" to an operator, and beyond the range of the system's timed waits)."""
_PLANE_HITS_WAIT = 2.0
"""Seconds ``cache_info`` waits for the data planes' counts of their cache hits (a report
waits for no I/O: a plane answers from its reader thread)."""


def check_name(name: str, what: str) -> None:
    """Raise ``InvalidArgument`` unless ``name`` matches ``[A-Za-z0-9][A-Za-z0-9._-]{0,62}``."""
    if not isinstance(name, str) or NAME_RE.fullmatch(name) is None:
        raise InvalidArgument(
            f"invalid {what} name {name!r}: use up to 63 of A-Z a-z 0-9 . _ - "
            "starting with a letter or digit"
        )


def check_cluster_size(cluster_size: int) -> None:
    if (
        not isinstance(cluster_size, int)
        or cluster_size < MIN_CLUSTER
        or cluster_size > MAX_CLUSTER
        or cluster_size & (cluster_size - 1)
    ):
        raise InvalidArgument(
            f"invalid cluster size {cluster_size}: a power of two from 4K to 2M is needed"
        )


@dataclass
class _VolumeRec:
    id: int
    name: str
    size: int
    top: int
    origin: str | None
    origin_snap: int | None
    serial: str
    created: float


@dataclass
class _SnapRec:
    id: int
    volume: int
    name: str
    layer: int
    size: int
    created: float


class Pool:
    """One pool. Thread-safe. Obtain it from ``Home.pool``; see the module docstring."""

    def __init__(
        self,
        name: str,
        directory: Path,
        catalog: Catalog,
        identity: Header,
        backings: dict[int, Backing],
    ) -> None:
        self.name = name
        self.directory = directory
        self.cluster_size = identity.cluster_size
        self.group = group_clusters(identity.cluster_size)
        """Clusters per placement group (``allocator.group_clusters``)."""
        self._identity = identity
        self._catalog = catalog
        self._backings = backings
        self._lock = threading.RLock()
        self._commit_lock = threading.Lock()
        self.commit_times = LatencyHistogram()
        """Durations of the commits that had something to make durable."""
        self._batch = Batch()
        self._fresh: list[int] = []
        """Clusters the batch maps that were allocated (and written) since the last commit."""
        self._states: dict[tuple[int, int | None], VolumeState] = {}
        self._tree = LayerTree(name)
        self._volumes: dict[str, _VolumeRec] = {}
        self._snapshots: dict[int, _SnapRec] = {}
        self._health = threading.Lock()  # guards the fields below
        self._errors = dict.fromkeys(BackingOp, 0)
        self._timeouts = 0
        self._degraded = ""  # why the pool is degraded ("" when it is not)
        self._sync_failure: IOFailure | None = None  # latched by a failed sync (fsyncgate)
        self._logged: set[BackingOp] = set()  # kinds of failure logged since the last recover
        self._stalled: list[_SyncJob] = []  # syncs still running past their timeout
        self._syncs: SimpleQueue[_SyncJob | None] = SimpleQueue()
        self.io_timeout = min(
            float(catalog.meta().get("io_timeout", DEFAULT_IO_TIMEOUT)), MAX_TIMEOUT
        )
        """Seconds a sync of the backing devices may take (``set_io_timeout``)."""
        self.data_timeout = min(float(catalog.meta().get("data_timeout", 0.0)), MAX_TIMEOUT)
        """Seconds a volume's read or write may take; 0: unbounded (``set_data_timeout``)."""
        self._io_threads = IoThreads(f"storvisor-{name}")
        self.cache: Cache | None = None
        """The pool's cache tier (``engine/cache.py``), opened before the journal is read."""
        cached = catalog.meta().get("cache")
        if cached:
            for backing in backings.values():
                backing.settle()  # the cache reads and writes the devices directly
            self.cache = self._open_cache(cached)
        try:
            self._journal = Journal(directory / "journal")
        except OSError as e:
            raise IOFailure(f"pool {name!r}: cannot map its journal: {e.strerror}") from e
        self._seq = self._committed_seq = self._replay()
        """Number of the last map change recorded in the journal, and of the last committed."""
        self._load()
        self._closed = False
        self._stop = threading.Event()
        self._wake = threading.Event()  # commit now: half the journal is pending
        self._reads_here = any(b.reads_here for b in backings.values())
        """Whether the volumes' planes send their reads here (``Backing.reads_here``); the
        committer publishes the change when it turns false."""
        for backing in backings.values():
            backing.on_change = self._wake.set
        self._committer = threading.Thread(
            target=self._commit_loop, name=f"storvisor-commit-{name}", daemon=True
        )
        self._committer.start()
        self._syncer = threading.Thread(
            target=self._sync_loop, name=f"storvisor-sync-{name}", daemon=True
        )
        self._syncer.start()
        for backing in backings.values():
            backing.opened()

    # ----------------------------------------------------------------- opening and creating

    @classmethod
    def create(
        cls,
        directory: Path,
        name: str,
        backings: Sequence[BackingSpec],
        cluster_size: int | None = None,
        *,
        attach: Callable[[BackingSpec, Header], tuple[Backing, bool]] = Backing.attach,
    ) -> Pool:
        """Create the pool's catalog in ``directory`` (which must not exist) and write a header
        on every backing device. On failure nothing is left behind: ``Conflict`` for a device
        of another pool, ``InvalidArgument``, ``NotFound`` for a missing device."""
        check_name(name, "pool")
        cluster_size = DEFAULT_CLUSTER if cluster_size is None else cluster_size
        check_cluster_size(cluster_size)
        if not backings:
            raise InvalidArgument("a pool needs at least one backing device")
        paths = [os.path.abspath(spec.path) for spec in backings]
        if len(set(paths)) != len(paths):
            raise InvalidArgument("the same backing device is listed twice")
        pool_uuid = uuid.uuid4()
        attached: list[tuple[Backing, bool]] = []
        directory.mkdir(parents=True)
        try:
            for index, (spec, path) in enumerate(zip(backings, paths, strict=True)):
                header = Header(index, cluster_size, pool_uuid, name)
                attached.append(attach(BackingSpec(path, spec.size, spec.force), header))
            catalog = Catalog(directory / "catalog.db")
            batch = Batch()
            for key, value in (
                ("uuid", str(pool_uuid)),
                ("name", name),
                ("cluster_size", str(cluster_size)),
                ("format", "1"),
            ):
                batch.statements.append(("INSERT INTO meta VALUES (?, ?)", (key, value)))
            for backing, created in attached:
                batch.statements.append(
                    (
                        "INSERT INTO devices VALUES (?, ?, ?)",
                        (backing.index, backing.path, int(created)),
                    )
                )
                batch.statements.append(_device_bytes_statement(backing))
            catalog.apply(batch)
            # the catalog's name and the pool directory's own entries must outlive a machine
            # crash, up to the state directory
            for parent in (directory, directory.parent, directory.parent.parent):
                sync_directory(parent)
        except BaseException:
            for backing, created in attached:
                backing.wipe_header()
                backing.close()
                if created:
                    os.unlink(backing.path)
            for child in directory.iterdir():
                child.unlink()
            directory.rmdir()
            raise
        header = Header(0, cluster_size, pool_uuid, name)
        return cls(name, directory, catalog, header, {b.index: b for b, _ in attached})

    @classmethod
    def open(
        cls,
        directory: Path,
        name: str,
        *,
        open_backing: Callable[[str, Header], Backing] = Backing.open,
    ) -> Pool:
        """Open an existing pool. Raises ``NotFound`` if there is none, ``CorruptMetadata`` if
        its catalog is unreadable or a device is missing or carries another identity.
        ``open_backing`` opens each recorded device (an S3 pool passes its own)."""
        db = directory / "catalog.db"
        if not db.exists():
            raise NotFound(f"no pool named {name!r}")
        catalog = Catalog(db)
        try:
            meta = catalog.meta()
            identity = Header(0, int(meta["cluster_size"]), uuid.UUID(meta["uuid"]), meta["name"])
        except (KeyError, ValueError) as e:
            catalog.close()
            raise CorruptMetadata(f"pool {name!r}: catalog has no valid identity") from e
        backings: dict[int, Backing] = {}
        try:
            for index, path, _created in catalog.query("SELECT idx, path, created FROM devices"):
                expected = Header(
                    index, identity.cluster_size, identity.pool_uuid, identity.pool_name
                )
                try:
                    backings[index] = open_backing(path, expected)
                except NotFound as e:
                    raise CorruptMetadata(f"pool {name!r}: {e}") from e
            _check_lengths(name, catalog, backings)
        except BaseException:
            for backing in backings.values():
                backing.close()
            catalog.close()
            raise
        return cls(name, directory, catalog, identity, backings)

    def _load(self) -> None:
        cat = self._catalog
        self._tree.load(
            cat.query("SELECT id, parent FROM layers"), cat.query("SELECT layer, vc, phys FROM map")
        )
        for row in cat.query(
            "SELECT id, name, size, top, origin, origin_snap, serial, created FROM volumes"
        ):
            rec = _VolumeRec(*row)
            self._volumes[rec.name] = rec
        for row in cat.query("SELECT id, volume, name, layer, size, created FROM snapshots"):
            snap = _SnapRec(*row)
            self._snapshots[snap.id] = snap
        used = [phys for (phys,) in cat.query("SELECT phys FROM refcount")]
        self._allocator = Allocator(
            {i: b.clusters for i, b in self._backings.items()}, used, self.group
        )
        ids = [0, *self._tree.layers, *(v.id for v in self._volumes.values()), *self._snapshots]
        self._next_id = max(ids) + 1

    # ------------------------------------------------------------------------ pool level

    def info(self) -> PoolInfo:
        """Devices and space of the pool."""
        with self._lock:
            cs = self.cluster_size
            capacity = self._allocator.capacity * cs
            allocated = self._allocator.used * cs
            provisioned = sum(v.size for v in self._volumes.values())
            stats = PoolStats(capacity, allocated, provisioned, capacity - allocated)
            backings = tuple(self._backings[i].info() for i in sorted(self._backings))
            endpoints = tuple(e for b in self._backings.values() for e in b.endpoints())
            progress = [p for b in self._backings.values() if (p := b.hydrating) is not None]
        fetching = FetchProgress(*progress[0]) if progress else None
        with self._health:
            reason = self._degraded
        state = PoolState.DEGRADED if reason else PoolState.ONLINE
        cache = self.cache_info()
        return PoolInfo(self.name, cs, backings, stats, state, reason, endpoints, cache, fetching)

    @property
    def io_errors(self) -> IoErrorCounts:
        """Backing I/O failures since the pool was opened (a counter for metrics)."""
        with self._health:
            errors = self._errors
            return IoErrorCounts(
                errors[BackingOp.READ],
                errors[BackingOp.WRITE],
                errors[BackingOp.SYNC],
                self._timeouts,
            )

    def set_io_timeout(self, seconds: float) -> None:
        """Set how long a sync of the backing devices may take before its flush fails with
        ETIMEDOUT (and the pool degrades). Durable when this returns (the flush that makes it
        so runs under the timeout in force before). Raises ``InvalidArgument`` unless
        ``MIN_TIMEOUT <= seconds <= MAX_TIMEOUT``."""
        if not isinstance(seconds, (int, float)) or not MIN_TIMEOUT <= seconds <= MAX_TIMEOUT:
            raise InvalidArgument(
                f"invalid I/O timeout {seconds!r}: {MIN_TIMEOUT:g} to {MAX_TIMEOUT:g} seconds"
                " are needed"
            )
        with self._lock:
            self._check_open()
            self._stmt("INSERT OR REPLACE INTO meta VALUES ('io_timeout', ?)", repr(float(seconds)))
        try:
            self.flush()
        finally:
            self.io_timeout = float(seconds)

    def set_data_timeout(self, seconds: float) -> None:
        """Set how long a read or write of a volume may take before it fails with
        ETIMEDOUT (0: no limit, the default). Applies to requests that start afterwards;
        durable when this returns. Raises ``InvalidArgument`` unless
        0 or ``MIN_TIMEOUT <= seconds <= MAX_TIMEOUT``."""
        if not isinstance(seconds, (int, float)) or not (
            seconds == 0 or MIN_TIMEOUT <= seconds <= MAX_TIMEOUT
        ):
            raise InvalidArgument(
                f"invalid data I/O timeout {seconds!r}: 0 (none) or {MIN_TIMEOUT:g} to"
                f" {MAX_TIMEOUT:g} seconds are needed"
            )
        with self._lock:
            self._check_open()
            self.data_timeout = float(seconds)
            for state in self._states.values():
                state.timeout = self.data_timeout
                for plane in state.planes:
                    state.publish_io(plane)
            self._stmt(
                "INSERT OR REPLACE INTO meta VALUES ('data_timeout', ?)", repr(float(seconds))
            )
        self.flush()

    def run_bounded(self, op: BackingOp, work: Callable[[], None]) -> None:
        """Run ``work`` (a volume's read or write through bounce buffers) on the pool's I/O
        threads, waiting up to ``data_timeout`` seconds. Raises what ``work`` raised, or
        ``IOFailure(ETIMEDOUT)``: the request is abandoned (see ``engine/bounded.py``), and
        a write that had started latches the pool (its data may land at any time later)."""
        timeout = self.data_timeout
        abandoned = self._io_threads.run(work, timeout)
        if abandoned is None:
            return
        error = IOFailure(
            f"a {op} of a backing device did not complete within {timeout:g} s", errno.ETIMEDOUT
        )
        self.backing_failed(op, error)
        if op is BackingOp.WRITE and abandoned.started:
            # Not the commit lock: a commit may wait for a sync that the stalled write holds
            # up. The journal is not consumed: no data written before was lost (recover
            # drops every change since the last commit all the same).
            self._latch(error, f"a write of a backing device timed out: {error}")
        raise error

    def backing_failed(self, op: BackingOp, error: IOFailure) -> None:
        """Record that a read or write of a backing device failed with ``error`` (the
        request fails with it): counted, logged once per kind, the pool degraded."""
        with self._health:
            self._errors[op] += 1
            if error.errno == errno.ETIMEDOUT:
                self._timeouts += 1
            if not self._degraded:
                self._degraded = f"a {op} of a backing device failed: {error}"
            first = op not in self._logged
            self._logged.add(op)
        if first:
            log.error(
                "pool %s: a %s of a backing device failed: %s (the request fails; further "
                "failures are counted, not logged, until the pool is reopened)",
                self.name,
                op,
                error,
            )

    def _sync_failed(self, error: IOFailure) -> None:
        """Latch a failed sync (call with the commit lock held): see "Failing devices"."""
        with self._health:
            self._errors[BackingOp.SYNC] += 1
            if error.errno == errno.ETIMEDOUT:
                self._timeouts += 1
        if self._latch(error, f"a sync of a backing device failed: {error}"):
            self._consume_journal()

    def _latch(self, error: IOFailure, what: str) -> bool:
        """Fail every flush from now on until ``recover``: written data may be lost (a
        failed sync) or may still land (a timed-out write). True if this latched the pool
        (it was not latched yet)."""
        with self._health:
            latching = self._sync_failure is None
            if latching:
                self._sync_failure = error
                self._degraded = f"{what}; flushes fail until the pool is reopened"
            first = latching or BackingOp.SYNC not in self._logged
            self._logged.add(BackingOp.SYNC)
        if first:
            log.error(
                "pool %s: %s; written data may be lost or land late, so every flush fails "
                "until 'storvisor pool reopen %s'",
                self.name,
                what,
                self.name,
            )
        return latching

    def recover(self) -> None:
        """Bring a degraded pool back online: sync every backing device (within
        ``io_timeout``); after a failed sync, return the metadata to the last commit (every
        change since is dropped, see ``_drop_uncommitted``); clear the failure and flush.
        A pool that is not degraded is only flushed.

        Raises ``IOFailure`` (the pool stays degraded, with the new reason): a sync still
        stalled from before (ETIMEDOUT), or the sync failing again."""
        with self._commit_lock:
            with self._lock:
                self._check_open()
                backings = list(self._backings.values())
            if any(not job.done.is_set() for job in self._stalled):
                raise IOFailure(
                    f"pool {self.name!r}: a sync of a backing device is still stalled",
                    errno.ETIMEDOUT,
                )
            if self._io_threads.stalled():
                raise IOFailure(
                    f"pool {self.name!r}: a read or write of a backing device is still stalled",
                    errno.ETIMEDOUT,
                )
            self._stalled.clear()
            try:
                self._within_timeout(lambda: _sync_all(backings))
                if self.cache is not None and self.cache.failure is not None:
                    self._reopen_cache(self.cache)
            except IOFailure as e:
                with self._health:
                    if self._degraded and self._sync_failure is None:
                        self._degraded = f"still failing: {e}"
                raise
            with self._health:
                latched = self._sync_failure is not None
            if latched:
                self._drop_uncommitted()
            with self._health:
                was, self._degraded = self._degraded, ""
                self._sync_failure = None
                self._logged.clear()
        if was:
            log.warning("pool %s is online again (it was degraded: %s)", self.name, was)
        self.flush()

    def _consume_journal(self) -> None:
        """Mark every map change recorded so far as handled, without committing it: after a
        failed sync, no restart may replay changes whose data may be lost. Call with the
        commit lock held."""
        with self._lock:
            seq = self._seq
        try:
            self._catalog.apply(Batch(statements=[_journal_seq_statement(seq)]))
        except StorvisorError as e:
            log.error("pool %s: cannot mark the journal handled: %s", self.name, e)
            return
        with self._lock:
            self._committed_seq = max(self._committed_seq, seq)

    def _drop_uncommitted(self) -> None:
        """Return the pool's metadata to its last commit, as a crash would: every map
        change, allocation and management operation since is dropped (after a failed sync
        the data they point at may be lost; they were never acknowledged durable, since
        every flush failed). Open handles see the committed maps from now on. Call with the
        commit lock held."""
        self._consume_journal()
        with self._lock:
            states = list(self._states.values())
        locked: list[VolumeState] = []
        try:
            for state in states:  # no allocation in flight...
                state.quiesce()
                locked.append(state)
            with contextlib.ExitStack() as frozen:
                for state in states:  # ...and no direct I/O, here or in a data plane
                    frozen.enter_context(state.frozen())
                with self._lock:
                    self._batch, self._fresh = Batch(), []
                    self._tree = LayerTree(self.name)
                    self._volumes.clear()
                    self._snapshots.clear()
                    self._load()
                    for key, state in list(self._states.items()):
                        self._reset_state(key, state)
        finally:
            for state in locked:
                state.lock.release()
        log.warning(
            "pool %s: the changes since its last commit were dropped (a sync had failed)",
            self.name,
        )

    def _reset_state(self, key: tuple[int, int | None], state: VolumeState) -> None:
        """Point an open volume's state at its committed top, size and view; a volume or
        snapshot that was never committed is closed. Call with the pool lock held."""
        vid, sid = key
        vol = next((v for v in self._volumes.values() if v.id == vid), None)
        snap = self._snapshots.get(sid) if sid is not None else None
        if vol is None or (sid is not None and snap is None):
            state.closed = True
            del self._states[key]
            return
        top, size = (vol.top, vol.size) if snap is None else (snap.layer, snap.size)
        state.top = top
        if size != state.size:  # an extend that never committed is undone
            state.set_size(size)
        view, homes = self._build_view(top, homes=not state.read_only)
        state.homes = homes
        state.rebuild(view)

    def _within_timeout(self, work: Callable[[], None]) -> None:
        """Run ``work`` (syncs of backing devices) in the pool's sync thread and wait for it
        up to ``io_timeout`` seconds. Raises what ``work`` raised, or
        ``IOFailure(ETIMEDOUT)``, leaving the work to finish on its own."""
        job = _SyncJob(work)
        self._syncs.put(job)
        if not job.done.wait(self.io_timeout):
            self._stalled.append(job)
            raise IOFailure(
                f"a sync of the backing devices did not complete within {self.io_timeout:g} s",
                errno.ETIMEDOUT,
            )
        if job.error is not None:
            raise job.error

    def _sync_loop(self) -> None:
        # One thread per pool runs the syncs that flushes and commits wait for with a
        # timeout: handing a job over costs tens of microseconds, starting a thread several
        # times that. A job that stalls holds the thread; the pool is latched meanwhile, so
        # no other job comes until it finishes.
        while True:
            job = self._syncs.get()
            if job is None:
                return
            try:
                job.work()
            except BaseException as e:
                job.error = e
            finally:
                job.done.set()

    def add_backing(self, spec: BackingSpec) -> PoolInfo:
        """Add a backing device online; it is usable at once and durable when this returns.

        Naming a file that is already a device of this pool with a larger ``size`` grows it;
        the new size is synced before any cluster of the grown part is handed out. Raises
        ``Conflict`` for a device of another pool (or of this one, without growth),
        ``NotFound`` and ``InvalidArgument`` as ``Backing.attach`` does, ``IOFailure`` when
        the grown size cannot be made durable; ``InvalidArgument`` for an S3 pool, whose one
        device is its bucket.
        """
        path = os.path.abspath(spec.path)
        with self._lock:
            self._check_open()
            if not all(b.extensible for b in self._backings.values()):
                raise InvalidArgument(f"pool {self.name!r} is an S3 pool: it takes no devices")
            for backing in self._backings.values():
                if os.path.realpath(backing.path) == os.path.realpath(path):
                    if spec.size is None or spec.size <= (backing.clusters + 1) * self.cluster_size:
                        raise Conflict(f"{path} is already a device of pool {self.name!r}")
                    backing.grow(spec.size)
                    backing.sync()  # fdatasync makes the new file size durable
                    self._allocator.set_device(backing.index, backing.clusters)
                    self._batch.statements.append(_device_bytes_statement(backing))
                    break
            else:
                index = max(self._backings, default=-1) + 1
                header = Header(index, self.cluster_size, self._identity.pool_uuid, self.name)
                backing, created = Backing.attach(BackingSpec(path, spec.size, spec.force), header)
                self._backings[index] = backing
                if self.cache is not None:
                    self.cache.add_backing(index, backing)
                self._allocator.set_device(index, backing.clusters)
                self._batch.statements.append(
                    ("INSERT INTO devices VALUES (?, ?, ?)", (index, path, int(created)))
                )
                self._batch.statements.append(_device_bytes_statement(backing))
        self.flush()
        return self.info()

    def flush(self) -> None:
        """Make every write and metadata change completed before this call durable.

        Order: ``fdatasync`` every backing device, then commit the pending batch in one SQLite
        transaction. The devices are synced even when this process wrote nothing since the
        last flush: data planes write in place without telling the pool, and a management
        operation whose batch the background commit took must still sync what came before
        it. Raises ``IOFailure`` if either step fails; the batch then stays pending and is
        retried by the next flush. A failed or timed-out sync (ETIMEDOUT after
        ``io_timeout``) degrades the pool, and every later flush fails with EIO until
        ``recover`` (see "Failing devices" in the module docstring).
        """
        self._commit(full=True)

    def _commit(self, *, full: bool) -> None:
        """Commit the pending batch after making durable the data it points at: all written
        data (``full``, a flush) or only the clusters allocated since the last commit."""
        with self._commit_lock:
            if self._closed:  # close releases the devices holding this lock
                raise IOFailure(f"pool {self.name!r} is closed", errno.ESHUTDOWN)
            with self._health:
                failure = self._sync_failure
            if failure is not None:
                raise IOFailure(
                    f"pool {self.name!r}: an earlier sync of a backing device failed "
                    f"({failure}); flushes fail until the pool is reopened",
                    errno.EIO,
                )
            with self._lock:
                batch, self._batch = self._batch, Batch()
                fresh, self._fresh = self._fresh, []
                backings = dict(self._backings)
                seq = self._seq
                if seq != self._committed_seq:
                    batch.statements.append(_journal_seq_statement(seq))
            if not batch and not full:
                return
            started = time.perf_counter_ns()
            try:
                try:
                    if full:
                        work = partial(_sync_all, backings.values())
                    else:
                        work = partial(_sync_fresh, backings, fresh)
                    if self.cache is not None:
                        work = partial(self.cache.sync, work)
                    if any(b.remote for b in backings.values()):
                        work()  # bounded by the store's own timeouts, not the pool's
                    else:
                        self._within_timeout(work)
                except Unavailable:
                    raise  # nothing was lost: the next flush uploads it all again
                except IOFailure as e:
                    self._sync_failed(e)
                    raise
                if batch:
                    self._catalog.apply(batch)
            except BaseException:
                with self._lock:
                    batch.absorb(self._batch)
                    self._batch = batch
                    self._fresh[:0] = fresh
                raise
            with self._lock:
                self._committed_seq = max(self._committed_seq, seq)
            cache = self.cache
            for backing in backings.values():
                if cache is not None and cache.defers(backing):
                    cache.after_destage(backing.catalog_upload(bool(batch)))
                else:
                    backing.committed(bool(batch))  # on failure the frees are not recycled
            self.commit_times.observe(time.perf_counter_ns() - started)
            if batch.frees:
                # no in-place I/O that looked a freed cluster up may still be running when
                # the cluster is handed out again
                with self._lock:
                    states = list(self._states.values())
                for state in states:
                    with state.frozen():
                        pass
            with self._lock:
                self._allocator.recycle(batch.frees)

    def close(self) -> None:
        """Stop the background commit, flush, and release every device. Open ``Volume``
        handles fail afterwards."""
        if self._closed:
            return
        self._stop.set()
        self._wake.set()  # the committer may be waiting out COMMIT_INTERVAL
        self._committer.join()
        try:
            with self._health:
                failure = self._sync_failure
            if failure is None:
                self.flush()
                if self.cache is not None and any(b.remote for b in self._backings.values()):
                    try:
                        self.cache.destage_all()  # the lease goes with the bucket up to date
                    except IOFailure as e:  # the lease stays: the bucket is behind the cache
                        log.warning("pool %s: closed before the cache destaged: %s", self.name, e)
            else:  # the next open replays the changes made after the failure (see _sync_failed)
                log.warning("pool %s: closed without a commit: a sync failed", self.name)
        finally:
            self._syncs.put(None)  # a stalled sync ends its thread when it returns
            self._io_threads.close()
            with self._commit_lock, self._lock:  # a flush of another thread: before or never
                self._closed = True
                for state in self._states.values():
                    state.closed = True
                self._states.clear()
                self._catalog.close()
                self._journal.close()
                if self.cache is not None:
                    self.cache.close()
                for backing in self._backings.values():
                    backing.close()

    def has_open_volumes(self) -> bool:
        """Whether any handle on a volume or snapshot of this pool is open."""
        with self._lock:
            return any(state.handles > 0 for state in self._states.values())

    def destroy(self) -> None:
        """Close the pool, erase the headers of its devices and delete the files it created.
        The catalog directory is left to the caller (``Home.delete_pool``)."""
        created = {i for (i,) in self._catalog.query("SELECT idx FROM devices WHERE created")}
        cache = self.cache
        self.close()
        if cache is not None:
            wipe_device(cache.path)
        for backing in self._backings.values():
            try:
                fd = os.open(backing.path, os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                continue  # a vanished device has nothing to erase
            try:
                backing.fd = fd
                backing.wipe_header()
            finally:
                backing.close()
            if backing.index in created:
                os.unlink(backing.path)

    @property
    def metadata_writes(self) -> int:
        """Catalog rows written since the pool was opened (a diagnostic: it shows how much
        metadata an operation really writes)."""
        with self._commit_lock:
            return self._catalog.changes

    def _commit_loop(self) -> None:
        # Only pending metadata needs the timer (DESIGN.md: metadata commits at least every
        # second). In-place overwrites are the volatile cache's to lose until the next flush
        # or FUA, so they cost no background sync, also when allocations keep metadata coming.
        while not self._stop.is_set():
            self._wake.wait(COMMIT_INTERVAL)
            self._wake.clear()
            if self._reads_here and not any(b.reads_here for b in self._backings.values()):
                self._publish_reads()
            if self._batch and not self._stop.is_set() and self._sync_failure is None:
                try:
                    self._commit(full=False)
                except StorvisorError as e:
                    log.error("pool %s: background commit failed: %s", self.name, e)

    def _publish_reads(self) -> None:
        """The devices need no longer see every read: the planes read directly again."""
        with self._lock:
            self._reads_here = False
            for state in self._states.values():
                state.reads_here = False
                for plane in state.planes:
                    state.publish_io(plane)

    def _check_open(self) -> None:
        if self._closed:
            raise StateError(f"pool {self.name!r} is closed")

    # ------------------------------------------------------------------------- volumes

    def create_volume(self, name: str, size: int) -> VolumeInfo:
        """Create an empty thin volume of ``size`` bytes (a positive multiple of 512).
        Durable when this returns. Raises ``InvalidArgument`` or ``Conflict`` (name taken)."""
        check_name(name, "volume")
        _check_size(size)
        with self._lock:
            self._check_open()
            if name in self._volumes:
                raise Conflict(f"volume {self.name}/{name} already exists")
            top = self._new_layer(None)
            self._add_volume(name, size, top, None, None)
        self.flush()
        return self.volume_info(name)

    def volumes(self) -> list[VolumeInfo]:
        with self._lock:
            return [self._volume_info(v) for v in sorted(self._volumes.values(), key=_by_name)]

    def volume_info(self, name: str) -> VolumeInfo:
        """Raises ``NotFound``."""
        with self._lock:
            return self._volume_info(self._volume(name))

    def delete_volume(self, name: str) -> None:
        """Delete a volume and all its snapshots, freeing the clusters only they use.

        Raises ``NotFound``, and ``Conflict`` if the volume or one of its snapshots has open
        handles or if a snapshot has clones (flatten or delete them first). Durable when this
        returns.
        """
        with self._lock:
            self._check_open()
            vol = self._volume(name)
            if self._busy(vol.id, any_snapshot=True):
                raise Conflict(f"volume {self.name}/{name} or one of its snapshots is open")
            for snap in self._snapshots.values():
                if snap.volume == vol.id:
                    self._check_no_clones(vol, snap)
            snaps = sorted(
                (s for s in self._snapshots.values() if s.volume == vol.id),
                key=lambda s: -s.layer,  # newest first: each is freed, not merged
            )
            del self._volumes[name]
            self._stmt("DELETE FROM volumes WHERE id = ?", vol.id)
            self._release(vol.top)
            for snap in snaps:
                del self._snapshots[snap.id]
                self._stmt("DELETE FROM snapshots WHERE id = ?", snap.id)
                self._release(snap.layer)
        self.flush()

    def extend_volume(self, name: str, size: int) -> VolumeInfo:
        """Grow a volume online; open handles see the new size at once. Raises
        ``InvalidArgument`` when ``size`` is smaller than the current size."""
        _check_size(size)
        with self._lock:
            self._check_open()
            vol = self._volume(name)
            if size < vol.size:
                raise InvalidArgument(
                    f"volume {self.name}/{name} is {vol.size} bytes; shrinking is not supported"
                )
            vol.size = size
            self._stmt("UPDATE volumes SET size = ? WHERE id = ?", size, vol.id)
            state = self._states.get((vol.id, None))
            if state is not None:
                state.set_size(size)
        self.flush()
        return self.volume_info(name)

    def open_volume(self, volume: str, snapshot: str | None = None) -> Volume:
        """A ``BlockDevice`` handle on a volume, or a read-only one on a snapshot.

        Handles to the same volume share one in-memory map view (built here on first open).
        Raises ``NotFound``.
        """
        with self._lock:
            self._check_open()
            vol = self._volume(volume)
            if snapshot is None:
                key: tuple[int, int | None] = (vol.id, None)
                top, size, read_only = vol.top, vol.size, False
            else:
                snap = self._snapshot(vol, snapshot)
                key = (vol.id, snap.id)
                top, size, read_only = snap.layer, snap.size, True
            state = self._states.get(key)
            if state is None:
                state = VolumeState(self, key, top, size, read_only, vol.serial)
                state.timeout = self.data_timeout
                state.cache_generation = 0 if self.cache is None else self.cache.lines.generation
                state.reads_here = self._reads_here
                state.view, state.homes = self._build_view(top, homes=not read_only)
                self._states[key] = state
            state.handles += 1
            label = f"{self.name}/{volume}" + ("" if snapshot is None else f"@{snapshot}")
            return Volume(state, label)

    # ------------------------------------------------------------------ snapshots, clones

    def create_snapshot(self, volume: str, snapshot: str) -> SnapshotInfo:
        """Freeze the volume's current data under ``snapshot``: O(1), online. Writes completed
        before the call are in the snapshot, writes issued after it returns are not, writes in
        flight meanwhile may be either. Durable when this returns. Waits for the volume's
        reads and writes in flight, without holding the pool's lock (``_volume_frozen``).
        Raises ``NotFound``, ``InvalidArgument``, ``Conflict`` (name taken)."""
        check_name(snapshot, "snapshot")
        with self._volume_frozen(volume) as (vol, state):
            if any(s.volume == vol.id and s.name == snapshot for s in self._snapshots.values()):
                raise Conflict(f"snapshot {self.name}/{volume}@{snapshot} already exists")
            snap = _SnapRec(self._take_id(), vol.id, snapshot, vol.top, vol.size, time.time())
            self._snapshots[snap.id] = snap
            self._stmt(
                "INSERT INTO snapshots VALUES (?, ?, ?, ?, ?, ?)",
                snap.id,
                snap.volume,
                snap.name,
                snap.layer,
                snap.size,
                snap.created,
            )
            vol.top = self._new_layer(vol.top)
            self._stmt("UPDATE volumes SET top = ? WHERE id = ?", vol.top, vol.id)
            if state is not None:
                state.set_top(vol.top)  # every view entry now belongs to a parent: copy-on-write
                state.homes = {}  # ...and the new top has placed nothing yet
            info = self._snapshot_info(vol, snap)
        self.flush()
        return info

    @contextlib.contextmanager
    def _volume_frozen(self, volume: str) -> Iterator[tuple[_VolumeRec, VolumeState | None]]:
        """Hold the pool lock with the volume's record and its open state (None when no
        handle is open), frozen: no in-place read or write of it runs, here or in a data
        plane, until the block ends.

        The wait for the I/O in flight comes first, without the pool lock: a stalled device
        then holds up this caller alone, never the pool's other management calls (nor,
        through ``Home.pools``, every pool's). A volume opened, reopened or closed
        meanwhile has another state by the time the lock is taken: the state it has then is
        drained in its turn. Raises ``NotFound``, ``StateError`` (the pool is closed)."""
        while True:
            with self._lock:
                self._check_open()
                state = self._states.get((self._volume(volume).id, None))
            with contextlib.ExitStack() as drained:
                if state is not None:
                    drained.enter_context(state.frozen())
                with self._lock:
                    self._check_open()
                    vol = self._volume(volume)
                    if self._states.get((vol.id, None)) is state:
                        yield vol, state
                        return

    def snapshots(self, volume: str) -> list[SnapshotInfo]:
        """The volume's snapshots, oldest first. Raises ``NotFound``."""
        with self._lock:
            vol = self._volume(volume)
            snaps = sorted(
                (s for s in self._snapshots.values() if s.volume == vol.id),
                key=lambda s: (s.created, s.id),
            )
            return [self._snapshot_info(vol, s) for s in snaps]

    def delete_snapshot(self, volume: str, snapshot: str) -> None:
        """Delete a snapshot; every other snapshot and the volume keep their data.

        Its layer is merged into its only child, or kept hidden while several layers (rollback
        branches) depend on it, or freed if none does. Raises ``NotFound``, and ``Conflict`` if
        the snapshot has open handles or clones (flatten or delete them first). Durable when
        this returns.
        """
        with self._lock:
            self._check_open()
            vol = self._volume(volume)
            snap = self._snapshot(vol, snapshot)
            if self._busy(vol.id, snap.id):
                raise Conflict(f"snapshot {self.name}/{volume}@{snapshot} is open")
            self._check_no_clones(vol, snap)
            del self._snapshots[snap.id]
            self._stmt("DELETE FROM snapshots WHERE id = ?", snap.id)
            self._release(snap.layer)
        self.flush()

    def rollback(self, volume: str, snapshot: str) -> VolumeInfo:
        """Make the volume's data (and size) that of ``snapshot`` again; later snapshots stay.
        Raises ``NotFound`` and ``Conflict`` if the volume has open handles."""
        with self._lock:
            self._check_open()
            vol = self._volume(volume)
            snap = self._snapshot(vol, snapshot)
            if self._busy(vol.id):
                raise Conflict(f"volume {self.name}/{volume} is open")
            old = vol.top
            vol.top = self._new_layer(snap.layer)
            vol.size = snap.size
            self._stmt(
                "UPDATE volumes SET top = ?, size = ? WHERE id = ?", vol.top, vol.size, vol.id
            )
            self._release(old)
        self.flush()
        return self.volume_info(volume)

    def clone(self, volume: str, snapshot: str, new: str) -> VolumeInfo:
        """Create the writable volume ``new`` sharing ``snapshot``'s data copy-on-write: O(1).
        Durable when this returns. Raises ``NotFound``, ``InvalidArgument``, ``Conflict``
        (name taken)."""
        check_name(new, "volume")
        with self._lock:
            self._check_open()
            vol = self._volume(volume)
            snap = self._snapshot(vol, snapshot)
            if new in self._volumes:
                raise Conflict(f"volume {self.name}/{new} already exists")
            top = self._new_layer(snap.layer)
            self._add_volume(new, snap.size, top, f"{volume}@{snapshot}", snap.id)
        self.flush()
        return self.volume_info(new)

    def flatten(
        self, volume: str, progress: Callable[[int, int], None] | None = None
    ) -> VolumeInfo:
        """Copy every cluster the volume reads from a parent layer into its own top layer, so
        it depends on no other layer (its origin snapshot may then be deleted). Online: open
        handles keep working; allocating writes wait. Raises ``NotFound``, ``NoSpace``
        (clusters copied so far stay owned by the volume). Durable when this returns.
        ``progress(done, total)`` reports bytes copied; if it raises, the copy stops there
        (the clusters copied stay owned by the volume, which is still a clone) and the
        exception propagates."""
        handle = self.open_volume(volume)
        try:
            with self._lock:
                state = self._states[(self._volume(volume).id, None)]  # open: the handle's
            state.copy_up(progress)
            with state.frozen(), self._lock:  # drained first: see ``_volume_frozen``
                vol = self._volume(volume)
                old_parent = self._tree.cut(self._batch, vol.top)
                vol.origin = vol.origin_snap = None
                self._stmt(
                    "UPDATE volumes SET origin = NULL, origin_snap = NULL WHERE id = ?", vol.id
                )
                view, homes = self._build_view(vol.top, homes=True)
                state.rebuild(view)
                state.homes = homes
                self._release(old_parent)
        finally:
            handle.close()
        self.flush()
        return self.volume_info(volume)

    # ------------------------------------------------------------------------ cache tier

    def set_cache(
        self,
        spec: CacheSpec | None,
        mode: CacheMode,
        *,
        in_use: Callable[[str], str | None] = lambda _: None,
    ) -> PoolInfo:
        """Give the pool a cache tier on ``spec`` in ``mode``, change the mode of the one it
        has, or (``CacheMode.NONE``) detach it after destaging everything. Online: reads and
        writes wait while the cache is switched in or out. Durable when this returns.

        Raises ``InvalidArgument`` (no device given for a new cache, none to detach, a bad
        device), ``Conflict`` (another cache is attached, or the device is in use:
        ``in_use(path)`` names its user), ``NotFound``, ``IOFailure`` (the destage before a
        detach or a switch to writethrough failed: nothing changed)."""
        with self._lock:
            self._check_open()
            cache = self.cache
        if cache is None:
            if mode is CacheMode.NONE:
                raise InvalidArgument(f"pool {self.name!r} has no cache to detach")
            if spec is None:
                raise InvalidArgument("a cache device (--device PATH[:SIZE]) is needed")
            if not all(b.extensible or b.remote for b in self._backings.values()):
                raise InvalidArgument(f"pool {self.name!r} cannot take a cache")
            for backing in self._backings.values():
                backing.settle()  # the cache reads and writes the devices directly
            self.flush()
            new = Cache.attach(
                spec,
                mode,
                self.cluster_size,
                self._identity.pool_uuid,
                self._backings,
                self._cache_failed,
                in_use=in_use,
                route=False,
            )
            new.drain = self._drain_planes
            try:
                self._switch_cache(new)
                self._record_cache(new)
            except BaseException:
                self._switch_cache(None)
                new.close(clean=False)
                new.wipe_closed()
                raise
            return self.info()
        if spec is not None and os.path.realpath(spec.path) != os.path.realpath(cache.path):
            raise Conflict(
                f"pool {self.name!r} has the cache {cache.path}: detach it first (--mode none)"
            )
        if mode is cache.mode:
            return self.info()
        if mode is not CacheMode.WRITEBACK:
            self.flush_cache()  # nothing dirty remains but what comes while switching
        if mode is CacheMode.NONE:
            self._switch_cache(None, cache)
            cache.close(clean=False)
            cache.wipe_closed()
            with self._lock:
                self._stmt("DELETE FROM meta WHERE key = 'cache'")
            self.flush()
            return self.info()
        self._switch_cache(cache, mode=mode)
        self._record_cache(cache)
        return self.info()

    def ready_cache(self, mode: CacheMode) -> None:
        """Do the long waits of ``set_cache(..., mode)`` ahead, so that the caller need not
        hold its locks through them: before a cache attaches, every object of an S3 import
        is fetched (``Backing.settle``); before the cache leaves writeback, it is destaged
        (``flush_cache``). ``set_cache`` then finds little left. Raises as those do."""
        cache = self.cache
        if cache is None:
            if mode is not CacheMode.NONE:
                for backing in self._backings.values():
                    backing.settle()
        elif mode is not cache.mode and mode is not CacheMode.WRITEBACK:
            self.flush_cache()

    def flush_cache(self) -> None:
        """Flush, then wait until the cache has destaged everything written before this call
        to the backing devices (synced). Raises ``InvalidArgument`` (no cache), ``IOFailure``,
        ``StateError`` (the pool closed first)."""
        cache = self.cache
        if cache is None:
            raise InvalidArgument(f"pool {self.name!r} has no cache")
        self.flush()
        cache.destage_all()

    @contextlib.contextmanager
    def _volumes_still(self) -> Iterator[None]:
        """Every open volume quiesced and frozen until the block ends: no read or write of
        any of them in flight, here or in a data plane."""
        with self._lock:
            states = list(self._states.values())
        with contextlib.ExitStack() as stack:
            for state in states:
                state.quiesce()
                stack.callback(state.lock.release)
                stack.enter_context(state.frozen())
            yield

    def _switch_cache(
        self, new: Cache | None, old: Cache | None = None, *, mode: CacheMode | None = None
    ) -> None:
        """Route the volumes' I/O through ``new`` (None: to the devices), or change the mode
        of the cache, with no read or write in flight meanwhile. Leaving a writeback cache,
        what was written since the last destage is flushed and destaged first."""
        with self._volumes_still():
            if old is not None:
                if old.mode is CacheMode.WRITEBACK:
                    old.sync(lambda: None)
                    old.destage_all()
                old.unroute()
            if new is not None and mode is not None:
                if new.mode is CacheMode.WRITEBACK:
                    new.sync(lambda: None)
                    new.destage_all()
                new.mode = mode
            elif new is not None:
                new.route()
            with self._lock:
                self.cache = new
                self._publish_cache()

    def _reopen_cache(self, old: Cache) -> None:
        """Drop a failed cache's memory and open its device again, as after a crash: what
        its table holds (every flushed write) serves and is destaged. Raises ``IOFailure``
        (the pool stays latched)."""
        with self._lock:
            doc = self._catalog.meta().get("cache", "")
        with self._volumes_still():
            with self._lock:  # until a cache serves again, planes send everything here
                self._publish_cache(-1)
            old.close(clean=False)
            cache = self._open_cache(doc)
            with self._lock:
                self.cache = cache
                self._publish_cache()

    def _publish_cache(self, generation: int | None = None) -> None:
        """Tell every volume's planes which cache tier to use: ``generation``, by default
        the pool's cache's (-1: none may be used, send every read and write here). Call with
        the pool lock and the planes frozen."""
        if generation is None:
            generation = 0 if self.cache is None else self.cache.lines.generation
        for state in self._states.values():
            state.cache_generation = generation
            for plane in state.planes:
                state.publish_io(plane)

    def _drain_planes(self) -> None:
        """Freeze and thaw every data plane of the pool once: no write in place that one
        started before this call still runs (``Cache.drain``). Takes no lock: it runs in the
        sync thread while the flush's caller may hold the pool's lock, and a plane attached
        after the list is taken saw the cache's new epoch already."""
        states = list(self._states.values())
        planes = [plane for state in states for plane in list(state.planes)]
        for plane in planes:
            plane.freeze()
            plane.thaw()

    def cache_fds(self, generation: int) -> tuple[int, int]:
        """``(line table memfd, cache device fd)`` of the cache tier of ``generation``,
        for a data plane. Raises ``KeyError`` when the pool's cache is not that one."""
        cache = self.cache
        if cache is None or cache.lines.generation != generation or cache.fd < 0:
            raise KeyError(generation)
        return cache.lines.fd, cache.fd

    def cache_hits(self, count: int) -> None:
        """A data plane served ``count`` reads and writes from the cache itself."""
        cache = self.cache
        if cache is not None:
            cache.plane_hits += count

    def cache_failed(self, error: IOFailure) -> None:
        """A data plane's read or write of the cache device failed with ``error``."""
        cache = self.cache
        if cache is not None:
            cache.fail(error)

    def _record_cache(self, cache: Cache) -> None:
        with self._lock:
            doc = json.dumps({"path": cache.path, "mode": cache.mode.value})
            self._stmt("INSERT OR REPLACE INTO meta VALUES ('cache', ?)", doc)
        self.flush()

    def _open_cache(self, doc: str) -> Cache:
        try:
            fields = json.loads(doc)
            path, mode = str(fields["path"]), CacheMode(fields["mode"])
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptMetadata(f"pool {self.name!r}: unreadable cache record {doc!r}") from e
        cache = Cache.open(
            path,
            mode,
            self.cluster_size,
            self._identity.pool_uuid,
            self._backings,
            self._cache_failed,
        )
        cache.drain = self._drain_planes
        return cache

    def _cache_failed(self, error: IOFailure) -> None:
        self._latch(error, f"the cache device failed: {error}")

    def cache_info(self) -> CacheInfo | None:
        """The cache tier's figures, with every hit the data planes served so far (each is
        asked for those it has not told yet, ``_PLANE_HITS_WAIT`` at most in all)."""
        cache = self.cache
        if cache is None:
            return None
        with self._lock:
            planes = [plane for state in self._states.values() for plane in state.planes]
        asked = [plane.ask_hits() for plane in planes]
        deadline = time.monotonic() + _PLANE_HITS_WAIT
        for answered in asked:
            answered.wait(max(0.0, deadline - time.monotonic()))
        return cache.info()

    # ------------------------------------------------------------------------------ fsck

    def fsck(self) -> FsckReport:
        """Check the committed metadata (after a flush) against itself and the devices.

        Reports clusters marked used that no map references (leaked), clusters referenced more
        often than their refcount (doubly owned, including references to clusters not marked
        used), references beyond a device's end or to missing layers (dangling), and other
        inconsistencies (cycles, orphaned layers, bad device headers). When no change is
        pending it also checks that the in-memory metadata equals the committed one (what a
        restart would load). Changes nothing.
        """
        self.flush()
        with self._commit_lock:
            with self._lock:
                devices = {i: b.clusters for i, b in self._backings.items()}
                headers = {i: (b.path, b.fd) for i, b in self._backings.items()}
                memory: Memory | None = None
                if not self._batch:
                    memory = Memory(
                        layers={lid: layer.parent for lid, layer in self._tree.layers.items()},
                        owned={lid: layer.owned for lid, layer in self._tree.layers.items()},
                        maps={
                            (lid, vc): phys
                            for lid, layer in self._tree.layers.items()
                            for vc, phys in layer.map.items()
                        },
                        volumes={v.name: (v.size, v.top) for v in self._volumes.values()},
                        snapshots={
                            s.id: (s.volume, s.name, s.layer) for s in self._snapshots.values()
                        },
                    )
            return check_pool(self.name, self._catalog, devices, headers, self._identity, memory)

    # ----------------------------------------------------- internals used by VolumeState

    def phys_at(self, fd: int, offset: int) -> int:
        """The physical cluster number of the byte ``offset`` of backing fd ``fd``."""
        for index, backing in self._backings.items():
            if backing.fd == fd:
                return phys_number(index, offset // self.cluster_size - 1)
        raise KeyError(fd)

    def backing_fds(self) -> dict[int, int]:
        """Backing device index -> its open fd (for data planes, which read and write
        clusters at ``(local + 1) * cluster_size``)."""
        return {index: b.fd for index, b in dict(self._backings).items()}

    def backing_fd(self, index: int) -> int:
        """The open fd of backing device ``index`` (no lock taken). Raises ``KeyError``."""
        return self._backings[index].fd

    def backing_marks(self, index: int) -> tuple[int, int] | None:
        """``Backing.marks`` of device ``index`` (no lock taken). Raises ``KeyError``."""
        return self._backings[index].marks()

    def locate(self, phys: int) -> tuple[int, int]:
        """The backing fd and byte offset of a physical cluster."""
        index, local = split_phys(phys)
        backing = self._backings[index]
        return backing.fd, backing.offset(local)

    def allocate(self, pos: int = 0, anchor: int | None = None) -> int:
        """A free cluster for position ``pos`` of a virtual group placed from ``anchor``
        (see ``Allocator.allocate``); call with the pool lock held. Raises ``NoSpace``."""
        return self._allocator.allocate(pos, anchor)

    def unallocate(self, phys: int) -> None:
        """Give back a cluster from ``allocate`` that was never published."""
        with self._lock:
            self._allocator.unallocate(phys)

    def set_entry(self, layer_id: int, vc: int, value: int | None) -> None:
        """Map ``vc`` of a layer to a cluster, to ``ZERO``, or to nothing (None), releasing
        the cluster it mapped before. Call with the pool lock held, and only after a cluster
        newly allocated for ``value`` holds its data: the next commit syncs it."""
        self._tree.set_entry(self._batch, layer_id, vc, value)
        if value is not None and value >= 0:
            self._fresh.append(value)
        self._seq += 1
        self._journal.append(self._seq, layer_id, vc, UNMAPPED if value is None else value)
        if self._seq - self._committed_seq > RECORDS // 2:
            self._wake.set()

    @property
    def lock(self) -> threading.RLock:
        return self._lock

    def layer_has_parent(self, layer_id: int) -> bool:
        return self._tree[layer_id].parent is not None

    def drop_state(self, state: VolumeState) -> None:
        with self._lock:
            state.handles -= 1
            if state.handles <= 0 and self._states.get(state.key) is state:
                del self._states[state.key]

    # ------------------------------------------------------------------------ internals

    def _replay(self) -> int:
        """Apply the journal's records after the last commit to the catalog (see journal.py)
        and return the number the next record follows. Runs before ``_load``."""
        cat = self._catalog
        committed = int(cat.meta().get("journal_seq", "0"))
        newest = max(committed, self._journal.newest())
        tree = LayerTree(self.name)
        tree.load(
            cat.query("SELECT id, parent FROM layers"), cat.query("SELECT layer, vc, phys FROM map")
        )
        used = {phys for (phys,) in cat.query("SELECT phys FROM refcount")}
        batch = Batch()
        replayed = skipped = 0
        # a writeback cache loses unflushed writes in a crash: mappings to them must go too
        volatile = self.cache is not None and self.cache.mode is CacheMode.WRITEBACK
        for _, lid, vc, value in [] if volatile else self._journal.pending(committed):
            layer = tree.layers.get(lid)
            if layer is None:  # made by a management operation that never committed
                skipped += 1
                continue
            old = layer.map.get(vc)
            if value >= 0 and value != old and (value in used or not self._holds(value)):
                log.error(
                    "pool %s: journal names cluster %#x that is not free; ignored", self.name, value
                )
                skipped += 1
                continue
            tree.set_entry(batch, lid, vc, None if value == UNMAPPED else value)
            if old is not None and old >= 0 and old != value:
                used.discard(old)
            if value >= 0:
                used.add(value)
            replayed += 1
        if replayed:
            for backing in self._backings.values():
                backing.sync()  # the clusters the records name are only in the page cache
        if newest != committed:
            batch.statements.append(_journal_seq_statement(newest))
            cat.apply(batch)
        if replayed or skipped:
            log.warning(
                "pool %s: %d map changes the last process made after its last commit were "
                "recovered from the journal (%d ignored)",
                self.name,
                replayed,
                skipped,
            )
        self._journal.start()
        return newest

    def _holds(self, phys: int) -> bool:
        index, local = split_phys(phys)
        backing = self._backings.get(index)
        return backing is not None and local < backing.clusters

    def _build_view(
        self, top: int, *, homes: bool
    ) -> tuple[dict[int, tuple[int, int, int]], dict[int, int]]:
        """The merged view of ``top``'s chain and, with ``homes``, the placement anchors of
        ``top``'s virtual groups (``VolumeState.homes``)."""
        chain = list(self._tree.chain(top))
        view: dict[int, tuple[int, int, int]] = {}
        zero_entry: dict[int, tuple[int, int, int]] = {}
        for layer in reversed(chain):
            zero = zero_entry.setdefault(layer.id, (-1, 0, layer.id))
            for vc, phys in layer.map.items():
                if phys == ZERO:
                    view[vc] = zero
                else:
                    fd, offset = self.locate(phys)
                    view[vc] = (fd, offset, layer.id)
        anchors: dict[int, int] = {}
        if homes:
            shift, mask = self.group.bit_length() - 1, self.group - 1
            for vc, phys in chain[0].map.items():
                if phys >= 0:
                    anchors[vc >> shift] = phys - (vc & mask)
        return view, anchors

    def _new_layer(self, parent: int | None) -> int:
        return self._tree.new(self._batch, self._take_id(), parent)

    def _add_volume(
        self, name: str, size: int, top: int, origin: str | None, origin_snap: int | None
    ) -> None:
        rec = _VolumeRec(
            self._take_id(),
            name,
            size,
            top,
            origin,
            origin_snap,
            uuid.uuid4().hex[:20],
            time.time(),
        )
        self._volumes[name] = rec
        self._stmt(
            "INSERT INTO volumes VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            rec.id,
            rec.name,
            rec.size,
            rec.top,
            rec.origin,
            rec.origin_snap,
            rec.serial,
            rec.created,
        )

    def _release(self, lid: int | None) -> None:
        self._tree.release(self._batch, lid, self._layer_named)

    def _layer_named(self, lid: int) -> bool:
        return any(v.top == lid for v in self._volumes.values()) or any(
            s.layer == lid for s in self._snapshots.values()
        )

    def _busy(self, vid: int, snap: int | None = None, *, any_snapshot: bool = False) -> bool:
        return any(
            state.handles > 0 and key[0] == vid and (any_snapshot or key[1] == snap)
            for key, state in self._states.items()
        )

    def _check_no_clones(self, vol: _VolumeRec, snap: _SnapRec) -> None:
        clones = sorted(v.name for v in self._volumes.values() if v.origin_snap == snap.id)
        if clones:
            raise Conflict(
                f"snapshot {self.name}/{vol.name}@{snap.name} has clones "
                f"({', '.join(clones)}): flatten or delete them first"
            )

    def _volume(self, name: str) -> _VolumeRec:
        vol = self._volumes.get(name)
        if vol is None:
            raise NotFound(f"no volume {self.name}/{name}")
        return vol

    def _snapshot(self, vol: _VolumeRec, name: str) -> _SnapRec:
        for snap in self._snapshots.values():
            if snap.volume == vol.id and snap.name == name:
                return snap
        raise NotFound(f"no snapshot {self.name}/{vol.name}@{name}")

    def _volume_info(self, vol: _VolumeRec) -> VolumeInfo:
        owned = self._tree.owned(vol.top)
        return VolumeInfo(
            self.name,
            vol.name,
            vol.size,
            owned * self.cluster_size,
            vol.origin,
            vol.serial,
            vol.created,
        )

    def _snapshot_info(self, vol: _VolumeRec, snap: _SnapRec) -> SnapshotInfo:
        clones = tuple(sorted(v.name for v in self._volumes.values() if v.origin_snap == snap.id))
        return SnapshotInfo(self.name, vol.name, snap.name, snap.size, snap.created, clones)

    def _take_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def _stmt(self, sql: str, *params: object) -> None:
        self._batch.statements.append((sql, params))

    def __repr__(self) -> str:
        return f"<Pool {self.name} {self.directory}>"


@dataclass
class _SyncJob:
    work: Callable[[], None]
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


def _sync_all(backings: Iterable[Backing]) -> None:
    for backing in backings:
        backing.sync()


def _sync_fresh(backings: dict[int, Backing], fresh: list[int]) -> None:
    """Make the clusters ``fresh`` (physical numbers) durable (``Backing.sync_clusters``)."""
    by_device: dict[int, list[int]] = {}
    for phys in fresh:
        index, local = split_phys(phys)
        by_device.setdefault(index, []).append(local)
    for index, clusters in by_device.items():
        backings[index].sync_clusters(clusters)


def _device_bytes_statement(backing: Backing) -> tuple[str, tuple[str, str]]:
    """Record the size of a device, which ``Pool.open`` checks it still has."""
    size = (backing.clusters + 1) * backing.cluster_size
    return (
        "INSERT OR REPLACE INTO meta VALUES (?, ?)",
        (f"device_bytes.{backing.index}", str(size)),
    )


def _check_lengths(name: str, catalog: Catalog, backings: dict[int, Backing]) -> None:
    """Raise ``CorruptMetadata`` if a device is shorter than the size recorded for it (when
    it was added or grown): its missing end is never read as data. A catalog that records
    no size (a pool made before sizes were recorded) is not checked here; fsck reports a
    reference past a device's end."""
    meta = catalog.meta()
    for index, backing in backings.items():
        size = (backing.clusters + 1) * backing.cluster_size
        recorded = int(meta.get(f"device_bytes.{index}", "0"))
        if size < recorded:
            raise CorruptMetadata(
                f"pool {name!r}: backing device {backing.path} is shorter than recorded "
                f"({size} bytes, {recorded} expected)"
            )


def _journal_seq_statement(seq: int) -> tuple[str, tuple[str]]:
    return ("INSERT OR REPLACE INTO meta VALUES ('journal_seq', ?)", (str(seq),))


MAX_VOLUME_SIZE = 1 << 60
"""1 EiB: far beyond any device, and well inside the signed 64-bit integers that the catalog,
NBD (sizes and offsets) and virtio-blk (sectors) carry."""


def _check_size(size: int) -> None:
    if not isinstance(size, int) or size <= 0 or size % 512:
        raise InvalidArgument(f"invalid volume size {size}: a positive multiple of 512 is needed")
    if size > MAX_VOLUME_SIZE:
        raise InvalidArgument(f"invalid volume size {size}: at most 1 EiB ({MAX_VOLUME_SIZE})")


def _by_name(vol: _VolumeRec) -> str:
    return vol.name
