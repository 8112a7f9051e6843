"""A stand-in for the kernel's ``target_core_user``, for tests of a TCMU handler on a host
without the module.

Theory of operation
-------------------
``TcmuKernel`` lays out a memfd exactly as ``target_core_user`` lays out the area of a uio
device: a 128-byte mailbox (version 2, ``cmdr_off`` 128), the command ring, then the data
area in 4 KiB blocks. It plays the kernel's part of the protocol:

* ``submit`` allocates data blocks (the lowest free ones, merged into one iovec per
  contiguous run, or with ``fragment`` one iovec per block in descending address order),
  copies the Data-Out in, writes a CMD entry at ``cmd_head`` the size the kernel makes it
  (``max(48 + 16 * iovecs, 112)`` plus the CDB, rounded up to 8), with a PAD entry first
  when it would not fit before the end of the ring, and advances ``cmd_head``;
  ``submit_tmr`` writes a TMR entry the same way;
* ``signal`` is ``uio_event_notify``: 4 bytes on the event channel;
* ``reset_ring`` is the ``action/reset_ring`` attribute: what is in flight completes with
  BUSY (or CHECK CONDITION) and the ring starts again at 0;
* ``wait`` collects completions as ``tcmu_handle_completions`` does when the handler
  ``write``s the uio fd (and only then): it walks from what it last reclaimed to the
  mailbox's ``cmd_tail``, skipping PAD and TMR entries, looks every CMD entry's ``cmd_id``
  up among the commands in flight (``RingBroken`` if it is not there, as the kernel then
  marks the ring broken), reads the status, ``read_len`` (when ``TCMU_UFLAG_READ_LEN`` is
  set) and sense, copies the Data-In out and frees the command's data blocks.

``TcmuBlockDevice`` plays the initiator on top (what sd does): a ``BlockDevice`` whose
every call is a SCSI command through the ring, so the block-device conformance suite runs
against the TCMU export.

The uio device exists as files under ``root``: ``sys/class/uio/uioN/name`` (``tcm-user/
<hba>/<name>/<dev_config>``) and ``maps/map0/size`` (in hex, as uio prints it), and an
empty ``dev/uioN``. A handler is given ``sysfs_root``, ``dev_root`` and ``open`` (its
``opener`` seam): ``open`` checks the path it is asked for and returns one end of a fresh
socket pair as the event fd (where the handler ``read``s and ``write``s 4 bytes) and a
duplicate of the memfd as the map fd. The ring survives a handler: a new ``open`` gets a
new event channel on the same memory, once no process holds the last one's event fd any
more (before that ``open`` fails with EBUSY, as the kernel lets one process at a time hold
the device open).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import select
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from storvisor.errors import IOFailure
from storvisor.testing.aligned_device import AlignedBlockDevice

MAILBOX_SIZE = 128
DATA_BLOCK = 4096
OP_PAD, OP_CMD, OP_TMR = 0, 1, 2
UFLAG_UNKNOWN_OP, UFLAG_READ_LEN = 0x1, 0x2
ALL_CAPS = 0xF  # OOOC, READ_LEN, TMR, KEEP_BUF: what kernel 6.1 offers


class RingBroken(AssertionError):
    """The handler left the ring in a state the kernel would reject."""


class RingFull(Exception):
    """No room in the command ring or the data area for the entry."""


@dataclass(frozen=True, slots=True)
class Completion:
    """What the kernel read back for one command."""

    status: int
    sense: bytes
    data: bytes
    """The Data-In, cut to ``read_len`` when the handler gave one."""
    read_len: int | None
    unknown_op: bool = False


@dataclass
class _InFlight:
    cdb: bytes
    iovecs: list[tuple[int, int]]
    blocks: list[int]
    data_in: int


def _round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def cdb_size(cdb: bytes) -> int:
    """``scsi_command_size``: the CDB length from its group code."""
    if cdb[0] == 0x7F:
        return cdb[7] + 8
    return (6, 10, 10, 12, 16, 12, 10, 10)[cdb[0] >> 5]


class TcmuKernel:
    """The kernel side of one TCMU device (see the module docstring)."""

    def __init__(
        self,
        root: Path,
        dev_config: str,
        *,
        name: str = "vol",
        hba: int = 0,
        minor: int = 0,
        ring_size: int = 64 << 10,
        data_size: int = 1 << 20,
        flags: int = ALL_CAPS,
    ) -> None:
        self.dev_config = dev_config
        self.uio = f"uio{minor}"
        self.cmdr_off = MAILBOX_SIZE
        self.cmdr_size = ring_size - MAILBOX_SIZE
        self.data_off = ring_size
        self.size = ring_size + data_size
        self._free = list(range(data_size // DATA_BLOCK))
        self._fd = os.memfd_create("tcmu-area", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, self.size)
        self._map = mmap.mmap(self._fd, self.size, mmap.MAP_SHARED)
        struct.pack_into("<HHIII", self._map, 0, 2, flags, self.cmdr_off, self.cmdr_size, 0)
        self._words = memoryview(self._map)[:MAILBOX_SIZE].cast("I")
        self._head = 0
        self._cleaned = 0
        self._next_id = 1
        self._inflight: dict[int, _InFlight] = {}
        self.completions: dict[int, Completion] = {}
        self._events: socket.socket | None = None
        self.sysfs_root = str(root / "sys")
        self.dev_root = str(root / "dev")
        uio = root / "sys" / "class" / "uio" / self.uio
        (uio / "maps" / "map0").mkdir(parents=True)
        (uio / "name").write_text(f"tcm-user/{hba}/{name}/{dev_config}\n")
        (uio / "maps" / "map0" / "size").write_text(f"0x{self.size:016x}\n")
        Path(self.dev_root).mkdir(exist_ok=True)
        (Path(self.dev_root) / self.uio).touch()

    # ------------------------------------------------------------------ the uio node

    def open(self, path: str) -> tuple[int, int]:
        """The handler's ``opener``: (event fd, map fd) for ``dev_root/uioN``."""
        if path != os.path.join(self.dev_root, self.uio):
            raise FileNotFoundError(2, "no such uio device", path)
        if self._events is not None:
            if self.held():
                raise OSError(errno.EBUSY, "the uio device is open", path)
            self._events.close()
        ours, theirs = socket.socketpair()
        self._events = ours
        ours.setblocking(False)
        return theirs.detach(), os.dup(self._fd)

    def held(self) -> bool:
        """Whether the last handler's event fd is still open somewhere (the kernel refuses
        another ``open`` meanwhile, EBUSY)."""
        assert self._events is not None
        poller = select.poll()
        poller.register(self._events, select.POLLRDHUP)
        return not poller.poll(0)

    def signal(self) -> None:
        """Tell the handler that new entries are in the ring."""
        assert self._events is not None, "no handler opened the device"
        with contextlib.suppress(BlockingIOError):  # a wake-up is pending anyway, as in uio
            self._events.send(b"\x01\x00\x00\x00")

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None
        self._words.release()
        self._map.close()
        os.close(self._fd)

    # ------------------------------------------------------------------ the mailbox

    @property
    def cmd_head(self) -> int:
        return int(self._words[3])  # one aligned load, as the handler writes it

    @property
    def cmd_tail(self) -> int:
        return int(self._words[16])

    @property
    def in_flight(self) -> set[int]:
        return set(self._inflight)

    # ------------------------------------------------------------------ queueing

    def _reserve(self, size: int) -> int:
        """Room for an entry of ``size`` at the head (a PAD first if needed): its offset."""
        used = (self._head - self._cleaned) % self.cmdr_size
        pad = self.cmdr_size - self._head if self._head + size > self.cmdr_size else 0
        if used + pad + size >= self.cmdr_size:
            raise RingFull(f"command ring full ({used} of {self.cmdr_size} bytes in use)")
        if pad:
            struct.pack_into("<IHBB", self._map, self.cmdr_off + self._head, pad | OP_PAD, 0, 0, 0)
            self._head = 0
        return self._head

    def _publish(self, size: int) -> None:
        self._head = (self._head + size) % self.cmdr_size
        self._words[3] = self._head  # one aligned store, as the kernel's UPDATE_HEAD

    def submit(
        self,
        cdb: bytes,
        data_out: bytes = b"",
        *,
        data_in: int = 0,
        fragment: bool = False,
        opcode: int = OP_CMD,
    ) -> int:
        """Queue a command (not signalled): Data-Out ``data_out`` or room for ``data_in``
        bytes of Data-In. Returns its cmd_id. ``opcode`` other than CMD writes an entry of
        an unknown kind instead."""
        length = max(len(data_out), data_in)
        count = -(-length // DATA_BLOCK)
        if count > len(self._free):
            raise RingFull("data area full")
        self._free.sort()
        blocks, self._free = self._free[:count], self._free[count:]
        if fragment:
            blocks.reverse()
        iovecs: list[tuple[int, int]] = []
        left = length
        for block in blocks:
            n = min(DATA_BLOCK, left)
            left -= n
            offset = self.data_off + block * DATA_BLOCK
            if iovecs and not fragment and iovecs[-1][0] + iovecs[-1][1] == offset:
                iovecs[-1] = (iovecs[-1][0], iovecs[-1][1] + n)
            else:
                iovecs.append((offset, n))
        pos = 0
        for offset, n in iovecs:
            chunk = data_out[pos : pos + n]
            self._map[offset : offset + len(chunk)] = chunk
            pos += n
        clen = cdb_size(cdb)
        base = max(48 + 16 * len(iovecs), 112)
        size = _round_up(base + clen, 8)
        try:
            head = self._reserve(size)
        except RingFull:
            self._free.extend(blocks)
            raise
        cmd_id = self._take_id()
        self.completions.pop(cmd_id, None)  # the id of a command long completed, reused
        entry = self.cmdr_off + head
        self._map[entry : entry + size] = bytes(size)
        struct.pack_into("<IHBB", self._map, entry, size | opcode, cmd_id, 0, 0)
        struct.pack_into("<IIIIQ", self._map, entry + 8, len(iovecs), 0, 0, 0, entry + base)
        for i, (offset, n) in enumerate(iovecs):
            struct.pack_into("<QQ", self._map, entry + 48 + 16 * i, offset, n)
        self._map[entry + base : entry + base + clen] = cdb[:clen].ljust(clen, b"\0")
        self._inflight[cmd_id] = _InFlight(cdb, iovecs, blocks, data_in)
        self._publish(size)
        return cmd_id

    def submit_tmr(self, tmr_type: int, cmd_ids: list[int]) -> None:
        """Queue a TMR notification for ``cmd_ids`` (not signalled)."""
        size = _round_up(32 + 2 * len(cmd_ids), 8)
        head = self._reserve(size)
        entry = self.cmdr_off + head
        self._map[entry : entry + size] = bytes(size)
        struct.pack_into("<IHBB", self._map, entry, size | OP_TMR, 0, 0, 0)
        self._map[entry + 8] = tmr_type  # u8 tmr_type @8, u8 + u16 padding, u32 cmd_cnt @12
        struct.pack_into("<I", self._map, entry + 12, len(cmd_ids))
        struct.pack_into(f"<{len(cmd_ids)}H", self._map, entry + 32, *cmd_ids)
        self._publish(size)

    def _take_id(self) -> int:
        while self._next_id in self._inflight or self._next_id == 0:
            self._next_id = (self._next_id + 1) & 0xFFFF
        cmd_id = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFF
        return cmd_id

    # ------------------------------------------------------------------ completions

    def reap(self) -> list[int]:
        """Collect what the handler completed since the last call (in ring order)."""
        done = []
        steps = 0
        while self._cleaned != self.cmd_tail:
            steps += 1
            if steps > self.cmdr_size // 8:
                raise RingBroken(f"cmd_tail {self.cmd_tail} is not on an entry boundary")
            entry = self.cmdr_off + self._cleaned
            len_op, cmd_id, _, uflags = struct.unpack_from("<IHBB", self._map, entry)
            op, size = len_op & 7, len_op & ~7
            if size == 0:
                raise RingBroken(f"entry of length 0 at {self._cleaned}")
            self._cleaned = (self._cleaned + size) % self.cmdr_size
            if op in (OP_PAD, OP_TMR):
                continue
            cmd = self._inflight.pop(cmd_id, None)
            if cmd is None:
                raise RingBroken(f"cmd_id {cmd_id} not found, ring is broken")
            status = self._map[entry + 8]  # rsp.scsi_status @8, rsp.read_len @12
            read_len = struct.unpack_from("<I", self._map, entry + 12)[0]
            sense = bytes(self._map[entry + 16 : entry + 16 + 96]) if status == 2 else b""
            has_len = bool(uflags & UFLAG_READ_LEN)
            wanted = min(cmd.data_in, read_len) if has_len else cmd.data_in
            data = bytearray()
            for offset, n in cmd.iovecs:
                take = min(n, wanted - len(data))
                if take <= 0:
                    break
                data += self._map[offset : offset + take]
            self._free.extend(cmd.blocks)
            self.completions[cmd_id] = Completion(
                status,
                sense,
                bytes(data),
                read_len if has_len else None,
                bool(uflags & UFLAG_UNKNOWN_OP),
            )
            done.append(cmd_id)
        return done

    def reset_ring(self, level: int = 1) -> list[int]:
        """``action/reset_ring`` (``tcmu_reset_ring``): every command in flight completes
        with BUSY (``level`` 1: the initiator retries) or CHECK CONDITION (2) without
        reading the ring, its data blocks are freed, and ``cmd_head``, ``cmd_tail`` and
        the reclaim point go back to 0. Returns the ids completed so."""
        if level not in (1, 2):
            raise ValueError(f"reset_ring takes 1 or 2, not {level}")
        status = 0x08 if level == 1 else 0x02
        done = sorted(self._inflight)
        for cmd_id in done:
            cmd = self._inflight.pop(cmd_id)
            self._free.extend(cmd.blocks)
            self.completions[cmd_id] = Completion(status, b"", b"", None)
        self._head = self._cleaned = 0
        self._words[3] = 0
        self._words[16] = 0
        return done

    def wait(self, cmd_ids: list[int], timeout: float = 10.0) -> list[Completion]:
        """Wait for the handler's notifications until every one of ``cmd_ids`` completed.
        A handler that goes away (its event channel ends) leaves the ring as it is, to the
        handler that opens the device next, as the kernel does.

        Raises:
            TimeoutError: one did not complete within ``timeout`` seconds.
        """
        assert self._events is not None, "no handler opened the device"
        deadline = time.monotonic() + timeout
        while True:
            missing = [i for i in cmd_ids if i not in self.completions]
            if not missing:
                return [self.completions[i] for i in cmd_ids]
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"commands {missing} not completed within {timeout} s")
            events = self._events
            ready, _, _ = select.select([events], [], [], left)
            if ready:
                try:
                    got = events.recv(4096)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    got = b""
                if not got:  # the handler is gone: the ring waits for the next one
                    while self._events is events and time.monotonic() < deadline:
                        time.sleep(0.01)
                    continue
                self.reap()  # like tcmu_irqcontrol: only when the handler writes

    def command(
        self, cdb: bytes, data_out: bytes = b"", *, data_in: int = 0, timeout: float = 10.0
    ) -> Completion:
        """Submit one command, signal, and wait for its completion."""
        cmd_id = self.submit(cdb, data_out, data_in=data_in)
        self.signal()
        return self.wait([cmd_id], timeout)[0]


