"""Thin volume handles: the data path of the engine.

Theory of operation
-------------------
Every open volume (or snapshot) has one ``VolumeState`` shared by all its handles. Its
``view`` merges the layer chain into one dict: virtual cluster -> ``(fd, byte offset, owner
layer)``, with ``fd = -1`` for an explicit zero. So:

* a read of one cluster is one dict lookup and one ``preadv`` into the caller's buffer
  (contiguous clusters are read with one ``preadv``), inside the state's gate; unmapped
  clusters read as zeros;
* a write to a cluster the top layer owns is one ``pwritev`` from the caller's buffer, with no
  lock but inside the state's ``Gate`` (sharedmap.py); any other write *allocates*: it marks
  the virtual cluster pending (a second writer to it waits, then writes in place), takes a
  free cluster (``place``: beside the top layer's clusters of the same virtual group, see
  ``allocator``), writes the whole cluster (the caller's bytes plus zeros, or plus the
  parent's data: copy-on-write) and only then publishes the mapping, so no reader ever sees
  a cluster's stale contents. Allocations of different clusters run in parallel;
* discard and write-zeroes release whole clusters the top owns and record explicit zeros
  where a parent has data; partial clusters get zeros written.

Snapshot creation only changes ``top``: entries owned by the old top are then treated as a
parent's, and the next write to them copies. It changes ``top`` with the gate frozen, so no
in-place write that found its cluster owned before can land in the snapshot afterwards; for
the same reason the pool recycles freed clusters only through a frozen gate.

Bounded requests: when the pool's data timeout is set (``state.timeout``, 0 otherwise),
``read_into`` and ``write`` go through bounce buffers on the pool's I/O threads
(``Pool.run_bounded``, ``engine/bounded.py``): the caller's buffer is never given to a system
call, so a request that times out leaves it untouched from then on, and an allocating write
that finishes after its request was abandoned maps nothing. With the timeout off, the only
cost is one test of ``state.timeout`` per request.

Data planes: another process may serve the volume (``storvisor.exports.dataplane``); it reads
a ``SharedMap`` mirror of the view that every change here keeps current (``_publish``,
``set_top``, ``set_size``), runs its own in-place I/O inside its own gate, and sends every
other request here. Freezing the state freezes its planes too.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Iterator
from typing import Protocol

from storvisor.engine import bounded
from storvisor.engine.catalog import ZERO
from storvisor.engine.device import Buffer, Extent
from storvisor.engine.pio import preadv_full, pwritev_full
from storvisor.engine.sharedmap import Gate, SharedMap
from storvisor.engine.types import BackingOp
from storvisor.errors import IOFailure, NoSpace

Entry = tuple[int, int, int]
"""A view entry: backing fd (-1 for an explicit zero), byte offset, owning layer id."""


class VolumePool(Protocol):
    """What a volume needs from its pool (``engine.pool.Pool``; see its methods for the
    contracts). The pool lock guards the pool's maps, allocator and every state's view."""

    @property
    def cluster_size(self) -> int: ...

    @property
    def group(self) -> int:
        """Clusters per placement group."""

    @property
    def lock(self) -> threading.RLock: ...

    def flush(self) -> None: ...

    def phys_at(self, fd: int, offset: int) -> int: ...

    def locate(self, phys: int) -> tuple[int, int]: ...

    def allocate(self, pos: int = 0, anchor: int | None = None) -> int: ...

    def unallocate(self, phys: int) -> None: ...

    def set_entry(self, layer_id: int, vc: int, value: int | None) -> None: ...

    def layer_has_parent(self, layer_id: int) -> bool: ...

    def backing_fds(self) -> dict[int, int]: ...

    def backing_fd(self, index: int) -> int: ...

    def backing_marks(self, index: int) -> tuple[int, int] | None: ...

    def drop_state(self, state: VolumeState) -> None:
        """A handle on ``state`` was closed."""

    def backing_failed(self, op: BackingOp, error: IOFailure) -> None:
        """A read or write of a backing device failed with ``error``."""

    def cache_fds(self, generation: int) -> tuple[int, int]:
        """``(line table memfd, cache device fd)`` of the cache tier of ``generation``."""

    def cache_failed(self, error: IOFailure) -> None:
        """A data plane's read or write of the cache device failed with ``error``."""

    def cache_hits(self, count: int) -> None:
        """A data plane served ``count`` reads and writes from the cache itself."""

    def run_bounded(self, op: BackingOp, work: Callable[[], None]) -> None:
        """Run ``work`` on an I/O thread within the data timeout; raises ``IOFailure``
        (ETIMEDOUT) past it."""


