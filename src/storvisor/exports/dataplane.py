"""Data planes: serving a volume's I/O from another process than the pool's owner.

Theory of operation
-------------------
A pool lives in one process (the daemon): its maps, allocator and catalog are Python objects
there. Python runs one thread at a time per process, so exports whose per-request work is
Python-bound (many small requests) would share one core however many volumes they serve. A
*data plane* moves that work to a process of its own while the pool stays where it is:

* the owner (``PlaneHost``) holds a ``Volume`` handle, mirrors its view into a ``SharedMap``
  (engine/sharedmap.py) and answers requests on a channel (a Unix stream socket pair);
* the data plane (``RemoteVolume``, a ``BlockDevice``) maps that memfd read-only and gets the
  pool's backing device fds. A read is served entirely in the data plane (map lookup,
  ``preadv``), as is a write whose clusters the volume's top layer owns (``pwritev`` in
  place). Everything that changes metadata goes over the channel to the owner and is done by
  its ``Volume``: a write that allocates or copies on write, discard, write-zeroes, flush,
  block status;
* the owner freezes the data plane's gate (``FREEZE``/``THAW``) whenever a snapshot changes
  which clusters are owned, and before freed clusters are reused, so no direct read or write
  that looked a cluster up before the change is still running after it.

Durability: the data plane's direct writes go to the same files the owner syncs; a flush is
a request to the owner, which flushes the pool (``fdatasync`` of
every backing device, then the catalog commit). A write with FUA is followed by such a flush.
A device whose syncs upload what changed (an S3 pool's local image) has *marks*: a memfd of
one byte per object, which the plane gets once per device (``MARKS``) and maps. A direct
write to it sets the bytes of the objects it touched, after the write and before it is
acknowledged; the owner's next sync takes them (``engine/object_backing.py``). A fd whose
marks the plane has not learned yet is not written directly (the owner writes it).

Channel frames (``protocols/frames.py``, sent and received by an ``exports/link.py`` ``Link``):
an operation (``Op``), flags (``Flag``), an id, two integers ``a`` and ``b`` and a payload.
Requests carry an id the reply repeats; ``WRITE`` carries its data as payload (``b`` is its
length); a reply's ``a`` is 0 or an errno, its payload the result (block status extents) or
the error message. A backing fd the data plane lacks (a device added online) comes with the
reply to ``GETFD``. A direct read or write that a backing device fails is reported to the
owner (``FAILED``, no reply), whose pool counts it and degrades as for its own requests.
A broken channel ends the data plane (its process exits); the owner treats a dead plane as
frozen.

Cached pools: when the pool has a cache tier (``MapReader.cache`` names its generation), the
data plane never touches the backing devices. It asks the owner once for the cache's line
table and device (``CACHEFD``) and serves through them (``engine/cachelines.py``): a read of
a cached line with one ``preadv`` of the cache device, a writeback write to a line of a
cluster the top layer owns that is already dirty in the open epoch with one ``pwritev``, in
the gate; every other read (``READ``) and write goes to the owner, whose cache fills the line,
marks it dirty or copies it. A flush of the pool freezes every plane once after the cache's
epoch advanced, so no write in place of the closed epoch is still running when it is synced
or destaged. A failed read or write of the cache device is reported (``FAILED``, ``a = 2``)
and latches the cache as the owner's own failures do.

Bounded reads and writes: when the pool's data timeout is set (``MapReader.bounded``), the
data plane does no direct read or write at all: it sends every read (``READ``) and write to
the owner, whose ``Volume`` bounds them (bounce buffers on the pool's I/O threads, see
``engine/bounded.py``), so a stalled device never holds the plane's buffers either, and the
owner alone knows which abandoned requests still run.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import mmap
import os
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from queue import SimpleQueue

from storvisor.engine.cachelines import LinesReader
from storvisor.engine.device import Buffer, Extent
from storvisor.engine.pio import preadv_full, pwritev_full, slice_views
from storvisor.engine.sharedmap import Gate, MapReader, SharedMap
from storvisor.engine.types import BackingOp
from storvisor.engine.volume import Volume
from storvisor.errors import IOFailure, LocalFailure, StorvisorError
from storvisor.exports.link import Link

log = logging.getLogger(__name__)

EXTENT = struct.Struct("<QQB")
_OBJECT_SIZE = struct.Struct("<Q")


class Op:
    """Channel operations (see the module docstring)."""

    REPLY = 1
    WRITE = 2  # a = offset, b = length, payload = data
    ZERO = 3  # a = offset, b = length
    FLUSH = 4
    STATUS = 5  # a = offset, b = length; reply payload = EXTENT records
    GETFD = 6  # a = device index; reply carries the fd
    FREEZE = 7  # owner -> plane; the reply comes once no direct I/O runs
    THAW = 8  # owner -> plane
    RESIZED = 9  # owner -> plane: the map's size changed
    READY = 10  # plane -> owner, unsolicited: the plane serves
    FAILED = 11  # plane -> owner, unsolicited: a direct read (a = 0) or write (a = 1) of a
    # backing device failed with errno b; payload = the message. The owner counts it.
    READ = 12  # a = offset, b = length; reply payload = the data (bounded or cached volumes)
    CACHEFD = 13  # a = cache generation, b = 0 (line table) or 1 (device); reply carries it
    HITS = 14  # plane -> owner, unsolicited: a = reads and writes served from the cache here
    # that it had not told yet; owner -> plane: tell them now (the reply follows the HITS)
    MARKS = 15  # a = device index; the reply carries the memfd of its marks and, as payload,
    # their object size (no fd and no payload: its writes in place need no mark)


class Flag:
    FUA = 1
    UNMAP = 2  # ZERO: may release clusters
    DISCARD = 4  # ZERO: a discard (always unmaps)


_HITS_BATCH = 1024
"""Cache hits a plane counts before it tells the owner (``HITS``); the rest when the owner
asks (``PlaneHost.ask_hits``) and at close."""
_CACHE_DEVICE = 2
"""``FAILED``'s ``a`` for a read or write of the cache device."""
_FREEZE_TIMEOUT = 30.0
_HOST_THREADS = 4
_MAX_PAYLOAD = 64 << 20  # a WRITE's data, a reply's extents


