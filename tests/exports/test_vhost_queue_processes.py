"""Queue processes: an export whose queues run in several servers (``peers`` /
``serve_peer``), here as threads of this process over socket pairs (the process boundary is
covered through the daemon). Every message reaches every peer first; queue ``i`` runs in
slot ``i % slots``; stops report the right next avail index; the dirty log is shared."""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator

import pytest

from storvisor.exports.vhost_user_blk import VhostUserBlkServer
from storvisor.protocols.virtio.blk import Status
from storvisor.testing.memory import MemoryDevice
from storvisor.testing.vhost_frontend import RegionSpec, VhostUserFrontend

PAGE = 4096


class Group:
    def __init__(self, queues: int, slots: int) -> None:
        self.dir = tempfile.mkdtemp(prefix="vubq-", dir="/tmp")
        self.sock = f"{self.dir}/s.sock"
        self.device = MemoryDevice(8 << 20)
        links = [socket.socketpair() for _ in range(slots - 1)]
        self.peers = [
            VhostUserBlkServer(self.device, "", num_queues=queues, slot=k + 1, slots=slots)
            for k in range(slots - 1)
        ]
        self.threads = [
            threading.Thread(target=peer.serve_peer, args=(link[1],), daemon=True)
            for peer, link in zip(self.peers, links, strict=True)
        ]
        for t in self.threads:
            t.start()
        self.links = links
        self.control = VhostUserBlkServer(
            self.device, self.sock, num_queues=queues, peers=[a for a, _ in links], serial="q"
        )
        self.control.start()

    def close(self) -> None:
        self.control.close()
        for a, _ in self.links:
            a.close()
        for t in self.threads:
            t.join(10)
        for _, b in self.links:
            b.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def group() -> Iterator[Group]:
    g = Group(queues=4, slots=2)
    yield g
    g.close()


def test_queues_run_in_their_slot_and_data_is_shared(group: Group) -> None:
    with VhostUserFrontend(group.sock, num_queues=4, inflight=True) as fe:
        fe.setup()
        for q in range(4):
            assert fe.blk.write(q * 65536, bytes([q + 1]) * 8192, queue=q) == Status.OK
        for q in range(4):
            status, data = fe.blk.read(((q + 1) % 4) * 65536, 8192, queue=q)
            assert status == Status.OK and data == bytes([(q + 1) % 4 + 1]) * 8192
        assert fe.blk.flush(queue=3) == Status.OK
        # queue 1 and 3 ran in the peer, 0 and 2 here
        peer_device = group.peers[0]._device
        assert peer_device is not None and sorted(peer_device._workers) == [1, 3]
        control_device = group.control._device
        assert control_device is not None and sorted(control_device._workers) == [0, 2]
        # a stop reports each queue's own next avail index, wherever it ran
        bases = [fe.stop_queue(q) for q in range(4)]
        assert bases == [2, 2, 2, 2] or bases == [2, 2, 2, 3], bases
        for q in range(4):
            fe.start_queue(q, base=bases[q])
        status, data = fe.blk.read(0, 4096, queue=1)
        assert status == Status.OK and data == b"\x01" * 4096


def test_reconnect_after_a_dropped_connection(group: Group) -> None:
    fe = VhostUserFrontend(group.sock, num_queues=4, inflight=True)
    with fe:
        fe.setup()
        assert fe.blk.write(0, b"\x11" * 4096, queue=1) == Status.OK
        fe.reconnect()  # the peer resets and follows the new connection
        assert fe.blk.write(4096, b"\x22" * 4096, queue=3) == Status.OK
        status, data = fe.blk.read(0, 8192, queue=2)
        assert status == Status.OK and data == b"\x11" * 4096 + b"\x22" * 4096
    assert group.control.connections == 2


def test_dirty_log_is_marked_by_every_slot() -> None:
    g = Group(queues=2, slots=2)
    try:
        regions = [RegionSpec(0x10_0000, 8 << 20, mmap_offset=PAGE)]
        with VhostUserFrontend(
            g.sock, num_queues=2, regions=regions, dirty_log=True, inflight=True
        ) as fe:
            fe.setup()
            fe.blk.write(0, b"\x33" * 8192)
            fe.start_logging()
            fe.dirty_pages()
            status, _ = fe.blk.read(0, 8192, queue=1)  # runs in the peer
            assert status == Status.OK
            assert fe.dirty_pages(), "the peer's completion marked no page"
            status, _ = fe.blk.read(0, 8192, queue=0)  # runs here
            assert status == Status.OK
            assert fe.dirty_pages()
    finally:
        g.close()
