"""The vectored I/O of a block device: every buffer of a request in one call.

A request of a guest or of the kernel often comes in many buffers (a 1 MiB virtio-blk
request, a TCMU command whose data blocks are not contiguous in the data area). Through
``BlockDevice`` each buffer is one call with its own checks and mapping lookups, or the
buffers are gathered into one copy first; a ``blk.VectoredIO`` takes them all at once and
moves them with as few ``preadv``/``pwritev`` as the layout allows (``engine.pio``).
``vectors_of`` gives the one a device has: a raw file's, a data plane's volume's, or that of
the volume under its I/O counters and QoS throttle.
"""

from __future__ import annotations

from storvisor.engine.device import BlockDevice, FileDevice
from storvisor.engine.iostats import CountedDevice
from storvisor.engine.pio import preadv_full, pwritev_full
from storvisor.engine.qos import ThrottledDevice
from storvisor.exports.dataplane import RemoteVolume
from storvisor.protocols.virtio.blk import VectoredIO


def vectors_of(device: BlockDevice) -> VectoredIO | None:
    """The vectored I/O of ``device``, or None when it has none (buffer by buffer then)."""
    if type(device) is FileDevice:  # a subclass may override read_into and write
        return FileVectors(device)
    if isinstance(device, RemoteVolume | ThrottledDevice | CountedDevice):
        return device.vectors
    return None


class FileVectors:
    """``blk.VectoredIO`` over a raw file: one ``preadv``/``pwritev`` for all the buffers of
    a request."""

    def __init__(self, device: FileDevice) -> None:
        self._device = device

    def read_into(self, offset: int, views: list[memoryview]) -> None:
        preadv_full(self._device.fd, views, offset, zeros_at_eof=True)  # a file that shrank

    def write(self, offset: int, views: list[memoryview], *, fua: bool) -> None:
        pwritev_full(self._device.fd, views, offset)
        if fua:
            self._device.flush()
