"""The data-plane channel and ``RemoteVolume``, both ends in this process (the process
boundary itself is covered by the vhost-user-blk export tests through the daemon)."""

from __future__ import annotations

import os
import socket
import threading
from itertools import count
from pathlib import Path

import pytest

from gates import assert_waits_for_gate
from storvisor.engine.device import BlockDevice
from storvisor.engine.home import Home
from storvisor.engine.pool import Pool
from storvisor.engine.types import BackingSpec
from storvisor.exports.dataplane import PlaneHost, RemoteVolume
from storvisor.testing.conformance import check_block_device

MiB = 1 << 20


class Plane:
    """A volume handle served through a PlaneHost to a RemoteVolume."""

    def __init__(self, pool: Pool, name: str, snapshot: str | None = None) -> None:
        self.volume = pool.open_volume(name, snapshot)
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.host = PlaneHost(self.volume, a)
        self.host.start()
        self.remote = RemoteVolume(
            b,
            os.dup(self.host.map.fd),
            pool.backing_fds(),
            pool.cluster_size,
            read_only=self.volume.read_only,
        )

    def close(self) -> None:
        self.remote.close()
        self.host.close()
        self.volume.close()


def test_remote_volume_conforms(pool: Pool) -> None:
    names = count()
    planes: list[Plane] = []

    def make(size: int) -> BlockDevice:
        name = f"v{next(names)}"
        pool.create_volume(name, size)
        planes.append(Plane(pool, name))
        return planes[-1].remote

    try:
        check_block_device(make)
    finally:
        for plane in planes:
            plane.close()
    assert pool.fsck().clean


def test_remote_clone_of_deep_chain_conforms(pool: Pool) -> None:
    names = count()
    planes: list[Plane] = []

    def make(size: int) -> BlockDevice:
        n = next(names)
        pool.create_volume(f"b{n}", size)
        for depth in range(4):
            h = pool.open_volume(f"b{n}")
            h.write(depth * 65536, bytes(4096))
            h.close()
            pool.create_snapshot(f"b{n}", f"s{depth}")
        pool.clone(f"b{n}", "s3", f"c{n}")
        planes.append(Plane(pool, f"c{n}"))
        return planes[-1].remote

    try:
        check_block_device(make)
    finally:
        for plane in planes:
            plane.close()
    assert pool.fsck().clean


def test_snapshot_taken_while_plane_writes_in_place(pool: Pool) -> None:
    pool.create_volume("v", 8 * MiB)
    plane = Plane(pool, "v")
    try:
        remote = plane.remote
        remote.write(0, b"a" * 65536)  # allocates through the owner
        remote.write(0, b"b" * 4096)  # owned now: in place, in the plane
        pool.create_snapshot("v", "s1")
        remote.write(4096, b"c" * 4096)  # shared now: copy-on-write through the owner
        remote.flush()
        snap = pool.open_volume("v", "s1")
        assert bytes(_read(snap, 0, 8192)) == b"b" * 4096 + b"a" * 4096
        snap.close()
        assert bytes(_read(remote, 0, 8192)) == b"b" * 4096 + b"c" * 4096
        assert bytes(_read(plane.volume, 0, 8192)) == b"b" * 4096 + b"c" * 4096
    finally:
        plane.close()
    assert pool.fsck().clean


def test_snapshots_during_concurrent_plane_writes_keep_every_write(pool: Pool) -> None:
    """Writers in the plane race snapshots in the owner: every write acknowledged before a
    snapshot is in it, and the volume ends with every write (none lands in a snapshot's
    cluster after the snapshot was taken)."""
    pool.create_volume("v", 16 * MiB)
    plane = Plane(pool, "v")
    remote = plane.remote
    blocks = 16 * MiB // 4096
    for start in range(0, 16 * MiB, MiB):
        remote.write(start, bytes(MiB))
    done: dict[int, int] = {}
    lock = threading.Lock()
    stop = threading.Event()

    lost: list[int] = []

    def writer(k: int) -> None:
        gen = 1
        back = bytearray(4096)
        while not stop.is_set():
            for block in range(k, blocks, 4):
                value = gen % 251 + 1
                remote.write(block * 4096, bytes([value]) * 4096)
                remote.read_into(block * 4096, memoryview(back))
                if back[0] != value or back[-1] != value:
                    lost.append(block)  # a completed write must read back
                with lock:
                    done[block] = value
            gen += 1

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        for i in range(30):
            with lock:
                before = dict(done)
            pool.create_snapshot("v", f"s{i}")
            snap = pool.open_volume("v", f"s{i}")
            data = _read(snap, 0, 16 * MiB)
            snap.close()
            for block in before:  # written before the snapshot: never zeros in it
                assert data[block * 4096] != 0, f"snapshot s{i} lost block {block}"
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not lost, f"writes lost to copy-on-write races: blocks {lost[:10]}"
    remote.flush()
    data = _read(remote, 0, 16 * MiB)
    for block, value in done.items():
        assert data[block * 4096 : (block + 1) * 4096] == bytes([value]) * 4096, block
    plane.close()
    assert pool.fsck().clean


