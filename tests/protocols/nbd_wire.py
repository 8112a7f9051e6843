"""Client-side byte builders and a driver for the NBD codec tests (test helpers only)."""

from __future__ import annotations

import struct
from collections.abc import Iterable

from storvisor.errors import ProtocolError
from storvisor.protocols.nbd import (
    NEED_DATA,
    Aborted,
    Command,
    ConnectionClosed,
    Disconnect,
    Event,
    ExportDetails,
    ExportListRequest,
    ExportRequest,
    ServerConnection,
    StartTLS,
)
from storvisor.protocols.nbd import constants as C

SIZE = 1 << 20
EXPORTS = {
    "disk": ExportDetails("disk", SIZE, description="a disk"),
    "ro": ExportDetails("ro", SIZE, read_only=True),
}


def client_flags(flags: int = C.NBD_FLAG_C_FIXED_NEWSTYLE | C.NBD_FLAG_C_NO_ZEROES) -> bytes:
    return struct.pack(">I", flags)


def option(opt: int, data: bytes = b"", *, length: int | None = None) -> bytes:
    return struct.pack(">QII", C.IHAVEOPT, opt, len(data) if length is None else length) + data


def info_data(name: str, infos: Iterable[int] = ()) -> bytes:
    infos = list(infos)
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def meta_data(name: str, queries: Iterable[str]) -> bytes:
    queries = list(queries)
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q)) + q.encode()
    return out


def request(
    kind: int,
    offset: int = 0,
    length: int = 0,
    *,
    flags: int = 0,
    cookie: int = 7,
    payload: bytes = b"",
) -> bytes:
    return (
        struct.pack(">IHHQQI", C.NBD_REQUEST_MAGIC, flags, kind, cookie, offset, length) + payload
    )


def rep(opt: int, reply_type: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", C.NBD_REP_MAGIC, opt, reply_type, len(data)) + data


GREETING = struct.pack(">QQH", C.NBDMAGIC, C.IHAVEOPT, 3)


def go_prologue(name: str) -> bytes:
    """A typical QEMU prologue: structured replies, base:allocation, GO."""
    return (
        client_flags()
        + option(C.NBD_OPT_STRUCTURED_REPLY)
        + option(C.NBD_OPT_SET_META_CONTEXT, meta_data(name, ["base:allocation"]))
        + option(C.NBD_OPT_GO, info_data(name, [C.NBD_INFO_BLOCK_SIZE]))
    )


GO_DISK = go_prologue("disk")


def answer(conn: ServerConnection, event: Event) -> None:
    """Answer the codec's questions as a server with the exports in ``EXPORTS`` would. TLS is
    the identity here: the bytes after NBD_OPT_STARTTLS are the "decrypted" stream."""
    if isinstance(event, StartTLS):
        conn.tls_started()
        if event.received:
            conn.receive_data(event.received)
    elif isinstance(event, ExportListRequest):
        conn.send_export_list([(d.name, d.description) for d in EXPORTS.values()])
    elif isinstance(event, ExportRequest):
        details = EXPORTS.get(event.name or "disk")
        if details is None:
            conn.send_export_error(C.NBD_REP_ERR_UNKNOWN, "no such export")
        else:
            conn.send_export(details)


def drive(
    conn: ServerConnection, chunks: Iterable[bytes], *, eof: bool = False
) -> tuple[list[Event], bytes]:
    """Feed ``chunks`` one by one, pulling and answering every event; returns the events and
    every byte the codec queued (the greeting excluded)."""
    events: list[Event] = []
    out = bytearray()
    conn.data_to_send()

    def pull() -> None:
        while True:
            event = conn.next_event()
            out.extend(conn.data_to_send())
            if event is NEED_DATA:
                return
            events.append(event)
            answer(conn, event)
            out.extend(conn.data_to_send())
            if isinstance(event, (Aborted, ConnectionClosed, Disconnect)):
                return

    for chunk in chunks:
        conn.receive_data(chunk)
        pull()
    if eof:
        conn.receive_data(b"")
        pull()
    return events, bytes(out)


def whole_and_bytewise(
    data: bytes, *, eof: bool = False, require_tls: bool = False
) -> tuple[list[Event], bytes]:
    """Drive two fresh connections, one with ``data`` whole and one byte by byte; assert they
    agree and return the result."""
    whole = drive(ServerConnection(require_tls=require_tls), [data], eof=eof)
    bytewise = drive(
        ServerConnection(require_tls=require_tls),
        [data[i : i + 1] for i in range(len(data))],
        eof=eof,
    )
    assert whole == bytewise, "feeding byte by byte changed the outcome"
    return whole


def command_stream(
    conn: ServerConnection, chunks: Iterable[bytes], *, reads_first: bool
) -> list[tuple[int | str, ...]]:
    """Feed ``chunks`` and pull commands as the export does: with ``reads_first``,
    ``next_reads`` before every ``next_event``, else ``next_event`` alone. Returns
    ``(type, cookie, offset, length, error)`` of every command in order, then ``("DISC",)``
    or ``("ProtocolError",)`` if the stream ended that way. Handshake events are answered."""
    seen: list[tuple[int | str, ...]] = []
    for chunk in chunks:
        conn.receive_data(chunk)
        while True:
            if reads_first:
                seen += [(C.NBD_CMD_READ, c, off, n, 0) for c, off, n in conn.next_reads()]
            try:
                event = conn.next_event()
            except ProtocolError:
                return [*seen, ("ProtocolError",)]
            if event is NEED_DATA:
                break
            if isinstance(event, Command):
                seen.append((event.type, event.cookie, event.offset, event.length, event.error))
            elif isinstance(event, Disconnect):
                return [*seen, ("DISC",)]
            else:
                answer(conn, event)
                conn.data_to_send()
    return seen
