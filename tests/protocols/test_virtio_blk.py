"""virtio-blk request execution and config space, sans I/O, against a ``MemoryDevice``."""

from __future__ import annotations

import errno

import pytest

from storvisor.engine.device import Buffer
from storvisor.errors import CorruptMetadata, IOFailure
from storvisor.protocols.virtio import blk
from storvisor.protocols.virtio.blk import BlkConfig, RequestType, Status
from storvisor.protocols.virtio.ring import Chain, RingError
from storvisor.testing.memory import MemoryDevice

SIZE = 1 << 20


def header(rtype: int, sector: int = 0) -> bytes:
    return blk.VIRTIO_BLK_OUTHDR.pack(rtype, 0, sector)


def views(*parts: bytes | int) -> list[memoryview]:
    """bytes -> a readable buffer with that content; int -> a zeroed buffer of that size."""
    return [memoryview(bytearray(p if isinstance(p, bytes) else bytes(p))) for p in parts]


def chunks(data: bytes, n: int) -> list[bytes]:
    return [data[i : i + n] for i in range(0, len(data), n)]


@pytest.fixture
def dev() -> MemoryDevice:
    d = MemoryDevice(SIZE)
    d.write(0, bytes(range(256)) * (SIZE // 256))
    return d


@pytest.mark.parametrize("split", [16, 1, 5, 64])
def test_in_with_header_split_anyhow(dev: MemoryDevice, split: int) -> None:
    # header byte by byte, or glued to nothing; data in 3 buffers, status last
    readable = views(*chunks(header(RequestType.IN, 2), split))
    writable = views(512, 256, 257)  # the last byte of the last buffer is the status
    used = blk.execute(dev, Chain(0, readable, writable))
    assert used == 1024 + 1
    assert writable[-1][-1] == Status.OK
    data = b"".join(bytes(v) for v in writable)[:1024]
    assert data == (bytes(range(256)) * 4)


def test_out_header_and_data_in_one_buffer(dev: MemoryDevice) -> None:
    payload = b"\xab" * 1024
    readable = views(header(RequestType.OUT, 4) + payload[:100], payload[100:])
    status = views(1)
    assert blk.execute(dev, Chain(0, readable, status)) == 1
    assert status[0][0] == Status.OK
    out = bytearray(1024)
    dev.read_into(2048, memoryview(out))
    assert out == payload


class Recording(MemoryDevice):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.fua: list[bool] = []

    def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        self.fua.append(fua)
        super().write(offset, data, fua=fua)


def test_writethrough_writes_are_fua() -> None:
    dev = Recording(SIZE)
    blk.execute(
        dev, Chain(0, views(header(RequestType.OUT), bytes(512)), views(1)), writethrough=True
    )
    blk.execute(dev, Chain(0, views(header(RequestType.OUT), bytes(512)), views(1)))
    assert dev.fua == [True, False]


@pytest.mark.parametrize(
    "readable, writable, expected",
    [
        ([header(RequestType.IN, SIZE // 512)], [513], Status.IOERR),  # beyond capacity
        ([header(RequestType.IN, SIZE // 512 - 1)], [1025], Status.IOERR),  # straddles end
        ([header(RequestType.IN)], [101], Status.IOERR),  # not a multiple of 512
        ([header(RequestType.OUT, 0), bytes(100)], [1], Status.IOERR),
        ([header(RequestType.OUT, SIZE // 512), bytes(512)], [1], Status.IOERR),
        ([header(RequestType.IN, (1 << 64) - 1)], [513], Status.IOERR),
        ([header(RequestType.GET_LIFETIME)], [49], Status.UNSUPP),
        ([header(12345)], [1], Status.UNSUPP),
        ([header(RequestType.DISCARD), bytes(15)], [1], Status.IOERR),  # partial segment
        ([header(RequestType.DISCARD)], [1], Status.IOERR),  # no segment
        (
            [header(RequestType.DISCARD), blk.VIRTIO_BLK_DISCARD_WRITE_ZEROES.pack(0, 1, 0) * 17],
            [1],
            Status.IOERR,
        ),
        (
            [header(RequestType.DISCARD), blk.VIRTIO_BLK_DISCARD_WRITE_ZEROES.pack(0, 1, 1)],
            [1],
            Status.UNSUPP,
        ),
        (
            [header(RequestType.WRITE_ZEROES), blk.VIRTIO_BLK_DISCARD_WRITE_ZEROES.pack(0, 1, 4)],
            [1],
            Status.UNSUPP,
        ),
        (
            [
                header(RequestType.WRITE_ZEROES),
                blk.VIRTIO_BLK_DISCARD_WRITE_ZEROES.pack(SIZE // 512, 1, 0),
            ],
            [1],
            Status.IOERR,
        ),
        ([header(RequestType.FLUSH)], [1], Status.OK),
        ([header(RequestType.OUT | blk.VIRTIO_BLK_T_BARRIER), bytes(512)], [1], Status.OK),
    ],
)
def test_status_table(
    dev: MemoryDevice, readable: list[bytes], writable: list[int], expected: Status
) -> None:
    w = views(*writable)
    used = blk.execute(dev, Chain(0, views(*readable), w))
    assert w[-1][-1] == expected
    assert used == 1 or (expected == Status.OK and readable[0][:4] == b"\0\0\0\0")


def test_read_only_refuses_writes(dev: MemoryDevice) -> None:
    for readable in (
        [header(RequestType.OUT), bytes(512)],
        [header(RequestType.DISCARD), blk.VIRTIO_BLK_DISCARD_WRITE_ZEROES.pack(0, 1, 0)],
        [header(RequestType.WRITE_ZEROES), blk.VIRTIO_BLK_DISCARD_WRITE_ZEROES.pack(0, 1, 0)],
    ):
        w = views(1)
        blk.execute(dev, Chain(0, views(*readable), w), read_only=True)
        assert w[0][0] == Status.IOERR
    check = bytearray(512)
    dev.read_into(0, memoryview(check))
    assert check == bytes(range(256)) * 2


def test_discard_and_write_zeroes_segments(dev: MemoryDevice) -> None:
    seg = blk.VIRTIO_BLK_DISCARD_WRITE_ZEROES.pack
    w = views(1)
    blk.execute(dev, Chain(0, views(header(RequestType.DISCARD), seg(1, 1, 0) + seg(4, 2, 0)), w))
    assert w[0][0] == Status.OK
    blk.execute(dev, Chain(0, views(header(RequestType.WRITE_ZEROES), seg(10, 1, 1)), w))
    assert w[0][0] == Status.OK
    out = bytearray(6144)
    dev.read_into(0, memoryview(out))
    for sector in (1, 4, 5, 10):
        assert out[512 * sector : 512 * (sector + 1)] == bytes(512)
    assert out[:512] == bytes(range(256)) * 2


@pytest.mark.parametrize(
    "serial, buffers, expected, used",
    [
        (b"abc", [21], b"abc\0", 4),
        (b"x" * 20, [21], b"x" * 20, 21),
        (b"x" * 25, [21], b"x" * 20, 21),
        (b"abcdef", [2, 3, 17], b"abcdef\0", 7),
        (b"abcdef", [4], b"abc", 4),  # buffer smaller than the id
        (b"", [21], b"\0", 1),
    ],
)
def test_get_id(
    dev: MemoryDevice, serial: bytes, buffers: list[int], expected: bytes, used: int
) -> None:
    w = views(*buffers)
    assert blk.execute(dev, Chain(0, views(header(RequestType.GET_ID)), w), serial=serial) == used
    data = b"".join(bytes(v) for v in w)[:-1]
    assert data[: len(expected)] == expected
    assert w[-1][-1] == Status.OK


class Failing(MemoryDevice):
    def __init__(self, size: int, code: int) -> None:
        super().__init__(size)
        self.code = code

    def flush(self) -> None:
        raise IOFailure("flush failed", self.code)


@pytest.mark.parametrize(
    "code, expected", [(errno.EIO, Status.IOERR), (errno.EOPNOTSUPP, Status.UNSUPP)]
)
def test_device_errors_become_status(code: int, expected: Status) -> None:
    w = views(1)
    assert blk.execute(Failing(SIZE, code), Chain(0, views(header(RequestType.FLUSH)), w)) == 1
    assert w[0][0] == expected


@pytest.mark.parametrize(
    "readable, writable",
    [
        ([header(RequestType.IN)], []),
        ([header(RequestType.IN)[:10]], [1]),
        ([], [513]),
        ([header(RequestType.IN)], [0]),
    ],
)
def test_chain_without_header_or_status_is_a_ring_error(
    dev: MemoryDevice, readable: list[bytes], writable: list[int]
) -> None:
    with pytest.raises(RingError):
        blk.execute(dev, Chain(0, views(*readable), views(*writable)))


def test_config_layout() -> None:
    space = BlkConfig(capacity=12345, blk_size=4096, wce=0, num_queues=3, max_discard_seg=16).pack()
    assert len(space) == 96
    assert int.from_bytes(space[0:8], "little") == 12345
    assert int.from_bytes(space[12:16], "little") == 126  # seg_max
    assert int.from_bytes(space[20:24], "little") == 4096
    assert space[32] == 0  # wce
    assert int.from_bytes(space[34:36], "little") == 3
    assert int.from_bytes(space[36:40], "little") == 1 << 22
    assert int.from_bytes(space[40:44], "little") == 16
    assert int.from_bytes(space[52:56], "little") == 16
    assert space[56] == 1  # write_zeroes_may_unmap
    assert space[57:] == bytes(39)


class Corrupt(MemoryDevice):
    def read_into(self, offset: int, buf: memoryview) -> None:
        raise CorruptMetadata("map is inconsistent")


def test_other_device_errors_fail_the_request() -> None:
    w = views(513)
    assert blk.execute(Corrupt(SIZE), Chain(0, views(header(RequestType.IN)), w)) == 1
    assert w[0][-1] == Status.IOERR


class Huge:
    """A BlockDevice-shaped sink of 16 GiB that stores nothing."""

    size = 16 << 30
    read_only = False
    block_size = 512

    def read_into(self, offset: int, buf: memoryview) -> None:
        pass


def test_transfer_larger_than_used_len_can_say_is_refused() -> None:
    page = memoryview(bytearray(1 << 20))
    writable = [page] * 4096 + [memoryview(bytearray(1))]  # 4 GiB of (overlapping) buffers
    used = blk.execute(Huge(), Chain(0, views(header(RequestType.IN)), writable))  # type: ignore[arg-type]
    assert used == 1 and writable[-1][0] == Status.IOERR
