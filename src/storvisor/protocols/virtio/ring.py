"""The split virtqueue (VIRTIO 1.x section 2.7), device side.

Theory of operation
-------------------
The driver publishes descriptor chains by writing their heads into ``avail.ring`` and then
advancing ``avail.idx``; the device pops them in order (``last_avail``), reads and writes the
guest buffers, then writes ``{head, len}`` into ``used.ring`` and advances ``used.idx``.
Indices are free-running u16 counters.

Memory ordering (x86-64 only): every shared index is read or written with one aligned 2-byte
access through ``memoryview.cast("H")`` (never assembled byte by byte), so "read idx, then
entries" and "write entry, then idx" keep their order without fences. The two store-then-load
sequences of EVENT_IDX (publish ``used.idx`` then read ``used_event``; publish ``avail_event``
then re-read ``avail.idx``) call the injected ``fence`` between the two accesses.

A chain that breaks a rule (head or next out of range, a loop, a nested or misaligned
indirect table, a readable descriptor after a writable one, a buffer outside guest memory)
raises :class:`RingError`; the queue is then ``broken`` and pops nothing more. The device
never crashes and never touches memory outside the regions it was given.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from storvisor.errors import QueueBroken
from storvisor.protocols.virtio.memory import GuestMemory

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1

VIRTQ_DESC = struct.Struct("<QIHH")
"""``le64 addr, le32 len, le16 flags, le16 next``."""
VIRTQ_USED_ELEM = struct.Struct("<II")
"""``le32 id, le32 len``."""

MAX_QUEUE_SIZE = 32768
MAX_INDIRECT = 1024
"""Entries an indirect table may hold beyond the queue size (Linux and QEMU use 1024)."""


class RingError(QueueBroken):
    """The driver broke a split-ring rule; the queue is unusable until it is reset (the
    connection and the other queues carry on)."""


def desc_table_size(num: int) -> int:
    return 16 * num


def avail_ring_size(num: int) -> int:
    return 6 + 2 * num


def used_ring_size(num: int) -> int:
    return 6 + 8 * num


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """VIRTIO's ``vring_need_event``: did ``used.idx`` move past ``used_event``?"""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


class InflightTracker(Protocol):
    """Records what is in flight so a restarted back-end can resubmit it (vhost-user's
    INFLIGHT_SHMFD). Called by :class:`SplitQueue` around pops and pushes."""

    def begin(self, head: int) -> None:
        """``head`` was popped and is now in flight."""

    def before_push(self, head: int) -> None:
        """``head`` is about to be published in the used ring."""

    def after_push(self, head: int, used_idx: int) -> None:
        """``head`` was published; ``used.idx`` is now ``used_idx``."""


@dataclass(slots=True)
class Chain:
    """A popped descriptor chain: device-readable buffers, then device-writable ones."""

    head: int
    readable: list[memoryview] = field(default_factory=list)
    writable: list[memoryview] = field(default_factory=list)
    written: list[tuple[int, int]] = field(default_factory=list)
    """``(gpa, length)`` of the writable descriptors, filled only when the queue's
    ``record_writes`` is set (dirty logging)."""


