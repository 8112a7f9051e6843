"""vhost-user-blk export: serves a ``BlockDevice`` to QEMU (or any vhost-user front-end).

Theory of operation
-------------------
:class:`VhostUserBlkServer` listens on a Unix socket and serves one front-end at a time
(others wait in the listen backlog). One control thread reads vhost-user messages, feeds them
to the sans-I/O :class:`~storvisor.protocols.vhost_user.backend.VhostUserBackend` and sends its
replies; it implements that state machine's ``BackendDevice`` interface here: guest memory is
``mmap``-ed from the fds the front-end passes, eventfds are kept per queue, the inflight buffer
is a memfd.

Each running queue has its own worker thread. On a kick it drains the whole avail ring:
pops a chain, runs it with :func:`storvisor.protocols.virtio.blk.execute` (the guest's buffers
are ``memoryview`` s of the mapping, passed straight to ``read_into``/``write``, so data is
never copied in Python), pushes the used entry; then it signals the call eventfd once for the
batch if the driver wants it, and re-arms notifications. Requests of at least
``OFFLOAD_BYTES`` run on a small thread pool shared by the server's queues instead, so large
copies proceed on several cores at once (the data calls release the GIL). The pool thread
that ran a request also completes it: it pushes the used entry and signals the call eventfd
itself, under a per-queue lock that serialises every write to the used ring, so no thread
hand-off lies between the copy and the guest's interrupt; completions may be out of order.
Small requests stay on the queue thread: handing them over costs more than they do.

Parking: once a queue has as many requests on the pool as the pool has threads, the queue
thread stops popping and *parks* the ring: it tells the driver that kicks are not needed
(``VRING_USED_F_NO_NOTIFY``, or ``avail_event`` left behind with EVENT_IDX) and goes back to
sleep. Each pool thread that completes a request of a parked ring pops the next chain (small or
large) and queues it on the pool itself; the one that finds the ring empty re-enables kicks,
re-checks the ring and hands popping back to the queue thread. Under a deep queue of large
requests the queue thread then sleeps and no kick or thread wake-up is spent per request; the
price is that a small request arriving meanwhile waits for a pool thread. ``_ring_lock`` also
serialises pops and the notification state while a pool thread may pop.

Failure model: a malformed message or a hostile memory table drops the connection (the queues
are stopped and memory unmapped; a reconnecting front-end starts afresh). A bad descriptor
chain marks that queue broken (it stops processing, the error eventfd is signalled) while the
connection stays up, as a virtio device in NEEDS_RESET would. Device I/O errors fail one
request with status IOERR. Nothing a front-end sends stops the server or touches other exports.

Reconnect: with INFLIGHT_SHMFD the front-end keeps the inflight buffer across back-end
restarts; a queue started over a used buffer resubmits the requests found in flight.

Live migration: LOG_SHMFD and ``VHOST_F_LOG_ALL`` are offered. While the front-end has
``VHOST_F_LOG_ALL`` set, every completed request marks the guest pages it may have written
(its writable buffers, and the used-ring entry and index when the queue asked for it) in the
shared bitmap, under one lock shared by the queue threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import itertools
import json
import logging
import mmap
import os
import platform
import queue
import select
import socket
import stat
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

from storvisor.engine.device import BlockDevice, FileDevice
from storvisor.errors import (
    IOFailure,
    LocalFailure,
    ProtocolError,
    QueueBroken,
    StateError,
    StorvisorError,
)
from storvisor.exports.dataplane import RemoteVolume
from storvisor.protocols.vhost_user import inflight as infl
from storvisor.protocols.vhost_user import messages as m
from storvisor.protocols.vhost_user.backend import MAX_MEM_SLOTS, QueueSetup, VhostUserBackend
from storvisor.protocols.vhost_user.dirty_log import DirtyLog
from storvisor.protocols.vhost_user.messages import MemoryRegion, ProtocolFeature
from storvisor.protocols.virtio import blk
from storvisor.protocols.virtio.blk import bit
from storvisor.protocols.virtio.memory import GuestMemory, GuestRegion
from storvisor.protocols.virtio.ring import (
    Chain,
    SplitQueue,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)

log = logging.getLogger(__name__)

VIRTIO_FEATURES = (
    bit(blk.VIRTIO_F_VERSION_1)
    | bit(m.VHOST_USER_F_PROTOCOL_FEATURES)
    | bit(blk.VIRTIO_RING_F_INDIRECT_DESC)
    | bit(blk.VIRTIO_RING_F_EVENT_IDX)
    | bit(blk.VIRTIO_BLK_F_FLUSH)
    | bit(blk.VIRTIO_BLK_F_BLK_SIZE)
    | bit(blk.VIRTIO_BLK_F_SEG_MAX)
    | bit(blk.VIRTIO_BLK_F_MQ)
    | bit(blk.VIRTIO_BLK_F_DISCARD)
    | bit(blk.VIRTIO_BLK_F_WRITE_ZEROES)
    | bit(blk.VIRTIO_BLK_F_CONFIG_WCE)
    | bit(m.VHOST_F_LOG_ALL)
)
"""Virtio feature bits offered (plus ``VIRTIO_BLK_F_RO`` for a read-only export)."""

PROTOCOL_FEATURES = (
    bit(ProtocolFeature.MQ)
    | bit(ProtocolFeature.REPLY_ACK)
    | bit(ProtocolFeature.BACKEND_REQ)
    | bit(ProtocolFeature.CONFIG)
    | bit(ProtocolFeature.INFLIGHT_SHMFD)
    | bit(ProtocolFeature.CONFIGURE_MEM_SLOTS)
    | bit(ProtocolFeature.LOG_SHMFD)
)
"""vhost-user protocol features offered."""

MAX_QUEUES = 64


_FENCE_LOCK = threading.Lock()


def _full_fence() -> None:
    """A full memory barrier: an uncontended lock uses a locked instruction on x86-64."""
    with _FENCE_LOCK:
        pass


@dataclass(slots=True)
class _Mapping:
    region: MemoryRegion
    mm: mmap.mmap


OFFLOAD_BYTES = 128 << 10
"""Requests carrying at least this much data run on the server's I/O pool, so several large
copies proceed on several cores while the queue thread keeps popping."""


_IOV_MAX = 1024
"""Buffers per ``preadv``/``pwritev`` call (Linux's ``UIO_MAXIOV``)."""


class _FileVectors:
    """``blk.VectoredIO`` over a raw file: one ``preadv``/``pwritev`` for all the buffers of
    a request (a guest's 1 MiB request usually comes in many)."""

    def __init__(self, device: FileDevice) -> None:
        self._device = device

    def read_into(self, offset: int, views: list[memoryview]) -> None:
        fd = self._device.fd
        while views:
            try:
                n = os.preadv(fd, views if len(views) <= _IOV_MAX else views[:_IOV_MAX], offset)
            except OSError as e:
                raise IOFailure(f"preadv failed: {e.strerror}", e.errno or errno.EIO) from e
            if n == 0:  # past the end of a file that shrank: the rest reads as zeros
                for view in views:
                    view[:] = bytes(len(view))
                return
            if len(views) == 1 and n == len(views[0]):
                return
            offset += n
            views = _advance(views, n)

    def write(self, offset: int, views: list[memoryview], *, fua: bool) -> None:
        fd = self._device.fd
        while views:
            try:
                n = os.pwritev(fd, views if len(views) <= _IOV_MAX else views[:_IOV_MAX], offset)
            except OSError as e:
                raise IOFailure(f"pwritev failed: {e.strerror}", e.errno or errno.EIO) from e
            if n == 0:
                raise IOFailure("pwritev wrote nothing", errno.EIO)
            if len(views) == 1 and n == len(views[0]):
                break
            offset += n
            views = _advance(views, n)
        if fua:
            self._device.flush()


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """What is left of ``views`` once ``n`` bytes of them are done."""
    i = 0
    while i < len(views) and n >= len(views[i]):
        n -= len(views[i])
        i += 1
    rest = views[i:]
    if n and rest:
        rest[0] = rest[0][n:]
    return rest


class _IOPool:
    """Threads running large requests for every queue of one server.

    A pool thread runs the request and completes it itself (:meth:`_QueueWorker.finish`):
    no hand-off back to the queue thread stands between the data copy and the call eventfd.
    """

    def __init__(self, threads: int) -> None:
        self.size = threads
        self._jobs: queue.SimpleQueue[tuple[_QueueWorker, Chain] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._run, name=f"vhost-blk-io{i}", daemon=True)
            for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, worker: _QueueWorker, chain: Chain) -> None:
        self._jobs.put((worker, chain))

    def shutdown(self) -> None:
        """Stop the threads once the requests already submitted are done."""
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()

    def _run(self) -> None:
        get = self._jobs.get
        while True:
            job = get()
            if job is None:
                return
            job[0].finish(job[1])
            job = None  # no guest-memory view kept while idle


