"""Dirty-page logging for live migration (LOG_SHMFD + VHOST_F_LOG_ALL) through the export."""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Iterator

import pytest

from storvisor.exports.vhost_user_blk import (
    PROTOCOL_FEATURES,
    VIRTIO_FEATURES,
    VhostUserBlkServer,
)
from storvisor.protocols.vhost_user.dirty_log import DirtyLog, log_size_for
from storvisor.protocols.virtio import blk
from storvisor.protocols.virtio.blk import RequestType, Status
from storvisor.testing.memory import MemoryDevice
from storvisor.testing.vhost_frontend import RegionSpec, VhostUserFrontend

PAGE = 4096
STALL = 60.0


@pytest.fixture
def fe() -> Iterator[VhostUserFrontend]:
    path = tempfile.mkdtemp(prefix="vub-", dir="/tmp")
    server = VhostUserBlkServer(MemoryDevice(4 << 20), f"{path}/s.sock", serial="dirty")
    server.start()
    regions = [RegionSpec(0x10_0000, 8 << 20, mmap_offset=PAGE)]
    with VhostUserFrontend(f"{path}/s.sock", regions=regions, dirty_log=True) as frontend:
        frontend.setup()
        yield frontend
    server.close()
    shutil.rmtree(path, ignore_errors=True)


def pages(gpa: int, length: int) -> set[int]:
    return set(range(gpa // PAGE, (gpa + length - 1) // PAGE + 1))


def _request(fe: VhostUserFrontend, rtype: int, data_len: int, out: bool) -> tuple[int, int, int]:
    """One request with page-aligned, page-separated header, data and status buffers."""
    header = fe.memory.alloc(16, PAGE)
    fe.memory.write(header, blk.VIRTIO_BLK_OUTHDR.pack(rtype, 0, 0))
    data = fe.memory.alloc(data_len, PAGE) if data_len else 0
    status = fe.memory.alloc(1, PAGE)
    readable = [(header, 16)] + ([(data, data_len)] if out and data_len else [])
    writable = ([(data, data_len)] if data_len and not out else []) + [(status, 1)]
    head = fe.queues[0].submit(readable, writable)
    fe.blk.wait(0, head)
    assert fe.memory.read(status, 1)[0] == Status.OK
    return header, data, status


def test_offered() -> None:
    assert VIRTIO_FEATURES & (1 << 26) and PROTOCOL_FEATURES & (1 << 1)


def test_writes_to_guest_memory_are_logged(fe: VhostUserFrontend) -> None:
    used_page = fe.queues[0].used_gpa // PAGE
    # before logging starts nothing is recorded (the bitmap does not even exist yet)
    _request(fe, RequestType.IN, 2 * PAGE, out=False)
    fe.start_logging()
    _, data, status = _request(fe, RequestType.IN, 3 * PAGE, out=False)
    assert fe.dirty_pages() == pages(data, 3 * PAGE) | {status // PAGE, used_page}
    _, data, status = _request(fe, RequestType.OUT, 2 * PAGE, out=True)
    assert fe.dirty_pages() == {status // PAGE, used_page}  # OUT data was only read
    _, data, status = _request(fe, RequestType.GET_ID, 20, out=False)
    assert fe.dirty_pages() == {data // PAGE, status // PAGE, used_page}
    fe.stop_logging()
    _request(fe, RequestType.IN, PAGE, out=False)
    assert fe.dirty_pages() == set()


def test_dirty_log_bitmap() -> None:
    buf = bytearray(log_size_for(1 << 20))
    assert len(buf) == 32
    log = DirtyLog(memoryview(buf))
    log.mark(0x3FFF, 2)  # straddles pages 3 and 4
    log.mark(9 * PAGE, 0)  # nothing
    log.mark((1 << 20) + PAGE, PAGE)  # beyond the bitmap: ignored
    assert buf[0] == 0b0001_1000 and not any(buf[1:])


class _HeldDevice(MemoryDevice):
    """Reads wait until ``release`` is set; ``entered`` tells that one is waiting."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.entered = threading.Event()
        self.release = threading.Event()

    def read_into(self, offset: int, buf: memoryview) -> None:
        self.entered.set()
        assert self.release.wait(STALL), "the test never released the read"
        super().read_into(offset, buf)


@pytest.mark.parametrize("length", [2 * PAGE, 64 * PAGE], ids=["inline", "offloaded"])
def test_a_request_in_flight_when_logging_starts_is_logged(length: int) -> None:
    """QEMU starts logging while requests run; one popped before and completed after must
    still mark the pages it wrote (QEMU may have sent them already), and its used entry."""
    path = tempfile.mkdtemp(prefix="vub-", dir="/tmp")
    device = _HeldDevice(4 << 20)
    server = VhostUserBlkServer(device, f"{path}/s.sock", serial="held")
    server.start()
    regions = [RegionSpec(0x10_0000, 8 << 20, mmap_offset=PAGE)]
    try:
        with VhostUserFrontend(f"{path}/s.sock", regions=regions, dirty_log=True) as fe:
            fe.setup()
            used_page = fe.queues[0].used_gpa // PAGE
            header = fe.memory.alloc(16, PAGE)
            fe.memory.write(header, blk.VIRTIO_BLK_OUTHDR.pack(RequestType.IN, 0, 0))
            data = fe.memory.alloc(length, PAGE)
            status = fe.memory.alloc(1, PAGE)
            head = fe.queues[0].submit([(header, 16)], [(data, length), (status, 1)])
            assert device.entered.wait(STALL), "the request never reached the device"
            fe.start_logging()
            device.release.set()
            fe.blk.wait(0, head)
            assert fe.memory.read(status, 1)[0] == Status.OK
            assert fe.dirty_pages() == pages(data, length) | {status // PAGE, used_page}
    finally:
        device.release.set()
        server.close()
        shutil.rmtree(path, ignore_errors=True)
