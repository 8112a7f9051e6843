"""The data-plane channel and ``RemoteVolume``, both ends in this process (the process
boundary itself is covered by the vhost-user-blk export tests through the daemon)."""

from __future__ import annotations

import os
import socket
import struct
import threading
from itertools import count
from pathlib import Path

import pytest

from gates import assert_waits_for_gate
from powercuts import Mount, point, require_fuse
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


def _block(block: int, gen: int) -> bytes:
    """The content of 4 KiB ``block`` after its write of generation ``gen`` (zeros for 0)."""
    return bytes(4096) if gen == 0 else struct.pack("<QQ", block, gen) * 256


def _generation(block: int, data: bytes | bytearray) -> int | None:
    """Which generation of ``block`` ``data`` is, or None if it is none of them."""
    if not any(data):
        return 0
    owner, gen = struct.unpack_from("<QQ", data)
    return gen if owner == block and data == _block(block, gen) else None


def test_snapshots_during_concurrent_plane_writes_keep_every_write(pool: Pool) -> None:
    """Writers in the plane race snapshots in the owner. Each snapshot holds, for every
    block, exactly the content of a write to it from the last one completed before the
    snapshot call to the last one issued before it returned; a completed write reads back;
    and the volume ends with every write (none lands in a snapshot's cluster after the
    snapshot was taken)."""
    pool.create_volume("v", 16 * MiB)
    plane = Plane(pool, "v")
    remote = plane.remote
    blocks = 16 * MiB // 4096
    for start in range(0, 16 * MiB, MiB):
        remote.write(start, bytes(MiB))
    issued: dict[int, int] = {}  # block -> generation of its latest write issued
    done: dict[int, int] = {}  # block -> generation of its latest write completed
    lock = threading.Lock()
    stop = threading.Event()
    lost: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        back = bytearray(4096)
        gen = 1
        try:
            while not stop.is_set():
                for block in range(k, blocks, 4):
                    with lock:
                        issued[block] = gen
                    remote.write(block * 4096, _block(block, gen))
                    with lock:
                        done[block] = gen
                    remote.read_into(block * 4096, memoryview(back))
                    if back != _block(block, gen):
                        lost.append((block, gen))  # a completed write must read back
                gen += 1
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        for i in range(30):
            with lock:
                before = dict(done)
            pool.create_snapshot("v", f"s{i}")
            with lock:
                after = dict(issued)
            snap = pool.open_volume("v", f"s{i}")
            data = _read(snap, 0, 16 * MiB)
            snap.close()
            for block in range(blocks):
                got = _generation(block, data[block * 4096 : (block + 1) * 4096])
                low, high = before.get(block, 0), after.get(block, 0)
                assert got is not None and low <= got <= high, (
                    f"snapshot s{i}, block {block}: generation {got}, not in [{low}, {high}]"
                )
            # merged into the volume under the writers; keeps 30 rounds within the pool
            pool.delete_snapshot("v", f"s{i}")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not any(t.is_alive() for t in threads), "a writer hung"
    assert not errors, errors
    assert not lost, f"writes lost to copy-on-write races: (block, generation) {lost[:10]}"
    remote.flush()
    data = _read(remote, 0, 16 * MiB)
    for block, gen in done.items():
        assert data[block * 4096 : (block + 1) * 4096] == _block(block, gen), block
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


def test_flush_makes_plane_writes_durable(tmp_path: Path) -> None:
    """A data plane writes in place itself; its flush, done by the pool's owner, must sync
    those writes too (the owner never saw them) before it returns. Checked against a power
    cut (``powercuts.Mount``): a reopen on the same machine would find them in the page cache
    whether they were synced or not."""
    require_fuse()
    backing, mountpoint, disk = tmp_path / "backing", tmp_path / "mnt", tmp_path / "disk"
    backing.mkdir()
    mountpoint.mkdir()
    point(disk, mountpoint)
    mount = Mount(backing, mountpoint)
    try:
        home = Home(disk / "home")
        home.create_pool("p", [BackingSpec(str(disk / "b0.img"), size=16 * MiB)], 4096)
        pool = home.pool("p")
        pool.create_volume("v", 4 * MiB)
        plane = Plane(pool, "v")
        plane.remote.write(0, b"x" * 8192)  # allocates: done by the owner
        plane.remote.flush()
        plane.remote.write(0, b"y" * 4096)  # in place: done by the data plane alone
        plane.remote.flush()
        plane.remote.write(4096, b"z" * 4096)  # never flushed: may be lost
        mount.cut()
        plane.remote.close()
        plane.host.close()
    finally:
        mount.close()
    point(disk, backing)
    again = Home(disk / "home")
    try:
        v = again.pool("p").open_volume("v")
        got = bytes(_read(v, 0, 8192))
        v.close()
        assert got[:4096] == b"y" * 4096, "a flushed in-place write of the plane was lost"
        assert got[4096:] in (b"x" * 4096, b"z" * 4096)
        assert again.pool("p").fsck().clean
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
