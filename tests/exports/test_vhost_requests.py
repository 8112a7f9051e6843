"""The vhost-user-blk export driven by the Python front-end: every request type, ring
wrap-around, indirect tables, chains crossing memory regions, several queues."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from storvisor.engine.device import FileDevice
from storvisor.exports.vhost_user_blk import VhostUserBlkServer
from storvisor.protocols.vhost_user import messages as m
from storvisor.protocols.vhost_user.messages import BackendRequest, Request
from storvisor.protocols.virtio import blk
from storvisor.protocols.virtio.blk import RequestType, Status
from storvisor.protocols.virtio.ring import VRING_USED_F_NO_NOTIFY
from storvisor.testing.memory import MemoryDevice
from storvisor.testing.vhost_frontend import RegionSpec, VhostUserFrontend

SIZE = 8 << 20


@pytest.fixture
def sock() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="vub-", dir="/tmp")
    yield f"{path}/vub.sock"
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def device() -> MemoryDevice:
    return MemoryDevice(SIZE)


@pytest.fixture
def server(device: MemoryDevice, sock: str) -> Iterator[VhostUserBlkServer]:
    srv = VhostUserBlkServer(device, sock, num_queues=2, serial="storvisor-serial-0123456789")
    srv.start()
    yield srv
    srv.close()


@pytest.fixture
def fe(server: VhostUserBlkServer, sock: str) -> Iterator[VhostUserFrontend]:
    with VhostUserFrontend(sock, num_queues=2, queue_size=16) as frontend:
        frontend.setup()
        yield frontend


def pattern(n: int, seed: int = 1) -> bytes:
    unit = bytes((i * 7 + seed) & 0xFF for i in range(256))
    return (unit * (n // 256 + 1))[:n]


def test_negotiated_features_and_config(fe: VhostUserFrontend, device: MemoryDevice) -> None:
    for feature in (
        blk.VIRTIO_F_VERSION_1,
        blk.VIRTIO_RING_F_INDIRECT_DESC,
        blk.VIRTIO_RING_F_EVENT_IDX,
        blk.VIRTIO_BLK_F_FLUSH,
        blk.VIRTIO_BLK_F_DISCARD,
        blk.VIRTIO_BLK_F_WRITE_ZEROES,
        blk.VIRTIO_BLK_F_MQ,
        blk.VIRTIO_BLK_F_SEG_MAX,
        blk.VIRTIO_BLK_F_BLK_SIZE,
        blk.VIRTIO_BLK_F_CONFIG_WCE,
    ):
        assert fe.offered_features & (1 << feature), feature
    assert not fe.offered_features & (1 << blk.VIRTIO_BLK_F_RO)
    assert not fe.offered_features & (1 << blk.VIRTIO_F_RING_PACKED)
    assert fe.capacity == SIZE
    config = fe.get_config(0, 60)
    assert int.from_bytes(config[34:36], "little") == 2  # num_queues
    assert int.from_bytes(config[20:24], "little") == 512  # blk_size
    assert config[32] == 1  # write-back cache
    # QEMU asks for 57 bytes; the reply has exactly that many
    assert len(fe.get_config(0, 57)) == 57


def test_write_read_flush(fe: VhostUserFrontend, device: MemoryDevice) -> None:
    data = pattern(8192)
    assert fe.blk.write(4096, data) == Status.OK
    assert bytes(device._data[4096 : 4096 + 8192]) == data
    status, got = fe.blk.read(4096, 8192)
    assert status == Status.OK and got == data
    assert fe.blk.flush() == Status.OK
    assert device.flushes == 1


def test_get_id_returns_serial(fe: VhostUserFrontend) -> None:
    status, ident = fe.blk.get_id()
    assert status == Status.OK
    assert ident == b"storvisor-serial-0123456789"[:20]


def test_get_id_short_serial(device: MemoryDevice, sock: str) -> None:
    server = VhostUserBlkServer(device, sock, serial="vol-1")
    server.start()
    try:
        with VhostUserFrontend(sock) as fe:
            fe.setup()
            assert fe.blk.get_id() == (Status.OK, b"vol-1")
            _status, data, used_len = fe.blk.request(RequestType.GET_ID, in_len=20)
            assert data[:6] == b"vol-1\0" and used_len == 6
    finally:
        server.close()


def test_discard_and_write_zeroes(fe: VhostUserFrontend, device: MemoryDevice) -> None:
    fe.blk.write(0, b"\xaa" * 65536)
    assert fe.blk.discard([(8, 8, 0), (64, 16, 0)]) == Status.OK
    assert fe.blk.write_zeroes([(32, 8, 1), (100, 4, 0)]) == Status.OK
    expected = bytearray(b"\xaa" * 65536)
    for sector, count in ((8, 8), (64, 16), (32, 8), (100, 4)):
        expected[sector * 512 : (sector + count) * 512] = bytes(count * 512)
    assert fe.blk.read(0, 65536) == (Status.OK, bytes(expected))
    # DISCARD must not carry UNMAP; unknown flags are unsupported
    assert fe.blk.discard([(0, 1, 1)]) == Status.UNSUPP
    assert fe.blk.write_zeroes([(0, 1, 2)]) == Status.UNSUPP
    assert fe.blk.discard([(SIZE // 512, 1, 0)]) == Status.IOERR


@pytest.mark.parametrize(
    "rtype, expected",
    [
        (RequestType.GET_LIFETIME, Status.UNSUPP),
        (99, Status.UNSUPP),
        (RequestType.SECURE_ERASE, Status.UNSUPP),
    ],
)
def test_unsupported_types(fe: VhostUserFrontend, rtype: int, expected: Status) -> None:
    status, _, used_len = fe.blk.request(rtype, in_len=512)
    assert status == expected and used_len == 1


def test_barrier_bit_is_masked(fe: VhostUserFrontend) -> None:
    fe.blk.write(0, pattern(512))
    status, data, _ = fe.blk.request(RequestType.IN | blk.VIRTIO_BLK_T_BARRIER, 0, in_len=512)
    assert status == Status.OK and data == pattern(512)


def test_errors_fail_one_request(fe: VhostUserFrontend) -> None:
    assert fe.blk.read(SIZE - 512, 1024)[0] == Status.IOERR  # beyond capacity
    assert fe.blk.write(SIZE, b"x" * 512) == Status.IOERR
    assert fe.blk.read(0, 100)[0] == Status.IOERR  # not a multiple of 512
    assert fe.blk.write(0, b"x" * 100) == Status.IOERR
    assert fe.blk.read(SIZE - 512, 512)[0] == Status.OK  # the device carries on


def test_ring_wraps_many_times(fe: VhostUserFrontend, device: MemoryDevice) -> None:
    # 16-entry ring, 3 descriptors per request: 600 requests wrap the indices many times
    for i in range(300):
        assert fe.blk.write(512 * i, bytes([i & 0xFF]) * 512) == Status.OK
    for i in range(300):
        assert fe.blk.read(512 * i, 512) == (Status.OK, bytes([i & 0xFF]) * 512)
    q = fe.queues[0]
    assert q.avail_idx == 600 and q.used_idx() == 600


def test_batches_in_flight(fe: VhostUserFrontend) -> None:
    for batch in range(40):
        heads = []
        for i in range(5):  # 5 x 3 descriptors fit in 16
            data = bytes([batch, i]) * 256
            head, _, status = fe.blk.submit(RequestType.OUT, batch * 5 + i, out=data, kick=i == 4)
            heads.append((head, status))
        for head, status in heads:
            assert fe.blk.wait(0, head) == 1
            assert fe.memory.read(status, 1) == b"\x00"
    for batch in range(40):
        for i in range(5):
            assert fe.blk.read(512 * (batch * 5 + i), 512)[1] == bytes([batch, i]) * 256


def test_multi_segment_and_indirect(fe: VhostUserFrontend) -> None:
    data = pattern(64 * 1024, 3)
    assert fe.blk.write(0, data, segments=13) == Status.OK
    assert fe.blk.read(0, len(data), segments=7) == (Status.OK, data)
    assert fe.blk.write(65536, data, segments=40, indirect=True) == Status.OK
    assert fe.blk.read(65536, len(data), indirect=True, segments=33) == (Status.OK, data)
    assert fe.blk.get_id()[0] == Status.OK


def test_indirect_larger_than_the_ring(fe: VhostUserFrontend) -> None:
    data = pattern(100 * 512, 5)
    assert fe.blk.write(0, data, segments=100, indirect=True) == Status.OK
    assert fe.blk.read(0, len(data), segments=100, indirect=True) == (Status.OK, data)


def test_two_queues(fe: VhostUserFrontend) -> None:
    for i in range(50):
        assert fe.blk.write(4096 * i, pattern(4096, i), queue=i % 2) == Status.OK
    for i in range(50):
        assert fe.blk.read(4096 * i, 4096, queue=(i + 1) % 2) == (Status.OK, pattern(4096, i))


def test_without_event_idx_or_indirect(server: VhostUserBlkServer, sock: str) -> None:
    with VhostUserFrontend(sock, event_idx=False, indirect=False, queue_size=8) as fe:
        fe.setup()
        assert not fe.features & (1 << blk.VIRTIO_RING_F_EVENT_IDX)
        for i in range(40):
            assert fe.blk.write(512 * i, bytes([i]) * 512) == Status.OK
            assert fe.blk.read(512 * i, 512) == (Status.OK, bytes([i]) * 512)


def test_event_idx_avail_event_tracks_position(fe: VhostUserFrontend) -> None:
    # the back-end must publish avail_event = last_avail (after the batch, so wait a little)
    # or the driver stops kicking
    q = fe.queues[0]
    avail_event = q.used_gpa + 4 + 8 * q.size
    for _ in range(20):
        assert fe.blk.write(0, b"k" * 512) == Status.OK
        deadline = time.monotonic() + 5
        while fe.memory.u16(avail_event) != q.avail_idx:
            assert time.monotonic() < deadline, "avail_event never caught up"
            time.sleep(0.001)
    assert q.kicks == 20  # each request came after the back-end went idle: each kicked


def test_regions_with_offsets_and_crossing(
    device: MemoryDevice, server: VhostUserBlkServer, sock: str
) -> None:
    regions = [
        RegionSpec(0x10_0000, 2 << 20, mmap_offset=8192),
        RegionSpec(0x10_0000 + (2 << 20), 2 << 20, mmap_offset=4096),
        RegionSpec(0x1_0000_0000, 1 << 20),
    ]
    with VhostUserFrontend(sock, regions=regions, queue_size=32) as fe:
        fe.setup()
        data = pattern(32768, 9)
        for segments, indirect in ((1, False), (4, False), (3, True)):
            status = fe.blk.write(0, data, across=True, segments=segments, indirect=indirect)
            assert status == Status.OK
            assert bytes(device._data[:32768]) == data
            assert fe.blk.read(0, 32768, across=True, segments=segments) == (Status.OK, data)
            device.write(0, bytes(32768))


def test_read_only_export(sock: str) -> None:
    device = MemoryDevice(SIZE)
    device.write(0, b"ro" * 256)
    with_server = VhostUserBlkServer(device, sock, read_only=True)
    with_server.start()
    try:
        with VhostUserFrontend(sock) as fe:
            fe.setup()
            assert fe.offered_features & (1 << blk.VIRTIO_BLK_F_RO)
            assert fe.blk.write(0, b"x" * 512) == Status.IOERR
            assert fe.blk.write_zeroes([(0, 1, 0)]) == Status.IOERR
            assert fe.blk.discard([(0, 1, 0)]) == Status.IOERR
            assert fe.blk.read(0, 512) == (Status.OK, b"ro" * 256)
            assert fe.blk.flush() == Status.OK
        assert bytes(device._data[:512]) == b"ro" * 256
    finally:
        with_server.close()


def test_config_change_after_extend(
    fe: VhostUserFrontend, server: VhostUserBlkServer, device: MemoryDevice
) -> None:
    device.resize(SIZE * 2)
    server.notify_config_change()
    request, payload = fe.wait_backend_message()
    assert request == BackendRequest.CONFIG_CHANGE_MSG and payload == b""
    fe.config = fe.get_config(0, 60)
    assert fe.capacity == SIZE * 2
    assert fe.blk.write(SIZE * 2 - 512, b"e" * 512) == Status.OK


def test_write_cache_toggle(fe: VhostUserFrontend) -> None:
    fe.set_wce(False)
    assert fe.get_config(32, 1) == b"\x00"
    assert fe.blk.write(0, b"w" * 512) == Status.OK
    fe.set_wce(True)
    assert fe.get_config(32, 1) == b"\x01"


def test_stop_and_restart_queue_keeps_position(fe: VhostUserFrontend) -> None:
    for _i in range(5):
        fe.blk.write(0, b"s" * 512)
    base = fe.stop_queue(0)
    assert base == fe.queues[0].avail_idx == 5
    fe.start_queue(0)
    assert fe.blk.read(0, 512) == (Status.OK, b"s" * 512)


def test_file_device_and_reconnect(tmp_path: Path, sock: str) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    device = FileDevice(str(image))
    server = VhostUserBlkServer(device, sock)
    server.start()
    try:
        for round_ in range(3):
            with VhostUserFrontend(sock) as fe:
                fe.setup()
                assert fe.blk.write(512 * round_, bytes([round_ + 1]) * 512) == Status.OK
                assert fe.blk.flush() == Status.OK
        assert server.connections == 3
    finally:
        server.close()
        device.close()
    assert image.read_bytes()[:1536] == b"\x01" * 512 + b"\x02" * 512 + b"\x03" * 512


def test_polling_mode_without_eventfds(server: VhostUserBlkServer, sock: str) -> None:
    with VhostUserFrontend(sock, queue_size=16) as fe:
        fe.setup()
        base = fe.stop_queue(0)
        nofd = m.VHOST_USER_VRING_NOFD_MASK
        fe.request(Request.SET_VRING_BASE, m.VHOST_VRING_STATE.pack(0, base))
        fe.request(Request.SET_VRING_KICK, m.U64.pack(0 | nofd))  # the back-end must poll
        fe.request(Request.SET_VRING_CALL, m.U64.pack(0 | nofd))  # and may not signal
        fe.request(Request.SET_VRING_ENABLE, m.VHOST_VRING_STATE.pack(0, 1))
        for i in range(10):
            head, _, status = fe.blk.submit(RequestType.OUT, i, out=bytes([i]) * 512, kick=False)
            assert fe.blk.wait(0, head) == 1 and fe.memory.read(status, 1) == b"\x00"


class SlowLargeReads(MemoryDevice):
    """Large reads take a while, so that small requests overtake them."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.release = threading.Event()

    def read_into(self, offset: int, buf: memoryview) -> None:
        if len(buf) >= 128 << 10:
            self.release.wait(10)
        super().read_into(offset, buf)


