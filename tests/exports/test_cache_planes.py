"""Data planes on a pool with a cache tier (``engine/cachelines.py``, ``exports/dataplane.py``):
NBD and vhost-user-blk served by real data-plane processes read cached lines and write
open-epoch lines of a writeback cache themselves, send the rest to the pool's process, and
every byte read, the snapshots, a detach of the cache and fsck agree with a model. A flush
waits for a plane's write in place before the epoch closes. (kill -9 of the daemon serving
a cached pool through its planes: ``tests/engine/test_crash.py``.)"""

from __future__ import annotations

import os
import random
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gates import assert_waits_for_gate
from storvisor.engine.cache import CacheSpec
from storvisor.engine.pool import Pool
from storvisor.engine.types import CacheMode
from storvisor.exports.dataplane import PlaneHost, RemoteVolume
from storvisor.exports.nbd_worker import DataPlanes
from storvisor.exports.vhost_worker import VhostDataPlane
from storvisor.protocols.virtio.blk import Status
from storvisor.testing.vhost_frontend import VhostUserFrontend

MiB = 1 << 20
CS = 64 << 10
SIZE = 8 * MiB


def _nbd():  # type: ignore[no-untyped-def]
    if os.environ.get("CI") == "true":
        import nbd  # a missing prerequisite fails in CI

        return nbd
    return pytest.importorskip("nbd")


@pytest.fixture
def planes() -> Iterator[DataPlanes]:
    planes = DataPlanes(processes=1)
    planes.start()
    try:
        yield planes
    finally:
        planes.close()


@pytest.fixture
def sockdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="cplanes-", dir="/tmp"))  # short socket paths
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _owner_requests(pool: Pool) -> int:
    """Reads and writes of a cached pool that the pool's own process served (``info`` counts
    the hits the planes served too: it asks them, ``Op.HITS``)."""
    info = pool.info().cache
    assert info is not None and pool.cache is not None
    return info.hits + info.misses - pool.cache.plane_hits


def _fill(pool: Pool, model: bytearray) -> None:
    """Write the whole volume once, in process (every cluster allocated), and flush."""
    rng = random.Random(7)
    vol = pool.open_volume("v")
    try:
        for offset in range(0, SIZE, CS):
            chunk = rng.randbytes(CS)
            vol.write(offset, chunk)
            model[offset : offset + CS] = chunk
        vol.flush()
    finally:
        vol.close()


