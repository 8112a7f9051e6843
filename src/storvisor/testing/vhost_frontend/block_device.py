"""A ``BlockDevice`` through a vhost-user-blk back-end, for the conformance suite."""

from __future__ import annotations

import errno
from collections.abc import Callable

from storvisor.errors import IOFailure
from storvisor.protocols.virtio import blk
from storvisor.protocols.virtio.blk import Status, bit
from storvisor.testing.aligned_device import AlignedBlockDevice
from storvisor.testing.vhost_frontend.frontend import VhostUserFrontend


class FrontendBlockDevice(AlignedBlockDevice):
    """A ``BlockDevice`` whose every call goes through a vhost-user-blk back-end, so the
    block-device conformance suite can run against an export through a real client.

    Byte ranges are widened to whole sectors and requests cut to ``max_request`` bytes
    (``AlignedBlockDevice``); a FUA write is a write then a flush, per request.
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
        super().__init__(max_request=max_request, on_close=on_close)
        self.frontend = frontend

    @property
    def size(self) -> int:
        return self.frontend.capacity

    @property
    def read_only(self) -> bool:
        return bool(self.frontend.features & bit(blk.VIRTIO_BLK_F_RO))

    @property
    def block_size(self) -> int:
        return 512

    def _read_request(self, offset: int, length: int) -> bytes:
        status, data = self.frontend.blk.read(offset, length)
        if status != Status.OK:
            raise IOFailure(f"virtio-blk read failed with status {status}", errno.EIO)
        return data

    def _write_request(self, offset: int, data: bytes, fua: bool) -> None:
        status = self.frontend.blk.write(offset, data)
        if status != Status.OK:
            raise IOFailure(f"virtio-blk write failed with status {status}", errno.EIO)
        if fua:
            self._flush_request()

    def _flush_request(self) -> None:
        status = self.frontend.blk.flush()
        if status != Status.OK:
            raise IOFailure(f"virtio-blk flush failed with status {status}", errno.EIO)

    def _zero_request(self, offset: int, length: int, *, unmap: bool, discard: bool) -> None:
        if discard:
            status = self.frontend.blk.discard([(offset >> 9, length >> 9, 0)])
        else:
            status = self.frontend.blk.write_zeroes([(offset >> 9, length >> 9, int(unmap))])
        if status != Status.OK:
            raise IOFailure(f"virtio-blk zeroing failed with status {status}", errno.EIO)

    def close(self) -> None:
        self.frontend.close()
        if self._on_close is not None:
            self._on_close()
