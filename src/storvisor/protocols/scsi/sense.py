"""SCSI status codes and fixed-format sense data (SPC-4 4.5.3), and the sense an I/O error
of the volume becomes."""

from __future__ import annotations

import enum
import errno as _errno
from dataclasses import dataclass


class Status(enum.IntEnum):
    """SAM status codes."""

    GOOD = 0x00
    CHECK_CONDITION = 0x02
    BUSY = 0x08
    TASK_SET_FULL = 0x28


class SenseKey(enum.IntEnum):
    NO_SENSE = 0x0
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7


@dataclass(frozen=True, slots=True)
class Sense:
    """A sense key with its additional sense code and qualifier."""

    key: SenseKey
    asc: int
    ascq: int = 0

    def fixed(self) -> bytes:
        """The 18 bytes of fixed-format sense data: response code 70h (current error),
        additional sense length 0Ah."""
        data = bytearray(18)
        data[0] = 0x70
        data[2] = self.key
        data[7] = 0x0A
        data[12] = self.asc
        data[13] = self.ascq
        return bytes(data)


NO_SENSE = Sense(SenseKey.NO_SENSE, 0x00)
INVALID_COMMAND_OPERATION_CODE = Sense(SenseKey.ILLEGAL_REQUEST, 0x20)
INVALID_FIELD_IN_CDB = Sense(SenseKey.ILLEGAL_REQUEST, 0x24)
INVALID_FIELD_IN_PARAMETER_LIST = Sense(SenseKey.ILLEGAL_REQUEST, 0x26)
PARAMETER_LIST_LENGTH_ERROR = Sense(SenseKey.ILLEGAL_REQUEST, 0x1A)
LBA_OUT_OF_RANGE = Sense(SenseKey.ILLEGAL_REQUEST, 0x21)
SAVING_PARAMETERS_NOT_SUPPORTED = Sense(SenseKey.ILLEGAL_REQUEST, 0x39)
CAPACITY_DATA_HAS_CHANGED = Sense(SenseKey.UNIT_ATTENTION, 0x2A, 0x09)
WRITE_PROTECTED = Sense(SenseKey.DATA_PROTECT, 0x27)
SPACE_ALLOCATION_FAILED = Sense(SenseKey.DATA_PROTECT, 0x27, 0x07)
"""SBC-3 4.7.3.6: a thin device out of space; Linux turns it into ENOSPC."""
UNRECOVERED_READ_ERROR = Sense(SenseKey.MEDIUM_ERROR, 0x11)
WRITE_ERROR = Sense(SenseKey.MEDIUM_ERROR, 0x0C)
INTERNAL_TARGET_FAILURE = Sense(SenseKey.HARDWARE_ERROR, 0x44)


def io_error_sense(errno: int, *, writing: bool) -> Sense:
    """The sense for a request whose I/O failed with ``errno`` (``IOFailure.errno``).

    ENOSPC is SPACE ALLOCATION FAILED WRITE PROTECT (the thin pool is full), EPERM and
    EROFS WRITE PROTECTED, EINVAL (the volume shrank under the request) LBA OUT OF RANGE;
    a failed read or write of the medium (EIO, ENODATA, EILSEQ) is a MEDIUM ERROR
    (UNRECOVERED READ ERROR or WRITE ERROR) and anything else (EBADF of a closed volume,
    ENOMEM...) a HARDWARE ERROR, INTERNAL TARGET FAILURE.
    """
    if errno == _errno.ENOSPC or errno == _errno.EDQUOT:
        return SPACE_ALLOCATION_FAILED
    if errno in (_errno.EPERM, _errno.EROFS):
        return WRITE_PROTECTED
    if errno == _errno.EINVAL:
        return LBA_OUT_OF_RANGE
    if errno in (_errno.EIO, _errno.ENODATA, _errno.EILSEQ, _errno.ENXIO):
        return WRITE_ERROR if writing else UNRECOVERED_READ_ERROR
    return INTERNAL_TARGET_FAILURE
