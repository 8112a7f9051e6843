"""Creating, importing and opening pools whose home is an S3 bucket.

An S3 pool is an ordinary ``Pool`` over one ``ObjectBacking`` (``engine/object_backing.py``):
the catalog and journal stay in ``HOME/pools/NAME`` as for every pool, with ``s3.json`` (the
bucket and this HOME's lease identity) and ``data`` (the local image) beside them.

*Create* checks the bucket before anything is written: it must exist, answer with the given
credentials and hold no object at all (a bucket with another storvisor pool, or anything
else, is refused). It then takes the lease (a PUT that fails if a lease exists), creates the
pool locally, flushes it (the header object and the catalog reach the bucket) and writes the
marker ``storvisor/pool.json`` last. On failure every object it wrote and the local directory
are removed.

*Import* (another HOME, "the other host") reads the marker, takes the lease (refused while
another host holds it, unless ``force``), downloads the catalog, records which data objects
the bucket holds, and opens the pool over a new sparse local image at once: the objects are
fetched into it in the background, and on demand before a read or write touches one
(``engine/hydration.py``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sqlite3
import threading
import uuid
from pathlib import Path

from storvisor.engine import hydration
from storvisor.engine.backing import create_synced, sync_directory
from storvisor.engine.object_backing import (
    DATA_NAME,
    Imported,
    ObjectBacking,
    S3Config,
    acquire,
    attacher,
    listed_digests,
    opener,
)
from storvisor.engine.pool import Pool
from storvisor.engine.s3 import (
    CATALOG_KEY,
    DEFAULT_OBJECT_SIZE,
    LEASE_KEY,
    MARKER_KEY,
    Bucket,
    S3Spec,
    new_owner,
)
from storvisor.engine.types import BackingSpec
from storvisor.errors import Conflict, CorruptMetadata, InvalidArgument, NotFound, StorvisorError

log = logging.getLogger(__name__)

DEFAULT_S3_SIZE = 1 << 40
"""Bytes of a new S3 pool's byte space (sparse: only what is written is stored)."""


def create(
    directory: Path,
    name: str,
    spec: S3Spec,
    *,
    size: int | None = None,
    object_size: int | None = None,
    cluster_size: int | None = None,
) -> Pool:
    """Create pool ``name`` in bucket ``spec.bucket``. Raises ``NotFound`` (no bucket),
    ``InvalidArgument`` (credentials refused, bad sizes), ``IOFailure`` (no endpoint
    answers), ``Conflict`` (the bucket is not empty). Leaves nothing behind on failure."""
    from storvisor.engine.pool import DEFAULT_CLUSTER, check_cluster_size

    cs = DEFAULT_CLUSTER if cluster_size is None else cluster_size
    check_cluster_size(cs)
    osz = DEFAULT_OBJECT_SIZE if object_size is None else object_size
    if osz <= 0 or osz % cs:
        raise InvalidArgument(
            f"the object size ({osz}) must be a multiple of the cluster size ({cs})"
        )
    size = DEFAULT_S3_SIZE if size is None else size
    if size < 2 * osz:
        raise InvalidArgument(f"an S3 pool needs at least two objects ({2 * osz} bytes)")
    size -= size % osz
    bucket = Bucket(spec)
    try:
        return _create(directory, name, bucket, size, osz, cs)
    except BaseException:
        bucket.close()
        raise


