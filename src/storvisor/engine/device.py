"""The block-device contract every layer and every export speaks.

A ``BlockDevice`` is a byte-addressed disk of fixed (but extendable) size. Volumes, snapshots,
clones, cached and throttled devices all implement it; exports (NBD, vhost-user-blk) serve any
of them. ``storvisor.testing.conformance.check_block_device`` is the executable form of this
contract: every implementation must pass it.

Contract, for every method:

* Offsets and lengths are in bytes; ``0 <= offset`` and ``offset + length <= size``, else
  ``IOFailure(errno.EINVAL)`` for reads/discards and ``IOFailure(errno.ENOSPC)`` for
  writes/zeroes, the errors NBD expects. Requests need not be aligned.
* A write on a read-only device raises ``IOFailure(errno.EPERM)``.
* Durability is that of a disk with a volatile write cache: a completed ``write`` may be lost
  by a crash until a later ``flush`` completes, or unless it was issued with ``fua=True``.
* ``discard`` is a hint that may free space; afterwards the range reads as zeros (storvisor
  guarantees this, so that NBD's TRIM and virtio-blk's DISCARD are deterministic).
* ``write_zeroes`` makes the range read as zeros; ``may_unmap`` lets it free space.
* Methods may be called concurrently from several threads; each call is atomic with respect
  to metadata, and concurrent writes to overlapping ranges land in some order.
* Failures raise ``IOFailure`` (with an errno) and leave the device usable.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import ParamSpec, Protocol, TypeVar, runtime_checkable

from storvisor.engine.pio import preadv_full, pwritev_full
from storvisor.errors import IOFailure, NotFound

Buffer = bytes | bytearray | memoryview
"""Bytes a write takes (``collections.abc.Buffer`` is Python 3.12+)."""

_P = ParamSpec("_P")
_T = TypeVar("_T")
LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
"""The C library, for the calls ``os`` lacks (``fallocate`` modes, ``sync_file_range``)."""


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of bytes with one allocation state, as ``block_status`` reports it.

    ``allocated`` is False for a hole (no storage behind it in this device or any parent);
    ``zero`` is True when the range is known to read as zeros.
    """

    offset: int
    length: int
    allocated: bool
    zero: bool


