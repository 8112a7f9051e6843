"""A volume's cluster map in shared memory, for data-plane processes.

Theory of operation
-------------------
The process that owns a pool keeps each open volume's merged view in a dict (volume.py). A
data-plane process serving that volume (``storvisor.exports.dataplane``) cannot share the
dict, so the owner mirrors it into a ``SharedMap``: a memfd that the data plane maps
read-only. After a 64-byte header it holds one native 64-bit word per virtual cluster::

    word == 0                        the cluster reads as zeros (unmapped, or an explicit zero)
    word == (phys + 1) | epoch << 52 phys: the pool-wide physical cluster number

A cluster is *owned* by the volume's top layer, and so writable in place, iff its word's
epoch equals the header's current epoch. Taking a snapshot makes every cluster shared in O(1):
the owner bumps the epoch (when the 12-bit epoch wraps, every word is rewritten). Words are
aligned 8-byte stores, so a reader sees either the old or the new value of a word.

Header (native 64-bit words): magic, epoch, size in bytes, capacity in words, log2 of the
cluster size, a flag: 1 when the volume's reads and writes are bounded by a timeout
(the pool's data timeout), which only the owner can apply, so a data plane then sends them
to it instead of doing them itself; and the generation of the pool's cache tier (0: none):
a data plane then reads and writes the volume's clusters only through that cache's line
table (``engine/cachelines.py``), never in the backing devices.

The word layout is the engine's alone: a data plane asks ``MapReader.lookup`` where a
virtual cluster lives (backing device index, byte offset in it, owned or not) and never
decodes a word itself.

The map alone does not order a data-plane write against a change of ownership: a write that
found its cluster owned may still be running when a snapshot shares that cluster. A
``Gate`` closes that window: every direct read or write runs inside ``Gate.enter`` /
``Gate.leave``, and whoever changes ownership or frees clusters first waits, in
``Gate.frozen``, until no such operation is running (new ones wait for the thaw).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator

from storvisor.engine.backing import LOCAL_MASK, PHYS_SHIFT

_MAGIC_VALUE = 0x3150414D56525453  # b"STRVMAP1" little-endian
_HEADER_WORDS = 8
_HEADER_BYTES = _HEADER_WORDS * 8
_EPOCH_SHIFT = 52
_EPOCH_MASK = (1 << (64 - _EPOCH_SHIFT)) - 1
_PHYS_MASK = (1 << _EPOCH_SHIFT) - 1

_MAGIC, _EPOCH, _SIZE, _CAPACITY, _CLUSTER_SHIFT, _BOUNDED, _CACHE = range(7)


def _map_bytes(capacity: int) -> int:
    return (_HEADER_BYTES + capacity * 8 + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE


class SharedMap:
    """The owner's (writable) side of a shared cluster map. Not thread-safe: the owner
    changes it under its pool lock."""

    def __init__(self, name: str, size: int, cluster_size: int) -> None:
        self.cluster_size = cluster_size
        self.fd = os.memfd_create(f"storvisor-map-{name}", os.MFD_CLOEXEC)
        self._mm: mmap.mmap | None = None
        self._words: memoryview | None = None
        self._epoch = 1
        self._capacity = 0
        self._map(size)
        words = self._w
        words[_MAGIC] = _MAGIC_VALUE
        words[_EPOCH] = self._epoch

    @property
    def _w(self) -> memoryview:
        assert self._words is not None, "shared map is closed"
        return self._words

    def _map(self, size: int) -> None:
        capacity = -(-size // self.cluster_size)
        nbytes = _map_bytes(capacity)
        if self._words is not None:
            self._words.release()
        if self._mm is not None:
            self._mm.close()
        os.ftruncate(self.fd, nbytes)
        self._mm = mmap.mmap(self.fd, nbytes)
        self._words = memoryview(self._mm).cast("Q")
        self._capacity = (nbytes - _HEADER_BYTES) // 8
        self._words[_CAPACITY] = self._capacity
        self._words[_SIZE] = size
        self._words[_CLUSTER_SHIFT] = self.cluster_size.bit_length() - 1

    @property
    def epoch(self) -> int:
        return self._epoch

    def resize(self, size: int) -> None:
        """Record a new (larger) volume size, growing the memfd when needed. A reader must
        ``remap`` before it looks at clusters beyond its old capacity."""
        if -(-size // self.cluster_size) > self._capacity:
            self._map(size)
        else:
            self._w[_SIZE] = size

    def set(self, vc: int, phys: int | None) -> None:
        """Map ``vc`` to the owned cluster ``phys``, or to zeros (``None``)."""
        self._w[_HEADER_WORDS + vc] = (
            0 if phys is None else (phys + 1) | self._epoch << _EPOCH_SHIFT
        )

    def set_bounded(self, bounded: bool) -> None:
        """Record whether the volume's reads and writes are bounded by a timeout."""
        self._w[_BOUNDED] = int(bounded)

    def set_cache(self, generation: int) -> None:
        """Record the generation of the pool's cache tier (``SharedLines.generation``; 0:
        the pool has none). Change it only with the planes' gates frozen."""
        self._w[_CACHE] = generation

    def set_shared(self, vc: int, phys: int) -> None:
        """Map ``vc`` to ``phys``, which a parent layer owns (reads only)."""
        self._w[_HEADER_WORDS + vc] = (phys + 1) | ((self._epoch - 1) & _EPOCH_MASK) << _EPOCH_SHIFT

    def fill(self, entries: Iterable[tuple[int, int | None, bool]]) -> None:
        """Replace the whole map with ``(vc, phys or None, owned)`` entries."""
        words = self._w
        words[_HEADER_WORDS:] = memoryview(bytes(self._capacity * 8)).cast("Q")
        for vc, phys, owned in entries:
            if phys is not None:
                if owned:
                    self.set(vc, phys)
                else:
                    self.set_shared(vc, phys)

    def share_all(self, entries: Iterable[tuple[int, int | None, bool]]) -> None:
        """Make every cluster shared (a snapshot was taken): O(1) by a new epoch, or a
        rewrite from ``entries`` (the volume's view) when the epoch wraps."""
        self._epoch = (self._epoch + 1) & _EPOCH_MASK
        if self._epoch == 0:  # 0 is never current: a zero word must never look owned
            self._epoch = 1
            self._w[_EPOCH] = self._epoch
            self.fill((vc, phys, False) for vc, phys, _ in entries)
        else:
            self._w[_EPOCH] = self._epoch

    def close(self) -> None:
        if self._words is not None:
            self._words.release()
            self._words = None
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class MapReader:
    """The data plane's read-only view of a ``SharedMap`` (from its memfd).

    ``lookup`` is the data plane's per-request fast path: it reads one word, with no lock
    (the caller runs it inside its ``Gate``, see the module docstring)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._mm: mmap.mmap | None = None
        self._words: memoryview = memoryview(b"")
        self.remap()
        if self._words[_MAGIC] != _MAGIC_VALUE:
            raise ValueError("not a storvisor shared map")
        self._shift = int(self._words[_CLUSTER_SHIFT])

    def remap(self) -> None:
        """Map the memfd again at its current length (after the owner grew it)."""
        nbytes = os.fstat(self.fd).st_size
        old = self._mm
        self._words.release()
        self._mm = mmap.mmap(self.fd, nbytes, prot=mmap.PROT_READ)
        self._words = memoryview(self._mm).cast("Q")
        if old is not None:
            old.close()

    def lookup(self, vc: int) -> tuple[int, int, bool] | None:
        """Where virtual cluster ``vc`` (``>= 0``) lives: ``(backing device index, byte
        offset of the cluster in that device, owned by the volume's top layer, so writable
        in place)``, or None when it reads as zeros. Raises ``IndexError`` for a cluster
        beyond the mapped capacity (``remap`` first: the volume grew)."""
        words = self._words
        word = words[_HEADER_WORDS + vc]
        if not word:
            return None
        phys = (word & _PHYS_MASK) - 1
        return (
            phys >> PHYS_SHIFT,
            ((phys & LOCAL_MASK) + 1) << self._shift,
            word >> _EPOCH_SHIFT == words[_EPOCH],
        )

    @property
    def bounded(self) -> bool:
        """Whether reads and writes must go to the owner (see ``SharedMap.set_bounded``)."""
        return bool(self._words[_BOUNDED])

    @property
    def cache(self) -> int:
        """The generation of the pool's cache tier, 0 if none (``SharedMap.set_cache``)."""
        return int(self._words[_CACHE])

    @property
    def clusters(self) -> int:
        """How many virtual clusters the mapping covers (``lookup`` accepts ``vc`` below)."""
        return len(self._words) - _HEADER_WORDS

    @property
    def size(self) -> int:
        return int(self._words[_SIZE])

    @property
    def epoch(self) -> int:
        return int(self._words[_EPOCH])

    def close(self) -> None:
        self._words.release()
        self._words = memoryview(b"")
        if self._mm is not None:
            self._mm.close()
            self._mm = None


