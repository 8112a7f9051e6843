"""SCSI block-device emulation (SBC-3 over SPC-4) for one logical unit, sans I/O.

Theory of operation
-------------------
``ScsiLun.execute`` takes one CDB and the command's data buffers and returns one of two
things:

* a ``Reply``: the command is answered without touching the volume (INQUIRY, READ
  CAPACITY, MODE SENSE, TEST UNIT READY, REQUEST SENSE, every refusal). ``data`` is the
  Data-In, already cut to the CDB's allocation length;
* an ``IoRequest``: read, write, flush, unmap, zero or write-same with byte offsets. The
  caller executes it on the volume (a read fills the command's buffers, a write takes them)
  and answers ``GOOD``, or ``io_error_reply`` when the volume raised ``IOFailure``.

Every field is checked before an ``IoRequest`` leaves: an LBA range beyond the capacity is
LBA OUT OF RANGE (21h), a reserved or unsupported field INVALID FIELD IN CDB (24h), a
malformed UNMAP parameter list PARAMETER LIST LENGTH ERROR (1Ah) or INVALID FIELD IN
PARAMETER LIST (26h), an opcode not listed below INVALID COMMAND OPERATION CODE (20h), all
as CHECK CONDITION with fixed-format sense (the caller never has to range-check).

Commands: TEST UNIT READY, REQUEST SENSE, INQUIRY (standard data and VPD pages 00h, 80h,
83h, B0h, B1h, B2h), READ CAPACITY (10) and (16), MODE SENSE (6) and (10) (caching and
control pages), READ and WRITE (6), (10), (16), SYNCHRONIZE CACHE (10) and (16), UNMAP and
WRITE SAME (10) and (16) (Linux sd zeroes ranges with WRITE SAME (10) unless REPORT
SUPPORTED OPERATION CODES, which is not emulated, lists WRITE SAME (16)). REPORT LUNS and
the reservation commands never reach a TCMU handler: LIO answers them itself.

The capacity is the volume's size in whole logical blocks, given to ``resize`` whenever it
may have changed. A change raises a unit attention, CAPACITY DATA HAS CHANGED (2Ah/09h),
reported once (SPC-4 5.14): on the next command other than INQUIRY and REQUEST SENSE as a
CHECK CONDITION, or as REQUEST SENSE's sense data; Linux sd rereads the capacity on it.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from storvisor.errors import InvalidArgument
from storvisor.protocols.scsi.sense import (
    CAPACITY_DATA_HAS_CHANGED,
    INVALID_COMMAND_OPERATION_CODE,
    INVALID_FIELD_IN_CDB,
    INVALID_FIELD_IN_PARAMETER_LIST,
    LBA_OUT_OF_RANGE,
    NO_SENSE,
    PARAMETER_LIST_LENGTH_ERROR,
    SAVING_PARAMETERS_NOT_SUPPORTED,
    WRITE_PROTECTED,
    Sense,
    Status,
    io_error_sense,
)

Buffer = bytes | bytearray | memoryview

# opcodes (SPC-4, SBC-3)
TEST_UNIT_READY = 0x00
REQUEST_SENSE = 0x03
READ_6 = 0x08
WRITE_6 = 0x0A
INQUIRY = 0x12
MODE_SENSE_6 = 0x1A
READ_CAPACITY_10 = 0x25
READ_10 = 0x28
WRITE_10 = 0x2A
SYNCHRONIZE_CACHE_10 = 0x35
WRITE_SAME_10 = 0x41
UNMAP = 0x42
MODE_SENSE_10 = 0x5A
READ_16 = 0x88
WRITE_16 = 0x8A
SYNCHRONIZE_CACHE_16 = 0x91
WRITE_SAME_16 = 0x93
SERVICE_ACTION_IN_16 = 0x9E
SAI_READ_CAPACITY_16 = 0x10

# VPD pages
VPD_SUPPORTED_PAGES = 0x00
VPD_UNIT_SERIAL_NUMBER = 0x80
VPD_DEVICE_IDENTIFICATION = 0x83
VPD_BLOCK_LIMITS = 0xB0
VPD_BLOCK_DEVICE_CHARACTERISTICS = 0xB1
VPD_LOGICAL_BLOCK_PROVISIONING = 0xB2
_VPD_PAGES = bytes([0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2])

# mode pages
MODE_PAGE_CACHING = 0x08
MODE_PAGE_CONTROL = 0x0A
MODE_PAGE_ALL = 0x3F

FUA = 0x08  # byte 1 of READ/WRITE (10) and (16)
LIO_OUI = 0x001405
"""The IEEE company id in the NAA designators, the one LIO's own backstores use."""

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class IoKind(enum.Enum):
    READ = "read"
    WRITE = "write"
    FLUSH = "flush"
    UNMAP = "unmap"
    """Free ``ranges``; they read as zeros afterwards (LBPRZ)."""
    ZERO = "zero"
    """Make ``[offset, offset+length)`` read as zeros; ``may_unmap`` lets it free space."""
    WRITE_SAME = "write_same"
    """Write ``pattern`` (one logical block) over ``[offset, offset+length)``."""


