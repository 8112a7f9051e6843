"""Events a ``ServerConnection`` hands to the server it is embedded in.

Handshake events ask the server a question only it can answer (which exports exist, what a
named export looks like); the server answers with the matching ``ServerConnection`` method.
``StartTLS`` asks it to upgrade the connection to TLS. Transmission events are the client's
commands. Everything else (option framing, structured replies, metadata contexts, flag and
range validation) the codec handles by itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Sentinel(Enum):
    """Markers ``next_event`` returns when no event is ready."""

    NEED_DATA = "NEED_DATA"
    """Feed more bytes (``receive_data`` or ``get_buffer``/``buffer_updated``) first."""


NEED_DATA = Sentinel.NEED_DATA


@dataclass(frozen=True, slots=True)
class ExportListRequest:
    """NBD_OPT_LIST: answer with ``ServerConnection.send_export_list``."""


@dataclass(frozen=True, slots=True)
class ExportRequest:
    """NBD_OPT_INFO, NBD_OPT_GO or NBD_OPT_EXPORT_NAME for export ``name``.

    Answer with ``ServerConnection.send_export`` (for GO and EXPORT_NAME this enters the
    transmission phase) or ``ServerConnection.send_export_error`` (for EXPORT_NAME the only
    possible refusal is closing the connection). ``name`` may be empty: the default export.
    ``requested_info`` holds the NBD_INFO_* types the client asked for.
    """

    option: int
    name: str
    requested_info: frozenset[int]


@dataclass(frozen=True, slots=True)
class StartTLS:
    """NBD_OPT_STARTTLS accepted: send the queued ACK (``data_to_send``), run the server side
    of a TLS handshake on the connection, then call ``ServerConnection.tls_started`` and feed
    the decrypted bytes from then on. If the handshake fails, close the connection: after
    the ACK there is no way back to plain text.

    ``received`` holds bytes the client sent after the option that the codec had already
    received: the start of the TLS handshake, to be given to the TLS layer before anything
    read from the socket (normally empty, as a client waits for the ACK). It is left out of
    comparisons: it says how the bytes were cut, not what the client asked.
    """

    received: bytes = field(default=b"", compare=False)


@dataclass(frozen=True, slots=True)
class Aborted:
    """NBD_OPT_ABORT: the ACK is queued in ``data_to_send``; send it, then close."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The client closed its end at a message boundary (end of file, no NBD_CMD_DISC)."""


@dataclass(frozen=True, slots=True)
class Disconnect:
    """NBD_CMD_DISC: finish the commands in flight, send their replies, then close."""


class Command:
    """One transmission request (``NBD_CMD_*``), already validated against the export.

    ``error`` is 0 for a command to execute, or the NBD error value the codec already chose
    (bad flags, out of range, read-only export, unknown command, no metadata context): the
    server must reply with ``reply_error(command, command.error)`` without touching the
    device. ``payload`` holds the data of a WRITE to execute, owned by the command (the
    codec keeps no reference); it is ``None`` otherwise, and the data of a refused WRITE is
    drained by the codec. A plain slotted class: one is built per request on the hot path.
    """

    __slots__ = ("cookie", "error", "flags", "length", "offset", "payload", "type")

    def __init__(
        self,
        type: int,
        flags: int,
        cookie: int,
        offset: int,
        length: int,
        payload: bytes | bytearray | None = None,
        error: int = 0,
    ) -> None:
        self.type = type
        self.flags = flags
        self.cookie = cookie
        self.offset = offset
        self.length = length
        self.payload = payload
        self.error = error

    def __repr__(self) -> str:
        return (
            f"Command(type={self.type}, flags={self.flags:#x}, cookie={self.cookie:#x}, "
            f"offset={self.offset}, length={self.length}, error={self.error})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Command):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self.__slots__)

    __hash__ = None  # type: ignore[assignment]


Event = (
    ExportListRequest | ExportRequest | StartTLS | Aborted | ConnectionClosed | Disconnect | Command
)
