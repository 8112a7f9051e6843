"""The INFLIGHT_SHMFD region: what a restarted back-end needs to resubmit lost requests.

The back-end creates a zeroed shared buffer on GET_INFLIGHT_FD; the front-end keeps it and
hands it back with SET_INFLIGHT_FD after every (re)connect. Per queue (split rings)::

    u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
    desc[queue_size] = { u8 inflight; u8 padding[5]; u16 next; u64 counter; }

Each queue's part is rounded up to 64 bytes. Protocol per request: on pop set ``counter``
(a per-queue increasing number) then ``inflight = 1``; on completion set ``last_batch_head``,
publish the used entry and ``used.idx``, clear ``inflight``, then copy ``used.idx`` into
``used_idx``. After a restart (``version`` already 1), if ``used_idx`` differs from the
ring's ``used.idx`` the back-end died between publishing ``last_batch_head`` and clearing its
flag: that flag is cleared. Every descriptor still flagged is then resubmitted, oldest
counter first, and the queue's next avail index is ``used.idx`` + that count.
"""

from __future__ import annotations

import struct

QUEUE_HEADER = struct.Struct("<QHHHH")
"""``features, version, desc_num, last_batch_head, used_idx``: 16 bytes."""
DESC_STATE_SPLIT = struct.Struct("<B5xHQ")
"""``inflight, padding[5], next, counter``: 16 bytes."""
INFLIGHT_ALIGNMENT = 64
INFLIGHT_VERSION = 1


def queue_region_size(queue_size: int) -> int:
    """Bytes of one queue's part of the region."""
    raw = QUEUE_HEADER.size + DESC_STATE_SPLIT.size * queue_size
    return -(-raw // INFLIGHT_ALIGNMENT) * INFLIGHT_ALIGNMENT


def region_size(num_queues: int, queue_size: int) -> int:
    return num_queues * queue_region_size(queue_size)


class InflightQueue:
    """The inflight record of one split queue, over a writable view of its part.

    Implements ``storvisor.protocols.virtio.ring.InflightTracker``. ``resubmit`` lists the
    heads found in flight when the record was opened (oldest first); ``last_avail`` is then
    where popping must resume, or ``None`` for a fresh record.
    """

    def __init__(self, view: memoryview, queue_size: int, ring_used_idx: int) -> None:
        if len(view) < QUEUE_HEADER.size + DESC_STATE_SPLIT.size * queue_size:
            raise ValueError("inflight view too small for the queue")
        self._view = view
        self._num = queue_size
        # u16 fields of the header: version @8 -> [4], desc_num [5], last_batch_head [6],
        # used_idx [7]; each access is one aligned 2-byte load/store.
        self._u16 = view[:16].cast("H")
        self._counter = 0
        self.resubmit: list[int] = []
        self.last_avail: int | None = None
        if self._u16[4] != INFLIGHT_VERSION:
            view[: QUEUE_HEADER.size + DESC_STATE_SPLIT.size * queue_size] = bytes(
                QUEUE_HEADER.size + DESC_STATE_SPLIT.size * queue_size
            )
            self._u16[5] = queue_size
            self._u16[7] = ring_used_idx
            self._u16[4] = INFLIGHT_VERSION
            return
        if self._u16[7] != ring_used_idx:
            # died after publishing last_batch_head in the used ring, before clearing it
            self._view[self._desc_offset(self._u16[6] % queue_size)] = 0
            self._u16[7] = ring_used_idx
        found: list[tuple[int, int]] = []
        for head in range(queue_size):
            flag, _, counter = DESC_STATE_SPLIT.unpack_from(view, self._desc_offset(head))
            if flag:
                found.append((counter, head))
        found.sort()
        self.resubmit = [head for _, head in found]
        self._counter = (found[-1][0] + 1) if found else 0
        self.last_avail = (ring_used_idx + len(found)) & 0xFFFF

    @staticmethod
    def _desc_offset(head: int) -> int:
        return QUEUE_HEADER.size + DESC_STATE_SPLIT.size * head

    def begin(self, head: int) -> None:
        offset = self._desc_offset(head)
        struct.pack_into("<Q", self._view, offset + 8, self._counter)
        self._counter += 1
        self._view[offset] = 1

    def before_push(self, head: int) -> None:
        self._u16[6] = head

    def after_push(self, head: int, used_idx: int) -> None:
        self._view[self._desc_offset(head)] = 0
        self._u16[7] = used_idx