def _create(directory: Path, name: str, bucket: Bucket, size: int, osz: int, cs: int) -> Pool:
    spec = bucket.spec
    bucket.check_bucket()
    if not bucket.is_empty():
        marker = bucket.get(MARKER_KEY)
        if marker is not None:
            raise Conflict(
                f"bucket {spec.bucket!r} holds the storvisor pool "
                f"{_marker_name(marker[0])!r} (use 'pool import')"
            )
        raise Conflict(f"bucket {spec.bucket!r} is not empty: it holds other data")
    owner = new_owner()
    lease = bucket.take_lease(owner, None)
    pool: Pool | None = None
    try:
        attach = attacher(bucket, lease, osz, directory / "catalog.db")
        pool = Pool.create(
            directory, name, [BackingSpec(str(directory / DATA_NAME), size)], cs, attach=attach
        )
        S3Config(spec, owner, lease.epoch, osz).save(directory)
        sync_directory(directory)
        pool.flush()
        record = {"uuid": _pool_uuid(directory), "name": name, "object_size": osz, "size": size}
        bucket.put(MARKER_KEY, json.dumps(record).encode())
    except BaseException:
        if pool is not None:
            with contextlib.suppress(StorvisorError):
                pool.close()
        shutil.rmtree(directory, ignore_errors=True)
        with contextlib.suppress(StorvisorError):
            for key, _ in list(bucket.keys()):
                bucket.delete(key)
        raise
    return pool


def import_(directory: Path, name: str, spec: S3Spec, *, force: bool = False) -> Pool:
    """Open the pool stored in ``spec.bucket`` on this HOME as ``name`` (its own name).
    Raises ``NotFound`` (no bucket, or no pool in it), ``Conflict`` (another host holds the
    lease and not ``force``; or the pool has another name), ``InvalidArgument``,
    ``IOFailure``. Leaves no local state behind on failure."""
    bucket = Bucket(spec)
    try:
        return _import(directory, name, bucket, force)  # the pool owns the bucket now
    except BaseException:
        bucket.close()
        raise


def _import(directory: Path, name: str, bucket: Bucket, force: bool) -> Pool:
    spec = bucket.spec
    bucket.check_bucket()
    marker = bucket.get(MARKER_KEY)
    if marker is None:
        raise NotFound(f"bucket {spec.bucket!r} holds no storvisor pool")
    stored = _marker_name(marker[0])
    if stored != name:
        raise InvalidArgument(f"bucket {spec.bucket!r} holds pool {stored!r}, not {name!r}")
    osz = int(json.loads(marker[0])["object_size"])
    lease = bucket.lease()
    if lease is not None and lease.held and not force:
        raise Conflict(
            f"bucket {spec.bucket!r}: pool {name!r} is in use on another host "
            f"({lease.describe()}); release it there, or use --force if that host is gone"
        )
    owner = new_owner()
    taken = bucket.take_lease(owner, lease)
    directory.mkdir(parents=True)
    try:
        catalog = bucket.get(CATALOG_KEY)
        if catalog is None:
            raise CorruptMetadata(f"bucket {spec.bucket!r} holds no catalog")
        db = directory / "catalog.db"
        with open(db, "wb") as f:
            f.write(catalog[0])
            f.flush()
            os.fsync(f.fileno())
        data = directory / DATA_NAME
        with contextlib.closing(sqlite3.connect(db)) as con, con:
            con.execute("UPDATE devices SET path = ?", (str(data),))
            con.execute("DELETE FROM meta WHERE key = 'cache'")  # the other host's device
            (bytes_,) = con.execute(
                "SELECT value FROM meta WHERE key = 'device_bytes.0'"
            ).fetchone()
        fd = os.open(data, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, int(bytes_))
            os.fsync(fd)
        finally:
            os.close(fd)
        etags = listed_digests(bucket)
        hydration.prepare(directory, etags)
        S3Config(spec, owner, taken.epoch, osz, clean=True).save(directory)
        for parent in (directory, directory.parent):
            sync_directory(parent)
        return open_(directory, name, Imported(bucket, taken, etags))
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise


