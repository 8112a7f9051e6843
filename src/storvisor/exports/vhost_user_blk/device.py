"""The I/O side of one front-end connection: the ``BackendDevice`` the vhost-user state
machine drives (guest memory mappings, eventfds, inflight buffer, dirty log, queue workers)."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import mmap
import os
import socket
import stat
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from storvisor.errors import LocalFailure, ProtocolError, QueueBroken
from storvisor.exports.vectors import vectors_of
from storvisor.exports.vhost_user_blk.queues import _full_fence, _QueueWorker, _signal_eventfd
from storvisor.protocols.vhost_user import inflight as infl
from storvisor.protocols.vhost_user import messages as m
from storvisor.protocols.vhost_user.backend import MAX_MEM_SLOTS, QueueSetup
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

if TYPE_CHECKING:
    from storvisor.exports.vhost_user_blk.server import VhostUserBlkServer

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


@dataclass(slots=True)
class _Mapping:
    region: MemoryRegion
    mm: mmap.mmap


class _Device:
    """The I/O side of one front-end connection (implements ``BackendDevice``)."""

    def __init__(self, server: VhostUserBlkServer) -> None:
        self.server = server
        self.block = server.device
        self.serial = server.serial.encode()[: blk.VIRTIO_BLK_ID_BYTES]
        self.read_only = server.read_only
        self.vectored = vectors_of(self.block)
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
        if logging == self.logging:
            return
        log.info("vhost-user-blk dirty logging %s", "on" if logging else "off")
        # Flipped under every ring lock: a completion either is published before the flip
        # or sees it, so none published after the front-end's acknowledgement goes unlogged.
        locks = [worker.ring_lock for worker in self._workers.values()]
        for lock in locks:
            lock.acquire()
        try:
            self.logging = logging
        finally:
            for lock in locks:
                lock.release()

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
