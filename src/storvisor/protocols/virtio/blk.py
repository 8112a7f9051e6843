"""virtio-blk (VIRTIO 1.x section 5.2), device side: feature bits, config space and requests.

A request is a descriptor chain: a 16-byte header ``le32 type, le32 reserved (ioprio),
le64 sector`` in device-readable memory (it may be split over several buffers), then the data
(readable for OUT/DISCARD/WRITE_ZEROES, writable for IN/GET_ID), then one status byte, which
is the last byte of the last writable buffer. Sectors are always 512 bytes.

:func:`execute` runs one request against a :class:`~storvisor.engine.device.BlockDevice`,
reading and writing guest memory in place (the ``memoryview`` s of the chain go straight to
``read_into``/``write``), writes the status byte and returns ``used.len``. Device failures
become status IOERR (or UNSUPP for an unsupported operation); a chain that cannot even hold a
header and a status byte raises :class:`~storvisor.protocols.virtio.ring.RingError`. Any other
``StorvisorError`` from the device (say ``CorruptMetadata``) also fails just that request.
"""

from __future__ import annotations

import enum
import errno
import struct
from dataclasses import dataclass
from typing import Protocol

from storvisor.engine.device import BlockDevice
from storvisor.errors import IOFailure, QueueBroken, StorvisorError
from storvisor.protocols.virtio.ring import Chain, RingError

SECTOR_SIZE = 512
SECTOR_SHIFT = 9

# Device-independent feature bits.
VIRTIO_F_NOTIFY_ON_EMPTY = 24
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34

# virtio-blk feature bits.
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14


class RequestType(enum.IntEnum):
    """``VIRTIO_BLK_T_*``."""

    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14


_IN = int(RequestType.IN)
_OUT = int(RequestType.OUT)

VIRTIO_BLK_T_BARRIER = 0x80000000
"""Legacy flag; masked off."""


class Status(enum.IntEnum):
    """``VIRTIO_BLK_S_*``: the status byte."""

    OK = 0
    IOERR = 1
    UNSUPP = 2


_OK = int(Status.OK)


VIRTIO_BLK_ID_BYTES = 20
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1

VIRTIO_BLK_OUTHDR = struct.Struct("<IIQ")
"""``le32 type, le32 ioprio, le64 sector``."""
_unpack_header = VIRTIO_BLK_OUTHDR.unpack_from
VIRTIO_BLK_DISCARD_WRITE_ZEROES = struct.Struct("<QII")
"""``le64 sector, le32 num_sectors, le32 flags``."""

VIRTIO_BLK_CONFIG = struct.Struct("<QIIHBBIBBHIBxHIIIIIBxxx")
"""The config space up to ``write_zeroes_may_unmap`` (60 bytes, then padding)."""
CONFIG_SPACE_SIZE = 96
WCE_OFFSET = 32
"""Offset of the ``wce`` byte, the only field a driver writes."""


def bit(n: int) -> int:
    return 1 << n


@dataclass(frozen=True, slots=True)
class BlkConfig:
    """Values of ``struct virtio_blk_config``; :meth:`pack` gives the 96-byte space."""

    capacity: int
    size_max: int = 0
    seg_max: int = 126
    blk_size: int = 512
    wce: int = 1
    num_queues: int = 1
    max_discard_sectors: int = 1 << 22
    max_discard_seg: int = 16
    discard_sector_alignment: int = 1
    max_write_zeroes_sectors: int = 1 << 22
    max_write_zeroes_seg: int = 16
    write_zeroes_may_unmap: int = 1

    def pack(self) -> bytes:
        body = VIRTIO_BLK_CONFIG.pack(
            self.capacity,
            self.size_max,
            self.seg_max,
            0,  # geometry: cylinders
            0,  # heads
            0,  # sectors
            self.blk_size,
            0,  # physical_block_exp
            0,  # alignment_offset
            0,  # min_io_size
            0,  # opt_io_size
            self.wce,
            self.num_queues,
            self.max_discard_sectors,
            self.max_discard_seg,
            self.discard_sector_alignment,
            self.max_write_zeroes_sectors,
            self.max_write_zeroes_seg,
            self.write_zeroes_may_unmap,
        )
        return body + bytes(CONFIG_SPACE_SIZE - len(body))


