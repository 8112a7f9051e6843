"""Split virtqueue (device side) and the inflight record, sans I/O, over ``bytearray`` guest
memory with a minimal driver written here."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storvisor.protocols.vhost_user.inflight import InflightQueue, queue_region_size
from storvisor.protocols.virtio.memory import GuestMemory, GuestMemoryError, GuestRegion
from storvisor.protocols.virtio.ring import (
    VIRTQ_DESC,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    RingError,
    SplitQueue,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
    vring_need_event,
)

N = 8
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000


class Driver:
    """Two adjacent regions (GPA 0x0-0x10000 and 0x10000-0x20000) plus one far away."""

    def __init__(self, *, event_idx: bool = False) -> None:
        self.ram = [bytearray(0x10000), bytearray(0x10000), bytearray(0x1000)]
        self.memory = GuestMemory(
            [
                GuestRegion(0, 0x10000, 0x7F0000, memoryview(self.ram[0])),
                GuestRegion(0x10000, 0x10000, 0x900000, memoryview(self.ram[1])),
                GuestRegion(1 << 32, 0x1000, 0xA00000, memoryview(self.ram[2])),
            ]
        )
        self.avail_idx = 0
        self.queue = SplitQueue(
            self.memory,
            N,
            self.memory.gpa_view(DESC, desc_table_size(N)),
            self.memory.gpa_view(AVAIL, avail_ring_size(N)),
            self.memory.gpa_view(USED, used_ring_size(N)),
            event_idx=event_idx,
        )

    def poke(self, gpa: int, data: bytes) -> None:
        views: list[memoryview] = []
        self.memory.gpa_views(gpa, len(data), views)
        done = 0
        for v in views:
            v[:] = data[done : done + len(v)]
            done += len(v)

    def desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        self.poke(DESC + 16 * i, VIRTQ_DESC.pack(addr, length, flags, nxt))

    def publish(self, *heads: int) -> None:
        for head in heads:
            self.poke(AVAIL + 4 + 2 * (self.avail_idx % N), struct.pack("<H", head))
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.poke(AVAIL + 2, struct.pack("<H", self.avail_idx))

    def u16(self, gpa: int) -> int:
        value: int = struct.unpack("<H", self.memory.read_gpa(gpa, 2))[0]
        return value

    def used(self, i: int) -> tuple[int, int]:
        id_, length = struct.unpack("<II", self.memory.read_gpa(USED + 4 + 8 * (i % N), 8))
        return id_, length


def lengths(views: list[memoryview]) -> list[int]:
    return [len(v) for v in views]


def test_pop_push_and_wrap() -> None:
    d = Driver()
    for round_ in range(5 * N + 1):  # the ring wraps five times
        d.desc(0, 0x4000, 16, VRING_DESC_F_NEXT, 1)
        d.desc(1, 0x5000, 512, VRING_DESC_F_WRITE, 0)
        d.publish(0)
        chain = d.queue.pop()
        assert chain is not None and chain.head == 0
        assert lengths(chain.readable) == [16] and lengths(chain.writable) == [512]
        assert d.queue.pop() is None
        d.queue.push(0, 513)
        assert d.u16(USED + 2) == d.queue.used_idx == (round_ + 1) & 0xFFFF
        assert d.used(round_) == (0, 513)


def test_indices_wrap_past_65535() -> None:
    d = Driver()
    d.avail_idx = 0xFFFE
    d.queue.last_avail = 0xFFFE
    d.desc(3, 0x4000, 16)
    d.publish(3, 3, 3)
    heads = [d.queue.pop(), d.queue.pop(), d.queue.pop(), d.queue.pop()]
    assert [c.head if c else None for c in heads] == [3, 3, 3, None]
    assert d.queue.last_avail == 1


def test_buffer_crossing_regions_is_split() -> None:
    d = Driver()
    d.desc(0, 0xF000, 0x2000, VRING_DESC_F_WRITE)
    d.publish(0)
    chain = d.queue.pop()
    assert chain is not None and lengths(chain.writable) == [0x1000, 0x1000]
    chain.writable[0][:] = b"a" * 0x1000
    chain.writable[1][:] = b"b" * 0x1000
    assert d.ram[0][0xF000:] == b"a" * 0x1000 and d.ram[1][:0x1000] == b"b" * 0x1000


def test_indirect_table_spanning_regions() -> None:
    d = Driver()
    table = 0x10000 - 16  # two entries: one in each region
    d.poke(table, VIRTQ_DESC.pack(0x4000, 16, VRING_DESC_F_NEXT, 1))
    d.poke(table + 16, VIRTQ_DESC.pack(1 << 32, 100, VRING_DESC_F_WRITE, 0))
    d.desc(2, table, 32, VRING_DESC_F_INDIRECT)
    d.publish(2)
    chain = d.queue.pop()
    assert chain is not None and chain.head == 2
    assert lengths(chain.readable) == [16] and lengths(chain.writable) == [100]


def test_indirect_table_may_exceed_ring_size() -> None:
    d = Driver()
    table = 0x6000
    for i in range(100):
        d.poke(
            table + 16 * i,
            VIRTQ_DESC.pack(0x8000 + i, 1, VRING_DESC_F_NEXT if i < 99 else 0, i + 1),
        )
    d.desc(0, table, 1600, VRING_DESC_F_INDIRECT)
    d.publish(0)
    chain = d.queue.pop()
    assert chain is not None and len(chain.readable) == 100


BAD_CHAINS = {
    "loop": lambda d: (
        d.desc(0, 0x4000, 1, VRING_DESC_F_NEXT, 1),
        d.desc(1, 0x4000, 1, VRING_DESC_F_NEXT, 0),
    ),
    "self-loop": lambda d: d.desc(0, 0x4000, 1, VRING_DESC_F_NEXT, 0),
    "next out of range": lambda d: d.desc(0, 0x4000, 1, VRING_DESC_F_NEXT, N),
    "outside memory": lambda d: d.desc(0, 0x20000, 1),
    "gap between regions": lambda d: d.desc(0, 0x1F000, 0x2000),
    "wraps 2**64": lambda d: d.desc(0, (1 << 64) - 8, 16),
    "readable after writable": lambda d: (
        d.desc(0, 0x4000, 1, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
        d.desc(1, 0x4000, 1),
    ),
    "indirect misaligned": lambda d: d.desc(0, 0x6000, 24, VRING_DESC_F_INDIRECT),
    "indirect empty": lambda d: d.desc(0, 0x6000, 0, VRING_DESC_F_INDIRECT),
    "indirect with next": lambda d: d.desc(
        0, 0x6000, 16, VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, 1
    ),
    "indirect huge": lambda d: d.desc(0, 0x6000, 16 * 4096, VRING_DESC_F_INDIRECT),
    "indirect outside memory": lambda d: d.desc(0, 0x30000, 32, VRING_DESC_F_INDIRECT),
    "nested indirect": lambda d: (
        d.poke(0x6000, VIRTQ_DESC.pack(0x7000, 16, VRING_DESC_F_INDIRECT, 0)),
        d.desc(0, 0x6000, 16, VRING_DESC_F_INDIRECT),
    ),
    "loop inside indirect": lambda d: (
        d.poke(0x6000, VIRTQ_DESC.pack(0x4000, 1, VRING_DESC_F_NEXT, 1)),
        d.poke(0x6010, VIRTQ_DESC.pack(0x4000, 1, VRING_DESC_F_NEXT, 0)),
        d.desc(0, 0x6000, 32, VRING_DESC_F_INDIRECT),
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_CHAINS))
def test_bad_chain_breaks_queue(name: str) -> None:
    d = Driver()
    BAD_CHAINS[name](d)
    d.publish(0, 0)
    with pytest.raises(RingError):
        d.queue.pop()
    assert d.queue.broken
    assert d.queue.pop() is None and d.queue.pending() == 0
    assert not d.queue.enable_notification()


def test_head_out_of_range_and_avail_jump() -> None:
    d = Driver()
    d.publish(N)
    with pytest.raises(RingError):
        d.queue.pop()
    d = Driver()
    d.avail_idx = N + 1
    d.poke(AVAIL + 2, struct.pack("<H", d.avail_idx))
    with pytest.raises(RingError):
        d.queue.pop()


@pytest.mark.parametrize(
    "event, new, old, expected",
    [
        (0, 1, 0, True),
        (0, 2, 1, False),
        (5, 6, 0, True),
        (5, 5, 0, False),
        (0xFFFF, 0, 0xFFFF, True),
        (10, 3, 2, False),
    ],
)
def test_vring_need_event(event: int, new: int, old: int, expected: bool) -> None:
    assert vring_need_event(event, new, old) is expected


def test_notification_without_event_idx() -> None:
    d = Driver()
    assert not d.queue.should_notify()  # nothing pushed
    d.desc(0, 0x4000, 1)
    d.publish(0)
    chain = d.queue.pop()
    assert chain is not None
    d.queue.push(0, 0)
    assert d.queue.should_notify()
    assert not d.queue.should_notify()  # already signalled
    d.poke(AVAIL, struct.pack("<H", VRING_AVAIL_F_NO_INTERRUPT))
    d.publish(0)
    assert d.queue.pop() is not None
    d.queue.push(0, 0)
    assert not d.queue.should_notify()


def test_event_idx_notification_and_avail_event() -> None:
    d = Driver(event_idx=True)
    d.desc(0, 0x4000, 1)
    used_event = AVAIL + 4 + 2 * N
    avail_event = USED + 4 + 8 * N
    d.poke(used_event, struct.pack("<H", 1))  # interrupt only once used.idx passes 1
    d.publish(0, 0)
    assert d.queue.pop() is not None
    d.queue.push(0, 0)
    assert not d.queue.should_notify()  # used.idx = 1: not past used_event
    assert d.queue.enable_notification()  # a second chain is waiting
    assert d.queue.pop() is not None
    d.queue.push(0, 0)
    assert d.queue.should_notify()  # used.idx = 2 passed used_event = 1
    assert not d.queue.enable_notification()
    assert d.u16(avail_event) == 2  # the driver kicks for the next chain


def test_disable_notification_without_event_idx() -> None:
    d = Driver()
    d.desc(0, 0x4000, 1)
    d.queue.disable_notification()
    assert d.u16(USED) == VRING_USED_F_NO_NOTIFY
    d.publish(0)
    assert d.queue.enable_notification()  # flag cleared, then the ring re-checked
    assert d.u16(USED) == 0
    assert d.queue.pop() is not None
    assert not d.queue.enable_notification()


def test_disable_notification_with_event_idx_leaves_avail_event() -> None:
    d = Driver(event_idx=True)
    avail_event = USED + 4 + 8 * N
    d.desc(0, 0x4000, 1)
    assert not d.queue.enable_notification()
    d.queue.disable_notification()
    d.publish(0, 0)
    assert d.queue.pop() is not None and d.queue.pop() is not None
    assert d.u16(avail_event) == 0 and d.u16(USED) == 0  # the driver ignores the flag
    assert not d.queue.enable_notification()
    assert d.u16(avail_event) == 2


@pytest.mark.parametrize("broken", [False, True])
def test_no_notify_left_by_an_earlier_backend_is_cleared(broken: bool) -> None:
    d = Driver()
    d.poke(USED, struct.pack("<H", VRING_USED_F_NO_NOTIFY))  # a back-end stopped while busy
    queue = SplitQueue(  # the next one
        d.memory,
        N,
        d.memory.gpa_view(DESC, desc_table_size(N)),
        d.memory.gpa_view(AVAIL, avail_ring_size(N)),
        d.memory.gpa_view(USED, used_ring_size(N)),
    )
    if broken:
        d.publish(N)
        with pytest.raises(RingError):
            queue.pop()
    queue.enable_notification()
    assert d.u16(USED) == 0


def test_used_idx_read_from_ring_on_start() -> None:
    d = Driver()
    d.poke(USED + 2, struct.pack("<H", 77))
    q = SplitQueue(
        d.memory,
        N,
        d.memory.gpa_view(DESC, desc_table_size(N)),
        d.memory.gpa_view(AVAIL, avail_ring_size(N)),
        d.memory.gpa_view(USED, used_ring_size(N)),
        last_avail=77,
    )
    assert q.used_idx == 77


def test_queue_size_and_view_checks() -> None:
    d = Driver()
    with pytest.raises(RingError):
        SplitQueue(
            d.memory,
            6,
            memoryview(bytearray(96)),
            memoryview(bytearray(18)),
            memoryview(bytearray(54)),
        )
    with pytest.raises(RingError):
        SplitQueue(
            d.memory,
            N,
            memoryview(bytearray(16)),
            memoryview(bytearray(22)),
            memoryview(bytearray(70)),
        )


def test_guest_memory_translation() -> None:
    d = Driver()
    assert d.memory.uva_to_gpa(0x900010) == 0x10010
    assert len(d.memory.uva_view(0x7F0000, 0x10000)) == 0x10000
    with pytest.raises(GuestMemoryError):
        d.memory.uva_view(0x7F0000, 0x10001)  # user ranges must not cross regions
    with pytest.raises(GuestMemoryError):
        d.memory.gpa_view(0xFFF0, 32)
    with pytest.raises(GuestMemoryError):
        d.memory.uva_to_gpa(0x10)


@settings(max_examples=300, deadline=None)
@given(
    descs=st.lists(
        st.tuples(
            st.sampled_from([0, 0x4000, 0xFFF8, 0x1FFF0, 1 << 32, 0x30000, (1 << 64) - 1]),
            st.integers(0, 0x3000),
            st.integers(0, 7),
            st.integers(0, N + 1),
        ),
        min_size=N,
        max_size=N,
    ),
    heads=st.lists(st.integers(0, N), min_size=1, max_size=4),
)
def test_fuzz_chains_never_escape_memory(
    descs: list[tuple[int, int, int, int]], heads: list[int]
) -> None:
    d = Driver()
    for i, (addr, length, flags, nxt) in enumerate(descs):
        d.desc(i, addr, length, flags, nxt)
    d.poke(0x6000, VIRTQ_DESC.pack(0x4000, 16, 1, 1) + VIRTQ_DESC.pack(0x6000, 32, 4, 0))
    d.publish(*heads)
    while True:
        try:
            chain = d.queue.pop()
        except RingError:
            assert d.queue.broken
            return
        if chain is None:
            return
        total = sum(lengths(chain.readable) + lengths(chain.writable))
        assert total <= sum(len(r) for r in d.ram) * N


# -- inflight record ------------------------------------------------------------------------


def test_inflight_fresh_then_resubmit_in_counter_order() -> None:
    buf = bytearray(queue_region_size(N))
    rec = InflightQueue(memoryview(buf), N, ring_used_idx=0)
    assert rec.last_avail is None and rec.resubmit == []
    for head in (5, 2, 7):
        rec.begin(head)
    rec.before_push(2)
    rec.after_push(2, 1)  # head 2 completed; used.idx = 1
    # the back-end dies; a new one opens the same buffer
    again = InflightQueue(memoryview(buf), N, ring_used_idx=1)
    assert again.resubmit == [5, 7]
    assert again.last_avail == 3


def test_inflight_fixes_up_the_last_batch() -> None:
    buf = bytearray(queue_region_size(N))
    rec = InflightQueue(memoryview(buf), N, ring_used_idx=10)
    rec.begin(4)
    rec.begin(6)
    rec.before_push(4)  # used entry + used.idx = 11 published, then the process died
    again = InflightQueue(memoryview(buf), N, ring_used_idx=11)
    assert again.resubmit == [6]
    assert again.last_avail == 12
