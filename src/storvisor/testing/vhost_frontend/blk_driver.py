"""A virtio-blk driver over the front-end's queues: requests of every type, their data split
over several descriptors, in indirect tables, or straddling two regions."""

from __future__ import annotations

from storvisor.errors import ProtocolError
from storvisor.protocols.virtio import blk
from storvisor.protocols.virtio.blk import RequestType, Status
from storvisor.testing.vhost_frontend.driver_ring import DriverQueue, Segment
from storvisor.testing.vhost_frontend.guest_memory import GuestRam


class BlkDriver:
    """virtio-blk requests on ``queues`` (the front-end's list: queues laid out later are
    used too), buffers carved from ``memory`` (rewound whenever nothing is in flight).
    Each request method returns the virtio-blk status."""

    def __init__(self, memory: GuestRam, queues: list[DriverQueue]) -> None:
        self.memory = memory
        self.queues = queues

    def submit(
        self,
        rtype: int,
        sector: int = 0,
        *,
        out: bytes = b"",
        in_len: int = 0,
        queue: int = 0,
        segments: int = 1,
        indirect: bool = False,
        across: bool = False,
        kick: bool = True,
    ) -> tuple[int, int, int]:
        """Submit one request; returns ``(head, data gpa, status gpa)``.

        ``out`` is device-readable data after the header, ``in_len`` device-writable bytes
        before the status; the data is split into ``segments`` descriptors; with ``across``
        the data buffer straddles two GPA-adjacent regions.
        """
        memory = self.memory
        header = memory.alloc(16)
        memory.write(header, blk.VIRTIO_BLK_OUTHDR.pack(rtype, 0, sector))
        length = len(out) or in_len
        data = (
            memory.alloc_across(length) if across else (memory.alloc(length, 512) if length else 0)
        )
        if out:
            memory.write(data, out)
        elif in_len:
            memory.write(data, b"\xee" * in_len)
        status = memory.alloc(1)
        memory.write(status, b"\xff")
        pieces = _split(data, length, segments) if length else []
        readable = [(header, 16)] + (pieces if out else [])
        writable = ([] if out else pieces) + [(status, 1)]
        head = self.queues[queue].submit(readable, writable, indirect=indirect, kick=kick)
        return head, data, status

    def wait(self, queue: int, head: int) -> int:
        """Wait until ``head`` completes on ``queue``; return its ``used.len``."""
        length = self.queues[queue].wait(head)
        if all(not q.chains for q in self.queues):
            self.memory.rewind()
        return length

    def request(
        self,
        rtype: int,
        sector: int = 0,
        *,
        out: bytes = b"",
        in_len: int = 0,
        queue: int = 0,
        segments: int = 1,
        indirect: bool = False,
        across: bool = False,
    ) -> tuple[int, bytes, int]:
        """Submit, wait; returns ``(status, data read, used.len)``."""
        head, data, status = self.submit(
            rtype,
            sector,
            out=out,
            in_len=in_len,
            queue=queue,
            segments=segments,
            indirect=indirect,
            across=across,
        )
        used_len = self.wait(queue, head)
        got = self.memory.read(data, in_len) if in_len else b""
        return self.memory.read(status, 1)[0], got, used_len

    def read(
        self,
        offset: int,
        length: int,
        *,
        queue: int = 0,
        segments: int = 1,
        indirect: bool = False,
        across: bool = False,
    ) -> tuple[int, bytes]:
        """virtio-blk IN at byte ``offset`` (a multiple of 512); ``(status, data)``.

        Raises ``ProtocolError`` if a successful read reports a ``used.len`` other than
        data + 1.
        """
        status, data, used_len = self.request(
            RequestType.IN,
            offset >> 9,
            in_len=length,
            queue=queue,
            segments=segments,
            indirect=indirect,
            across=across,
        )
        if status == Status.OK and used_len != length + 1:
            raise ProtocolError(f"IN: used.len {used_len}, expected {length + 1}")
        return status, data

    def write(
        self,
        offset: int,
        data: bytes,
        *,
        queue: int = 0,
        segments: int = 1,
        indirect: bool = False,
        across: bool = False,
    ) -> int:
        """virtio-blk OUT; returns the status (``ProtocolError`` if used.len is not 1)."""
        status, _, used_len = self.request(
            RequestType.OUT,
            offset >> 9,
            out=data,
            queue=queue,
            segments=segments,
            indirect=indirect,
            across=across,
        )
        if used_len != 1:
            raise ProtocolError(f"OUT: used.len {used_len}, expected 1")
        return status

    def flush(self, *, queue: int = 0) -> int:
        status, _, _ = self.request(RequestType.FLUSH, queue=queue)
        return status

    def get_id(self, length: int = 20, *, queue: int = 0) -> tuple[int, bytes]:
        """GET_ID into a ``length``-byte buffer; ``(status, bytes the device wrote)``."""
        status, data, used_len = self.request(RequestType.GET_ID, in_len=length, queue=queue)
        return status, data[: max(0, used_len - 1)]

    def discard(self, ranges: list[tuple[int, int, int]], *, queue: int = 0) -> int:
        """DISCARD ``[(sector, num_sectors, flags)]``; returns the status."""
        return self._ranges(RequestType.DISCARD, ranges, queue)

    def write_zeroes(self, ranges: list[tuple[int, int, int]], *, queue: int = 0) -> int:
        """WRITE_ZEROES ``[(sector, num_sectors, flags)]`` (flag 1 = may unmap)."""
        return self._ranges(RequestType.WRITE_ZEROES, ranges, queue)

    def _ranges(self, rtype: int, ranges: list[tuple[int, int, int]], queue: int) -> int:
        out = b"".join(blk.VIRTIO_BLK_DISCARD_WRITE_ZEROES.pack(*r) for r in ranges)
        status, _, _ = self.request(rtype, out=out, queue=queue)
        return status


def _split(addr: int, length: int, parts: int) -> list[Segment]:
    parts = max(1, min(parts, length))
    step = length // parts
    out = []
    for i in range(parts):
        n = step if i + 1 < parts else length - step * (parts - 1)
        out.append((addr + i * step, n))
    return out
