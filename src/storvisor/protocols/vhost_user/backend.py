"""The vhost-user back-end control plane as a state machine over decoded messages.

Theory of operation
-------------------
:class:`VhostUserBackend` consumes one :class:`~.messages.Message` at a time
(:meth:`VhostUserBackend.handle`) and returns the :class:`Reply` to send, if any. It validates
every payload (exact sizes, queue indices, fd counts), keeps the negotiated features and the
per-queue vring state, and drives a :class:`BackendDevice` (a small injected interface the
I/O shell implements) for everything that touches the operating system: mapping memory,
creating the inflight buffer, starting and stopping the data plane of a queue. This module
performs no system calls.

File descriptors: a handler that keeps an fd passes it to the device, which owns it from
then on (and closes the one it replaces). Fds left in ``Message.fds`` after ``handle`` are
the shell's to close. Fds in a :class:`Reply` are closed by the shell once sent.

Queue life cycle (split rings): a queue *runs* once it has a size, ring addresses, guest
memory, a kick (fd or polling) and is enabled; enablement is implicit when
``VHOST_USER_F_PROTOCOL_FEATURES`` was not negotiated, else it waits for
``SET_VRING_ENABLE(1)``. ``SET_VRING_ENABLE(0)`` and ``GET_VRING_BASE`` stop it (the device
drains in-flight requests first); ``GET_VRING_BASE`` replies with the next avail index and
the queue waits for a new kick. A new memory table stops the running queues, swaps the
memory and restarts them where they were.

Errors: any malformed or inconsistent message raises ``ProtocolError`` and the shell drops
the connection. An unknown request is ignored, or answered ``u64 1`` if it asks for a reply.
Every reply has flags exactly 0x5 and an exact payload size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from storvisor.errors import ProtocolError
from storvisor.protocols.vhost_user import messages as m
from storvisor.protocols.vhost_user.messages import MemoryRegion, Message, Request
from storvisor.protocols.virtio.ring import MAX_QUEUE_SIZE

log = logging.getLogger(__name__)

MAX_MEM_SLOTS = 32
"""Answer to GET_MAX_MEM_SLOTS."""


@dataclass(frozen=True, slots=True)
class Reply:
    """Bytes to send (header + payload) and fds to pass with them."""

    data: bytes
    fds: tuple[int, ...] = ()


@dataclass(slots=True)
class VringState:
    """What the front-end told us about one queue."""

    index: int
    num: int = 0
    base: int = 0
    desc_addr: int = 0
    avail_addr: int = 0
    used_addr: int = 0
    log_addr: int = 0
    addr_flags: int = 0
    has_addr: bool = False
    kicked: bool = False
    enabled: bool = False
    running: bool = False


@dataclass(frozen=True, slots=True)
class QueueSetup:
    """Everything the data plane needs to run a queue (addresses are front-end user
    addresses; ``last_avail`` is the base to resume from)."""

    index: int
    num: int
    last_avail: int
    desc_addr: int
    avail_addr: int
    used_addr: int
    event_idx: bool


class BackendDevice(Protocol):
    """The operations the control plane asks of the I/O shell.

    Methods may raise ``ProtocolError`` (e.g. an fd that cannot be mapped); the connection is
    then dropped. ``stop_queue`` must return only after every popped request completed.
    """

    @property
    def features(self) -> int:
        """Virtio feature bits offered (ring, device and vhost bits)."""

    @property
    def protocol_features(self) -> int: ...

    @property
    def num_queues(self) -> int: ...

    def get_config(self) -> bytes:
        """The whole device config space."""

    def set_config(self, offset: int, data: bytes) -> None:
        """The driver wrote ``data`` at ``offset`` of the config space."""

    def set_memory(self, regions: list[tuple[MemoryRegion, int]]) -> None:
        """Replace guest memory by these regions (each with its fd, now owned)."""

    def add_memory(self, region: MemoryRegion, fd: int) -> None:
        """Add one region (fd now owned)."""

    def remove_memory(self, region: MemoryRegion) -> None:
        """Remove the region matching ``guest_phys_addr``, ``memory_size`` and
        ``userspace_addr``; ``ProtocolError`` if there is none."""

    def set_features(self, features: int) -> None:
        """The negotiated virtio features (sent again to toggle ``VHOST_F_LOG_ALL``)."""

    def set_vring_log(self, index: int, log_guest_addr: int | None) -> None:
        """Where to log used-ring writes of a queue (``None``: do not log them)."""

    def set_log_base(self, fd: int, mmap_size: int, mmap_offset: int) -> None:
        """Use this dirty-page bitmap (fd now owned)."""

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        """New kick eventfd (``None``: the front-end polls, so must we)."""

    def set_vring_call(self, index: int, fd: int | None) -> None:
        """New call eventfd (``None``: no interrupts)."""

    def set_vring_err(self, index: int, fd: int | None) -> None: ...

    def start_queue(self, setup: QueueSetup) -> None:
        """Start serving a queue (memory is mapped, kick fd set)."""

    def stop_queue(self, index: int) -> int:
        """Stop a running queue after draining it; return the next avail index."""

    def get_inflight(self, num_queues: int, queue_size: int) -> tuple[int, int]:
        """Create a zeroed inflight buffer; return ``(fd, mmap_size)``. The fd is sent and
        then closed by the shell."""

    def set_inflight(
        self, fd: int, mmap_size: int, mmap_offset: int, num_queues: int, queue_size: int
    ) -> None:
        """Use this inflight buffer (fd now owned)."""

    def set_backend_channel(self, fd: int) -> None:
        """Socket for back-end initiated messages (fd now owned)."""


@dataclass(slots=True)
class _Negotiated:
    features: int = 0
    features_set: bool = False
    protocol_features: int = 0
    owner: bool = False


@dataclass(slots=True)
class VhostUserBackend:
    """Control-plane state of one front-end connection. See the module docstring."""

    device: BackendDevice
    negotiated: _Negotiated = field(default_factory=_Negotiated)
    vrings: list[VringState] = field(default_factory=list)
    has_memory: bool = False

    def __post_init__(self) -> None:
        self.vrings = [VringState(i) for i in range(self.device.num_queues)]

    # -- helpers ---------------------------------------------------------------------------

    def _has_protocol(self, feature: m.ProtocolFeature) -> bool:
        return bool(self.negotiated.protocol_features & (1 << feature))

    def _vring(self, index: int, name: str) -> VringState:
        if not 0 <= index < len(self.vrings):
            raise ProtocolError(f"{name}: queue {index} does not exist")
        return self.vrings[index]

    def _u64(self, msg: Message) -> int:
        msg.expect_size(m.U64.size)
        value: int = m.U64.unpack(msg.payload)[0]
        return value

    def _state(self, msg: Message) -> tuple[VringState, int]:
        msg.expect_size(m.VHOST_VRING_STATE.size)
        index, num = m.VHOST_VRING_STATE.unpack(msg.payload)
        return self._vring(index, msg.name), num

    def _vring_fd(self, msg: Message) -> tuple[VringState, int | None]:
        value = self._u64(msg)
        if value & ~(m.VHOST_USER_VRING_IDX_MASK | m.VHOST_USER_VRING_NOFD_MASK):
            raise ProtocolError(f"{msg.name}: unknown bits in {value:#x}")
        vring = self._vring(value & m.VHOST_USER_VRING_IDX_MASK, msg.name)
        if value & m.VHOST_USER_VRING_NOFD_MASK:
            return vring, None
        return vring, msg.take_fd()

    def _maybe_start(self, vring: VringState) -> None:
        enabled = vring.enabled or not self.negotiated.features & (
            1 << m.VHOST_USER_F_PROTOCOL_FEATURES
        )
        if vring.running or not (vring.kicked and enabled and vring.has_addr):
            return
        if not self.has_memory or vring.num == 0:
            return
        self.device.start_queue(
            QueueSetup(
                index=vring.index,
                num=vring.num,
                last_avail=vring.base,
                desc_addr=vring.desc_addr,
                avail_addr=vring.avail_addr,
                used_addr=vring.used_addr,
                event_idx=bool(self.negotiated.features & (1 << 29)),
            )
        )
        vring.running = True

    def _stop(self, vring: VringState) -> None:
        if vring.running:
            vring.base = self.device.stop_queue(vring.index)
            vring.running = False

    def _replace_memory(self, apply: Callable[[], None]) -> None:
        running = [v for v in self.vrings if v.running]
        for vring in running:
            self._stop(vring)
        apply()
        self.has_memory = True
        for vring in running:
            self._maybe_start(vring)

    # -- the dispatcher --------------------------------------------------------------------

    def handle(self, msg: Message) -> Reply | None:
        """Process one message; return the reply to send (or ``None``).

        Raises ``ProtocolError`` for a message that must end the connection.
        """
        if msg.flags & m.VHOST_USER_REPLY_MASK:
            raise ProtocolError(f"{msg.name}: reply flag set on a request")
        handler = _HANDLERS.get(msg.request)
        if handler is None:
            log.info("ignoring unsupported vhost-user %s", msg.name)
            if msg.need_reply:
                return Reply(m.encode_reply(msg.request, m.U64.pack(1)))
            return None
        payload = handler(self, msg)
        if payload is None:
            if not msg.need_reply:
                return None
            payload = m.U64.pack(0)  # REPLY_ACK: success
        if isinstance(payload, Reply):
            return payload
        return Reply(m.encode_reply(msg.request, payload))

    # -- handlers: each returns the reply payload, a full Reply, or None --------------------

    def _get_features(self, msg: Message) -> bytes:
        msg.expect_size(0, 8)  # some front-ends send a zero u64
        return m.U64.pack(self.device.features)

    def _set_features(self, msg: Message) -> None:
        features = self._u64(msg)
        if features & ~self.device.features:
            raise ProtocolError(f"SET_FEATURES: {features:#x} has bits never offered")
        self.negotiated.features = features
        self.negotiated.features_set = True
        self.device.set_features(features)
        for vring in self.vrings:
            self._maybe_start(vring)

    def _get_protocol_features(self, msg: Message) -> bytes:
        msg.expect_size(0, 8)
        return m.U64.pack(self.device.protocol_features)

    def _set_protocol_features(self, msg: Message) -> None:
        features = self._u64(msg)
        if features & ~self.device.protocol_features:
            raise ProtocolError(f"SET_PROTOCOL_FEATURES: {features:#x} has bits never offered")
        self.negotiated.protocol_features = features

    def _set_owner(self, msg: Message) -> None:
        msg.expect_size(0, 8)
        self.negotiated.owner = True

    def _reset_owner(self, msg: Message) -> None:
        # Deprecated; QEMU may send it on a device reset. Like a virtio reset it stops and
        # forgets the rings and the virtio features; connection-level state (protocol
        # features, memory, back-end channel, inflight buffer) stays, as the front-end
        # does not send it again.
        msg.expect_size(0, 8)
        for vring in self.vrings:
            self._stop(vring)
        self.vrings = [VringState(i) for i in range(self.device.num_queues)]
        self.negotiated.features = 0
        self.negotiated.features_set = False
        self.device.set_features(0)

    def _get_queue_num(self, msg: Message) -> bytes:
        msg.expect_size(0, 8)
        return m.U64.pack(self.device.num_queues)

    def _get_max_mem_slots(self, msg: Message) -> bytes:
        msg.expect_size(0, 8)
        return m.U64.pack(MAX_MEM_SLOTS)

    def _set_mem_table(self, msg: Message) -> None:
        regions = m.unpack_mem_table(msg.payload)
        if len(msg.fds) != len(regions):
            raise ProtocolError(f"SET_MEM_TABLE: {len(regions)} regions, {len(msg.fds)} fds")
        _check_regions(regions)
        pairs = [(region, msg.take_fd()) for region in regions]
        self._replace_memory(lambda: self.device.set_memory(pairs))

    def _add_mem_reg(self, msg: Message) -> None:
        region = m.unpack_mem_reg(msg.payload, msg.name)
        if len(msg.fds) != 1:
            raise ProtocolError(f"ADD_MEM_REG: {len(msg.fds)} fds, expected exactly 1")
        _check_regions([region])
        fd = msg.take_fd()
        self._replace_memory(lambda: self.device.add_memory(region, fd))

    def _rem_mem_reg(self, msg: Message) -> None:
        region = m.unpack_mem_reg(msg.payload, msg.name)
        self._replace_memory(lambda: self.device.remove_memory(region))

    def _set_vring_num(self, msg: Message) -> None:
        vring, num = self._state(msg)
        if num == 0 or num > MAX_QUEUE_SIZE or num & (num - 1):
            raise ProtocolError(f"SET_VRING_NUM: {num} is not a power of two <= 32768")
        if vring.running:
            raise ProtocolError("SET_VRING_NUM on a running queue")
        vring.num = num

    def _set_vring_addr(self, msg: Message) -> None:
        msg.expect_size(m.VHOST_VRING_ADDR.size)
        index, flags, desc, used, avail, log_addr = m.VHOST_VRING_ADDR.unpack(msg.payload)
        vring = self._vring(index, msg.name)
        # sent again on a running queue to toggle dirty logging; the rings cannot move
        moved = (desc, used, avail) != (vring.desc_addr, vring.used_addr, vring.avail_addr)
        if vring.running and moved:
            raise ProtocolError("SET_VRING_ADDR moves the rings of a running queue")
        vring.desc_addr, vring.used_addr, vring.avail_addr = desc, used, avail
        vring.log_addr, vring.addr_flags = log_addr, flags
        vring.has_addr = True
        self.device.set_vring_log(index, log_addr if flags & m.VHOST_VRING_F_LOG else None)
        self._maybe_start(vring)

    def _set_vring_base(self, msg: Message) -> None:
        vring, num = self._state(msg)
        if vring.running:
            raise ProtocolError("SET_VRING_BASE on a running queue")
        if num > 0xFFFF:
            raise ProtocolError(f"SET_VRING_BASE: {num} is not a split-ring index")
        vring.base = num

    def _get_vring_base(self, msg: Message) -> bytes:
        vring, _ = self._state(msg)
        self._stop(vring)
        vring.kicked = False
        return m.VHOST_VRING_STATE.pack(vring.index, vring.base)

    def _set_vring_kick(self, msg: Message) -> None:
        vring, fd = self._vring_fd(msg)
        self.device.set_vring_kick(vring.index, fd)
        vring.kicked = True
        self._maybe_start(vring)

    def _set_vring_call(self, msg: Message) -> None:
        vring, fd = self._vring_fd(msg)
        self.device.set_vring_call(vring.index, fd)

    def _set_vring_err(self, msg: Message) -> None:
        vring, fd = self._vring_fd(msg)
        self.device.set_vring_err(vring.index, fd)

    def _set_vring_enable(self, msg: Message) -> None:
        vring, num = self._state(msg)
        if num not in (0, 1):
            raise ProtocolError(f"SET_VRING_ENABLE: {num} is not 0 or 1")
        vring.enabled = bool(num)
        if vring.enabled:
            self._maybe_start(vring)
        else:
            self._stop(vring)

    def _get_config(self, msg: Message) -> bytes:
        if len(msg.payload) < m.VHOST_USER_CONFIG.size:
            raise ProtocolError("GET_CONFIG: payload too short")
        offset, size, _ = m.VHOST_USER_CONFIG.unpack_from(msg.payload)
        msg.expect_size(m.VHOST_USER_CONFIG.size + size)
        if size == 0 or offset + size > m.VHOST_USER_MAX_CONFIG_SIZE:
            return b""  # a zero-size reply is the protocol's error answer
        space = self.device.get_config()
        data = space[offset : offset + size]
        data += bytes(size - len(data))
        return msg.payload[: m.VHOST_USER_CONFIG.size] + data

    def _set_config(self, msg: Message) -> None:
        if len(msg.payload) < m.VHOST_USER_CONFIG.size:
            raise ProtocolError("SET_CONFIG: payload too short")
        offset, size, _ = m.VHOST_USER_CONFIG.unpack_from(msg.payload)
        msg.expect_size(m.VHOST_USER_CONFIG.size + size)
        if offset + size > m.VHOST_USER_MAX_CONFIG_SIZE:
            raise ProtocolError(f"SET_CONFIG: [{offset}, +{size}) outside the config space")
        self.device.set_config(offset, msg.payload[m.VHOST_USER_CONFIG.size :])

    def _get_inflight_fd(self, msg: Message) -> Reply:
        msg.expect_size(m.VHOST_USER_INFLIGHT.size)
        _, _, num_queues, queue_size = m.VHOST_USER_INFLIGHT.unpack(msg.payload)
        _check_inflight_shape(num_queues, queue_size, self.device.num_queues)
        fd, size = self.device.get_inflight(num_queues, queue_size)
        payload = m.VHOST_USER_INFLIGHT.pack(size, 0, num_queues, queue_size)
        return Reply(m.encode_reply(msg.request, payload), (fd,))

    def _set_inflight_fd(self, msg: Message) -> None:
        msg.expect_size(m.VHOST_USER_INFLIGHT.size)
        size, offset, num_queues, queue_size = m.VHOST_USER_INFLIGHT.unpack(msg.payload)
        _check_inflight_shape(num_queues, queue_size, self.device.num_queues)
        if any(v.running for v in self.vrings):
            raise ProtocolError("SET_INFLIGHT_FD while queues run")
        self.device.set_inflight(msg.take_fd(), size, offset, num_queues, queue_size)

    def _set_log_base(self, msg: Message) -> bytes:
        if not self._has_protocol(m.ProtocolFeature.LOG_SHMFD):
            raise ProtocolError("SET_LOG_BASE without LOG_SHMFD")
        msg.expect_size(m.VHOST_USER_LOG.size)
        size, offset = m.VHOST_USER_LOG.unpack(msg.payload)
        self.device.set_log_base(msg.take_fd(), size, offset)
        return m.U64.pack(0)  # with LOG_SHMFD this message always has a reply

    def _set_log_fd(self, msg: Message) -> None:
        msg.expect_size(0, 8)
        if len(msg.fds) != 1:
            raise ProtocolError("SET_LOG_FD: expected exactly one fd")
        # an optional "log changed" eventfd we never signal: left in msg.fds for the shell

    def _set_backend_req_fd(self, msg: Message) -> None:
        msg.expect_size(0, 8)
        self.device.set_backend_channel(msg.take_fd())


def _check_regions(regions: list[MemoryRegion]) -> None:
    for r in regions:
        if r.memory_size == 0:
            raise ProtocolError("memory region of size 0")
        for value in (r.guest_phys_addr, r.userspace_addr, r.mmap_offset):
            if value + r.memory_size > 1 << 64:
                raise ProtocolError("memory region wraps the address space")


def _check_inflight_shape(num_queues: int, queue_size: int, max_queues: int) -> None:
    if not 0 < num_queues <= max_queues:
        raise ProtocolError(f"inflight buffer for {num_queues} queues (device has {max_queues})")
    if queue_size == 0 or queue_size > MAX_QUEUE_SIZE or queue_size & (queue_size - 1):
        raise ProtocolError(f"inflight buffer for queues of {queue_size}")


_HANDLERS: dict[int, Callable[[VhostUserBackend, Message], bytes | Reply | None]] = {
    Request.GET_FEATURES: VhostUserBackend._get_features,
    Request.SET_FEATURES: VhostUserBackend._set_features,
    Request.SET_OWNER: VhostUserBackend._set_owner,
    Request.RESET_OWNER: VhostUserBackend._reset_owner,
    Request.SET_MEM_TABLE: VhostUserBackend._set_mem_table,
    Request.SET_VRING_NUM: VhostUserBackend._set_vring_num,
    Request.SET_VRING_ADDR: VhostUserBackend._set_vring_addr,
    Request.SET_VRING_BASE: VhostUserBackend._set_vring_base,
    Request.GET_VRING_BASE: VhostUserBackend._get_vring_base,
    Request.SET_VRING_KICK: VhostUserBackend._set_vring_kick,
    Request.SET_VRING_CALL: VhostUserBackend._set_vring_call,
    Request.SET_VRING_ERR: VhostUserBackend._set_vring_err,
    Request.GET_PROTOCOL_FEATURES: VhostUserBackend._get_protocol_features,
    Request.SET_PROTOCOL_FEATURES: VhostUserBackend._set_protocol_features,
    Request.GET_QUEUE_NUM: VhostUserBackend._get_queue_num,
    Request.SET_VRING_ENABLE: VhostUserBackend._set_vring_enable,
    Request.SET_BACKEND_REQ_FD: VhostUserBackend._set_backend_req_fd,
    Request.SET_LOG_BASE: VhostUserBackend._set_log_base,
    Request.SET_LOG_FD: VhostUserBackend._set_log_fd,
    Request.GET_CONFIG: VhostUserBackend._get_config,
    Request.SET_CONFIG: VhostUserBackend._set_config,
    Request.GET_INFLIGHT_FD: VhostUserBackend._get_inflight_fd,
    Request.SET_INFLIGHT_FD: VhostUserBackend._set_inflight_fd,
    Request.GET_MAX_MEM_SLOTS: VhostUserBackend._get_max_mem_slots,
    Request.ADD_MEM_REG: VhostUserBackend._add_mem_reg,
    Request.REM_MEM_REG: VhostUserBackend._rem_mem_reg,
}
"""The dispatch table: request id -> handler (the state transitions live here)."""