class _QueueWorker:
    """One thread serving one virtqueue until :meth:`stop`.

    Small requests run inline on this thread. Large ones go to the I/O pool, whose thread
    runs them and publishes them in the used ring; ``_ring_lock`` serialises every write to
    the used ring (and the notification decision) between this thread and the pool, and
    every pop while the ring may be parked (see the module docstring).
    ``stop`` returns only once every request it popped has been completed.
    """

    def __init__(self, owner: _Device, setup: QueueSetup, queue: SplitQueue) -> None:
        self.owner = owner
        self.index = setup.index
        self.queue: SplitQueue | None = queue
        self.resubmit: list[int] = []
        self._stop = False
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._ring_lock = threading.Lock()
        self._pool = owner.server.io_pool()
        self._offloaded = 0  # under _ring_lock
        self._parked = False  # under _ring_lock: the pool pops this ring, kicks are off
        self._draining = False  # under _ring_lock: wake this thread when _offloaded drops
        self._failed = False
        self._thread = threading.Thread(
            target=self._run, name=f"vhost-blk-q{setup.index}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        os.eventfd_write(self._wake, 1)

    def stop(self) -> int:
        """Stop after the batch in progress and its offloaded requests; return the next
        avail index."""
        self._stop = True
        self.wake()
        self._thread.join()
        os.close(self._wake)
        assert self.queue is not None
        last_avail = self.queue.last_avail
        self.queue = None  # drop the ring views before memory is unmapped
        return last_avail

    def _run(self) -> None:
        owner = self.owner
        poller = select.poll()
        poller.register(self._wake, select.POLLIN)
        kick = owner.kick_fds[self.index]
        if kick is not None:
            poller.register(kick, select.POLLIN)
        try:
            try:
                self._resubmit()
                self._drain()
                owner.signal(self.index)  # once after (re)start, whatever happened before
                while not self._stop:
                    events = poller.poll(None if kick is not None else 1)
                    if self._stop:
                        break
                    for fd, _ in events:
                        _eventfd_clear(fd)
                    current = owner.kick_fds[self.index]
                    if current != kick:
                        if kick is not None:
                            poller.unregister(kick)
                        kick = current
                        if kick is not None:
                            poller.register(kick, select.POLLIN)
                    self._drain()
            finally:
                self._finish_offloaded()
                self._unpark()
        except QueueBroken as e:
            log.error("vhost-user-blk queue %d is broken: %s", self.index, e)
            owner.queue_broken(self.index)
        except Exception:  # a bug must not take the server down: fail the queue only
            log.exception("vhost-user-blk queue %d failed", self.index)
            owner.queue_broken(self.index)

    def _unpark(self) -> None:
        """Leave the driver kicking, whoever serves the ring next."""
        queue = self.queue
        assert queue is not None
        with self._ring_lock:
            self._parked = False
            queue.enable_notification()

    def _execute(self, chain: Chain) -> int:
        owner = self.owner
        return blk.execute(
            owner.block,
            chain,
            serial=owner.serial,
            writethrough=owner.writethrough,
            read_only=owner.read_only,
            vectored=owner.vectored,
        )

    def _complete(self, chain: Chain, used_len: int) -> None:
        """Publish ``chain`` (the caller holds ``_ring_lock`` when the pool may run)."""
        queue = self.queue
        assert queue is not None
        if self.owner.logging:
            # marked before the entry is published: a front-end that sees the completion
            # finds the pages in the log
            self.owner.log_completion(self.index, chain, queue.used_idx % queue.num)
            queue.push(chain.head, used_len)
        else:
            queue.push(chain.head, used_len)

    def _resubmit(self) -> None:
        queue = self.queue
        assert queue is not None
        queue.record_writes = self.owner.logging
        for head in self.resubmit:
            chain = queue.walk(head)
            self._complete(chain, self._execute(chain))
        self.resubmit = []

    def finish(self, chain: Chain) -> None:
        """Run an offloaded request and publish it; runs on a pool thread.

        While the ring is parked, also pop the next chain and hand it to the pool.
        """
        try:
            used_len: int | None = self._execute(chain)
        except Exception:
            log.exception("vhost-user-blk queue %d: offloaded request failed", self.index)
            used_len = None
        notify = False
        following: Chain | None = None
        with self._ring_lock:
            self._offloaded -= 1
            if used_len is None:
                self._failed = True
            else:
                self._complete(chain, used_len)
                queue = self.queue
                assert queue is not None
                notify = queue.should_notify()
                if self._parked and not (self._stop or self._draining or self._failed):
                    try:
                        following = self._pop_parked(queue)
                    except QueueBroken as e:
                        log.error("vhost-user-blk queue %d: %s", self.index, e)
                        self._failed = True
            wake = self._draining or self._failed
        if notify:
            self.owner.signal(self.index)
        if following is not None:
            assert self._pool is not None
            self._pool.submit(self, following)
        if wake:
            os.eventfd_write(self._wake, 1)  # open: this thread waits for the pool

    def _pop_parked(self, queue: SplitQueue) -> Chain | None:
        """Pop the next chain of a parked ring (under ``_ring_lock``); unpark it when empty.

        Counts the chain as offloaded. Raises ``RingError`` for a bad chain.
        """
        queue.record_writes = self.owner.logging
        chain = queue.pop()
        if chain is None and queue.enable_notification():  # arrived meanwhile
            queue.disable_notification()
            chain = queue.pop()
        if chain is None:
            self._parked = False  # kicks are on again; the queue thread takes over
        else:
            self._offloaded += 1
        return chain

    def _finish_offloaded(self) -> None:
        """Wait until the pool has completed every offloaded request (also after an error)."""
        poller = select.poll()
        poller.register(self._wake, select.POLLIN)
        while True:
            with self._ring_lock:
                self._draining = True
                if not self._offloaded:
                    return
            poller.poll(1000)
            _eventfd_clear(self._wake)

    def _drain(self) -> None:
        queue = self.queue
        assert queue is not None
        owner = self.owner
        execute = blk.execute
        device = owner.block
        serial = owner.serial
        read_only = owner.read_only
        vectored = owner.vectored
        pool = self._pool
        cap = pool.size if pool is not None else 0
        lock = self._ring_lock
        while True:
            if self._failed:
                raise QueueBroken("a request failed unexpectedly")
            served = 0
            writethrough = owner.writethrough
            logging = queue.record_writes = owner.logging
            parked = False
            while not self._stop:  # a stop request ends the batch (GET_VRING_BASE waits)
                # Only this thread parks the ring, and pool threads pop it only while it is
                # parked: seen unparked here, the ring is this thread's alone (no lock).
                if self._parked:
                    parked = True
                    break
                chain = queue.pop()
                if chain is None:
                    break
                size = 0
                for view in chain.writable:
                    size += len(view)
                for view in chain.readable:
                    size += len(view)
                if size >= OFFLOAD_BYTES and pool is not None:
                    with lock:
                        self._offloaded += 1
                        if self._offloaded >= cap:
                            # every pool thread has work of this ring: they pop the
                            # next chains themselves as they finish, so kicks (and
                            # waking this thread) are not needed until the ring is empty
                            self._parked = parked = True
                            queue.disable_notification()
                    pool.submit(self, chain)
                    if parked:
                        break
                    continue
                used_len = execute(
                    device,
                    chain,
                    serial=serial,
                    writethrough=writethrough,
                    read_only=read_only,
                    vectored=vectored,
                )
                with lock:
                    if logging:
                        self._complete(chain, used_len)
                    else:
                        queue.push(chain.head, used_len)
                served += 1
            chain = None  # no guest-memory view outlives the batch
            if served:
                with lock:
                    notify = queue.should_notify()
                if notify:
                    owner.signal(self.index)
            if self._stop or parked or not queue.enable_notification():
                return


def _load_eventfd_write() -> Callable[[int, int], int] | None:
    try:
        func = ctypes.PyDLL(None, use_errno=True).eventfd_write
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_uint64]
    func.restype = ctypes.c_int
    return cast("Callable[[int, int], int]", func)


