"""The server side of fixed-newstyle NBD, sans I/O.

Theory of operation
-------------------
A ``ServerConnection`` holds no socket. The embedding server feeds it the bytes it receives
(``receive_data``, or zero-copy through ``get_buffer`` + ``buffer_updated`` and ``recv_into``)
and pulls events with ``next_event`` until it returns ``NEED_DATA``. Bytes for the client
come out two ways:

* during the handshake, every option reply (the codec's own and the answers the server gives
  through ``send_export_list``, ``send_export`` and ``send_export_error``) is queued in
  order; ``data_to_send`` drains the queue. The greeting is queued at construction.
* in the transmission phase, ``reply_*`` return the reply as a list of buffers (headers plus
  the caller's data views, for one ``sendmsg``). They read but never change the connection
  state, so worker threads may build replies while the reader thread parses; the caller
  serialises the socket writes.

For pipelines of READs, the common case of a busy client, ``next_reads`` takes every
complete and valid READ at the head of the buffer at once, as ``(cookie, offset, length)``
tuples instead of ``Command`` events, and ``reply_reads`` lays out their replies back to
back in one buffer for the server to read the data into. Everything else stays with
``next_event``, so errors and protocol violations are found exactly as without it.

The codec answers by itself everything that does not depend on the exports: option framing,
NBD_OPT_STRUCTURED_REPLY, the ``base:allocation`` metadata context, ERR_UNSUP for options
it does not implement (NBD_OPT_EXTENDED_HEADERS and unknown ones) and
ERR_INVALID/ERR_TOO_BIG for malformed ones. In the transmission phase it validates flags,
ranges and permissions, so a ``Command`` either is safe to execute or already carries the
spec's error for the reply. The legal state transitions are tabled in ``_state``.

TLS ("TLS support" in the spec): a connection built with ``require_tls`` runs in the
spec's FORCEDTLS mode. Until NBD_OPT_STARTTLS succeeds, every other option is refused with
NBD_REP_ERR_TLS_REQD (NBD_OPT_ABORT still ends the session), so nothing about the exports
is told in plain text, and NBD_OPT_EXPORT_NAME, which cannot be refused, ends the
connection with a ``ProtocolError``. NBD_OPT_STARTTLS is answered with an ACK and a
``StartTLS`` event: the server runs the TLS handshake on its socket, calls ``tls_started``
and feeds the decrypted stream from then on; negotiation starts afresh over TLS. Without
``require_tls`` the connection runs in NOTLS mode and refuses NBD_OPT_STARTTLS with
NBD_REP_ERR_POLICY. The codec itself never sees a TLS record.

Bad input raises ``ProtocolError`` and nothing else; the connection is then unusable and
must be closed. A request the protocol lets the server refuse (an unknown command, a read
past the end, a write to a read-only export) is *not* a protocol error: it becomes a
``Command`` with ``error`` set, and a refused WRITE's payload is drained.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from storvisor.errors import ProtocolError, StateError
from storvisor.protocols.feed import feed, make_room
from storvisor.protocols.nbd import constants as C
from storvisor.protocols.nbd._state import State, Trigger, transition
from storvisor.protocols.nbd.events import (
    NEED_DATA,
    Aborted,
    Command,
    ConnectionClosed,
    Disconnect,
    Event,
    ExportListRequest,
    ExportRequest,
    Sentinel,
    StartTLS,
)

Buffer = bytes | bytearray | memoryview

MAX_PAYLOAD = 32 << 20
"""Largest READ or WRITE accepted, advertised as the maximum block size."""
MAX_OPTION_LENGTH = 64 << 10
"""Longer option data is skipped and refused with NBD_REP_ERR_TOO_BIG."""
BASE_ALLOCATION_ID = 1
"""The metadata context id of ``base:allocation``."""
_MAX_EXTENTS = 1 << 20  # "the server MUST NOT send more than 2^20 extents in one chunk"
_INITIAL_BUFFER = 256 << 10
_DIRECT_PAYLOAD = 64 << 10  # larger WRITE payloads are received straight into their own buffer

_GREETING = struct.Struct(">QQH")
_CLIENT_FLAGS = struct.Struct(">I")
_OPTION = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")
_EXPORT_NAME_REPLY = struct.Struct(">QH")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")
_CHUNK_OFFSET_DATA = struct.Struct(">IHHQIQ")
_CHUNK_ERROR = struct.Struct(">IHHQIIH")

_KNOWN_CLIENT_FLAGS = C.NBD_FLAG_C_FIXED_NEWSTYLE | C.NBD_FLAG_C_NO_ZEROES
_SERVER_FLAGS = C.NBD_FLAG_FIXED_NEWSTYLE | C.NBD_FLAG_NO_ZEROES
_TLS_REQUIRED = "TLS is required: send NBD_OPT_STARTTLS first"
_WRITING = (C.NBD_CMD_WRITE, C.NBD_CMD_TRIM, C.NBD_CMD_WRITE_ZEROES)
_FUA = C.NBD_CMD_FLAG_FUA


@dataclass(frozen=True, slots=True)
class ExportDetails:
    """What the server tells a client about an export (NBD_INFO_* and the transmission flags).

    ``multi_conn`` advertises NBD_FLAG_CAN_MULTI_CONN: the server promises that a FLUSH on
    any connection to this export makes the writes completed on every connection durable.
    """

    name: str
    size: int
    read_only: bool = False
    description: str = ""
    preferred_block_size: int = 4096
    multi_conn: bool = True

    @property
    def transmission_flags(self) -> int:
        flags = C.NBD_FLAG_HAS_FLAGS | C.NBD_FLAG_SEND_FLUSH | C.NBD_FLAG_SEND_DF
        flags |= C.NBD_FLAG_SEND_CACHE
        if self.read_only:
            flags |= C.NBD_FLAG_READ_ONLY
        else:
            flags |= C.NBD_FLAG_SEND_FUA | C.NBD_FLAG_SEND_TRIM | C.NBD_FLAG_SEND_WRITE_ZEROES
            flags |= C.NBD_FLAG_SEND_FAST_ZERO
        if self.multi_conn:
            flags |= C.NBD_FLAG_CAN_MULTI_CONN
        return flags


class ServerConnection:
    """One client connection's protocol state, from greeting to disconnect.

    With ``require_tls`` the client must upgrade to TLS with NBD_OPT_STARTTLS before any
    other option succeeds (see "TLS" in the module docstring); without it, TLS is not
    offered.

    Methods raise ``StateError`` when called in a state that does not allow them (a bug in the
    embedding server, not bad input); ``next_event`` raises ``ProtocolError`` on bad input.
    """

    def __init__(
        self,
        *,
        max_payload: int = MAX_PAYLOAD,
        max_option_length: int = MAX_OPTION_LENGTH,
        require_tls: bool = False,
    ) -> None:
        self._state = State.AWAIT_CLIENT_FLAGS
        self._require_tls = require_tls
        self._tls = False
        self._max_payload = max_payload
        self._max_option_length = max_option_length
        self._buf = bytearray(_INITIAL_BUFFER)
        self._start = 0
        self._end = 0
        self._want = 0  # bytes the message at _start needs in total (0: unknown yet)
        self._skip = 0  # bytes still to drain (refused WRITE payload, oversized option)
        self._payload: bytearray | None = None  # a large WRITE payload being received
        self._payload_filled = 0
        self._payload_ready: bytearray | None = None  # ... and complete
        self._spare: bytearray | None = None  # a payload handed back by release_payload
        self._payload_header: tuple[int, int, int, int] = (0, 0, 0, 0)
        self._eof = False
        self._error: ProtocolError | None = None
        self._out = bytearray(_GREETING.pack(C.NBDMAGIC, C.IHAVEOPT, _SERVER_FLAGS))
        self._no_zeroes = False
        self._structured = False
        self._meta_export: str | None = None  # export the SET_META_CONTEXT selection binds to
        self._meta_selected = False
        self._pending: ExportRequest | ExportListRequest | None = None
        self._export: ExportDetails | None = None
        self._size = 0
        self._read_only = True
        self._base_allocation = False

    # -- state -------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def tls(self) -> bool:
        """TLS was started with NBD_OPT_STARTTLS (``tls_started`` was called)."""
        return self._tls

    @property
    def structured_replies(self) -> bool:
        """NBD_OPT_STRUCTURED_REPLY was negotiated."""
        return self._structured

    @property
    def export(self) -> ExportDetails | None:
        """The export chosen by GO or EXPORT_NAME (``None`` before transmission)."""
        return self._export

    @property
    def base_allocation(self) -> bool:
        """``base:allocation`` is selected for the chosen export (BLOCK_STATUS allowed)."""
        return self._base_allocation

    def _go(self, trigger: Trigger) -> None:
        self._state = transition(self._state, trigger)

    # -- input ---------------------------------------------------------------------------

    def receive_data(self, data: Buffer) -> None:
        """Feed received bytes; ``b""`` means the client closed its end."""
        if not data:
            self._eof = True
            return
        feed(data, self.get_buffer, self.buffer_updated)

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """A writable view of free receive space, for ``recv_into``; report what was written
        with ``buffer_updated`` before calling any other method.

        The view holds at least ``sizehint`` bytes and enough for the message being
        assembled, except while a large WRITE payload is received: then it is the rest of
        that payload's own buffer (so the data is received without a copy)."""
        if self._payload is not None:
            return memoryview(self._payload)[self._payload_filled :]
        used = self._end - self._start
        need = max(sizehint, self._want - used, 1)
        if len(self._buf) - self._end < need:  # the usual case needs no call
            self._buf, self._start, self._end = make_room(self._buf, self._start, self._end, need)
        return memoryview(self._buf)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written at the start of the last ``get_buffer`` view (0 is EOF)."""
        if nbytes == 0:
            self._eof = True
        elif self._payload is not None:
            self._payload_filled += nbytes
            if self._payload_filled == len(self._payload):
                self._payload_ready, self._payload = self._payload, None
        else:
            self._end += nbytes

    def data_to_send(self) -> bytes:
        """Drain the handshake bytes queued for the client."""
        out = bytes(self._out)
        self._out.clear()
        return out

    # -- events --------------------------------------------------------------------------

    def next_event(self) -> Event | Sentinel:
        """The next event, or ``NEED_DATA``.

        Raises:
            ProtocolError: the client broke the protocol; close the connection. Raised again
                on every later call.
            StateError: an ``ExportRequest`` or ``ExportListRequest`` is still unanswered.
        """
        if self._error is not None:
            raise self._error
        try:
            return self._next_event()
        except ProtocolError as e:
            self._error = e
            self._state = State.CLOSED
            raise

    def _next_event(self) -> Event | Sentinel:
        while True:  # each round consumes one message the codec handles by itself
            state = self._state
            if self._skip and not self._drain():
                return NEED_DATA
            if state is State.TRANSMISSION:
                return self._next_command()
            if state is State.OPTIONS:
                event = self._next_option()
                if event is not None:
                    return event
                continue
            if state is State.AWAIT_CLIENT_FLAGS:
                if not self._have(4):
                    return self._starved()
                (flags,) = _CLIENT_FLAGS.unpack_from(self._buf, self._start)
                self._start += 4
                if flags & ~_KNOWN_CLIENT_FLAGS:
                    # "the server MUST close the TCP connection" on unknown client flags
                    raise ProtocolError(f"unknown NBD client flags {flags:#x}")
                if self._require_tls and not flags & C.NBD_FLAG_C_FIXED_NEWSTYLE:
                    # "The server MUST operate in NOTLS mode unless ... the client replied
                    # with NBD_FLAG_C_FIXED_NEWSTYLE": a server that requires TLS cannot serve
                    # such a client at all.
                    raise ProtocolError("TLS is required, which needs fixed-newstyle NBD")
                self._no_zeroes = bool(flags & C.NBD_FLAG_C_NO_ZEROES)
                self._go(Trigger.CLIENT_FLAGS)
                continue
            if state is State.AWAIT_ANSWER:
                raise StateError("answer the pending NBD option before reading more events")
            if state is State.AWAIT_TLS:
                raise StateError("start TLS (then call tls_started) before reading more events")
            return NEED_DATA  # CLOSED: anything after ABORT or DISC is ignored

    def _have(self, n: int) -> bool:
        if self._end - self._start >= n:
            self._want = 0
            return True
        self._want = n
        return False

    def _starved(self) -> Sentinel | ConnectionClosed:
        if not self._eof:
            return NEED_DATA
        if self._end != self._start or self._skip or self._payload is not None:
            raise ProtocolError("the client closed the connection in the middle of a message")
        self._go(Trigger.END)
        return ConnectionClosed()

    def _drain(self) -> bool:
        n = min(self._skip, self._end - self._start)
        self._start += n
        self._skip -= n
        if self._skip:
            if self._eof:
                raise ProtocolError("the client closed the connection in the middle of a message")
            self._start = self._end = 0  # everything buffered was drained
            return False
        return True

    # -- handshake -----------------------------------------------------------------------

    def _reply(self, option: int, reply_type: int, data: Buffer = b"") -> None:
        self._out += _OPTION_REPLY.pack(C.NBD_REP_MAGIC, option, reply_type, len(data))
        self._out += data

    def _refuse(self, option: int, error: int, message: str) -> None:
        self._reply(option, error, message.encode()[: C.NBD_MAX_STRING_SIZE])

    def _next_option(self) -> Event | Sentinel | None:
        """The next option's event, or ``None`` when the codec answered it by itself."""
        if not self._have(_OPTION.size):
            return self._starved()
        magic, option, length = _OPTION.unpack_from(self._buf, self._start)
        if magic != C.IHAVEOPT:
            raise ProtocolError(f"bad NBD option magic {magic:#x}")
        if length > self._max_option_length:
            # "The server MAY ... reply with NBD_REP_ERR_TOO_BIG" after consuming the data.
            self._start += _OPTION.size
            self._skip = length
            if option == C.NBD_OPT_EXPORT_NAME:
                raise ProtocolError("NBD_OPT_EXPORT_NAME with an oversized name")
            if self._tls_pending() and option not in (C.NBD_OPT_STARTTLS, C.NBD_OPT_ABORT):
                self._refuse(option, C.NBD_REP_ERR_TLS_REQD, _TLS_REQUIRED)
            else:
                self._refuse(option, C.NBD_REP_ERR_TOO_BIG, "option data too long")
            return None
        if not self._have(_OPTION.size + length):
            return self._starved()
        begin = self._start + _OPTION.size
        data = bytes(self._buf[begin : begin + length])
        self._start = begin + length
        event = self._option(option, data)
        if event is None:
            self._go(Trigger.OPTION_ANSWERED_BY_CODEC)
        return event

    def _tls_pending(self) -> bool:
        """TLS is required and not started yet."""
        return self._require_tls and not self._tls

    def _option(self, option: int, data: bytes) -> Event | None:
        if option == C.NBD_OPT_STARTTLS:
            return self._starttls(data)
        if self._tls_pending() and option != C.NBD_OPT_ABORT:
            if option == C.NBD_OPT_EXPORT_NAME:
                # "If the server receives a request to enter transmission mode via
                # NBD_OPT_EXPORT_NAME when TLS has not been initiated, then as this request
                # cannot error, it MUST terminate the session."
                raise ProtocolError("NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS: TLS is required")
            # "If the server receives any other option, it MUST reply with
            # NBD_REP_ERR_TLS_REQD if TLS has not been initiated."
            self._refuse(option, C.NBD_REP_ERR_TLS_REQD, _TLS_REQUIRED)
            return None
        if option == C.NBD_OPT_EXPORT_NAME:
            try:
                name = data.decode()
            except UnicodeDecodeError:
                raise ProtocolError("NBD_OPT_EXPORT_NAME: export name is not UTF-8") from None
            return self._ask(ExportRequest(option, name, frozenset()))
        if option == C.NBD_OPT_ABORT:
            # "the server SHOULD reply with NBD_REP_ACK"; any data is ignored
            self._reply(option, C.NBD_REP_ACK)
            self._go(Trigger.ABORT)
            return Aborted()
        if option == C.NBD_OPT_LIST:
            if data:
                self._refuse(option, C.NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                return None
            return self._ask(ExportListRequest())
        if option in (C.NBD_OPT_INFO, C.NBD_OPT_GO):
            return self._info_or_go(option, data)
        if option == C.NBD_OPT_STRUCTURED_REPLY:
            if data:
                self._refuse(
                    option, C.NBD_REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data"
                )
            else:
                self._structured = True
                self._reply(option, C.NBD_REP_ACK)
            return None
        if option in (C.NBD_OPT_LIST_META_CONTEXT, C.NBD_OPT_SET_META_CONTEXT):
            self._meta_context(option, data)
            return None
        self._refuse(option, C.NBD_REP_ERR_UNSUP, f"option {option} is not supported")
        return None

    def _starttls(self, data: bytes) -> StartTLS | None:
        option = C.NBD_OPT_STARTTLS
        if not self._require_tls:
            # NOTLS mode: "it MUST respond with NBD_REP_ERR_POLICY (if it does not support TLS
            # for policy reasons)"
            self._refuse(option, C.NBD_REP_ERR_POLICY, "TLS is not offered on this connection")
            return None
        if self._tls:
            # "If the server receives NBD_OPT_STARTTLS when TLS has already been negotiated,
            # it MUST reply with NBD_REP_ERR_INVALID."
            self._refuse(option, C.NBD_REP_ERR_INVALID, "TLS is already started")
            return None
        if data:
            self._refuse(option, C.NBD_REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
            return None
        self._reply(option, C.NBD_REP_ACK)
        # What follows the option is TLS: hand over what was already received, and start
        # negotiation afresh (nothing negotiated in plain text carries over).
        received = bytes(self._buf[self._start : self._end])
        self._start = self._end = self._want = 0
        self._structured = False
        self._meta_export = None
        self._meta_selected = False
        self._go(Trigger.STARTTLS)
        return StartTLS(received)

    def tls_started(self) -> None:
        """The TLS handshake the ``StartTLS`` event asked for is done: negotiation goes on,
        and every byte fed from now on is the decrypted stream.

        Raises:
            StateError: no ``StartTLS`` is pending.
        """
        if self._state is not State.AWAIT_TLS:
            raise StateError("no NBD_OPT_STARTTLS is pending")
        self._tls = True
        self._go(Trigger.TLS_STARTED)

    def _ask(self, request: ExportRequest | ExportListRequest) -> Event:
        self._pending = request
        self._go(Trigger.OPTION_FOR_SERVER)
        return request

    def _info_or_go(self, option: int, data: bytes) -> Event | None:
        parsed = _parse_info_request(data)
        if isinstance(parsed, str):
            self._refuse(option, C.NBD_REP_ERR_INVALID, parsed)
            return None
        name, infos = parsed
        return self._ask(ExportRequest(option, name, infos))

    def _meta_context(self, option: int, data: bytes) -> None:
        if not self._structured:
            # "the server SHOULD reply with NBD_REP_ERR_INVALID" without structured replies
            self._refuse(option, C.NBD_REP_ERR_INVALID, "negotiate structured replies first")
            return
        parsed = _parse_meta_context_request(data)
        if isinstance(parsed, str):
            self._refuse(option, C.NBD_REP_ERR_INVALID, parsed)
            return
        name, queries = parsed
        if option == C.NBD_OPT_LIST_META_CONTEXT:
            # an empty query list or the "base:" namespace lists every context
            found = not queries or any(q in ("base:", C.BASE_ALLOCATION) for q in queries)
        else:
            found = C.BASE_ALLOCATION in queries
            self._meta_export = name
            self._meta_selected = found
        if found:
            context = _U32.pack(BASE_ALLOCATION_ID) + C.BASE_ALLOCATION.encode()
            self._reply(option, C.NBD_REP_META_CONTEXT, context)
        self._reply(option, C.NBD_REP_ACK)

    # -- answers from the server -----------------------------------------------------------

    def send_export_list(self, exports: Sequence[tuple[str, str]]) -> None:
        """Answer an ``ExportListRequest`` with ``(name, description)`` pairs.

        Raises:
            StateError: no ``ExportListRequest`` is pending.
        """
        if not isinstance(self._pending, ExportListRequest):
            raise StateError("no NBD_OPT_LIST is pending")
        for name, description in exports:
            raw = name.encode()
            self._reply(
                C.NBD_OPT_LIST, C.NBD_REP_SERVER, _U32.pack(len(raw)) + raw + description.encode()
            )
        self._reply(C.NBD_OPT_LIST, C.NBD_REP_ACK)
        self._pending = None
        self._go(Trigger.ANSWERED)

    def send_export(self, details: ExportDetails) -> None:
        """Answer an ``ExportRequest`` with the export's details.

        For NBD_OPT_GO and NBD_OPT_EXPORT_NAME the connection enters the transmission phase
        with this export; for NBD_OPT_INFO it stays in the handshake.

        Raises:
            StateError: no ``ExportRequest`` is pending.
        """
        request = self._pending
        if not isinstance(request, ExportRequest):
            raise StateError("no NBD export request is pending")
        self._pending = None
        flags = details.transmission_flags
        if request.option == C.NBD_OPT_EXPORT_NAME:
            self._out += _EXPORT_NAME_REPLY.pack(details.size, flags)
            if not self._no_zeroes:
                self._out += bytes(124)
            self._enter_transmission(details, request.name)
            return
        option = request.option
        self._reply(
            option, C.NBD_REP_INFO, _INFO_EXPORT.pack(C.NBD_INFO_EXPORT, details.size, flags)
        )
        if C.NBD_INFO_NAME in request.requested_info:
            self._reply(option, C.NBD_REP_INFO, _U16.pack(C.NBD_INFO_NAME) + details.name.encode())
        if C.NBD_INFO_DESCRIPTION in request.requested_info and details.description:
            desc = details.description.encode()[: C.NBD_MAX_STRING_SIZE]
            self._reply(option, C.NBD_REP_INFO, _U16.pack(C.NBD_INFO_DESCRIPTION) + desc)
        preferred = max(details.preferred_block_size, 1)
        block_size = _INFO_BLOCK_SIZE.pack(
            C.NBD_INFO_BLOCK_SIZE, 1, preferred, max(self._max_payload, preferred)
        )
        self._reply(option, C.NBD_REP_INFO, block_size)
        self._reply(option, C.NBD_REP_ACK)
        if option == C.NBD_OPT_GO:
            self._enter_transmission(details, request.name)
        else:
            self._go(Trigger.ANSWERED)

    def send_export_error(self, error: int = C.NBD_REP_ERR_UNKNOWN, message: str = "") -> None:
        """Refuse the pending request with an ``NBD_REP_ERR_*`` value and a message.

        NBD_OPT_EXPORT_NAME cannot be refused on the wire: the connection moves to CLOSED
        and the server must close it.

        Raises:
            StateError: no request is pending.
        """
        request = self._pending
        if request is None:
            raise StateError("no NBD option is pending")
        self._pending = None
        if isinstance(request, ExportRequest) and request.option == C.NBD_OPT_EXPORT_NAME:
            self._go(Trigger.EXPORT_NAME_REFUSED)
            return
        option = request.option if isinstance(request, ExportRequest) else C.NBD_OPT_LIST
        self._refuse(option, error | C.NBD_REP_FLAG_ERROR, message)
        self._go(Trigger.ANSWERED)

    def _enter_transmission(self, details: ExportDetails, requested_name: str) -> None:
        self._export = details
        self._size = details.size
        self._read_only = details.read_only
        # "the server MUST NOT" honour contexts selected for a different export
        self._base_allocation = self._meta_selected and self._meta_export == requested_name
        self._go(Trigger.EXPORT_ACCEPTED)

    # -- transmission --------------------------------------------------------------------

    def _next_command(self) -> Event | Sentinel:
        if self._payload_ready is not None or self._payload is not None:
            return self._payload_done()
        start = self._start
        if self._end - start < 28:
            self._want = 28
            return self._starved()
        magic, flags, kind, cookie, offset, length = _REQUEST.unpack_from(self._buf, start)
        if magic != C.NBD_REQUEST_MAGIC:
            raise ProtocolError(f"bad NBD request magic {magic:#x}")
        if kind == C.NBD_CMD_DISC:
            self._start = start + 28
            self._go(Trigger.DISC)
            return Disconnect()
        error = self._check(kind, flags, offset, length)
        if kind != C.NBD_CMD_WRITE:
            self._start = start + 28
            self._want = 0
            return Command(kind, flags, cookie, offset, length, None, error)
        if error:
            self._start = start + 28
            self._skip = length
            self._want = 0
            return Command(kind, flags, cookie, offset, length, None, error)
        end = start + 28 + length
        if self._end < end:
            if length < _DIRECT_PAYLOAD or self._eof:
                self._want = 28 + length
                return self._starved()
            # receive the rest straight into the payload's own buffer
            payload = self._spare
            if payload is not None and len(payload) == length:
                self._spare = None
            else:
                payload = bytearray(length)
            have = self._end - start - 28
            payload[:have] = memoryview(self._buf)[start + 28 : self._end]
            self._start = self._end = 0
            self._want = 0
            self._payload = payload
            self._payload_filled = have
            self._payload_header = (flags, cookie, offset, length)
            return NEED_DATA
        payload_bytes = bytes(memoryview(self._buf)[start + 28 : end])
        self._start = end
        self._want = 0
        return Command(kind, flags, cookie, offset, length, payload_bytes, 0)

    def release_payload(self, payload: Buffer | None) -> None:
        """Hand back the payload of a WRITE ``Command`` that nothing uses any more: the next
        large WRITE of the same length is received into it. A fresh buffer costs zeroing and
        a page fault per page, about 40 us per MiB. Anything else is ignored."""
        if type(payload) is bytearray and len(payload) >= _DIRECT_PAYLOAD:
            self._spare = payload

    def next_reads(self) -> list[tuple[int, int, int]]:
        """Consume the READ requests at the head of the receive buffer that are complete and
        valid, up to the first other message; returns their ``(cookie, offset, length)``.

        This is ``next_event`` for the common case of a pipeline of READs, without building
        a ``Command`` per request: each READ returned here would have been a ``Command`` with
        ``error`` 0, to be answered with ``reply_reads`` (or ``reply_error``). Anything else
        (another command, a READ the spec refuses, bad magic, a partial request) is left in
        the buffer for ``next_event``, which returns or raises what it always does, so the
        replies and errors stay in request order. Returns ``[]`` outside the transmission
        phase and after a protocol error.
        """
        start = self._start
        count = (self._end - start) // 28
        buf = self._buf
        if (
            not count
            or buf[start + 6]  # the type of the first request is not 0, NBD_CMD_READ
            or buf[start + 7]
            or self._state is not State.TRANSMISSION
            or self._skip
            or self._payload is not None
            or self._payload_ready is not None
            or self._error is not None
        ):
            return []
        allowed = ~(_FUA | C.NBD_CMD_FLAG_DF if self._structured else _FUA)
        size = self._size
        largest = self._max_payload
        reads: list[tuple[int, int, int]] = []
        append = reads.append
        with memoryview(buf) as view:
            for magic, flags, kind, cookie, offset, length in _REQUEST.iter_unpack(
                view[start : start + 28 * count]
            ):
                if (
                    kind  # NBD_CMD_READ is 0
                    or magic != C.NBD_REQUEST_MAGIC
                    or flags & allowed
                    or not 0 < length <= largest
                    or offset + length > size
                ):
                    break
                append((cookie, offset, length))
        if reads:
            self._start = start + 28 * len(reads)
            self._want = 0
        return reads

    def _payload_done(self) -> Event | Sentinel:
        payload = self._payload_ready
        if payload is None:
            if self._eof:
                raise ProtocolError("the client closed the connection in the middle of a message")
            return NEED_DATA
        self._payload_ready = None
        flags, cookie, offset, length = self._payload_header
        return Command(C.NBD_CMD_WRITE, flags, cookie, offset, length, payload, 0)

    def _check(self, kind: int, flags: int, offset: int, length: int) -> int:
        """The NBD error for a request, or 0 when it may be executed ("Request types")."""
        if kind == C.NBD_CMD_READ:
            allowed = _FUA | C.NBD_CMD_FLAG_DF if self._structured else _FUA
            if flags & ~allowed or length > self._max_payload:
                return C.NBD_EINVAL
            return C.NBD_EINVAL if offset + length > self._size else 0
        if kind == C.NBD_CMD_WRITE:
            if flags & ~_FUA or length > self._max_payload:
                return C.NBD_EINVAL
            if self._read_only:
                return C.NBD_EPERM
            return C.NBD_ENOSPC if offset + length > self._size else 0
        if kind == C.NBD_CMD_FLUSH:
            return C.NBD_EINVAL if flags & ~_FUA else 0
        if kind == C.NBD_CMD_TRIM:
            if flags & ~_FUA:
                return C.NBD_EINVAL
            if self._read_only:
                return C.NBD_EPERM
            return C.NBD_EINVAL if offset + length > self._size else 0
        if kind == C.NBD_CMD_WRITE_ZEROES:
            if flags & ~(_FUA | C.NBD_CMD_FLAG_NO_HOLE | C.NBD_CMD_FLAG_FAST_ZERO):
                return C.NBD_EINVAL
            if self._read_only:
                return C.NBD_EPERM
            return C.NBD_ENOSPC if offset + length > self._size else 0
        if kind == C.NBD_CMD_CACHE:
            if flags & ~_FUA:
                return C.NBD_EINVAL
            return C.NBD_EINVAL if offset + length > self._size else 0
        if kind == C.NBD_CMD_BLOCK_STATUS:
            if flags & ~(_FUA | C.NBD_CMD_FLAG_REQ_ONE) or not self._base_allocation:
                return C.NBD_EINVAL
            if length == 0 or offset + length > self._size:
                return C.NBD_EINVAL
            return 0
        return C.NBD_EINVAL  # unknown command: "the server SHOULD return EINVAL"

    # -- replies (thread-safe: they only read negotiated state) ---------------------------

    def reply_ok(self, command: Command) -> list[Buffer]:
        """The success reply of a command without data (WRITE, FLUSH, TRIM, ZEROES, CACHE)."""
        return [_SIMPLE_REPLY.pack(C.NBD_SIMPLE_REPLY_MAGIC, 0, command.cookie)]

    def reply_error(self, command: Command, error: int) -> list[Buffer]:
        """The error reply with NBD error value ``error`` (see ``constants.wire_error``)."""
        if self._structured and command.type in (C.NBD_CMD_READ, C.NBD_CMD_BLOCK_STATUS):
            return [
                _CHUNK_ERROR.pack(
                    C.NBD_STRUCTURED_REPLY_MAGIC,
                    C.NBD_REPLY_FLAG_DONE,
                    C.NBD_REPLY_TYPE_ERROR,
                    command.cookie,
                    6,
                    error,
                    0,
                )
            ]
        return [_SIMPLE_REPLY.pack(C.NBD_SIMPLE_REPLY_MAGIC, error, command.cookie)]

    def reply_read(self, command: Command, data: Buffer) -> list[Buffer]:
        """The reply of a successful READ carrying ``data`` (``command.length`` bytes)."""
        if not self._structured:
            return [_SIMPLE_REPLY.pack(C.NBD_SIMPLE_REPLY_MAGIC, 0, command.cookie), data]
        n = len(data)
        if n == 0:
            return [
                _CHUNK.pack(
                    C.NBD_STRUCTURED_REPLY_MAGIC,
                    C.NBD_REPLY_FLAG_DONE,
                    C.NBD_REPLY_TYPE_NONE,
                    command.cookie,
                    0,
                )
            ]
        header = _CHUNK_OFFSET_DATA.pack(
            C.NBD_STRUCTURED_REPLY_MAGIC,
            C.NBD_REPLY_FLAG_DONE,
            C.NBD_REPLY_TYPE_OFFSET_DATA,
            command.cookie,
            8 + n,
            command.offset,
        )
        return [header, data]

    def reply_reads(self, reads: Sequence[tuple[int, int, int]]) -> tuple[bytearray, list[int]]:
        """The success replies of the READs ``reads`` (``(cookie, offset, length)`` as from
        ``next_reads``), back to back in one new buffer for one send: every header is
        filled in and every data field is left for the caller to fill. Returns the buffer
        and where each read's data starts; reply ``i`` is the buffer from the end of reply
        ``i - 1`` (0 for the first) to its data start plus its length."""
        if self._structured:
            header = _CHUNK_OFFSET_DATA
            size = header.size
            total = sum(r[2] for r in reads) + size * len(reads)
            out = bytearray(total)
            pack_into = header.pack_into
            magic = C.NBD_STRUCTURED_REPLY_MAGIC
            done = C.NBD_REPLY_FLAG_DONE
            kind = C.NBD_REPLY_TYPE_OFFSET_DATA
            starts: list[int] = []
            pos = 0
            for cookie, offset, length in reads:
                pack_into(out, pos, magic, done, kind, cookie, 8 + length, offset)
                pos += size
                starts.append(pos)
                pos += length
            return out, starts
        size = _SIMPLE_REPLY.size
        out = bytearray(sum(r[2] for r in reads) + size * len(reads))
        pack_into = _SIMPLE_REPLY.pack_into
        magic = C.NBD_SIMPLE_REPLY_MAGIC
        starts = []
        pos = 0
        for cookie, _, length in reads:
            pack_into(out, pos, magic, 0, cookie)
            pos += size
            starts.append(pos)
            pos += length
        return out, starts

    def reply_block_status(
        self, command: Command, extents: Iterable[tuple[int, int]]
    ) -> list[Buffer]:
        """The reply of a BLOCK_STATUS: ``extents`` are ``(length, NBD_STATE_* flags)`` in
        order from ``command.offset``; adjacent runs with equal flags are merged, empty ones
        dropped, and with NBD_CMD_FLAG_REQ_ONE only the first is sent, cut to the request.

        Raises:
            ValueError: ``extents`` is empty (the spec requires at least one).
        """
        merged: list[int] = []
        for length, state in extents:
            if length <= 0:
                continue
            if merged and merged[-1] == state:
                merged[-2] += length
            else:
                if len(merged) >= 2 * _MAX_EXTENTS:
                    break
                merged += (length, state)
        if not merged:
            raise ValueError("BLOCK_STATUS needs at least one extent")
        if command.flags & C.NBD_CMD_FLAG_REQ_ONE:
            merged = [min(merged[0], command.length), merged[1]]
        count = len(merged)
        body = struct.pack(f">I{count}I", BASE_ALLOCATION_ID, *merged)
        header = _CHUNK.pack(
            C.NBD_STRUCTURED_REPLY_MAGIC,
            C.NBD_REPLY_FLAG_DONE,
            C.NBD_REPLY_TYPE_BLOCK_STATUS,
            command.cookie,
            len(body),
        )
        return [header, body]


def _parse_string(data: bytes, pos: int, what: str) -> tuple[str, int] | str:
    """A ``u32 length, bytes`` string at ``pos``: (text, next position) or an error message."""
    if len(data) < pos + 4:
        return f"{what}: truncated length"
    (n,) = _U32.unpack_from(data, pos)
    pos += 4
    if n > C.NBD_MAX_STRING_SIZE:
        return f"{what}: longer than {C.NBD_MAX_STRING_SIZE} bytes"
    if len(data) < pos + n:
        return f"{what}: truncated"
    try:
        return data[pos : pos + n].decode(), pos + n
    except UnicodeDecodeError:
        return f"{what}: not UTF-8"


def _parse_info_request(data: bytes) -> tuple[str, frozenset[int]] | str:
    """``u32 namelen, name, u16 n, u16 info[n]`` ("NBD_OPT_INFO and NBD_OPT_GO")."""
    parsed = _parse_string(data, 0, "export name")
    if isinstance(parsed, str):
        return parsed
    name, pos = parsed
    if len(data) < pos + 2:
        return "information request count missing"
    (count,) = _U16.unpack_from(data, pos)
    pos += 2
    if len(data) != pos + 2 * count:
        return "information request list has the wrong length"
    infos = frozenset(struct.unpack_from(f">{count}H", data, pos))
    return name, infos


def _parse_meta_context_request(data: bytes) -> tuple[str, list[str]] | str:
    """``u32 namelen, name, u32 nq, {u32 len, query}[nq]`` ("Metadata querying")."""
    parsed = _parse_string(data, 0, "export name")
    if isinstance(parsed, str):
        return parsed
    name, pos = parsed
    if len(data) < pos + 4:
        return "query count missing"
    (count,) = _U32.unpack_from(data, pos)
    pos += 4
    queries: list[str] = []
    for _ in range(count):
        item = _parse_string(data, pos, "metadata context query")
        if isinstance(item, str):
            return item
        query, pos = item
        queries.append(query)
    if pos != len(data):
        return "trailing bytes after the queries"
    return name, queries
