"""Positioned vectored I/O on a raw file for the virtio-blk requests of a queue."""

from __future__ import annotations

from storvisor.engine.device import FileDevice
from storvisor.engine.pio import preadv_full, pwritev_full


class _FileVectors:
    """``blk.VectoredIO`` over a raw file: one ``preadv``/``pwritev`` for all the buffers of
    a request (a guest's 1 MiB request usually comes in many), through ``engine.pio``."""

    def __init__(self, device: FileDevice) -> None:
        self._device = device

    def read_into(self, offset: int, views: list[memoryview]) -> None:
        preadv_full(self._device.fd, views, offset, zeros_at_eof=True)  # a file that shrank

    def write(self, offset: int, views: list[memoryview], *, fua: bool) -> None:
        pwritev_full(self._device.fd, views, offset)
        if fua:
            self._device.flush()
