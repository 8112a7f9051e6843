"""A pool's map changes kept in the page cache, so that a crash of the process loses none.

Theory of operation
-------------------
The durability contract (DESIGN.md) is that of a disk with a volatile cache: what was written
before a completed flush survives any crash. Between commits, though, the newest map entries
of a pool live only in the process's memory, so a crash of the *process* alone (SIGKILL, an
abort; the machine keeps running and its page cache with it) would lose writes that allocated
a cluster since the last commit, although their data sits safely in the page cache.

The journal closes that gap without a system call on the write path. It is a file in the
pool's directory, mapped shared into the process, that receives every map change
(``Pool.set_entry``: layer, virtual cluster, new value) as a 32-byte record with a sequence
number, after the data the change points at was written and before the write is acknowledged.
A store to a shared mapping is in the page cache at once: it survives the process, not the
machine. So:

* each commit records in the catalog, in its own transaction, the sequence number of the last
  change its batch holds (``meta.journal_seq``);
* opening the pool replays the records after that number, in order, onto the committed maps,
  syncs the backing devices (the data the records point at is only in the page cache) and
  commits the result, before anything else uses the pool;
* the file's header holds the boot id of the machine that wrote it: after a reboot the page
  cache is gone, the records (some written back, some not) prove nothing, and the journal is
  ignored. The contract of the flush is then all that holds, as it must.

Layout: a 4 KiB header (magic, format, boot id), then a ring of ``RECORDS`` slots of four
native 64-bit words: layer, virtual cluster, value (a physical cluster, ``ZERO`` or
``UNMAPPED``), and the sequence number, stored last. Record ``n`` lives in slot ``n %
RECORDS``; replay stops at the first slot whose sequence number is not the one expected, so a
record torn by the crash (its sequence number not yet stored) and everything after it is
ignored, and so is a ring that wrapped over records never committed (the pool commits early
when half the ring is pending, so this takes a writer faster than the commits). Either way
what replays is a prefix of the changes: the pool as it was at some instant.

Replay skips a record whose layer the committed catalog does not have (it was created by a
management operation that never committed: that operation did not happen) and one that
names a cluster beyond its device or owned by another layer (which a correct journal never
does; it is logged).
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

MAGIC = 0x314C4E524A525453  # b"STRJRNL1" little-endian
FORMAT = 1
HEADER_BYTES = 4096
RECORD_WORDS = 4
RECORDS = 1 << 17
"""Ring slots: 4 MiB of records, about 8 GiB of 64 KiB clusters allocated between commits."""
UNMAPPED = -2
"""``value`` of a record that removes a map entry (``ZERO`` is -1, see catalog.py)."""

_HEADER = struct.Struct("<QQ16s")
_BOOT_ID = "/proc/sys/kernel/random/boot_id"


def boot_id() -> bytes:
    """This boot of the machine (16 bytes): the page cache lives as long as it does."""
    with open(_BOOT_ID) as f:
        return bytes.fromhex(f.read().strip().replace("-", ""))


class Journal:
    """The journal file of one pool, mapped. Not thread-safe: the pool appends under its
    lock. Raises ``OSError`` when the file cannot be created or mapped (the pool reports
    it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        size = HEADER_BYTES + RECORDS * RECORD_WORDS * 8
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, 0)  # a journal of another size (or none): start afresh
                os.ftruncate(fd, size)
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._words: memoryview | None = memoryview(self._mm)[HEADER_BYTES:].cast("q")

    def newest(self) -> int:
        """The highest sequence number in the ring, whatever boot wrote it (0 when empty):
        numbering must go on above it, so that no stale record can pass for a new one."""
        return max(self._w[3::RECORD_WORDS], default=0)

    def pending(self, after: int) -> Iterator[tuple[int, int, int, int]]:
        """The records after sequence number ``after`` that this boot wrote, in order, as
        ``(seq, layer, vc, value)``; none when the journal was written before a reboot."""
        magic, fmt, boot = _HEADER.unpack_from(self._mm, 0)
        if magic != MAGIC or fmt != FORMAT or boot != boot_id():
            return
        words = self._w
        seq = after + 1
        while True:
            base = (seq % RECORDS) * RECORD_WORDS
            if words[base + 3] != seq:
                return
            yield seq, words[base], words[base + 1], words[base + 2]
            seq += 1

    def start(self) -> None:
        """Claim the journal for this boot (after replay); records follow with ``append``."""
        _HEADER.pack_into(self._mm, 0, MAGIC, FORMAT, boot_id())

    def append(self, seq: int, layer: int, vc: int, value: int) -> None:
        """Record that ``vc`` of ``layer`` now maps to ``value`` (a physical cluster, ``ZERO``
        or ``UNMAPPED``) as change number ``seq``; the sequence number is stored last."""
        words = self._w
        base = (seq % RECORDS) * RECORD_WORDS
        words[base] = layer
        words[base + 1] = vc
        words[base + 2] = value
        words[base + 3] = seq

    @property
    def _w(self) -> memoryview:
        assert self._words is not None, "journal is closed"
        return self._words

    def close(self) -> None:
        if self._words is not None:
            self._words.release()
            self._words = None
            self._mm.close()