class Gate:
    """Lets many direct I/O operations run at once, and lets one party wait until none is
    running and hold new ones back (see the module docstring).

    ``enter`` and ``leave`` take no lock: the running operations are the items of a list
    (``append`` and ``pop`` are atomic), and an operation that finds the gate frozen after
    counting itself in takes itself out again and waits. A freezer sets ``frozen`` first and
    then waits for the list to empty, so an operation either is counted before the freezer
    looks or sees the gate frozen. Freezing is rare (snapshots, reuse of freed clusters); it
    polls.

    ``on_wait`` is a test seam: when set, a freezer that finds operations inside calls it
    (from the freezer's thread) before it starts waiting for them."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._active: list[None] = []
        self._frozen = 0
        self.on_wait: Callable[[], object] | None = None

    def enter(self) -> None:
        active = self._active
        while True:
            active.append(None)
            if not self._frozen:
                return
            active.pop()
            with self._cond:
                while self._frozen:
                    self._cond.wait()

    def leave(self) -> None:
        self._active.pop()

    def freeze(self) -> None:
        """Return once no operation is inside; new ones wait until ``thaw``."""
        with self._cond:
            self._frozen += 1
        if self._active and self.on_wait is not None:
            self.on_wait()
        delay = 20e-6
        while self._active:
            time.sleep(delay)
            delay = min(2 * delay, 1e-3)

    def thaw(self) -> None:
        with self._cond:
            self._frozen -= 1
            if not self._frozen:
                self._cond.notify_all()

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        self.freeze()
        try:
            yield
        finally:
            self.thaw()