@runtime_checkable
class BlockDevice(Protocol):
    """What exports need from a volume handle. See the module docstring for the contract."""

    @property
    def size(self) -> int:
        """Current size in bytes (may grow by an online extend)."""

    @property
    def read_only(self) -> bool: ...

    @property
    def block_size(self) -> int:
        """Preferred I/O granularity in bytes (a power of two, at least 512)."""

    def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` entirely with the bytes at ``offset``."""

    def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        """Write ``data`` at ``offset``; with ``fua`` it is durable when this returns.
        ``data`` is not referenced after this returns (callers reuse the buffer)."""

    def flush(self) -> None:
        """Make every write completed before this call durable (data and metadata)."""

    def discard(self, offset: int, length: int) -> None:
        """Free the range if possible; it reads as zeros afterwards."""

    def write_zeroes(
        self, offset: int, length: int, *, may_unmap: bool = True, fua: bool = False
    ) -> None:
        """Make the range read as zeros."""

    def block_status(self, offset: int, length: int) -> list[Extent]:
        """Describe ``[offset, offset+length)`` as contiguous extents, in order, no gaps.

        The extents cover the request exactly (the last may be cut at ``length``); at least
        one extent is returned for a non-empty range.
        """

    def close(self) -> None:
        """Release the handle; further calls are errors. Does not imply ``flush``."""


class DeviceWrapper:
    """The parts of a ``BlockDevice`` that a wrapper around ``inner`` passes through as they
    are: its geometry, serial and block status. A subclass (QoS throttling, I/O counting)
    defines the requests it acts on, and ``close``."""

    def __init__(self, inner: BlockDevice) -> None:
        self.inner = inner

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def read_only(self) -> bool:
        return self.inner.read_only

    @property
    def block_size(self) -> int:
        return self.inner.block_size

    @property
    def serial(self) -> str:
        return str(getattr(self.inner, "serial", ""))

    def block_status(self, offset: int, length: int) -> list[Extent]:
        return self.inner.block_status(offset, length)


def check_range(device: BlockDevice, offset: int, length: int, *, writing: bool) -> None:
    """Raise the contract's ``IOFailure`` if the request does not fit the device."""
    if offset < 0 or length < 0:
        raise IOFailure(f"negative offset or length ({offset}, {length})", errno.EINVAL)
    if offset + length > device.size:
        code = errno.ENOSPC if writing else errno.EINVAL
        raise IOFailure(
            f"request [{offset}, {offset + length}) beyond end of device ({device.size})", code
        )
    if writing and device.read_only:
        raise IOFailure("device is read-only", errno.EPERM)


class FileDevice:
    """A raw regular file or block device as a ``BlockDevice`` (no thin map).

    Used as a backing device by the engine and as a stand-in export target. Holes in a sparse
    regular file are reported through ``SEEK_DATA``/``SEEK_HOLE``; discard punches holes
    (``fallocate(PUNCH_HOLE)``) where the filesystem supports it, and otherwise writes zeros.
    """

    def __init__(self, path: str, *, read_only: bool = False, block_size: int = 512) -> None:
        try:
            self._fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        except FileNotFoundError as e:
            raise NotFound(f"no such file: {path}") from e
        except OSError as e:
            raise IOFailure(f"cannot open {path}: {e.strerror}", e.errno or errno.EIO) from e
        self.path = path
        self._read_only = read_only
        self._block_size = block_size
        self._is_block = stat.S_ISBLK(os.fstat(self._fd).st_mode)
        self._size = os.lseek(self._fd, 0, os.SEEK_END)
        self._lock = threading.Lock()

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def block_size(self) -> int:
        return self._block_size

    def read_into(self, offset: int, buf: memoryview) -> None:
        n = len(buf)
        if offset < 0 or offset + n > self._size:
            check_range(self, offset, n, writing=False)
        preadv_full(self._fd, [buf], offset, zeros_at_eof=True)  # a file that shrank

    def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        view = memoryview(data).cast("B")
        check_range(self, offset, len(view), writing=True)
        pwritev_full(self._fd, [view], offset)
        if fua:
            self.flush()

    def flush(self) -> None:
        _io(os.fdatasync, self._fd)

    def discard(self, offset: int, length: int) -> None:
        check_range(self, offset, length, writing=True)
        self._zero(offset, length)

    def write_zeroes(
        self, offset: int, length: int, *, may_unmap: bool = True, fua: bool = False
    ) -> None:
        check_range(self, offset, length, writing=True)
        self._zero(offset, length)
        if fua:
            self.flush()

    def _zero(self, offset: int, length: int) -> None:
        if length == 0:
            return
        if not self._is_block:
            try:
                punch = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
                _fallocate(self._fd, punch, offset, length)
                return
            except OSError:
                pass
        chunk = bytes(min(length, 1 << 20))
        done = 0
        while done < length:
            n = min(len(chunk), length - done)
            self.write(offset + done, memoryview(chunk)[:n])
            done += n

    def block_status(self, offset: int, length: int) -> list[Extent]:
        check_range(self, offset, length, writing=False)
        end = offset + length
        if self._is_block or length == 0:
            return [Extent(offset, length, allocated=True, zero=False)]
        extents: list[Extent] = []
        pos = offset
        while pos < end:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise IOFailure(f"SEEK_DATA failed: {e.strerror}", e.errno or errno.EIO) from e
                data = end
            if data > pos:
                hole_end = min(data, end)
                extents.append(Extent(pos, hole_end - pos, allocated=False, zero=True))
                pos = hole_end
                continue
            hole = min(os.lseek(self._fd, pos, os.SEEK_HOLE), end)
            extents.append(Extent(pos, hole - pos, allocated=True, zero=False))
            pos = hole
        return extents

    def resize(self, size: int) -> None:
        """Grow a regular file to ``size`` bytes (online extend of a raw device)."""
        if self._is_block:
            raise IOFailure("cannot resize a block device", errno.EOPNOTSUPP)
        with self._lock:
            _io(os.ftruncate, self._fd, size)
            self._size = size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _io(func: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """Call an ``os`` I/O function, translating ``OSError`` to ``IOFailure``."""
    try:
        return func(*args, **kwargs)
    except OSError as e:
        raise IOFailure(f"{func.__name__} failed: {e.strerror}", e.errno or errno.EIO) from e


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)`` through libc (``os.posix_fallocate`` cannot punch holes)."""
    ret = LIBC.fallocate(
        ctypes.c_int(fd), ctypes.c_int(mode), ctypes.c_int64(offset), ctypes.c_int64(length)
    )
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
