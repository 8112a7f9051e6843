"""Sans-I/O NBD (fixed newstyle), server side: ``ServerConnection`` and its events.

See ``storvisor.protocols.nbd.server`` for the theory of operation and
``storvisor.protocols.nbd.constants`` for the wire constants (named as in the NBD spec).
"""

from storvisor.protocols.nbd.constants import wire_error
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
from storvisor.protocols.nbd.server import (
    BASE_ALLOCATION_ID,
    MAX_OPTION_LENGTH,
    MAX_PAYLOAD,
    ExportDetails,
    ServerConnection,
)

__all__ = [
    "BASE_ALLOCATION_ID",
    "MAX_OPTION_LENGTH",
    "MAX_PAYLOAD",
    "NEED_DATA",
    "Aborted",
    "Command",
    "ConnectionClosed",
    "Disconnect",
    "Event",
    "ExportDetails",
    "ExportListRequest",
    "ExportRequest",
    "Sentinel",
    "ServerConnection",
    "StartTLS",
    "wire_error",
]