# ----------------------------------------------------------------------------- owner side


class PlaneHost:
    """The owner's end of one data plane: serves ``volume`` over ``sock`` and keeps the
    shared map current while attached. ``on_stuck`` is called (to kill the plane's process)
    when it does not answer a freeze in time; ``on_closed`` (from the channel's thread) when
    the plane ends the channel, unless ``close`` came first."""

    def __init__(
        self,
        volume: Volume,
        sock: socket.socket,
        on_stuck: Callable[[], None] | None = None,
        on_closed: Callable[[], None] | None = None,
    ) -> None:
        self.volume = volume
        self._on_closed = on_closed
        self._closing = False
        self.map = SharedMap(volume.name.replace("/", "-"), volume.size, volume.cluster_size)
        self.ready = threading.Event()
        self._sock = sock
        self._link = Link(sock, max_payload=_MAX_PAYLOAD)
        self._on_stuck = on_stuck
        self._ids = itertools.count(1)
        self._waits: dict[int, threading.Event] = {}
        self._waits_lock = threading.Lock()
        self._dead = threading.Event()
        self._jobs: SimpleQueue[tuple[int, int, int, int, int, bytearray | None] | None] = (
            SimpleQueue()
        )
        self._threads: list[threading.Thread] = []
        """Started as requests need them, up to ``_HOST_THREADS``: an idle export costs one
        thread (the reader)."""
        self._threads_lock = threading.Lock()
        self._idle = 0  # threads waiting for a job
        self._reader = threading.Thread(target=self._read, name="plane-host-rx", daemon=True)
        self._attached = False

    def start(self) -> None:
        """Attach to the volume and serve the channel."""
        self.volume.attach_plane(self)
        self._attached = True
        self._reader.start()

    @property
    def alive(self) -> bool:
        return not self._dead.is_set()

    def wait_closed(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the plane to end the channel; whether it has."""
        return self._dead.wait(timeout)

    # -- DataPlane (engine/volume.py) --

    def freeze(self) -> None:
        if self._dead.is_set():
            return
        ident, done = self._ask(Op.FREEZE)
        if not done.wait(_FREEZE_TIMEOUT) and not self._dead.is_set():
            log.error("data plane of %s did not freeze in time; stopping it", self.volume.name)
            if self._on_stuck is not None:
                self._on_stuck()
            self._dead.wait(_FREEZE_TIMEOUT)
        with self._waits_lock:
            self._waits.pop(ident, None)

    def thaw(self) -> None:
        if not self._dead.is_set():
            with contextlib.suppress(OSError):
                self._link.send(Op.THAW)

    def resized(self) -> None:
        if not self._dead.is_set():
            with contextlib.suppress(OSError):
                self._link.send(Op.RESIZED)

    def ask_hits(self) -> threading.Event:
        """Ask the plane for the cache hits it has not told yet; the event is set once
        they were added to the volume's count (or the plane is gone)."""
        if self._dead.is_set():
            done = threading.Event()
            done.set()
            return done
        return self._ask(Op.HITS)[1]

    def _ask(self, op: int) -> tuple[int, threading.Event]:
        """Send the plane request ``op``; its id, and the event its reply (or the plane's
        end) sets."""
        ident = next(self._ids)
        done = threading.Event()
        with self._waits_lock:
            self._waits[ident] = done
        try:
            self._link.send(op, ident)
        except OSError:
            self._die()
        return ident, done

    # -- lifecycle --

    def close(self) -> None:
        """Detach from the volume and drop the channel (the plane's process then exits).
        The volume handle stays open. Idempotent."""
        self._closing = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._die()
        if self._reader.is_alive():
            self._reader.join()
        with self._threads_lock:
            threads = list(self._threads)
            self._idle = _HOST_THREADS  # start no more
        for _ in threads:
            self._jobs.put(None)
        for thread in threads:
            if thread.is_alive():
                thread.join()
        self._sock.close()
        self.map.close()

    def _die(self) -> None:
        if self._attached:
            self._attached = False
            self.volume.detach_plane(self)
        self._dead.set()
        with self._waits_lock:
            waits = list(self._waits.values())
        for event in waits:
            event.set()

    def _read(self) -> None:
        receive = self._link.receive
        try:
            while True:
                frame = receive()
                if frame is None:
                    return
                op = frame.op
                if op == Op.REPLY:
                    with self._waits_lock:
                        event = self._waits.pop(frame.ident, None)
                    if event is not None:
                        event.set()
                elif op == Op.READY:
                    self.ready.set()
                elif op == Op.HITS:
                    self.volume.cache_hits(frame.a)
                elif op == Op.FAILED:
                    message = bytes(frame.payload).decode(errors="replace")
                    error = IOFailure(message, frame.b or errno.EIO)
                    if frame.a == _CACHE_DEVICE:
                        self.volume.cache_failed(error)
                    else:
                        kind = BackingOp.WRITE if frame.a else BackingOp.READ
                        self.volume.backing_failed(kind, error)
                elif op == Op.WRITE:
                    self._submit((op, frame.flags, frame.ident, frame.a, frame.b, frame.payload))
                elif op in (Op.READ, Op.ZERO, Op.FLUSH, Op.STATUS, Op.GETFD, Op.CACHEFD, Op.MARKS):
                    self._submit((op, frame.flags, frame.ident, frame.a, frame.b, None))
                else:
                    raise LocalFailure(f"unknown data-plane operation {op}")
        except (OSError, LocalFailure) as e:
            if not self._dead.is_set():
                log.warning("data-plane channel of %s failed: %s", self.volume.name, e)
        finally:
            self._die()
            if not self._closing and self._on_closed is not None:
                self._on_closed()

    def _submit(self, job: tuple[int, int, int, int, int, bytearray | None]) -> None:
        with self._threads_lock:
            if self._idle <= 0 and len(self._threads) < _HOST_THREADS:
                thread = threading.Thread(
                    target=self._work, name=f"plane-host-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                self._idle += 1
                thread.start()
            self._idle -= 1  # taken by a thread now waiting, or by the next to finish
        self._jobs.put(job)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                self._run(*job)
            finally:
                with self._threads_lock:
                    self._idle += 1

    def _run(self, op: int, flags: int, ident: int, a: int, b: int, data: bytearray | None) -> None:
        try:
            if op == Op.GETFD:
                self._link.send(Op.REPLY, ident, fds=[self.volume.backing_fd(a)])
                return
            if op == Op.CACHEFD:
                self._link.send(Op.REPLY, ident, fds=[self.volume.cache_fds(a)[b & 1]])
                return
            if op == Op.MARKS:
                marks = self.volume.backing_marks(a)
                if marks is None:
                    self._link.send(Op.REPLY, ident)
                else:
                    size = _OBJECT_SIZE.pack(marks[1])
                    self._link.send(Op.REPLY, ident, 0, len(size), size, fds=[marks[0]])
                return
            payload = self._execute(op, flags, a, b, data)
            self._link.send(Op.REPLY, ident, 0, len(payload), payload)
        except StorvisorError as e:
            code = e.errno if isinstance(e, IOFailure) else errno.EIO
            message = str(e).encode()[:4000]
            with contextlib.suppress(OSError):
                self._link.send(Op.REPLY, ident, code or errno.EIO, len(message), message)
        except KeyError:
            with contextlib.suppress(OSError):
                self._link.send(Op.REPLY, ident, errno.ENODEV)
        except OSError:
            self._die()

    def _execute(self, op: int, flags: int, a: int, b: int, data: bytearray | None) -> bytes:
        volume = self.volume
        if op == Op.READ:
            buf = bytearray(b)
            volume.read_into(a, memoryview(buf))
            return bytes(buf)
        if op == Op.WRITE:
            assert data is not None
            volume.write(a, data, fua=bool(flags & Flag.FUA))
        elif op == Op.ZERO:
            if flags & Flag.DISCARD:
                volume.discard(a, b)
            else:
                volume.write_zeroes(
                    a, b, may_unmap=bool(flags & Flag.UNMAP), fua=bool(flags & Flag.FUA)
                )
        elif op == Op.FLUSH:
            volume.flush()  # syncs the plane's own in-place writes too
        elif op == Op.STATUS:
            return b"".join(
                EXTENT.pack(e.offset, e.length, e.allocated | e.zero << 1)
                for e in volume.block_status(a, b)
            )
        return b""


# ------------------------------------------------------------------------ data-plane side


@dataclass
class _Call:
    done: threading.Event
    code: int = 0
    payload: bytes = b""
    fd: int = -1


class RemoteVolume:
    """A ``BlockDevice`` served by a ``PlaneHost`` in the pool's owner process.

    ``backings`` maps device index -> fd of the pool's backing devices (more are fetched
    on demand; those are closed with the volume, as ``backings`` are with ``owns_backings``);
    ``on_lost`` runs once when the channel breaks, before any request waiting
    for the owner fails (``IOFailure(EIO)``). Thread-safe.
    """

    def __init__(
        self,
        sock: socket.socket,
        map_fd: int,
        backings: dict[int, int],
        cluster_size: int,
        *,
        read_only: bool = False,
        serial: str = "",
        on_lost: Callable[[], None] | None = None,
        on_resized: Callable[[], None] | None = None,
        owns_backings: bool = False,
    ) -> None:
        self._sock = sock
        self._owned = set(backings.values()) if owns_backings else set()
        self._link = Link(sock, max_payload=_MAX_PAYLOAD, max_fds=1)
        self._reader_map = MapReader(map_fd)
        self._size = self._reader_map.size
        """The size last seen: a request within it is in range (a volume only grows);
        ``_check`` looks again for one beyond it."""
        self._fds = dict(backings)
        self._fds_lock = threading.Lock()
        self._marks: dict[int, tuple[mmap.mmap, int] | None] = {}
        """Backing fd -> the shared marks of its device and their object size
        (``Backing.marks``), or None: its writes in place need no mark. A write to a fd
        not in it goes to the owner until ``_know_marks`` has learned them."""
        self._cs = cluster_size
        self._shift = cluster_size.bit_length() - 1
        self._zeros = memoryview(bytes(cluster_size))
        self._read_only = read_only
        self.serial = serial
        self._on_lost = on_lost
        self._lost_told = threading.Lock()  # held for good once on_lost has run
        self._on_resized = on_resized
        self._gate = Gate()
        self._remap_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._calls: dict[int, _Call] = {}
        self._calls_lock = threading.Lock()
        self._lost = False
        self._closed = False
        self._lines: LinesReader | None = None
        self._old_lines: list[LinesReader] = []  # replaced, closed with the volume
        self._lines_lock = threading.Lock()
        self._hits = itertools.count(1)  # next() is atomic: no lock for the count
        self._told = 0  # the last tick of ``_hits`` whose hits the owner was told of
        self._told_lock = threading.Lock()
        self.vectors = _RemoteVectors(self)
        """``blk.VectoredIO`` over this volume (a request's buffers in as few calls as the
        cluster layout allows)."""
        self._reader = threading.Thread(target=self._read, name="plane-rx", daemon=True)
        self._reader.start()

    # -- BlockDevice --

    @property
    def size(self) -> int:
        return self._reader_map.size

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def block_size(self) -> int:
        return 512

    @property
    def cluster_size(self) -> int:
        return self._cs

    def read_into(self, offset: int, buf: memoryview) -> None:
        n = len(buf)
        if self._closed or self._lost or offset < 0 or offset + n > self._size:
            self._check(offset, n, writing=False)
        m = self._reader_map
        generation = m.cache
        if m.bounded:
            self._read_owner(offset, [buf])
        elif generation:
            if not self._cached_one(offset, buf, generation, False):
                self._cached_read(offset, [buf], generation)
        elif not self._read_one(offset, buf):
            self.vectors.read_into(offset, [buf])

    def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        view = data if type(data) is memoryview else memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        n = len(view)
        closed = self._closed or self._lost
        if closed or offset < 0 or offset + n > self._size or self._read_only:
            self._check(offset, n, writing=True)
        m = self._reader_map
        generation = m.cache
        if m.bounded:
            self._call(Op.WRITE, Flag.FUA if fua else 0, offset, n, view)
        elif generation:
            if fua or not self._cached_one(offset, view, generation, True):
                self._cached_write(offset, [view], fua, generation)
        elif fua or not self._write_one(offset, view):
            self.vectors.write(offset, [view], fua=fua)

    def _read_owner(self, offset: int, views: list[memoryview]) -> None:
        """Have the owner read ``views`` (a bounded volume, see the module docstring)."""
        length = sum(map(len, views))
        if not length:
            return
        data = memoryview(self._call(Op.READ, 0, offset, length))
        if len(data) != length:
            raise IOFailure(f"data plane: the owner read {len(data)} of {length} bytes")
        pos = 0
        for view in views:
            view[:] = data[pos : pos + len(view)]
            pos += len(view)

    # -- through the cache tier (see the module docstring) --

    def _lines_of(self, generation: int) -> LinesReader | None:
        """The line table of cache ``generation``, fetched from the owner the first time;
        None when the owner's cache is not that one any more. Never call inside the gate."""
        lines = self._lines
        if lines is not None and lines.generation == generation:
            return lines
        with self._lines_lock:
            lines = self._lines
            if lines is not None and lines.generation == generation:
                return lines
            fds: list[int] = []
            try:
                for which in (0, 1):
                    started = self._start_call(Op.CACHEFD, 0, generation, which)
                    try:
                        self._finish_call(started)
                    finally:
                        if started[1].fd >= 0:
                            fds.append(started[1].fd)
                    if started[1].fd < 0:
                        raise IOFailure("data plane: no cache fd in the reply", errno.ENODEV)
                lines = LinesReader(fds[0], fds[1])
            except (IOFailure, ValueError, OSError):
                for fd in fds:
                    os.close(fd)
                return None
            if lines.generation != generation:
                lines.close()
                return None
            if self._lines is not None:
                self._old_lines.append(self._lines)  # a thread may still read through it
            self._lines = lines
            return lines

    def _cached_one(self, offset: int, view: memoryview, generation: int, writing: bool) -> bool:
        """Serve a read within one cluster from the cache (the common hit), or write within
        one owned cluster in place in the cache (the common overwrite); False if it is not
        one (nothing was done: the caller takes the general path). The range is checked."""
        lines = self._lines
        n = len(view)
        within = offset & (self._cs - 1)
        if lines is None or lines.generation != generation or within + n > self._cs:
            return False
        gate = self._gate
        due = 0
        gate.enter()
        try:
            m = self._reader_map
            if m.cache != generation:
                return False
            try:
                place = m.lookup(offset >> self._shift)
            except IndexError:
                return False
            if writing:
                if place is None or not place[2]:
                    return False
                if not lines.write(place[0], place[1] + within, [view], n):
                    return False
            elif place is None:
                view[:] = self._zeros[:n]
                return True
            elif not lines.read(place[0], place[1] + within, [view], n):
                return False
            due = self._hit()
            return True
        except IOFailure as e:
            self._report(_CACHE_DEVICE, e)
            raise
        finally:
            gate.leave()
            if due:
                self._tell_hits(due)

    def _hit(self) -> int:
        """Count a request served from the cache here; when a batch is due for the owner,
        the tick to tell it up to (``_tell_hits``, outside the gate: a send may wait), else 0.

        Each hit takes one tick of ``_hits``; so does each count the owner asks for, at
        once under ``_told_lock`` (a tick that is no hit). Every tick from ``_told`` on is
        a hit: told counts are differences of ticks."""
        tick = next(self._hits)
        return tick if tick % _HITS_BATCH == 0 else 0

    def _tell_hits(self, upto: int) -> None:
        """Tell the owner of the hits up to tick ``upto`` not told yet."""
        with self._told_lock:
            count = upto - self._told
            if count <= 0:
                return  # an owner's ask took them already
            self._told = upto
            with contextlib.suppress(OSError):
                self._link.send(Op.HITS, 0, count)

    def _tell_all_hits(self) -> None:
        """Tell the owner of every hit counted so far."""
        with self._told_lock:
            tick = next(self._hits)  # no hit: every hit counted so far is before it
            count = tick - 1 - self._told
            self._told = tick
            if count > 0:
                with contextlib.suppress(OSError):
                    self._link.send(Op.HITS, 0, count)

    def _cached_read(self, offset: int, views: list[memoryview], generation: int) -> None:
        """Read through the cache tier: cached lines here, the rest from the owner."""
        lines = self._lines_of(generation)
        length = sum(map(len, views))
        if lines is None or not length:
            self._read_owner(offset, views)
            return
        misses: list[tuple[int, int]] = []  # (position in the request, length)
        gate = self._gate
        due = 0
        gate.enter()
        try:
            m = self._reader_map
            if m.cache != lines.generation or m.bounded:
                misses.append((0, length))
            else:
                if (offset + length - 1) >> self._shift >= m.clusters:
                    self._remap()
                cs = self._cs
                pos = 0
                while pos < length:
                    at = offset + pos
                    within = at & (cs - 1)
                    n = min(cs - within, length - pos)
                    part = views if n == length else slice_views(views, pos, n)
                    place = m.lookup(at >> self._shift)
                    if place is None:
                        for view in part:
                            _fill_zeros(view, self._zeros)
                    elif lines.read(place[0], place[1] + within, part, n):
                        due = max(due, self._hit())
                    elif misses and sum(misses[-1]) == pos:
                        misses[-1] = (misses[-1][0], misses[-1][1] + n)
                    else:
                        misses.append((pos, n))
                    pos += n
        except IOFailure as e:
            self._report(_CACHE_DEVICE, e)
            raise
        finally:
            gate.leave()
        if due:
            self._tell_hits(due)
        for pos, n in misses:
            self._read_owner(offset + pos, slice_views(views, pos, n))

    def _cached_write(
        self, offset: int, views: list[memoryview], fua: bool, generation: int
    ) -> None:
        """Write through the cache tier: in place into lines dirty in the open epoch,
        the rest by the owner."""
        lines = self._lines_of(generation)
        length = sum(map(len, views))
        if not length:
            return
        remote: list[tuple[int, int]] = []  # (position in the request, length)
        gate = self._gate
        due = 0
        gate.enter()
        try:
            m = self._reader_map
            if lines is None or m.cache != lines.generation or m.bounded:
                remote.append((0, length))
            else:
                if (offset + length - 1) >> self._shift >= m.clusters:
                    self._remap()
                cs = self._cs
                pos = 0
                while pos < length:
                    at = offset + pos
                    within = at & (cs - 1)
                    n = min(cs - within, length - pos)
                    part = views if n == length else slice_views(views, pos, n)
                    place = m.lookup(at >> self._shift)
                    if (
                        place is not None
                        and place[2]
                        and lines.write(place[0], place[1] + within, part, n)
                    ):
                        due = max(due, self._hit())
                    elif remote and sum(remote[-1]) == pos:
                        remote[-1] = (remote[-1][0], remote[-1][1] + n)
                    else:
                        remote.append((pos, n))
                    pos += n
        except IOFailure as e:
            self._report(_CACHE_DEVICE, e)
            raise
        finally:
            gate.leave()
        if due:
            self._tell_hits(due)
        for pos, n in remote:  # outside the gate: the owner may freeze it meanwhile
            data = b"".join(slice_views(views, pos, n))
            self._call(Op.WRITE, 0, offset + pos, n, data)
        if fua:
            self._call(Op.FLUSH)

    def _read_one(self, offset: int, buf: memoryview) -> bool:
        """Serve a read within one cluster directly (the common case); False if it is not
        one (the caller takes the general path). The range is checked."""
        n = len(buf)
        cs = self._cs
        within = offset & (cs - 1)
        if within + n > cs:
            return False
        gate = self._gate
        gate.enter()
        try:
            if self._reader_map.cache:  # a cache was attached since the caller looked
                return False
            try:
                place = self._reader_map.lookup(offset >> self._shift)
            except IndexError:  # the volume grew: the general path remaps
                return False
            if place is None:
                buf[:] = self._zeros[:n]
                return True
            fd = self._fds.get(place[0])
            if fd is None:
                return False
            try:
                preadv_full(fd, [buf], place[1] + within)
            except IOFailure as e:
                self._report(0, e)
                raise
            return True
        finally:
            gate.leave()

    def _write_one(self, offset: int, view: memoryview) -> bool:
        """Write within one owned cluster directly (the common overwrite); False if the
        write is not one (the caller takes the general path). The range is checked."""
        n = len(view)
        cs = self._cs
        within = offset & (cs - 1)
        if within + n > cs:
            return False
        gate = self._gate
        gate.enter()
        try:
            if self._reader_map.cache:  # a cache was attached since the caller looked
                return False
            try:
                place = self._reader_map.lookup(offset >> self._shift)
            except IndexError:
                return False
            if place is None or not place[2]:
                return False
            fd = self._fds.get(place[0])
            if fd is None or fd not in self._marks:
                return False
            where = place[1] + within
            try:
                pwritev_full(fd, [view], where)
            except IOFailure as e:
                self._report(1, e)
                raise
            finally:  # a failed write may have changed part of the range
                self._mark(fd, where, n)
            return True
        finally:
            gate.leave()

    def _mark(self, fd: int, where: int, length: int) -> None:
        """Mark the objects that bytes ``[where, where + length)`` of ``fd`` lie in, if its
        device wants it: after the write in place, before it is acknowledged."""
        marks = self._marks[fd]
        if marks is None or length <= 0:
            return
        shared, size = marks
        first = where // size
        last = (where + length - 1) // size
        if first == last:
            shared[first] = 1
        else:
            shared[first : last + 1] = b"\x01" * (last + 1 - first)

    def _know_marks(self) -> None:
        """Learn which backing devices want their writes in place marked (``Op.MARKS``),
        for the fds not asked about yet; call outside the gate."""
        if len(self._marks) >= len(self._fds):
            return
        with self._fds_lock:
            for index, fd in list(self._fds.items()):
                if fd not in self._marks:
                    self._marks[fd] = self._fetch_marks(index)

    def _fetch_marks(self, index: int) -> tuple[mmap.mmap, int] | None:
        started = self._start_call(Op.MARKS, 0, index, 0)
        payload = self._finish_call(started)
        fd = started[1].fd
        if fd < 0:
            return None
        try:
            (size,) = _OBJECT_SIZE.unpack(payload)
            return mmap.mmap(fd, 0), size
        finally:
            os.close(fd)

    def _report(self, writing: int, error: IOFailure) -> None:
        """Tell the owner that a direct read (0) or write (1) failed (see ``Op.FAILED``)."""
        message = str(error).encode()[:4000]
        with contextlib.suppress(OSError):
            self._link.send(Op.FAILED, 0, writing, error.errno, message)

    def flush(self) -> None:
        self._check(0, 0, writing=False)
        self._call(Op.FLUSH)

    def discard(self, offset: int, length: int) -> None:
        self._check(offset, length, writing=True)
        self._call(Op.ZERO, Flag.DISCARD, offset, length)

    def write_zeroes(
        self, offset: int, length: int, *, may_unmap: bool = True, fua: bool = False
    ) -> None:
        self._check(offset, length, writing=True)
        flags = (Flag.UNMAP if may_unmap else 0) | (Flag.FUA if fua else 0)
        self._call(Op.ZERO, flags, offset, length)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        self._check(offset, length, writing=False)
        raw = self._call(Op.STATUS, 0, offset, length)
        return [
            Extent(off, n, bool(kind & 1), bool(kind & 2))
            for off, n, kind in EXTENT.iter_unpack(raw)
        ]

    def close(self) -> None:
        """Drop the channel; idempotent."""
        if self._closed:
            return
        if not self._lost:
            self._tell_all_hits()
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        if self._reader is not threading.current_thread():
            self._reader.join()
        self._sock.close()
        self._reader_map.close()
        with self._lines_lock:
            for lines in [*self._old_lines, *([self._lines] if self._lines else [])]:
                lines.close()
            self._lines = None
            self._old_lines.clear()
        with self._fds_lock:
            for fd in self._owned:
                os.close(fd)
            self._owned.clear()
            for marks in self._marks.values():
                if marks is not None:
                    marks[0].close()
            self._marks.clear()

    # -- direct I/O --

    def _check(self, offset: int, length: int, *, writing: bool) -> None:
        if self._closed or self._lost:
            raise IOFailure("data plane: the volume's owner is gone", errno.EIO)
        size = self._size = self._reader_map.size
        if offset < 0 or length < 0:
            raise IOFailure(f"negative offset or length ({offset}, {length})", errno.EINVAL)
        if offset + length > size:
            raise IOFailure(
                f"request [{offset}, {offset + length}) beyond end of device ({size})",
                errno.ENOSPC if writing else errno.EINVAL,
            )
        if writing and self._read_only:
            raise IOFailure("device is read-only", errno.EPERM)

    def _plan(self, offset: int, length: int) -> list[tuple[int, int, int, bool]]:
        """``(fd or -1 for zeros, file offset, length, owned)`` runs covering the range.
        Call inside the gate."""
        cs = self._cs
        shift = self._shift
        if (offset + length - 1) >> shift >= self._reader_map.clusters:
            self._remap()
        lookup = self._reader_map.lookup
        fds = self._fds
        runs: list[tuple[int, int, int, bool]] = []
        pos = offset
        end = offset + length
        while pos < end:
            within = pos & (cs - 1)
            chunk = min(cs - within, end - pos)
            place = lookup(pos >> shift)
            if place is None:
                fd, where, owned = -1, 0, False
            else:
                device, base, owned = place
                found = fds.get(device)
                if found is None:
                    raise _NeedFd(device)
                fd, where = found, base + within
                owned = owned and fd in self._marks
            if runs:
                rfd, roff, rlen, rown = runs[-1]
                if rfd == fd and rown == owned and (fd < 0 or roff + rlen == where):
                    runs[-1] = (rfd, roff, rlen + chunk, rown)
                    pos += chunk
                    continue
            runs.append((fd, where, chunk, owned))
            pos += chunk
        return runs

    def _remap(self) -> None:
        with self._remap_lock:
            self._reader_map.remap()
            self._size = self._reader_map.size

    def _plan_outside(self, offset: int, length: int) -> list[tuple[int, int, int, bool]]:
        """``_plan``, entering the gate; returns inside it. Fetches missing backing fds
        first (never inside the gate: a freeze must not wait for the owner)."""
        gate = self._gate
        while True:
            gate.enter()
            try:
                if self._reader_map.cache:  # a cache was attached since the caller looked
                    raise _CacheAttached
                return self._plan(offset, length)
            except _NeedFd as need:
                gate.leave()
                self._fetch_fd(need.index)
            except BaseException:
                gate.leave()
                raise

    def _fetch_fd(self, index: int) -> None:
        with self._fds_lock:
            if index not in self._fds:
                started = self._start_call(Op.GETFD, 0, index, 0)
                self._finish_call(started)
                fd = started[1].fd
                if fd < 0:
                    raise IOFailure(f"data plane: no backing device {index}", errno.ENODEV)
                self._owned.add(fd)
                self._marks[fd] = self._fetch_marks(index)
                self._fds[index] = fd

    # -- the channel --

    def _call(
        self, op: int, flags: int = 0, a: int = 0, b: int = 0, payload: Buffer = b""
    ) -> bytes:
        call = self._start_call(op, flags, a, b, payload)
        return self._finish_call(call)

    def _start_call(
        self, op: int, flags: int, a: int, b: int, payload: Buffer = b""
    ) -> tuple[int, _Call]:
        if self._lost:
            raise IOFailure("data plane: the volume's owner is gone", errno.EIO)
        ident = next(self._ids) & 0xFFFFFFFF
        call = _Call(threading.Event())
        with self._calls_lock:
            self._calls[ident] = call
        try:
            self._link.send(op, ident, a, b, payload, flags=flags)
        except OSError as e:
            with self._calls_lock:
                self._calls.pop(ident, None)
            self._tell_lost()  # before failing the request, as when the reader sees it
            raise IOFailure(f"data plane: channel failed: {e.strerror}", errno.EIO) from e
        return ident, call

    def _finish_call(self, started: tuple[int, _Call]) -> bytes:
        _, call = started
        call.done.wait()
        if call.code:
            raise IOFailure(call.payload.decode(errors="replace") or "owner failed", call.code)
        return call.payload

    def _read(self) -> None:
        receive = self._link.receive
        try:
            while True:
                frame = receive()
                if frame is None:
                    return
                op = frame.op
                if op == Op.REPLY:
                    with self._calls_lock:
                        call = self._calls.pop(frame.ident, None)
                    if call is None:
                        for fd in frame.fds:
                            os.close(fd)
                        continue
                    call.code = frame.a
                    call.payload = bytes(frame.payload) if frame.payload else b""
                    if frame.fds:
                        call.fd = frame.fds[0]
                    call.done.set()
                elif op == Op.FREEZE:
                    self._gate.freeze()
                    self._link.send(Op.REPLY, frame.ident)
                elif op == Op.THAW:
                    self._gate.thaw()
                elif op == Op.HITS:
                    self._tell_all_hits()
                    self._link.send(Op.REPLY, frame.ident)
                elif op == Op.RESIZED:
                    self._remap()
                    if self._on_resized is not None:
                        self._on_resized()
                else:
                    raise LocalFailure(f"unknown data-plane operation {op}")
        except (OSError, LocalFailure) as e:
            if not self._closed:
                log.error("data-plane channel failed: %s", e)
        finally:
            self._link.close_pending()
            # on_lost first: a data plane that exits now completes nothing with an error
            # (a vhost-user front-end resubmits what was in flight to the next one)
            self._tell_lost()
            self._lost = True
            with self._calls_lock:
                calls, self._calls = list(self._calls.values()), {}
            for call in calls:
                call.code, call.payload = errno.EIO, b"the volume's owner is gone"
                call.done.set()

    def _tell_lost(self) -> None:
        """Run ``on_lost`` (once, and not after ``close``): the channel broke."""
        first = self._lost_told.acquire(blocking=False)
        if first and not self._closed and self._on_lost is not None:
            self._on_lost()

    def ready(self) -> None:
        """Tell the owner this plane serves (its export listens)."""
        self._link.send(Op.READY)

    def __repr__(self) -> str:
        return f"<RemoteVolume fd={self._sock.fileno()}>"


class _CacheAttached(Exception):
    """The pool got a cache tier while a request took the path without one."""


class _NeedFd(Exception):
    def __init__(self, index: int) -> None:
        self.index = index


class _RemoteVectors:
    """``blk.VectoredIO`` for a ``RemoteVolume``; ranges are checked by the caller."""

    def __init__(self, volume: RemoteVolume) -> None:
        self._v = volume

    def read_into(self, offset: int, views: list[memoryview]) -> None:
        v = self._v
        if v._reader_map.bounded:
            v._read_owner(offset, views)
            return
        generation = v._reader_map.cache
        if generation:
            v._cached_read(offset, views, generation)
            return
        if len(views) == 1 and v._read_one(offset, views[0]):
            return
        length = sum(map(len, views))
        if not length:
            return
        gate = v._gate
        try:
            runs = v._plan_outside(offset, length)
        except _CacheAttached:
            v._cached_read(offset, views, v._reader_map.cache)
            return
        try:
            if len(runs) == 1 and runs[0][0] >= 0:
                preadv_full(runs[0][0], views, runs[0][1])
                return
            pos = 0
            for fd, where, n, _ in runs:
                part = slice_views(views, pos, n)
                if fd < 0:
                    for view in part:
                        _fill_zeros(view, v._zeros)
                else:
                    preadv_full(fd, part, where)
                pos += n
        except IOFailure as e:
            v._report(0, e)
            raise
        finally:
            gate.leave()

    def write(self, offset: int, views: list[memoryview], *, fua: bool) -> None:
        v = self._v
        if v._reader_map.bounded:
            data = b"".join(views)
            v._call(Op.WRITE, Flag.FUA if fua else 0, offset, len(data), data)
            return
        generation = v._reader_map.cache
        if generation:
            v._cached_write(offset, views, fua, generation)
            return
        v._know_marks()
        if len(views) == 1 and v._write_one(offset, views[0]):
            if fua:
                v._call(Op.FLUSH)
            return
        length = sum(map(len, views))
        gate = v._gate
        remote: list[tuple[int, int]] = []  # (position in the request, length)
        if not length:
            return
        try:
            runs = v._plan_outside(offset, length)
        except _CacheAttached:
            v._cached_write(offset, views, fua, v._reader_map.cache)
            return
        try:
            pos = 0
            for fd, where, n, owned in runs:
                if owned:
                    try:
                        pwritev_full(fd, slice_views(views, pos, n), where)
                    finally:  # a failed write may have changed part of the range
                        v._mark(fd, where, n)
                else:
                    remote.append((pos, n))
                pos += n
        except IOFailure as e:
            v._report(1, e)
            raise
        finally:
            gate.leave()
        for pos, n in remote:  # outside the gate: the owner may freeze it meanwhile
            data = b"".join(slice_views(views, pos, n))
            v._call(Op.WRITE, 0, offset + pos, n, data)
        if fua:
            v._call(Op.FLUSH)


def _fill_zeros(view: memoryview, zeros: memoryview) -> None:
    pos = 0
    while pos < len(view):
        n = min(len(zeros), len(view) - pos)
        view[pos : pos + n] = zeros[:n]
        pos += n
