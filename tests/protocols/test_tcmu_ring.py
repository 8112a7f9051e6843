"""The TCMU ring codec over byte images laid out here with ``struct``, from the offsets of
``include/uapi/linux/target_core_user.h`` (checked with gcc): mailbox version @0, flags @2,
cmdr_off @4, cmdr_size @8, cmd_head @12, cmd_tail @64; entry header len_op @0 (op in the low
3 bits), cmd_id @4, kflags @6, uflags @7; request iov_cnt @8, cdb_off @24, iovecs @48 (16
bytes each); response scsi_status @8, read_len @12, sense @16 (96 bytes); TMR tmr_type @8,
cmd_cnt @12, cmd_ids @32; a CMD entry is at least 112 bytes."""

from __future__ import annotations

import random
import struct
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storvisor.errors import ProtocolError, StateError
from storvisor.protocols.tcmu import Command, Ring, TaskManagement

RING = 4096
DATA = 8192
AREA = 128 + RING + DATA
DATA_OFF = 128 + RING


class Image:
    """A TCMU area in a bytearray, written the way the kernel writes it."""

    def __init__(self, *, flags: int = 0xF, version: int = 2) -> None:
        self.buf = bytearray(AREA)
        struct.pack_into("<HHIII", self.buf, 0, version, flags, 128, RING, 0)
        self.head = 0
        self.view = memoryview(self.buf)

    @property
    def tail(self) -> int:
        return int(struct.unpack_from("<I", self.buf, 64)[0])

    def set_head(self, head: int) -> None:
        self.head = head
        struct.pack_into("<I", self.buf, 12, head)

    def pad_to_end(self) -> None:
        size = RING - self.head
        struct.pack_into("<IHBB", self.buf, 128 + self.head, size | 0, 0, 0, 0)
        self.set_head(0)

    def cmd(self, cmd_id: int, cdb: bytes, iovecs: Sequence[tuple[int, int]] = ()) -> int:
        base = max(48 + 16 * len(iovecs), 112)
        size = (base + len(cdb) + 7) // 8 * 8
        pad = RING - self.head if self.head + size > RING else 0
        assert (self.head - self.tail) % RING + pad + size < RING, "the test overfills the ring"
        if pad:
            self.pad_to_end()
        entry = 128 + self.head
        struct.pack_into("<IHBB", self.buf, entry, size | 1, cmd_id, 0, 0)
        struct.pack_into("<III", self.buf, entry + 8, len(iovecs), 0, 0)
        struct.pack_into("<Q", self.buf, entry + 24, entry + base)
        for i, (off, n) in enumerate(iovecs):
            struct.pack_into("<QQ", self.buf, entry + 48 + 16 * i, off, n)
        self.buf[entry + base : entry + base + len(cdb)] = cdb
        at = self.head
        self.set_head((self.head + size) % RING)
        return at

    def tmr(self, tmr_type: int, ids: list[int]) -> None:
        size = (32 + 2 * len(ids) + 7) // 8 * 8
        entry = 128 + self.head
        struct.pack_into("<IHBB", self.buf, entry, size | 2, 0, 0, 0)
        self.buf[entry + 8] = tmr_type
        struct.pack_into("<I", self.buf, entry + 12, len(ids))
        struct.pack_into(f"<{len(ids)}H", self.buf, entry + 32, *ids)
        self.set_head(self.head + size)

    def raw(self, len_op: int, cmd_id: int = 0, extra: bytes = b"") -> int:
        entry = 128 + self.head
        struct.pack_into("<IHBB", self.buf, entry, len_op, cmd_id, 0, 0)
        self.buf[entry + 8 : entry + 8 + len(extra)] = extra
        at = self.head
        self.set_head((self.head + (len_op & ~7)) % RING)
        return at

    def response(self, at: int) -> tuple[int, int, int, int, bytes]:
        """(cmd_id, uflags, status, read_len, sense) of the entry at ring offset ``at``."""
        entry = 128 + at
        _, cmd_id, _, uflags = struct.unpack_from("<IHBB", self.buf, entry)
        status = self.buf[entry + 8]
        read_len = struct.unpack_from("<I", self.buf, entry + 12)[0]
        return cmd_id, uflags, status, read_len, bytes(self.buf[entry + 16 : entry + 112])

    def kernel_walk(self, start: int) -> list[int]:
        """The cmd_ids the kernel finds between ``start`` and cmd_tail (CMD entries)."""
        ids, pos = [], start
        while pos != self.tail:
            len_op, cmd_id, _, _ = struct.unpack_from("<IHBB", self.buf, 128 + pos)
            if len_op & 7 == 1:
                ids.append(cmd_id)
            pos = (pos + (len_op & ~7)) % RING
        return ids


