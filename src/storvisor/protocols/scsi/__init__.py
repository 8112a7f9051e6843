"""SCSI for storvisor's LIO backstores, sans I/O: the block-device emulation of one logical
unit (``lun``) and the sense data it answers with (``sense``)."""

from storvisor.protocols.scsi.lun import (
    BUSY,
    GOOD,
    IoKind,
    IoRequest,
    LunIdentity,
    LunLimits,
    Reply,
    ScsiLun,
    check_condition,
    io_error_reply,
)
from storvisor.protocols.scsi.sense import Sense, SenseKey, Status

__all__ = [
    "BUSY",
    "GOOD",
    "IoKind",
    "IoRequest",
    "LunIdentity",
    "LunLimits",
    "Reply",
    "ScsiLun",
    "Sense",
    "SenseKey",
    "Status",
    "check_condition",
    "io_error_reply",
]