class IoRequest(NamedTuple):
    """What the caller must do on the volume; offsets and lengths are in bytes and lie
    within the capacity. READ fills and WRITE takes the first ``length`` bytes of the
    command's buffers. (A named tuple: one is made per READ or WRITE, and a tuple is made in
    a third of the time a frozen dataclass takes.)"""

    kind: IoKind
    offset: int = 0
    length: int = 0
    fua: bool = False
    may_unmap: bool = False
    ranges: tuple[tuple[int, int], ...] = ()
    pattern: bytes = b""

    @property
    def writing(self) -> bool:
        return self.kind is not IoKind.READ


@dataclass(frozen=True, slots=True)
class Reply:
    """The end of a command: its status, its sense data (fixed format, with CHECK
    CONDITION) and its Data-In."""

    status: Status
    sense: bytes = b""
    data: bytes = b""


GOOD = Reply(Status.GOOD)
BUSY = Reply(Status.BUSY)
"""For a request that failed in a way that retrying cures (a remote store that did not
answer): initiators retry BUSY commands."""


def check_condition(sense: Sense) -> Reply:
    return Reply(Status.CHECK_CONDITION, sense.fixed())


def io_error_reply(request: IoRequest, errno: int) -> Reply:
    """The reply to ``request`` after the volume raised ``IOFailure(errno)``."""
    return check_condition(io_error_sense(errno, writing=request.writing))


@dataclass(frozen=True, slots=True)
class LunIdentity:
    """What a LUN says about itself: T10 vendor (8 ASCII characters at most), product (16),
    revision (4), unit serial number (VPD 80h) and a 16-byte NAA 6 designator (VPD 83h).
    Linux builds ``/dev/disk/by-id`` names from the serial and the NAA designator, so both
    must stay the same across restarts: ``for_volume`` derives them from the volume's
    stable serial.

    Raises:
        InvalidArgument: a field is not printable ASCII or is too long, or ``naa`` is not
            16 bytes starting with NAA 6.
    """

    vendor: str
    product: str
    revision: str
    serial: str
    naa: bytes

    def __post_init__(self) -> None:
        for field, value, most in (
            ("vendor", self.vendor, 8),
            ("product", self.product, 16),
            ("revision", self.revision, 4),
            ("serial", self.serial, 252),
        ):
            if len(value) > most or not all(0x20 <= ord(c) < 0x7F for c in value):
                raise InvalidArgument(
                    f"SCSI {field} {value!r}: at most {most} printable ASCII characters"
                )
        if len(self.naa) != 16 or self.naa[0] >> 4 != 6:
            raise InvalidArgument("a NAA designator is 16 bytes of NAA 6 (IEEE registered)")

    @classmethod
    def for_volume(
        cls,
        serial: str,
        *,
        vendor: str = "STORVISR",
        product: str = "storvisor volume",
        revision: str = "0001",
    ) -> LunIdentity:
        """The identity of a volume with stable ``serial``: the serial itself and a NAA 6
        designator of LIO's company id and 100 bits of the serial's SHA-256.

        Raises:
            InvalidArgument: ``serial`` is empty or not printable ASCII.
        """
        if not serial:
            raise InvalidArgument("a SCSI LUN needs a non-empty serial")
        digest = int.from_bytes(hashlib.sha256(serial.encode()).digest()[:13], "big") >> 4
        naa = (0x6 << 124) | (LIO_OUI << 100) | digest
        return cls(vendor, product, revision, serial, naa.to_bytes(16, "big"))


