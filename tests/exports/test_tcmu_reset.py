"""TcmuHandler and ``action/reset_ring`` on the kernel stand-in: a ring that breaks the layout
is reset (the commands in flight answered BUSY by the kernel) and served on; a request still
running holds the reset back; without a way to reset, the handler stops as before."""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from storvisor.engine.device import BlockDevice, Buffer, DeviceWrapper
from storvisor.engine.pool import Pool
from storvisor.errors import LocalFailure, ProtocolError
from storvisor.exports.tcmu import TcmuHandler
from storvisor.protocols.scsi import LunIdentity
from storvisor.testing.tcmu_kernel import Completion, TcmuKernel
from waiting import wait_until

MiB = 1 << 20
CONFIG = "storvisor/e1"
BUSY = 0x08


def rw10(op: int, lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", op, 0, lba, 0, blocks, 0)


def good(c: Completion) -> bytes:
    assert (c.status, c.sense, c.unknown_op) == (0, b"", False), c
    return c.data


class Gate(DeviceWrapper):
    """Reads of the first block wait for ``release``."""

    def __init__(self, inner: BlockDevice) -> None:
        super().__init__(inner)
        self.release = threading.Event()
        self.entered = threading.Event()

    def read_into(self, offset: int, buf: memoryview) -> None:
        if offset < 512:
            self.entered.set()
            assert self.release.wait(30)
        self.inner.read_into(offset, buf)

    def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        self.inner.write(offset, data, fua=fua)

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.release.set()


class Served:
    """The kernel stand-in and a started handler whose ``reset_ring`` resets the stand-in
    (None: the handler gets no way to reset)."""

    def __init__(self, tmp: Path, device: BlockDevice, *, resettable: bool = True) -> None:
        self.kernel = TcmuKernel(tmp, CONFIG)
        self.reset_calls = 0
        self.handler = TcmuHandler(
            device,
            CONFIG,
            identity=LunIdentity.for_volume("serial-1"),
            sysfs_root=self.kernel.sysfs_root,
            dev_root=self.kernel.dev_root,
            opener=self.kernel.open,
            reset_ring=self._reset if resettable else None,
            reset_timeout=2.0,
        )
        self.handler.start()

    def _reset(self) -> None:
        self.reset_calls += 1
        self.kernel.reset_ring(1)

    def close(self) -> None:
        self.handler.close(timeout=5)
        self.kernel.close()


@pytest.fixture
def volume(pool: Pool) -> Iterator[BlockDevice]:
    pool.create_volume("v", 16 * MiB)
    vol = pool.open_volume("v")
    yield vol
    vol.close()


def break_next_entry(k: TcmuKernel, lba: int) -> int:
    """Queue a READ whose iovec points past the area, as no kernel writes it; its id."""
    before = k.cmd_head
    cmd = k.submit(rw10(0x28, lba, 1), data_in=512)
    struct.pack_into("<QQ", k._map, k.cmdr_off + before + 48, k.size, 512)
    return cmd


def test_a_broken_ring_is_reset_and_served_on(tmp_path: Path, volume: BlockDevice) -> None:
    data = os.urandom(4096)
    volume.write(8 * 512, data)
    served = Served(tmp_path, volume)
    k = served.kernel
    try:
        good(k.command(bytes(6)))
        queued = k.submit(rw10(0x28, 8, 8), data_in=4096)  # before the broken entry
        broken = break_next_entry(k, 0)
        k.signal()
        wait_until(lambda: served.handler.resets == 1, "the reset")
        assert served.reset_calls == 1 and served.handler.error is None
        # the kernel answered what was in flight BUSY: the initiator retries it
        assert k.completions[broken].status == BUSY
        assert k.completions[queued].status in (0, BUSY)
        assert k.cmd_head == 0 and not k.in_flight
        # the ring starts again at 0 and is served as before
        assert good(k.command(rw10(0x28, 8, 8), data_in=4096)) == data
        written = os.urandom(4096)
        good(k.command(rw10(0x2A, 64, 8), written))
        assert good(k.command(rw10(0x28, 64, 8), data_in=4096)) == written
        assert k.cmd_tail == k.cmd_head and not k.in_flight
        assert served.handler.resets == 1
    finally:
        served.close()


def test_a_running_request_holds_the_reset_back(tmp_path: Path, volume: BlockDevice) -> None:
    gate = Gate(volume)
    served = Served(tmp_path, gate)
    k = served.kernel
    try:
        slow = k.submit(rw10(0x28, 0, 1), data_in=512)
        k.signal()
        assert gate.entered.wait(10)
        broken = break_next_entry(k, 8)
        k.signal()
        time.sleep(0.5)
        # the running read may still write into its data blocks: no reset yet
        assert served.reset_calls == 0 and slow in k.in_flight and broken in k.in_flight
        gate.release.set()
        wait_until(lambda: served.handler.resets == 1, "the reset")
        # the read's completion was dropped; the kernel answered both BUSY at the reset
        assert k.completions[slow].status == BUSY
        assert k.completions[broken].status == BUSY
        good(k.command(bytes(6)))
    finally:
        gate.release.set()
        served.close()


def test_a_request_that_never_ends_stops_the_handler(tmp_path: Path, volume: BlockDevice) -> None:
    gate = Gate(volume)
    served = Served(tmp_path, gate)
    k = served.kernel
    try:
        slow = k.submit(rw10(0x28, 0, 1), data_in=512)
        k.signal()
        assert gate.entered.wait(10)
        break_next_entry(k, 8)
        k.signal()
        wait_until(lambda: served.handler.error is not None, "the handler to stop")
        assert isinstance(served.handler.error, LocalFailure)
        assert "not reset" in str(served.handler.error)
        assert served.reset_calls == 0 and slow in k.in_flight
    finally:
        gate.release.set()
        served.close()


def test_without_a_reset_the_handler_stops(tmp_path: Path, volume: BlockDevice) -> None:
    served = Served(tmp_path, volume, resettable=False)
    k = served.kernel
    try:
        good(k.command(bytes(6)))
        broken = break_next_entry(k, 0)
        k.signal()
        wait_until(lambda: served.handler.error is not None, "the handler to stop")
        assert isinstance(served.handler.error, ProtocolError)
        assert broken in k.in_flight and served.handler.resets == 0
    finally:
        served.close()


def test_the_stand_in_resets_as_the_kernel_does(tmp_path: Path) -> None:
    k = TcmuKernel(tmp_path, CONFIG)
    try:
        ids = [k.submit(rw10(0x28, 0, 1), data_in=512) for _ in range(3)]
        assert k.cmd_head != 0
        assert k.reset_ring(2) == sorted(ids)
        assert all(k.completions[i].status == 0x02 for i in ids)
        assert (k.cmd_head, k.cmd_tail, k.in_flight) == (0, 0, set())
        with pytest.raises(ValueError):
            k.reset_ring(3)
    finally:
        k.close()
