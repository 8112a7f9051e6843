"""A cache tier's line table in shared memory, for data-plane processes.

Theory of operation
-------------------
The cache (``engine/cache.py``) lives in the pool's process. A data plane serving a volume
of a cached pool (``exports/dataplane.py``) maps this table read-only and, with the cache
device's fd, serves what needs no change of the cache's own state: reads of cached lines,
and (writeback) writes to lines already dirty in the open epoch. Everything else (a miss, a
first write to a line in an epoch, a line of a closed epoch) goes to the owner, whose
``Cache`` fills, marks dirty or copies the line and keeps this table current. A memfd of
native 64-bit words; aligned 8-byte stores, so a reader sees a word's old or new value::

    header (8 words)   magic, open epoch, flags (1 writeback, 2 failed), log2 line size,
                       slots, log2 hint buckets, byte offset of slot 0 on the device,
                       generation (the ``Cache`` this table belongs to)
    current[slots]     key + 1 of the line whose newest data the slot holds, else 0
    epoch[slots]       the epoch the slot's data belongs to (0: clean)
    fills[slots]       how many times the slot was given a line
    hints[2 * B]       bucket -> (key + 1, slot): where a line was last seen

A *key* is ``device index << 40 | line`` (``engine/cache.py``). Hints are only hints: a
bucket may be stale or overwritten by another line, so every answer is checked against
``current``. A read is checked as a sequence lock does: ``fills`` and ``current`` are read
before the ``preadv`` and again after it, and the owner changes them in the order that makes
a recycled slot fail that check (it clears ``current`` when it evicts a line, writes the new
line's data, then bumps ``fills`` and sets ``current``).

A write in place needs more: the slot must stay the line's slot, in the open epoch, until the
``pwritev`` is done. A dirty slot of the open epoch is never evicted, copied or destaged, so
only the end of the epoch could change that. The plane therefore checks and writes inside its
volume's ``Gate``, and the owner, after advancing ``open epoch`` here, freezes every data
plane's gate once before the closed epoch is synced or destaged (``Cache.sync``): a write that
saw the old epoch open has finished by then, and a later one sees it closed and goes to the
owner.
"""

from __future__ import annotations

import errno
import itertools
import mmap
import os
from collections.abc import Callable

from storvisor.errors import IOFailure

_MAGIC_VALUE = 0x314E494C56525453  # b"STRVLIN1" little-endian
_HEADER_WORDS = 8
_MAGIC, _OPEN, _FLAGS, _SHIFT, _SLOTS, _BUCKET_BITS, _DATA_AT, _GENERATION = range(8)
WRITEBACK = 1
FAILED = 2
KEY_SHIFT = 40
_HINT_MULT = 0x9E3779B1

_generations = itertools.count(1)


def _bucket(key: int, mask: int) -> int:
    return ((key & ((1 << KEY_SHIFT) - 1)) + (key >> KEY_SHIFT) * _HINT_MULT) & mask


