"""A backing device whose durable home is an S3 bucket (``engine/s3.py``).

Theory of operation
-------------------
The engine reads and writes backing devices through file descriptors, in the pool's process
and in its data planes alike (``preadv``/``pwritev`` on fds the planes receive). An object
backing keeps that: its fd is a sparse local file, ``HOME/pools/NAME/data``, the *local
image* of the pool's byte space, and the bucket is where that byte space becomes durable.
The byte space is cut into objects of ``object_size`` bytes; object ``i`` covers bytes
``[i * object_size, (i + 1) * object_size)`` and lives under ``data/%016x``; a missing object
is zeros, so a thin pool stores only what was written.

*Sync is an upload barrier.* ``sync`` (a flush) makes the local image durable, as a local
device's sync does (after a crash of the machine the image then holds at least what was
flushed, and no older bytes are ever uploaded over it), and meanwhile uploads every object
whose local bytes may differ from what the bucket holds; it returns when both are done;
``sync_clusters`` (the background commit) does the same for the objects holding the given
clusters only. An object whose local bytes are all zeros is deleted instead. Uploads run in
parallel (``UPLOAD_THREADS``).

*Which objects changed.* Every write to the image *marks* the objects it touched, after the
write and before it is acknowledged. In the pool's process the image's fd is routed
(``pio.route``) to a ``_Tracker`` that writes through a duplicate fd and then marks. Data
planes write in place through the image's fd, as they do on local devices, and mark in a
*shared* table: a memfd of one byte per object (``Backing.marks``), which they map and set
to 1 (``exports/dataplane.py``). A sync takes the marks (clears them, the shared bytes
first) and only then reads the objects to upload them, so a write that lands meanwhile marks
its object again for the next sync; marks taken by a sync that fails are put back. The
marks are the whole truth only while ``_tracked``: from an import (the image is what was
downloaded), from an open after a clean close (``S3Config.clean``, recorded at close when
the last sync uploaded everything and the lease was released; the open records the pool
dirty again before any write), and from the end of a sync that compared every object while
the tracker routed the fd. Otherwise (a new pool; an open after a crash, whose marks died
with the process; while a cache tier routes the fd and writes the image itself) a sync
compares every object holding data with the bucket by MD5: the ETags listed at open (S3's
ETag of a single-part PUT is its MD5), then those of this process's uploads. So a lost
mark costs one comparison of the written image, never an object left behind.

*Metadata.* The pool commits its catalog locally after syncing the data the batch points at
(``Pool._commit``), then calls ``committed``, which uploads a consistent copy of the
catalog (SQLite's backup API) as ``storvisor/catalog.db``. A flush therefore returns only
when the data and then the metadata are in the bucket, in the engine's commit order: the
bucket alone always holds a crash-consistent pool (data written before a completed flush,
metadata never pointing at data that was not uploaded first, freed clusters reused only
after the catalog that frees them is uploaded). If that upload fails, the flush fails, the
released clusters of that batch are not reused while the pool stays open, and the next
commit uploads the catalog again.

*Fencing.* Every upload batch and every catalog upload first checks that this host still
holds the pool's lease (``Bucket.check_lease``). Once it lost it, every later sync raises
``LeaseLost`` (an ``IOFailure``): flushes fail, nothing more reaches the bucket, and the
lease is not released at close.

Limits: the local image holds the whole written byte space (an import fetches every object
into it, in the background once the pool serves: ``engine/hydration.py``); a flush costs
O(written objects) in the marked case, O(written bytes of the image) when it compares.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import mmap
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from storvisor.engine import pio
from storvisor.engine.backing import HEADER_BYTES, Backing, Header, sync_directory
from storvisor.engine.hydration import Hydration
from storvisor.engine.s3 import (
    CATALOG_KEY,
    DATA_PREFIX,
    Bucket,
    Lease,
    LeaseLost,
    S3Spec,
    data_key,
)
from storvisor.engine.types import BackingSpec, EndpointInfo
from storvisor.errors import Conflict, CorruptMetadata, IOFailure

log = logging.getLogger(__name__)

UPLOAD_THREADS = 16
_Attach = Callable[[BackingSpec, Header], tuple[Backing, bool]]
_Open = Callable[[str, Header], Backing]
CONFIG_NAME = "s3.json"
_MARKED = b"\x01"
DATA_NAME = "data"


@dataclass(frozen=True, slots=True)
class S3Config:
    """``HOME/pools/NAME/s3.json``: the bucket, this HOME's lease identity and the epoch it
    last held, and the object size."""

    spec: S3Spec
    owner: str
    epoch: int
    object_size: int
    clean: bool = False
    """The pool was closed with every object of the local image in the bucket (and the
    image synced): the next open need not compare them. False while the pool is open."""

    def save(self, directory: Path) -> None:
        doc = {
            **self.spec.to_json(),
            "owner": self.owner,
            "epoch": self.epoch,
            "object_size": self.object_size,
            "clean": self.clean,
        }
        tmp = directory / (CONFIG_NAME + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / CONFIG_NAME)
        sync_directory(directory)  # the new epoch survives a power cut

    @classmethod
    def load(cls, directory: Path) -> S3Config:
        try:
            doc = json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8"))
            return cls(
                S3Spec.from_json(doc),
                str(doc["owner"]),
                int(doc["epoch"]),
                int(doc["object_size"]),
                doc.get("clean") is True,
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CorruptMetadata(f"{directory / CONFIG_NAME} is unreadable: {e}") from e


def is_object_pool(directory: Path) -> bool:
    return (directory / CONFIG_NAME).exists()


class _Tracker:
    """The route (``pio.route``) of the local image's fd in the pool's process: reads and
    writes go to a duplicate of the fd, once the objects they touch are in the image
    (``hydration``); a write then marks the objects it touched."""

    def __init__(
        self, fd: int, mark: Callable[[int, int], None], hydration: Hydration | None
    ) -> None:
        self.fd = os.dup(fd)
        self._mark = mark
        self._hydration = hydration

    def read(self, views: list[memoryview], offset: int) -> None:
        hydration = self._hydration
        if hydration is not None and hydration.missing:
            hydration.ensure(offset, sum(map(len, views)))
        pio.preadv_full(self.fd, views, offset)

    def write(self, views: list[memoryview], offset: int) -> None:
        length = sum(map(len, views))
        hydration = self._hydration
        if hydration is not None and hydration.missing:
            hydration.ensure(offset, length)
        try:
            pio.pwritev_full(self.fd, views, offset)
        finally:  # a failed write may have changed part of the range
            self._mark(offset, length)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ObjectBacking(Backing):
    """A backing device made durable in a bucket (module docstring). ``sync`` and
    ``sync_clusters`` raise ``IOFailure`` (``LeaseLost`` once the lease is gone).

    ``tracked``: the local image holds what the bucket holds (an import, a clean close), so
    only the objects written from now on need uploading. ``hydration``: the objects of the
    bucket not in the image yet (``engine/hydration.py``), fetched from ``opened`` on."""

    extensible = False
    remote = True

    def __init__(
        self,
        base: Backing,
        bucket: Bucket,
        lease: Lease,
        object_size: int,
        catalog_path: Path,
        uploaded: dict[int, str],
        *,
        catalog_stale: bool = False,
        tracked: bool = False,
        hydration: Hydration | None = None,
    ) -> None:
        super().__init__(base.path, base.fd, base.kind, base.index, base.cluster_size)
        self.bucket = bucket
        self.lease = lease
        self.object_size = object_size
        self._catalog_path = catalog_path
        self._uploaded = uploaded
        """Object index -> ETag (the MD5 of a single-part PUT) of what the bucket holds."""
        self._dirty: set[int] = set()
        """Objects written since they were last read for an upload (``_mark``)."""
        self._dirty_lock = threading.Lock()
        objects = max(-(-(base.clusters + 1) * base.cluster_size // object_size), 1)
        self._shared_fd = os.memfd_create("storvisor-marks", os.MFD_CLOEXEC)
        os.ftruncate(self._shared_fd, objects)
        self._shared = mmap.mmap(self._shared_fd, objects)
        """One byte per object, set to 1 by a data plane's write in place (``marks``)."""
        self._tracked = tracked
        """Every object that may differ from the bucket is in ``_dirty``: true from an
        import, a clean open, or a full comparison made while the tracker routed every
        write; false while a cache tier routes the fd instead."""
        self._hydration = hydration
        self._tracker = _Tracker(base.fd, self._mark, hydration)
        if pio.write_route(self.fd) is None:
            pio.route(self.fd, self._tracker)
        else:
            self._tracked = False
        self._sync_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="storvisor-s3")
        self._synced = True
        """The last full sync succeeded (else the lease is kept at close)."""
        self._catalog_stale = catalog_stale
        """The bucket's catalog may be older than the local one (at open: a replayed journal)."""
        self._fenced: LeaseLost | None = None
        self._zeros = bytes(object_size)
        self._snapshots = 0  # catalog copies taken by catalog_upload
        self.uploads = 0
        """Objects stored or deleted so far (for tests and stats)."""
        if hydration is not None:
            hydration.on_complete = lambda: self.on_change()

    def opened(self) -> None:
        if self._hydration is not None:
            self._hydration.start()

    @property
    def reads_here(self) -> bool:
        return self._hydration is not None and self._hydration.missing

    @property
    def hydrating(self) -> tuple[int, int] | None:
        hydration = self._hydration
        if hydration is None or hydration.done:
            return None
        return hydration.left, hydration.total

    def settle(self) -> None:
        if self._hydration is not None:
            self._hydration.finish()

    # -------------------------------------------------------------------------- syncing

    def sync(self) -> None:
        with self._sync_lock:
            self._synced = False
            fetched = self._fetched()
            local = self._pool.submit(Backing.sync, self)  # beside the uploads, not before
            try:
                self._sync_objects(None)
            finally:
                local.result()
            self._record(fetched)
            self._synced = True

    def sync_clusters(self, clusters: Iterable[int]) -> None:
        clusters = list(clusters)
        per = self.object_size // self.cluster_size
        objects = {(local + 1) // per for local in clusters}
        with self._sync_lock:
            fetched = self._fetched()
            # what Backing.sync_clusters does, without this class's sync as its fallback;
            # the whole image while objects were fetched into it (they are recorded after)
            ranged = self.ranged and not fetched
            local_sync = super().sync_clusters if ranged else lambda _: Backing.sync(self)
            local = self._pool.submit(local_sync, clusters)
            try:
                self._sync_objects(objects)
            finally:
                local.result()
            self._record(fetched)

    def _fetched(self) -> set[int]:
        """Objects fetched into the image and not recorded: a sync that begins now makes
        them durable (``engine/hydration.py``)."""
        return set() if self._hydration is None else self._hydration.fetched()

    def _record(self, fetched: set[int]) -> None:
        if self._hydration is not None:
            self._hydration.record(fetched)

    def _mark(self, offset: int, length: int) -> None:
        """Record that bytes ``[offset, offset + length)`` of the image were written; called
        after the write, before it is acknowledged."""
        if length <= 0:
            return
        first = offset // self.object_size
        last = (offset + length - 1) // self.object_size
        with self._dirty_lock:
            if first == last:
                self._dirty.add(first)
            else:
                self._dirty.update(range(first, last + 1))

    def marks(self) -> tuple[int, int] | None:
        return self._shared_fd, self.object_size

    def _take_shared(self) -> None:
        """Move the marks of the data planes' writes into ``_dirty``, each byte cleared
        before the object is read for an upload (as ``_sync_objects`` requires)."""
        shared = self._shared
        at = shared.find(_MARKED)
        if at < 0:
            return
        taken = []
        while at >= 0:
            shared[at] = 0
            taken.append(at)
            at = shared.find(_MARKED, at + 1)
        with self._dirty_lock:
            self._dirty.update(taken)

    def _watching(self) -> bool:
        """Whether the tracker routes the image's writes (put back when no route is there,
        as after a cache tier detached). While it did not, ``_tracked`` is cleared."""
        route = pio.write_route(self.fd)
        if route == self._tracker.write:
            return True
        self._tracked = False
        if route is None:
            pio.route(self.fd, self._tracker)
            return True
        return False

    def _sync_objects(self, objects: set[int] | None) -> None:
        """Upload the objects (of ``objects``; None: all) that may differ from the bucket:
        the marked ones; every one, compared by digest, unless ``_tracked``. A mark is
        cleared before its object is read, so a write that lands meanwhile marks it again;
        on failure the cleared marks are put back."""
        watching = self._watching()
        tracked = watching and self._tracked
        self._take_shared()
        with self._dirty_lock:
            if objects is None:
                taken, self._dirty = self._dirty, set()
            else:
                taken = self._dirty & objects
                self._dirty -= taken
        try:
            if tracked:
                self._upload(taken, compare=False)
                return
            wanted = objects
            if wanted is None:
                wanted = set(self._data_objects()) | set(self._uploaded)
            if self._hydration is not None:
                wanted -= self._hydration.absent()  # the bucket holds exactly those
            self._upload(wanted | taken, compare=True)
        except BaseException:
            with self._dirty_lock:
                self._dirty |= taken
            raise
        if objects is None and watching and self._watching():
            self._tracked = True  # every write since the route was in place is marked

    def committed(self, changed: bool) -> None:
        if not (changed or self._catalog_stale):
            return
        with self._sync_lock:
            self._catalog_stale = True
            self._fence()
            raw = _catalog_copy(self._catalog_path)
            self.bucket.put(CATALOG_KEY, raw)
            self._catalog_stale = False

    def catalog_upload(self, changed: bool) -> Callable[[], None]:
        """``committed`` to run later, with the catalog as it is now: a writeback cache
        (``engine/cache.py``) uploads it once the data it points at is destaged."""
        if not (changed or self._catalog_stale):
            return lambda: None
        self._catalog_stale = True
        raw = _catalog_copy(self._catalog_path)
        self._snapshots += 1
        number = self._snapshots

        def upload() -> None:
            with self._sync_lock:
                self._fence()
                self.bucket.put(CATALOG_KEY, raw)
                if number == self._snapshots:
                    self._catalog_stale = False

        return upload

    def _fence(self) -> None:
        if self._fenced is not None:
            raise LeaseLost(str(self._fenced))
        try:
            self.bucket.check_lease(self.lease)
        except LeaseLost as e:
            self._fenced = e
            raise

    def _upload(self, objects: set[int], *, compare: bool) -> None:
        if not objects and self._fenced is None:
            return
        self._fence()
        futures = [self._pool.submit(self._upload_one, i, compare) for i in sorted(objects)]
        for future in futures:
            future.result()

    def _upload_one(self, index: int, compare: bool) -> None:
        """Store object ``index`` as the image holds it (delete it if all zeros); with
        ``compare``, only if its MD5 differs from the bucket's ETag."""
        size = (self.clusters + 1) * self.cluster_size
        offset = index * self.object_size
        length = min(self.object_size, size - offset)
        if length <= 0:
            return
        buf = bytearray(length)
        # every byte or an error: a read the device cut short (an error after some pages,
        # as a file system that died returns) must never be stored as the object
        pio.preadv_full(self._tracker.fd, [memoryview(buf)], offset)
        known = self._uploaded.get(index)
        if buf == self._zeros[:length]:
            if known is not None:
                self.bucket.delete(data_key(index))
                del self._uploaded[index]
                self.uploads += 1
            return
        # an object the bucket lacks is not hashed: no digest of it can match
        if (
            compare
            and known is not None
            and known == hashlib.md5(buf, usedforsecurity=False).hexdigest()
        ):
            return
        self._uploaded[index] = self.bucket.put(data_key(index), buf)
        self.uploads += 1

    def _data_objects(self) -> Iterator[int]:
        """The objects that hold data in the local image (holes skipped)."""
        size = (self.clusters + 1) * self.cluster_size
        offset = 0
        while offset < size:
            try:
                start = os.lseek(self.fd, offset, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    return
                raise IOFailure(f"seek in {self.path}: {e.strerror}", e.errno or errno.EIO) from e
            end = min(os.lseek(self.fd, start, os.SEEK_HOLE), size)
            yield from range(start // self.object_size, (end - 1) // self.object_size + 1)
            offset = end

    # ------------------------------------------------------------------------ lifecycle

    def endpoints(self) -> tuple[EndpointInfo, ...]:
        return tuple(self.bucket.endpoints())

    def grow(self, size: int) -> None:
        raise Conflict(f"{self.path}: an S3 pool's byte space cannot grow")

    def close(self) -> None:
        if self._hydration is not None:
            self._hydration.close()
        if self.fd >= 0 and self._tracker.fd >= 0:  # Pool.destroy closes a second time
            released = False
            if self._fenced is None and self._synced and not self._catalog_stale:
                # on failure the next holder must force the lease; nothing else is lost
                with contextlib.suppress(IOFailure, Conflict):
                    self.bucket.release_lease(self.lease)
                    released = True
            self._take_shared()
            clean = released and self._watching() and self._tracked and not self._dirty
            if pio.write_route(self.fd) == self._tracker.write:
                pio.route(self.fd, None)
            self._tracker.close()
            if clean:
                self._save_clean()
        self._pool.shutdown(wait=True)
        self.bucket.close()
        if self._shared_fd >= 0:
            self._shared.close()
            os.close(self._shared_fd)
            self._shared_fd = -1
        super().close()

    def _save_clean(self) -> None:
        """Record in ``s3.json`` that the image and the bucket agree (``S3Config.clean``)."""
        directory = self._catalog_path.parent
        try:
            config = S3Config.load(directory)
            dataclasses.replace(config, clean=True).save(directory)
        except (OSError, CorruptMetadata) as e:  # the next open compares every object
            log.warning("%s: cannot record a clean close: %s", directory, e)


def listed_digests(bucket: Bucket) -> dict[int, str]:
    return {int(k[len(DATA_PREFIX) :], 16): etag for k, etag in bucket.keys(DATA_PREFIX)}


def acquire(bucket: Bucket, config: S3Config, directory: Path) -> Lease:
    """Take the lease for a HOME that held it last (``config.epoch``); save the new epoch.

    Raises ``Conflict`` when another host holds it or held it since: this HOME's copy of the
    pool is then stale and must be imported again. A lease one epoch ahead under this HOME's
    own owner is this HOME's last take, whose save a crash cut off (between the bucket's write
    and the durable save): it is this HOME's still."""
    lease = bucket.lease()
    if lease is None:
        raise CorruptMetadata(f"bucket {bucket.spec.bucket!r} has no lease")
    ours = lease.owner == config.owner and lease.epoch in (config.epoch, config.epoch + 1)
    if not ours:
        raise Conflict(
            f"bucket {bucket.spec.bucket!r}: another host took the pool ({lease.describe()}); "
            "import it again"
        )
    taken = bucket.take_lease(config.owner, lease)
    S3Config(config.spec, config.owner, taken.epoch, config.object_size).save(directory)  # dirty
    return taken


def attacher(bucket: Bucket, lease: Lease, object_size: int, catalog_path: Path) -> _Attach:
    def attach(spec: BackingSpec, header: Header) -> tuple[Backing, bool]:
        base, created = Backing.attach(spec, header)
        backing = ObjectBacking(
            base, bucket, lease, object_size, catalog_path, {}, catalog_stale=True
        )  # Pool.create commits its first catalog without a batch: the first flush uploads it
        return backing, created

    return attach


@dataclass(frozen=True, slots=True)
class Imported:
    """What an import hands to the first open: the bucket, the lease it took, the ETags of
    the objects the bucket holds (``engine/hydration.py`` fetches them into the image)."""

    bucket: Bucket
    lease: Lease
    etags: dict[int, str]


def opener(directory: Path, imported: Imported | None = None) -> _Open:
    """The ``open_backing`` of an S3 pool in ``directory``: takes the lease, lists what the
    bucket holds, opens the local image (``imported``: the lease is taken and the image
    holds the listed objects). The image is trusted to hold what the bucket holds after an
    import or a clean close (``S3Config.clean``); otherwise the first sync compares every
    object."""

    def open_backing(path: str, expected: Header) -> Backing:
        config = S3Config.load(directory)
        bucket = Bucket(config.spec) if imported is None else imported.bucket
        image = directory / DATA_NAME
        hydration = None
        try:
            if imported is None:
                lease = acquire(bucket, config, directory)
            else:
                lease = imported.lease
                dataclasses.replace(config, clean=False).save(directory)
            try:
                uploaded = listed_digests(bucket) if imported is None else imported.etags
                hydration = Hydration.load(directory, image, bucket, config.object_size)
                if hydration is not None:
                    hydration.ensure(0, HEADER_BYTES)  # Backing.open reads the header
                base = Backing.open(str(image), expected)
            except BaseException:
                bucket.release_lease(lease)
                raise
        except BaseException:
            if hydration is not None:
                hydration.close()
            bucket.close()
            raise
        return ObjectBacking(
            base,
            bucket,
            lease,
            config.object_size,
            directory / "catalog.db",
            uploaded,
            catalog_stale=imported is None,  # a replayed journal; an import downloaded it
            tracked=config.clean,
            hydration=hydration,
        )

    return open_backing


def _catalog_copy(path: Path) -> bytes:
    """A consistent copy of the committed catalog, as one database file's bytes."""
    try:
        src = sqlite3.connect(path)
        try:
            dst = sqlite3.connect(":memory:")
            try:
                src.backup(dst)
                return dst.serialize()
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.Error as e:
        raise IOFailure(f"cannot copy the catalog {path}: {e}") from e