def ids(entries: Sequence[Command | TaskManagement]) -> list[int]:
    """The cmd_ids of fetched commands (every entry must be one)."""
    assert all(isinstance(e, Command) for e in entries), entries
    return [e.cmd_id for e in entries if isinstance(e, Command)]


READ10 = bytes([0x28, 0, 0, 0, 0, 8, 0, 0, 1, 0])
TUR = bytes(6)


def test_mailbox_is_read() -> None:
    image = Image(flags=0x3)
    ring = Ring(image.view)
    assert (ring.flags, ring.cmdr_off, ring.cmdr_size) == (0x3, 128, RING)
    assert ring.next_entries() == []


@pytest.mark.parametrize(
    "mailbox",
    [
        (1, 0xF, 128, RING, 0),  # version 1
        (2, 0xF, 64, RING, 0),  # ring over the mailbox
        (2, 0xF, 128, AREA, 0),  # ring beyond the area
        (2, 0xF, 128, 0, 0),  # empty ring
    ],
)
def test_bad_mailbox_is_a_protocol_error(mailbox: tuple[int, ...]) -> None:
    image = Image()
    struct.pack_into("<HHIII", image.buf, 0, *mailbox)
    with pytest.raises(ProtocolError):
        Ring(image.view)


def test_tiny_area_and_read_only_view() -> None:
    with pytest.raises(ProtocolError):
        Ring(memoryview(bytearray(64)))
    with pytest.raises(StateError):
        Ring(memoryview(bytes(Image().buf)))


def test_command_is_decoded_with_views_into_the_area() -> None:
    image = Image()
    image.buf[DATA_OFF : DATA_OFF + 4] = b"abcd"
    image.cmd(7, READ10, [(DATA_OFF, 512), (DATA_OFF + 4096, 100)])
    [cmd] = Ring(image.view).next_entries()
    assert isinstance(cmd, Command)
    assert (cmd.cmd_id, cmd.cdb, cmd.data_length) == (7, READ10, 612)
    assert [len(v) for v in cmd.iovecs] == [512, 100]
    assert bytes(cmd.iovecs[0][:4]) == b"abcd"
    cmd.iovecs[1][:3] = b"xyz"  # a read's data lands in the area
    assert image.buf[DATA_OFF + 4096 : DATA_OFF + 4099] == b"xyz"


@pytest.mark.parametrize(
    ("cdb", "length"),
    [
        (bytes([0x00]) + bytes(5), 6),
        (bytes([0x28]) + bytes(15), 10),
        (bytes([0x88]) + bytes(15), 16),
        (bytes([0xA0]) + bytes(15), 12),
        (bytes([0x7F]) + bytes(6) + bytes([24]) + bytes(24), 32),  # variable length
    ],
)
def test_cdb_length_follows_the_group_code(cdb: bytes, length: int) -> None:
    image = Image()
    image.cmd(1, cdb)
    [cmd] = Ring(image.view).next_entries()
    assert isinstance(cmd, Command)
    assert cmd.cdb == cdb[:length]


def test_complete_writes_the_response_and_advances_the_tail() -> None:
    image = Image()
    at = image.cmd(9, READ10, [(DATA_OFF, 512)])
    ring = Ring(image.view)
    ring.next_entries()
    sense = bytes([0x70, 0, 5]) + bytes(4) + bytes([10]) + bytes(4) + bytes([0x20]) + bytes(5)
    ring.complete(9, 2, sense, read_len=0)
    cmd_id, uflags, status, read_len, raw_sense = image.response(at)
    assert (cmd_id, uflags, status, read_len) == (9, 0x2, 2, 0)
    assert raw_sense == sense + bytes(96 - len(sense))
    assert image.tail == image.head
    with pytest.raises(StateError):
        ring.complete(9, 0)  # no longer outstanding