_EVENTFD_WRITE_KEEPING_GIL = _load_eventfd_write()


def _signal_eventfd(fd: int) -> None:
    """Add 1 to an eventfd without releasing the GIL (raises ``OSError``).

    The write takes a microsecond, while giving the GIL up and taking it back costs a
    wake-up of a competing thread each time, so the completing thread keeps it (libc's
    ``eventfd_write`` called through ``ctypes.PyDLL``; ``os.eventfd_write`` where that is
    missing). Call eventfds are non-blocking (QEMU's are); a blocking one would only block
    when its counter is about to overflow.
    """
    write = _EVENTFD_WRITE_KEEPING_GIL
    if write is None:
        os.eventfd_write(fd, 1)
    elif write(fd, 1) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _eventfd_clear(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass
    except OSError as e:
        if e.errno != errno.EAGAIN:
            raise


class _Device:
    """The I/O side of one front-end connection (implements ``BackendDevice``)."""

    def __init__(self, server: VhostUserBlkServer) -> None:
        self.server = server
        self.block = server.device
        self.serial = server.serial.encode()[: blk.VIRTIO_BLK_ID_BYTES]
        self.read_only = server.read_only
        self.vectored: blk.VectoredIO | None = None
        if type(self.block) is FileDevice:  # a subclass may override read_into and write
            self.vectored = _FileVectors(self.block)
        elif isinstance(self.block, RemoteVolume):
            self.vectored = self.block.vectors
        self.writethrough = False
        n = server.num_queues
        self.kick_fds: list[int | None] = [None] * n
        self._call_fds: list[int | None] = [None] * n
        self._err_fds: list[int | None] = [None] * n
        self._call_lock = threading.Lock()
        self._mappings: list[_Mapping] = []
        self.memory = GuestMemory([])
        self._workers: dict[int, _QueueWorker] = {}
        self._inflight: mmap.mmap | None = None
        self._inflight_shape = (0, 0)
        self.backend_channel: socket.socket | None = None
        self._channel_lock = threading.Lock()
        self.broken: set[int] = set()
        self._retired_kicks: list[int | None] = []
        self._unstarted: dict[int, int] = {}
        self.logging = False
        self._log_lock = threading.Lock()
        self._dirty_log: DirtyLog | None = None
        self._log_mm: mmap.mmap | None = None
        self._log_fd = -1  # kept when other processes mark the same log (POSIX lock on it)
        self._vring_log: list[int | None] = [None] * n
        self._slot, self._slots = server.slot, server.slots
        self.remote_bases: dict[int, int] = {}  # queues of other processes: their stop bases
        self.stopped: dict[int, int] = {}  # queues this process stopped (base), for the control

    def owns(self, index: int) -> bool:
        """Whether this process runs queue ``index`` (queue ``i`` runs in slot ``i % slots``)."""
        return index % self._slots == self._slot

    # -- BackendDevice -----------------------------------------------------------------------

    @property
    def features(self) -> int:
        return VIRTIO_FEATURES | (bit(blk.VIRTIO_BLK_F_RO) if self.read_only else 0)

    @property
    def protocol_features(self) -> int:
        return PROTOCOL_FEATURES

    @property
    def num_queues(self) -> int:
        return self.server.num_queues

    def config(self) -> blk.BlkConfig:
        # the guest's logical block size; Linux refuses one above the page size
        block_size = min(max(512, self.block.block_size), 4096)
        return blk.BlkConfig(
            capacity=self.block.size >> blk.SECTOR_SHIFT,
            blk_size=block_size,
            wce=0 if self.writethrough else 1,
            num_queues=self.server.num_queues,
            discard_sector_alignment=block_size >> blk.SECTOR_SHIFT,
        )

    def get_config(self) -> bytes:
        return self.config().pack()

    def set_config(self, offset: int, data: bytes) -> None:
        if offset <= blk.WCE_OFFSET < offset + len(data):
            self.writethrough = data[blk.WCE_OFFSET - offset] == 0

    def set_memory(self, regions: list[tuple[MemoryRegion, int]]) -> None:
        new: list[_Mapping] = []
        try:
            for region, fd in regions:
                new.append(_map_region(region, fd))  # closes fd whatever happens
            self._install(new)
        except BaseException:
            for mapping in new:
                _close_mmap(mapping.mm)
            for _, fd in regions[len(new) + 1 :]:  # never handed to _map_region
                os.close(fd)
            raise

    def add_memory(self, region: MemoryRegion, fd: int) -> None:
        if len(self._mappings) >= MAX_MEM_SLOTS:
            os.close(fd)
            raise ProtocolError("ADD_MEM_REG: no free memory slot")
        mapping = _map_region(region, fd)
        try:
            self._install([*self._mappings, mapping], close_old=False)
        except BaseException:
            _close_mmap(mapping.mm)
            raise

    def remove_memory(self, region: MemoryRegion) -> None:
        keep = [
            mp
            for mp in self._mappings
            if (mp.region.guest_phys_addr, mp.region.memory_size, mp.region.userspace_addr)
            != (region.guest_phys_addr, region.memory_size, region.userspace_addr)
        ]
        if len(keep) == len(self._mappings):
            raise ProtocolError("REM_MEM_REG: no such region")
        gone = [mp for mp in self._mappings if mp not in keep]
        self._install(keep, close_old=False)
        for mp in gone:
            _close_mmap(mp.mm)

    def _install(self, mappings: list[_Mapping], *, close_old: bool = True) -> None:
        regions = []
        for mp in mappings:
            r = mp.region
            start = r.mmap_offset
            regions.append(
                GuestRegion(
                    gpa=r.guest_phys_addr,
                    size=r.memory_size,
                    uva=r.userspace_addr,
                    view=memoryview(mp.mm)[start : start + r.memory_size],
                )
            )
        _check_overlaps(regions)
        old = self._mappings
        self.memory = GuestMemory(regions)
        self._mappings = mappings
        if close_old:
            for mp in old:
                _close_mmap(mp.mm)

    def set_features(self, features: int) -> None:
        logging = bool(features & bit(m.VHOST_F_LOG_ALL))
        if logging != self.logging:
            log.info("vhost-user-blk dirty logging %s", "on" if logging else "off")
        self.logging = logging

    def set_vring_log(self, index: int, log_guest_addr: int | None) -> None:
        self._vring_log[index] = log_guest_addr

    def set_log_base(self, fd: int, mmap_size: int, mmap_offset: int) -> None:
        try:
            _check_fd_size(fd, mmap_offset + mmap_size, "dirty log")
            try:
                mm = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, offset=mmap_offset)
            except (OSError, ValueError, OverflowError) as e:
                raise ProtocolError(f"cannot map the dirty log: {e}") from e
            keep = os.dup(fd) if self._slots > 1 else -1
        finally:
            os.close(fd)
        with self._log_lock:
            old_log, old_mm, old_fd = self._dirty_log, self._log_mm, self._log_fd
            self._dirty_log, self._log_mm = DirtyLog(memoryview(mm)), mm
            self._log_fd = keep
        if old_fd >= 0:
            os.close(old_fd)
        if old_log is not None:
            old_log.release()
        if old_mm is not None:
            _close_mmap(old_mm)

    def log_completion(self, index: int, chain: Chain, slot: int) -> None:
        """Mark what completing ``chain`` in used-ring ``slot`` wrote to guest memory."""
        with self._log_lock:
            dirty = self._dirty_log
            if dirty is None:
                return
            if self._log_fd >= 0:  # other processes mark bits in the same bytes
                fcntl.lockf(self._log_fd, fcntl.LOCK_EX)
            try:
                for gpa, length in chain.written:
                    dirty.mark(gpa, length)
                used = self._vring_log[index]
                if used is not None:
                    dirty.mark(used + 4 + 8 * slot, 8)
                    dirty.mark(used + 2, 2)
            finally:
                if self._log_fd >= 0:
                    fcntl.lockf(self._log_fd, fcntl.LOCK_UN)

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        old = self.kick_fds[index]
        self.kick_fds[index] = fd
        worker = self._workers.get(index)
        if worker is not None:
            worker.wake()
            # the worker re-registers on wake-up; keep the old fd open until it has
            # (retired fds are closed when the queue stops)
            self._retired_kicks.append(old)
        elif old is not None:
            os.close(old)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        with self._call_lock:
            old = self._call_fds[index]
            self._call_fds[index] = fd
        if old is not None:
            os.close(old)
        self.signal(index)  # a pending interrupt may have been lost while masked

    def set_vring_err(self, index: int, fd: int | None) -> None:
        old = self._err_fds[index]
        self._err_fds[index] = fd
        if old is not None:
            os.close(old)

    def start_queue(self, setup: QueueSetup) -> None:
        if not self.owns(setup.index):
            return  # another process of this export runs it
        memory = self.memory
        try:
            queue = SplitQueue(
                memory,
                setup.num,
                memory.uva_view(setup.desc_addr, desc_table_size(setup.num)),
                memory.uva_view(setup.avail_addr, avail_ring_size(setup.num)),
                memory.uva_view(setup.used_addr, used_ring_size(setup.num)),
                last_avail=setup.last_avail,
                event_idx=setup.event_idx,
                fence=_full_fence,
            )
        except QueueBroken as e:
            log.error("vhost-user-blk queue %d cannot start: %s", setup.index, e)
            self.queue_broken(setup.index)
            self._unstarted[setup.index] = setup.last_avail
            return
        resubmit: list[int] = []
        if self._inflight is not None:
            num_queues, queue_size = self._inflight_shape
            if setup.index < num_queues and queue_size == setup.num:
                part = infl.queue_region_size(queue_size)
                view = memoryview(self._inflight)[setup.index * part : (setup.index + 1) * part]
                tracker = infl.InflightQueue(view, queue_size, queue.used_idx)
                if tracker.last_avail is not None:
                    queue.last_avail = tracker.last_avail
                    resubmit = tracker.resubmit
                    if resubmit:
                        log.info(
                            "vhost-user-blk queue %d: resubmitting %d in-flight requests",
                            setup.index,
                            len(resubmit),
                        )
                queue.inflight = tracker
            else:
                log.warning("inflight buffer does not fit queue %d; not tracked", setup.index)
        worker = _QueueWorker(self, setup, queue)
        worker.resubmit = resubmit
        self._workers[setup.index] = worker
        self.broken.discard(setup.index)
        worker.start()

    def stop_queue(self, index: int) -> int:
        if not self.owns(index):
            return self.remote_bases.pop(index, 0)
        worker = self._workers.pop(index, None)
        if worker is None:
            last_avail = self._unstarted.pop(index, 0)
        else:
            last_avail = worker.stop()
            self._drop_retired_kicks()
        self.stopped[index] = last_avail
        return last_avail

    def get_inflight(self, num_queues: int, queue_size: int) -> tuple[int, int]:
        size = infl.region_size(num_queues, queue_size)
        fd = os.memfd_create("storvisor-inflight", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
        except OSError as e:
            os.close(fd)
            raise LocalFailure(f"cannot size the inflight buffer: {e.strerror}") from e
        return fd, size

    def set_inflight(
        self, fd: int, mmap_size: int, mmap_offset: int, num_queues: int, queue_size: int
    ) -> None:
        try:
            if mmap_size < infl.region_size(num_queues, queue_size):
                raise ProtocolError(f"inflight buffer of {mmap_size} bytes is too small")
            _check_fd_size(fd, mmap_offset + mmap_size, "inflight buffer")
            try:
                mm = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, offset=mmap_offset)
            except (OSError, ValueError, OverflowError) as e:
                raise ProtocolError(f"cannot map the inflight buffer: {e}") from e
        finally:
            os.close(fd)
        if self._inflight is not None:
            _close_mmap(self._inflight)
        self._inflight = mm
        self._inflight_shape = (num_queues, queue_size)

    def set_backend_channel(self, fd: int) -> None:
        try:
            channel = socket.socket(fileno=fd)
        except OSError as e:
            os.close(fd)
            raise ProtocolError(f"backend request fd is not a socket: {e}") from e
        with self._channel_lock:
            old, self.backend_channel = self.backend_channel, channel
        if old is not None:
            old.close()

    def reset(self) -> None:
        for index in list(self._workers):
            self.stop_queue(index)
        self._drop_retired_kicks()
        for fds in (self.kick_fds, self._call_fds, self._err_fds):
            for i, fd in enumerate(fds):
                if fd is not None:
                    os.close(fd)
                fds[i] = None
        self.memory = GuestMemory([])
        for mp in self._mappings:
            _close_mmap(mp.mm)
        self._mappings = []
        if self._inflight is not None:
            _close_mmap(self._inflight)
            self._inflight = None
        with self._channel_lock:
            channel, self.backend_channel = self.backend_channel, None
        if channel is not None:
            channel.close()
        with self._log_lock:
            dirty, log_mm, log_fd = self._dirty_log, self._log_mm, self._log_fd
            self._dirty_log = self._log_mm = None
            self._log_fd = -1
        if log_fd >= 0:
            os.close(log_fd)
        if dirty is not None:
            dirty.release()
        if log_mm is not None:
            _close_mmap(log_mm)
        self.logging = False

    # -- used by workers and the server ----------------------------------------------------

    def signal(self, index: int) -> None:
        with self._call_lock:
            fd = self._call_fds[index]
            if fd is not None:
                try:
                    _signal_eventfd(fd)
                except OSError as e:
                    log.warning("cannot signal queue %d: %s", index, e)

    def queue_broken(self, index: int) -> None:
        self.broken.add(index)
        fd = self._err_fds[index]
        if fd is not None:
            with contextlib.suppress(OSError):
                os.eventfd_write(fd, 1)

    def send_config_change(self) -> bool:
        with self._channel_lock:
            channel = self.backend_channel
            if channel is None:
                return False
            try:
                channel.sendall(m.encode(m.BackendRequest.CONFIG_CHANGE_MSG))
            except OSError as e:
                log.warning("cannot send a config change to the front-end: %s", e)
                return False
        return True

    def _drop_retired_kicks(self) -> None:
        for fd in self._retired_kicks:
            if fd is not None:
                os.close(fd)
        self._retired_kicks.clear()


