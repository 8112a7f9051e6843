"""The TCMU command ring (``target_core_user``), sans I/O.

Theory of operation
-------------------
The kernel's ``target_core_user`` backstore hands SCSI commands to a user-space handler
through one shared memory area, mmapped from ``/dev/uioN``
(``include/uapi/linux/target_core_user.h``)::

    0                      cmdr_off                  cmdr_off + cmdr_size          end
    | mailbox (128 bytes)  | command ring            | data area (iovec buffers)   |

The mailbox holds ``version`` (2), capability ``flags``, the ring's place (``cmdr_off``,
``cmdr_size``), ``cmd_head`` (written by the kernel: where its next entry goes) and
``cmd_tail`` (written by the handler, on its own cache line at offset 64: everything before
it is completed and may be reused). Every entry starts with an 8-byte header: ``len_op``
(length in the bits above the low three, which hold the opcode PAD, CMD or TMR), ``cmd_id``,
``kflags`` and ``uflags``. Entries never wrap: the kernel fills the end of the ring with a
PAD entry instead. A CMD entry carries the iovec count, ``cdb_off`` (the CDB's offset from
the start of the area) and the iovecs (``{u64 offset, u64 len}``, also offsets from the
start of the area); the response overwrites the same bytes (``scsi_status``, ``read_len``,
the sense buffer), so every request field is read before a response is written.

``Ring`` wraps a writable view of the whole area and makes no system call: the handler
``read``s the uio fd, calls ``next_entries``, runs the commands, calls ``complete`` for
each and ``write``s the uio fd so that the kernel collects the completions.

Out-of-order completion (``TCMU_MAILBOX_FLAG_CAP_OOOC``) follows libtcmu. The ring keeps
a private read pointer ahead of ``cmd_tail``; ``next_entries`` walks it to ``cmd_head``,
skipping PAD entries and flagging unknown opcodes with ``TCMU_UFLAG_UNKNOWN_OP``. The kernel
collects completions from the entries before ``cmd_tail``, looking each up by the ``cmd_id``
it finds there, so a command that completes while an older one is still running "steals" the
first CMD entry at ``cmd_tail``: its response and its ``cmd_id`` go there, and ``cmd_tail``
advances. Unlike libtcmu, the ring keeps the stolen entry's request: it is moved into the
completing command's own entry (counts, iovecs and CDB), so that the entries between
``cmd_tail`` and ``cmd_head`` always hold exactly the requests not yet completed. When the
request does not fit there (it has more iovecs), the response is written into the
completing command's own entry, marked DONE, and ``cmd_tail`` passes it together with the
entries before it.

Crashes
-------
The ring outlives the handler, and a handler may die between any two of its stores (kill
-9). Every entry between ``cmd_tail`` and ``cmd_head`` therefore says what it holds, with
storvisor's own bits of ``uflags`` (the kernel reads ``uflags`` only of entries before
``cmd_tail`` and zeroes new entries); ``cmd_id`` and ``uflags`` change together in one
aligned 32-bit store:

* no mark, or MOVED: the request of the command in its header;
* DONE: the complete response of the command in its header;
* LOST: the command in its header is completed, its response is not (yet) written;
* MOVING: a complete copy of the request of the command whose id is at offset 32, while the
  command in its header is completed and still owed its response.

A steal goes: the completed command's entry E becomes LOST, then receives the request at
``cmd_tail`` and becomes MOVING; the entry at ``cmd_tail`` becomes LOST, receives the
response and becomes DONE; E becomes MOVED; ``cmd_tail`` advances, and only then are the
DONE marks it passed cleared (the kernel ignores them; a mark cleared before ``cmd_tail``
moves would make a response look like a request). ``cmd_head`` and ``cmd_tail`` are loaded
and stored as whole aligned words, never byte by byte. A handler that starts
reads from ``cmd_tail`` and sorts the marks out: DONE entries are passed, not run again; a
LOST entry is answered BUSY (the initiator retries the command); a MOVING entry whose
request is still found earlier in the ring is answered BUSY for the command in its header,
otherwise it becomes MOVED (its copy is the request). Every other request is fetched again.
So after a crash at any point each command is answered exactly once, with its own response
or with BUSY.

A ring that breaks the layout (a length or offset outside the area, an entry crossing the
end of the ring, a zero length) raises ``ProtocolError`` and nothing is read out of bounds;
the handler then stops serving the ring.

Byte order is the host's, as in the kernel's structs; the ``struct`` formats say
little-endian, the order of every host storvisor runs on.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from storvisor.errors import ProtocolError, StateError

Buffer = bytes | bytearray | memoryview

TCMU_MAILBOX_VERSION = 2
TCMU_MAILBOX_FLAG_CAP_OOOC = 1 << 0
TCMU_MAILBOX_FLAG_CAP_READ_LEN = 1 << 1
TCMU_MAILBOX_FLAG_CAP_TMR = 1 << 2
TCMU_MAILBOX_FLAG_CAP_KEEP_BUF = 1 << 3

TCMU_OP_PAD = 0
TCMU_OP_CMD = 1
TCMU_OP_TMR = 2
TCMU_OP_MASK = 0x7

TCMU_UFLAG_UNKNOWN_OP = 0x1
TCMU_UFLAG_READ_LEN = 0x2
TCMU_UFLAG_KEEP_BUF = 0x4

# storvisor's own marks in ``uflags`` (the kernel reads them only of entries before
# ``cmd_tail``, and zeroes new entries): they make every state of the ring between two
# stores meaningful to a handler that restarts after a crash (see "Crashes" above)
UFLAG_LOST = 0x10
"""The entry is being rewritten: the command in its header is completed, and its response
is not (yet) in the entry."""
UFLAG_MOVING = 0x20
"""The entry holds a complete copy of the request of the command at offset 32; the command
in its header is completed and owed its response."""
UFLAG_MOVED = 0x40
"""The entry holds a request moved there from the entry at ``cmd_tail``."""
UFLAG_DONE = 0x80
"""The entry holds a response that ``cmd_tail`` has not passed yet."""
SAM_STAT_BUSY = 0x08
"""What a restarted handler answers for a command whose response was lost in a crash: the
initiator retries it."""

TCMU_SENSE_BUFFERSIZE = 96

MAILBOX = struct.Struct("<HHIII")
"""``struct tcmu_mailbox`` up to ``cmd_head``: version, flags, cmdr_off, cmdr_size, cmd_head."""
MAILBOX_SIZE = 128
CMD_HEAD_WORD = 3  # offset 12, as an index of the mailbox's 32-bit words
CMD_TAIL_WORD = 16  # offset 64: ``__aligned__(ALIGN_SIZE)``, on its own cache line
HDR = struct.Struct("<IHBB")
"""``struct tcmu_cmd_entry_hdr``: len_op, cmd_id, kflags, uflags."""
CMD_ID = struct.Struct("<H")
CMD_ID_OFFSET = 4
UFLAGS_OFFSET = 7
REQ = struct.Struct("<III4xQ")
"""``req`` of ``struct tcmu_cmd_entry`` at offset 8: iov_cnt, iov_bidi_cnt, iov_dif_cnt,
(a 4-byte hole: the inner struct is not packed), cdb_off."""
REQ_OFFSET = 8
IOV = struct.Struct("<QQ")
"""``struct iovec`` as TCMU fills it: offset from the start of the area, length."""
IOV_OFFSET = 48
MOVING_ID = struct.Struct("<Q")
MOVING_ID_OFFSET = 32  # ``req.__pad1``: the command whose request a MOVING entry holds
RSP = struct.Struct("<BxxxI")
"""``rsp`` of ``struct tcmu_cmd_entry`` at offset 8: scsi_status, read_len; the sense buffer
follows at offset 16."""
RSP_OFFSET = 8
SENSE_OFFSET = 16
CMD_ENTRY_SIZE = 112
"""``sizeof(struct tcmu_cmd_entry)``: the kernel never makes a CMD entry shorter, so the
response always fits."""
TMR = struct.Struct("<BxxxI")
"""``struct tcmu_tmr_entry`` at offset 8: tmr_type, cmd_cnt; the ``u16`` cmd_ids follow at
offset 32."""
TMR_OFFSET = 8
TMR_IDS_OFFSET = 32


class TmrType(enum.IntEnum):
    """``TCMU_TMR_*``: the task management function the kernel received."""

    UNKNOWN = 0
    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LUN_RESET = 5
    TARGET_WARM_RESET = 6
    TARGET_COLD_RESET = 7
    LUN_RESET_PRO = 128  # a pseudo reset after a PR OUT


class Command(NamedTuple):
    """A SCSI command fetched from the ring (a named tuple: one is made per command, and a
    tuple is made in a third of the time a frozen dataclass takes).

    ``cdb`` is a copy; ``iovecs`` are views of the data area (Data-Out for writes, to be
    filled for reads) that stay valid until the command is completed.
    """

    cmd_id: int
    cdb: bytes
    iovecs: tuple[memoryview, ...]

    @property
    def data_length(self) -> int:
        return sum(len(v) for v in self.iovecs)


@dataclass(frozen=True, slots=True)
class TaskManagement:
    """A task management notification (sent with ``attrib/tmr_notification=1``): the
    ``cmd_ids`` are the commands the kernel aborted. It needs no completion."""

    tmr_type: int
    cmd_ids: tuple[int, ...]


Entry = Command | TaskManagement


def cdb_length(opcode: int) -> int:
    """The length of a CDB from its opcode's group code, as ``scsi_command_size`` computes
    it (variable-length CDBs, 0x7F, are handled by the caller from their byte 7)."""
    return (6, 10, 10, 12, 16, 12, 10, 10)[opcode >> 5]


class Ring:
    """The handler's side of one TCMU ring (see the module docstring). Not thread-safe: the
    caller serialises ``next_entries`` and ``complete``.

    Raises:
        ProtocolError: the mailbox is not version 2 or places the ring outside the area.
    """

    def __init__(self, area: memoryview) -> None:
        if area.readonly:
            raise StateError("the TCMU area must be mapped writable")
        self._area = area.cast("B") if area.format != "B" or area.ndim != 1 else area
        size = len(self._area)
        if size < MAILBOX_SIZE:
            raise ProtocolError(f"TCMU area of {size} bytes has no room for the mailbox")
        version, flags, cmdr_off, cmdr_size, _ = MAILBOX.unpack_from(self._area, 0)
        if version != TCMU_MAILBOX_VERSION:
            raise ProtocolError(f"TCMU mailbox version {version}, expected 2")
        if cmdr_off < MAILBOX_SIZE or cmdr_size == 0 or cmdr_off + cmdr_size > size:
            raise ProtocolError(
                f"TCMU command ring [{cmdr_off}, +{cmdr_size}) outside the {size}-byte area"
            )
        # cmd_head and cmd_tail are read and written as whole aligned words, never byte by
        # byte: the kernel writes cmd_head while this runs, and a crash must not tear
        # cmd_tail
        self._words = self._area[:MAILBOX_SIZE].cast("I")
        self._u32 = self._area[: size - size % 4].cast("I")  # entry headers, word by word
        self.flags = flags
        self.cmdr_off = cmdr_off
        self.cmdr_size = cmdr_size
        self._next = self._position(self.cmd_tail, "cmd_tail")
        self._positions: dict[int, int] = {}  # outstanding cmd_id -> its entry's position

    @property
    def cmd_head(self) -> int:
        return int(self._words[CMD_HEAD_WORD])

    @property
    def cmd_tail(self) -> int:
        return int(self._words[CMD_TAIL_WORD])

    @property
    def outstanding(self) -> int:
        """Commands fetched and not yet completed."""
        return len(self._positions)

    def _position(self, pos: int, what: str) -> int:
        if pos >= self.cmdr_size or pos % 8:
            raise ProtocolError(f"TCMU {what} {pos} is not an entry position in the ring")
        return pos

    def _header(self, pos: int) -> tuple[int, int, int]:
        """(op, length, cmd_id) of the entry at ring position ``pos``, checked to fit."""
        len_op, cmd_id, _, _ = HDR.unpack_from(self._area, self.cmdr_off + pos)
        length = len_op & ~TCMU_OP_MASK
        if length == 0 or pos + length > self.cmdr_size:
            raise ProtocolError(f"TCMU entry at {pos} has length {length} outside the ring")
        return len_op & TCMU_OP_MASK, length, cmd_id

    def next_entries(self) -> list[Entry]:
        """Fetch every entry the kernel queued since the last call (from ``cmd_tail`` on
        the first call), in ring order. On the first call, entries a crashed predecessor
        left are sorted out (see "Crashes"): responses it wrote are passed, not run again,
        and a command whose response it lost is answered BUSY.

        Raises:
            ProtocolError: an entry breaks the layout; the ring must not be used any more.
        """
        head = self._position(self.cmd_head, "cmd_head")
        entries: list[Entry] = []
        pos = self._next
        while pos != head:
            op, length, cmd_id = self._header(pos)
            base = self.cmdr_off + pos
            if op == TCMU_OP_CMD:
                if length < CMD_ENTRY_SIZE:
                    raise ProtocolError(f"TCMU command entry of {length} bytes (at least 112)")
                uflags = self._area[base + UFLAGS_OFFSET]
                if uflags & UFLAG_MOVING:
                    moved = MOVING_ID.unpack_from(self._area, base + MOVING_ID_OFFSET)[0] & 0xFFFF
                    if moved in self._positions:  # its original is still there
                        self._respond(pos, cmd_id, SAM_STAT_BUSY)
                    else:
                        self._set_header(pos, moved, UFLAG_MOVED)
                        cmd_id = moved
                elif uflags & UFLAG_LOST:
                    self._respond(pos, cmd_id, SAM_STAT_BUSY)
                if not self._area[base + UFLAGS_OFFSET] & UFLAG_DONE:
                    command = self._command(base, length, cmd_id)
                    self._positions[cmd_id] = pos
                    entries.append(command)
            elif op == TCMU_OP_TMR:
                entries.append(self._tmr(base, length))
            elif op != TCMU_OP_PAD:
                self._area[base + UFLAGS_OFFSET] |= TCMU_UFLAG_UNKNOWN_OP
            pos = (pos + length) % self.cmdr_size
        self._next = pos
        self._retire()
        return entries

    def _command(self, base: int, length: int, cmd_id: int) -> Command:
        if length < CMD_ENTRY_SIZE:
            raise ProtocolError(f"TCMU command entry of {length} bytes (at least 112)")
        iov_cnt, _, _, cdb_off = REQ.unpack_from(self._area, base + REQ_OFFSET)
        if IOV_OFFSET + iov_cnt * IOV.size > length:
            raise ProtocolError(f"TCMU command {cmd_id}: {iov_cnt} iovecs overflow its entry")
        if cmd_id in self._positions:
            raise ProtocolError(f"TCMU command id {cmd_id} is already outstanding")
        size = len(self._area)
        cdb_len = self._cdb_length(cdb_off, cmd_id)
        iovecs = []
        for i in range(iov_cnt):
            offset, iov_len = IOV.unpack_from(self._area, base + IOV_OFFSET + i * IOV.size)
            if offset + iov_len > size:
                raise ProtocolError(
                    f"TCMU command {cmd_id}: iovec [{offset}, +{iov_len}) outside the area"
                )
            iovecs.append(self._area[offset : offset + iov_len])
        cdb = bytes(self._area[cdb_off : cdb_off + cdb_len])
        return Command(cmd_id, cdb, tuple(iovecs))

    def _cdb_length(self, cdb_off: int, cmd_id: int) -> int:
        size = len(self._area)
        if cdb_off >= size:
            raise ProtocolError(f"TCMU command {cmd_id}: CDB offset {cdb_off} outside the area")
        opcode = self._area[cdb_off]
        if opcode == 0x7F and cdb_off + 8 <= size:  # variable-length CDB
            cdb_len = self._area[cdb_off + 7] + 8
        else:
            cdb_len = cdb_length(opcode)
        if cdb_off + cdb_len > size:
            raise ProtocolError(f"TCMU command {cmd_id}: CDB at {cdb_off} crosses the area's end")
        return cdb_len

    def _tmr(self, base: int, length: int) -> TaskManagement:
        if length < TMR_IDS_OFFSET:
            raise ProtocolError(f"TCMU TMR entry of {length} bytes (at least 32)")
        tmr_type, count = TMR.unpack_from(self._area, base + TMR_OFFSET)
        if TMR_IDS_OFFSET + 2 * count > length:
            raise ProtocolError(f"TCMU TMR entry: {count} command ids overflow its entry")
        ids = struct.unpack_from(f"<{count}H", self._area, base + TMR_IDS_OFFSET)
        return TaskManagement(tmr_type, ids)

    def complete(
        self, cmd_id: int, status: int, sense: Buffer = b"", read_len: int | None = None
    ) -> None:
        """Complete the fetched command ``cmd_id`` with SCSI ``status`` and ``sense`` (at
        most 96 bytes, written only when not empty). ``read_len``, when the kernel offers
        ``CAP_READ_LEN``, tells how many bytes of Data-In are valid. The caller then
        notifies the kernel (``write`` to the uio fd), once for a batch.

        Raises:
            StateError: ``cmd_id`` is not outstanding, or ``sense`` is too long.
            ProtocolError: the entries at ``cmd_tail`` break the layout.
        """
        self.complete_many(((cmd_id, status, sense, read_len),))

    def complete_many(self, done: Iterable[tuple[int, int, Buffer, int | None]]) -> None:
        """``complete`` each of ``done`` (``(cmd_id, status, sense, read_len)``), then
        advance ``cmd_tail`` once. The caller then notifies the kernel once.

        Raises:
            StateError: a ``cmd_id`` is not outstanding, or a ``sense`` is too long (the
                ones before it are completed).
            ProtocolError: the entries at ``cmd_tail`` break the layout.
        """
        first = self.cmd_tail  # entries before it are answered (until the tail moves)
        try:
            for cmd_id, status, sense, read_len in done:
                pos = self._positions.get(cmd_id)
                if pos is None:
                    raise StateError(f"TCMU command {cmd_id} is not outstanding")
                if len(sense) > TCMU_SENSE_BUFFERSIZE:
                    raise StateError(f"sense data of {len(sense)} bytes (at most 96)")
                del self._positions[cmd_id]
                first = self._first_command(first)
                moved = self._move(first, pos, cmd_id) if first != pos else None
                if moved is None:
                    self._respond(pos, cmd_id, status, sense, read_len)
                else:
                    self._respond(first, cmd_id, status, sense, read_len)
                    self._set_header(pos, moved, UFLAG_MOVED)
        finally:
            self._retire()

    def _set_header(self, pos: int, cmd_id: int, uflags: int) -> None:
        """Store ``cmd_id`` and ``uflags`` of the entry at ``pos`` at once (kflags kept)."""
        at = self.cmdr_off + pos + CMD_ID_OFFSET
        # cmd_id, kflags, uflags: one aligned 32-bit store, so that a crash never leaves
        # a new cmd_id with an old mark
        self._u32[at >> 2] = cmd_id | self._area[at + 2] << 16 | uflags << 24

    def _respond(
        self,
        pos: int,
        cmd_id: int,
        status: int,
        sense: Buffer = b"",
        read_len: int | None = None,
    ) -> None:
        """Write the response of ``cmd_id`` into the entry at ``pos``: marked LOST while
        it is being written, DONE once it is complete."""
        base = self.cmdr_off + pos
        self._set_header(pos, cmd_id, UFLAG_LOST)
        uflags = UFLAG_DONE
        if read_len is not None and self.flags & TCMU_MAILBOX_FLAG_CAP_READ_LEN:
            uflags |= TCMU_UFLAG_READ_LEN
        else:
            read_len = 0
        RSP.pack_into(self._area, base + RSP_OFFSET, status, read_len)
        if sense:
            start = base + SENSE_OFFSET
            self._area[start : start + len(sense)] = sense
            self._area[start + len(sense) : start + TCMU_SENSE_BUFFERSIZE] = bytes(
                TCMU_SENSE_BUFFERSIZE - len(sense)
            )
        self._area[base + UFLAGS_OFFSET] = uflags

    def _first_command(self, pos: int) -> int:
        """The position of the first CMD entry not answered yet at or after ``pos`` (at or
        after ``cmd_tail``, with only answered CMD entries and others before it)."""
        while True:
            if pos == self._next:
                raise ProtocolError("TCMU ring: no command entry left at cmd_tail")
            op, length, _ = self._header(pos)
            if (
                op == TCMU_OP_CMD
                and not self._area[self.cmdr_off + pos + UFLAGS_OFFSET] & UFLAG_DONE
            ):
                return pos
            pos = (pos + length) % self.cmdr_size

    def _move(self, src: int, dst: int, done: int) -> int | None:
        """Copy the request of the outstanding command at ``src`` (the first at
        ``cmd_tail``) into the entry at ``dst``, which the completed command ``done``
        leaves, if it fits there: counts, iovecs and CDB. Returns the moved command's id,
        or None when it does not fit. ``dst`` is left MOVING (see "Crashes")."""
        s, d = self.cmdr_off + src, self.cmdr_off + dst
        cmd_id = CMD_ID.unpack_from(self._area, s + CMD_ID_OFFSET)[0]
        iov_cnt, _, _, cdb_off = REQ.unpack_from(self._area, s + REQ_OFFSET)
        cdb_len = self._cdb_length(cdb_off, cmd_id)
        iov_bytes = iov_cnt * IOV.size
        _, length, _ = self._header(dst)
        if IOV_OFFSET + iov_bytes + cdb_len > length:
            return None
        self._set_header(dst, done, UFLAG_LOST)
        new_cdb = d + IOV_OFFSET + iov_bytes
        self._area[new_cdb : new_cdb + cdb_len] = bytes(self._area[cdb_off : cdb_off + cdb_len])
        self._area[d + IOV_OFFSET : d + IOV_OFFSET + iov_bytes] = bytes(
            self._area[s + IOV_OFFSET : s + IOV_OFFSET + iov_bytes]
        )
        REQ.pack_into(self._area, d + REQ_OFFSET, iov_cnt, 0, 0, new_cdb)
        MOVING_ID.pack_into(self._area, d + MOVING_ID_OFFSET, cmd_id)
        self._set_header(dst, done, UFLAG_MOVING)
        self._positions[cmd_id] = dst
        return int(cmd_id)

    def _retire(self) -> None:
        """Advance ``cmd_tail`` past the completed CMD entries and the PAD, TMR and
        unknown entries at its head, then clear their ``UFLAG_DONE`` (the kernel reads
        them only when notified, after this; a crash in between leaves a mark the kernel
        ignores, while a mark cleared before the tail moved would make a response look
        like a request)."""
        pos = start = self.cmd_tail
        passed = []
        while pos != self._next:
            op, length, _ = self._header(pos)
            flags_at = self.cmdr_off + pos + UFLAGS_OFFSET
            if op == TCMU_OP_CMD:
                if not self._area[flags_at] & UFLAG_DONE:
                    break
                passed.append(flags_at)
            pos = (pos + length) % self.cmdr_size
        if pos != start:
            self._words[CMD_TAIL_WORD] = pos
        for flags_at in passed:
            self._area[flags_at] &= ~UFLAG_DONE & 0xFF
