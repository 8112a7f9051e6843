"""Backing devices of a pool: regular files or block devices (LUNs) that hold clusters.

Theory of operation
-------------------
A backing device is cut into clusters of the pool's cluster size. Device cluster 0 holds the
header; data clusters follow, so data cluster ``n`` of a device lives at byte
``(n + 1) * cluster_size``. The header lets a LUN identify itself whatever its path::

    offset  size  field
    0       8     magic b"STORVSR1"
    8       4     format version (1), little-endian
    12      4     device index within the pool
    16      4     cluster size in bytes
    20      16    pool uuid
    36      64    pool name, UTF-8, NUL-padded

Pool-wide physical cluster numbers put the device index in the high bits
(``index << PHYS_SHIFT | n``), so a device can grow without renumbering any other device.

Syncing part of a device
------------------------
``sync`` is an ``fdatasync``: it writes back every dirty page of the device. A pool that only
needs the clusters it allocated since its last commit to be durable (so that the metadata
pointing at them may commit) uses ``sync_clusters`` instead, which leaves the rest of the
dirty pages, in-place overwrites that no flush asked for yet, to the page cache:

1. ``sync_file_range(WAIT_BEFORE | WRITE | WAIT_AFTER)`` over each run of those clusters
   writes their pages to the device and waits for the writes to complete. On a file system
   this also allocates their blocks, a change to the file's metadata in the running journal
   transaction.
2. One ``pwritev2(RWF_DSYNC)`` rewrites the last 512 bytes of the header (padding, written back
   unchanged). Linux makes such a write durable with ``fdatasync`` limited to its range
   (``vfs_fsync_range``): ext4 and XFS then commit the journal up to the file's latest
   data-relevant metadata change, which includes the block allocations of step 1, and flush the
   device's write cache, which makes the writes step 1 completed durable. On a block device it
   is the cache flush.

That reasoning holds for block devices, ext4 and XFS; on any other file system
``sync_clusters`` is a plain ``fdatasync``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from storvisor.engine.device import LIBC
from storvisor.engine.probe import find_signature, wipe_signatures
from storvisor.engine.types import BackingInfo, BackingKind, BackingSpec, EndpointInfo
from storvisor.errors import Conflict, CorruptMetadata, InvalidArgument, IOFailure, NotFound

MAGIC = b"STORVSR1"
VERSION = 1
HEADER = struct.Struct("<8sIII16s64s")
HEADER_BYTES = 4096
PHYS_SHIFT = 40
LOCAL_MASK = (1 << PHYS_SHIFT) - 1
STAMP_BYTES = 512
"""The header's last bytes, padding, rewritten with ``RWF_DSYNC`` by ``sync_clusters``."""
RANGED_FILESYSTEMS = frozenset({"ext4", "xfs"})
"""File systems whose ranged ``fdatasync`` commits the whole file's block allocations."""
_SYNC_FILE_RANGE = 1 | 2 | 4  # SYNC_FILE_RANGE_WAIT_BEFORE | _WRITE | _WAIT_AFTER


@dataclass(frozen=True, slots=True)
class Header:
    """The identity a backing device carries in its first cluster."""

    index: int
    cluster_size: int
    pool_uuid: uuid.UUID
    pool_name: str

    def pack(self) -> bytes:
        name = self.pool_name.encode()[:64]
        raw = HEADER.pack(MAGIC, VERSION, self.index, self.cluster_size, self.pool_uuid.bytes, name)
        return raw + bytes(HEADER_BYTES - len(raw))

    @classmethod
    def unpack(cls, raw: bytes) -> Header | None:
        """The header in ``raw``, or None when the magic is absent (a blank device)."""
        if len(raw) < HEADER.size:
            return None
        magic, version, index, cluster_size, pool_uuid, name = HEADER.unpack_from(raw)
        if magic != MAGIC:
            return None
        if version != VERSION:
            raise CorruptMetadata(f"unsupported backing header version {version}")
        return cls(index, cluster_size, uuid.UUID(bytes=pool_uuid), name.rstrip(b"\0").decode())


