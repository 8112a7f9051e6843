"""vhost-user wire format: constants, payload structs and the message codec.

Everything is named as QEMU's ``docs/interop/vhost-user.rst`` names it. A message is a 12-byte
header (``u32 request, u32 flags, u32 size``, native byte order, which this module fixes to
little-endian: vhost-user back-ends here run on x86-64) followed by ``size`` bytes of payload.
File descriptors travel beside the header as ``SCM_RIGHTS``; this module only carries them as
integers and never opens, closes or maps anything.

Decoding is split in two because the fds arrive with the header: the I/O shell reads the
header (and its fds), asks :func:`decode_header` how many payload bytes follow, reads them and
builds a :class:`Message`. Every malformed input raises :class:`~storvisor.errors.ProtocolError`.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from storvisor.errors import ProtocolError

HEADER = struct.Struct("<III")
"""``u32 request, u32 flags, u32 size``."""

VHOST_USER_VERSION = 0x1
VHOST_USER_VERSION_MASK = 0x3
VHOST_USER_REPLY_MASK = 0x1 << 2
VHOST_USER_NEED_REPLY_MASK = 0x1 << 3

REPLY_FLAGS = VHOST_USER_VERSION | VHOST_USER_REPLY_MASK
"""Flags of every reply: exactly 0x5 ("never echo NEED_REPLY")."""

MAX_PAYLOAD = 4096
"""Largest payload accepted (the biggest legal one is a config message of 12 + 256 bytes)."""

MAX_FDS = 8
"""``VHOST_MEMORY_BASELINE_NREGIONS``: the most fds one message may carry."""

VHOST_USER_MAX_CONFIG_SIZE = 256


class Request(enum.IntEnum):
    """Front-end to back-end requests (``VhostUserRequest``)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class BackendRequest(enum.IntEnum):
    """Back-end to front-end requests on the ``SET_BACKEND_REQ_FD`` channel."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3


class ProtocolFeature(enum.IntEnum):
    """Bit numbers of ``VHOST_USER_PROTOCOL_F_*``."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


VHOST_USER_F_PROTOCOL_FEATURES = 30
"""Feature bit (in GET/SET_FEATURES) announcing protocol-feature negotiation."""
VHOST_F_LOG_ALL = 26

# Payload structs, as the spec names them.
U64 = struct.Struct("<Q")
VHOST_VRING_STATE = struct.Struct("<II")
"""``index, num``."""
VHOST_VRING_ADDR = struct.Struct("<IIQQQQ")
"""``index, flags, descriptor, used, available, log`` (user addresses; log is guest-phys)."""
VHOST_USER_MEMORY = struct.Struct("<II")
"""``nregions, padding``, followed by that many regions."""
VHOST_USER_MEMORY_REGION = struct.Struct("<QQQQ")
"""``guest_phys_addr, memory_size, userspace_addr, mmap_offset``."""
VHOST_USER_MEM_REG_MSG = struct.Struct("<QQQQQ")
"""``padding`` + one region (ADD_MEM_REG / REM_MEM_REG)."""
VHOST_USER_LOG = struct.Struct("<QQ")
"""``mmap_size, mmap_offset``."""
VHOST_USER_CONFIG = struct.Struct("<III")
"""``offset, size, flags``, followed by ``size`` bytes of config space."""
VHOST_USER_INFLIGHT = struct.Struct("<QQHH4x")
"""``mmap_size, mmap_offset, num_queues, queue_size``: 24 bytes (QEMU's struct is unpacked)."""

VHOST_USER_VRING_IDX_MASK = 0xFF
VHOST_USER_VRING_NOFD_MASK = 0x1 << 8
VHOST_VRING_F_LOG = 0x1
VHOST_USER_MAX_RAM_SLOTS = 8


@dataclass(slots=True)
class Message:
    """One decoded message: ``request`` is an int (unknown ids are legal on the wire).

    ``fds`` are the descriptors that arrived with it. A handler that keeps one calls
    :meth:`take_fd`; the I/O shell closes whatever is left in ``fds`` afterwards.
    """

    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_NEED_REPLY_MASK)

    @property
    def name(self) -> str:
        try:
            return Request(self.request).name
        except ValueError:
            return f"request {self.request}"

    def take_fd(self) -> int:
        """Remove and return the first fd; ``ProtocolError`` if the message carries none."""
        if not self.fds:
            raise ProtocolError(f"{self.name}: file descriptor missing")
        return self.fds.pop(0)

    def expect_size(self, *sizes: int) -> None:
        """``ProtocolError`` unless the payload has one of ``sizes`` bytes."""
        if len(self.payload) not in sizes:
            raise ProtocolError(
                f"{self.name}: payload of {len(self.payload)} bytes, expected {sizes}"
            )


