"""A ``BlockDevice`` over a transport that moves whole blocks only, for the conformance suite.

An initiator (a virtio-blk driver, a SCSI disk driver) reads and writes whole blocks, in
requests of a bounded size. ``AlignedBlockDevice`` turns the byte ranges of the
``BlockDevice`` contract into such requests and leaves the requests themselves to a
subclass: ``_read_request``, ``_write_request``, ``_flush_request`` and ``_zero_request``,
each one request on the wire for an aligned range no longer than the subclass allows.

* A read or write is widened to whole blocks: a write with unaligned edges reads the edge
  blocks, merges and writes them back (read-modify-write), under one lock that every
  request takes, so concurrent callers stay atomic against each other.
* Transfers are cut to ``max_request`` bytes; discard and write-zeroes to 2 MiB (4096
  sectors of 512 bytes: below every transport's limit), and their unaligned edges are
  plain writes of zeros.
* ``block_status`` is not asked (neither transport has it): one allocated extent.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable

from storvisor.engine.device import Buffer, Extent, check_range

ZERO_REQUEST = 1 << 21
"""The longest discard or write-zeroes request sent, in bytes."""


class AlignedBlockDevice(ABC):
    """The ``BlockDevice`` contract over aligned requests (see the module docstring).

    Subclasses give ``size``, ``read_only``, ``block_size``, the four ``_*_request``
    methods (called with the lock held) and ``close``. ``on_close`` is kept for them.
    Errors: range errors as the contract says; a failed request raises what its method
    raises (an ``IOFailure``)."""

    def __init__(self, *, max_request: int, on_close: Callable[[], None] | None) -> None:
        self.max_request = max_request
        self._on_close = on_close
        self._lock = threading.Lock()

    @property
    @abstractmethod
    def size(self) -> int: ...

    @property
    @abstractmethod
    def read_only(self) -> bool: ...

    @property
    @abstractmethod
    def block_size(self) -> int: ...

    # -- the transport's requests, for aligned ranges of at most max_request bytes

    @abstractmethod
    def _read_request(self, offset: int, length: int) -> bytes: ...

    @abstractmethod
    def _write_request(self, offset: int, data: bytes, fua: bool) -> None: ...

    @abstractmethod
    def _flush_request(self) -> None: ...

    @abstractmethod
    def _zero_request(self, offset: int, length: int, *, unmap: bool, discard: bool) -> None: ...

    # -- the BlockDevice contract

    def _blocks(self, offset: int, length: int) -> tuple[int, int]:
        bs = self.block_size
        return offset // bs * bs, -(-(offset + length) // bs) * bs

    def _read_aligned(self, start: int, end: int) -> bytes:
        out = bytearray()
        while start + len(out) < end:
            n = min(self.max_request, end - start - len(out))
            out += self._read_request(start + len(out), n)
        return bytes(out)

    def read_into(self, offset: int, buf: memoryview) -> None:
        check_range(self, offset, len(buf), writing=False)
        if not len(buf):
            return
        start, end = self._blocks(offset, len(buf))
        with self._lock:
            data = self._read_aligned(start, end)
        buf[:] = data[offset - start : offset - start + len(buf)]

    def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        view = bytes(memoryview(data).cast("B"))
        check_range(self, offset, len(view), writing=True)
        if not view:
            return
        start, end = self._blocks(offset, len(view))
        with self._lock:
            if (start, end) != (offset, offset + len(view)):
                merged = bytearray(self._read_aligned(start, end))
                merged[offset - start : offset - start + len(view)] = view
                view = bytes(merged)
            for pos in range(0, len(view), self.max_request):
                self._write_request(start + pos, view[pos : pos + self.max_request], fua)

    def flush(self) -> None:
        with self._lock:
            self._flush_request()

    def discard(self, offset: int, length: int) -> None:
        self._zero(offset, length, unmap=True, discard=True)

    def write_zeroes(
        self, offset: int, length: int, *, may_unmap: bool = True, fua: bool = False
    ) -> None:
        self._zero(offset, length, unmap=may_unmap, discard=False)
        if fua:
            self.flush()

    def _zero(self, offset: int, length: int, *, unmap: bool, discard: bool) -> None:
        check_range(self, offset, length, writing=True)
        bs = self.block_size
        inner_start = -(-offset // bs) * bs
        inner_end = (offset + length) // bs * bs
        if inner_end <= inner_start:  # no whole block inside: a plain write of zeros
            self.write(offset, bytes(length))
            return
        if inner_start > offset:
            self.write(offset, bytes(inner_start - offset))
        if offset + length > inner_end:
            self.write(inner_end, bytes(offset + length - inner_end))
        with self._lock:
            for pos in range(inner_start, inner_end, ZERO_REQUEST):
                n = min(ZERO_REQUEST, inner_end - pos)
                self._zero_request(pos, n, unmap=unmap, discard=discard)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        check_range(self, offset, length, writing=False)
        return [Extent(offset, length, allocated=True, zero=False)] if length else []

    @abstractmethod
    def close(self) -> None: ...
