"""A fake guest for the kernel's vhost-scsi: drives ``/dev/vhost-scsi`` with no VM.

Theory of operation
-------------------
This process plays QEMU and the guest's virtio-scsi driver at once. Its "guest RAM" is one
memfd region (``GuestRam``) whose guest-physical base differs from its address in this
process; the memory table (``VHOST_SET_MEM_TABLE``) maps one to the other, so descriptors
carry guest-physical addresses while the ring addresses given to ``VHOST_SET_VRING_ADDR``
are this process's real virtual addresses (vhost reads the rings with ``copy_from_user``).
Queues 0 (control), 1 (event) and 2 (the one request queue) are laid out with the split-ring
code of ``storvisor.testing.vhost_frontend``; ``VHOST_SCSI_SET_ENDPOINT`` then binds them to
the LIO vhost target named by its WWPN and TPG tag. Closing the fd clears the endpoint.

A command is a chain of four buffers: ``virtio_scsi_cmd_req`` (51 bytes: LUN address, tag,
task attribute, CDB) and the Data-Out buffer (read by the device), then
``virtio_scsi_cmd_resp`` (108 bytes: sense length, residual, status, response, sense) and the
Data-In buffer (written by it). vhost-scsi reports a used length of 0, so the amount of
Data-In is the buffer's length minus the residual. Commands run one at a time; every wait
is bounded by ``timeout`` (``TimeoutError``).

Sources: ``include/uapi/linux/vhost.h`` (the ioctls and their structs),
``include/uapi/linux/virtio_scsi.h`` (request and response), ``drivers/vhost/scsi.c``.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct
from dataclasses import dataclass
from types import TracebackType

from storvisor.testing.vhost_frontend.driver_ring import DriverQueue, layout_queues
from storvisor.testing.vhost_frontend.guest_memory import GuestRam, RegionSpec

VHOST_GET_FEATURES = 0x8008AF00
VHOST_SET_FEATURES = 0x4008AF00
VHOST_SET_OWNER = 0xAF01
VHOST_SET_MEM_TABLE = 0x4008AF03
VHOST_SET_VRING_NUM = 0x4008AF10
VHOST_SET_VRING_ADDR = 0x4028AF11
VHOST_SET_VRING_BASE = 0x4008AF12
VHOST_SET_VRING_KICK = 0x4008AF20
VHOST_SET_VRING_CALL = 0x4008AF21
VHOST_SCSI_SET_ENDPOINT = 0x40E8AF40
VHOST_SCSI_CLEAR_ENDPOINT = 0x40E8AF41
VHOST_SCSI_GET_ABI_VERSION = 0x4004AF42

VHOST_MEMORY = struct.Struct("<II")  # nregions, padding; then the regions
VHOST_MEMORY_REGION = struct.Struct("<QQQQ")  # guest_phys_addr, size, userspace_addr, flags
VHOST_VRING_STATE = struct.Struct("<II")  # index, num
VHOST_VRING_FILE = struct.Struct("<Ii")  # index, fd
VHOST_VRING_ADDR = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail, log
VHOST_SCSI_TARGET = struct.Struct("<i224sHH")  # abi_version, wwpn, tpgt, reserved

VIRTIO_SCSI_CMD_REQ = struct.Struct("<8sQBBB32s")  # lun, tag, task_attr, prio, crn, cdb
VIRTIO_SCSI_CMD_RESP = struct.Struct("<IIHBB96s")  # sense_len, resid, qualifier, status, ...

VIRTIO_SCSI_S_OK = 0
VIRTIO_SCSI_S_SIMPLE = 0
REQUEST_QUEUE = 2
GUEST_BASE = 0x4000_0000
"""Guest-physical address of the fake guest's RAM (not its address in this process)."""


@dataclass(frozen=True, slots=True)
class ScsiResult:
    """What the device answered: ``response`` (virtio-scsi, 0 = OK), SCSI ``status`` (0 =
    GOOD, 2 = CHECK CONDITION), ``sense`` data, ``resid`` and the Data-In received."""

    response: int
    status: int
    sense: bytes
    resid: int
    data: bytes

    @property
    def ok(self) -> bool:
        return self.response == VIRTIO_SCSI_S_OK and self.status == 0

    @property
    def sense_key(self) -> int:
        """The sense key of fixed-format sense data (0 when there is none)."""
        return self.sense[2] & 0x0F if len(self.sense) > 2 else 0

    @property
    def asc(self) -> tuple[int, int]:
        """ASC and ASCQ of fixed-format sense data."""
        return (self.sense[12], self.sense[13]) if len(self.sense) > 13 else (0, 0)


