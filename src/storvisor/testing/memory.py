"""An in-memory ``BlockDevice``: the reference model and a real implementation for tests."""

from __future__ import annotations

import threading

from storvisor.engine.device import Buffer, Extent, check_range


class MemoryDevice:
    """A ``BlockDevice`` backed by a ``bytearray``. Tracks which 4 KiB blocks were written, so
    ``block_status`` reports holes like a thin device does."""

    GRAIN = 4096

    def __init__(self, size: int, *, read_only: bool = False, block_size: int = 512) -> None:
        self._data = bytearray(size)
        self._written: set[int] = set()
        self._read_only = read_only
        self._block_size = block_size
        self._lock = threading.Lock()
        self.flushes = 0
        self.closed = False

    @property
    def size(self) -> int:
        return len(self._data)

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def block_size(self) -> int:
        return self._block_size

    def read_into(self, offset: int, buf: memoryview) -> None:
        check_range(self, offset, len(buf), writing=False)
        buf[:] = self._data[offset : offset + len(buf)]

    def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        view = memoryview(data).cast("B")
        check_range(self, offset, len(view), writing=True)
        with self._lock:
            self._data[offset : offset + len(view)] = view
            self._mark(offset, len(view), True)

    def flush(self) -> None:
        self.flushes += 1

    def discard(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length)

    def write_zeroes(
        self, offset: int, length: int, *, may_unmap: bool = True, fua: bool = False
    ) -> None:
        check_range(self, offset, length, writing=True)
        with self._lock:
            self._data[offset : offset + length] = bytes(length)
            # whole grains inside the range become holes again
            first = -(-offset // self.GRAIN)
            last = (offset + length) // self.GRAIN
            for grain in range(first, last):
                self._written.discard(grain)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        check_range(self, offset, length, writing=False)
        extents: list[Extent] = []
        pos, end = offset, offset + length
        while pos < end:
            grain = pos // self.GRAIN
            allocated = grain in self._written
            stop = min(end, (grain + 1) * self.GRAIN)
            if extents and extents[-1].allocated == allocated:
                last = extents.pop()
                extents.append(Extent(last.offset, stop - last.offset, allocated, not allocated))
            else:
                extents.append(Extent(pos, stop - pos, allocated, not allocated))
            pos = stop
        return extents

    def resize(self, size: int) -> None:
        with self._lock:
            if size >= len(self._data):
                self._data.extend(bytes(size - len(self._data)))
            else:
                del self._data[size:]

    def close(self) -> None:
        self.closed = True

    def _mark(self, offset: int, length: int, written: bool) -> None:
        for grain in range(offset // self.GRAIN, -(-(offset + length) // self.GRAIN)):
            if written:
                self._written.add(grain)