class Backing:
    """One open backing device. ``clusters`` counts data clusters (the header excluded).

    ``remote``: its syncs reach a remote store, bounded by that store's own timeouts rather
    than the pool's I/O timeout."""

    remote = False

    extensible = True
    """Whether the pool may add devices beside this one (not beside an S3 bucket's)."""

    def __init__(
        self, path: str, fd: int, kind: BackingKind, index: int, cluster_size: int
    ) -> None:
        self.path = path
        self.fd = fd
        self.kind = kind
        self.index = index
        self.cluster_size = cluster_size
        self.clusters = _device_bytes(fd) // cluster_size - 1
        self.ranged = kind is BackingKind.BLOCK or _filesystem(fd) in RANGED_FILESYSTEMS
        """Whether ``sync_clusters`` may sync less than the whole device."""
        self.on_change: Callable[[], None] = _nothing
        """Called (from a thread holding no lock of the pool's) when ``reads_here`` turned
        false; set by the pool."""
        self._stamp = os.pread(fd, STAMP_BYTES, HEADER_BYTES - STAMP_BYTES)

    @classmethod
    def attach(cls, spec: BackingSpec, header: Header) -> tuple[Backing, bool]:
        """Prepare ``spec`` (creating or growing a sparse file when it has a size), check it is
        blank or a stale member of no pool, and write ``header``.

        A device or file that existed before is probed for signatures (``engine.probe``):
        one found makes this raise ``Conflict`` naming it, unless ``spec.force``, which
        erases them. The device is probed before anything is written to it (a file is grown
        to ``spec.size`` only after the probe).

        Returns the device and whether its file was created here. Raises ``Conflict`` if the
        device carries another pool's header (or this pool's) or a foreign signature,
        ``NotFound`` if it does not exist and no size was given, ``InvalidArgument`` if it is
        too small, ``ProbeUnavailable`` if util-linux's probe is missing.
        """
        fd, created = _open_spec(spec)
        try:
            found = _read_header(fd, spec.path)
            if found is not None:
                raise Conflict(
                    f"{spec.path} belongs to pool {found.pool_name!r} ({found.pool_uuid})"
                )
            if not created:
                signature = find_signature(spec.path)
                if signature is not None and not spec.force:
                    raise Conflict(
                        f"{spec.path} holds {signature.describe()} (use --force to overwrite it)"
                    )
                if signature is not None:
                    wipe_signatures(spec.path)
            grow = spec.size is not None and _kind(fd) is BackingKind.FILE
            if grow and spec.size is not None and _device_bytes(fd) < spec.size:
                try:
                    os.ftruncate(fd, spec.size)
                except OSError as e:
                    raise IOFailure(
                        f"cannot grow {spec.path}: {e.strerror}", e.errno or errno.EIO
                    ) from e
            kind = _kind(fd)
            if _device_bytes(fd) < 2 * header.cluster_size:
                raise InvalidArgument(
                    f"{spec.path} is too small: at least two clusters of "
                    f"{header.cluster_size} bytes are needed"
                )
            _write_header(fd, header.pack(), spec.path)
            if created:
                sync_directory(os.path.dirname(os.path.abspath(spec.path)))
        except BaseException:
            os.close(fd)
            if created:
                os.unlink(spec.path)
            raise
        return cls(spec.path, fd, kind, header.index, header.cluster_size), created

    @classmethod
    def open(cls, path: str, expected: Header) -> Backing:
        """Open a member of a pool and check its header. Raises ``NotFound`` if the path is
        gone and ``CorruptMetadata`` if it carries another identity."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError as e:
            raise NotFound(f"backing device {path} is missing") from e
        except OSError as e:
            raise IOFailure(f"cannot open {path}: {e.strerror}", e.errno or errno.EIO) from e
        try:
            found = _read_header(fd, path)
        except BaseException:
            os.close(fd)
            raise
        if found is None or (found.pool_uuid, found.index) != (expected.pool_uuid, expected.index):
            os.close(fd)
            raise CorruptMetadata(
                f"{path} is not device {expected.index} of pool {expected.pool_name!r}"
            )
        return cls(path, fd, _kind(fd), expected.index, expected.cluster_size)

    def info(self) -> BackingInfo:
        return BackingInfo(self.path, self.kind, self.clusters * self.cluster_size)

    def offset(self, local: int) -> int:
        """Byte offset of data cluster ``local``."""
        return (local + 1) * self.cluster_size

    def grow(self, size: int) -> None:
        """Grow a regular file to ``size`` bytes (never shrinks)."""
        if self.kind is not BackingKind.FILE:
            raise InvalidArgument(f"{self.path} is a block device; it cannot be resized here")
        if size > _device_bytes(self.fd):
            try:
                os.ftruncate(self.fd, size)
            except OSError as e:
                raise IOFailure(
                    f"cannot grow {self.path}: {e.strerror}", e.errno or errno.EIO
                ) from e
        self.clusters = _device_bytes(self.fd) // self.cluster_size - 1

    def sync(self) -> None:
        """Make written data durable (``fdatasync``)."""
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            raise IOFailure(f"fdatasync {self.path}: {e.strerror}", e.errno or errno.EIO) from e

    def sync_clusters(self, clusters: Iterable[int]) -> None:
        """Make the data of data clusters ``clusters`` durable, with the file system's record
        of their blocks, and leave the device's other dirty pages to the page cache (see the
        module docstring). Raises ``IOFailure``."""
        if not self.ranged:
            self.sync()
            return
        cs = self.cluster_size
        try:
            for first, count in runs(clusters):
                _sync_file_range(self.fd, self.offset(first), count * cs)
            os.pwritev(self.fd, [self._stamp], HEADER_BYTES - STAMP_BYTES, os.RWF_DSYNC)
        except OSError as e:
            raise IOFailure(f"sync of {self.path}: {e.strerror}", e.errno or errno.EIO) from e

    def endpoints(self) -> tuple[EndpointInfo, ...]:
        """The S3 endpoints behind this device (none for a local device)."""
        return ()

    @property
    def hydrating(self) -> tuple[int, int] | None:
        """``(objects still to fetch, objects the import found)`` of an object backing whose
        image is not whole yet; None for every other device."""
        return None

    def marks(self) -> tuple[int, int] | None:
        """``(fd, object size)`` of a memfd with one byte per ``object size`` bytes of the
        device, which a data plane sets to 1 for every such stretch its write in place touched,
        before the write is acknowledged (an object backing uploads what they mark); None:
        in-place writes need no mark. The fd stays the backing's."""
        return None

    @property
    def reads_here(self) -> bool:
        """Reads must be made by the pool's process, through ``pio`` (an object backing
        still fetching objects into its image): data planes send theirs, and their writes,
        to it. Turns false by itself (then ``on_change`` is called), never true again."""
        return False

    def opened(self) -> None:
        """The pool is open: start background work (an object backing's fetches)."""

    def settle(self) -> None:
        """Make the device whole before a cache tier reads and writes it directly (an
        object backing fetches every object still missing). Raises ``IOFailure``."""

    def committed(self, changed: bool) -> None:
        """Called after each commit of the pool's catalog (``changed``: the commit wrote a
        batch). A local device has nothing to do; an object backing uploads the catalog."""

    def catalog_upload(self, changed: bool) -> Callable[[], None]:
        """``committed`` to be run later, with the catalog as it is now (a writeback cache
        runs it once the data the catalog points at is destaged)."""
        return lambda: self.committed(changed)

    def wipe_header(self) -> None:
        """Erase the header so the device may join a pool again."""
        _write_header(self.fd, bytes(HEADER_BYTES), self.path)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _nothing() -> None:
    pass