def _check_fd_size(fd: int, needed: int, what: str) -> None:
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise ProtocolError(f"{what}: bad fd: {e.strerror}") from e
    if stat.S_ISREG(st.st_mode) and st.st_size < needed:
        raise ProtocolError(f"{what}: {needed} bytes asked of a {st.st_size}-byte file")


def _map_region(region: MemoryRegion, fd: int) -> _Mapping:
    """Map ``[0, mmap_offset + size)`` of ``fd`` (the fd is closed in any case)."""
    try:
        length = region.mmap_offset + region.memory_size
        _check_fd_size(fd, length, "memory region")
        try:
            mm = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError, OverflowError) as e:
            raise ProtocolError(f"cannot map a memory region: {e}") from e
    finally:
        os.close(fd)
    return _Mapping(region, mm)


def _close_mmap(mm: mmap.mmap) -> None:
    try:
        mm.close()
    except BufferError:
        # a view is still alive somewhere; the mapping goes when the last one does
        log.debug("guest memory mapping still referenced; left to the garbage collector")


def _check_overlaps(regions: list[GuestRegion]) -> None:
    ordered = sorted(regions, key=lambda r: r.gpa)
    for a, b in itertools.pairwise(ordered):
        if a.gpa + a.size > b.gpa:
            raise ProtocolError("guest memory regions overlap")