def test_response_fields_sit_where_the_kernel_reads_them() -> None:
    """Byte by byte, as ``struct tcmu_cmd_entry`` lays out ``rsp``: scsi_status at 8,
    read_len at 12 to 15, the sense buffer from 16; cmd_id at 4, uflags at 7."""
    image = Image()
    image.cmd(0x0A0B, READ10, [(DATA_OFF, 512)])
    ring = Ring(image.view)
    ring.next_entries()
    ring.complete(0x0A0B, 0x02, b"\x70\x01\x02", read_len=0x01020304)
    entry = bytes(image.buf[128 : 128 + 20])
    assert entry[4:6] == b"\x0b\x0a"
    assert entry[7] == 0x02  # TCMU_UFLAG_READ_LEN, nothing else
    assert entry[8] == 0x02
    assert entry[12:16] == b"\x04\x03\x02\x01"
    assert entry[16:19] == b"\x70\x01\x02"


def test_tmr_fields_are_read_where_the_kernel_writes_them() -> None:
    image = Image()
    raw = bytearray(32 + 4)
    raw[8] = 5  # tmr_type
    raw[12:16] = (2).to_bytes(4, "little")  # cmd_cnt
    raw[32:36] = b"\x07\x00\x09\x01"  # cmd_ids 7, 265
    raw[0:4] = (40 | 2).to_bytes(4, "little")
    image.buf[128 : 128 + len(raw)] = raw
    image.set_head(40)
    assert Ring(image.view).next_entries() == [TaskManagement(5, (7, 265))]


def test_read_len_needs_the_capability() -> None:
    image = Image(flags=0x1)
    at = image.cmd(3, READ10, [(DATA_OFF, 512)])
    ring = Ring(image.view)
    ring.next_entries()
    ring.complete(3, 0, read_len=512)
    assert image.response(at)[:4] == (3, 0, 0, 0)


def test_sense_longer_than_the_buffer_is_refused() -> None:
    image = Image()
    image.cmd(3, TUR)
    ring = Ring(image.view)
    ring.next_entries()
    with pytest.raises(StateError):
        ring.complete(3, 2, bytes(97))


def test_out_of_order_completions_steal_the_entry_at_the_tail() -> None:
    image = Image()
    starts = [image.cmd(i, TUR) for i in (1, 2, 3)]
    ring = Ring(image.view)
    assert [e.cmd_id for e in ring.next_entries() if isinstance(e, Command)] == [1, 2, 3]
    ring.complete(3, 0)
    assert image.tail == starts[1]
    assert image.response(starts[0])[:3] == (3, 0x2 & 0, 0)  # entry 1 now answers for 3
    ring.complete(1, 2, b"\x70")
    assert image.tail == starts[2]
    ring.complete(2, 0)
    assert image.tail == image.head
    assert image.kernel_walk(0) == [3, 1, 2]
    assert [image.response(s)[2] for s in starts] == [0, 2, 0]
    assert [image.response(s)[1] for s in starts] == [0, 0, 0]  # no private marks left


def test_a_stolen_request_is_moved_into_the_completed_entry() -> None:
    image = Image()
    image.buf[DATA_OFF : DATA_OFF + 2] = b"w1"
    first = image.cmd(1, bytes([0x2A]) + bytes(9), [(DATA_OFF, 512)])
    second = image.cmd(2, READ10, [(DATA_OFF + 512, 512)])
    ring = Ring(image.view)
    ring.next_entries()
    ring.complete(2, 0, read_len=512)
    assert image.kernel_walk(0) == [2]
    assert image.tail == second
    _, cmd_id, _, uflags = struct.unpack_from("<IHBB", image.buf, 128 + second)
    assert (cmd_id, uflags) == (1, 0x40)  # command 1's request, marked as moved
    iov_cnt, cdb_off = struct.unpack_from("<I", image.buf, 128 + second + 8)[0], 0
    cdb_off = struct.unpack_from("<Q", image.buf, 128 + second + 24)[0]
    assert iov_cnt == 1
    assert 128 + second < cdb_off < 128 + second + 128
    assert image.buf[cdb_off] == 0x2A
    assert struct.unpack_from("<QQ", image.buf, 128 + second + 48) == (DATA_OFF, 512)
    restarted = Ring(image.view)  # the handler died with command 1 in flight
    [again] = restarted.next_entries()
    assert isinstance(again, Command)
    assert (again.cmd_id, again.cdb, bytes(again.iovecs[0][:2])) == (
        1,
        bytes([0x2A]) + bytes(9),
        b"w1",
    )
    restarted.complete(1, 0)
    assert image.tail == image.head
    assert image.kernel_walk(second) == [1]
    assert first == 0


