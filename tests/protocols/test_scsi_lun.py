"""The SBC emulation of one LUN: every command, its data, its sense, its boundaries. CDBs and
expected bytes are written out here from SPC-4/SBC-3, not taken from the module."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storvisor.errors import InvalidArgument
from storvisor.protocols.scsi import (
    IoKind,
    IoRequest,
    LunIdentity,
    LunLimits,
    Reply,
    ScsiLun,
    Status,
    io_error_reply,
)

MiB = 1 << 20
SIZE = 64 * MiB
IDENTITY = LunIdentity.for_volume("0123456789abcdef0123")


def lun(
    *,
    block_size: int = 512,
    size: int = SIZE,
    read_only: bool = False,
    write_cache: bool = True,
    thin: bool = True,
    limits: LunLimits | None = None,
) -> ScsiLun:
    return ScsiLun(
        IDENTITY,
        block_size=block_size,
        size=size,
        read_only=read_only,
        write_cache=write_cache,
        thin=thin,
        limits=limits,
    )


def sense(key: int, asc: int, ascq: int = 0) -> bytes:
    """Fixed-format sense: 70h, key at byte 2, additional length 0Ah, ASC/ASCQ at 12/13."""
    data = bytearray(18)
    data[0], data[2], data[7], data[12], data[13] = 0x70, key, 0x0A, asc, ascq
    return bytes(data)


INVALID_OPCODE = sense(0x5, 0x20)
INVALID_FIELD = sense(0x5, 0x24)
INVALID_PARAMETER = sense(0x5, 0x26)
LIST_LENGTH = sense(0x5, 0x1A)
OUT_OF_RANGE = sense(0x5, 0x21)
WRITE_PROTECT = sense(0x7, 0x27)
CAPACITY_CHANGED = sense(0x6, 0x2A, 0x09)


def refused(result: Reply | IoRequest, expected: bytes) -> None:
    assert isinstance(result, Reply), result
    assert (result.status, result.sense, result.data) == (Status.CHECK_CONDITION, expected, b"")


def good(result: Reply | IoRequest) -> bytes:
    assert isinstance(result, Reply), result
    assert (result.status, result.sense) == (Status.GOOD, b"")
    return result.data


def io(result: Reply | IoRequest) -> IoRequest:
    assert isinstance(result, IoRequest), result
    return result


def rw10(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", op, flags, lba, 0, blocks, 0)


def rw16(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", op, flags, lba, blocks, 0, 0)


def buf(n: int) -> list[memoryview]:
    return [memoryview(bytearray(n))]


def inquiry(evpd: int = 0, page: int = 0, alloc: int = 255) -> bytes:
    return struct.pack(">BBBHB", 0x12, evpd, page, alloc, 0)


# ---------------------------------------------------------------------- simple commands


def test_test_unit_ready_and_unknown_opcodes() -> None:
    unit = lun()
    assert good(unit.execute(bytes(6))) == b""
    for opcode in (0xA3, 0x4D, 0x1E, 0x55, 0xFF, 0x2F, 0x15, 0x1B):
        refused(unit.execute(bytes([opcode]) + bytes(15)), INVALID_OPCODE)
    refused(unit.execute(b""), INVALID_OPCODE)
    assert INVALID_OPCODE[:3] == bytes([0x70, 0x00, 0x05]) and INVALID_OPCODE[12] == 0x20


def test_request_sense_without_a_pending_condition() -> None:
    unit = lun()
    assert good(unit.execute(bytes([0x03, 0, 0, 0, 252, 0]))) == sense(0, 0)
    assert good(unit.execute(bytes([0x03, 0, 0, 0, 8, 0]))) == sense(0, 0)[:8]
    refused(unit.execute(bytes([0x03, 1, 0, 0, 252, 0])), INVALID_FIELD)  # DESC


def test_control_byte_naca_is_refused() -> None:
    refused(lun().execute(bytes([0, 0, 0, 0, 0, 0x04 | 0x01])), INVALID_FIELD)


def test_short_cdb_is_refused() -> None:
    refused(lun().execute(bytes([0x28, 0, 0, 0])), INVALID_FIELD)


# ---------------------------------------------------------------------- INQUIRY


def test_standard_inquiry() -> None:
    data = good(lun().execute(inquiry()))
    assert len(data) == 36
    assert data[0] == 0x00  # connected direct-access device
    assert data[2] == 0x05  # SPC-3
    assert data[3] & 0x0F == 2  # response data format
    assert data[4] == 31
    assert data[7] & 0x02  # CMDQUE
    assert data[8:16] == b"STORVISR"
    assert data[16:32] == b"storvisor volume"
    assert data[32:36] == b"0001"
    assert good(lun().execute(inquiry(alloc=5))) == data[:5]
    assert good(lun().execute(inquiry(alloc=0))) == b""


def test_inquiry_invalid_fields() -> None:
    unit = lun()
    refused(unit.execute(inquiry(page=0x80)), INVALID_FIELD)  # a page without EVPD
    refused(unit.execute(inquiry(evpd=2)), INVALID_FIELD)  # CMDDT
    refused(unit.execute(inquiry(evpd=1, page=0x86)), INVALID_FIELD)
    refused(unit.execute(inquiry(evpd=1, page=0xB3)), INVALID_FIELD)


def vpd(page: int, unit: ScsiLun | None = None) -> bytes:
    data = good((unit or lun()).execute(inquiry(1, page, 0xFFFF)))
    assert data[0] == 0x00 and data[1] == page
    assert struct.unpack_from(">H", data, 2)[0] == len(data) - 4
    return data[4:]


def test_vpd_supported_pages() -> None:
    assert vpd(0x00) == bytes([0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2])


def test_vpd_unit_serial_number() -> None:
    assert vpd(0x80) == b"0123456789abcdef0123"


def test_vpd_device_identification() -> None:
    body = vpd(0x83)
    designators = []
    pos = 0
    while pos < len(body):
        code_set, kind, length = body[pos] & 0x0F, body[pos + 1], body[pos + 3]
        designators.append((code_set, kind, body[pos + 4 : pos + 4 + length]))
        pos += 4 + length
    assert pos == len(body)
    (naa_set, naa_kind, naa), (t10_set, t10_kind, t10) = designators
    assert (naa_set, naa_kind & 0x3F) == (1, 0x03)  # binary; LU association; NAA
    assert len(naa) == 16 and naa[0] >> 4 == 6  # NAA IEEE Registered Extended
    assert (int.from_bytes(naa[:4], "big") >> 4) & 0xFFFFFF == 0x001405
    assert naa == IDENTITY.naa
    assert (t10_set, t10_kind & 0x3F) == (2, 0x01)  # ASCII; LU association; T10 vendor
    assert t10 == b"STORVISR0123456789abcdef0123"


def test_identity_is_stable_and_distinct() -> None:
    a = LunIdentity.for_volume("serial-a")
    assert a == LunIdentity.for_volume("serial-a")  # across restarts
    assert a.naa != LunIdentity.for_volume("serial-b").naa
    assert a.naa.hex() == LunIdentity.for_volume("serial-a").naa.hex()
    with pytest.raises(InvalidArgument):
        LunIdentity.for_volume("")
    with pytest.raises(InvalidArgument):
        LunIdentity("TOOLONGVENDOR", "p", "1", "s", a.naa)
    with pytest.raises(InvalidArgument):
        LunIdentity("v", "p", "1", "caf\u00e9", a.naa)
    with pytest.raises(InvalidArgument):
        LunIdentity("v", "p", "1", "s", bytes(16))


def test_vpd_block_limits() -> None:
    limits = LunLimits(
        max_transfer=1024,
        max_unmap_lbas=8192,
        max_unmap_descriptors=16,
        unmap_granularity=128,
        max_write_same=4096,
    )
    body = vpd(0xB0, lun(limits=limits))
    assert len(body) == 0x3C
    page = bytes(4) + body  # offsets as SBC-3 numbers them
    assert page[4] & 0x01  # WSNZ
    assert struct.unpack_from(">I", page, 8)[0] == 1024  # MAXIMUM TRANSFER LENGTH
    assert struct.unpack_from(">I", page, 20)[0] == 8192  # MAXIMUM UNMAP LBA COUNT
    assert struct.unpack_from(">I", page, 24)[0] == 16  # MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT
    assert struct.unpack_from(">I", page, 28)[0] == 128  # OPTIMAL UNMAP GRANULARITY
    assert struct.unpack_from(">I", page, 32)[0] == 0x80000000  # UGAVALID, alignment 0
    assert struct.unpack_from(">Q", page, 36)[0] == 4096  # MAXIMUM WRITE SAME LENGTH


def test_vpd_block_device_characteristics() -> None:
    body = vpd(0xB1)
    assert len(body) == 0x3C
    assert struct.unpack_from(">H", body, 0)[0] == 1  # non-rotating medium


def test_vpd_logical_block_provisioning() -> None:
    body = vpd(0xB2)
    assert len(body) == 4
    assert body[1] == 0x80 | 0x40 | 0x20 | 0x04  # LBPU, LBPWS, LBPWS10, LBPRZ
    assert body[2] & 0x07 == 2  # thin provisioned
    assert vpd(0xB2, lun(thin=False))[2] & 0x07 == 1


# ---------------------------------------------------------------------- READ CAPACITY


def test_read_capacity_10_and_16() -> None:
    unit = lun()
    data = good(unit.execute(bytes([0x25]) + bytes(9)))
    assert struct.unpack(">II", data) == (SIZE // 512 - 1, 512)
    rc16 = bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + bytes(2)
    data = good(unit.execute(rc16))
    assert len(data) == 32
    assert struct.unpack_from(">QI", data) == (SIZE // 512 - 1, 512)
    assert data[14] & 0xC0 == 0xC0  # LBPME, LBPRZ
    assert data[13] & 0x0F == 0
    short = bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 12) + bytes(2)
    assert good(unit.execute(short)) == data[:12]


def test_read_capacity_4096_and_huge() -> None:
    unit = lun(block_size=4096, size=(1 << 45) + 4096 + 100)  # 32 TiB: beyond READ CAPACITY(10)
    data = good(unit.execute(bytes([0x25]) + bytes(9)))
    assert struct.unpack(">II", data) == (0xFFFFFFFF, 4096)
    rc16 = bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + bytes(2)
    assert struct.unpack_from(">QI", good(unit.execute(rc16))) == ((1 << 33), 4096)


def test_read_capacity_invalid_fields() -> None:
    unit = lun()
    refused(unit.execute(bytes([0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0])), INVALID_FIELD)  # LBA, no PMI
    refused(unit.execute(bytes([0x9E, 0x12]) + bytes(14)), INVALID_FIELD)  # GET LBA STATUS


def test_block_size_must_be_512_or_4096() -> None:
    with pytest.raises(InvalidArgument):
        lun(block_size=1024)
    with pytest.raises(InvalidArgument):
        lun(limits=LunLimits(max_transfer=0))


# ---------------------------------------------------------------------- MODE SENSE


def mode_sense6(page: int, pc: int = 0, subpage: int = 0, alloc: int = 255) -> bytes:
    return bytes([0x1A, 0x08, pc << 6 | page, subpage, alloc, 0])


def mode_sense10(page: int, pc: int = 0, subpage: int = 0, alloc: int = 0xFFFF) -> bytes:
    return struct.pack(">BBBBxxxHB", 0x5A, 0x08, pc << 6 | page, subpage, alloc, 0)


def pages_of(data: bytes, header: int) -> dict[int, bytes]:
    pages = {}
    pos = header
    while pos < len(data):
        pages[data[pos] & 0x3F] = data[pos + 2 : pos + 2 + data[pos + 1]]
        pos += 2 + data[pos + 1]
    assert pos == len(data)
    return pages


def test_mode_sense_caching_page() -> None:
    data = good(lun().execute(mode_sense6(0x08)))
    assert data[0] == len(data) - 1
    assert data[2] & 0x10  # DPOFUA
    assert not data[2] & 0x80  # not write protected
    assert data[3] == 0  # no block descriptors
    caching = pages_of(data, 4)[0x08]
    assert len(caching) == 0x12
    assert caching[0] & 0x04  # WCE
    no_cache = pages_of(good(lun(write_cache=False).execute(mode_sense6(0x08))), 4)[0x08]
    assert not no_cache[0] & 0x04
    changeable = pages_of(good(lun().execute(mode_sense6(0x08, pc=1))), 4)[0x08]
    assert changeable == bytes(0x12)


def test_mode_sense_10_all_pages() -> None:
    data = good(lun(read_only=True).execute(mode_sense10(0x3F)))
    assert struct.unpack_from(">H", data)[0] == len(data) - 2
    assert data[3] & 0x80  # WP
    assert struct.unpack_from(">H", data, 6)[0] == 0
    pages = pages_of(data, 8)
    assert set(pages) == {0x08, 0x0A}
    assert pages[0x08][0] & 0x04
    assert good(lun().execute(mode_sense10(0x3F, subpage=0xFF)))
    assert len(good(lun().execute(mode_sense10(0x3F, alloc=6)))) == 6


def test_mode_sense_refusals() -> None:
    unit = lun()
    refused(unit.execute(mode_sense6(0x08, pc=3)), sense(0x5, 0x39))  # saved values
    refused(unit.execute(mode_sense6(0x1C)), INVALID_FIELD)
    refused(unit.execute(mode_sense6(0x08, subpage=1)), INVALID_FIELD)
    refused(unit.execute(bytes([0x15, 0x10, 0, 0, 24, 0])), INVALID_OPCODE)  # MODE SELECT


# ---------------------------------------------------------------------- READ and WRITE

BLOCKS = SIZE // 512


@pytest.mark.parametrize(
    ("cdb", "kind", "offset", "length", "fua"),
    [
        (bytes([0x08, 0x01, 0x02, 0x03, 4, 0]), IoKind.READ, 0x10203 * 512, 4 * 512, False),
        (bytes([0x0A, 0, 0, 8, 0, 0]), IoKind.WRITE, 8 * 512, 256 * 512, False),  # 0 = 256
        (rw10(0x28, 100, 8), IoKind.READ, 100 * 512, 8 * 512, False),
        (rw10(0x2A, 100, 8, 0x08), IoKind.WRITE, 100 * 512, 8 * 512, True),
        (rw10(0x28, 100, 8, 0x08), IoKind.READ, 100 * 512, 8 * 512, False),  # FUA on a read
        (rw16(0x88, BLOCKS - 8, 8), IoKind.READ, (BLOCKS - 8) * 512, 8 * 512, False),
        (rw16(0x8A, 0, 1, 0x08), IoKind.WRITE, 0, 512, True),
        (rw16(0x8A, 0, 1, 0x10), IoKind.WRITE, 0, 512, False),  # DPO is ignored
    ],
)
def test_read_write_requests(cdb: bytes, kind: IoKind, offset: int, length: int, fua: bool) -> None:
    request = io(lun().execute(cdb, buf(256 * 512)))
    assert (request.kind, request.offset, request.length, request.fua) == (
        kind,
        offset,
        length,
        fua,
    )


def test_writes_are_fua_without_a_write_cache() -> None:
    assert io(lun(write_cache=False).execute(rw10(0x2A, 0, 1), buf(512))).fua


def test_4096_byte_blocks() -> None:
    unit = lun(block_size=4096)
    request = io(unit.execute(rw10(0x28, 3, 2), buf(8192)))
    assert (request.offset, request.length) == (3 * 4096, 8192)
    refused(unit.execute(rw10(0x28, SIZE // 4096 - 1, 2), buf(8192)), OUT_OF_RANGE)


@pytest.mark.parametrize(
    "cdb",
    [
        rw10(0x28, BLOCKS - 7, 8),
        rw10(0x2A, BLOCKS, 1),
        rw16(0x88, BLOCKS, 0),  # beyond the last LBA even for zero blocks
        rw16(0x8A, (1 << 64) - 1, 2),
        rw16(0x88, 1 << 40, 1),
        bytes([0x08, 0x1F, 0xFF, 0xFF, 1, 0]),
    ],
)
def test_lba_out_of_range(cdb: bytes) -> None:
    unit = lun(size=BLOCKS * 512 if cdb[0] != 0x08 else 1 * MiB)
    refused(unit.execute(cdb, buf(4096)), OUT_OF_RANGE)


def test_range_boundaries() -> None:
    unit = lun()
    assert io(unit.execute(rw10(0x28, BLOCKS - 8, 8), buf(4096))).offset == (BLOCKS - 8) * 512
    assert good(unit.execute(rw10(0x28, BLOCKS - 1, 0))) == b""  # zero blocks: nothing to do


def test_transfer_limits_and_short_buffers() -> None:
    unit = lun(limits=LunLimits(max_transfer=16))
    assert io(unit.execute(rw10(0x28, 0, 16), buf(8192)))
    refused(unit.execute(rw10(0x28, 0, 17), buf(17 * 512)), INVALID_FIELD)
    refused(unit.execute(rw10(0x2A, 0, 8), buf(4095)), INVALID_FIELD)
    assert io(unit.execute(rw10(0x2A, 0, 8), [memoryview(bytearray(2048))] * 2))


def test_protection_fields_are_refused() -> None:
    refused(lun().execute(rw10(0x28, 0, 1, 0x20), buf(512)), INVALID_FIELD)  # RDPROTECT
    refused(lun().execute(rw16(0x8A, 0, 1, 0x40), buf(512)), INVALID_FIELD)  # WRPROTECT


def test_read_only_refuses_writes() -> None:
    unit = lun(read_only=True)
    assert io(unit.execute(rw10(0x28, 0, 1), buf(512))).kind is IoKind.READ
    refused(unit.execute(rw10(0x2A, 0, 1), buf(512)), WRITE_PROTECT)
    refused(unit.execute(bytes([0x0A, 0, 0, 0, 1, 0]), buf(512)), WRITE_PROTECT)


# ---------------------------------------------------------------------- SYNCHRONIZE CACHE


def test_synchronize_cache() -> None:
    unit = lun()
    assert io(unit.execute(rw10(0x35, 0, 0))).kind is IoKind.FLUSH
    assert io(unit.execute(rw16(0x91, 10, 10))).kind is IoKind.FLUSH
    refused(unit.execute(rw10(0x35, BLOCKS, 1)), OUT_OF_RANGE)
    refused(unit.execute(rw16(0x91, BLOCKS - 1, 2)), OUT_OF_RANGE)


# ---------------------------------------------------------------------- UNMAP


def unmap_cdb(length: int, anchor: int = 0) -> bytes:
    return struct.pack(">BBxxxxxHB", 0x42, anchor, length, 0)


def unmap_list(*descriptors: tuple[int, int], desc_len: int | None = None) -> bytes:
    body = b"".join(struct.pack(">QIxxxx", lba, n) for lba, n in descriptors)
    length = len(body) if desc_len is None else desc_len
    return struct.pack(">HHxxxx", length + 6, length) + body


def test_unmap_ranges() -> None:
    params = unmap_list((0, 128), (1000, 8), (2000, 0))
    request = io(lun().execute(unmap_cdb(len(params)), [memoryview(params)]))
    assert request.kind is IoKind.UNMAP
    assert request.ranges == ((0, 128 * 512), (1000 * 512, 8 * 512))


def test_unmap_split_parameter_buffers() -> None:
    params = unmap_list((8, 8))
    views = [memoryview(params[:5]), memoryview(params[5:])]
    assert io(lun().execute(unmap_cdb(len(params)), views)).ranges == ((4096, 4096),)


def test_unmap_descriptor_length_is_truncated_to_whole_descriptors() -> None:
    params = unmap_list((8, 8), (100, 1), desc_len=30)  # one and a half descriptors
    request = io(lun().execute(unmap_cdb(len(params)), [memoryview(params)]))
    assert request.ranges == ((4096, 4096),)
    params = unmap_list((8, 8), (100, 1))
    request = io(lun().execute(unmap_cdb(24), [memoryview(params)]))  # the list cut short
    assert request.ranges == ((4096, 4096),)


def test_unmap_refusals() -> None:
    unit = lun(limits=LunLimits(max_unmap_lbas=100, max_unmap_descriptors=2))
    ok = unmap_list((0, 8))
    assert good(unit.execute(unmap_cdb(0), [memoryview(ok)])) == b""  # empty list: no error
    refused(unit.execute(unmap_cdb(6), [memoryview(ok)]), LIST_LENGTH)
    refused(unit.execute(unmap_cdb(len(ok) + 8), [memoryview(ok)]), LIST_LENGTH)  # no data
    refused(unit.execute(unmap_cdb(len(ok), anchor=1), [memoryview(ok)]), INVALID_FIELD)
    three = unmap_list((0, 1), (2, 1), (4, 1))
    refused(unit.execute(unmap_cdb(len(three)), [memoryview(three)]), INVALID_PARAMETER)
    big = unmap_list((0, 60), (100, 41))
    refused(unit.execute(unmap_cdb(len(big)), [memoryview(big)]), INVALID_PARAMETER)
    exactly = unmap_list((0, 60), (100, 40))
    assert io(unit.execute(unmap_cdb(len(exactly)), [memoryview(exactly)]))
    beyond = unmap_list((0, 1), (BLOCKS - 4, 5))
    refused(unit.execute(unmap_cdb(len(beyond)), [memoryview(beyond)]), OUT_OF_RANGE)
    zero = unmap_list((5, 0))
    assert good(unit.execute(unmap_cdb(len(zero)), [memoryview(zero)])) == b""
    refused(lun(read_only=True).execute(unmap_cdb(len(ok)), [memoryview(ok)]), WRITE_PROTECT)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600), st.integers(0, 0xFFFF))
def test_unmap_never_leaves_the_volume(params: bytes, length: int) -> None:
    result = lun().execute(unmap_cdb(length), [memoryview(params)])
    if isinstance(result, IoRequest):
        for offset, n in result.ranges:
            assert offset >= 0 and n > 0 and offset + n <= SIZE


# ---------------------------------------------------------------------- WRITE SAME


def write_same(lba: int, blocks: int, flags: int = 0) -> bytes:
    return rw16(0x93, lba, blocks, flags)


def test_write_same_with_unmap_and_zeros() -> None:
    request = io(lun().execute(write_same(8, 16, 0x08), buf(512)))
    assert (request.kind, request.offset, request.length, request.may_unmap) == (
        IoKind.ZERO,
        4096,
        8192,
        True,
    )


def test_write_same_zero_block_without_unmap_keeps_the_allocation() -> None:
    request = io(lun().execute(write_same(8, 16), buf(512)))
    assert (request.kind, request.may_unmap) == (IoKind.ZERO, False)


def test_write_same_replicates_a_pattern() -> None:
    block = bytes(range(256)) * 2
    request = io(lun().execute(write_same(8, 16), [memoryview(block)]))
    assert (request.kind, request.offset, request.length, request.pattern) == (
        IoKind.WRITE_SAME,
        4096,
        8192,
        block,
    )
    unmap_but_data = io(lun().execute(write_same(8, 16, 0x08), [memoryview(block)]))
    assert unmap_but_data.kind is IoKind.WRITE_SAME  # not zeros: written, not unmapped


def test_write_same_10() -> None:
    cdb = struct.pack(">BBIBHB", 0x41, 0x08, 8, 0, 16, 0)
    request = io(lun().execute(cdb, buf(512)))
    assert (request.kind, request.offset, request.length, request.may_unmap) == (
        IoKind.ZERO,
        4096,
        8192,
        True,
    )
    block = b"\x01" * 512
    cdb = struct.pack(">BBIBHB", 0x41, 0, 8, 0, 1, 0)
    assert io(lun().execute(cdb, [memoryview(block)])).pattern == block
    beyond = struct.pack(">BBIBHB", 0x41, 0, BLOCKS - 1, 0, 2, 0)
    refused(lun().execute(beyond, buf(512)), OUT_OF_RANGE)
    refused(lun().execute(struct.pack(">BBIBHB", 0x41, 0, 0, 0, 0, 0), buf(512)), INVALID_FIELD)


def test_write_same_without_data_out_buffer() -> None:
    request = io(lun().execute(write_same(0, 1, 0x01)))  # NDOB
    assert (request.kind, request.length) == (IoKind.ZERO, 512)


def test_write_same_refusals() -> None:
    unit = lun(limits=LunLimits(max_write_same=32))
    refused(unit.execute(write_same(0, 0), buf(512)), INVALID_FIELD)  # WSNZ
    refused(unit.execute(write_same(0, 33), buf(512)), INVALID_FIELD)
    refused(unit.execute(write_same(0, 1, 0x10), buf(512)), INVALID_FIELD)  # ANCHOR
    refused(unit.execute(write_same(0, 1, 0x20), buf(512)), INVALID_FIELD)  # WRPROTECT
    refused(unit.execute(write_same(0, 1), buf(100)), INVALID_FIELD)  # less than a block
    refused(unit.execute(write_same(BLOCKS - 1, 2), buf(512)), OUT_OF_RANGE)
    refused(lun(read_only=True).execute(write_same(0, 1), buf(512)), WRITE_PROTECT)


# ---------------------------------------------------------------------- capacity changes


def test_resize_raises_a_unit_attention_once() -> None:
    unit = lun()
    unit.resize(SIZE)  # unchanged: nothing to report
    assert good(unit.execute(bytes(6))) == b""
    unit.resize(2 * SIZE)
    inq = good(unit.execute(inquiry()))  # INQUIRY does not report it
    assert len(inq) == 36
    refused(unit.execute(bytes([0x25]) + bytes(9)), CAPACITY_CHANGED)
    data = good(unit.execute(bytes([0x25]) + bytes(9)))
    assert struct.unpack(">II", data) == (2 * SIZE // 512 - 1, 512)
    assert io(unit.execute(rw10(0x28, BLOCKS, 8), buf(4096))).offset == SIZE


def test_request_sense_reports_and_clears_the_unit_attention() -> None:
    unit = lun()
    unit.resize(SIZE + MiB)
    assert good(unit.execute(bytes([0x03, 0, 0, 0, 18, 0]))) == CAPACITY_CHANGED
    assert unit.unit_attention is None
    assert good(unit.execute(bytes(6))) == b""


# ---------------------------------------------------------------------- I/O errors


@pytest.mark.parametrize(
    ("kind", "errno", "expected"),
    [
        (IoKind.READ, 5, sense(0x3, 0x11)),  # EIO: UNRECOVERED READ ERROR
        (IoKind.WRITE, 5, sense(0x3, 0x0C)),  # EIO: WRITE ERROR
        (IoKind.FLUSH, 5, sense(0x3, 0x0C)),
        (IoKind.WRITE, 28, sense(0x7, 0x27, 0x07)),  # ENOSPC: SPACE ALLOCATION FAILED
        (IoKind.UNMAP, 1, WRITE_PROTECT),  # EPERM
        (IoKind.READ, 22, OUT_OF_RANGE),  # EINVAL: the volume shrank
        (IoKind.READ, 9, sense(0x4, 0x44)),  # EBADF: HARDWARE ERROR, INTERNAL TARGET FAILURE
    ],
)
def test_io_errors_become_sense(kind: IoKind, errno: int, expected: bytes) -> None:
    refused(io_error_reply(IoRequest(kind), errno), expected)


# ---------------------------------------------------------------------- anything goes


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=1, max_size=32), st.binary(max_size=1024))
def test_any_cdb_gets_an_answer_within_the_volume(cdb: bytes, data: bytes) -> None:
    result = lun(size=MiB).execute(cdb, [memoryview(data)])
    if isinstance(result, Reply):
        assert result.status in (Status.GOOD, Status.CHECK_CONDITION)
        assert (result.status == Status.CHECK_CONDITION) == bool(result.sense)
        if result.sense:
            assert len(result.sense) == 18 and result.sense[0] == 0x70
    else:
        assert result.offset >= 0 and result.offset + result.length <= MiB
        if result.kind in (IoKind.READ, IoKind.WRITE):
            assert result.length <= len(data)