class SplitQueue:
    """Device side of one split virtqueue of ``num`` entries.

    ``desc``, ``avail`` and ``used`` are views of exactly the ring structures (see the
    ``*_size`` helpers); ``memory`` translates the buffers' guest-physical addresses.
    ``last_avail`` is the next avail index to pop (``SET_VRING_BASE``); ``used_idx`` is read
    from the used ring (the ring may already hold completions from before a reconnect).
    Not thread-safe: callers serialise every call on one queue.
    """

    def __init__(
        self,
        memory: GuestMemory,
        num: int,
        desc: memoryview,
        avail: memoryview,
        used: memoryview,
        *,
        last_avail: int = 0,
        event_idx: bool = False,
        fence: Callable[[], None] = lambda: None,
        inflight: InflightTracker | None = None,
    ) -> None:
        if num <= 0 or num > MAX_QUEUE_SIZE or num & (num - 1):
            raise RingError(f"queue size {num} is not a power of two <= 32768")
        if (
            len(desc) != desc_table_size(num)
            or len(avail) != avail_ring_size(num)
            or len(used) != used_ring_size(num)
        ):
            raise RingError("ring views do not match the queue size")
        self.memory = memory
        self.num = num
        self._desc = desc
        # Aligned 16-bit views: one instruction per index access (see module docstring).
        if not (_aligned(avail, 2) and _aligned(used, 4)):
            raise RingError("avail ring must be 2-byte and used ring 4-byte aligned")
        self._avail16 = avail.cast("B").cast("H")
        self._used16 = used.cast("B").cast("H")
        self._used32 = used[: 4 + 8 * num].cast("B").cast("I")
        self._event_idx = event_idx
        self._fence = fence
        self.inflight = inflight
        self.last_avail = last_avail & 0xFFFF
        self.used_idx = self._used16[1]
        self._signalled_used = self.used_idx
        self._ready = 0  # chains known available beyond last_avail (from the last idx read)
        # VRING_USED_F_NO_NOTIFY is set (maybe by a back-end before a reconnect): the next
        # enable_notification clears it
        self._no_notify = bool(self._used16[0] & VRING_USED_F_NO_NOTIFY)
        self.broken = False
        self.record_writes = False
        """Fill ``Chain.written`` (set while live migration logs dirty pages)."""

    # -- reading the driver's side ---------------------------------------------------------

    def avail_idx(self) -> int:
        return int(self._avail16[1])

    def pending(self) -> int:
        """How many chains the driver has made available and we have not popped.

        Raises ``RingError`` if the driver claims more than ``num`` (A7 rule 1).
        """
        if self.broken:
            return 0
        n = (int(self._avail16[1]) - self.last_avail) & 0xFFFF
        if n > self.num:
            self._break(f"avail.idx moved {n} entries ahead of a ring of {self.num}")
        self._ready = n
        return n

    def pop(self) -> Chain | None:
        """Pop the next available chain, or ``None`` if the ring is empty (or broken).

        ``avail.idx`` is read again only once the chains seen at the previous read are
        popped. Raises ``RingError`` (and marks the queue broken) for a bad chain.
        """
        if not self._ready and (self.broken or not self.pending()):
            return None
        self._ready -= 1
        last = self.last_avail
        head = int(self._avail16[2 + (last % self.num)])
        self.last_avail = (last + 1) & 0xFFFF
        chain = self.walk(head)
        if self.inflight is not None:
            self.inflight.begin(head)
        return chain

    def walk(self, head: int) -> Chain:
        """Read the chain starting at descriptor ``head`` (also used to resubmit in-flight
        requests after a reconnect). Raises ``RingError`` and marks the queue broken."""
        try:
            return self._walk(head)
        except QueueBroken as e:
            self._break(str(e))
            raise AssertionError("unreachable") from None

    def _walk(self, head: int) -> Chain:
        num = self.num
        if head >= num:
            raise RingError(f"head {head} outside a ring of {num}")
        chain = Chain(head)
        table: memoryview | bytes = self._desc
        limit = num
        budget = num
        index = head
        indirect = False
        unpack = VIRTQ_DESC.unpack_from
        memory = self.memory
        regions = memory.regions
        record = self.record_writes
        writing = False
        while True:
            budget -= 1
            if budget < 0:
                raise RingError(f"descriptor chain from head {head} loops or is too long")
            addr, length, flags, nxt = unpack(table, 16 * index)
            if flags & VRING_DESC_F_INDIRECT:
                if indirect:
                    raise RingError("nested indirect descriptor table")
                if flags & VRING_DESC_F_NEXT:
                    raise RingError("indirect descriptor with NEXT set")
                if length == 0 or length % 16:
                    raise RingError(f"indirect table of {length} bytes")
                entries = length // 16
                if entries > max(num, MAX_INDIRECT):
                    raise RingError(f"indirect table of {entries} entries is too large")
                table = memory.read_gpa(addr, length)
                limit = entries
                budget = entries
                index = 0
                indirect = True
                continue
            if flags & VRING_DESC_F_WRITE:
                writing = True
                target = chain.writable
                if record:
                    chain.written.append((addr, length))
            elif writing:
                raise RingError("device-readable descriptor after a writable one")
            else:
                target = chain.readable
            if length:
                for region in regions:  # fast path: inside one region (few regions)
                    offset = addr - region.gpa
                    if offset >= 0 and offset + length <= region.size:
                        target.append(region.view[offset : offset + length])
                        break
                else:  # crosses regions, or is outside memory (raises)
                    memory.gpa_views(addr, length, target)
            if not flags & VRING_DESC_F_NEXT:
                return chain
            if nxt >= limit:
                raise RingError(f"next {nxt} outside a table of {limit}")
            index = nxt

    def _break(self, reason: str) -> None:
        self.broken = True
        self._ready = 0
        raise RingError(reason)

    # -- completing ------------------------------------------------------------------------

    def push(self, head: int, length: int) -> None:
        """Publish ``{head, length}`` in the used ring (entry first, then ``used.idx``)."""
        used32 = self._used32
        slot = 1 + 2 * (self.used_idx % self.num)
        inflight = self.inflight
        if inflight is not None:
            inflight.before_push(head)
        used32[slot] = head
        used32[slot + 1] = length
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self._used16[1] = self.used_idx
        if inflight is not None:
            inflight.after_push(head, self.used_idx)

    def should_notify(self) -> bool:
        """Whether the driver wants an interrupt for what was pushed since the last call
        that returned True. Spurious notifications are legal; missed ones hang the guest."""
        new, old = self.used_idx, self._signalled_used
        if new == old:
            return False
        if self._event_idx:
            self._fence()
            used_event = int(self._avail16[2 + self.num])
            notify = vring_need_event(used_event, new, old)
        else:
            notify = not self._avail16[0] & VRING_AVAIL_F_NO_INTERRUPT
        self._signalled_used = new
        return notify

    def enable_notification(self) -> bool:
        """Ask the driver to kick for the next chain; returns True if chains arrived
        meanwhile (then keep processing instead of sleeping)."""
        if self._no_notify:
            self._used16[0] = 0
            self._no_notify = False
            if not self._event_idx:
                self._fence()
        if self.broken:
            return False
        if self._event_idx:
            self._used16[2 + 4 * self.num] = self.last_avail
            self._fence()
        return self.avail_idx() != self.last_avail

    def disable_notification(self) -> None:
        """Tell the driver that kicks are not needed: the device comes back to the ring by
        itself, and calls :meth:`enable_notification` (then re-checks) before it stops.

        Without EVENT_IDX this sets ``VRING_USED_F_NO_NOTIFY``; with EVENT_IDX
        ``avail_event`` is simply left behind, so the driver kicks at most once more.
        Either way the driver may still kick (section 2.7.10); that is harmless.
        """
        if not self._event_idx and not self._no_notify:
            self._used16[0] = VRING_USED_F_NO_NOTIFY
            self._no_notify = True


def _aligned(view: memoryview, alignment: int) -> bool:
    """Whether the view's first byte is aligned (checked through the buffer's address)."""
    if view.readonly:
        return True  # only possible for copies in tests; alignment is moot there
    address = ctypes.addressof(ctypes.c_char.from_buffer(view))
    return address % alignment == 0