MAX_SEGMENTS = 16
"""``max_discard_seg`` and ``max_write_zeroes_seg`` enforced by :func:`execute`."""


class VectoredIO(Protocol):
    """An optional fast path for a request's data: all its buffers in one call (for a raw
    file, one ``preadv``/``pwritev`` instead of one per buffer, with no per-call range
    checks). Used for every IN and OUT request when given. Failures raise
    ``IOFailure``; offsets and lengths are already checked against the device's capacity."""

    def read_into(self, offset: int, views: list[memoryview]) -> None:
        """Fill ``views`` in order from ``offset``."""

    def write(self, offset: int, views: list[memoryview], *, fua: bool) -> None:
        """Write ``views`` in order at ``offset``; ``fua``: durable on return."""


def _status_of(exc: IOFailure) -> Status:
    if exc.errno in (errno.EOPNOTSUPP, errno.ENOTSUP):
        return Status.UNSUPP
    return Status.IOERR


def _header(readable: list[memoryview]) -> tuple[int, int, int, int]:
    """Return ``(type, sector, view index, offset in it)`` where the data starts."""
    first = readable[0] if readable else None
    if first is not None and len(first) >= 16:
        rtype, _, sector = VIRTIO_BLK_OUTHDR.unpack_from(first)
        return rtype, sector, 0, 16
    raw = bytearray()
    for i, view in enumerate(readable):
        need = 16 - len(raw)
        raw += view[:need]
        if len(raw) == 16:
            rtype, _, sector = VIRTIO_BLK_OUTHDR.unpack(raw)
            return rtype, sector, i, need
    raise RingError("virtio-blk request without a 16-byte header")


def _data_views(readable: list[memoryview], index: int, offset: int) -> list[memoryview]:
    views = [readable[index][offset:]] if offset < len(readable[index]) else []
    views.extend(readable[index + 1 :])
    return views