def test_small_requests_overtake_large_ones(sock: str) -> None:
    device = SlowLargeReads(SIZE)
    device.write(0, pattern(256 << 10, 4))
    server = VhostUserBlkServer(device, sock)
    server.start()
    try:
        with VhostUserFrontend(sock, queue_size=64) as fe:
            fe.setup()
            big, big_data, _ = fe.blk.submit(RequestType.IN, 0, in_len=256 << 10, kick=False)
            small, _, small_status = fe.blk.submit(RequestType.OUT, 2048, out=b"s" * 4096)
            assert fe.blk.wait(0, small) == 1 and fe.memory.read(small_status, 1) == b"\x00"
            assert big not in fe.queues[0].completions and fe.queues[0].in_flight == 1
            device.release.set()
            assert fe.blk.wait(0, big) == (256 << 10) + 1
            assert fe.memory.read(big_data, 256 << 10) == pattern(256 << 10, 4)
            assert fe.stop_queue(0) == 2
    finally:
        server.close()


def test_stop_waits_for_offloaded_requests(sock: str) -> None:
    device = SlowLargeReads(SIZE)
    server = VhostUserBlkServer(device, sock)
    server.start()
    try:
        with VhostUserFrontend(sock) as fe:
            fe.setup()
            head, _, status = fe.blk.submit(RequestType.IN, 0, in_len=256 << 10)
            time.sleep(0.05)
            threading.Timer(0.2, device.release.set).start()
            started = time.monotonic()
            assert fe.stop_queue(0) == 1  # returns only once the request completed
            assert time.monotonic() - started >= 0.1
            fe.queues[0].poll_used()
            assert fe.queues[0].completions.get(head) == (256 << 10) + 1
            assert fe.memory.read(status, 1) == b"\x00"
    finally:
        server.close()


