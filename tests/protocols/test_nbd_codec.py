"""Table-driven tests of the sans-I/O NBD server codec; every input is fed whole and byte by
byte, and both must give the same events and the same bytes."""

from __future__ import annotations

import struct

import pytest
from nbd_wire import (
    GO_DISK,
    GREETING,
    SIZE,
    client_flags,
    command_stream,
    drive,
    go_prologue,
    info_data,
    meta_data,
    option,
    rep,
    request,
    whole_and_bytewise,
)

from storvisor.errors import ProtocolError, StateError
from storvisor.protocols.nbd import (
    MAX_PAYLOAD,
    NEED_DATA,
    Aborted,
    Command,
    ConnectionClosed,
    Disconnect,
    ExportDetails,
    ExportListRequest,
    ExportRequest,
    ServerConnection,
)
from storvisor.protocols.nbd import constants as C
from storvisor.protocols.nbd._state import State

DISK_FLAGS = ExportDetails("disk", SIZE).transmission_flags
INFO_EXPORT = struct.pack(">HQH", C.NBD_INFO_EXPORT, SIZE, DISK_FLAGS)
BLOCK_SIZE = struct.pack(">HIII", C.NBD_INFO_BLOCK_SIZE, 1, 4096, 32 << 20)
META = struct.pack(">I", 1) + b"base:allocation"


def test_greeting_is_queued_at_construction() -> None:
    conn = ServerConnection()
    assert conn.data_to_send() == GREETING
    assert conn.data_to_send() == b""
    assert conn.next_event() is NEED_DATA