def test_extend_reaches_the_plane(pool: Pool) -> None:
    pool.create_volume("v", 1 * MiB)
    resized = threading.Event()
    plane = Plane(pool, "v")
    plane.remote._on_resized = resized.set  # the export's config-change hook
    try:
        pool.extend_volume("v", 200 * MiB)
        assert resized.wait(5)
        assert plane.remote.size == 200 * MiB
        plane.remote.write(199 * MiB, b"z" * 4096)
        assert bytes(_read(plane.remote, 199 * MiB, 4096)) == b"z" * 4096
    finally:
        plane.close()


def test_plane_sees_a_backing_device_added_online(pool: Pool, tmp_path: Path) -> None:
    pool.create_volume("v", 512 * MiB)
    plane = Plane(pool, "v")
    try:
        pool.add_backing(BackingSpec(str(tmp_path / "d1.img"), 256 << 20))
        # fill past the first device so that clusters land on the second
        chunk = b"q" * MiB
        for i in range(300):
            plane.remote.write(i * MiB, chunk)
        plane.remote.write(299 * MiB, b"r" * 4096)  # in place, on device 1
        assert bytes(_read(plane.remote, 299 * MiB, 8192)) == b"r" * 4096 + b"q" * 4096
    finally:
        plane.close()
    assert pool.fsck().clean


def test_flush_makes_plane_writes_durable(pool: Pool, home: Home, tmp_path: Path) -> None:
    pool.create_volume("v", 4 * MiB)
    plane = Plane(pool, "v")
    plane.remote.write(0, b"x" * 65536)
    plane.remote.write(0, b"y" * 512)  # in place
    plane.remote.flush()
    plane.close()
    home.close()
    again = Home(tmp_path / "home")
    try:
        v = again.pool("p").open_volume("v")
        assert bytes(_read(v, 0, 1024)) == b"y" * 512 + b"x" * 512
        v.close()
    finally:
        again.close()


def test_lost_owner_fails_requests(pool: Pool) -> None:
    pool.create_volume("v", 4 * MiB)
    lost = threading.Event()
    plane = Plane(pool, "v")
    plane.remote._on_lost = lost.set
    plane.host.close()
    assert lost.wait(5)
    with pytest.raises(Exception, match="owner is gone"):
        plane.remote.write(0, b"x" * 512)
    plane.remote.close()
    plane.volume.close()


def _read(device: BlockDevice, offset: int, length: int) -> bytearray:
    buf = bytearray(length)
    device.read_into(offset, memoryview(buf))
    return buf


def test_snapshot_waits_for_direct_io_in_flight_in_the_plane(pool: Pool) -> None:
    """A snapshot changes which clusters the volume owns only once no direct write that
    looked its cluster up before is still running in the plane (and holds new ones back)."""
    pool.create_volume("v", 4 * MiB)
    plane = Plane(pool, "v")
    try:
        plane.remote.write(0, b"a" * 65536)
        # the gate held as by a direct write between its lookup and its pwritev
        assert_waits_for_gate(
            plane.remote._gate,
            lambda: pool.create_snapshot("v", "s"),
            "the snapshot did not wait for the plane's direct I/O",
        )
        plane.remote.write(0, b"b" * 512)  # now copy-on-write
        snap = pool.open_volume("v", "s")
        assert bytes(_read(snap, 0, 512)) == b"a" * 512
        snap.close()
    finally:
        plane.close()


def test_freed_clusters_are_reused_only_after_the_plane_let_go(pool: Pool) -> None:
    pool.create_volume("v", 4 * MiB)
    plane = Plane(pool, "v")
    try:
        plane.remote.write(0, b"a" * 65536)
        plane.remote.flush()
        plane.remote.discard(0, 65536)
        # the gate held as by a direct read that found the cluster before the discard
        assert_waits_for_gate(
            plane.remote._gate,
            pool.flush,
            "freed clusters were recycled under a running read",
        )
    finally:
        plane.close()