class VhostUserBlkServer:
    """Serve ``device`` as a vhost-user-blk device on the Unix socket ``socket_path``.

    ``num_queues`` virtqueues (1..64) are offered; ``read_only`` offers VIRTIO_BLK_F_RO and
    fails writes; ``serial`` is what GET_ID returns (at most 20 bytes are used).
    Queue processes: with ``peers`` (links to ``VhostUserBlkServer.serve_peer`` in other
    processes serving the same device), queue ``i`` runs in process ``i % (len(peers) + 1)``
    and this one in slot 0: every vhost-user message is first handed to every peer (which
    runs the same state machine, so its memory map, rings and fds match) and applied there,
    then here; a peer's queue stop reports its next avail index back. Several queues of one
    export thus run on several cores.

    The device is used, never closed, by the server. With ``listener`` (a bound, listening
    Unix socket, e.g. inherited from the process that owns the path) the server accepts on
    it instead of binding ``socket_path``, and leaves the path alone on ``close``.
    """

    def __init__(
        self,
        device: BlockDevice,
        socket_path: str,
        *,
        num_queues: int = 1,
        read_only: bool = False,
        serial: str = "",
        listener: socket.socket | None = None,
        peers: Sequence[socket.socket] = (),
        slot: int = 0,
        slots: int = 1,
    ) -> None:
        if not 1 <= num_queues <= MAX_QUEUES:
            raise ValueError(f"num_queues must be 1..{MAX_QUEUES}, not {num_queues}")
        if peers:
            slots = len(peers) + 1
        if not 0 <= slot < slots:
            raise ValueError(f"slot {slot} of {slots}")
        self.peers = list(peers)
        self.slot, self.slots = slot, slots
        self.device = device
        self.socket_path = socket_path
        self.num_queues = num_queues
        self.read_only = read_only or device.read_only
        self.serial = serial
        self._listener: socket.socket | None = None
        self._given_listener = listener
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._lock = threading.Lock()
        self._conn: socket.socket | None = None
        self._device: _Device | None = None
        self.connections = 0
        """Front-end connections served so far (for tests and metrics)."""
        self._pool: _IOPool | None = None
        self._pool_lock = threading.Lock()

    def start(self) -> None:
        """Bind the socket (replacing a stale one) and serve in a background thread.

        Raises ``OSError`` if the socket cannot be bound, ``StateError`` if already started or
        closed.
        """
        if self._listener is not None or self._wake_r < 0:
            raise StateError(f"vhost-user-blk server on {self.socket_path} already started")
        if platform.machine() not in ("x86_64", "AMD64", "i686", "i386"):
            # the rings rely on x86's ordering of plain loads and stores (see ring.py)
            log.warning(
                "vhost-user-blk rings are only safe on x86 hosts, not %s", platform.machine()
            )
        self._listener = self._given_listener or listen_unix(self.socket_path)
        self._thread = threading.Thread(
            target=self._serve, name=f"vhost-blk {self.socket_path}", daemon=True
        )
        self._thread.start()

    def notify_config_change(self) -> None:
        """Tell the connected front-end that the config (capacity) changed.

        Needs the BACKEND_REQ channel; without a front-end or a channel this does nothing
        (the next GET_CONFIG reports the new capacity anyway).
        """
        with self._lock:
            device = self._device
        if device is not None:
            device.send_config_change()

    def close(self) -> None:
        """Stop serving: disconnect the front-end, stop the queues, remove the socket.

        The block device is left open. Idempotent.
        """
        self._stop.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        with self._lock:
            conn = self._conn
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            if self._given_listener is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.socket_path)
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown()

    def io_pool(self) -> _IOPool | None:
        """The shared pool large requests run on (``None`` on a one-CPU machine)."""
        with self._pool_lock:
            if self._pool is None and (os.cpu_count() or 1) > 1:
                self._pool = _IOPool(os.cpu_count() or 1)
            return self._pool

    @property
    def connected(self) -> bool:
        """Whether a front-end is connected right now."""
        with self._lock:
            return self._device is not None

    @property
    def broken_queues(self) -> frozenset[int]:
        """Queues of the current front-end stopped by a bad descriptor chain."""
        with self._lock:
            device = self._device
        return frozenset(device.broken) if device is not None else frozenset()

    # -- serving ---------------------------------------------------------------------------

    def _serve(self) -> None:
        assert self._listener is not None
        poller = select.poll()
        poller.register(self._listener, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._stop.is_set():
            poller.poll()
            if self._stop.is_set():
                return
            try:
                conn, _ = self._listener.accept()
            except OSError:
                continue
            self._handle_connection(conn)

    def _handle_connection(self, conn: socket.socket) -> None:
        device = _Device(self)
        backend = VhostUserBackend(device)
        with self._lock:
            self._conn, self._device = conn, device
        self.connections += 1
        try:
            while not self._stop.is_set():
                msg = _receive(conn)
                if msg is None:
                    break
                try:
                    if self.peers:
                        device.remote_bases.update(_forward(self.peers, msg))
                    reply = backend.handle(msg)
                finally:
                    for fd in msg.fds:
                        os.close(fd)
                if reply is not None:
                    try:
                        if reply.fds:
                            socket.send_fds(conn, [reply.data], list(reply.fds))
                        else:
                            conn.sendall(reply.data)
                    finally:
                        for fd in reply.fds:
                            os.close(fd)
        except ProtocolError as e:
            log.warning("vhost-user front-end dropped: %s", e)
        except OSError as e:
            if not self._stop.is_set():
                log.warning("vhost-user connection failed: %s", e)
        except StorvisorError as e:
            log.error("vhost-user connection failed: %s", e)
        finally:
            with self._lock:
                self._conn, self._device = None, None
            try:
                device.reset()
                if self.peers:
                    try:
                        _forward(self.peers, m.Message(_PEER_RESET, m.VHOST_USER_VERSION, b""))
                    except (OSError, StorvisorError) as e:
                        log.error("vhost-user-blk queue processes did not reset: %s", e)
            finally:
                conn.close()

    def serve_peer(self, link: socket.socket) -> None:
        """Run as a queue process (slot ``slot`` of ``slots``) of the server at the other end
        of ``link``: apply every message it forwards, run this slot's queues, until the link
        closes. Raises nothing for a broken link (it just returns)."""
        device = _Device(self)
        backend = VhostUserBackend(device)
        with self._lock:
            self._device = device
        try:
            while True:
                try:
                    msg = _receive(link)
                except (OSError, ProtocolError):
                    return
                if msg is None:
                    return
                ok = True
                device.stopped.clear()
                try:
                    if msg.request == _PEER_RESET:
                        device.reset()
                        device = _Device(self)
                        backend = VhostUserBackend(device)
                        with self._lock:
                            self._device = device
                    else:
                        reply = backend.handle(msg)
                        if reply is not None:
                            for fd in reply.fds:
                                os.close(fd)
                except (ProtocolError, StorvisorError) as e:
                    log.warning("vhost-user-blk queue process: %s", e)
                    ok = False
                finally:
                    for fd in msg.fds:
                        os.close(fd)
                answer = json.dumps({"ok": ok, "stopped": device.stopped}).encode()
                try:
                    link.sendall(_ANSWER.pack(len(answer)) + answer)
                except OSError:
                    return
        finally:
            with self._lock:
                self._device = None
            device.reset()


_PEER_RESET = 0
"""A request number no vhost-user message uses: the control's "connection ended"."""

_ANSWER = struct.Struct("<I")


def _forward(peers: list[socket.socket], msg: m.Message) -> dict[int, int]:
    """Hand ``msg`` (with its fds) to every queue process and wait until each applied it;
    returns the next avail index of every queue they stopped. Raises ``LocalFailure`` if a
    link broke, ``ProtocolError`` if one refused the message (the connection must then end)."""
    data = m.encode(msg.request, msg.payload, flags=msg.flags)
    for peer in peers:
        try:
            if msg.fds:
                socket.send_fds(peer, [data], msg.fds)
            else:
                peer.sendall(data)
        except OSError as e:
            raise LocalFailure(f"queue process unreachable: {e.strerror}") from e
    bases: dict[int, int] = {}
    for peer in peers:
        try:
            size = _ANSWER.unpack(_recv_all(peer, _ANSWER.size))[0]
            answer = json.loads(_recv_all(peer, size))
        except (OSError, ValueError, struct.error) as e:
            raise LocalFailure(f"queue process did not answer: {e}") from e
        if not answer.get("ok"):
            raise ProtocolError(f"a queue process refused {msg.name}")
        bases.update({int(k): int(v) for k, v in answer.get("stopped", {}).items()})
    return bases


def _recv_all(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            raise OSError(errno.EPIPE, "link closed")
        data += more
    return bytes(data)


def listen_unix(path: str) -> socket.socket:
    """A listening Unix socket bound at ``path`` (a stale socket file there is replaced).
    Raises ``OSError`` if it cannot be bound."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind(path)
        listener.listen(4)
    except OSError:
        listener.close()
        raise
    return listener


def _receive(conn: socket.socket) -> m.Message | None:
    """Read one message with its fds; ``None`` on a clean EOF between messages."""
    data, fds, flags, _ = socket.recv_fds(conn, m.HEADER.size, m.MAX_FDS)
    try:
        if flags & socket.MSG_CTRUNC:
            raise ProtocolError("too many file descriptors with one message")
        if not data:
            if fds:
                raise ProtocolError("file descriptors without a message")
            return None
        header = bytearray(data)
        while len(header) < m.HEADER.size:
            more = conn.recv(m.HEADER.size - len(header))
            if not more:
                raise ProtocolError("connection closed inside a header")
            header += more
        request, msg_flags, size = m.decode_header(header)
        payload = bytearray()
        while len(payload) < size:
            more = conn.recv(size - len(payload), socket.MSG_WAITALL)
            if not more:
                raise ProtocolError("connection closed inside a payload")
            payload += more
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return m.Message(request, msg_flags, bytes(payload), list(fds))