def decode_header(data: bytes | bytearray | memoryview) -> tuple[int, int, int]:
    """Parse the 12-byte header into ``(request, flags, size)``.

    Raises ``ProtocolError`` for a short header, a version other than 1, or a payload larger
    than :data:`MAX_PAYLOAD` (so the shell never allocates on a hostile size).
    """
    if len(data) != HEADER.size:
        raise ProtocolError(f"short vhost-user header ({len(data)} bytes)")
    request, flags, size = HEADER.unpack(data)
    if flags & VHOST_USER_VERSION_MASK != VHOST_USER_VERSION:
        raise ProtocolError(f"unsupported vhost-user version in flags {flags:#x}")
    if size > MAX_PAYLOAD:
        raise ProtocolError(f"vhost-user payload of {size} bytes is too large")
    return request, flags, size


def encode(request: int, payload: bytes = b"", *, flags: int = VHOST_USER_VERSION) -> bytes:
    """Frame a message: header + payload."""
    return HEADER.pack(request, flags, len(payload)) + payload


def encode_reply(request: int, payload: bytes) -> bytes:
    """Frame a reply to ``request``: flags exactly 0x5 and the exact payload size."""
    return encode(request, payload, flags=REPLY_FLAGS)


def decode_reply(request: int, data: bytes | bytearray | memoryview) -> tuple[int, int]:
    """Check a reply header (front-end side): ``(flags, size)``; ``ProtocolError`` if it does
    not answer ``request`` or its flags are not exactly 0x5."""
    got, flags, size = decode_header(data)
    if got != request:
        raise ProtocolError(f"reply to request {got}, expected {request}")
    if flags != REPLY_FLAGS:
        raise ProtocolError(f"reply flags {flags:#x}, expected {REPLY_FLAGS:#x}")
    return flags, size


@dataclass(frozen=True, slots=True)
class MemoryRegion:
    """``VhostUserMemoryRegion``: one slice of guest RAM in a shared fd."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    def pack(self) -> bytes:
        return VHOST_USER_MEMORY_REGION.pack(
            self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset
        )


def unpack_mem_table(payload: bytes) -> list[MemoryRegion]:
    """Parse a SET_MEM_TABLE payload; ``ProtocolError`` on a bad count or size."""
    if len(payload) < VHOST_USER_MEMORY.size:
        raise ProtocolError("SET_MEM_TABLE: payload too short")
    nregions, _ = VHOST_USER_MEMORY.unpack_from(payload)
    if nregions > VHOST_USER_MAX_RAM_SLOTS:
        raise ProtocolError(f"SET_MEM_TABLE: {nregions} regions (at most 8)")
    # QEMU sends the full fixed-size array; accept both the exact and the padded size.
    exact = VHOST_USER_MEMORY.size + nregions * VHOST_USER_MEMORY_REGION.size
    full = VHOST_USER_MEMORY.size + VHOST_USER_MAX_RAM_SLOTS * VHOST_USER_MEMORY_REGION.size
    if len(payload) not in (exact, full):
        raise ProtocolError(f"SET_MEM_TABLE: payload of {len(payload)} bytes for {nregions}")
    return [
        MemoryRegion(*VHOST_USER_MEMORY_REGION.unpack_from(payload, 8 + 32 * i))
        for i in range(nregions)
    ]


def pack_mem_table(regions: list[MemoryRegion]) -> bytes:
    """Build a SET_MEM_TABLE payload (exact size, as QEMU sends it padded to 8 regions)."""
    body = b"".join(r.pack() for r in regions)
    padding = bytes(VHOST_USER_MEMORY_REGION.size * (VHOST_USER_MAX_RAM_SLOTS - len(regions)))
    return VHOST_USER_MEMORY.pack(len(regions), 0) + body + padding


def unpack_mem_reg(payload: bytes, name: str = "memory region message") -> MemoryRegion:
    """Parse the ADD_MEM_REG / REM_MEM_REG payload."""
    if len(payload) != VHOST_USER_MEM_REG_MSG.size:
        raise ProtocolError(f"{name}: payload of {len(payload)} bytes, expected 40")
    _, gpa, size, uaddr, offset = VHOST_USER_MEM_REG_MSG.unpack(payload)
    return MemoryRegion(gpa, size, uaddr, offset)


def pack_mem_reg(region: MemoryRegion) -> bytes:
    return U64.pack(0) + region.pack()