def execute(
    device: BlockDevice,
    chain: Chain,
    *,
    serial: bytes = b"",
    writethrough: bool = False,
    read_only: bool = False,
    vectored: VectoredIO | None = None,
) -> int:
    """Run one virtio-blk request and write its status byte; return ``used.len``.

    ``writethrough`` (config ``wce`` = 0) makes every write durable before it completes.
    ``read_only`` refuses writes even if the device would take them (status IOERR).
    ``vectored``, if given, moves the data of a request split over several buffers in one
    call (it must act on the same storage as ``device``).
    Raises ``RingError`` only if the chain has no header or no status byte.
    """
    writable = chain.writable
    if not writable or len(writable[-1]) == 0:
        raise RingError("virtio-blk request without a status byte")
    readable = chain.readable
    if readable and len(readable[0]) >= 16:
        rtype, _, sector = _unpack_header(readable[0])
        index, offset = 0, 16
    else:
        rtype, sector, index, offset = _header(readable)
    rtype &= ~VIRTIO_BLK_T_BARRIER
    last = writable[-1]
    used_len = 1
    status = _OK
    try:
        if rtype == _IN:
            if len(writable) == 2 and len(last) == 1:  # the usual layout: data, status
                view = writable[0]
                total = len(view)
                if vectored is not None:
                    vectored.read_into(_check(device, sector, total), [view])
                else:
                    device.read_into(_check(device, sector, total), view)
            else:
                data = writable[:-1]
                if len(last) > 1:
                    data.append(last[: len(last) - 1])
                total = 0
                for view in data:
                    total += len(view)
                pos = _check(device, sector, total)
                if vectored is not None:
                    vectored.read_into(pos, data)
                else:
                    for view in data:
                        device.read_into(pos, view)
                        pos += len(view)
            used_len = total + 1
        elif rtype == _OUT:
            if index == 0 and offset == 16 and len(readable) == 2 and len(readable[0]) == 16:
                views = readable[1:]  # the usual layout: header, data
            else:
                views = _data_views(readable, index, offset)
            total = 0
            for view in views:
                total += len(view)
            pos = _check(device, sector, total)
            if read_only:
                raise IOFailure("write to a read-only device", errno.EPERM)
            if vectored is not None:
                vectored.write(pos, views, fua=writethrough)
            else:
                for view in views:
                    device.write(pos, view, fua=writethrough)
                    pos += len(view)
        elif rtype == RequestType.FLUSH:
            device.flush()
        elif rtype == RequestType.GET_ID:
            ident = serial[:VIRTIO_BLK_ID_BYTES]
            data = writable[:-1]
            if len(last) > 1:
                data.append(last[: len(last) - 1])
            done = 0
            for view in data:
                n = min(len(view), len(ident) - done)
                view[:n] = ident[done : done + n]
                done += n
                if done < len(ident):
                    continue
                if n < len(view):
                    view[n] = 0  # NUL-terminate a short id
                break
            used_len = done + 1
        elif rtype in (RequestType.DISCARD, RequestType.WRITE_ZEROES):
            views = _data_views(chain.readable, index, offset)
            if sum(len(v) for v in views) > MAX_SEGMENTS * VIRTIO_BLK_DISCARD_WRITE_ZEROES.size:
                status = Status.IOERR  # more segments than max_*_seg: never copied
            else:
                status = _discard_or_zero(
                    device,
                    RequestType(rtype),
                    b"".join(views),
                    writethrough=writethrough,
                    read_only=read_only,
                )
        else:
            status = Status.UNSUPP
    except IOFailure as e:
        status = _status_of(e)
        if rtype == _IN:
            used_len = 1
    except QueueBroken:
        raise
    except StorvisorError:  # e.g. CorruptMetadata: the request fails, the queue lives on
        status = Status.IOERR
        if rtype == _IN:
            used_len = 1
    last[len(last) - 1] = status
    return used_len


MAX_REQUEST_BYTES = (1 << 32) - SECTOR_SIZE
"""Largest data transfer accepted: ``used.len`` (data + status) must fit in a u32."""


def _check(device: BlockDevice, sector: int, length: int) -> int:
    """Validate a data request; return its byte offset."""
    if length > MAX_REQUEST_BYTES:
        raise IOFailure(f"request of {length} bytes is too large", errno.EINVAL)
    if length % SECTOR_SIZE:
        raise IOFailure(f"request length {length} is not a multiple of 512", errno.EINVAL)
    offset = sector << SECTOR_SHIFT
    if offset + length > (device.size >> SECTOR_SHIFT) << SECTOR_SHIFT:
        raise IOFailure(f"request at sector {sector} beyond capacity", errno.ENOSPC)
    return offset


def _discard_or_zero(
    device: BlockDevice,
    rtype: RequestType,
    data: bytes,
    *,
    writethrough: bool,
    read_only: bool,
) -> Status:
    size = VIRTIO_BLK_DISCARD_WRITE_ZEROES.size
    if not data or len(data) % size or len(data) // size > MAX_SEGMENTS:
        return Status.IOERR
    segments = [
        VIRTIO_BLK_DISCARD_WRITE_ZEROES.unpack_from(data, i) for i in range(0, len(data), size)
    ]
    for _, _, flags in segments:
        if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
            return Status.UNSUPP
        if rtype == RequestType.DISCARD and flags:
            return Status.UNSUPP
    if read_only:
        return Status.IOERR
    for sector, count, flags in segments:
        offset = _check(device, sector, count << SECTOR_SHIFT)
        if rtype == RequestType.DISCARD:
            device.discard(offset, count << SECTOR_SHIFT)
        else:
            device.write_zeroes(
                offset,
                count << SECTOR_SHIFT,
                may_unmap=bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP),
                fua=writethrough,
            )
    return Status.OK
