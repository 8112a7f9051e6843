"""A ``BlockDevice`` through a vhost-user-blk back-end, for the conformance suite."""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable

from storvisor.engine.device import Buffer, Extent, check_range
from storvisor.errors import IOFailure
from storvisor.protocols.virtio import blk
from storvisor.protocols.virtio.blk import RequestType, Status, bit
from storvisor.testing.vhost_frontend.frontend import VhostUserFrontend


class FrontendBlockDevice:
    """A ``BlockDevice`` whose every call goes through a vhost-user-blk back-end, so the
    block-device conformance suite can run against an export through a real client.

    Byte ranges are widened to whole sectors (read-modify-write at unaligned edges, under a
    lock, so concurrent callers stay atomic); requests are cut to ``max_request`` bytes.
    ``block_status`` cannot be asked over virtio-blk: it reports one allocated extent.
    Errors: range errors as the contract says, a non-OK status as ``IOFailure(EIO)``.
    ``on_close`` runs after the front-end is closed (e.g. to stop the server).
    """

    def __init__(
        self,
        frontend: VhostUserFrontend,
        *,
        max_request: int = 1 << 20,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.frontend = frontend
        self.max_request = max_request
        self._on_close = on_close
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return self.frontend.capacity

    @property
    def read_only(self) -> bool:
        return bool(self.frontend.features & bit(blk.VIRTIO_BLK_F_RO))

    @property
    def block_size(self) -> int:
        return 512

    def _sectors(self, offset: int, length: int) -> tuple[int, int]:
        start = offset & ~511
        end = (offset + length + 511) & ~511
        return start, end

    def _read_aligned(self, start: int, end: int) -> bytes:
        out = bytearray()
        pos = start
        while pos < end:
            n = min(self.max_request, end - pos)
            status, data = self.frontend.blk.read(pos, n)
            if status != Status.OK:
                raise IOFailure(f"virtio-blk read failed with status {status}", errno.EIO)
            out += data
            pos += n
        return bytes(out)

    def _write_aligned(self, start: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            n = min(self.max_request, len(data) - pos)
            status = self.frontend.blk.write(start + pos, data[pos : pos + n])
            if status != Status.OK:
                raise IOFailure(f"virtio-blk write failed with status {status}", errno.EIO)
            pos += n

    def read_into(self, offset: int, buf: memoryview) -> None:
        check_range(self, offset, len(buf), writing=False)
        if not len(buf):
            return
        start, end = self._sectors(offset, len(buf))
        with self._lock:
            data = self._read_aligned(start, end)
        buf[:] = data[offset - start : offset - start + len(buf)]

    def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        view = bytes(memoryview(data).cast("B"))
        check_range(self, offset, len(view), writing=True)
        if not view:
            return
        start, end = self._sectors(offset, len(view))
        with self._lock:
            if (start, end) != (offset, offset + len(view)):
                merged = bytearray(self._read_aligned(start, end))
                merged[offset - start : offset - start + len(view)] = view
                view = bytes(merged)
            self._write_aligned(start, view)
            if fua:
                self._flush_locked()

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        status = self.frontend.blk.flush()
        if status != Status.OK:
            raise IOFailure(f"virtio-blk flush failed with status {status}", errno.EIO)

    def discard(self, offset: int, length: int) -> None:
        self._zero(RequestType.DISCARD, offset, length, 0)

    def write_zeroes(
        self, offset: int, length: int, *, may_unmap: bool = True, fua: bool = False
    ) -> None:
        self._zero(RequestType.WRITE_ZEROES, offset, length, 1 if may_unmap else 0)
        if fua:
            self.flush()

    def _zero(self, rtype: int, offset: int, length: int, flags: int) -> None:
        check_range(self, offset, length, writing=True)
        inner_start = (offset + 511) & ~511
        inner_end = (offset + length) & ~511
        if inner_end <= inner_start:  # no whole sector inside: plain zero write
            self.write(offset, bytes(length))
            return
        if inner_start > offset:
            self.write(offset, bytes(inner_start - offset))
        if offset + length > inner_end:
            self.write(inner_end, bytes(offset + length - inner_end))
        with self._lock:
            pos = inner_start
            step = 1 << 21  # sectors per request stay below max_*_sectors
            while pos < inner_end:
                n = min(step, inner_end - pos)
                segment = (pos >> 9, n >> 9, flags)
                status = (
                    self.frontend.blk.discard([segment])
                    if rtype == RequestType.DISCARD
                    else self.frontend.blk.write_zeroes([segment])
                )
                if status != Status.OK:
                    raise IOFailure(f"virtio-blk zeroing failed with status {status}", errno.EIO)
                pos += n

    def block_status(self, offset: int, length: int) -> list[Extent]:
        check_range(self, offset, length, writing=False)
        return [Extent(offset, length, allocated=True, zero=False)] if length else []

    def close(self) -> None:
        self.frontend.close()
        if self._on_close is not None:
            self._on_close()