def runs(clusters: Iterable[int]) -> Iterator[tuple[int, int]]:
    """The runs of consecutive numbers in ``clusters`` as (first, count), in order."""
    first = count = 0
    for n in sorted(set(clusters)):
        if count and n == first + count:
            count += 1
            continue
        if count:
            yield first, count
        first, count = n, 1
    if count:
        yield first, count


def _sync_file_range(fd: int, offset: int, length: int) -> None:
    ret = LIBC.sync_file_range(
        ctypes.c_int(fd),
        ctypes.c_int64(offset),
        ctypes.c_int64(length),
        ctypes.c_uint(_SYNC_FILE_RANGE),
    )
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _filesystem(fd: int) -> str:
    """The type of the file system ``fd`` lives on, from /proc/self/mountinfo ("" if not
    found, as for btrfs, whose files carry a device number no mount shows)."""
    st = os.fstat(fd)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 2 and fields[2] == dev and "-" in fields:
                    return fields[fields.index("-") + 1]
    except OSError:
        pass
    return ""


def phys_number(index: int, local: int) -> int:
    return index << PHYS_SHIFT | local


def split_phys(phys: int) -> tuple[int, int]:
    return phys >> PHYS_SHIFT, phys & LOCAL_MASK


def _open_spec(spec: BackingSpec) -> tuple[int, bool]:
    created = False
    flags = os.O_RDWR | os.O_CLOEXEC
    try:
        if spec.size is not None:
            if spec.size <= 0:
                raise InvalidArgument(f"backing size must be positive, not {spec.size}")
            try:
                fd = os.open(spec.path, flags | os.O_CREAT | os.O_EXCL, 0o600)
                created = True
            except FileExistsError:
                fd = os.open(spec.path, flags)
            if created:
                os.ftruncate(fd, spec.size)  # an existing file grows after its probe
        else:
            fd = os.open(spec.path, flags)
    except FileNotFoundError as e:
        raise NotFound(f"no such backing device: {spec.path}") from e
    except OSError as e:
        raise IOFailure(f"cannot open {spec.path}: {e.strerror}", e.errno or errno.EIO) from e
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        os.close(fd)
        raise InvalidArgument(f"{spec.path} is neither a regular file nor a block device")
    return fd, created


