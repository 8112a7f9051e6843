"""A pool's cache tier: a fast device (an SSD, a file) in front of its backing devices.

Theory of operation
-------------------
The cache holds copies of *lines*, the pool's clusters as the backing devices lay them out:
line ``n`` of device ``i`` is the device's bytes ``[n * line_size, (n + 1) * line_size)``,
its key ``i << 40 | n``. The pool registers its backing fds with ``pio.route``, so every read
and write the engine makes of a backing device comes here. Data planes (other processes)
serve hits and writes to lines dirty in the open epoch themselves, through a copy of the
line table in shared memory (``engine/cachelines.py``, kept current here under the lock),
and send everything else to the pool's process.

*On the cache device*::

    offset               size                 what
    0                    4096                 header: magic b"STORVCA1", format 1, line size,
                                              slots, pool uuid, clean flag
    4096                 slots * 16, rounded  the table: per slot (tag, epoch), u64 each;
                         up to 4096           tag 0 = empty, else key + 1; epoch 0 = clean
    table end            slots * line_size    the slots, one line each

*Reads* fill the cache a whole line at a time (the line is read from the backing, written to
a free slot, then published). A slot is free when the cache has slots never used; otherwise
a CLOCK sweep evicts clean, idle lines.

*Writethrough*: a write goes to the backing, then to the line's slot if it is cached (both
under one of ``STRIPES`` locks, so that two writes to one line reach both copies in the same
order); it is acknowledged when both are done. A flush syncs the backing devices.

*Writeback*: a write goes to the line's slot only (a missing line is filled first) and the
slot is marked dirty in the *open epoch*. When every slot is dirty, a write waits for the
destage to clean some; if none belongs to a closed epoch, the destage thread closes the open
epoch itself, as a flush does (a disk's cache may write back early). A flush closes the
epoch: it advances the open epoch, waits until no data plane runs a write in place that saw
the old one open (``drain``), syncs the cache device (the data), then writes the table
entries changed since the last flush and syncs again. A *destage* thread then copies closed
epochs to the backing devices in order, one epoch at a time, syncing the backing devices
after each (for an S3 pool that sync is the upload barrier), and only then marks the epoch's
slots clean (table written and synced). The backing therefore always holds every epoch up to
some flush plus part of the next one: an image a crash could have left. A write to a line
whose slot belongs to a closed epoch not yet destaged does not change that slot: the line is
copied to a new slot in the open epoch (copy-on-write), so each closed epoch's data stays as
its flush left it.

*Restarts.* The table on the device is what the last flush or destage wrote. A pool closed
cleanly writes the whole table and sets the clean flag: the next open finds the cache warm.
After a crash (kill -9, power cut) only dirty entries are trusted: each holds the data its
epoch's flush made durable (a slot is written in place only while its epoch is open, and
its entry reaches the table only after its data was synced). Clean entries may hold
unflushed writes that the backing lacks, so they are dropped; the dirty ones are destaged
in epoch order, the newest copy of a line serving reads. The pool ignores its journal
(``Pool._replay``): unflushed writes lived in the cache's open epoch, which a crash loses.

*A failing cache device* (a read, write or sync error) latches the pool as a failed sync
does: the request fails with the device's errno, ``state`` says ``failed``, and every later
flush fails with EIO until the pool is reopened. Flushed data is never dropped: dirty slots
stay on the device until they are destaged. The destage stops at the failure (the device's
content is in doubt, and the epoch whose flush failed is never queued); reopening the pool
destages what the device's table holds.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import stat
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from storvisor.engine import pio
from storvisor.engine.backing import MAGIC as BACKING_MAGIC
from storvisor.engine.backing import Backing, Header, sync_directory
from storvisor.engine.cachelines import SharedLines
from storvisor.engine.probe import find_signature
from storvisor.engine.types import CacheInfo, CacheMode
from storvisor.errors import Conflict, InvalidArgument, IOFailure, NotFound, StateError
from storvisor.units import parse_size

log = logging.getLogger(__name__)

MAGIC = b"STORVCA1"
FORMAT = 1
HEADER = struct.Struct("<8sIIQ16sI")
HEADER_BYTES = 4096
ENTRY = struct.Struct("<QQ")
PAGE = 4096
MIN_SLOTS = 16
STRIPES = 64
KEY_SHIFT = 40
EVICT_BATCH = 32
"""Clean lines the CLOCK sweep frees at once."""
RATE_WINDOW = 10.0


@dataclass(frozen=True, slots=True)
class CacheSpec:
    """``PATH[:SIZE]`` of a cache device: a block device, or a file (created sparse with
    ``size`` if missing, grown to it if smaller)."""

    path: str
    size: int | None = None

    @classmethod
    def parse(cls, text: str) -> CacheSpec:
        path, sep, size = text.partition(":")
        if not path:
            raise InvalidArgument(f"invalid cache device {text!r}: PATH[:SIZE] is needed")
        return cls(os.path.abspath(path), parse_size(size) if sep else None)


def layout(device_bytes: int, line_size: int) -> tuple[int, int]:
    """(slots, table bytes) of a cache device of ``device_bytes``."""
    slots = (device_bytes - HEADER_BYTES) // (line_size + ENTRY.size)
    while slots > 0 and _table_bytes(slots) + HEADER_BYTES + slots * line_size > device_bytes:
        slots -= 1
    return max(slots, 0), _table_bytes(max(slots, 0))


def _table_bytes(slots: int) -> int:
    return -(-slots * ENTRY.size // PAGE) * PAGE


class _Fill:
    """A line being read into a slot (or copied to a new one): others wait for ``done``."""

    __slots__ = ("done", "spoiled")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.spoiled = False


class _Route:
    """The ``pio.Route`` of one backing device. Its methods are the hot path: a read of a
    cached line and a writeback write to a line of the open epoch are served here, in one
    system call (a read takes no lock: it checks afterwards that the slot still held the
    line, as a sequence lock does); everything else goes to the ``Cache``. The cache's
    tables are bound here once (they are never replaced, only changed in place)."""

    __slots__ = ("assigned", "base", "cache", "data_at", "epochs", "fd", "hits", "inflight",
                 "line_size", "lock", "map", "mask", "ref", "shift")  # fmt: skip

    def __init__(self, cache: Cache, index: int) -> None:
        self.cache = cache
        self.base = index << KEY_SHIFT
        self.fd = cache.fd
        self.line_size = cache.line_size
        self.shift = cache.line_size.bit_length() - 1  # a power of two: the cluster size
        self.mask = cache.line_size - 1
        self.hits = 0  # lock-free reads served here (``Cache.info`` adds them up)
        self.data_at = cache._data_at
        self.map = cache._map
        self.assigned = cache._assigned
        self.ref = cache._ref
        self.lock = cache._lock
        self.epochs = cache.epochs
        self.inflight = cache._inflight

    def read(self, views: list[memoryview], offset: int) -> None:
        if len(views) == 1:
            key = self.base | offset >> self.shift
            slot = self.map.get(key)
            within = offset & self.mask
            n = len(views[0])
            if slot is not None and within + n <= self.line_size:
                assigned = self.assigned[slot]
                at = self.data_at + (slot << self.shift) + within
                try:
                    done = os.preadv(self.fd, views, at)
                except OSError:
                    done = -1
                if done == n and self.assigned[slot] == assigned and self.map.get(key) == slot:
                    self.ref[slot] = 1
                    self.hits += 1
                    return
        self.cache.read(self.base, views, offset)

    def write(self, views: list[memoryview], offset: int) -> None:
        c = self.cache
        if len(views) == 1 and c.writeback:
            ls = self.line_size
            line = offset // ls
            within = offset - line * ls
            n = len(views[0])
            if within + n <= ls:
                epochs = self.epochs
                with self.lock:
                    slot = self.map.get(self.base | line)
                    if slot is not None:
                        epoch = epochs[slot]
                        if epoch != c.open_epoch:
                            if epoch or c.failure is not None:
                                slot = None
                            else:
                                c._dirty(slot)
                        if slot is not None:
                            self.inflight.append(slot)
                            c.hits += 1
                if slot is not None:
                    try:
                        done = os.pwritev(self.fd, views, self.data_at + slot * ls + within)
                    except OSError as e:
                        raise c._failed(_io(f"write of {c.path}", e)) from e
                    finally:
                        self.inflight.remove(slot)  # one call: atomic, no lock needed
                    if done == n:
                        return
        c.write(self.base, views, offset)


class Cache:
    """One pool's cache tier over its ``backings`` (a dict the pool keeps up to date). Made
    by ``attach`` (a new device) or ``open`` (the device the pool's catalog names)."""

    def __init__(
        self,
        path: str,
        fd: int,
        mode: CacheMode,
        line_size: int,
        slots: int,
        table_bytes: int,
        pool_uuid: uuid.UUID,
        backings: dict[int, Backing],
        on_failure: Callable[[IOFailure], None],
    ) -> None:
        self.path = path
        self.fd = fd
        self._mode = mode
        self.writeback = mode is CacheMode.WRITEBACK
        self.line_size = line_size
        self.slots = slots
        self._table_at = HEADER_BYTES
        self._data_at = HEADER_BYTES + table_bytes
        self._uuid = pool_uuid
        self._backings = backings
        self._on_failure = on_failure
        self._direct: dict[int, int] = {}  # backing index -> our own dup of its fd
        self._lock = threading.Lock()
        self._space = threading.Condition(self._lock)  # a slot was freed / an epoch destaged
        self._flush_lock = threading.Lock()
        self._stripes = [threading.Lock() for _ in range(STRIPES)]
        self.tags = [-1] * slots  # key of the line in each slot, -1: free
        self.epochs = [0] * slots  # 0: clean; else the epoch the slot's data belongs to
        self._pins = [0] * slots  # slow-path reads and copies in flight: not evicted
        self._assigned = [0] * slots  # lines given the slot so far (lock-free reads check it)
        self._inflight: list[int] = []
        """Slots with a write in flight: appended under the lock when the write found its
        slot in the open epoch, removed (one atomic call) when it is done."""
        self._ref = bytearray(slots)
        self._hand = 0
        self._map: dict[int, int] = {}  # key -> slot with the line's newest data
        self._filling: dict[int, _Fill] = {}
        self._free: list[int] = []
        self._fresh = 0  # slots never used: slot numbers fresh..slots-1
        self.open_epoch = 1
        self._lists: dict[int, list[int]] = {}  # epoch -> its dirty slots
        self._closed: collections.deque[int] = collections.deque()  # epochs to destage
        self._changed: set[int] = set()  # slots whose table entry changed since written
        self._durable = bytearray(table_bytes)  # the table as the device holds it
        self.hits = self.misses = 0
        self.plane_hits = 0  # served by data planes (``Pool.cache_hits``)
        self.destaged = 0
        self._rates: collections.deque[tuple[float, int]] = collections.deque()
        self.failure: IOFailure | None = None
        self.destage_error: str = ""
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._destager: threading.Thread | None = None
        self._routed = False
        self._waiting = 0  # writers waiting for a free slot
        self._routes: dict[int, _Route] = {}
        self._steps: dict[int, list[Callable[[], None]]] = {}  # run after an epoch's destage
        self.lines = SharedLines(slots, line_size, self._data_at)
        """The line table data planes read (``engine/cachelines.py``), kept current under
        the lock."""
        self.lines.set_flags(writeback=self.writeback, failed=False)
        self.drain: Callable[[], None] = lambda: None
        """Set by the pool: returns once no data plane runs a write in place that saw the
        open epoch before it advanced (it freezes their gates once)."""

    # ------------------------------------------------------------------- creating, opening

    @classmethod
    def attach(
        cls,
        spec: CacheSpec,
        mode: CacheMode,
        line_size: int,
        pool_uuid: uuid.UUID,
        backings: dict[int, Backing],
        on_failure: Callable[[IOFailure], None],
        *,
        in_use: Callable[[str], str | None] = lambda _: None,
        route: bool = True,
    ) -> Cache:
        """Prepare ``spec`` as a new, empty cache (``route``: serving the backings' I/O at
        once; else from ``route()`` on). Raises ``NotFound`` (no such device and no
        size), ``InvalidArgument`` (too small, not a file or block device), ``Conflict`` (it
        holds another pool's cache or backing device, ``in_use(path)`` names a user, or it
        carries a signature). Leaves nothing behind on failure."""
        owner = in_use(spec.path)
        if owner is not None:
            raise Conflict(f"{spec.path} is already used by {owner}")
        for backing in backings.values():
            if os.path.realpath(backing.path) == os.path.realpath(spec.path):
                raise Conflict(f"{spec.path} is a backing device of this pool")
        created = False
        flags = os.O_RDWR | os.O_CLOEXEC
        try:
            if spec.size is not None:
                if spec.size <= 0:
                    raise InvalidArgument(f"cache size must be positive, not {spec.size}")
                try:
                    fd = os.open(spec.path, flags | os.O_CREAT | os.O_EXCL, 0o600)
                    created = True
                except FileExistsError:
                    fd = os.open(spec.path, flags)
            else:
                fd = os.open(spec.path, flags)
        except FileNotFoundError as e:
            raise NotFound(f"no such cache device: {spec.path} (PATH:SIZE creates a file)") from e
        except OSError as e:
            raise IOFailure(f"cannot open {spec.path}: {e.strerror}", e.errno or errno.EIO) from e
        try:
            mode_bits = os.fstat(fd).st_mode
            if not (stat.S_ISREG(mode_bits) or stat.S_ISBLK(mode_bits)):
                raise InvalidArgument(f"{spec.path} is neither a regular file nor a block device")
            head = os.pread(fd, HEADER_BYTES, 0)
            if head[:8] == MAGIC:
                found = uuid.UUID(bytes=HEADER.unpack_from(head)[4])
                raise Conflict(f"{spec.path} is the cache of another pool ({found})")
            member = Header.unpack(head) if head[:8] == BACKING_MAGIC else None
            if member is not None:
                raise Conflict(f"{spec.path} belongs to pool {member.pool_name!r}")
            if not created and any(head):
                signature = find_signature(spec.path)
                if signature is not None:
                    raise Conflict(f"{spec.path} holds {signature.describe()}")
            grow = spec.size is not None and stat.S_ISREG(mode_bits)
            if grow and spec.size is not None and os.lseek(fd, 0, os.SEEK_END) < spec.size:
                os.ftruncate(fd, spec.size)
            size = os.lseek(fd, 0, os.SEEK_END)
            slots, table = layout(size, line_size)
            if slots < MIN_SLOTS:
                need = HEADER_BYTES + _table_bytes(MIN_SLOTS) + MIN_SLOTS * line_size
                raise InvalidArgument(
                    f"{spec.path} is too small for a cache: at least {need} bytes "
                    f"({MIN_SLOTS} lines of {line_size})"
                )
            os.pwrite(fd, bytes(table), HEADER_BYTES)
            os.pwrite(fd, _header(line_size, slots, pool_uuid, clean=False), 0)
            os.fsync(fd)
            if created:
                sync_directory(os.path.dirname(spec.path))
        except OSError as e:
            os.close(fd)
            if created:
                os.unlink(spec.path)
            raise _io(f"cannot prepare {spec.path}", e) from e
        except BaseException:
            os.close(fd)
            if created:
                os.unlink(spec.path)
            raise
        cache = cls(spec.path, fd, mode, line_size, slots, table, pool_uuid, backings, on_failure)
        cache._start(route)
        return cache

    @classmethod
    def open(
        cls,
        path: str,
        mode: CacheMode,
        line_size: int,
        pool_uuid: uuid.UUID,
        backings: dict[int, Backing],
        on_failure: Callable[[IOFailure], None],
    ) -> Cache:
        """Open the pool's cache device and load its table (module docstring: "Restarts").
        Raises ``NotFound``, ``IOFailure``, ``Conflict`` (it is not this pool's cache)."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError as e:
            raise NotFound(f"the cache device {path} is missing") from e
        except OSError as e:
            raise IOFailure(f"cannot open {path}: {e.strerror}", e.errno or errno.EIO) from e
        try:
            head = os.pread(fd, HEADER_BYTES, 0)
            if len(head) < HEADER.size:
                raise Conflict(f"{path} is not a cache device")
            magic, fmt, ls, slots, raw_uuid, clean = HEADER.unpack_from(head)
            if magic != MAGIC or fmt != FORMAT or uuid.UUID(bytes=raw_uuid) != pool_uuid:
                raise Conflict(f"{path} is not the cache of this pool")
            if ls != line_size:
                raise Conflict(f"{path} has lines of {ls} bytes, not {line_size}")
            table = _table_bytes(slots)
            durable = bytearray(os.pread(fd, table, HEADER_BYTES))
            if len(durable) != table:
                raise IOFailure(f"{path} is shorter than its table", errno.EIO)
        except OSError as e:
            os.close(fd)
            raise IOFailure(f"cannot read {path}: {e.strerror}", e.errno or errno.EIO) from e
        except BaseException:
            os.close(fd)
            raise
        cache = cls(path, fd, mode, line_size, slots, table, pool_uuid, backings, on_failure)
        cache._durable = durable
        cache._load(bool(clean))
        try:
            os.pwrite(fd, _header(line_size, slots, pool_uuid, clean=False), 0)
            os.fsync(fd)
        except OSError as e:
            cache._close_fds()
            raise IOFailure(f"cannot write {path}: {e.strerror}", e.errno or errno.EIO) from e
        cache._start(True)
        return cache

    def _load(self, clean: bool) -> None:
        newest: dict[int, int] = {}
        used = 0
        for slot in range(self.slots):
            tag, epoch = ENTRY.unpack_from(self._durable, slot * ENTRY.size)
            if tag == 0 or (epoch == 0 and not clean):
                if tag:  # a clean line after a crash: may hold writes the backing lacks
                    ENTRY.pack_into(self._durable, slot * ENTRY.size, 0, 0)
                    self._changed.add(slot)
                self._free.append(slot)
                continue
            key = tag - 1
            self.tags[slot] = key
            self.epochs[slot] = epoch
            used = slot + 1
            if epoch:
                self._lists.setdefault(epoch, []).append(slot)
                self.open_epoch = max(self.open_epoch, epoch + 1)
            best = newest.get(key)
            if best is None or epoch > self.epochs[best]:
                newest[key] = slot
        self._map = newest
        self._free = [s for s in self._free if s < used]
        self._fresh = used
        self._closed.extend(sorted(self._lists))
        for slot in range(self.slots):  # older copies of a line: destaged, never read
            key = self.tags[slot]
            if key >= 0 and newest.get(key) != slot and not self.epochs[slot]:
                self.tags[slot] = -1
                self._free.append(slot)
        for key, slot in newest.items():
            self.lines.publish(slot, key, self.epochs[slot])
        self.lines.set_open_epoch(self.open_epoch)

    def _start(self, route: bool) -> None:
        for index, backing in self._backings.items():
            self._direct[index] = os.dup(backing.fd)
        if route:
            self.route()
        self._destager = threading.Thread(target=self._destage_loop, name="storvisor-destage")
        self._destager.daemon = True
        self._destager.start()
        self._wake.set()

    def route(self) -> None:
        """Serve the reads and writes of the pool's backing devices from now on."""
        self._routed = True
        for index, backing in self._backings.items():
            self._routes[index] = _Route(self, index)
            pio.route(backing.fd, self._routes[index])

    def add_backing(self, index: int, backing: Backing) -> None:
        """Serve ``backing``'s reads and writes too (a device added to the pool)."""
        self._direct[index] = os.dup(backing.fd)
        if self._routed:
            self._routes[index] = _Route(self, index)
            pio.route(backing.fd, self._routes[index])

    # ------------------------------------------------------------------------- reading

    def read(self, base: int, views: list[memoryview], offset: int) -> None:
        """Fill ``views`` from device ``base >> 40`` at byte ``offset`` (pio's contract)."""
        if len(views) != 1:
            total = sum(map(len, views))
            buf = memoryview(bytearray(total))
            self.read(base, [buf], offset)
            pos = 0
            for view in views:
                view[:] = buf[pos : pos + len(view)]
                pos += len(view)
            return
        view = views[0]
        n = len(view)
        ls = self.line_size
        pos = 0
        while pos < n:
            at = offset + pos
            within = at % ls
            chunk = min(ls - within, n - pos)
            self._read_line(base | at // ls, within, view[pos : pos + chunk])
            pos += chunk

    def _read_line(self, key: int, within: int, out: memoryview) -> None:
        while True:
            with self._lock:
                slot = self._map.get(key)
                if slot is not None:
                    self._pins[slot] += 1
                    self._ref[slot] = 1
                    self.hits += 1
                    self.lines.hint(key, slot)  # a plane missed it (or its hint was lost)
                    break
                fill = self._filling.get(key)
                if fill is None:
                    self.misses += 1
                    fill = self._filling[key] = _Fill()
                    new = self._take_slot(wait=False)
                    mine = True
                else:
                    mine = False
            if mine:
                self._fill_and(key, new, fill, within, out, None)
                return
            fill.done.wait()
        try:
            self._cache_read(slot, within, out)
        finally:
            with self._lock:
                self._pins[slot] -= 1

    def _fill_and(
        self,
        key: int,
        slot: int | None,
        fill: _Fill,
        within: int,
        out: memoryview | None,
        data: memoryview | None,
    ) -> None:
        """Fill line ``key`` into ``slot`` (None: no slot free, read around the cache), then
        read ``out`` from it or write ``data`` into it (writeback) at ``within``."""
        ls = self.line_size
        try:
            buf = bytearray(ls)
            if data is None or len(data) != ls:
                self._backing_read(key, buf)
            if data is not None:
                buf[within : within + len(data)] = data
            if out is not None:
                out[:] = memoryview(buf)[within : within + len(out)]
            if slot is not None:
                self._cache_write(slot, [memoryview(buf)], 0)
        except BaseException:
            with self._lock:
                del self._filling[key]
                if slot is not None:
                    self._free.append(slot)
                    self._space.notify_all()
            fill.done.set()
            raise
        with self._lock:
            del self._filling[key]
            if slot is not None:
                if fill.spoiled:
                    self._free.append(slot)
                    self._space.notify_all()
                else:
                    self._map[key] = slot
                    self.tags[slot] = key
                    self._assigned[slot] += 1
                    self._ref[slot] = 1
                    if data is not None:
                        self._dirty(slot)
                    else:
                        self.epochs[slot] = 0
                    self._changed.add(slot)
                    self.lines.publish(slot, key, self.epochs[slot])
        fill.done.set()

    # ------------------------------------------------------------------------- writing

    def write(self, base: int, views: list[memoryview], offset: int) -> None:
        """Write ``views`` to device ``base >> 40`` at byte ``offset`` (pio's contract)."""
        if len(views) != 1:
            views = [memoryview(b"".join(views))]
        view = views[0]
        n = len(view)
        ls = self.line_size
        pos = 0
        writeback = self.mode is CacheMode.WRITEBACK
        while pos < n:
            at = offset + pos
            within = at % ls
            chunk = min(ls - within, n - pos)
            if writeback:
                self._write_back(base | at // ls, within, view[pos : pos + chunk])
            else:
                self._write_through(base | at // ls, within, view[pos : pos + chunk])
            pos += chunk

    def _write_back(self, key: int, within: int, data: memoryview) -> None:
        while True:
            with self._lock:
                self._check_failed()
                fill = self._filling.get(key)
                if fill is None:
                    slot = self._map.get(key)
                    if slot is not None:
                        epoch = self.epochs[slot]
                        if epoch == 0 or epoch == self.open_epoch:
                            if epoch == 0:
                                self._dirty(slot)
                            self._inflight.append(slot)
                            self.hits += 1
                            self.lines.hint(key, slot)
                            break
                        self._pins[slot] += 1  # a closed epoch not destaged yet: copy it
                    else:
                        self.misses += 1
                    fill = self._filling[key] = _Fill()
                    taken = self._take_slot(wait=True)
                    assert taken is not None
                    new = taken
                    mine = True
                else:
                    mine = False
            if mine:
                if slot is None:
                    self._fill_and(key, new, fill, within, None, data)
                else:
                    self._copy_line(key, slot, new, fill, within, data)
                return
            fill.done.wait()
        try:
            self._cache_write(slot, [data], within)
        finally:
            self._inflight.remove(slot)

    def _copy_line(
        self, key: int, old: int, new: int, fill: _Fill, within: int, data: memoryview
    ) -> None:
        """Write ``data`` to line ``key`` in a new slot (copy-on-write of ``old``, whose
        closed epoch is not destaged yet); ``old`` stays mapped until the copy is in."""
        try:
            while old in self._inflight:  # a write that found ``old`` open is still running
                time.sleep(0.0002)
            buf = bytearray(self.line_size)
            try:
                pio.preadv_full(self.fd, [memoryview(buf)], self._slot_at(old))
            except IOFailure as e:
                raise self._failed(e) from e
            buf[within : within + len(data)] = data
            self._cache_write(new, [memoryview(buf)], 0)
        except BaseException:
            with self._lock:
                del self._filling[key]
                self._pins[old] -= 1
                self._free.append(new)
                self._space.notify_all()
            fill.done.set()
            raise
        with self._lock:
            del self._filling[key]
            self._pins[old] -= 1
            self._map[key] = new
            self.tags[new] = key
            self._assigned[new] += 1
            self._ref[new] = 1
            self._dirty(new)
            self.lines.publish(new, key, self.open_epoch)
            self.lines.retire(old)
            if not self.epochs[old]:  # destaged meanwhile: nothing needs the old copy
                self.tags[old] = -1
                self._free.append(old)
                self._changed.add(old)
        fill.done.set()

    def _write_through(self, key: int, within: int, data: memoryview) -> None:
        with self._stripes[key % STRIPES]:
            self._backing_write(key, within, data)
            with self._lock:
                slot = self._map.get(key)
                if slot is not None:
                    self._pins[slot] += 1
                    self.hits += 1
                else:
                    self.misses += 1
                    fill = self._filling.get(key)
                    if fill is not None:
                        fill.spoiled = True
            if slot is None:
                return
            try:
                self._cache_write(slot, [data], within)
            finally:
                with self._lock:
                    self._pins[slot] -= 1

    def _dirty(self, slot: int) -> None:
        """Mark ``slot`` dirty in the open epoch (lock held)."""
        self.epochs[slot] = self.open_epoch
        self.lines.set_epoch(slot, self.open_epoch)
        self._lists.setdefault(self.open_epoch, []).append(slot)
        self._changed.add(slot)
        self._ref[slot] = 1

    # ------------------------------------------------------------------- slots, eviction

    def _take_slot(self, *, wait: bool) -> int | None:
        """A free slot (lock held). Without ``wait``, None when every slot is dirty or busy;
        with it, waits for the destage to clean some."""
        while True:
            if self._free:
                return self._free.pop()
            if self._fresh < self.slots:
                self._fresh += 1
                return self._fresh - 1
            if self._evict():
                continue
            if not wait:
                return None
            self._check_failed()
            self._waiting += 1  # the destage closes the open epoch if nothing else is to go
            self._wake.set()
            self._space.wait(0.5)
            self._waiting -= 1

    def _evict(self) -> bool:
        """Free up to ``EVICT_BATCH`` clean, idle lines (CLOCK; lock held)."""
        freed = 0
        for _ in range(2 * self.slots):
            slot = self._hand
            self._hand = (slot + 1) % self.slots
            key = self.tags[slot]
            if key < 0 or self.epochs[slot] or self._pins[slot] or self._map.get(key) != slot:
                continue
            if self._ref[slot]:
                self._ref[slot] = 0
                continue
            del self._map[key]
            self.lines.retire(slot)
            self.tags[slot] = -1
            self._free.append(slot)
            freed += 1
            if freed >= EVICT_BATCH:
                break
        return freed > 0

    # --------------------------------------------------------------------------- syncing

    def sync(self, backing_sync: Callable[[], None]) -> None:
        """A flush of the pool: writeback closes the epoch (data synced, then its table);
        writethrough runs ``backing_sync``. Raises ``IOFailure`` (the cache failed)."""
        self._check_failed()
        if self.mode is not CacheMode.WRITEBACK:
            backing_sync()
            return
        with self._flush_lock:
            with self._lock:
                epoch = self.open_epoch
                self.open_epoch += 1
                self.lines.set_open_epoch(self.open_epoch)
            # writes in place that data planes started before the epoch advanced end
            # before the closed epoch is synced or destaged (engine/cachelines.py)
            self.drain()
            with self._lock:
                changed = self._snapshot()
            try:
                os.fdatasync(self.fd)
                self._write_table(changed)
            except OSError as e:
                with self._lock:
                    self._changed.update(slot for slot, _ in changed)
                raise self._failed(_io(f"sync of {self.path}", e)) from e
            # only a durable epoch is destaged: a failed sync may have dropped its data
            with self._lock:
                if self._lists.get(epoch) and (not self._closed or self._closed[-1] != epoch):
                    self._closed.append(epoch)
        self._wake.set()

    def _snapshot(self) -> list[tuple[int, bytes]]:
        """The changed entries as they are now (lock held)."""
        changed = [
            (slot, _entry(self.tags[slot], self.epochs[slot])) for slot in sorted(self._changed)
        ]
        self._changed.clear()
        return changed

    def _write_table(self, entries: list[tuple[int, bytes]]) -> None:
        """Write ``entries`` into the table and sync it. Raises ``OSError``."""
        if not entries:
            return
        pages: set[int] = set()
        for slot, raw in entries:
            at = slot * ENTRY.size
            self._durable[at : at + ENTRY.size] = raw
            pages.add(at // PAGE)
        for page in sorted(pages):
            chunk = self._durable[page * PAGE : (page + 1) * PAGE]
            os.pwrite(self.fd, chunk, self._table_at + page * PAGE)
        os.fdatasync(self.fd)

    # --------------------------------------------------------------------------- destage

    def _destage_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            with self._lock:
                full = self._waiting and not self._closed and self._lists.get(self.open_epoch)
            if full:  # every slot is dirty in the open epoch: make it durable to destage it
                try:
                    self.sync(lambda: None)
                except IOFailure:
                    continue  # latched: writers waiting for a slot fail
            # a failed device is left alone until the pool reopens it: the closed epochs
            # stay on it, in its table, and are destaged then
            while self._closed and not self._stop.is_set() and self.failure is None:
                try:
                    self._destage_one()
                    self.destage_error = ""
                except (IOFailure, OSError) as e:
                    if not self.destage_error:
                        log.error("cache %s: destage failed: %s", self.path, e)
                    self.destage_error = str(e)
                    self._stop.wait(1.0)
                    break

    def _destage_one(self) -> None:
        """Copy the oldest closed epoch to the backing devices, sync them, then mark its
        slots clean (or free, for copies a newer epoch replaced)."""
        with self._lock:
            epoch = self._closed[0]
            slots = [s for s in self._lists.get(epoch, []) if self.epochs[s] == epoch]
            for s in slots:
                self._pins[s] += 1
        # writes that found these slots in the epoch before it closed may still run; no
        # later write can start on them (they copy the line)
        mine = set(slots)
        while mine.intersection(list(self._inflight)):
            time.sleep(0.0002)
        ls = self.line_size
        touched: set[int] = set()
        moved = 0
        try:
            buf = memoryview(bytearray(ls))
            for slot in sorted(slots, key=lambda s: self.tags[s]):
                key = self.tags[slot]
                try:
                    pio.preadv_full(self.fd, [buf], self._slot_at(slot))
                except IOFailure as e:
                    raise self._failed(e) from e
                index = key >> KEY_SHIFT
                at = (key & ((1 << KEY_SHIFT) - 1)) * ls
                pio.pwritev_full(self._direct[index], [buf], at)
                touched.add(index)
                moved += ls
        finally:
            with self._lock:
                for s in slots:
                    self._pins[s] -= 1
        for index in sorted(touched):
            self._backings[index].sync()
        with self._lock:
            steps = list(self._steps.get(epoch, ()))
        for step in steps:
            step()
        with self._lock:
            self._steps.pop(epoch, None)
        with self._lock:
            entries = []
            cleaned: list[int] = []
            freed: list[int] = []
            for slot in slots:
                key = self.tags[slot]
                if self._map.get(key) != slot:
                    freed.append(slot)
                    entries.append((slot, ENTRY.pack(0, 0)))
                else:
                    cleaned.append(slot)
                    entries.append((slot, ENTRY.pack(key + 1, 0)))
        try:
            with self._flush_lock:
                self._write_table(entries)
        except OSError as e:
            raise self._failed(_io(f"table write of {self.path}", e)) from e
        with self._lock:
            for slot in cleaned:
                if self.epochs[slot] != epoch:
                    continue
                if self._map.get(self.tags[slot]) == slot:
                    self.epochs[slot] = 0
                    self.lines.set_epoch(slot, 0)
                else:  # copied to a new slot meanwhile
                    self.tags[slot] = -1
                    self.epochs[slot] = 0
                    self._free.append(slot)
            for slot in freed:
                self.tags[slot] = -1
                self.epochs[slot] = 0
                self._free.append(slot)
            self._lists.pop(epoch, None)
            self._closed.popleft()
            self.destaged += moved
            self._rates.append((time.monotonic(), moved))
            self._space.notify_all()

    @property
    def mode(self) -> CacheMode:
        return self._mode

    @mode.setter
    def mode(self, mode: CacheMode) -> None:
        self._mode = mode
        self.writeback = mode is CacheMode.WRITEBACK
        self.lines.set_flags(writeback=self.writeback, failed=self.failure is not None)

    def defers(self, backing: Backing) -> bool:
        """Whether ``backing``'s ``committed`` must wait for the destage: a writeback cache
        in front of a remote store, whose catalog must never point at data still here."""
        return self.mode is CacheMode.WRITEBACK and backing.remote

    def after_destage(self, step: Callable[[], None]) -> None:
        """Run ``step`` (an upload of the catalog just committed) once every epoch closed so
        far is destaged, before anything later (raises there: the destage retries)."""
        with self._lock:
            epoch = self.open_epoch - 1
            if not self._closed or self._closed[-1] != epoch:
                self._closed.append(epoch)
            self._steps.setdefault(epoch, []).append(step)
        self._wake.set()

    def destage_all(self, timeout: float | None = None) -> None:
        """Wait until every epoch closed so far is destaged. Raises ``IOFailure`` when the
        destage fails (its error) or ``timeout`` passes, ``StateError`` when the cache stops
        destaging first (it is closing)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            last = self.open_epoch - 1
            while self._closed and self._closed[0] <= last:
                self._check_failed()
                if self.destage_error:
                    raise IOFailure(f"destage of the cache failed: {self.destage_error}")
                if self._stop.is_set():
                    raise StateError(f"cache {self.path}: closed before its destage finished")
                if deadline is not None and time.monotonic() > deadline:
                    raise IOFailure("destage of the cache did not finish in time", errno.ETIMEDOUT)
                self._wake.set()
                self._space.wait(0.2)

    # ---------------------------------------------------------------------- I/O helpers

    def _slot_at(self, slot: int) -> int:
        return self._data_at + slot * self.line_size

    def _cache_read(self, slot: int, within: int, out: memoryview) -> None:
        try:
            pio.preadv_full(self.fd, [out], self._slot_at(slot) + within)
        except IOFailure as e:
            raise self._failed(e) from e

    def _cache_write(self, slot: int, views: list[memoryview], within: int) -> None:
        try:
            pio.pwritev_full(self.fd, views, self._slot_at(slot) + within)
        except IOFailure as e:
            raise self._failed(e) from e

    def _backing_read(self, key: int, buf: bytearray) -> None:
        index = key >> KEY_SHIFT
        at = (key & ((1 << KEY_SHIFT) - 1)) * self.line_size
        pio.preadv_full(self._direct[index], [memoryview(buf)], at, zeros_at_eof=True)

    def _backing_write(self, key: int, within: int, data: memoryview) -> None:
        index = key >> KEY_SHIFT
        at = (key & ((1 << KEY_SHIFT) - 1)) * self.line_size + within
        pio.pwritev_full(self._direct[index], [data], at)

    def fail(self, error: IOFailure) -> None:
        """A data plane's read or write of the device failed: latch it as ``_failed``."""
        self._failed(error)

    def _check_failed(self) -> None:
        """Raise ``IOFailure`` (EIO) if the device failed: it serves nothing until reopened."""
        if self.failure is not None:
            raise IOFailure(f"the cache device failed: {self.failure}", errno.EIO)

    def _failed(self, error: IOFailure) -> IOFailure:
        """Latch the cache's failure (module docstring) and return ``error``."""
        first = self.failure is None
        if first:
            self.failure = error
            self.lines.set_flags(writeback=self.writeback, failed=True)
            log.error("cache %s failed: %s", self.path, error)
            self._on_failure(error)
        return error

    # ------------------------------------------------------------------------ reporting

    def info(self) -> CacheInfo:
        with self._lock:
            used = sum(1 for t in self.tags if t >= 0)
            dirty = sum(1 for e in self.epochs if e)
            hits = self.hits + self.plane_hits + sum(r.hits for r in self._routes.values())
            misses = self.misses
            now = time.monotonic()
            while self._rates and self._rates[0][0] < now - RATE_WINDOW:
                self._rates.popleft()
            recent = sum(b for _, b in self._rates)
        ls = self.line_size
        state = "ok"
        if self.failure is not None:
            state = f"failed: {self.failure}"
        elif self.destage_error:
            state = f"destage failing: {self.destage_error}"
        total = hits + misses
        return CacheInfo(
            self.path,
            self.mode,
            self.slots * ls,
            ls,
            used * ls,
            dirty * ls,
            hits,
            misses,
            hits / total if total else 0.0,
            self.destaged,
            recent / RATE_WINDOW,
            state,
        )

    # ------------------------------------------------------------------------ lifecycle

    def unroute(self) -> None:
        """Send the backing devices' reads and writes to the devices again."""
        self._routed = False
        for backing in self._backings.values():
            pio.route(backing.fd, None)

    def close(self, *, clean: bool = True) -> None:
        """Stop destaging, write the whole table and (``clean``) the clean flag so that the
        next open finds the cache warm; release the device."""
        self.unroute()
        self._stop.set()
        self._wake.set()
        if self._destager is not None:
            self._destager.join()
        if clean and self.failure is None:
            try:
                with self._lock:
                    self._changed.update(range(self.slots))
                    entries = self._snapshot()
                os.fdatasync(self.fd)
                self._write_table(entries)
                os.pwrite(self.fd, _header(self.line_size, self.slots, self._uuid, clean=True), 0)
                os.fsync(self.fd)
            except OSError as e:
                log.error("cache %s: not closed cleanly: %s", self.path, e.strerror)
        self._close_fds()

    def wipe_closed(self) -> None:
        """Erase the header of the closed device, so that it may serve a pool again."""
        wipe_device(self.path)

    def _close_fds(self) -> None:
        self.lines.close()
        for fd in self._direct.values():
            os.close(fd)
        self._direct.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def wipe_device(path: str) -> None:
    """Erase the cache header of ``path`` (a missing device is left alone). Raises
    ``IOFailure``."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as e:
        raise IOFailure(f"cannot open {path}: {e.strerror}", e.errno or errno.EIO) from e
    try:
        if os.pread(fd, 8, 0) == MAGIC:
            os.pwrite(fd, bytes(HEADER_BYTES), 0)
            os.fsync(fd)
    except OSError as e:
        raise IOFailure(f"cannot erase {path}: {e.strerror}", e.errno or errno.EIO) from e
    finally:
        os.close(fd)


def _entry(key: int, epoch: int) -> bytes:
    return ENTRY.pack(key + 1, epoch) if key >= 0 else ENTRY.pack(0, 0)


def _io(what: str, e: OSError) -> IOFailure:
    return IOFailure(f"{what}: {e.strerror}", e.errno or errno.EIO)


def _header(line_size: int, slots: int, pool_uuid: uuid.UUID, *, clean: bool) -> bytes:
    raw = HEADER.pack(MAGIC, FORMAT, line_size, slots, pool_uuid.bytes, int(clean))
    return raw + bytes(HEADER_BYTES - len(raw))