def open_(directory: Path, name: str, imported: Imported | None = None) -> Pool:
    """Open an S3 pool this HOME holds (``Pool.open`` with the object backing; ``imported``:
    what ``import_`` just downloaded), and flush it before anything can allocate: the
    catalog a replayed journal committed reaches the bucket before a cluster it frees can be
    handed out again. (An import has no journal: the bucket holds its catalog already.)
    Raises ``CorruptMetadata`` for a pool whose deletion did not finish."""
    if erasing(directory):
        raise CorruptMetadata(
            f"pool {name!r}: its deletion did not finish (its bucket may still hold objects):"
            " delete it again"
        )
    pool = Pool.open(directory, name, open_backing=opener(directory, imported))
    if imported is not None:
        return pool
    try:
        pool.flush()
    except BaseException:
        pool.close()
        raise
    return pool


ERASING_NAME = "erasing"
"""The file in a pool's directory that says its deletion has begun: its local image may be
gone already, and its bucket is erased next. Such a pool never opens again (``open_``
refuses it): a deletion that stopped half way is finished by deleting it again."""


def begin_erasure(directory: Path) -> None:
    """Record, durably, that the S3 pool in ``directory`` is being deleted (before anything
    of it is destroyed)."""
    create_synced(directory / ERASING_NAME)


def erasing(directory: Path) -> bool:
    """Whether a deletion of the S3 pool in ``directory`` began and did not finish."""
    return (directory / ERASING_NAME).exists()


def erase(directory: Path) -> None:
    """Delete every object of the bucket of the S3 pool in ``directory``, which this HOME
    held last and has just closed: the lease is taken back first (``Conflict`` if another
    host took it meanwhile: then nothing is deleted) and deleted last."""
    config = S3Config.load(directory)
    bucket = Bucket(config.spec)
    try:
        acquire(bucket, config, directory)
        for key, _ in list(bucket.keys()):
            if key != LEASE_KEY:
                bucket.delete(key)
        bucket.delete(LEASE_KEY)
    finally:
        bucket.close()


def add_endpoint(pool: Pool, url: str) -> None:
    """Serve ``pool``'s bucket through ``url`` too, online, once it answers for the bucket;
    recorded in ``s3.json``. Raises ``InvalidArgument`` (not an S3 pool), ``Conflict``
    (listed already), ``NotFound``/``IOFailure`` (it does not serve the bucket)."""
    bucket = object_backing(pool).bucket
    bucket.add_endpoint(url)  # the check of the endpoint takes up to the pool's timeout
    _save_spec(pool.directory, bucket)


def remove_endpoint(pool: Pool, url: str) -> None:
    """Stop using ``url`` for ``pool``, online; recorded in ``s3.json``. Raises
    ``InvalidArgument`` (not an S3 pool), ``NotFound`` (not listed), ``Conflict`` (the last
    one)."""
    bucket = object_backing(pool).bucket
    bucket.remove_endpoint(url)
    _save_spec(pool.directory, bucket)


_spec_lock = threading.Lock()


def _save_spec(directory: Path, bucket: Bucket) -> None:
    """Record the bucket's endpoints as they are now: one save at a time, each of the spec
    read under the lock, so that of two changes made at once neither is lost."""
    with _spec_lock:
        config = S3Config.load(directory)
        S3Config(bucket.spec, config.owner, config.epoch, config.object_size).save(directory)


def object_backing(pool: Pool) -> ObjectBacking:
    """The object backing of an S3 pool (for tests and stats). Raises ``InvalidArgument``."""
    backing = pool._backings.get(0)
    if not isinstance(backing, ObjectBacking):
        raise InvalidArgument(f"pool {pool.name!r} is not an S3 pool")
    return backing


def _pool_uuid(directory: Path) -> str:
    with contextlib.closing(sqlite3.connect(directory / "catalog.db")) as con:
        (value,) = con.execute("SELECT value FROM meta WHERE key = 'uuid'").fetchone()
    return str(uuid.UUID(value))


def _marker_name(raw: bytes) -> str:
    try:
        return str(json.loads(raw)["name"])
    except (ValueError, KeyError, TypeError) as e:
        raise Conflict("the bucket holds a malformed storvisor marker") from e
