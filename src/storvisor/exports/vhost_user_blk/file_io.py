"""Positioned vectored I/O on a raw file for the virtio-blk requests of a queue."""

from __future__ import annotations

import errno
import os

from storvisor.engine.device import FileDevice
from storvisor.errors import IOFailure

_IOV_MAX = 1024
"""Buffers per ``preadv``/``pwritev`` call (Linux's ``UIO_MAXIOV``)."""


class _FileVectors:
    """``blk.VectoredIO`` over a raw file: one ``preadv``/``pwritev`` for all the buffers of
    a request (a guest's 1 MiB request usually comes in many)."""

    def __init__(self, device: FileDevice) -> None:
        self._device = device

    def read_into(self, offset: int, views: list[memoryview]) -> None:
        fd = self._device.fd
        while views:
            try:
                n = os.preadv(fd, views if len(views) <= _IOV_MAX else views[:_IOV_MAX], offset)
            except OSError as e:
                raise IOFailure(f"preadv failed: {e.strerror}", e.errno or errno.EIO) from e
            if n == 0:  # past the end of a file that shrank: the rest reads as zeros
                for view in views:
                    view[:] = bytes(len(view))
                return
            if len(views) == 1 and n == len(views[0]):
                return
            offset += n
            views = _advance(views, n)

    def write(self, offset: int, views: list[memoryview], *, fua: bool) -> None:
        fd = self._device.fd
        while views:
            try:
                n = os.pwritev(fd, views if len(views) <= _IOV_MAX else views[:_IOV_MAX], offset)
            except OSError as e:
                raise IOFailure(f"pwritev failed: {e.strerror}", e.errno or errno.EIO) from e
            if n == 0:
                raise IOFailure("pwritev wrote nothing", errno.EIO)
            if len(views) == 1 and n == len(views[0]):
                break
            offset += n
            views = _advance(views, n)
        if fua:
            self._device.flush()


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """What is left of ``views`` once ``n`` bytes of them are done."""
    i = 0
    while i < len(views) and n >= len(views[i]):
        n -= len(views[i])
        i += 1
    rest = views[i:]
    if n and rest:
        rest[0] = rest[0][n:]
    return rest