def _kind(fd: int) -> BackingKind:
    return BackingKind.BLOCK if stat.S_ISBLK(os.fstat(fd).st_mode) else BackingKind.FILE


def _device_bytes(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


def _read_header(fd: int, path: str) -> Header | None:
    try:
        return Header.unpack(os.pread(fd, HEADER_BYTES, 0))
    except OSError as e:
        raise IOFailure(f"cannot read {path}: {e.strerror}", e.errno or errno.EIO) from e


def sync_directory(path: str | os.PathLike[str]) -> None:
    """fsync a directory so that the names created in it survive a machine crash.

    Raises ``IOFailure`` if the directory cannot be opened or synced."""
    _open_and_sync(path, os.O_RDONLY | os.O_DIRECTORY, "sync directory")


def create_synced(path: Path) -> None:
    """Create the empty file ``path`` (if it is missing) so that it survives a machine crash:
    the file, then its directory, synced. Raises ``IOFailure``."""
    _open_and_sync(path, os.O_WRONLY | os.O_CREAT, "create")
    sync_directory(path.parent)


def _open_and_sync(path: str | os.PathLike[str], flags: int, what: str) -> None:
    try:
        fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise IOFailure(f"cannot {what} {path}: {e.strerror}", e.errno or errno.EIO) from e


def _write_header(fd: int, raw: bytes, path: str) -> None:
    try:
        os.pwrite(fd, raw, 0)
        os.fsync(fd)
    except OSError as e:
        raise IOFailure(
            f"cannot write the header of {path}: {e.strerror}", e.errno or errno.EIO
        ) from e