@pytest.mark.requires((os.cpu_count() or 1) >= 2, "no I/O pool on one CPU")
def test_busy_pool_pops_the_ring_itself(sock: str) -> None:
    """Once every pool thread has a large request of a ring, the ring is parked: the driver
    is told not to kick and the pool threads pop what follows as they finish."""
    device = SlowLargeReads(SIZE)
    device.write(0, pattern(SIZE, 9))
    server = VhostUserBlkServer(device, sock)
    server.start()
    pool = server.io_pool()
    assert pool is not None
    big = 256 << 10
    try:
        with VhostUserFrontend(sock, event_idx=False, queue_size=64) as fe:
            fe.setup()
            q = fe.queues[0]
            reads = [fe.blk.submit(RequestType.IN, i * big // 512, in_len=big) for i in range(2)]
            reads += [
                fe.blk.submit(RequestType.IN, i * big // 512, in_len=big, kick=False)
                for i in range(2, pool.size)
            ]
            fe.queues[0].kick()
            deadline = time.monotonic() + 5
            while not fe.memory.u16(q.used_gpa) & VRING_USED_F_NO_NOTIFY:
                assert time.monotonic() < deadline, "the ring was never parked"
                time.sleep(0.001)
            kicks = q.kicks
            # the driver may skip kicks now: nobody but the pool looks at these
            reads += [
                fe.blk.submit(RequestType.IN, i * big // 512, in_len=big, kick=False)
                for i in range(pool.size, pool.size + 4)
            ]
            end = (pool.size + 4) * big // 512  # past what the reads cover
            small, _, small_status = fe.blk.submit(RequestType.OUT, end, out=b"s" * 512, kick=False)
            device.release.set()
            for i, (head, data, status) in enumerate(reads):
                assert fe.blk.wait(0, head) == big + 1
                assert fe.memory.read(status, 1) == b"\x00"
                assert fe.memory.read(data, big) == pattern(SIZE, 9)[i * big : (i + 1) * big]
            assert fe.blk.wait(0, small) == 1 and fe.memory.read(small_status, 1) == b"\x00"
            assert q.kicks == kicks
            # the ring is empty: kicks are wanted again
            deadline = time.monotonic() + 5
            while fe.memory.u16(q.used_gpa) & VRING_USED_F_NO_NOTIFY:
                assert time.monotonic() < deadline, "the ring stayed parked"
                time.sleep(0.001)
            assert fe.blk.read(end * 512, 512) == (Status.OK, b"s" * 512)
            assert fe.stop_queue(0) == len(reads) + 2
    finally:
        server.close()


def test_file_device_many_segments_one_call(tmp_path: Path, sock: str) -> None:
    """A raw file gets a request's buffers in one preadv/pwritev (small and offloaded)."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(2 << 20))
    device = FileDevice(str(image))
    server = VhostUserBlkServer(device, sock)
    server.start()
    try:
        with VhostUserFrontend(sock, queue_size=256) as fe:
            fe.setup()
            small = pattern(12 << 10, 5)
            large = pattern(1 << 20, 6)
            assert fe.blk.write(4096, small, segments=3) == Status.OK
            assert fe.blk.write(1 << 20, large, segments=100, indirect=True) == Status.OK
            assert fe.blk.read(4096, len(small), segments=5) == (Status.OK, small)
            got = fe.blk.read(1 << 20, len(large), segments=77, indirect=True)
            assert got == (Status.OK, large)
            assert fe.blk.read(0, 16 << 10, segments=4)[1] == bytes(4096) + small
    finally:
        server.close()
        device.close()
    data = image.read_bytes()
    assert data[4096 : 4096 + len(small)] == small and data[1 << 20 :] == large
