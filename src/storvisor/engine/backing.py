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
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import uuid
from dataclasses import dataclass

from storvisor.engine.types import BackingInfo, BackingKind, BackingSpec
from storvisor.errors import Conflict, CorruptMetadata, InvalidArgument, IOFailure, NotFound

MAGIC = b"STORVSR1"
VERSION = 1
HEADER = struct.Struct("<8sIII16s64s")
HEADER_BYTES = 4096
PHYS_SHIFT = 40
LOCAL_MASK = (1 << PHYS_SHIFT) - 1


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
    """One open backing device. ``clusters`` counts data clusters (the header excluded)."""

    def __init__(
        self, path: str, fd: int, kind: BackingKind, index: int, cluster_size: int
    ) -> None:
        self.path = path
        self.fd = fd
        self.kind = kind
        self.index = index
        self.cluster_size = cluster_size
        self.clusters = _device_bytes(fd) // cluster_size - 1

    @classmethod
    def attach(cls, spec: BackingSpec, header: Header) -> tuple[Backing, bool]:
        """Prepare ``spec`` (creating or growing a sparse file when it has a size), check it is
        blank or a stale member of no pool, and write ``header``.

        Returns the device and whether its file was created here. Raises ``Conflict`` if the
        device carries another pool's header (or this pool's), ``NotFound`` if it does not
        exist and no size was given, ``InvalidArgument`` if it is too small.
        """
        fd, created = _open_spec(spec)
        try:
            found = _read_header(fd, spec.path)
            if found is not None:
                raise Conflict(
                    f"{spec.path} belongs to pool {found.pool_name!r} ({found.pool_uuid})"
                )
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

    def wipe_header(self) -> None:
        """Erase the header so the device may join a pool again."""
        _write_header(self.fd, bytes(HEADER_BYTES), self.path)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


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
            if stat.S_ISREG(os.fstat(fd).st_mode) and os.fstat(fd).st_size < spec.size:
                os.ftruncate(fd, spec.size)
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
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise IOFailure(f"cannot sync directory {path}: {e.strerror}", e.errno or errno.EIO) from e


def _write_header(fd: int, raw: bytes, path: str) -> None:
    try:
        os.pwrite(fd, raw, 0)
        os.fsync(fd)
    except OSError as e:
        raise IOFailure(
            f"cannot write the header of {path}: {e.strerror}", e.errno or errno.EIO
        ) from e