class SharedLines:
    """The owner's (writable) side: the ``Cache`` changes it under its lock."""

    def __init__(self, slots: int, line_size: int, data_at: int) -> None:
        self.slots = slots
        self.generation = next(_generations)
        bits = max(4, (4 * slots - 1).bit_length())
        self._mask = (1 << bits) - 1
        words = _HEADER_WORDS + 3 * slots + 2 * (1 << bits)
        nbytes = -(-words * 8 // mmap.PAGESIZE) * mmap.PAGESIZE
        self.fd = os.memfd_create("storvisor-cache-lines", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, nbytes)
            self._mm: mmap.mmap | None = mmap.mmap(self.fd, nbytes)
        except BaseException:
            os.close(self.fd)
            raise
        w = self._w = memoryview(self._mm).cast("Q")
        self._cur = _HEADER_WORDS
        self._ep = self._cur + slots
        self._fills = self._ep + slots
        self._hints = self._fills + slots
        w[_MAGIC] = _MAGIC_VALUE
        w[_OPEN] = 1
        w[_SHIFT] = line_size.bit_length() - 1
        w[_SLOTS] = slots
        w[_BUCKET_BITS] = bits
        w[_DATA_AT] = data_at
        w[_GENERATION] = self.generation

    def set_open_epoch(self, epoch: int) -> None:
        self._w[_OPEN] = epoch

    def set_flags(self, *, writeback: bool, failed: bool) -> None:
        self._w[_FLAGS] = (WRITEBACK if writeback else 0) | (FAILED if failed else 0)

    def set_epoch(self, slot: int, epoch: int) -> None:
        self._w[self._ep + slot] = epoch

    def publish(self, slot: int, key: int, epoch: int) -> None:
        """``slot`` now holds the newest data of line ``key`` (its data is written)."""
        w = self._w
        w[self._ep + slot] = epoch
        w[self._fills + slot] += 1
        w[self._cur + slot] = key + 1
        self.hint(key, slot)

    def retire(self, slot: int) -> None:
        """``slot`` no longer holds the newest data of its line (evicted, freed, or a newer
        copy was published first)."""
        self._w[self._cur + slot] = 0

    def hint(self, key: int, slot: int) -> None:
        """Remember that ``slot`` holds line ``key`` (the next bucket when the first holds a
        live hint of another line)."""
        w = self._w
        first = _bucket(key, self._mask)
        at = self._hints + 2 * first
        for bucket in (first, (first + 1) & self._mask):
            b = self._hints + 2 * bucket
            tag = w[b]
            if tag == key + 1 or not tag or w[self._cur + w[b + 1]] != tag:
                at = b
                break
        w[at] = 0
        w[at + 1] = slot
        w[at] = key + 1

    def close(self) -> None:
        self._w.release()
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class LinesReader:
    """A data plane's side: the table (``table_fd``, mapped read-only) and the cache
    device (``device_fd``); both fds become this reader's (closed by ``close``).

    ``preadv`` is the seam the tests use to change the table while a read is in its system
    call; production code never passes it."""

    def __init__(
        self,
        table_fd: int,
        device_fd: int,
        *,
        preadv: Callable[[int, list[memoryview], int], int] = os.preadv,
    ) -> None:
        self._preadv = preadv
        self.table_fd = table_fd
        self.device_fd = device_fd
        nbytes = os.fstat(table_fd).st_size
        self._mm = mmap.mmap(table_fd, nbytes, prot=mmap.PROT_READ)
        w = self._w = memoryview(self._mm).cast("Q")
        if len(w) < _HEADER_WORDS or w[_MAGIC] != _MAGIC_VALUE:
            self.close()
            raise ValueError("not a storvisor cache line table")
        slots = int(w[_SLOTS])
        self.generation = int(w[_GENERATION])
        self.shift = int(w[_SHIFT])
        self._data_at = int(w[_DATA_AT])
        self._mask = (1 << int(w[_BUCKET_BITS])) - 1
        self._cur = _HEADER_WORDS
        self._ep = self._cur + slots
        self._fills = self._ep + slots
        self._hints = self._fills + slots

    def _find(self, key: int) -> int:
        """The slot holding line ``key``'s newest data, or -1 (to be checked again)."""
        w = self._w
        tag = key + 1
        first = _bucket(key, self._mask)
        b = self._hints + 2 * first
        if w[b] != tag:
            b = self._hints + 2 * ((first + 1) & self._mask)
            if w[b] != tag:
                return -1
        slot = int(w[b + 1])
        if w[b] != tag or w[self._cur + slot] != tag:
            return -1
        return slot

    def read(self, device: int, offset: int, views: list[memoryview], n: int) -> bool:
        """Fill ``views`` (``n`` bytes, within one line) from byte ``offset`` of backing
        device ``device`` if the line is cached; False if it is not (nothing is promised
        about ``views`` then). Raises ``IOFailure`` (the cache device failed)."""
        line = offset >> self.shift
        tag = (device << KEY_SHIFT | line) + 1
        w = self._w
        first = (line + device * _HINT_MULT) & self._mask  # _find, inlined: the hot path
        b = self._hints + 2 * first
        if w[b] != tag:
            b = self._hints + 2 * ((first + 1) & self._mask)
            if w[b] != tag:
                return False
        slot = w[b + 1]
        if w[b] != tag or w[self._cur + slot] != tag:
            return False
        fills = w[self._fills + slot]
        at = self._data_at + (slot << self.shift) + (offset & ((1 << self.shift) - 1))
        try:
            done = self._preadv(self.device_fd, views, at)
        except OSError as e:
            raise IOFailure(f"read of the cache device: {e.strerror}", e.errno or errno.EIO) from e
        return done == n and w[self._fills + slot] == fills and w[self._cur + slot] == tag

    def write(self, device: int, offset: int, views: list[memoryview], n: int) -> bool:
        """Write ``views`` (``n`` bytes, within one line) at byte ``offset`` of backing
        device ``device`` into the line's slot, if the cache is writeback and the line is
        dirty in the open epoch; False if not (nothing was written). Call inside the
        volume's gate (module docstring). Raises ``IOFailure`` (the cache device failed)."""
        w = self._w
        if w[_FLAGS] != WRITEBACK:
            return False
        key = device << KEY_SHIFT | offset >> self.shift
        slot = self._find(key)
        if slot < 0 or w[self._ep + slot] != w[_OPEN]:
            return False
        at = self._data_at + (slot << self.shift) + (offset & ((1 << self.shift) - 1))
        try:
            done = os.pwritev(self.device_fd, views, at)
        except OSError as e:
            raise IOFailure(f"write of the cache device: {e.strerror}", e.errno or errno.EIO) from e
        if done != n:
            raise IOFailure(f"write of the cache device: {done} of {n} bytes", errno.EIO)
        return True

    def close(self) -> None:
        self._w.release()
        self._mm.close()
        for fd in (self.table_fd, self.device_fd):
            if fd >= 0:
                os.close(fd)
        self.table_fd = self.device_fd = -1
