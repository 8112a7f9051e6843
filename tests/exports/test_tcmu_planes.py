"""TCMU backstores served by the data-plane processes (``TcmuDataPlane``,
``exports/tcmu_plane.py``), against ``testing.tcmu_kernel`` (the kernel's side of
target_core_user on a memfd) over real thin volumes: the ring served in a worker, its
counts and QoS, a worker killed with commands in the ring, an online extend, the block-device
conformance suite."""

from __future__ import annotations

import itertools
import os
import signal
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from storvisor.engine.iostats import IoOp, StatsSet
from storvisor.engine.pool import Pool
from storvisor.engine.qos import QosBlock, QosSpec
from storvisor.engine.volume import Volume
from storvisor.exports.nbd_worker import DataPlanes
from storvisor.exports.tcmu_plane import TcmuDataPlane
from storvisor.testing import procs
from storvisor.testing.conformance import check_block_device
from storvisor.testing.tcmu_kernel import Completion, TcmuBlockDevice, TcmuKernel
from waiting import wait_until

MiB = 1 << 20
CONFIG = "storvisor/e1"
RC16 = bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + bytes(2)
TUR = bytes(6)


def write16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", 0x8A, 0, lba, blocks, 0, 0)


def read16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0)


def good(c: Completion) -> bytes:
    assert (c.status, c.sense) == (0, b""), c
    return c.data