class TcmuBlockDevice(AlignedBlockDevice):
    """A ``BlockDevice`` whose every call is a SCSI command through ``kernel``'s ring (READ
    and WRITE (16), SYNCHRONIZE CACHE (16), UNMAP, WRITE SAME (16)), as an initiator would
    send them; the size and block size come from READ CAPACITY (16).

    Byte ranges are widened to whole blocks and transfers cut to ``max_request`` bytes
    (``AlignedBlockDevice``, whose lock also serialises the commands). ``block_status`` is
    not asked (GET LBA STATUS is not emulated): one allocated extent.
    Errors: range errors as the contract says; a CHECK CONDITION as ``IOFailure`` (ENOSPC
    for SPACE ALLOCATION FAILED, EIO otherwise). ``on_close`` runs at ``close``.
    """

    def __init__(
        self,
        kernel: TcmuKernel,
        *,
        max_request: int = 256 << 10,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(max_request=max_request, on_close=on_close)
        self.kernel = kernel
        capacity = self._command(
            bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + bytes(2), data_in=32
        )
        last, block_size = struct.unpack_from(">QI", capacity)
        self._block_size: int = block_size
        self._size: int = (last + 1) * block_size

    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return False

    @property
    def block_size(self) -> int:
        return self._block_size

    def _command(self, cdb: bytes, data_out: bytes = b"", *, data_in: int = 0) -> bytes:
        done = self.kernel.command(cdb, data_out, data_in=data_in)
        if done.status != 0:
            key, asc, ascq = done.sense[2] & 0x0F, done.sense[12], done.sense[13]
            code = errno.ENOSPC if (key, asc, ascq) == (0x7, 0x27, 0x07) else errno.EIO
            raise IOFailure(
                f"SCSI command {cdb[0]:#04x}: status {done.status:#x}, sense "
                f"{key:x}/{asc:02x}/{ascq:02x}",
                code,
            )
        return done.data

    def _read_request(self, offset: int, length: int) -> bytes:
        bs = self._block_size
        return self._command(
            struct.pack(">BBQIBB", 0x88, 0, offset // bs, length // bs, 0, 0), data_in=length
        )

    def _write_request(self, offset: int, data: bytes, fua: bool) -> None:
        bs = self._block_size
        flags = 0x08 if fua else 0
        cdb = struct.pack(">BBQIBB", 0x8A, flags, offset // bs, len(data) // bs, 0, 0)
        self._command(cdb, data)

    def _flush_request(self) -> None:
        self._command(bytes([0x91]) + bytes(15))

    def _zero_request(self, offset: int, length: int, *, unmap: bool, discard: bool) -> None:
        bs = self._block_size
        if discard:
            descriptor = struct.pack(">QIxxxx", offset // bs, length // bs)
            params = struct.pack(">HHxxxx", 22, 16) + descriptor
            self._command(struct.pack(">BBxxxxxHB", 0x42, 0, len(params), 0), params)
        else:
            flags = 0x08 if unmap else 0
            cdb = struct.pack(">BBQIBB", 0x93, flags, offset // bs, length // bs, 0, 0)
            self._command(cdb, bytes(bs))

    def close(self) -> None:
        if self._on_close is not None:
            self._on_close()
