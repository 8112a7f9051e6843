"""Memory-table changes while queues run (SET_MEM_TABLE again, ADD/REM_MEM_REG) and the
server's own life cycle (stale socket, close under load)."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest

from storvisor.errors import StateError
from storvisor.exports.vhost_user_blk import VhostUserBlkServer
from storvisor.protocols.vhost_user import messages as m
from storvisor.protocols.vhost_user.messages import MemoryRegion, Request
from storvisor.protocols.virtio.blk import Status
from storvisor.testing.memory import MemoryDevice
from storvisor.testing.vhost_frontend import RegionSpec, VhostUserFrontend

SIZE = 4 << 20
REGIONS = [RegionSpec(0, 2 << 20), RegionSpec(2 << 20, 2 << 20, mmap_offset=4096)]


@pytest.fixture
def sockdir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="vub-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def server(sockdir: str) -> Iterator[VhostUserBlkServer]:
    srv = VhostUserBlkServer(MemoryDevice(SIZE), f"{sockdir}/s.sock")
    srv.start()
    yield srv
    srv.close()


def _region(fe: VhostUserFrontend, i: int) -> MemoryRegion:
    return fe.memory.mem_regions()[i]


def test_mem_table_resent_while_running(server: VhostUserBlkServer) -> None:
    with VhostUserFrontend(server.socket_path, regions=REGIONS) as fe:
        fe.setup()
        assert fe.blk.write(0, b"a" * 4096, across=True) == Status.OK
        fe.set_mem_table()  # e.g. after memory hot-plug: queues pause, remap, resume
        assert fe.blk.read(0, 4096, across=True) == (Status.OK, b"a" * 4096)
        assert fe.stop_queue(0) == 2


def test_add_and_remove_memory_regions(server: VhostUserBlkServer) -> None:
    with VhostUserFrontend(server.socket_path, regions=REGIONS) as fe:
        fe.connect()
        fe.negotiate()
        assert fe.protocol_features & (1 << m.ProtocolFeature.CONFIGURE_MEM_SLOTS)
        assert fe.get_u64(Request.GET_MAX_MEM_SLOTS) >= 8
        fe.set_features()
        for i, r in enumerate(fe.memory.regions):  # no SET_MEM_TABLE: regions one by one
            fe.request(Request.ADD_MEM_REG, m.pack_mem_reg(_region(fe, i)), [r.fd])
        fe.layout_queues()
        fe.start_queue(0)
        assert fe.blk.write(0, b"b" * 8192, across=True) == Status.OK
        assert fe.blk.read(0, 8192, across=True) == (Status.OK, b"b" * 8192)
        # drop the second region: buffers there are now outside guest memory
        fe.request(Request.REM_MEM_REG, m.pack_mem_reg(_region(fe, 1)))
        fe.blk.write(0, b"c" * 512)  # still fine: all in region 0
        fe.blk.submit(0, 0, in_len=8192, across=True)
        deadline = time.monotonic() + 5
        while server.broken_queues != {0}:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # removing a region that does not exist drops the connection
        fe.send(Request.REM_MEM_REG, m.pack_mem_reg(_region(fe, 1)))
        assert fe.sock is not None and fe.sock.recv(16) == b""


def test_stale_socket_is_replaced(sockdir: str) -> None:
    path = f"{sockdir}/stale.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens
    server = VhostUserBlkServer(MemoryDevice(SIZE), path)
    server.start()
    try:
        with VhostUserFrontend(path) as fe:
            fe.setup()
            assert fe.blk.flush() == Status.OK
    finally:
        server.close()
    assert not os.path.exists(path)


def test_a_regular_file_is_not_unlinked(sockdir: str) -> None:
    path = f"{sockdir}/file"
    with open(path, "w") as f:
        f.write("data")
    with pytest.raises(OSError):
        VhostUserBlkServer(MemoryDevice(SIZE), path).start()
    with open(path) as f:
        assert f.read() == "data"


def test_close_while_front_end_is_busy(server: VhostUserBlkServer) -> None:
    fe = VhostUserFrontend(server.socket_path, timeout=2)
    fe.setup()
    stop = threading.Event()
    errors: list[BaseException] = []

    def hammer() -> None:
        try:
            while not stop.is_set():
                fe.blk.write(0, b"h" * 4096)
        except Exception as e:  # the server went away under it: expected
            errors.append(e)

    worker = threading.Thread(target=hammer)
    worker.start()
    time.sleep(0.2)
    started = time.monotonic()
    server.close()
    assert time.monotonic() - started < 5
    stop.set()
    worker.join(10)
    assert not worker.is_alive()
    assert not os.path.exists(server.socket_path)
    fe.close()
    server.close()  # idempotent


def test_start_twice_or_after_close_is_refused(server: VhostUserBlkServer) -> None:
    with pytest.raises(StateError):
        server.start()
    _still_usable(server)
    server.close()
    with pytest.raises(StateError):
        server.start()


def _still_usable(server: VhostUserBlkServer) -> None:
    with VhostUserFrontend(server.socket_path) as fe:
        fe.setup()
        assert fe.blk.flush() == Status.OK