@pytest.mark.parametrize("mode", [CacheMode.WRITEBACK, CacheMode.WRITETHROUGH])
def test_nbd_through_planes_on_a_cached_pool(
    pool: Pool, planes: DataPlanes, tmp_path: Path, mode: CacheMode
) -> None:
    nbd = _nbd()
    pool.create_volume("v", SIZE)
    model = bytearray(SIZE)
    _fill(pool, model)
    pool.set_cache(CacheSpec(str(tmp_path / "cache.img"), 2 * SIZE), mode)
    planes.add_export("v", lambda: pool.open_volume("v"), "", read_only=False)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    assert planes.hand_over(theirs)
    h = nbd.NBD()
    h.set_export_name("v")
    h.connect_socket(ours.detach())
    rng = random.Random(11)
    try:
        assert h.pread(SIZE, 0) == model  # misses: the owner fills every line
        hot = [rng.randrange(SIZE // 4096) * 4096 for _ in range(64)]
        for offset in hot:  # first write of each line in the epoch: the owner marks it
            data = rng.randbytes(4096)
            h.pwrite(data, offset)
            model[offset : offset + 4096] = data

        before = _owner_requests(pool)
        told_before = pool.cache.plane_hits  # type: ignore[union-attr]
        for i in range(2000):
            offset = rng.choice(hot) + rng.randrange(8) * 512
            data = rng.randbytes(512)
            h.pwrite(data, offset)
            model[offset : offset + 512] = data
            offset = rng.randrange(SIZE // 512) * 512
            assert h.pread(512, offset) == model[offset : offset + 512], (i, offset)
        served = _owner_requests(pool) - before
        owners = 2000 if mode is CacheMode.WRITETHROUGH else 0  # the backing comes first
        assert served < owners + 100, f"the pool's process served {served} of 4000 cache hits"
        if mode is CacheMode.WRITETHROUGH:
            assert pool.info().cache.dirty == 0  # type: ignore[union-attr]
        assert pool.cache is not None
        told = pool.cache.plane_hits - told_before  # asked for by pool.info()
        assert told == 4000 - served, "the planes' hits are not all counted"

        # across flushes (epochs close, lines are copied), a snapshot and unaligned requests
        # over two clusters
        for round_ in range(6):
            for _ in range(200):
                length = rng.choice([512, 4096, 8192, 3 * 4096])
                offset = rng.randrange((SIZE - length) // 512) * 512
                if rng.random() < 0.3:
                    offset = rng.randrange(1, SIZE // CS) * CS - 4096
                data = rng.randbytes(length)
                h.pwrite(data, offset, flags=nbd.CMD_FLAG_FUA if rng.random() < 0.05 else 0)
                model[offset : offset + length] = data
            h.flush()
            if round_ == 2:
                pool.create_snapshot("v", "s")
                frozen = bytes(model)
            assert h.pread(SIZE, 0) == model, round_
        snap = pool.open_volume("v", "s")
        try:
            got = bytearray(SIZE)
            snap.read_into(0, memoryview(got))
            assert got == frozen, "a write through a plane reached the snapshot"
        finally:
            snap.close()

        # detached online: everything the planes wrote was destaged, and they serve from
        # the backing device from then on
        pool.set_cache(None, CacheMode.NONE)
        assert h.pread(SIZE, 0) == model
        data = rng.randbytes(4096)
        h.pwrite(data, 4096)
        model[4096:8192] = data
        h.flush()
        assert h.pread(SIZE, 0) == model
    finally:
        h.shutdown()
    planes.remove_export("v")
    vol = pool.open_volume("v")
    got = bytearray(SIZE)
    vol.read_into(0, memoryview(got))
    vol.close()
    assert got == model
    assert pool.fsck().clean


def test_vhost_through_planes_on_a_small_writeback_cache(
    pool: Pool, planes: DataPlanes, tmp_path: Path, sockdir: Path
) -> None:
    """A cache of 16 lines in front of a 128-line volume: lines are evicted, filled, copied
    and destaged under the planes' reads and writes all the time."""
    pool.create_volume("v", SIZE)
    model = bytearray(SIZE)
    _fill(pool, model)
    pool.set_cache(CacheSpec(str(tmp_path / "cache.img"), 16 * CS + (1 << 20)), CacheMode.WRITEBACK)
    volume = pool.open_volume("v")
    export = VhostDataPlane(volume, str(sockdir / "v.sock"), num_queues=2, planes=planes)
    export.start()
    rng = random.Random(5)
    try:
        with VhostUserFrontend(export.socket_path, queue_size=16, num_queues=2) as fe:
            fe.setup()
            # a working set of 12 lines at first (mostly hits), then the whole volume
            for phase, span in enumerate([12 * CS, SIZE]):
                for i in range(1500):
                    length = rng.choice([512, 4096, 4096, 16384])
                    offset = rng.randrange((span - length) // 512) * 512
                    queue = i % 2
                    if rng.random() < 0.5:
                        data = rng.randbytes(length)
                        assert fe.blk.write(offset, data, queue=queue) == Status.OK
                        model[offset : offset + length] = data
                    else:
                        status, got = fe.blk.read(offset, length, queue=queue)
                        assert status == Status.OK
                        assert got == model[offset : offset + length], (phase, i, offset)
                    if rng.random() < 0.02:
                        assert fe.blk.flush() == Status.OK
            assert fe.blk.flush() == Status.OK
            pool.flush_cache()
            for offset in range(0, SIZE, 1 << 20):
                status, got = fe.blk.read(offset, 1 << 20)
                assert status == Status.OK
                assert got == model[offset : offset + (1 << 20)], offset
    finally:
        export.close()
        volume.close()
    pool.set_cache(None, CacheMode.NONE)  # what stays is what the backing device holds
    vol = pool.open_volume("v")
    got = bytearray(SIZE)
    vol.read_into(0, memoryview(got))
    vol.close()
    assert got == model
    assert pool.fsck().clean


class _Plane:
    """A volume served through a PlaneHost to a RemoteVolume in this process."""

    def __init__(self, pool: Pool, name: str) -> None:
        self.volume = pool.open_volume(name)
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.host = PlaneHost(self.volume, a)
        self.host.start()
        self.remote = RemoteVolume(b, os.dup(self.host.map.fd), {}, pool.cluster_size)

    def close(self) -> None:
        self.remote.close()
        self.host.close()
        self.volume.close()


def test_a_flush_waits_for_a_planes_write_in_place(pool: Pool, tmp_path: Path) -> None:
    """The epoch a flush closes is synced and destaged only once no plane write that found
    it open still runs (held here by holding the plane's gate, as such a write does)."""
    pool.create_volume("v", SIZE)
    pool.set_cache(CacheSpec(str(tmp_path / "cache.img"), 2 * SIZE), CacheMode.WRITEBACK)
    plane = _Plane(pool, "v")
    try:
        plane.remote.write(0, b"\x01" * CS)  # allocates; the line is dirty in the open epoch
        before = _owner_requests(pool)
        plane.remote.write(4096, b"\x02" * 4096)  # in place, in the plane
        assert _owner_requests(pool) == before
        assert_waits_for_gate(
            plane.remote._gate,
            pool.flush,
            "a flush closed the cache's epoch while a plane's write in place was in flight",
        )
        pool.flush_cache()  # the line is clean now: only the owner may mark it dirty again
        plane.remote.write(8192, b"\x03" * 4096)
        assert _owner_requests(pool) == before + 1
        epoch = pool.cache.open_epoch  # type: ignore[union-attr]
        plane.remote.write(8192, b"\x03" * 4096, fua=True)  # in place, then a flush
        assert _owner_requests(pool) == before + 1
        assert pool.cache.open_epoch > epoch, "a FUA write in place was not flushed"  # type: ignore[union-attr]
        pool.flush_cache()
        got = bytearray(CS)
        plane.remote.read_into(0, memoryview(got))
        assert got == b"\x01" * 4096 + b"\x02" * 4096 + b"\x03" * 4096 + b"\x01" * (CS - 12288)
    finally:
        plane.close()
    pool.set_cache(None, CacheMode.NONE)
    vol = pool.open_volume("v")
    got = bytearray(CS)
    vol.read_into(0, memoryview(got))
    vol.close()
    assert got == b"\x01" * 4096 + b"\x02" * 4096 + b"\x03" * 4096 + b"\x01" * (CS - 12288)


def test_concurrent_nbd_clients_on_a_tiny_writeback_cache(
    pool: Pool, planes: DataPlanes, tmp_path: Path
) -> None:
    """Four NBD connections write and read their own 4 KiB blocks, interleaved in shared
    lines, through a 16-line cache in front of a 64-line volume, with flushes: lines are
    evicted, refilled, copied and destaged while the planes read and write them. Every read
    sees its connection's last write, and the backing device ends with all of them."""
    nbd = _nbd()
    size = 4 * MiB
    pool.create_volume("v", size)
    vol = pool.open_volume("v")
    vol.write(0, bytes(size))  # every cluster allocated: the planes' writes are in place
    vol.flush()
    vol.close()
    pool.set_cache(CacheSpec(str(tmp_path / "cache.img"), 16 * CS + (1 << 20)), CacheMode.WRITEBACK)
    planes.add_export("v", lambda: pool.open_volume("v"), "", read_only=False)
    blocks = size // 4096
    clients = 4
    models = [bytearray(size) for _ in range(clients)]
    errors: list[str] = []

    def client(index: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        assert planes.hand_over(theirs)
        h = nbd.NBD()
        h.set_export_name("v")
        h.connect_socket(ours.detach())
        rng = random.Random(index)
        model = models[index]
        mine = range(index, blocks, clients)
        try:
            for i in range(1500):
                offset = rng.choice(mine) * 4096
                if rng.random() < 0.5:
                    data = rng.randbytes(4096)
                    h.pwrite(data, offset)
                    model[offset : offset + 4096] = data
                elif h.pread(4096, offset) != model[offset : offset + 4096]:
                    errors.append(f"client {index}, request {i}: stale data at {offset}")
                    return
                if rng.random() < 0.01:
                    h.flush()
        except Exception as e:
            errors.append(f"client {index}: {e!r}")
        finally:
            h.shutdown()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert not errors, errors
    planes.remove_export("v")
    pool.set_cache(None, CacheMode.NONE)
    vol = pool.open_volume("v")
    got = bytearray(size)
    vol.read_into(0, memoryview(got))
    vol.close()
    for block in range(blocks):
        at = block * 4096
        expected = models[block % clients][at : at + 4096]
        assert got[at : at + 4096] == expected, f"block {block} lost a write"
    assert pool.fsck().clean