def test_a_request_that_does_not_fit_waits_for_the_tail() -> None:
    image = Image()
    many = [(DATA_OFF + 512 * i, 512) for i in range(8)]
    first = image.cmd(1, READ10, many)  # 8 iovecs: does not fit a 112-byte entry
    second = image.cmd(2, TUR)
    third = image.cmd(3, TUR)
    ring = Ring(image.view)
    ring.next_entries()
    ring.complete(2, 0)
    assert image.tail == first  # 2 is done, in its own entry, behind 1
    assert image.response(second)[:3] == (2, 0x80, 0)
    restarted = Ring(image.view)  # a restart neither reruns 2 nor loses 1
    assert ids(restarted.next_entries()) == [1, 3]
    restarted.complete(3, 0)  # 1's request does not fit 3's entry either
    assert image.tail == first
    restarted.complete(1, 0, read_len=4096)
    assert image.tail == image.head
    assert image.kernel_walk(0) == [1, 2, 3]
    assert [image.response(at)[1] for at in (first, second, third)] == [0x2, 0, 0]


def test_pad_and_wrap_around() -> None:
    image = Image()
    image.set_head(RING - 64)
    struct.pack_into("<I", image.buf, 64, RING - 64)  # tail there too: an empty ring
    at = image.cmd(5, TUR)  # does not fit: a PAD first
    assert at == 0
    ring = Ring(image.view)
    [cmd] = ring.next_entries()
    assert ids([cmd]) == [5]
    ring.complete(5, 0)
    assert image.tail == image.head
    assert image.kernel_walk(RING - 64) == [5]


def test_unknown_opcode_is_flagged_and_skipped() -> None:
    image = Image()
    at = image.raw(64 | 5, cmd_id=44)
    image.cmd(6, TUR)
    ring = Ring(image.view)
    assert ids(ring.next_entries()) == [6]
    assert image.response(at)[1] == 0x1  # TCMU_UFLAG_UNKNOWN_OP
    ring.complete(6, 0)
    assert image.tail == image.head


def test_tmr_is_decoded_and_the_tail_passes_it() -> None:
    image = Image()
    image.tmr(1, [4, 5, 600])
    ring = Ring(image.view)
    assert ring.next_entries() == [TaskManagement(1, (4, 5, 600))]
    assert image.tail == image.head  # nothing outstanding: the TMR is done with


def test_tail_stays_before_outstanding_commands() -> None:
    image = Image()
    first = image.cmd(1, TUR)
    image.tmr(5, [])
    ring = Ring(image.view)
    ring.next_entries()
    assert image.tail == first
    image.cmd(2, TUR)
    ring.next_entries()
    ring.complete(2, 0)  # steals entry 1 and passes nothing else
    assert image.tail != image.head
    ring.complete(1, 0)
    assert image.tail == image.head
    assert image.kernel_walk(0) == [2, 1]


