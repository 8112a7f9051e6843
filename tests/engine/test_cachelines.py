"""The cache's line table in shared memory (``engine/cachelines.py``): what a data plane's
``LinesReader`` serves, and that a read whose slot the owner evicted and gave to another
line (or to the same line again) during the ``preadv`` is not served. The ``preadv`` seam
changes the table at exactly that moment."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from storvisor.engine.cachelines import LinesReader, SharedLines

LINE = 4096
SLOTS = 8
DATA_AT = 8192
DEVICE = 3
KEY_SHIFT = 40


class Table:
    """A ``SharedLines`` over a small cache file, with the owner's steps."""

    def __init__(self, path: Path) -> None:
        self.lines = SharedLines(SLOTS, LINE, DATA_AT)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(self.fd, DATA_AT + SLOTS * LINE)

    def fill(self, slot: int, line: int, byte: int, epoch: int = 0) -> None:
        """Put line ``line`` of device ``DEVICE`` into ``slot`` as the cache does: data
        first, then published."""
        os.pwrite(self.fd, bytes([byte]) * LINE, DATA_AT + slot * LINE)
        self.lines.publish(slot, DEVICE << KEY_SHIFT | line, epoch)

    def reader(
        self, preadv: Callable[[int, list[memoryview], int], int] = os.preadv
    ) -> LinesReader:
        return LinesReader(os.dup(self.lines.fd), os.dup(self.fd), preadv=preadv)

    def close(self) -> None:
        self.lines.close()
        os.close(self.fd)


@pytest.fixture
def table(tmp_path: Path) -> Iterator[Table]:
    t = Table(tmp_path / "cache.img")
    yield t
    t.close()


def test_hits_misses_and_writes_in_place(table: Table) -> None:
    table.fill(2, 100, 0xAA)
    reader = table.reader()
    try:
        buf = bytearray(512)
        assert reader.read(DEVICE, 100 * LINE + 1024, [memoryview(buf)], 512)
        assert buf == b"\xaa" * 512
        assert not reader.read(DEVICE, 101 * LINE, [memoryview(buf)], 512)  # not cached
        assert not reader.read(DEVICE + 1, 100 * LINE, [memoryview(buf)], 512)  # other device
        # writes in place: only writeback, only a line dirty in the open epoch
        data = [memoryview(b"\x55" * 512)]
        assert not reader.write(DEVICE, 100 * LINE, data, 512)  # clean, write-through flags
        table.lines.set_flags(writeback=True, failed=False)
        assert not reader.write(DEVICE, 100 * LINE, data, 512)  # clean
        table.lines.set_epoch(2, 1)  # dirty in epoch 1, the open one
        assert reader.write(DEVICE, 100 * LINE, data, 512)
        assert os.pread(table.fd, 512, DATA_AT + 2 * LINE) == b"\x55" * 512
        table.lines.set_open_epoch(2)  # a flush closed epoch 1
        assert not reader.write(DEVICE, 100 * LINE, data, 512)
        table.lines.set_epoch(2, 2)
        table.lines.set_flags(writeback=True, failed=True)  # the cache failed
        assert not reader.write(DEVICE, 100 * LINE, data, 512)
        # evicted: no hit, whatever the slot holds
        table.lines.retire(2)
        assert not reader.read(DEVICE, 100 * LINE, [memoryview(buf)], 512)
    finally:
        reader.close()


def test_hints_of_colliding_lines(table: Table) -> None:
    """Many lines, few slots: every published line is found, and only those."""
    reader = table.reader()
    try:
        buf = bytearray(16)
        for round_ in range(4):
            for slot in range(SLOTS):
                line = round_ * 1000 + slot * 37
                table.lines.retire(slot)
                table.fill(slot, line, slot + round_)
            for slot in range(SLOTS):
                line = round_ * 1000 + slot * 37
                assert reader.read(DEVICE, line * LINE, [memoryview(buf)], 16)
                assert buf == bytes([slot + round_]) * 16
                if round_:
                    old = (round_ - 1) * 1000 + slot * 37
                    assert not reader.read(DEVICE, old * LINE, [memoryview(buf)], 16)
    finally:
        reader.close()


@pytest.mark.parametrize("same_line", [False, True], ids=["other line", "same line again"])
def test_a_slot_recycled_during_the_read_is_no_hit(table: Table, same_line: bool) -> None:
    table.fill(5, 7, 0x11)
    recycled = []

    def preadv(fd: int, views: list[memoryview], offset: int) -> int:
        if not recycled:  # the owner evicts line 7 and gives its slot to a line, now
            recycled.append(True)
            table.lines.retire(5)
            table.fill(5, 7 if same_line else 8, 0x22)
        return os.preadv(fd, views, offset)

    reader = table.reader(preadv)
    try:
        buf = bytearray(LINE)
        assert not reader.read(DEVICE, 7 * LINE, [memoryview(buf)], LINE), (
            "a read served data its slot got while the read ran"
        )
        assert reader.read(DEVICE, (7 if same_line else 8) * LINE, [memoryview(buf)], LINE)
        assert buf == b"\x22" * LINE
    finally:
        reader.close()