def lun_address(tpgt: int, lun: int) -> bytes:
    """The 8-byte virtio-scsi LUN field: ``1, target, 0x40 | lun >> 8, lun & 0xff``; vhost-scsi
    takes the TPG tag as the target."""
    return bytes([1, tpgt, 0x40 | (lun >> 8), lun & 0xFF, 0, 0, 0, 0])


class VhostScsiFrontend:
    """One fake guest bound to vhost target ``wwpn`` (TPG ``tpgt``); use as a context manager.

    ``memory_size`` bytes of guest RAM hold the rings and the buffers of one command at a
    time (so a transfer is at most about ``memory_size`` minus 64 KiB).
    """

    def __init__(
        self,
        wwpn: str,
        *,
        tpgt: int = 1,
        memory_size: int = 8 << 20,
        queue_size: int = 128,
        timeout: float = 30.0,
        device: str = "/dev/vhost-scsi",
    ) -> None:
        self.wwpn = wwpn
        self.tpgt = tpgt
        self.device = device
        self.timeout = timeout
        self.features = 0
        self.abi_version = -1
        self._memory = GuestRam([RegionSpec(GUEST_BASE, memory_size)])
        self._queue_size = queue_size
        self._queues: list[DriverQueue] = []
        self._fd = -1
        self._tag = 0

    def __enter__(self) -> VhostScsiFrontend:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def open(self) -> None:
        """Open the device, set it up and bind the endpoint. Raises ``OSError`` as the
        kernel does (``ENOENT`` for no such target, ``EEXIST`` if another guest has it)."""
        self._fd = os.open(self.device, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(self._fd, VHOST_SET_OWNER, 0)
            features = bytearray(8)
            fcntl.ioctl(self._fd, VHOST_GET_FEATURES, features)
            self.features = struct.unpack("<Q", features)[0]
            abi = bytearray(4)
            fcntl.ioctl(self._fd, VHOST_SCSI_GET_ABI_VERSION, abi)
            self.abi_version = struct.unpack("<i", abi)[0]
            fcntl.ioctl(self._fd, VHOST_SET_FEATURES, struct.pack("<Q", 0))
            region = self._memory.regions[0]
            user_base = _address_of(region.mm)
            table = VHOST_MEMORY.pack(1, 0) + VHOST_MEMORY_REGION.pack(
                GUEST_BASE, region.spec.size, user_base, 0
            )
            fcntl.ioctl(self._fd, VHOST_SET_MEM_TABLE, table)
            self._queues = layout_queues(self._memory, 3, self._queue_size, timeout=self.timeout)

            def user(gpa: int) -> int:
                return user_base + gpa - GUEST_BASE

            for q in self._queues:
                fcntl.ioctl(self._fd, VHOST_SET_VRING_NUM, VHOST_VRING_STATE.pack(q.index, q.size))
                fcntl.ioctl(self._fd, VHOST_SET_VRING_BASE, VHOST_VRING_STATE.pack(q.index, 0))
                addr = VHOST_VRING_ADDR.pack(
                    q.index, 0, user(q.desc_gpa), user(q.used_gpa), user(q.avail_gpa), 0
                )
                fcntl.ioctl(self._fd, VHOST_SET_VRING_ADDR, addr)
                fcntl.ioctl(
                    self._fd, VHOST_SET_VRING_KICK, VHOST_VRING_FILE.pack(q.index, q.kick_fd)
                )
                fcntl.ioctl(
                    self._fd, VHOST_SET_VRING_CALL, VHOST_VRING_FILE.pack(q.index, q.call_fd)
                )
            target = VHOST_SCSI_TARGET.pack(self.abi_version, self.wwpn.encode(), self.tpgt, 0)
            fcntl.ioctl(self._fd, VHOST_SCSI_SET_ENDPOINT, target)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the device (the kernel clears the endpoint) and free the guest RAM."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        for q in self._queues:
            q.close()
        self._queues = []
        if self._memory.regions:
            self._memory.close()

    # -- commands -------------------------------------------------------------------------

    def command(
        self, cdb: bytes, *, lun: int = 0, data_out: bytes = b"", data_in: int = 0
    ) -> ScsiResult:
        """Run one SCSI command on ``lun`` and wait for its completion."""
        memory = self._memory
        memory.rewind()
        self._tag += 1
        req = memory.alloc(VIRTIO_SCSI_CMD_REQ.size)
        memory.write(
            req,
            VIRTIO_SCSI_CMD_REQ.pack(
                lun_address(self.tpgt, lun), self._tag, VIRTIO_SCSI_S_SIMPLE, 0, 0, cdb
            ),
        )
        readable = [(req, VIRTIO_SCSI_CMD_REQ.size)]
        if data_out:
            out = memory.alloc(len(data_out), 512)
            memory.write(out, data_out)
            readable.append((out, len(data_out)))
        resp = memory.alloc(VIRTIO_SCSI_CMD_RESP.size)
        memory.write(resp, bytes(VIRTIO_SCSI_CMD_RESP.size))
        writable = [(resp, VIRTIO_SCSI_CMD_RESP.size)]
        din = 0
        if data_in:
            din = memory.alloc(data_in, 512)
            writable.append((din, data_in))
        queue = self._queues[REQUEST_QUEUE]
        head = queue.submit(readable, writable)
        queue.wait(head)
        sense_len, resid, _, status, response, sense = VIRTIO_SCSI_CMD_RESP.unpack(
            memory.read(resp, VIRTIO_SCSI_CMD_RESP.size)
        )
        received = memory.read(din, data_in - resid) if data_in and resid <= data_in else b""
        return ScsiResult(response, status, sense[: min(sense_len, 96)], resid, received)

    def test_unit_ready(self, lun: int = 0) -> ScsiResult:
        return self.command(bytes(6), lun=lun)

    def ready(self, lun: int = 0, *, attempts: int = 8) -> ScsiResult:
        """TEST UNIT READY until it answers anything but a unit attention (sense key 6),
        as an initiator does after LUNs were added; returns the last answer."""
        for _ in range(attempts - 1):
            result = self.test_unit_ready(lun)
            if result.status != 2 or result.sense_key != 6:
                return result
        return self.test_unit_ready(lun)

    def inquiry(self, lun: int = 0, *, page: int | None = None, length: int = 255) -> ScsiResult:
        evpd = 1 if page is not None else 0
        cdb = bytes([0x12, evpd, page or 0]) + struct.pack(">H", length) + b"\0"
        return self.command(cdb, lun=lun, data_in=length)

    def read_capacity16(self, lun: int = 0) -> tuple[int, int, ScsiResult]:
        """``(number of blocks, block size, result)``."""
        cdb = bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + b"\0\0"
        result = self.command(cdb, lun=lun, data_in=32)
        if not result.ok:
            return 0, 0, result
        last, block = struct.unpack(">QI", result.data[:12])
        return last + 1, block, result

    def read16(self, lba: int, blocks: int, block_size: int = 512, lun: int = 0) -> ScsiResult:
        cdb = bytes([0x88, 0]) + struct.pack(">QI", lba, blocks) + b"\0\0"
        return self.command(cdb, lun=lun, data_in=blocks * block_size)

    def write16(
        self, lba: int, data: bytes, block_size: int = 512, lun: int = 0, *, fua: bool = False
    ) -> ScsiResult:
        blocks = len(data) // block_size
        cdb = bytes([0x8A, 0x08 if fua else 0]) + struct.pack(">QI", lba, blocks) + b"\0\0"
        return self.command(cdb, lun=lun, data_out=data)

    def synchronize_cache(self, lun: int = 0) -> ScsiResult:
        return self.command(bytes([0x35]) + bytes(9), lun=lun)

    def unmap(self, lba: int, blocks: int, lun: int = 0) -> ScsiResult:
        """UNMAP one range (SBC-4 5.32: an 8-byte header, then 16-byte descriptors)."""
        descriptor = struct.pack(">QI4x", lba, blocks)
        params = struct.pack(">HH4x", 6 + len(descriptor), len(descriptor)) + descriptor
        cdb = bytes([0x42, 0]) + bytes(4) + b"\0" + struct.pack(">H", len(params)) + b"\0"
        return self.command(cdb, lun=lun, data_out=params)


def _address_of(mm: object) -> int:
    """The address of a writable buffer (an mmap) in this process."""
    anchor = ctypes.c_char.from_buffer(mm)  # type: ignore[arg-type]
    address = ctypes.addressof(anchor)
    del anchor  # the buffer export ends here, so the mmap can still be closed
    return address