def test_a_new_ring_picks_up_uncompleted_commands() -> None:
    image = Image()
    image.cmd(1, TUR)
    image.cmd(2, TUR)
    image.cmd(3, TUR)
    first = Ring(image.view)
    first.next_entries()
    first.complete(2, 0)  # 1 and 3 were fetched, never completed: the handler died
    second = Ring(image.view)
    assert ids(second.next_entries()) == [1, 3]
    second.complete(3, 0)
    second.complete(1, 0)
    assert image.tail == image.head
    assert image.kernel_walk(0) == [2, 3, 1]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from(["tur", "read", "wide"]), min_size=1, max_size=12),
    st.randoms(use_true_random=False),
)
def test_completions_in_batches_leave_the_ring_as_one_by_one(
    kinds: list[str], rnd: random.Random
) -> None:
    """``complete_many`` (one tail move per batch) writes exactly what ``complete`` does one
    command at a time, whatever the order and the cut into batches: the same moves, the
    same responses, the same tail, and the kernel meets every command once."""
    one, many = Image(), Image()
    for image in (one, many):
        for n, kind in enumerate(kinds, 1):
            if kind == "tur":
                image.cmd(n, TUR)
            elif kind == "read":
                image.cmd(n, READ10, [(DATA_OFF + 512 * n, 512)])
            else:  # does not fit an entry of 112 bytes: it waits for the tail
                image.cmd(n, READ10, [(DATA_OFF + 512 * i, 512) for i in range(8)])
    rings = Ring(one.view), Ring(many.view)
    for ring in rings:
        ring.next_entries()
    order = list(range(1, len(kinds) + 1))
    rnd.shuffle(order)
    status = {n: rnd.choice((0, 2, 8)) for n in order}
    done = 0
    while done < len(order):
        batch = order[done : done + rnd.randint(1, len(order) - done)]
        for n in batch:
            rings[0].complete(n, status[n], b"\x70" if status[n] == 2 else b"", 512)
        rings[1].complete_many(
            (n, status[n], b"\x70" if status[n] == 2 else b"", 512) for n in batch
        )
        assert many.tail == one.tail
        done += len(batch)
    assert many.buf == one.buf
    assert many.tail == many.head
    walked = many.kernel_walk(0)
    assert sorted(walked) == sorted(order)
    assert rings[1].outstanding == 0


def _entry(cmd_id: int, iov_cnt: int, cdb_off: int, iovecs: list[tuple[int, int]]) -> bytes:
    body = struct.pack("<IIIIQQQ", iov_cnt, 0, 0, 0, cdb_off, 0, 0)
    for off, n in iovecs:
        body += struct.pack("<QQ", off, n)
    return body


@pytest.mark.parametrize(
    ("len_op", "extra"),
    [
        (0 | 1, b""),  # zero length
        (8192 | 1, b""),  # beyond the ring
        (64 | 1, b""),  # a CMD entry shorter than 112 bytes
        (112 | 1, _entry(1, 5, 128 + 96, [])),  # iovecs overflow the entry
        (128 | 1, _entry(1, 1, 128 + 120, [(AREA - 10, 11)])),  # iovec beyond the area
        (112 | 1, _entry(1, 0, AREA, [])),  # CDB offset beyond the area
        (112 | 1, _entry(1, 0, (1 << 64) - 1, [])),  # CDB offset far beyond
        (24 | 2, bytes([1, 0, 0, 0, 1, 0, 0, 0])),  # TMR entry shorter than 32 bytes
        (32 | 2, bytes([1, 0, 0, 0, 2, 0, 0, 0])),  # TMR ids overflow the entry
    ],
)
def test_malformed_entries_are_protocol_errors(len_op: int, extra: bytes) -> None:
    image = Image()
    if 0 < len_op & ~7 <= RING:
        image.raw(len_op, 1, extra)
    else:
        struct.pack_into("<IHBB", image.buf, 128, len_op, 1, 0, 0)
        image.set_head(8)
    with pytest.raises(ProtocolError):
        Ring(image.view).next_entries()


def test_cdb_crossing_the_end_of_the_area() -> None:
    image = Image()
    image.buf[AREA - 4] = 0x28  # a 10-byte CDB with 4 bytes left
    image.raw(112 | 1, 1, _entry(1, 0, AREA - 4, []))
    with pytest.raises(ProtocolError):
        Ring(image.view).next_entries()


@pytest.mark.parametrize("head", [RING, RING + 8, 12])
def test_bad_cmd_head(head: int) -> None:
    image = Image()
    image.set_head(head)
    with pytest.raises(ProtocolError):
        Ring(image.view).next_entries()