def read(volume: Volume, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    volume.read_into(offset, memoryview(buf))
    return bytes(buf)


@pytest.fixture(scope="module")
def planes() -> Iterator[DataPlanes]:
    planes = DataPlanes(processes=2)
    planes.start()
    yield planes
    planes.close()


class Served:
    """A volume of ``pool`` on a kernel stand-in's backstore, served by a ``TcmuDataPlane``
    of ``planes``; ``close`` stops it all."""

    def __init__(
        self,
        root: Path,
        pool: Pool,
        planes: DataPlanes,
        *,
        name: str = "v",
        size: int = 16 * MiB,
        qos: QosBlock | None = None,
    ) -> None:
        root.mkdir()
        self.kernel = TcmuKernel(root, CONFIG, data_size=4 << 20)
        pool.create_volume(name, size)
        volume = pool.open_volume(name)
        assert isinstance(volume, Volume)
        self.volume = volume
        self.pool = pool
        self.stats = StatsSet(name)
        self.plane = TcmuDataPlane(
            volume,
            CONFIG,
            block_size=512,
            serial="serial-1",
            qos=qos,
            stats=self.stats,
            planes=planes,
            sysfs_root=self.kernel.sysfs_root,
            dev_root=self.kernel.dev_root,
            opener=self.kernel.open,
        )
        self.plane.start()

    @property
    def pid(self) -> int:
        (pid,) = self.plane.pids
        return pid

    def close(self) -> None:
        try:
            self.plane.close()
        finally:
            self.volume.close()
            self.kernel.close()


@pytest.fixture
def served(tmp_path: Path, pool: Pool, planes: DataPlanes) -> Iterator[Served]:
    s = Served(tmp_path / "k", pool, planes)
    yield s
    s.close()


def test_the_ring_is_served_in_a_data_plane_process(served: Served, planes: DataPlanes) -> None:
    assert served.pid in planes.pids and served.pid != os.getpid()
    maps = Path(f"/proc/{served.pid}/maps").read_text()
    assert "memfd:tcmu-area" in maps  # the worker mapped the ring
    kernel = served.kernel
    data = os.urandom(64 << 10)
    good(kernel.command(write16(256, 128), data))
    good(kernel.command(bytes([0x91]) + bytes(15)))  # SYNCHRONIZE CACHE (16)
    assert good(kernel.command(read16(256, 128), data_in=len(data))) == data
    assert read(served.volume, 256 * 512, len(data)) == data  # the owner sees the writes
    wait_until(lambda: served.stats.totals()[IoOp.FLUSH].completed, "the counts published")
    totals = served.stats.totals()
    assert (totals[IoOp.WRITE].completed, totals[IoOp.WRITE].bytes) == (1, len(data))
    assert (totals[IoOp.READ].completed, totals[IoOp.READ].bytes) == (1, len(data))
    assert totals[IoOp.FLUSH].completed == 1


def test_fragmented_commands_move_whole_and_in_order(served: Served) -> None:
    """The plane moves a command's iovecs in one vectored call of its volume: one iovec
    per 4 KiB block in descending address order lands in command order, and only the
    transfer's bytes move when the iovecs hold more (the rest of a write's buffers is not
    written, a read reports the transfer's length); the counts are the transfers'."""
    kernel = served.kernel
    before = read(served.volume, 0, 1 * MiB)
    pattern = os.urandom(256 << 10)
    cmd = kernel.submit(write16(1024, 512), pattern, fragment=True)  # 64 iovecs
    kernel.signal()
    good(kernel.wait([cmd])[0])
    assert read(served.volume, 1024 * 512, len(pattern)) == pattern
    cmd = kernel.submit(read16(1024, 512), data_in=len(pattern), fragment=True)
    kernel.signal()
    assert good(kernel.wait([cmd])[0]) == pattern
    for fragment in (True, False):
        # 12 blocks (6 KiB) in 8 KiB of buffers: two iovecs of 4 KiB, the second cut in its
        # middle, or one iovec of 8 KiB
        cmd = kernel.submit(read16(1024, 12), data_in=8192, fragment=fragment)
        kernel.signal()
        (done,) = kernel.wait([cmd])
        assert (done.read_len, good(done)) == (6144, pattern[:6144])
        extra = os.urandom(8192)
        cmd = kernel.submit(write16(0, 12), extra, fragment=fragment)
        kernel.signal()
        good(kernel.wait([cmd])[0])
        assert read(served.volume, 0, 8192) == extra[:6144] + before[6144:8192]
    wait_until(lambda: served.stats.totals()[IoOp.WRITE].completed == 3, "the counts published")
    assert served.stats.totals()[IoOp.WRITE].bytes == len(pattern) + 2 * 6144
    wait_until(lambda: served.stats.totals()[IoOp.READ].bytes == len(pattern) + 2 * 6144, "reads")


def test_a_killed_plane_leaves_its_commands_to_the_next(served: Served) -> None:
    kernel = served.kernel
    victim = served.pid
    os.kill(victim, signal.SIGSTOP)  # commands queue up in the ring, none is fetched
    patterns = {lba: os.urandom(32 << 10) for lba in range(0, 32 * 64, 64)}
    ids = {kernel.submit(write16(lba, 64), data): lba for lba, data in patterns.items()}
    kernel.signal()
    os.kill(victim, signal.SIGKILL)
    done = kernel.wait(list(ids), timeout=30)  # a new worker took the ring over
    for completion in done:
        good(completion)
    assert served.plane.pids != [victim] and served.plane.starts == 2
    assert procs.gone(victim)
    for lba, data in patterns.items():
        assert good(kernel.command(read16(lba, 64), data_in=len(data))) == data
        assert read(served.volume, lba * 512, len(data)) == data


def test_an_online_extend_reaches_the_lun(served: Served) -> None:
    kernel = served.kernel
    last, _ = struct.unpack_from(">QI", good(kernel.command(RC16, data_in=32)))
    assert (last + 1) * 512 == 16 * MiB
    served.pool.extend_volume("v", 24 * MiB)  # the owner's volume grows; the plane learns it

    def unit_attention() -> bool:
        done = kernel.command(TUR)
        if done.status == 0:
            return False
        # CHECK CONDITION, UNIT ATTENTION, CAPACITY DATA HAS CHANGED
        assert (done.status, done.sense[2] & 0x0F, done.sense[12:14]) == (2, 6, b"\x2a\x09")
        return True

    wait_until(unit_attention, "CAPACITY DATA HAS CHANGED")
    last, _ = struct.unpack_from(">QI", good(kernel.command(RC16, data_in=32)))
    assert (last + 1) * 512 == 24 * MiB
    data = os.urandom(4096)
    good(kernel.command(write16(24 * MiB // 512 - 8, 8), data))  # the new end is usable
    assert read(served.volume, 24 * MiB - 4096, 4096) == data


def test_the_volumes_qos_limits_the_plane(tmp_path: Path, pool: Pool, planes: DataPlanes) -> None:
    qos = QosBlock()
    qos.set_limits(QosSpec.parse({"write_iops_sec": 20}).limits(16 * MiB))
    s = Served(tmp_path / "k", pool, planes, qos=qos)
    try:
        started = time.monotonic()
        for n in range(40):
            good(s.kernel.command(write16(n * 8, 8), bytes(4096)))
        took = time.monotonic() - started
    finally:
        s.close()
        qos.close()
    # 40 writes at 20 per second; the first ones may come out of the bucket at once
    assert 1.0 <= took < 6.0, took


def test_thin_volume_through_a_tcmu_data_plane_conforms(
    tmp_path: Path, pool: Pool, planes: DataPlanes
) -> None:
    counter = itertools.count()

    def make(size: int) -> TcmuBlockDevice:
        n = next(counter)
        s = Served(tmp_path / f"t{n}", pool, planes, name=f"v{n}", size=size)
        return TcmuBlockDevice(s.kernel, on_close=s.close)

    check_block_device(make)