@dataclass(frozen=True, slots=True)
class LunLimits:
    """Block limits (VPD B0h), in logical blocks. ``unmap_granularity`` is the allocation
    unit of the volume (its cluster), the optimal UNMAP granularity."""

    max_transfer: int = 2048
    max_unmap_lbas: int = 1 << 22
    max_unmap_descriptors: int = 256
    unmap_granularity: int = 1
    max_write_same: int = 1 << 22


class ScsiLun:
    """One emulated direct-access LUN over a volume of ``size`` bytes (see the module
    docstring). ``write_cache`` reports a volatile write cache (WCE), so that initiators
    send SYNCHRONIZE CACHE; without it every write is FUA. ``thin`` reports thin
    provisioning (VPD B2h); discards are reported to read as zeros either way.

    Raises:
        InvalidArgument: ``block_size`` is not 512 or 4096, or a limit is not positive.
    """

    def __init__(
        self,
        identity: LunIdentity,
        *,
        block_size: int,
        size: int,
        read_only: bool = False,
        write_cache: bool = True,
        thin: bool = True,
        limits: LunLimits | None = None,
    ) -> None:
        if block_size not in (512, 4096):
            raise InvalidArgument(f"SCSI block size {block_size} (512 or 4096)")
        self.limits = limits or LunLimits()
        if (
            min(
                self.limits.max_transfer,
                self.limits.max_unmap_lbas,
                self.limits.max_unmap_descriptors,
                self.limits.unmap_granularity,
                self.limits.max_write_same,
            )
            <= 0
        ):
            raise InvalidArgument(f"SCSI block limits must be positive: {self.limits}")
        self.identity = identity
        self.block_size = block_size
        self.read_only = read_only
        self.write_cache = write_cache
        self.thin = thin
        self.blocks = size // block_size
        self._attention: Sense | None = None
        self._commands: dict[int, Callable[[bytes, Sequence[Buffer]], Reply | IoRequest]] = {
            TEST_UNIT_READY: self._test_unit_ready,
            INQUIRY: self._inquiry,
            READ_CAPACITY_10: self._read_capacity_10,
            SERVICE_ACTION_IN_16: self._service_action_in,
            MODE_SENSE_6: self._mode_sense,
            MODE_SENSE_10: self._mode_sense,
            READ_6: self._read_write,
            READ_10: self._read_write,
            READ_16: self._read_write,
            WRITE_6: self._read_write,
            WRITE_10: self._read_write,
            WRITE_16: self._read_write,
            SYNCHRONIZE_CACHE_10: self._synchronize_cache,
            SYNCHRONIZE_CACHE_16: self._synchronize_cache,
            UNMAP: self._unmap,
            WRITE_SAME_10: self._write_same,
            WRITE_SAME_16: self._write_same,
        }

    def resize(self, size: int) -> None:
        """Take the volume's current ``size``; a changed capacity raises the unit attention
        CAPACITY DATA HAS CHANGED."""
        blocks = size // self.block_size
        if blocks != self.blocks:
            self.blocks = blocks
            self._attention = CAPACITY_DATA_HAS_CHANGED

    @property
    def unit_attention(self) -> Sense | None:
        """The unit attention still to be reported, if any."""
        return self._attention

    def execute(self, cdb: Buffer, data: Sequence[Buffer] = ()) -> Reply | IoRequest:
        """Answer ``cdb`` (see the module docstring); ``data`` are the command's buffers:
        Data-Out for writes and parameter lists, where a read's data will go."""
        cdb = bytes(cdb)
        if not cdb:
            return check_condition(INVALID_COMMAND_OPERATION_CODE)
        opcode = cdb[0]
        if opcode == REQUEST_SENSE:
            return self._request_sense(cdb)
        handler = self._commands.get(opcode)
        if handler is None:
            return check_condition(INVALID_COMMAND_OPERATION_CODE)
        cdb_length = _CDB_LENGTH.get(opcode, 6)
        if len(cdb) < cdb_length:
            return check_condition(INVALID_FIELD_IN_CDB)
        if self._attention is not None and opcode != INQUIRY:
            sense, self._attention = self._attention, None
            return check_condition(sense)
        if cdb[cdb_length - 1] & 0x03:  # CONTROL byte: NACA and the obsolete LINK are not supported
            return check_condition(INVALID_FIELD_IN_CDB)
        return handler(cdb, data)

    # ------------------------------------------------------------------ plain replies

    def _test_unit_ready(self, cdb: bytes, data: Sequence[Buffer]) -> Reply:
        return GOOD

    def _request_sense(self, cdb: bytes) -> Reply:
        if len(cdb) < 6 or cdb[1] & 0x01:  # DESC: descriptor format is not supported
            return check_condition(INVALID_FIELD_IN_CDB)
        sense, self._attention = (self._attention or NO_SENSE), None
        return Reply(Status.GOOD, data=sense.fixed()[: cdb[4]])

    def _inquiry(self, cdb: bytes, data: Sequence[Buffer]) -> Reply:
        evpd, page, allocation = cdb[1] & 0x01, cdb[2], _U16.unpack_from(cdb, 3)[0]
        if cdb[1] & 0xFE:  # CMDDT (obsolete) and reserved bits
            return check_condition(INVALID_FIELD_IN_CDB)
        if not evpd:
            if page:
                return check_condition(INVALID_FIELD_IN_CDB)
            body = self._standard_inquiry()
        else:
            vpd = self._vpd(page)
            if vpd is None:
                return check_condition(INVALID_FIELD_IN_CDB)
            body = bytes([0x00, page]) + _U16.pack(len(vpd)) + vpd
        return Reply(Status.GOOD, data=body[:allocation])

    def _standard_inquiry(self) -> bytes:
        ident = self.identity
        return (
            bytes(
                [
                    0x00,  # peripheral qualifier 0, direct-access block device
                    0x00,  # not removable
                    0x05,  # VERSION: SPC-3
                    0x12,  # HISUP, response data format 2
                    31,  # ADDITIONAL LENGTH: 36 bytes in all
                    0x00,
                    0x00,
                    0x02,  # CMDQUE
                ]
            )
            + ident.vendor.ljust(8).encode()
            + ident.product.ljust(16).encode()
            + ident.revision.ljust(4).encode()
        )

    def _vpd(self, page: int) -> bytes | None:
        limits = self.limits
        if page == VPD_SUPPORTED_PAGES:
            return _VPD_PAGES
        if page == VPD_UNIT_SERIAL_NUMBER:
            return self.identity.serial.encode()
        if page == VPD_DEVICE_IDENTIFICATION:
            naa = bytes([0x01, 0x03, 0x00, 16]) + self.identity.naa  # binary, LU, NAA
            t10 = (self.identity.vendor.ljust(8) + self.identity.serial).encode()
            vendor = bytes([0x02, 0x01, 0x00, len(t10)]) + t10  # ASCII, LU, T10 vendor id
            return naa + vendor
        if page == VPD_BLOCK_LIMITS:
            body = bytearray(0x3C)
            body[0] = 0x01  # WSNZ: a WRITE SAME of zero blocks is refused
            _U32.pack_into(body, 4, limits.max_transfer)
            _U32.pack_into(body, 16, limits.max_unmap_lbas)
            _U32.pack_into(body, 20, limits.max_unmap_descriptors)
            _U32.pack_into(body, 24, limits.unmap_granularity)
            _U32.pack_into(body, 28, 0x80000000)  # UGAVALID, alignment 0
            _U64.pack_into(body, 32, limits.max_write_same)
            return bytes(body)
        if page == VPD_BLOCK_DEVICE_CHARACTERISTICS:
            body = bytearray(0x3C)
            _U16.pack_into(body, 0, 1)  # MEDIUM ROTATION RATE: non-rotating
            return bytes(body)
        if page == VPD_LOGICAL_BLOCK_PROVISIONING:
            # LBPU, LBPWS, LBPWS10, LBPRZ; PROVISIONING TYPE thin (2) or resource
            # provisioned (1)
            flags = 0x80 | 0x40 | 0x20 | 0x04
            return bytes([0x00, flags, 0x02 if self.thin else 0x01, 0x00])
        return None

    def _read_capacity_10(self, cdb: bytes, data: Sequence[Buffer]) -> Reply:
        lba = _U32.unpack_from(cdb, 2)[0]
        if not cdb[8] & 0x01 and lba:  # without PMI the LBA field must be zero
            return check_condition(INVALID_FIELD_IN_CDB)
        last = min(max(self.blocks - 1, 0), 0xFFFFFFFF)
        return Reply(Status.GOOD, data=_U32.pack(last) + _U32.pack(self.block_size))

    def _service_action_in(self, cdb: bytes, data: Sequence[Buffer]) -> Reply:
        if cdb[1] & 0x1F != SAI_READ_CAPACITY_16:
            return check_condition(INVALID_FIELD_IN_CDB)
        allocation = _U32.unpack_from(cdb, 10)[0]
        body = bytearray(32)
        _U64.pack_into(body, 0, max(self.blocks - 1, 0))
        _U32.pack_into(body, 8, self.block_size)
        body[14] = 0x80 | 0x40  # LBPME, LBPRZ
        return Reply(Status.GOOD, data=bytes(body[:allocation]))

    def _mode_sense(self, cdb: bytes, data: Sequence[Buffer]) -> Reply:
        six = cdb[0] == MODE_SENSE_6
        control, page, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
        allocation = cdb[4] if six else _U16.unpack_from(cdb, 7)[0]
        if control == 3:  # saved values
            return check_condition(SAVING_PARAMETERS_NOT_SUPPORTED)
        if page == MODE_PAGE_ALL and subpage in (0x00, 0xFF):
            pages = self._mode_page(MODE_PAGE_CACHING, control) + self._mode_page(
                MODE_PAGE_CONTROL, control
            )
        elif page in (MODE_PAGE_CACHING, MODE_PAGE_CONTROL) and subpage == 0:
            pages = self._mode_page(page, control)
        else:
            return check_condition(INVALID_FIELD_IN_CDB)
        device_specific = (0x80 if self.read_only else 0x00) | 0x10  # WP, DPOFUA
        if six:
            header = bytes([len(pages) + 3, 0x00, device_specific, 0x00])
        else:
            header = _U16.pack(len(pages) + 6) + bytes([0x00, device_specific, 0, 0, 0, 0])
        return Reply(Status.GOOD, data=(header + pages)[:allocation])

    def _mode_page(self, page: int, control: int) -> bytes:
        changeable = control == 1  # nothing can be changed: an all-zero mask
        if page == MODE_PAGE_CACHING:
            body = bytearray(18)
            if self.write_cache and not changeable:
                body[0] = 0x04  # WCE
            return bytes([MODE_PAGE_CACHING, len(body)]) + body
        body = bytearray(10)
        if not changeable:
            body[1] = 0x10  # QUEUE ALGORITHM MODIFIER 1: unrestricted reordering
        return bytes([MODE_PAGE_CONTROL, len(body)]) + body

    # ------------------------------------------------------------------ I/O

    def _range_error(self, lba: int, blocks: int) -> Reply | None:
        """LBA OUT OF RANGE if ``[lba, lba+blocks)`` does not lie within the capacity."""
        if lba + blocks > self.blocks or (blocks == 0 and lba >= self.blocks):
            return check_condition(LBA_OUT_OF_RANGE)
        return None

    def _read_write(self, cdb: bytes, data: Sequence[Buffer]) -> Reply | IoRequest:
        opcode = cdb[0]
        writing = opcode in (WRITE_6, WRITE_10, WRITE_16)
        fua = False
        if opcode in (READ_6, WRITE_6):
            lba = ((cdb[1] & 0x1F) << 16) | _U16.unpack_from(cdb, 2)[0]
            blocks = cdb[4] or 256
        else:
            if cdb[1] & 0xE0:  # RDPROTECT/WRPROTECT: no protection information
                return check_condition(INVALID_FIELD_IN_CDB)
            fua = bool(cdb[1] & FUA)
            if opcode in (READ_10, WRITE_10):
                lba, blocks = _U32.unpack_from(cdb, 2)[0], _U16.unpack_from(cdb, 7)[0]
            else:
                lba, blocks = _U64.unpack_from(cdb, 2)[0], _U32.unpack_from(cdb, 10)[0]
        if writing and self.read_only:
            return check_condition(WRITE_PROTECTED)
        refused = self._range_error(lba, blocks)
        if refused is not None:
            return refused
        if blocks > self.limits.max_transfer:
            return check_condition(INVALID_FIELD_IN_CDB)
        length = blocks * self.block_size
        if length == 0:
            return GOOD
        if sum(map(len, data)) < length:  # buffers shorter than the transfer
            return check_condition(INVALID_FIELD_IN_CDB)
        kind = IoKind.WRITE if writing else IoKind.READ
        fua = writing and (fua or not self.write_cache)
        return IoRequest(kind, lba * self.block_size, length, fua)  # positional: faster

    def _synchronize_cache(self, cdb: bytes, data: Sequence[Buffer]) -> Reply | IoRequest:
        if cdb[0] == SYNCHRONIZE_CACHE_10:
            lba, blocks = _U32.unpack_from(cdb, 2)[0], _U16.unpack_from(cdb, 7)[0]
        else:
            lba, blocks = _U64.unpack_from(cdb, 2)[0], _U32.unpack_from(cdb, 10)[0]
        refused = self._range_error(lba, blocks)
        if refused is not None:
            return refused
        return IoRequest(IoKind.FLUSH)

    def _unmap(self, cdb: bytes, data: Sequence[Buffer]) -> Reply | IoRequest:
        if cdb[1] & 0x01:  # ANCHOR: anchored LBAs are not supported (ANC_SUP 0)
            return check_condition(INVALID_FIELD_IN_CDB)
        if self.read_only:
            return check_condition(WRITE_PROTECTED)
        length = _U16.unpack_from(cdb, 7)[0]
        if length == 0:  # SBC-3 5.28: "not an error"
            return GOOD
        params = b"".join(bytes(b) for b in data)[:length]
        if length < 8 or len(params) < length:
            return check_condition(PARAMETER_LIST_LENGTH_ERROR)
        descriptors = min(_U16.unpack_from(params, 2)[0], length - 8) // 16
        if descriptors > self.limits.max_unmap_descriptors:
            return check_condition(INVALID_FIELD_IN_PARAMETER_LIST)
        ranges = []
        total = 0
        for i in range(descriptors):
            lba, blocks = struct.unpack_from(">QI", params, 8 + 16 * i)
            refused = self._range_error(lba, blocks)
            if refused is not None:
                return refused
            total += blocks
            if blocks:
                ranges.append((lba * self.block_size, blocks * self.block_size))
        if total > self.limits.max_unmap_lbas:
            return check_condition(INVALID_FIELD_IN_PARAMETER_LIST)
        if not ranges:
            return GOOD
        return IoRequest(IoKind.UNMAP, ranges=tuple(ranges))

    def _write_same(self, cdb: bytes, data: Sequence[Buffer]) -> Reply | IoRequest:
        flags = cdb[1]
        if flags & 0xE0 or flags & 0x10 or flags & 0x06:  # WRPROTECT, ANCHOR, reserved
            return check_condition(INVALID_FIELD_IN_CDB)
        unmap, no_data = bool(flags & 0x08), bool(flags & 0x01)  # UNMAP, NDOB
        if cdb[0] == WRITE_SAME_10:
            lba, blocks = _U32.unpack_from(cdb, 2)[0], _U16.unpack_from(cdb, 7)[0]
        else:
            lba, blocks = _U64.unpack_from(cdb, 2)[0], _U32.unpack_from(cdb, 10)[0]
        if blocks == 0 or blocks > self.limits.max_write_same:  # WSNZ is set
            return check_condition(INVALID_FIELD_IN_CDB)
        if self.read_only:
            return check_condition(WRITE_PROTECTED)
        refused = self._range_error(lba, blocks)
        if refused is not None:
            return refused
        bs = self.block_size
        if no_data:
            block = bytes(bs)
        else:
            block = b"".join(bytes(b) for b in data)[:bs]
            if len(block) < bs:
                return check_condition(INVALID_FIELD_IN_CDB)
        offset, length = lba * bs, blocks * bs
        if block.count(0) == bs:
            return IoRequest(IoKind.ZERO, offset, length, may_unmap=unmap, fua=not self.write_cache)
        return IoRequest(IoKind.WRITE_SAME, offset, length, pattern=block, fua=not self.write_cache)


_CDB_LENGTH = {
    READ_10: 10,
    WRITE_10: 10,
    READ_CAPACITY_10: 10,
    SYNCHRONIZE_CACHE_10: 10,
    WRITE_SAME_10: 10,
    UNMAP: 10,
    MODE_SENSE_10: 10,
    READ_16: 16,
    WRITE_16: 16,
    SYNCHRONIZE_CACHE_16: 16,
    WRITE_SAME_16: 16,
    SERVICE_ACTION_IN_16: 16,
}
"""The shortest CDB each opcode needs (6 bytes for the others)."""