def test_duplicate_outstanding_id() -> None:
    image = Image()
    image.cmd(1, TUR)
    image.cmd(1, TUR)
    with pytest.raises(ProtocolError):
        Ring(image.view).next_entries()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.sampled_from([TUR, READ10, bytes([0x8A]) + bytes(15)]),
            st.lists(st.integers(1, 4096), max_size=6),
            st.integers(0, 255),
        ),
        min_size=1,
        max_size=20,
    ),
    st.randoms(use_true_random=False),
    st.integers(0, RING // 8 - 1),
)
def test_round_trip_in_any_completion_order(
    commands: list[tuple[bytes, list[int], int]], rng: object, start: int
) -> None:
    """Commands are queued in rounds (wrapping the ring), completed in a random order, with
    handler restarts in between; the kernel finds every id exactly once with its own
    status, a restarted handler finds exactly the commands not completed, and the ring
    empties."""
    import random

    assert isinstance(rng, random.Random)
    image = Image()
    image.set_head(start * 8)
    struct.pack_into("<I", image.buf, 64, start * 8)
    ring = Ring(image.view)
    found: dict[int, int] = {}
    status_of: dict[int, int] = {}
    pending: list[int] = []
    for round_start in range(0, len(commands), 8):
        walked_from = image.tail
        for i, (cdb, lengths, status) in enumerate(commands[round_start : round_start + 8]):
            cmd_id = round_start + i + 1
            iovecs = [(DATA_OFF + 16 * j, n) for j, n in enumerate(lengths)]
            image.cmd(cmd_id, cdb, iovecs)
            status_of[cmd_id] = status
        for entry in ring.next_entries():
            assert isinstance(entry, Command)
            cdb, lengths, _ = commands[entry.cmd_id - 1]
            assert entry.cdb == cdb
            assert [len(v) for v in entry.iovecs] == lengths
            pending.append(entry.cmd_id)
        rng.shuffle(pending)
        keep = rng.randint(0, len(pending))
        for cmd_id in pending[keep:]:
            ring.complete(cmd_id, status_of[cmd_id])
        pending = pending[:keep]
        if rng.random() < 0.3:  # the handler restarts: it finds exactly what is pending
            ring = Ring(image.view)
            again = ring.next_entries()
            assert sorted(ids(again)) == sorted(pending)
            for entry in again:
                assert isinstance(entry, Command)
                cdb, lengths, _ = commands[entry.cmd_id - 1]
                assert (entry.cdb, [len(v) for v in entry.iovecs]) == (cdb, lengths)
        for cmd_id in image.kernel_walk(walked_from):
            assert cmd_id not in found
            found[cmd_id] = status_of[cmd_id]
    walked_from = image.tail
    for cmd_id in pending:
        ring.complete(cmd_id, status_of[cmd_id])
    for cmd_id in image.kernel_walk(walked_from):
        found[cmd_id] = status_of[cmd_id]
    assert found == status_of
    assert image.tail == image.head
    assert ring.outstanding == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=8, max_size=RING), st.integers(0, RING // 8 - 1))
def test_garbage_in_the_ring_raises_only_protocol_errors(garbage: bytes, head: int) -> None:
    image = Image()
    image.buf[128 : 128 + len(garbage)] = garbage
    image.set_head(head * 8)
    ring = Ring(image.view)
    try:
        for entry in ring.next_entries():
            if isinstance(entry, Command):
                ring.complete(entry.cmd_id, 0, b"\x70", read_len=0)
    except ProtocolError:
        pass


# ---------------------------------------------------------------------- crashes
# The marks of the module docstring ("Crashes"), in uflags: LOST 0x10, MOVING 0x20 (the
# request's owner at offset 32), MOVED 0x40, DONE 0x80. Each state below is where a handler
# can die while command 2 completes ahead of command 1 (a steal); the next handler must
# answer each command exactly once: with its own response or BUSY (0x08).

WRITE10 = bytes([0x2A, 0, 0, 0, 0, 64, 0, 0, 8, 0])


def _mark(image: Image, at: int, cmd_id: int, uflags: int) -> None:
    struct.pack_into("<H", image.buf, 128 + at + 4, cmd_id)
    image.buf[128 + at + 7] = uflags


def _copy_request(image: Image, src: int, dst: int, owner: int) -> None:
    s, d = 128 + src, 128 + dst
    iov_cnt = struct.unpack_from("<I", image.buf, s + 8)[0]
    cdb_off = struct.unpack_from("<Q", image.buf, s + 24)[0]
    new_cdb = d + 48 + 16 * iov_cnt
    image.buf[new_cdb : new_cdb + 10] = image.buf[cdb_off : cdb_off + 10]
    image.buf[d + 48 : d + 48 + 16 * iov_cnt] = image.buf[s + 48 : s + 48 + 16 * iov_cnt]
    struct.pack_into("<IIIIQQ", image.buf, d + 8, iov_cnt, 0, 0, 0, new_cdb, owner)


def _respond(image: Image, at: int, status: int) -> None:
    image.buf[128 + at + 8] = status
    struct.pack_into("<I", image.buf, 128 + at + 12, 0)


def _state(step: int) -> tuple[Image, int, int]:
    image = Image()
    image.buf[DATA_OFF : DATA_OFF + 4] = b"data"
    first = image.cmd(1, WRITE10, [(DATA_OFF, 4096)])
    second = image.cmd(2, TUR)
    if step >= 1:
        _mark(image, second, 2, 0x10)  # LOST: 2 completed, about to take 1's request
    if step >= 2:
        image.buf[128 + second + 48 : 128 + second + 64] = b"\xee" * 16  # half copied
    if step >= 3:
        _copy_request(image, first, second, owner=1)
        _mark(image, second, 2, 0x20)  # MOVING: holds 1's request, 2 owed
    if step >= 4:
        _mark(image, first, 2, 0x10)  # the entry at cmd_tail: LOST for 2
    if step >= 5:
        _respond(image, first, 0)
        _mark(image, first, 2, 0x80)  # DONE
    if step >= 6:
        _mark(image, second, 1, 0x40)  # MOVED
    if step >= 7:
        image.buf[128 + first + 7] = 0
        struct.pack_into("<I", image.buf, 64, second)  # cmd_tail passed it
    return image, first, second


@pytest.mark.parametrize("step", range(8))
def test_a_crash_at_any_store_answers_each_command_once(step: int) -> None:
    image, first, _ = _state(step)
    already = image.kernel_walk(0)  # what the kernel collected before the crash
    ring = Ring(image.view)
    fetched = ring.next_entries()
    for entry in fetched:
        assert isinstance(entry, Command)
        if entry.cmd_id == 1:
            assert entry.cdb == WRITE10
            assert [len(v) for v in entry.iovecs] == [4096]
            assert bytes(entry.iovecs[0][:4]) == b"data"
        ring.complete(entry.cmd_id, 0)
    assert image.tail == image.head
    answers: dict[int, int] = {}
    pos = 0
    while pos != image.tail:
        len_op, cmd_id, _, uflags = struct.unpack_from("<IHBB", image.buf, 128 + pos)
        assert cmd_id not in answers, f"command {cmd_id} answered twice"
        assert uflags & 0xF0 == 0, "a private mark left before cmd_tail"
        answers[cmd_id] = image.buf[128 + pos + 8]
        pos += len_op & ~7
    assert set(answers) == {1, 2}
    assert answers[1] == 0  # 1 ran (again, if needed): its write is idempotent
    assert answers[2] == (0x08 if 1 <= step <= 4 else 0)  # BUSY when its response was lost
    assert ids(fetched) == ([1, 2] if step == 0 else [1])
    assert already == ([2] if step == 7 else [])
    assert first == 0


def test_a_crash_after_the_tail_moved_leaves_only_marks_the_kernel_ignores() -> None:
    """cmd_tail passed a DONE entry, and the handler died before clearing the mark: the
    next handler neither reruns that command nor answers it again."""
    image, first, second = _state(6)
    struct.pack_into("<I", image.buf, 64, second)  # the tail moved; 0x80 still set on first
    ring = Ring(image.view)
    assert ids(ring.next_entries()) == [1]
    ring.complete(1, 0)
    assert image.tail == image.head
    assert image.kernel_walk(0) == [2, 1]
    assert image.buf[128 + first + 7] & 0x7F == 0  # DONE is ignored; nothing else is set
