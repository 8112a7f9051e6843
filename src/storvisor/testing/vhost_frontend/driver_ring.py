"""The driver's side of a split virtqueue in guest memory: it writes descriptors and the
avail ring, kicks (honouring ``VRING_USED_F_NO_NOTIFY`` or ``avail_event``), and collects
completions from the used ring (publishing ``used_event`` with EVENT_IDX)."""

from __future__ import annotations

import contextlib
import os
import select
import struct
import threading
import time

from storvisor.errors import ProtocolError
from storvisor.protocols.virtio.ring import (
    VIRTQ_DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
    vring_need_event,
)
from storvisor.testing.vhost_frontend.guest_memory import GuestRam, align_up

_FENCE = threading.Lock()

Segment = tuple[int, int]
"""``(guest-physical address, length)`` of one buffer."""


class DriverQueue:
    """One virtqueue of ``size`` entries whose rings live in ``memory`` at these addresses,
    with its kick and call eventfds (``kick_fd``, ``call_fd``; closed by ``close``).

    ``event_idx`` says whether VIRTIO_RING_F_EVENT_IDX was negotiated (the front-end keeps
    it current). Waits are bounded by ``timeout`` and raise ``TimeoutError``.
    """

    def __init__(
        self,
        memory: GuestRam,
        index: int,
        size: int,
        desc_gpa: int,
        avail_gpa: int,
        used_gpa: int,
        *,
        timeout: float,
    ) -> None:
        self.memory = memory
        self.index = index
        self.size = size
        self.desc_gpa = desc_gpa
        self.avail_gpa = avail_gpa
        self.used_gpa = used_gpa
        self.timeout = timeout
        self.event_idx = False
        self.kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.avail_idx = 0
        self.last_used = 0
        self.free = list(range(size))
        self.chains: dict[int, list[int]] = {}
        self.completions: dict[int, int] = {}
        self.kicks = 0
        self.notified_idx = 0

    def close(self) -> None:
        os.close(self.kick_fd)
        os.close(self.call_fd)

    @property
    def in_flight(self) -> int:
        return len(self.chains)

    def used_idx(self) -> int:
        """``used.idx`` as the device left it."""
        return self.memory.u16(self.used_gpa + 2)

    def write_desc(self, index: int, addr: int, length: int, flags: int, nxt: int) -> None:
        """Write descriptor ``index`` of the table directly (for bad-chain tests)."""
        self.memory.write(self.desc_gpa + 16 * index, VIRTQ_DESC.pack(addr, length, flags, nxt))

    def publish(self, head: int, *, kick: bool = True) -> None:
        """Put ``head`` in the avail ring and advance ``avail.idx`` (then maybe kick)."""
        memory = self.memory
        memory.set_u16(self.avail_gpa + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        memory.set_u16(self.avail_gpa + 2, self.avail_idx)
        if kick:
            self._notify()

    def _notify(self) -> None:
        # "old" is avail.idx at the previous notification decision (a whole batch)
        old, self.notified_idx = self.notified_idx, self.avail_idx
        with _FENCE:  # full barrier between the avail.idx store and the avail_event load
            pass
        if self.event_idx:
            avail_event = self.memory.u16(self.used_gpa + 4 + 8 * self.size)
            if not vring_need_event(avail_event, self.avail_idx, old):
                return
        elif self.memory.u16(self.used_gpa) & VRING_USED_F_NO_NOTIFY:
            return
        os.eventfd_write(self.kick_fd, 1)
        self.kicks += 1

    def kick(self) -> None:
        """Kick unconditionally."""
        os.eventfd_write(self.kick_fd, 1)
        self.kicks += 1

    def submit(
        self,
        readable: list[Segment],
        writable: list[Segment],
        *,
        indirect: bool = False,
        kick: bool = True,
    ) -> int:
        """Build a chain (or an indirect table) over these buffers and publish it.

        Returns the head descriptor id, the key of :meth:`wait`.
        """
        segments = [(a, n, 0) for a, n in readable] + [
            (a, n, VRING_DESC_F_WRITE) for a, n in writable
        ]
        if indirect:
            table = self.memory.alloc(16 * len(segments), 16)
            raw = b"".join(
                VIRTQ_DESC.pack(
                    a, n, f | (VRING_DESC_F_NEXT if i + 1 < len(segments) else 0), i + 1
                )
                for i, (a, n, f) in enumerate(segments)
            )
            self.memory.write(table, raw)
            segments = [(table, len(raw), VRING_DESC_F_INDIRECT)]
        if len(self.free) < len(segments):
            raise RuntimeError("no free descriptors; wait for completions first")
        ids = [self.free.pop() for _ in segments]
        for i, (a, n, f) in enumerate(segments):
            last = i + 1 == len(segments)
            nxt = 0 if last else ids[i + 1]
            self.write_desc(ids[i], a, n, f | (0 if last else VRING_DESC_F_NEXT), nxt)
        self.chains[ids[0]] = ids
        self.publish(ids[0], kick=kick)
        return ids[0]

    def poll_used(self) -> int:
        """Collect completions from the used ring; returns how many were new."""
        used = self.used_idx()
        count = 0
        while self.last_used != used:
            slot = self.used_gpa + 4 + 8 * (self.last_used % self.size)
            head, length = struct.unpack("<II", self.memory.read(slot, 8))
            ids = self.chains.pop(head, None)
            if ids is None:
                raise ProtocolError(f"used ring returned id {head}, which is not in flight")
            self.free.extend(ids)
            self.completions[head] = length
            self.last_used = (self.last_used + 1) & 0xFFFF
            count += 1
        if self.event_idx:
            self.memory.set_u16(self.avail_gpa + 4 + 2 * self.size, self.last_used)  # used_event
        return count

    def wait(self, head: int) -> int:
        """Wait until ``head`` completes; return its ``used.len``."""
        deadline = time.monotonic() + self.timeout
        while head not in self.completions:
            self.poll_used()
            if head in self.completions:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"request {head} on queue {self.index} did not complete")
            poller = select.poll()
            poller.register(self.call_fd, select.POLLIN)
            if poller.poll(min(remaining, 0.05) * 1000):
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self.call_fd)
        return self.completions.pop(head)


def layout_queues(
    memory: GuestRam, num_queues: int, size: int, *, timeout: float
) -> list[DriverQueue]:
    """Rings for ``num_queues`` queues of ``size`` entries at the start of the first region;
    request buffers are carved from what follows."""
    region = memory.regions[0]
    cursor = region.spec.gpa
    queues = []
    for index in range(num_queues):
        desc = align_up(cursor, 4096)
        avail = align_up(desc + desc_table_size(size), 4096)
        used = align_up(avail + avail_ring_size(size), 4096)
        cursor = used + used_ring_size(size)
        queues.append(DriverQueue(memory, index, size, desc, avail, used, timeout=timeout))
    start = align_up(cursor, 4096)
    if not region.contains(start, 4096):
        for q in queues:
            q.close()
        raise ValueError("first region too small for the rings")
    memory.reserve(start)
    return queues