class DataPlane(Protocol):
    """Another process serving this volume from a ``SharedMap`` (exports/dataplane.py)."""

    @property
    def map(self) -> SharedMap: ...

    def freeze(self) -> None:
        """Return once the plane runs no direct read or write; hold new ones back."""

    def thaw(self) -> None: ...

    def resized(self) -> None:
        """The volume grew (the map already says so)."""

    def ask_hits(self) -> threading.Event:
        """Ask the plane for the cache hits it served and has not told yet (``cache_hits``);
        the event is set once they are counted, or the plane is gone."""


class VolumeState:
    """What all handles of one open volume or snapshot share. Internal to the engine."""

    def __init__(
        self,
        pool: VolumePool,
        key: tuple[int, int | None],
        top: int,
        size: int,
        read_only: bool,
        serial: str,
    ) -> None:
        self.pool = pool
        self.key = key
        self.top = top
        self.size = size
        self.read_only = read_only
        self.serial = serial
        self.cluster_size = pool.cluster_size
        self.shift = pool.cluster_size.bit_length() - 1
        self.zeros = memoryview(bytes(pool.cluster_size))
        self.view: dict[int, Entry] = {}
        self.group_shift = pool.group.bit_length() - 1
        self.homes: dict[int, int] = {}
        """Virtual group -> placement anchor in the top layer: the physical cluster number its
        position 0 has (or would have) where the top already placed part of the group. A hint
        (``Allocator.allocate`` checks that the cluster it points at is free): stale entries
        after a discard or a merge cost contiguity, never correctness."""
        self.handles = 0
        self.closed = False
        self.lock = threading.Lock()  # guards ``pending``; held while zeroing or flattening
        self.pending: dict[int, threading.Event] = {}  # clusters being allocated
        self.gate = Gate()  # in-place writes run inside it (see ``frozen``)
        self.planes: list[DataPlane] = []  # other processes serving this state
        self.timeout = 0.0
        """The pool's data timeout (0: requests are not bounded); set by the pool."""
        self.cache_generation = 0
        """The generation of the pool's cache tier (0: none), whose line table planes use
        (``engine/cachelines.py``); -1: a cache the planes may not use (they send every
        read and write here). Set by the pool with the planes frozen."""
        self.reads_here = False
        """The pool's devices must see every read (an S3 pool's image still fetching
        objects): planes send their reads and writes here. Set by the pool."""

    # ------------------------------------------------------------- data planes, ownership

    def frozen(self) -> _Frozen:
        """A context in which no in-place write runs, here or in a data plane, so clusters
        can change owner (a snapshot) or be reused (freed clusters)."""
        return _Frozen(self)

    def attach(self, plane: DataPlane) -> None:
        """Start mirroring this state's view into ``plane.map``. Call with the pool lock."""
        plane.map.fill(self.map_entries())
        self.publish_io(plane)
        self.planes.append(plane)

    def publish_io(self, plane: DataPlane) -> None:
        """Tell ``plane`` how to serve reads and writes: bounded (the owner does them) and
        through which cache tier."""
        plane.map.set_bounded(bool(self.timeout) or self.cache_generation < 0 or self.reads_here)
        plane.map.set_cache(max(self.cache_generation, 0))

    def detach(self, plane: DataPlane) -> None:
        with self.pool.lock:
            if plane in self.planes:
                self.planes.remove(plane)

    def map_entries(self) -> Iterator[tuple[int, int | None, bool]]:
        """The view as ``(vc, phys or None, owned by the top)``. Call with the pool lock."""
        phys_at = self.pool.phys_at
        top = self.top
        for vc, (fd, offset, owner) in self.view.items():
            if fd < 0:
                yield vc, None, False
            else:
                yield vc, phys_at(fd, offset), owner == top

    def set_top(self, top: int) -> None:
        """The volume's top layer changed (a snapshot was taken); call with the pool lock,
        and with the state already ``frozen`` (so that the freeze here waits for nothing:
        the pool drains the I/O in flight before it takes its lock). Every cluster becomes
        a parent's: the next write to it copies."""
        with self.frozen():
            self.top = top
            for plane in self.planes:
                plane.map.share_all(self.map_entries())

    def rebuild(self, view: dict[int, Entry]) -> None:
        """Replace the view (after a flatten); call with the pool lock, and with the state
        already ``frozen`` as for ``set_top``."""
        with self.frozen():
            self.view = view
            for plane in self.planes:
                plane.map.fill(self.map_entries())

    def set_size(self, size: int) -> None:
        """An online extend; call with the pool lock."""
        self.size = size
        for plane in self.planes:
            plane.map.resize(size)
            plane.resized()

    def _publish(self, vc: int, entry: Entry | None, phys: int | None) -> None:
        """Record ``vc``'s new view entry (None: unmapped) in the view and in every plane's
        map. Call with the pool lock held."""
        if entry is None:
            self.view.pop(vc, None)
        else:
            self.view[vc] = entry
        for plane in self.planes:
            plane.map.set(vc, phys)

    # --------------------------------------------------------------- allocating writes

    def allocating_write(self, vc: int, within: int, data: memoryview) -> None:
        """Write ``data`` at ``within`` of virtual cluster ``vc``, which the top layer does not
        own (yet): copy-on-write from the parent's cluster, or zero-fill.

        Allocations of different clusters run in parallel; a second writer to a cluster
        being allocated waits for it and then writes in place.
        """
        while True:
            with self.lock:
                entry = self.view.get(vc)
                owned = entry is not None and entry[2] == self.top and entry[0] >= 0
                busy = None if owned else self.pending.get(vc)
                if not owned and busy is None:
                    done = self.pending[vc] = threading.Event()
            if owned:
                assert entry is not None
                self.gate.enter()
                try:
                    if entry[2] == self.top:
                        pwritev_full(entry[0], [data], entry[1] + within)  # allocated meanwhile
                        return
                finally:
                    self.gate.leave()
                continue  # a snapshot came between: copy after all
            if busy is None:
                break
            busy.wait()
        try:
            self._allocate_and_write(vc, within, data, entry)
        finally:
            with self.lock:
                del self.pending[vc]
            done.set()

    def _allocate_and_write(
        self, vc: int, within: int, data: memoryview, entry: Entry | None
    ) -> None:
        cs = self.cluster_size
        pool = self.pool
        with pool.lock:
            phys = self.place(vc)
        fd, base = pool.locate(phys)
        try:
            if len(data) == cs:
                pwritev_full(fd, [data], base)
            else:
                buf = bytearray(cs)
                if entry is not None and entry[0] >= 0:
                    preadv_full(entry[0], [memoryview(buf)], entry[1])
                buf[within : within + len(data)] = data
                pwritev_full(fd, [memoryview(buf)], base)
        except BaseException:
            pool.unallocate(phys)
            raise
        self._map_written(vc, [(phys, fd, base)])

    def allocating_write_run(self, vc: int, data: memoryview) -> int:
        """Write ``data``, whole clusters from virtual cluster ``vc`` on, where the top layer
        owns none of them: the clusters claimable from ``vc`` on (neither owned nor being
        allocated by another writer) are placed together and written with one ``pwritev``
        for each stretch that lies contiguous on a device. Returns the number of clusters
        written: 0 when ``vc`` itself is not claimable (the caller writes it with
        ``allocating_write``, which waits or writes in place)."""
        cs = self.cluster_size
        claimed: list[threading.Event] = []
        with self.lock:
            for i in range(len(data) // cs):
                entry = self.view.get(vc + i)
                if entry is not None and entry[2] == self.top and entry[0] >= 0:
                    break
                if vc + i in self.pending:
                    break
                claimed.append(threading.Event())
                self.pending[vc + i] = claimed[-1]
        if not claimed:
            return 0
        try:
            self._allocate_and_write_run(vc, data[: len(claimed) * cs], len(claimed))
        finally:
            with self.lock:
                for i in range(len(claimed)):
                    del self.pending[vc + i]
            for done in claimed:
                done.set()
        return len(claimed)

    def _allocate_and_write_run(self, vc: int, data: memoryview, count: int) -> None:
        cs = self.cluster_size
        pool = self.pool
        placed: list[int] = []
        full: NoSpace | None = None
        with pool.lock:
            for i in range(count):
                try:
                    placed.append(self.place(vc + i))
                except NoSpace as e:  # the clusters placed are still written, as one by one
                    full = e
                    break
        located = [(phys, *pool.locate(phys)) for phys in placed]
        count = len(located)
        try:
            start = 0
            while start < count:
                _, fd, base = located[start]
                end = start + 1
                while end < count and located[end][1:] == (fd, base + (end - start) * cs):
                    end += 1
                pwritev_full(fd, [data[start * cs : end * cs]], base)
                start = end
        except BaseException:
            for phys in placed:
                pool.unallocate(phys)
            raise
        self._map_written(vc, located)
        if full is not None:
            raise full

    def _map_written(self, vc: int, placed: list[tuple[int, int, int]]) -> None:
        """Map virtual clusters ``vc``, ``vc + 1``... of the top layer to the clusters
        ``placed`` for them (``(phys, fd, byte offset)``, as ``place`` and ``locate`` gave
        them), which hold their data now; a bounded request abandoned meanwhile maps none
        and gives them back."""
        pool = self.pool
        request = bounded.current() if self.timeout else None
        if request is None:
            self._map_placed(vc, placed)
            return
        with request.lock:  # the request cannot be abandoned while its mapping is published
            if request.abandoned:
                for phys, _, _ in placed:
                    pool.unallocate(phys)
                raise IOFailure("the write timed out: its clusters are not mapped", errno.ETIMEDOUT)
            self._map_placed(vc, placed)

    def _map_placed(self, vc: int, placed: list[tuple[int, int, int]]) -> None:
        pool = self.pool
        with pool.lock:
            for i, (phys, fd, base) in enumerate(placed):
                pool.set_entry(self.top, vc + i, phys)
                self._publish(vc + i, (fd, base, self.top), phys)

    def place(self, vc: int) -> int:
        """Allocate a physical cluster for ``vc`` of the top layer, next to the clusters the
        top has in the same virtual group when possible. Call with the pool lock held.
        Raises ``NoSpace``."""
        group = vc >> self.group_shift
        pos = vc - (group << self.group_shift)
        phys = self.pool.allocate(pos, self.homes.get(group))
        self.homes[group] = phys - pos
        return phys

    def quiesce(self) -> None:
        """Return with ``self.lock`` held and no allocation in flight (the caller releases
        the lock)."""
        self._quiesce()

    def _quiesce(self, first: int = 0, last: int | None = None) -> None:
        """Return with ``self.lock`` held and no allocation in flight in ``[first, last)``."""
        while True:
            self.lock.acquire()
            busy = [
                ev for vc, ev in self.pending.items() if vc >= first and (last is None or vc < last)
            ]
            if not busy:
                return
            self.lock.release()
            busy[0].wait()

    def zero_clusters(self, first: int, last: int, unmap: bool) -> None:
        """Make whole clusters ``[first, last)`` read as zeros, releasing owned clusters when
        ``unmap``; otherwise owned clusters are overwritten with zeros in place."""
        pool = self.pool
        self._quiesce(first, last)
        try:
            view = self.view
            if last - first <= 2 * len(view) + 64:
                vcs: list[int] = [vc for vc in range(first, last) if vc in view]
            else:
                vcs = sorted(vc for vc in view if first <= vc < last)
            in_place: list[Entry] = []
            with pool.lock:
                top = self.top
                explicit = pool.layer_has_parent(top)
                for vc in vcs:
                    entry = view[vc]
                    if entry[0] < 0:
                        continue  # already zero
                    if not unmap and entry[2] == top:
                        in_place.append(entry)
                        continue
                    pool.set_entry(top, vc, ZERO if explicit else None)
                    self._publish(vc, (-1, 0, top) if explicit else None, None)
            if in_place:
                self.gate.enter()
                try:
                    for fd, base, _ in in_place:
                        pwritev_full(fd, [self.zeros], base)
                finally:
                    self.gate.leave()
        finally:
            self.lock.release()

    def copy_up(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Copy every cluster the view takes from a parent layer into the top layer.

        ``progress(done, total)`` (bytes) is called before the first copy and after each; an
        exception it raises stops the copy, leaving the clusters copied so far owned by the
        top layer (a consistent, partly flattened volume)."""
        cs = self.cluster_size
        pool = self.pool
        buf = bytearray(cs)
        self._quiesce()
        try:
            todo = [
                (vc, entry)
                for vc, entry in sorted(self.view.items())
                if not (entry[2] == self.top or entry[0] < 0)
            ]
            total = len(todo) * cs
            if progress is not None:
                progress(0, total)
            for done, (vc, entry) in enumerate(todo, 1):
                if progress is not None and done > 1:
                    progress((done - 1) * cs, total)
                with pool.lock:
                    phys = self.place(vc)
                fd, base = pool.locate(phys)
                try:
                    preadv_full(entry[0], [memoryview(buf)], entry[1])
                    pwritev_full(fd, [memoryview(buf)], base)
                except BaseException:
                    pool.unallocate(phys)
                    raise
                with pool.lock:
                    pool.set_entry(self.top, vc, phys)
                    self._publish(vc, (fd, base, self.top), phys)
            if progress is not None:
                progress(total, total)
        finally:
            self.lock.release()


class _Frozen:
    def __init__(self, state: VolumeState) -> None:
        self._state = state
        self._frozen: list[DataPlane] = []

    def __enter__(self) -> None:
        state = self._state
        state.gate.freeze()
        try:
            for plane in state.planes:
                plane.freeze()
                self._frozen.append(plane)
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            for plane in self._frozen:
                plane.thaw()
        finally:
            self._frozen.clear()
            self._state.gate.thaw()


class Volume:
    """A ``BlockDevice`` handle on a thin volume or (read-only) snapshot.

    Obtain it from ``Pool.open_volume``. Thread-safe; several handles to one volume share
    their state (an online extend is visible in ``size`` at once). ``flush`` commits the
    whole pool (data, then metadata). After ``close`` every call raises
    ``IOFailure(EBADF)``; closing the pool closes every handle.
    """

    def __init__(self, state: VolumeState, name: str) -> None:
        self._state = state
        self.name = name
        """``POOL/VOL`` or ``POOL/VOL@SNAP``."""
        self._closed = False

    @property
    def size(self) -> int:
        return self._state.size

    @property
    def read_only(self) -> bool:
        return self._state.read_only

    @property
    def block_size(self) -> int:
        """512: any aligned or unaligned request works; ``cluster_size`` is the allocation
        granularity."""
        return 512

    @property
    def cluster_size(self) -> int:
        return self._state.cluster_size

    @property
    def serial(self) -> str:
        """The volume's stable serial (at most 20 characters, as virtio-blk's GET_ID wants)."""
        return self._state.serial

    def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the bytes at ``offset``. Raises ``IOFailure`` (EINVAL out of
        range, EBADF when closed, the errno of a failed ``preadv``)."""
        s = self._state
        n = len(buf)
        if self._closed or s.closed or offset < 0 or offset + n > s.size:
            self._refuse(offset, n, writing=False)
        if s.timeout:
            self._bounded_read(offset, buf)
            return
        cs = s.cluster_size
        within = offset & (cs - 1)
        gate = s.gate  # a freed cluster is not reused while a read that found it runs
        gate.enter()
        try:
            if within + n <= cs:  # one cluster: one lookup, one preadv
                entry = s.view.get(offset >> s.shift)
                if entry is None or entry[0] < 0:
                    buf[:] = s.zeros[:n]
                else:
                    preadv_full(entry[0], [buf], entry[1] + within)
                return
            self._read_span(offset, buf)
        except IOFailure as e:
            s.pool.backing_failed(BackingOp.READ, e)
            raise
        finally:
            gate.leave()

    def _bounded_read(self, offset: int, buf: memoryview) -> None:
        """``read_into`` within the data timeout, through a bounce buffer."""
        s = self._state
        bounce = memoryview(bytearray(len(buf)))

        def read() -> None:
            s.gate.enter()
            try:
                self._read_span(offset, bounce)
            except IOFailure as e:
                s.pool.backing_failed(BackingOp.READ, e)
                raise
            finally:
                s.gate.leave()

        s.pool.run_bounded(BackingOp.READ, read)
        buf[:] = bounce

    def _bounded_write(self, offset: int, data: memoryview) -> None:
        """``write`` (without FUA) within the data timeout, from a copy of ``data``."""
        s = self._state
        copy = memoryview(data.tobytes())

        def write() -> None:
            try:
                self._write_span(offset, copy)
            except NoSpace:
                raise
            except IOFailure as e:
                if e.errno != errno.ETIMEDOUT:  # not its own abandonment
                    s.pool.backing_failed(BackingOp.WRITE, e)
                raise

        s.pool.run_bounded(BackingOp.WRITE, write)

    def _read_span(self, offset: int, buf: memoryview) -> None:
        s = self._state
        view = s.view
        cs = s.cluster_size
        mask = cs - 1
        n = len(buf)
        pos = 0
        run_fd = -1
        run_off = run_start = run_len = 0
        while pos < n:
            off = offset + pos
            within = off & mask
            chunk = min(cs - within, n - pos)
            entry = view.get(off >> s.shift)
            if entry is None or entry[0] < 0:
                if run_len:
                    preadv_full(run_fd, [buf[run_start : run_start + run_len]], run_off)
                    run_len = 0
                buf[pos : pos + chunk] = s.zeros[:chunk]
            elif run_len and entry[0] == run_fd and entry[1] + within == run_off + run_len:
                run_len += chunk
            else:
                if run_len:
                    preadv_full(run_fd, [buf[run_start : run_start + run_len]], run_off)
                run_fd, run_off, run_start, run_len = entry[0], entry[1] + within, pos, chunk
            pos += chunk
        if run_len:
            preadv_full(run_fd, [buf[run_start : run_start + run_len]], run_off)

    def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        """Write ``data`` at ``offset``, allocating clusters as needed; with ``fua`` the pool
        is flushed before returning. Raises ``IOFailure`` (ENOSPC out of range, EPERM on a
        snapshot, ``NoSpace`` when the pool is full, EBADF when closed, the errno of a failed
        ``pwritev``: the range is then partly written, and no cluster allocated for it is
        mapped)."""
        s = self._state
        view_ = data if type(data) is memoryview else memoryview(data)
        if view_.ndim != 1 or view_.itemsize != 1:
            view_ = view_.cast("B")
        n = len(view_)
        if self._closed or s.closed or offset < 0 or offset + n > s.size or s.read_only:
            self._refuse(offset, n, writing=True)
        if s.timeout:
            self._bounded_write(offset, view_)
            if fua:
                s.pool.flush()
            return
        cs = s.cluster_size
        within = offset & (cs - 1)
        try:
            if within + n <= cs:  # one cluster: the common case
                gate = s.gate
                gate.enter()
                try:
                    entry = s.view.get(offset >> s.shift)
                    owned = entry is not None and entry[2] == s.top and entry[0] >= 0
                    if owned:
                        assert entry is not None
                        pwritev_full(entry[0], [view_], entry[1] + within)
                finally:
                    gate.leave()
                if not owned:
                    s.allocating_write(offset >> s.shift, within, view_)
            else:
                self._write_span(offset, view_)
        except NoSpace:
            raise
        except IOFailure as e:
            s.pool.backing_failed(BackingOp.WRITE, e)
            raise
        if fua:
            s.pool.flush()

    def _write_span(self, offset: int, view_: memoryview) -> None:
        s = self._state
        n = len(view_)
        view = s.view
        cs = s.cluster_size
        mask = cs - 1
        pos = 0
        run_fd = -1
        run_off = run_start = run_len = 0
        gate = s.gate
        gate.enter()  # left around allocating writes, which may wait for a freezer
        try:
            while pos < n:
                off = offset + pos
                within = off & mask
                chunk = min(cs - within, n - pos)
                entry = view.get(off >> s.shift)
                if entry is not None and entry[2] == s.top and entry[0] >= 0:
                    if run_len and entry[0] == run_fd and entry[1] + within == run_off + run_len:
                        run_len += chunk
                    else:
                        if run_len:
                            pwritev_full(run_fd, [view_[run_start : run_start + run_len]], run_off)
                        run_fd, run_off, run_start = entry[0], entry[1] + within, pos
                        run_len = chunk
                else:
                    if run_len:
                        pwritev_full(run_fd, [view_[run_start : run_start + run_len]], run_off)
                        run_len = 0
                    gate.leave()
                    try:
                        whole = (n - pos) & ~mask if chunk == cs else 0
                        if whole > cs:  # whole clusters: allocated together where they can be
                            done = s.allocating_write_run(off >> s.shift, view_[pos : pos + whole])
                            chunk = max(done, 1) * cs
                            if not done:
                                s.allocating_write(off >> s.shift, 0, view_[pos : pos + cs])
                        else:
                            s.allocating_write(off >> s.shift, within, view_[pos : pos + chunk])
                    finally:
                        gate.enter()
                pos += chunk
            if run_len:
                pwritev_full(run_fd, [view_[run_start : run_start + run_len]], run_off)
        finally:
            gate.leave()

    def flush(self) -> None:
        """Make every completed write durable: flushes the whole pool (data, then metadata)."""
        if self._closed or self._state.closed:
            self._refuse(0, 0, writing=False)
        self._state.pool.flush()

    # ------------------------------------------------- serving from another process

    def attach_plane(self, plane: DataPlane) -> None:
        """Mirror the volume's map into ``plane.map`` from now on, and freeze ``plane``
        whenever clusters change owner or are reused (see the module docstring)."""
        s = self._state
        with s.pool.lock:
            s.attach(plane)

    def detach_plane(self, plane: DataPlane) -> None:
        """Stop mirroring into ``plane``; a plane not attached is ignored."""
        self._state.detach(plane)

    def backing_fds(self) -> dict[int, int]:
        """Backing device index -> open fd, for a plane's direct I/O: the cluster at byte
        ``offset`` of device ``index`` (as ``SharedMap`` lookups give them) is read and
        written in place in that fd. The fds stay the pool's (do not close them)."""
        return self._state.pool.backing_fds()

    def backing_fd(self, index: int) -> int:
        """The fd of backing device ``index`` (one added since ``backing_fds``). Raises
        ``KeyError``."""
        return self._state.pool.backing_fd(index)

    def backing_marks(self, index: int) -> tuple[int, int] | None:
        """``(memfd, object size)`` in which a plane marks its writes in place to backing
        device ``index`` (``Backing.marks``), or None. Raises ``KeyError``."""
        return self._state.pool.backing_marks(index)

    def cache_fds(self, generation: int) -> tuple[int, int]:
        """``(line table memfd, cache device fd)`` of the pool's cache tier, for a plane
        whose map names ``generation`` (``SharedMap.set_cache``). The fds stay the pool's.
        Raises ``KeyError`` when the pool's cache is not (or no longer) that one."""
        return self._state.pool.cache_fds(generation)

    def cache_failed(self, error: IOFailure) -> None:
        """A plane's read or write of the cache device failed with ``error``: the cache
        latches its failure as for its own requests (``engine/cache.py``)."""
        self._state.pool.cache_failed(error)

    def cache_hits(self, count: int) -> None:
        """A plane served ``count`` reads and writes from the cache itself (counted in the
        cache's hits)."""
        self._state.pool.cache_hits(count)

    def backing_failed(self, op: BackingOp, error: IOFailure) -> None:
        """A plane's direct read or write of a backing device failed with ``error``:
        the pool counts it and degrades as for a failure of this handle's own requests."""
        self._state.pool.backing_failed(op, error)

    # ------------------------------------------------------------------------ zeroing

    def discard(self, offset: int, length: int) -> None:
        """Release the whole clusters of the range; the range reads as zeros afterwards."""
        self._zero(offset, length, unmap=True)

    def write_zeroes(
        self, offset: int, length: int, *, may_unmap: bool = True, fua: bool = False
    ) -> None:
        """Make the range read as zeros; ``may_unmap`` lets whole clusters be released
        (otherwise owned clusters keep their allocation and are zeroed in place)."""
        self._zero(offset, length, unmap=may_unmap)
        if fua:
            self._state.pool.flush()

    def _zero(self, offset: int, length: int, *, unmap: bool) -> None:
        s = self._state
        if self._closed or s.closed or offset < 0 or offset + length > s.size or s.read_only:
            self._refuse(offset, length, writing=True)
        if length == 0:
            return
        cs = s.cluster_size
        end = offset + length
        first = -(-offset // cs)
        last = end // cs
        if first >= last:  # no whole cluster inside
            self._zero_partial(offset, end)
        else:
            if offset < first * cs:
                self._zero_partial(offset, first * cs)
            s.zero_clusters(first, last, unmap)
            if end > last * cs:
                self._zero_partial(last * cs, end)

    def _zero_partial(self, start: int, end: int) -> None:
        s = self._state
        cs = s.cluster_size
        pos = start
        while pos < end:
            stop = min(end, (pos // cs + 1) * cs)
            entry = s.view.get(pos >> s.shift)
            if entry is not None and entry[0] >= 0:
                self.write(pos, s.zeros[: stop - pos])
            pos = stop

    def block_status(self, offset: int, length: int) -> list[Extent]:
        """Extents from the map: a mapped cluster is allocated data; an unmapped one or an
        explicit zero is a hole that reads as zeros."""
        s = self._state
        if self._closed or s.closed or offset < 0 or offset + length > s.size:
            self._refuse(offset, length, writing=False)
        cs = s.cluster_size
        end = offset + length
        first, last = offset // cs, -(-end // cs)
        view = s.view
        if last - first <= 2 * len(view) + 64:
            data = [vc for vc in range(first, last) if (e := view.get(vc)) and e[0] >= 0]
        else:
            items = list(view.items())  # one C-level copy: writers may add entries meanwhile
            data = sorted(vc for vc, e in items if first <= vc < last and e[0] >= 0)
        extents: list[Extent] = []
        pos = offset

        def emit(stop: int, allocated: bool) -> None:
            nonlocal pos
            stop = min(stop, end)
            if stop <= pos:
                return
            if extents and extents[-1].allocated == allocated:
                last_ = extents.pop()
                extents.append(Extent(last_.offset, stop - last_.offset, allocated, not allocated))
            else:
                extents.append(Extent(pos, stop - pos, allocated, not allocated))
            pos = stop

        for vc in data:
            emit(vc * cs, False)
            emit((vc + 1) * cs, True)
        emit(end, False)
        if not extents:
            extents.append(Extent(offset, 0, False, True))
        return extents

    def close(self) -> None:
        """Release the handle (without flushing); idempotent."""
        if not self._closed:
            self._closed = True
            self._state.pool.drop_state(self._state)

    def _refuse(self, offset: int, length: int, *, writing: bool) -> None:
        if self._closed or self._state.closed:
            raise IOFailure(f"{self.name}: handle is closed", errno.EBADF)
        if offset < 0 or length < 0:
            raise IOFailure(f"negative offset or length ({offset}, {length})", errno.EINVAL)
        if offset + length > self._state.size:
            raise IOFailure(
                f"{self.name}: request [{offset}, {offset + length}) beyond end of device "
                f"({self._state.size})",
                errno.ENOSPC if writing else errno.EINVAL,
            )
        raise IOFailure(f"{self.name} is read-only", errno.EPERM)

    def __repr__(self) -> str:
        return f"<Volume {self.name}>"
