"""TcmuHandler against ``testing.tcmu_kernel`` (the kernel's side of target_core_user on a
memfd) over real thin volumes: discovery, data, discard, out-of-order completion, restarts
(also after a kill -9), I/O errors, online extend."""

from __future__ import annotations

import errno
import mmap
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from storvisor.engine.device import BlockDevice, Buffer, DeviceWrapper, FileDevice
from storvisor.engine.pool import Pool
from storvisor.errors import (
    IOFailure,
    LocalFailure,
    NoSpace,
    NotFound,
    ProtocolError,
    Unavailable,
)
from storvisor.exports.tcmu import TcmuHandler, find_uio, map_size, open_uio
from storvisor.protocols.scsi import LunIdentity
from storvisor.protocols.tcmu import Ring
from storvisor.testing.tcmu_kernel import Completion, RingFull, TcmuKernel

MiB = 1 << 20
CONFIG = "storvisor/e1"
SRC = str(Path(__file__).resolve().parents[2] / "src")


def rw10(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", op, flags, lba, 0, blocks, 0)


def rw16(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", op, flags, lba, blocks, 0, 0)


RC16 = bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + bytes(2)


def good(c: Completion) -> bytes:
    assert (c.status, c.sense, c.unknown_op) == (0, b"", False), c
    return c.data


def check_condition(c: Completion) -> tuple[int, int, int]:
    """(sense key, ASC, ASCQ) of a CHECK CONDITION in fixed format."""
    assert c.status == 2 and c.sense[0] == 0x70, c
    return c.sense[2] & 0x0F, c.sense[12], c.sense[13]


class Tcmu:
    """A kernel stand-in and the handlers made for it; ``close`` closes them all, then the
    stand-in."""

    def __init__(self, kernel: TcmuKernel) -> None:
        self.kernel = kernel
        self.handlers: list[TcmuHandler] = []

    @property
    def handler(self) -> TcmuHandler:
        """The handler made last."""
        return self.handlers[-1]

    def make(
        self, device: BlockDevice, *, through_kernel: bool = True, threads: int = 4
    ) -> TcmuHandler:
        """A handler for ``device`` on the stand-in's uio device, not started; it opens the
        device through the stand-in, or (``through_kernel=False``) as it would a real one."""
        handler = TcmuHandler(
            device,
            CONFIG,
            identity=LunIdentity.for_volume("serial-1"),
            sysfs_root=self.kernel.sysfs_root,
            dev_root=self.kernel.dev_root,
            threads=threads,
            opener=self.kernel.open if through_kernel else open_uio,
        )
        self.handlers.append(handler)
        return handler

    def start(self, device: BlockDevice) -> TcmuHandler:
        """``make``, then start it."""
        handler = self.make(device)
        handler.start()
        return handler

    def close(self) -> None:
        try:
            for handler in self.handlers:
                handler.close()
        finally:
            self.kernel.close()


@pytest.fixture
def volume(pool: Pool) -> Iterator[BlockDevice]:
    pool.create_volume("v", 16 * MiB)
    vol = pool.open_volume("v")
    yield vol
    vol.close()


@pytest.fixture
def tcmu(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Tcmu]:
    """A kernel stand-in for ``CONFIG`` (keyword arguments of ``TcmuKernel`` by indirect
    parametrisation), no handler yet."""
    options = dict(getattr(request, "param", {}))
    t = Tcmu(TcmuKernel(tmp_path, options.pop("dev_config", CONFIG), **options))
    yield t
    t.close()


@pytest.fixture
def served(tcmu: Tcmu, volume: BlockDevice) -> Tcmu:
    """A started handler for ``volume``."""
    tcmu.start(volume)
    return tcmu


# ---------------------------------------------------------------------- discovery


def test_find_uio_picks_the_device_of_its_dev_config(tmp_path: Path) -> None:
    base = tmp_path / "class" / "uio"
    for name, text in [
        ("uio0", "uio_pci_generic\n"),
        ("uio1", "tcm-user/1/other/storvisor/e10\n"),
        ("uio2", "tcm-user/1/vol/storvisor/e1\n"),
        ("uio3", "tcm-user/2/x/file/e1\n"),
    ]:
        (base / name / "maps" / "map0").mkdir(parents=True)
        (base / name / "name").write_text(text)
        (base / name / "maps" / "map0" / "size").write_text("0x0000000001000000\n")
    assert find_uio("storvisor/e1", str(tmp_path)) == "uio2"
    assert find_uio("storvisor/e10", str(tmp_path)) == "uio1"
    assert map_size("uio2", str(tmp_path)) == 16 * MiB
    with pytest.raises(NotFound):
        find_uio("storvisor/e2", str(tmp_path))
    with pytest.raises(NotFound):
        find_uio("storvisor/e1", str(tmp_path / "nowhere"))
    with pytest.raises(NotFound):
        map_size("uio9", str(tmp_path))


@pytest.mark.parametrize("tcmu", [{"dev_config": "storvisor/other"}], indirect=True)
def test_start_without_the_device_is_not_found(tcmu: Tcmu, volume: BlockDevice) -> None:
    with pytest.raises(NotFound):
        tcmu.make(volume).start()


def test_a_node_that_is_no_uio_device_is_a_local_failure(tcmu: Tcmu, volume: BlockDevice) -> None:
    kernel = tcmu.kernel  # its dev/uio0 is an empty regular file
    with pytest.raises(LocalFailure, match="cannot map"):
        tcmu.make(volume, through_kernel=False).start()
    os.rename(os.path.join(kernel.dev_root, kernel.uio), os.path.join(kernel.dev_root, "x"))
    with pytest.raises(LocalFailure, match="No such file"):
        tcmu.make(volume, through_kernel=False).start()


# ---------------------------------------------------------------------- data


def test_identity_and_capacity(served: Tcmu) -> None:
    k = served.kernel
    inquiry = good(k.command(bytes([0x12, 0, 0, 0, 36, 0]), data_in=36))
    assert inquiry[8:16] == b"STORVISR"
    serial = good(k.command(bytes([0x12, 1, 0x80, 0, 255, 0]), data_in=255))
    assert serial[4:] == b"serial-1"
    capacity = good(k.command(RC16, data_in=32))
    assert struct.unpack_from(">QI", capacity) == (16 * MiB // 512 - 1, 512)
    assert capacity[14] & 0xC0 == 0xC0
    limits = good(k.command(bytes([0x12, 1, 0xB0, 0, 64, 0]), data_in=64))
    assert struct.unpack_from(">I", limits, 28)[0] == (64 << 10) // 512  # the cluster
    short = k.command(bytes([0x12, 0, 0, 0, 255, 0]), data_in=255)
    assert (short.read_len, len(short.data)) == (36, 36)  # READ_LEN: 36 of 255 bytes


def test_write_then_read_a_pattern(served: Tcmu, volume: BlockDevice) -> None:
    k = served.kernel
    pattern = os.urandom(256 << 10)
    cmd = k.submit(rw10(0x2A, 2048, 512), pattern, fragment=True)  # 64 iovecs
    k.signal()
    good(k.wait([cmd])[0])
    back = bytearray(len(pattern))
    volume.read_into(2048 * 512, memoryview(back))
    assert back == pattern
    assert good(k.command(rw16(0x88, 2048, 512), data_in=len(pattern))) == pattern
    assert good(k.command(rw10(0x28, 2048 + 8, 8), data_in=4096)) == pattern[4096:8192]
    cmd = k.submit(rw16(0x88, 2048, 512), data_in=len(pattern), fragment=True)
    k.signal()
    assert good(k.wait([cmd])[0]) == pattern
    good(k.command(rw10(0x35, 0, 0)))  # SYNCHRONIZE CACHE
    good(k.command(rw16(0x8A, 0, 8, 0x08), pattern[:4096]))  # FUA
    assert good(k.command(bytes([0x08, 0, 0, 0, 8, 0]), data_in=4096)) == pattern[:4096]


def test_a_batch_of_commands_in_one_signal(served: Tcmu) -> None:
    k = served.kernel
    blocks = [os.urandom(4096) for _ in range(20)]
    ids = [k.submit(rw10(0x2A, 8 * i, 8), b) for i, b in enumerate(blocks)]
    ids.append(k.submit(bytes(6)))
    k.signal()
    for c in k.wait(ids):
        good(c)
    ids = [k.submit(rw10(0x28, 8 * i, 8), data_in=4096) for i in range(20)]
    k.signal()
    assert [good(c) for c in k.wait(ids)] == blocks
    assert k.cmd_tail == k.cmd_head


def test_many_rounds_wrap_the_ring(served: Tcmu) -> None:
    k = served.kernel
    for i in range(1200):  # 64 KiB of ring: about 500 entries, so it wraps twice
        data = bytes([i % 251]) * 512
        good(k.command(rw10(0x2A, i % 64, 1), data))
    assert good(k.command(rw10(0x28, 1199 % 64, 1), data_in=512)) == bytes([1199 % 251]) * 512


def test_refused_commands(served: Tcmu) -> None:
    k = served.kernel
    assert check_condition(k.command(bytes([0xA3]) + bytes(11), data_in=64)) == (5, 0x20, 0)
    beyond = k.command(rw10(0x28, 16 * MiB // 512, 1), data_in=512)
    assert check_condition(beyond) == (5, 0x21, 0)
    good(k.command(bytes(6)))


# ---------------------------------------------------------------------- discard


def test_unmap_frees_clusters(served: Tcmu, pool: Pool) -> None:
    k = served.kernel
    data = os.urandom(MiB)
    for i in range(0, MiB, 256 << 10):
        good(k.command(rw16(0x8A, (4 * MiB + i) // 512, 512), data[i : i + (256 << 10)]))
    assert pool.volume_info("v").allocated == MiB
    lba, blocks = 4 * MiB // 512, MiB // 512
    params = struct.pack(">HHxxxx", 22, 16) + struct.pack(">QIxxxx", lba, blocks)
    good(k.command(struct.pack(">BBxxxxxHB", 0x42, 0, len(params), 0), params))
    assert pool.volume_info("v").allocated == 0
    assert good(k.command(rw16(0x88, lba, 512), data_in=256 << 10)) == bytes(256 << 10)


def test_write_same(served: Tcmu, pool: Pool, volume: BlockDevice) -> None:
    k = served.kernel
    block = bytes(range(256)) * 2
    good(k.command(rw16(0x93, 0, 2048), block))  # 1 MiB of one block
    back = bytearray(MiB)
    volume.read_into(0, memoryview(back))
    assert back == block * 2048
    assert pool.volume_info("v").allocated == MiB
    good(k.command(rw16(0x93, 0, 1024, 0x08), bytes(512)))  # UNMAP: frees half
    assert pool.volume_info("v").allocated == MiB // 2
    good(k.command(rw16(0x93, 1024, 1024), bytes(512)))  # zeros, no UNMAP: keeps clusters
    assert pool.volume_info("v").allocated == MiB // 2
    volume.read_into(0, memoryview(back))
    assert back == bytes(MiB)


# ---------------------------------------------------------------------- out of order


class Forwarding(DeviceWrapper):
    """Every request passed to ``inner``: the base of the devices below, which change
    some of them. Closing it leaves ``inner`` open."""

    def read_into(self, offset: int, buf: memoryview) -> None:
        self.inner.read_into(offset, buf)

    def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        self.inner.write(offset, data, fua=fua)

    def flush(self) -> None:
        self.inner.flush()

    def discard(self, offset: int, length: int) -> None:
        self.inner.discard(offset, length)

    def write_zeroes(
        self, offset: int, length: int, *, may_unmap: bool = True, fua: bool = False
    ) -> None:
        self.inner.write_zeroes(offset, length, may_unmap=may_unmap, fua=fua)

    def close(self) -> None:
        pass


class Stalling(Forwarding):
    """Reads of ``[0, 512)`` wait until ``release`` is set; the rest passes through."""

    def __init__(self, inner: BlockDevice) -> None:
        super().__init__(inner)
        self.release = threading.Event()
        self.stalled = threading.Event()

    def read_into(self, offset: int, buf: memoryview) -> None:
        if offset < 512:
            self.stalled.set()
            assert self.release.wait(30)
        super().read_into(offset, buf)

    def close(self) -> None:
        self.release.set()


@pytest.fixture
def stalling(tcmu: Tcmu, volume: BlockDevice) -> Iterator[Stalling]:
    """A handler started on ``volume`` behind ``Stalling``, released at the end."""
    device = Stalling(volume)
    tcmu.start(device)
    yield device
    device.release.set()


def test_a_stalled_request_does_not_hold_up_the_others(
    tcmu: Tcmu, volume: BlockDevice, stalling: Stalling
) -> None:
    k = tcmu.kernel
    volume.write(0, b"first block".ljust(512, b"."))
    slow = k.submit(rw10(0x28, 0, 1), data_in=512)
    k.signal()
    assert stalling.stalled.wait(10)
    data = os.urandom(4096)
    fast = [k.submit(rw10(0x2A, 64, 8), data), k.submit(rw10(0x28, 128, 8), data_in=4096)]
    k.signal()
    good(k.wait(fast[:1])[0])
    good(k.wait(fast)[1])
    assert good(k.command(rw10(0x28, 64, 8), data_in=4096)) == data
    assert slow in k.in_flight  # still stalled; the others went past it
    assert k.cmd_tail != k.cmd_head
    stalling.release.set()
    assert good(k.wait([slow])[0]) == b"first block".ljust(512, b".")
    assert k.cmd_tail == k.cmd_head and not k.in_flight


def test_close_leaves_a_stalled_request_to_the_next_handler(
    tcmu: Tcmu, volume: BlockDevice
) -> None:
    stalling = Stalling(volume)
    first = tcmu.start(stalling)
    k = tcmu.kernel
    try:
        volume.write(0, b"x" * 512)
        slow = k.submit(rw10(0x28, 0, 1), data_in=512)
        k.signal()
        assert stalling.stalled.wait(10)
        started = time.monotonic()
        first.close(timeout=0.5)
        assert time.monotonic() - started < 5
        stalling.release.set()  # the old worker finishes, into no ring
        tcmu.start(volume)
        assert good(k.wait([slow])[0]) == b"x" * 512
        assert not k.in_flight and k.cmd_tail == k.cmd_head
    finally:
        stalling.release.set()


class Recording(Forwarding):
    """Records the thread of every read and write."""

    def __init__(self, inner: BlockDevice) -> None:
        super().__init__(inner)
        self.threads: set[int] = set()

    def read_into(self, offset: int, buf: memoryview) -> None:
        self.threads.add(threading.get_ident())
        super().read_into(offset, buf)

    def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        self.threads.add(threading.get_ident())
        super().write(offset, data, fua=fua)


def test_a_batch_runs_where_it_was_fetched(tcmu: Tcmu, volume: BlockDevice) -> None:
    """No hand-off per batch: the thread that owns the ring runs the I/O it fetched."""
    recording = Recording(volume)
    tcmu.start(recording)
    k = tcmu.kernel
    data = os.urandom(4096)
    for _ in range(5):
        ids = [k.submit(rw10(0x2A, 8 * i, 8), data) for i in range(16)]
        ids += [k.submit(rw10(0x28, 8 * i, 8), data_in=4096) for i in range(16)]
        k.signal()
        done = k.wait(ids)
        assert all(good(c) == data for c in done[16:])
    assert len(recording.threads) == 1 and threading.get_ident() not in recording.threads


def _serving_threads(handler: TcmuHandler) -> int:
    return sum(t.is_alive() and t.name == f"tcmu-{handler.uio}" for t in threading.enumerate())


def test_the_rest_of_a_stalled_batch_is_served_by_another_thread(
    tcmu: Tcmu, volume: BlockDevice, stalling: Stalling
) -> None:
    k = tcmu.kernel
    data = os.urandom(4096)
    volume.write(64 * 512, data)
    slow = k.submit(rw10(0x28, 0, 1), data_in=512)  # first in the batch
    fast = [k.submit(rw10(0x28, 64, 8), data_in=4096), k.submit(rw10(0x2A, 128, 8), data)]
    k.signal()
    assert stalling.stalled.wait(10)
    assert good(k.wait(fast)[0]) == data
    assert slow in k.in_flight
    stalling.release.set()
    good(k.wait([slow])[0])
    assert good(k.command(rw10(0x28, 128, 8), data_in=4096)) == data
    assert not k.in_flight and k.cmd_tail == k.cmd_head


def test_what_ran_before_a_stalled_request_completes(
    tcmu: Tcmu, volume: BlockDevice, stalling: Stalling
) -> None:
    k = tcmu.kernel
    data = os.urandom(4096)
    volume.write(64 * 512, data)
    before = k.submit(rw10(0x28, 64, 8), data_in=4096)
    slow = k.submit(rw10(0x28, 0, 1), data_in=512)  # last in the batch
    k.signal()
    assert stalling.stalled.wait(10)
    assert good(k.wait([before])[0]) == data
    assert slow in k.in_flight
    stalling.release.set()
    good(k.wait([slow])[0])


def test_threads_stuck_in_requests_are_bounded(tcmu: Tcmu, volume: BlockDevice) -> None:
    """With ``threads=2`` one stuck request is passed, a second one on the thread that took
    over holds everything up: no third thread starts; all complete once the device does."""
    stalling = Stalling(volume)
    handler = tcmu.make(stalling, threads=2)
    handler.start()
    k = tcmu.kernel
    try:
        first = k.submit(rw10(0x28, 0, 1), data_in=512)
        k.signal()
        assert stalling.stalled.wait(10)
        good(k.command(bytes(6)))  # passed by the standby
        second = k.submit(rw10(0x28, 0, 1), data_in=512)
        k.signal()
        time.sleep(0.5)  # the owner runs it and is stuck too
        third = k.submit(bytes(6))
        k.signal()
        time.sleep(0.5)
        assert {first, second, third} <= k.in_flight
        assert _serving_threads(handler) <= 2
        stalling.release.set()
        for c in k.wait([first, second, third]):
            good(c)
        good(k.command(rw10(0x28, 0, 1), data_in=512))
        assert _serving_threads(handler) <= 2
    finally:
        stalling.release.set()


# ---------------------------------------------------------------------- restarts


def test_commands_queued_before_start_are_served(tcmu: Tcmu, volume: BlockDevice) -> None:
    k = tcmu.kernel
    tcmu.start(volume).close()
    data, old = os.urandom(4096), os.urandom(4096)
    volume.write(64 * 512, old)
    ids = [k.submit(rw10(0x2A, 8, 8), data), k.submit(rw10(0x28, 64, 8), data_in=4096)]
    tcmu.start(volume)  # no signal: the handler looks at the ring first
    assert [c.status for c in k.wait(ids)] == [0, 0]
    assert k.completions[ids[1]].data == old
    assert good(k.command(rw10(0x28, 8, 8), data_in=4096)) == data


def test_completions_a_predecessor_never_announced_reach_the_kernel(
    tcmu: Tcmu, volume: BlockDevice
) -> None:
    """A handler that died after writing its responses but before notifying the kernel:
    the next one notifies at start, without rerunning anything."""
    kernel = tcmu.kernel
    event_fd, map_fd = kernel.open(os.path.join(kernel.dev_root, kernel.uio))
    area = mmap.mmap(map_fd, kernel.size)
    view = memoryview(area)
    try:
        many = kernel.submit(rw10(0x28, 0, 64), data_in=32768, fragment=True)  # 8 iovecs
        small = kernel.submit(bytes(6))
        ring = Ring(view)
        assert len(ring.next_entries()) == 2
        ring.complete(small, 0)  # does not fit the big request's place: waits, marked done
        ring.complete(many, 2, bytes([0x70, 0, 3]) + bytes(15))
        assert kernel.cmd_tail == kernel.cmd_head
        del ring
    finally:
        view.release()
        area.close()
        os.close(event_fd)
        os.close(map_fd)
    tcmu.start(volume)
    first, second = kernel.wait([many, small])
    assert check_condition(first) == (3, 0, 0)  # the predecessor's answer, not a rerun
    good(second)


CHILD = textwrap.dedent(
    """
    import sys, time, threading
    from storvisor.engine.device import FileDevice, DeviceWrapper
    from storvisor.exports.tcmu import TcmuHandler
    from storvisor.protocols.scsi import LunIdentity

    path, sysfs, dev, event_fd, map_fd = sys.argv[1:6]

    class StallFirstBlock(DeviceWrapper):
        def read_into(self, offset, buf):
            if offset < 512:
                print("stalled", flush=True)
                threading.Event().wait()
            self.inner.read_into(offset, buf)
        def write(self, offset, data, *, fua=False):
            self.inner.write(offset, data, fua=fua)
        def flush(self):
            self.inner.flush()

    handler = TcmuHandler(
        StallFirstBlock(FileDevice(path)), "storvisor/e1",
        identity=LunIdentity.for_volume("s"), sysfs_root=sysfs, dev_root=dev,
        opener=lambda p: (int(event_fd), int(map_fd)),
    )
    handler.start()
    print("started", flush=True)
    time.sleep(600)
    """
)


def spawn(script: str, disk: Path, kernel: TcmuKernel) -> subprocess.Popen[str]:
    """Run ``script`` (``CHILD`` or ``SERVE``) in a child process serving ``disk`` on a
    fresh event channel of ``kernel``'s ring; its output is a pipe of text lines."""
    event_fd, map_fd = kernel.open(os.path.join(kernel.dev_root, kernel.uio))
    try:
        return subprocess.Popen(
            [sys.executable, "-c", script, str(disk), kernel.sysfs_root, kernel.dev_root]
            + [str(fd) for fd in (event_fd, map_fd)],
            pass_fds=(event_fd, map_fd),
            stdout=subprocess.PIPE,
            text=True,
            env=dict(os.environ, PYTHONPATH=SRC),
        )
    finally:
        os.close(event_fd)
        os.close(map_fd)


def test_a_killed_handler_leaves_the_ring_to_the_next(tmp_path: Path, tcmu: Tcmu) -> None:
    disk = tmp_path / "disk.img"
    content = os.urandom(4 * MiB)
    disk.write_bytes(content)
    kernel = tcmu.kernel
    child = spawn(CHILD, disk, kernel)
    device = None
    handler = None
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "started\n"
        slow = kernel.submit(rw10(0x28, 0, 1), data_in=512)
        kernel.signal()
        assert child.stdout.readline() == "stalled\n"
        data = os.urandom(4096)
        written = kernel.submit(rw10(0x2A, 8, 8), data)  # completes past the stalled read
        kernel.signal()
        good(kernel.wait([written])[0])
        assert slow in kernel.in_flight
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        queued = kernel.submit(rw10(0x28, 8, 8), data_in=4096)  # while no handler runs
        device = FileDevice(str(disk))
        handler = tcmu.start(device)
        first, second = kernel.wait([slow, queued])
        assert good(first) == content[:512]
        assert good(second) == data
        assert written not in kernel.in_flight and not kernel.in_flight
        assert kernel.cmd_tail == kernel.cmd_head
        assert handler.error is None
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if handler is not None:
            handler.close()
        if device is not None:
            device.close()


SERVE = textwrap.dedent(
    """
    import sys, time
    from storvisor.engine.device import FileDevice
    from storvisor.exports.tcmu import TcmuHandler
    from storvisor.protocols.scsi import LunIdentity

    path, sysfs, dev, event_fd, map_fd = sys.argv[1:6]
    handler = TcmuHandler(
        FileDevice(path), "storvisor/e1",
        identity=LunIdentity.for_volume("s"), sysfs_root=sysfs, dev_root=dev,
        opener=lambda p: (int(event_fd), int(map_fd)),
    )
    handler.start()
    print("started", flush=True)
    time.sleep(600)
    """
)


@pytest.mark.parametrize("tcmu", [{"ring_size": 16 << 10}], indirect=True)
def test_handlers_killed_at_random_moments_answer_every_command_once(
    tmp_path: Path, tcmu: Tcmu
) -> None:
    """Handlers killed (-9) at random moments while commands stream in: in the end every
    command is answered exactly once (its own status or BUSY), and the ring is consistent
    (the stand-in raises RingBroken on an unknown or repeated cmd_id)."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4 * MiB))
    kernel = tcmu.kernel
    rng = random.Random(7)
    submitted: list[int] = []
    for _ in range(4):
        child = spawn(SERVE, disk, kernel)
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == "started\n"
            until = time.monotonic() + rng.uniform(0.05, 0.3)
            while time.monotonic() < until:
                lba = rng.randrange(0, 4 * MiB // 512 - 8) & ~7
                try:
                    if rng.random() < 0.5:
                        cmd = kernel.submit(rw10(0x2A, lba, 8), os.urandom(4096))
                    else:
                        cmd = kernel.submit(rw10(0x28, lba, 8), data_in=4096)
                except RingFull:
                    kernel.reap()
                    time.sleep(0.001)
                    continue
                submitted.append(cmd)
                kernel.signal()
                kernel.reap()
        finally:
            child.kill()
            child.wait()
        kernel.reap()
    device = FileDevice(str(disk))
    handler = tcmu.start(device)
    try:
        pending = sorted(kernel.in_flight)
        kernel.wait(pending, timeout=30)
    finally:
        handler.close()
        device.close()
    assert not kernel.in_flight
    assert kernel.cmd_tail == kernel.cmd_head
    statuses = {kernel.completions[c].status for c in set(submitted)}
    assert statuses <= {0x00, 0x08}, statuses
    assert len(submitted) > 20


# ---------------------------------------------------------------------- failures


class Failing(Forwarding):
    """Writes at or beyond 1 MiB raise ``error``; flushes raise it when ``fail_flush``."""

    def __init__(self, inner: BlockDevice, error: Exception) -> None:
        super().__init__(inner)
        self.error = error
        self.fail_flush = False

    def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        if offset >= MiB:
            raise self.error
        super().write(offset, data, fua=fua)

    def flush(self) -> None:
        if self.fail_flush:
            raise self.error
        super().flush()


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (IOFailure("disk failed", errno.EIO), (3, 0x0C, 0)),  # MEDIUM ERROR, WRITE ERROR
        (NoSpace(), (7, 0x27, 0x07)),  # DATA PROTECT, SPACE ALLOCATION FAILED
        (RuntimeError("bug"), (4, 0x44, 0)),  # HARDWARE ERROR, INTERNAL TARGET FAILURE
        (Unavailable("no S3 endpoint"), None),  # BUSY: retried by the initiator
    ],
)
def test_device_errors_fail_one_command(
    tcmu: Tcmu,
    volume: BlockDevice,
    error: Exception,
    expected: tuple[int, int, int] | None,
) -> None:
    failing = Failing(volume, error)
    handler = tcmu.start(failing)
    k = tcmu.kernel

    def answer(c: Completion) -> tuple[int, int, int] | None:
        if expected is None:
            assert (c.status, c.sense) == (0x08, b""), c
            return None
        return check_condition(c)

    assert answer(k.command(rw10(0x2A, MiB // 512, 8), bytes(4096))) == expected
    good(k.command(rw10(0x2A, 0, 8), bytes(4096)))  # the handler carries on
    failing.fail_flush = True
    assert answer(k.command(rw10(0x35, 0, 0))) == expected
    assert handler.error is None


def test_a_read_error_is_a_medium_error(tcmu: Tcmu) -> None:
    class BadRead(Failing):
        def read_into(self, offset: int, buf: memoryview) -> None:
            raise IOFailure("unreadable", errno.EIO)

    from storvisor.testing.memory import MemoryDevice

    tcmu.start(BadRead(MemoryDevice(MiB), IOFailure("x")))
    c = tcmu.kernel.command(rw10(0x28, 0, 1), data_in=512)
    assert check_condition(c) == (3, 0x11, 0)  # UNRECOVERED READ ERROR


def test_a_broken_ring_stops_the_handler(served: Tcmu) -> None:
    k = served.kernel
    good(k.command(bytes(6)))
    before = k.cmd_head
    cmd = k.submit(rw10(0x28, 0, 1), data_in=512)
    # the entry's iovec now points beyond the area, as no kernel would write it
    entry = k.cmdr_off + before
    struct.pack_into("<QQ", k._map, entry + 48, k.size, 512)
    k.signal()
    deadline = time.monotonic() + 10
    while served.handler.error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert isinstance(served.handler.error, ProtocolError)
    assert cmd in k.in_flight


# ---------------------------------------------------------------------- extend


def test_online_extend_reaches_the_lun(served: Tcmu, pool: Pool) -> None:
    k = served.kernel
    good(k.command(RC16, data_in=32))
    pool.extend_volume("v", 32 * MiB)
    served.handler.notify_resized()
    time.sleep(0.05)
    attention = k.command(RC16, data_in=32)
    assert check_condition(attention) == (6, 0x2A, 0x09)  # CAPACITY DATA HAS CHANGED
    capacity = good(k.command(RC16, data_in=32))
    assert struct.unpack_from(">Q", capacity)[0] == 32 * MiB // 512 - 1
    data = os.urandom(4096)
    good(k.command(rw16(0x8A, 24 * MiB // 512, 8), data))
    assert good(k.command(rw16(0x88, 24 * MiB // 512, 8), data_in=4096)) == data


def test_extend_is_seen_without_notification(served: Tcmu, pool: Pool) -> None:
    k = served.kernel
    pool.extend_volume("v", 20 * MiB)
    assert check_condition(k.command(bytes(6))) == (6, 0x2A, 0x09)
    capacity = good(k.command(bytes([0x25]) + bytes(9), data_in=8))
    assert struct.unpack(">II", capacity) == (20 * MiB // 512 - 1, 512)


def test_task_management_entries_are_passed(served: Tcmu) -> None:
    k = served.kernel
    k.submit_tmr(1, [5, 6])
    cmd = k.submit(bytes(6))
    k.signal()
    good(k.wait([cmd])[0])
    assert k.cmd_tail == k.cmd_head