HANDSHAKE_CASES = [
    ("structured reply", option(C.NBD_OPT_STRUCTURED_REPLY), [], rep(8, C.NBD_REP_ACK)),
    (
        "structured reply with data",
        option(C.NBD_OPT_STRUCTURED_REPLY, b"x"),
        [],
        rep(8, C.NBD_REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data"),
    ),
    ("unknown option", option(99), [], rep(99, C.NBD_REP_ERR_UNSUP, b"option 99 is not supported")),
    (
        "starttls without tls",
        option(C.NBD_OPT_STARTTLS),
        [],
        rep(5, C.NBD_REP_ERR_POLICY, b"TLS is not offered on this connection"),
    ),
    (
        "extended headers",
        option(C.NBD_OPT_EXTENDED_HEADERS),
        [],
        rep(11, C.NBD_REP_ERR_UNSUP, b"option 11 is not supported"),
    ),
    (
        "list",
        option(C.NBD_OPT_LIST),
        [ExportListRequest()],
        rep(3, C.NBD_REP_SERVER, b"\0\0\0\x04diska disk")
        + rep(3, C.NBD_REP_SERVER, b"\0\0\0\x02ro")
        + rep(3, C.NBD_REP_ACK),
    ),
    (
        "list with data",
        option(C.NBD_OPT_LIST, b"x"),
        [],
        rep(3, C.NBD_REP_ERR_INVALID, b"NBD_OPT_LIST takes no data"),
    ),
    (
        "info with name and description",
        option(C.NBD_OPT_INFO, info_data("disk", [C.NBD_INFO_NAME, C.NBD_INFO_DESCRIPTION])),
        [ExportRequest(C.NBD_OPT_INFO, "disk", frozenset({1, 2}))],
        rep(6, C.NBD_REP_INFO, INFO_EXPORT)
        + rep(6, C.NBD_REP_INFO, b"\0\x01disk")
        + rep(6, C.NBD_REP_INFO, b"\0\x02a disk")
        + rep(6, C.NBD_REP_INFO, BLOCK_SIZE)
        + rep(6, C.NBD_REP_ACK),
    ),
    (
        "info of an unknown export",
        option(C.NBD_OPT_INFO, info_data("nope")),
        [ExportRequest(C.NBD_OPT_INFO, "nope", frozenset())],
        rep(6, C.NBD_REP_ERR_UNKNOWN, b"no such export"),
    ),
    (
        "go with a truncated info list",
        option(C.NBD_OPT_GO, info_data("disk", [1])[:-1]),
        [],
        rep(7, C.NBD_REP_ERR_INVALID, b"information request list has the wrong length"),
    ),
    (
        "go with a name longer than its data",
        option(C.NBD_OPT_GO, b"\0\0\0\x10ab"),
        [],
        rep(7, C.NBD_REP_ERR_INVALID, b"export name: truncated"),
    ),
    (
        "go with a name that is not UTF-8",
        option(C.NBD_OPT_GO, b"\0\0\0\x01\xff\0\0"),
        [],
        rep(7, C.NBD_REP_ERR_INVALID, b"export name: not UTF-8"),
    ),
    (
        "meta context before structured replies",
        option(C.NBD_OPT_SET_META_CONTEXT, meta_data("disk", ["base:allocation"])),
        [],
        rep(10, C.NBD_REP_ERR_INVALID, b"negotiate structured replies first"),
    ),
    (
        "list meta context base:",
        option(C.NBD_OPT_STRUCTURED_REPLY)
        + option(C.NBD_OPT_LIST_META_CONTEXT, meta_data("disk", ["base:"])),
        [],
        rep(8, C.NBD_REP_ACK) + rep(9, C.NBD_REP_META_CONTEXT, META) + rep(9, C.NBD_REP_ACK),
    ),
    (
        "list meta context, no query",
        option(C.NBD_OPT_STRUCTURED_REPLY) + option(C.NBD_OPT_LIST_META_CONTEXT, meta_data("", [])),
        [],
        rep(8, C.NBD_REP_ACK) + rep(9, C.NBD_REP_META_CONTEXT, META) + rep(9, C.NBD_REP_ACK),
    ),
    (
        "set meta context of an unknown namespace",
        option(C.NBD_OPT_STRUCTURED_REPLY)
        + option(C.NBD_OPT_SET_META_CONTEXT, meta_data("disk", ["qemu:dirty-bitmap:a"])),
        [],
        rep(8, C.NBD_REP_ACK) + rep(10, C.NBD_REP_ACK),
    ),
    (
        "meta context with trailing bytes",
        option(C.NBD_OPT_STRUCTURED_REPLY)
        + option(C.NBD_OPT_SET_META_CONTEXT, meta_data("disk", []) + b"x"),
        [],
        rep(8, C.NBD_REP_ACK) + rep(10, C.NBD_REP_ERR_INVALID, b"trailing bytes after the queries"),
    ),
    (
        "oversized option is drained and refused",
        option(C.NBD_OPT_INFO, bytes(70000)) + option(C.NBD_OPT_STRUCTURED_REPLY),
        [],
        rep(6, C.NBD_REP_ERR_TOO_BIG, b"option data too long") + rep(8, C.NBD_REP_ACK),
    ),
    ("abort", option(C.NBD_OPT_ABORT), [Aborted()], rep(2, C.NBD_REP_ACK)),
]


@pytest.mark.parametrize(
    ("data", "events", "reply"),
    [c[1:] for c in HANDSHAKE_CASES],
    ids=[c[0] for c in HANDSHAKE_CASES],
)
def test_handshake_option(data: bytes, events: list[object], reply: bytes) -> None:
    got_events, got_reply = whole_and_bytewise(client_flags() + data)
    assert got_events == events
    assert got_reply == reply


def test_go_enters_transmission_with_block_size() -> None:
    conn = ServerConnection()
    events, out = drive(conn, [GO_DISK])
    assert events == [ExportRequest(C.NBD_OPT_GO, "disk", frozenset({C.NBD_INFO_BLOCK_SIZE}))]
    assert out == (
        rep(8, C.NBD_REP_ACK)
        + rep(10, C.NBD_REP_META_CONTEXT, META)
        + rep(10, C.NBD_REP_ACK)
        + rep(7, C.NBD_REP_INFO, INFO_EXPORT)
        + rep(7, C.NBD_REP_INFO, BLOCK_SIZE)
        + rep(7, C.NBD_REP_ACK)
    )
    assert conn.state is State.TRANSMISSION
    assert conn.structured_replies and conn.base_allocation
    assert conn.export == ExportDetails("disk", SIZE, description="a disk")


def test_meta_context_for_another_export_is_not_used() -> None:
    conn = ServerConnection()
    prologue = (
        client_flags()
        + option(C.NBD_OPT_STRUCTURED_REPLY)
        + option(C.NBD_OPT_SET_META_CONTEXT, meta_data("ro", ["base:allocation"]))
        + option(C.NBD_OPT_GO, info_data("disk"))
    )
    drive(conn, [prologue])
    assert conn.state is State.TRANSMISSION and not conn.base_allocation


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name(no_zeroes: bool) -> None:
    flags = C.NBD_FLAG_C_FIXED_NEWSTYLE | (C.NBD_FLAG_C_NO_ZEROES if no_zeroes else 0)
    events, out = whole_and_bytewise(client_flags(flags) + option(C.NBD_OPT_EXPORT_NAME, b"disk"))
    assert events == [ExportRequest(C.NBD_OPT_EXPORT_NAME, "disk", frozenset())]
    assert out == struct.pack(">QH", SIZE, DISK_FLAGS) + (b"" if no_zeroes else bytes(124))


def test_refused_export_name_closes() -> None:
    conn = ServerConnection()
    events, out = drive(conn, [client_flags() + option(C.NBD_OPT_EXPORT_NAME, b"nope")])
    assert events == [ExportRequest(C.NBD_OPT_EXPORT_NAME, "nope", frozenset())]
    assert out == b"" and conn.state is State.CLOSED


def test_events_wait_for_the_answer() -> None:
    conn = ServerConnection()
    conn.receive_data(client_flags() + option(C.NBD_OPT_LIST))
    assert conn.next_event() == ExportListRequest()
    with pytest.raises(StateError):
        conn.next_event()
    with pytest.raises(StateError):
        conn.send_export(ExportDetails("disk", SIZE))
    conn.send_export_list([])
    assert conn.next_event() is NEED_DATA


PROTOCOL_ERRORS = [
    ("unknown client flags", client_flags(0x80)),
    ("bad option magic", b"\0\0\0\x01" + b"NOTMAGIC" + b"\0" * 8),
    ("oversized export name", client_flags() + option(C.NBD_OPT_EXPORT_NAME, length=1 << 20)),
    ("bad request magic", GO_DISK + request(0)[:-28] + b"\x12\x34\x56\x78" + request(0)[4:]),
    ("truncated handshake", client_flags() + option(C.NBD_OPT_GO, info_data("disk"))[:-1]),
    ("truncated write payload", GO_DISK + request(C.NBD_CMD_WRITE, 0, 10, payload=b"x" * 9)),
    (
        "truncated refused write payload",
        GO_DISK + request(C.NBD_CMD_WRITE, SIZE, 10, payload=b"x" * 9),
    ),
]


@pytest.mark.parametrize(
    "data", [c[1] for c in PROTOCOL_ERRORS], ids=[c[0] for c in PROTOCOL_ERRORS]
)
def test_protocol_errors(data: bytes) -> None:
    for chunks in ([data], [data[i : i + 1] for i in range(len(data))]):
        conn = ServerConnection()
        with pytest.raises(ProtocolError):
            drive(conn, chunks, eof=True)
        assert conn.state is State.CLOSED
        with pytest.raises(ProtocolError):  # sticky
            conn.next_event()


def test_eof_at_a_message_boundary_is_a_clean_close() -> None:
    assert whole_and_bytewise(client_flags(), eof=True)[0] == [ConnectionClosed()]
    assert whole_and_bytewise(GO_DISK, eof=True)[0][-1] == ConnectionClosed()


R, W = C.NBD_CMD_READ, C.NBD_CMD_WRITE
COMMAND_CASES = [
    ("read", "disk", request(R, 4096, 512), Command(R, 0, 7, 4096, 512)),
    ("read with fua and df", "disk", request(R, 0, 1, flags=5), Command(R, 5, 7, 0, 1)),
    ("read to the end", "disk", request(R, SIZE - 1, 1), Command(R, 0, 7, SIZE - 1, 1)),
    (
        "read past the end",
        "disk",
        request(R, SIZE - 1, 2),
        Command(R, 0, 7, SIZE - 1, 2, None, C.NBD_EINVAL),
    ),
    (
        "read too long",
        "disk",
        request(R, 0, (32 << 20) + 1),
        Command(R, 0, 7, 0, (32 << 20) + 1, None, C.NBD_EINVAL),
    ),
    (
        "read with no_hole",
        "disk",
        request(R, 0, 1, flags=2),
        Command(R, 2, 7, 0, 1, None, C.NBD_EINVAL),
    ),
    ("write", "disk", request(W, 10, 3, payload=b"abc"), Command(W, 0, 7, 10, 3, b"abc")),
    ("write fua", "disk", request(W, 0, 1, flags=1, payload=b"z"), Command(W, 1, 7, 0, 1, b"z")),
    (
        "write past the end",
        "disk",
        request(W, SIZE, 3, payload=b"abc"),
        Command(W, 0, 7, SIZE, 3, None, C.NBD_ENOSPC),
    ),
    (
        "write read-only",
        "ro",
        request(W, 0, 3, payload=b"abc"),
        Command(W, 0, 7, 0, 3, None, C.NBD_EPERM),
    ),
    (
        "write with df",
        "disk",
        request(W, 0, 3, flags=4, payload=b"abc"),
        Command(W, 4, 7, 0, 3, None, C.NBD_EINVAL),
    ),
    ("flush", "disk", request(C.NBD_CMD_FLUSH), Command(3, 0, 7, 0, 0)),
    ("trim", "disk", request(C.NBD_CMD_TRIM, 0, SIZE), Command(4, 0, 7, 0, SIZE)),
    (
        "trim past the end",
        "disk",
        request(C.NBD_CMD_TRIM, 1, SIZE),
        Command(4, 0, 7, 1, SIZE, None, C.NBD_EINVAL),
    ),
    (
        "trim read-only",
        "ro",
        request(C.NBD_CMD_TRIM, 0, 1),
        Command(4, 0, 7, 0, 1, None, C.NBD_EPERM),
    ),
    ("cache", "disk", request(C.NBD_CMD_CACHE, 0, 4096), Command(5, 0, 7, 0, 4096)),
    ("zeroes", "disk", request(6, 0, 4096, flags=0x13), Command(6, 0x13, 7, 0, 4096)),
    (
        "zeroes past the end",
        "disk",
        request(6, SIZE, 1),
        Command(6, 0, 7, SIZE, 1, None, C.NBD_ENOSPC),
    ),
    (
        "zeroes with req_one",
        "disk",
        request(6, 0, 1, flags=8),
        Command(6, 8, 7, 0, 1, None, C.NBD_EINVAL),
    ),
    ("block status", "disk", request(7, 0, SIZE, flags=8), Command(7, 8, 7, 0, SIZE)),
    ("block status empty", "disk", request(7, 0, 0), Command(7, 0, 7, 0, 0, None, C.NBD_EINVAL)),
    ("unknown command", "disk", request(42, 0, 1), Command(42, 0, 7, 0, 1, None, C.NBD_EINVAL)),
]


@pytest.mark.parametrize(
    ("export", "data", "command"), [c[1:] for c in COMMAND_CASES], ids=[c[0] for c in COMMAND_CASES]
)
def test_command(export: str, data: bytes, command: Command) -> None:
    prologue = go_prologue(export)
    # the command, then a FLUSH: a drained payload must leave the stream in sync
    events, _ = whole_and_bytewise(
        prologue + data + request(C.NBD_CMD_FLUSH, cookie=9) + request(C.NBD_CMD_DISC)
    )
    assert events[1:] == [command, Command(3, 0, 9, 0, 0), Disconnect()]


def test_block_status_needs_a_context() -> None:
    prologue = (
        client_flags()
        + option(C.NBD_OPT_STRUCTURED_REPLY)
        + option(C.NBD_OPT_GO, info_data("disk"))
    )
    events, _ = whole_and_bytewise(prologue + request(7, 0, 512))
    assert events[-1] == Command(7, 0, 7, 0, 512, None, C.NBD_EINVAL)


def test_df_needs_structured_replies() -> None:
    events, _ = whole_and_bytewise(
        client_flags() + option(C.NBD_OPT_GO, info_data("disk")) + request(R, 0, 1, flags=4)
    )
    assert events[-1] == Command(R, 4, 7, 0, 1, None, C.NBD_EINVAL)


def test_data_after_disconnect_is_ignored() -> None:
    events, _ = whole_and_bytewise(GO_DISK + request(C.NBD_CMD_DISC) + b"garbage")
    assert events[-1] == Disconnect()


def test_many_pipelined_requests_in_one_chunk() -> None:
    data = b"".join(request(W, i * 8, 8, cookie=i, payload=bytes([i]) * 8) for i in range(200))
    events, _ = drive(ServerConnection(), [GO_DISK + data])
    assert [e.cookie for e in events[1:] if isinstance(e, Command)] == list(range(200))
    assert all(isinstance(e, Command) and e.payload == bytes([e.cookie]) * 8 for e in events[1:])


def test_large_write_grows_the_buffer_and_recv_into_path() -> None:
    conn = ServerConnection()
    drive(conn, [GO_DISK])
    payload = bytes(range(256)) * 4096  # 1 MiB
    data = request(W, 0, len(payload), payload=payload)
    pos = 0
    events = []
    while pos < len(data):
        view = conn.get_buffer(1000)
        n = min(len(view), len(data) - pos, 65536)
        view[:n] = data[pos : pos + n]
        view.release()
        conn.buffer_updated(n)
        pos += n
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
    assert events == [Command(W, 0, 7, 0, len(payload), payload)]


# -- replies -------------------------------------------------------------------------------


def _connected(structured: bool) -> ServerConnection:
    conn = ServerConnection()
    data = GO_DISK if structured else client_flags() + option(C.NBD_OPT_GO, info_data("disk"))
    drive(conn, [data])
    return conn


def test_simple_replies() -> None:
    conn = _connected(structured=False)
    read = Command(R, 0, 0xABC, 0, 3)
    assert (
        b"".join(conn.reply_read(read, b"xyz"))
        == struct.pack(">IIQ", C.NBD_SIMPLE_REPLY_MAGIC, 0, 0xABC) + b"xyz"
    )
    assert b"".join(conn.reply_error(read, C.NBD_EIO)) == struct.pack(
        ">IIQ", C.NBD_SIMPLE_REPLY_MAGIC, 5, 0xABC
    )
    assert b"".join(conn.reply_ok(Command(3, 0, 1, 0, 0))) == struct.pack(
        ">IIQ", C.NBD_SIMPLE_REPLY_MAGIC, 0, 1
    )


def test_structured_replies() -> None:
    conn = _connected(structured=True)
    read = Command(R, 0, 0xABC, 4096, 3)
    magic = C.NBD_STRUCTURED_REPLY_MAGIC
    assert b"".join(conn.reply_read(read, memoryview(b"xyz"))) == (
        struct.pack(">IHHQIQ", magic, 1, C.NBD_REPLY_TYPE_OFFSET_DATA, 0xABC, 11, 4096) + b"xyz"
    )
    assert b"".join(conn.reply_read(Command(R, 0, 1, 0, 0), b"")) == struct.pack(
        ">IHHQI", magic, 1, 0, 1, 0
    )
    assert b"".join(conn.reply_error(read, C.NBD_EINVAL)) == (
        struct.pack(">IHHQI", magic, 1, C.NBD_REPLY_TYPE_ERROR, 0xABC, 6)
        + struct.pack(">IH", 22, 0)
    )
    # commands without data may keep simple replies
    assert b"".join(conn.reply_error(Command(W, 0, 2, 0, 1), C.NBD_ENOSPC)) == struct.pack(
        ">IIQ", C.NBD_SIMPLE_REPLY_MAGIC, 28, 2
    )


@pytest.mark.parametrize(
    ("flags", "extents", "expected"),
    [
        (0, [(4096, 0), (4096, 0), (8192, 3)], [8192, 0, 8192, 3]),
        (0, [(0, 3), (512, 3)], [512, 3]),
        (C.NBD_CMD_FLAG_REQ_ONE, [(1 << 20, 3), (4096, 0)], [65536, 3]),
        (C.NBD_CMD_FLAG_REQ_ONE, [(512, 0), (4096, 3)], [512, 0]),
    ],
)
def test_block_status_reply(
    flags: int, extents: list[tuple[int, int]], expected: list[int]
) -> None:
    conn = _connected(structured=True)
    command = Command(7, flags, 5, 0, 65536)
    body = struct.pack(f">I{len(expected)}I", 1, *expected)
    header = struct.pack(
        ">IHHQI", C.NBD_STRUCTURED_REPLY_MAGIC, 1, C.NBD_REPLY_TYPE_BLOCK_STATUS, 5, len(body)
    )
    assert b"".join(conn.reply_block_status(command, extents)) == header + body
    with pytest.raises(ValueError):
        conn.reply_block_status(command, [])


@pytest.mark.parametrize("chunk", [1000, 65536, 200_000])
def test_large_write_payload_in_pieces(chunk: int) -> None:
    payload = bytes(range(256)) * 1000  # 256,000 bytes: received into its own buffer
    data = GO_DISK + request(W, 4096, len(payload), payload=payload) + request(C.NBD_CMD_FLUSH)
    events, _ = drive(ServerConnection(), [data[i : i + chunk] for i in range(0, len(data), chunk)])
    assert events[1:] == [Command(W, 0, 7, 4096, len(payload), payload), Command(3, 0, 7, 0, 0)]
    with pytest.raises(ProtocolError):
        drive(ServerConnection(), [data[i : i + chunk] for i in range(0, 100_000, chunk)], eof=True)


def test_a_released_payload_receives_the_next_write_of_its_length() -> None:
    conn = _connected(structured=True)

    def write(offset: int, payload: bytes) -> Command:
        data = request(W, offset, len(payload), payload=payload)
        (command,), _ = drive(conn, [data[i : i + 65536] for i in range(0, len(data), 65536)])
        assert isinstance(command, Command) and command.payload == payload
        return command

    first, second = bytes(range(256)) * 1000, bytes(reversed(range(256))) * 1000
    kept = write(0, first).payload
    conn.release_payload(kept)
    assert write(4096, second).payload is kept
    # not released, or of another length: a buffer of its own
    other = write(0, first).payload
    assert other is not kept
    conn.release_payload(other)
    assert write(0, first + bytes(512)).payload is not other


# -- the READ fast path --------------------------------------------------------------------


def _reads(first_cookie: int, count: int, length: int = 4096) -> bytes:
    return b"".join(
        request(R, (i * 7 * length) % (SIZE - length), length, cookie=first_cookie + i)
        for i in range(count)
    )


MIXED_BATCHES = {
    "reads only": _reads(1, 40),
    "refused reads between good ones": _reads(1, 5)
    + request(R, SIZE - 4096, 4097, cookie=100)  # past the end
    + _reads(10, 3)
    + request(R, 0, 4096, flags=0x20, cookie=101)  # unknown flag
    + request(R, 0, 0, cookie=102)  # empty read
    + request(R, 0, MAX_PAYLOAD + 1, cookie=103)  # oversized
    + request(R, 0, 4096, flags=C.NBD_CMD_FLAG_DF | C.NBD_CMD_FLAG_FUA, cookie=104)
    + _reads(20, 3),
    "writes and flushes between reads": _reads(1, 4)
    + request(W, 4096, 8, cookie=50, payload=b"abcdefgh")
    + _reads(60, 4)
    + request(W, SIZE, 4, cookie=51, payload=b"junk")  # refused: payload drained
    + _reads(70, 2)
    + request(C.NBD_CMD_FLUSH, cookie=52)
    + _reads(80, 2)
    + request(C.NBD_CMD_DISC)
    + _reads(90, 2),
    "bad magic after reads": _reads(1, 6)
    + struct.pack(">IHHQQI", 0xDEADBEEF, 0, R, 9, 0, 4096)
    + _reads(20, 3),
    "bad magic in a read-sized gap": _reads(1, 2) + b"\0" * 28 + _reads(3, 2),
}


@pytest.mark.parametrize("name", list(MIXED_BATCHES))
def test_next_reads_agrees_with_next_event(name: str) -> None:
    """Taking READs with ``next_reads`` first gives the same commands, errors and protocol
    errors, in the same order, as ``next_event`` alone: whole, byte by byte, and in pieces
    that cut requests in the middle."""
    data = MIXED_BATCHES[name]
    expected = command_stream(_connected(structured=True), [data], reads_first=False)
    assert expected, "the batch should produce commands"
    for size in (len(data), 1, 27, 28, 29, 1000):
        chunks = [data[i : i + size] for i in range(0, len(data), size)]
        got = command_stream(_connected(structured=True), chunks, reads_first=True)
        assert got == expected, size


def test_next_reads_stops_at_the_first_other_message() -> None:
    conn = _connected(structured=True)
    conn.receive_data(_reads(1, 3) + request(C.NBD_CMD_FLUSH, cookie=9) + _reads(4, 2)[:40])
    assert [r[0] for r in conn.next_reads()] == [1, 2, 3]
    assert conn.next_reads() == []
    assert conn.next_event() == Command(C.NBD_CMD_FLUSH, 0, 9, 0, 0)
    assert [r[0] for r in conn.next_reads()] == [4]  # the second one is incomplete
    assert conn.next_event() is NEED_DATA
    conn.receive_data(_reads(4, 2)[40:])
    assert [r[0] for r in conn.next_reads()] == [5]


def test_next_reads_outside_transmission_and_after_an_error() -> None:
    conn = ServerConnection()
    conn.receive_data(client_flags() + _reads(1, 2))
    assert conn.next_reads() == []  # still in the handshake: the reads are option bytes
    conn = _connected(structured=True)
    conn.receive_data(b"\0" * 28 + _reads(1, 2))
    with pytest.raises(ProtocolError):
        conn.next_event()
    assert conn.next_reads() == []


def test_df_read_needs_structured_replies_in_the_fast_path_too() -> None:
    conn = _connected(structured=False)
    conn.receive_data(request(R, 0, 512, flags=C.NBD_CMD_FLAG_DF, cookie=3))
    assert conn.next_reads() == []
    assert conn.next_event() == Command(R, C.NBD_CMD_FLAG_DF, 3, 0, 512, None, C.NBD_EINVAL)


@pytest.mark.parametrize("structured", [True, False])
def test_reply_reads_matches_reply_read(structured: bool) -> None:
    conn = _connected(structured)
    reads = [(11, 0, 3), (12, 4096, 5), (0xFFFF_FFFF_FFFF_FFFF, SIZE - 1, 1)]
    buf, starts = conn.reply_reads(reads)
    expected = b""
    for (cookie, offset, length), pos in zip(reads, starts, strict=True):
        data = bytes([cookie & 0x7F]) * length
        buf[pos : pos + length] = data
        expected += b"".join(conn.reply_read(Command(R, 0, cookie, offset, length), data))
    assert bytes(buf) == expected
