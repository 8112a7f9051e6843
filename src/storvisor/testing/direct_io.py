"""Reads and writes of a block device (or a file) that bypass the page cache (``O_DIRECT``),
for tests that check what a device holds rather than a cached copy of it. The buffers are
anonymous mappings, so they meet ``O_DIRECT``'s alignment; offsets and lengths must be
multiples of the device's logical block size."""

from __future__ import annotations

import mmap
import os


def read_direct(path: str, offset: int, length: int) -> bytes:
    """``length`` bytes of ``path`` at ``offset``, read around the page cache."""
    buf = mmap.mmap(-1, length)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.preadv(fd, [buf], offset) == length
    finally:
        os.close(fd)
    return bytes(buf)


def write_direct(path: str, offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` of ``path`` around the page cache, then ``fsync``."""
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [buf], offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)
