"""vhost-user codec and back-end state machine, sans I/O: table-driven, with a recording
``BackendDevice`` (a real in-memory implementation, no mocks) and a fuzz harness that lets
only ``ProtocolError`` escape."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storvisor.errors import ProtocolError
from storvisor.protocols.vhost_user import inflight as infl
from storvisor.protocols.vhost_user import messages as m
from storvisor.protocols.vhost_user.backend import QueueSetup, Reply, VhostUserBackend
from storvisor.protocols.vhost_user.messages import MemoryRegion, Message, Request

FEATURES = (1 << 32) | (1 << 30) | (1 << 29) | (1 << 26) | (1 << 9)
PROTOCOL = (1 << 0) | (1 << 1) | (1 << 3) | (1 << 9) | (1 << 12) | (1 << 15) | (1 << 5)


class RecordingDevice:
    """A complete ``BackendDevice`` that remembers what it was asked to do."""

    def __init__(self, num_queues: int = 2) -> None:
        self._num_queues = num_queues
        self.calls: list[tuple[object, ...]] = []
        self.config = bytearray(range(96))
        self.regions: list[MemoryRegion] = []
        self.owned_fds: list[int] = []
        self.running: dict[int, QueueSetup] = {}
        self.next_avail: dict[int, int] = {}

    @property
    def features(self) -> int:
        return FEATURES

    @property
    def protocol_features(self) -> int:
        return PROTOCOL

    @property
    def num_queues(self) -> int:
        return self._num_queues

    def get_config(self) -> bytes:
        return bytes(self.config)

    def set_config(self, offset: int, data: bytes) -> None:
        self.calls.append(("set_config", offset, data))
        self.config[offset : offset + len(data)] = data

    def set_memory(self, regions: list[tuple[MemoryRegion, int]]) -> None:
        self.calls.append(("set_memory", len(regions)))
        self.regions = [r for r, _ in regions]
        self.owned_fds += [fd for _, fd in regions]

    def add_memory(self, region: MemoryRegion, fd: int) -> None:
        self.calls.append(("add_memory", region.guest_phys_addr))
        self.regions.append(region)
        self.owned_fds.append(fd)

    def remove_memory(self, region: MemoryRegion) -> None:
        self.calls.append(("remove_memory", region.guest_phys_addr))
        if region not in self.regions:
            raise ProtocolError("no such region")
        self.regions.remove(region)

    def set_features(self, features: int) -> None:
        self.calls.append(("features", features))

    def set_vring_log(self, index: int, log_guest_addr: int | None) -> None:
        self.calls.append(("vring_log", index, log_guest_addr))

    def set_log_base(self, fd: int, mmap_size: int, mmap_offset: int) -> None:
        self.calls.append(("log_base", fd, mmap_size, mmap_offset))

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        self.calls.append(("kick", index, fd))

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self.calls.append(("call", index, fd))

    def set_vring_err(self, index: int, fd: int | None) -> None:
        self.calls.append(("err", index, fd))

    def start_queue(self, setup: QueueSetup) -> None:
        self.calls.append(("start", setup.index, setup.last_avail))
        self.running[setup.index] = setup
        self.next_avail[setup.index] = setup.last_avail + 7  # pretend 7 were served

    def stop_queue(self, index: int) -> int:
        self.calls.append(("stop", index))
        del self.running[index]
        return self.next_avail[index]

    def get_inflight(self, num_queues: int, queue_size: int) -> tuple[int, int]:
        self.calls.append(("get_inflight", num_queues, queue_size))
        return 99, infl.region_size(num_queues, queue_size)

    def set_inflight(
        self, fd: int, mmap_size: int, mmap_offset: int, num_queues: int, queue_size: int
    ) -> None:
        self.calls.append(("set_inflight", fd, mmap_size, num_queues, queue_size))

    def set_backend_channel(self, fd: int) -> None:
        self.calls.append(("channel", fd))

    def reset(self) -> None:
        self.calls.append(("reset",))
        self.running.clear()


def msg(
    request: int, payload: bytes = b"", fds: list[int] | None = None, *, ack: bool = False
) -> Message:
    flags = m.VHOST_USER_VERSION | (m.VHOST_USER_NEED_REPLY_MASK if ack else 0)
    return Message(request, flags, payload, list(fds or []))


def reply_payload(reply: Reply | None, request: int) -> bytes:
    assert reply is not None
    got_request, flags, size = m.HEADER.unpack_from(reply.data)
    assert (got_request, flags) == (request, 0x5)
    assert size == len(reply.data) - 12
    return reply.data[12:]


# -- codec --------------------------------------------------------------------------------


def test_struct_sizes_match_the_spec() -> None:
    assert m.HEADER.size == 12
    assert m.VHOST_VRING_STATE.size == 8
    assert m.VHOST_VRING_ADDR.size == 40
    assert m.VHOST_USER_MEMORY_REGION.size == 32
    assert m.VHOST_USER_MEM_REG_MSG.size == 40
    assert m.VHOST_USER_LOG.size == 16
    assert m.VHOST_USER_CONFIG.size == 12
    assert m.VHOST_USER_INFLIGHT.size == 24


@pytest.mark.parametrize(
    "raw, expected",
    [
        (struct.pack("<III", 1, 1, 0), (1, 1, 0)),
        (struct.pack("<III", 5, 9, 4096), (5, 9, 4096)),
        (struct.pack("<III", 1, 0, 0), ProtocolError),  # version 0
        (struct.pack("<III", 1, 2, 0), ProtocolError),  # version 2
        (struct.pack("<III", 1, 1, 4097), ProtocolError),  # hostile size
        (b"\x01\x00", ProtocolError),
    ],
)
def test_decode_header(raw: bytes, expected: object) -> None:
    if expected is ProtocolError:
        with pytest.raises(ProtocolError):
            m.decode_header(raw)
    else:
        assert m.decode_header(raw) == expected


def test_reply_flags_are_exactly_0x5() -> None:
    data = m.encode_reply(Request.GET_FEATURES, m.U64.pack(3))
    assert data == struct.pack("<IIIQ", 1, 5, 8, 3)
    assert m.decode_reply(Request.GET_FEATURES, data[:12]) == (5, 8)
    with pytest.raises(ProtocolError):
        m.decode_reply(Request.GET_FEATURES, struct.pack("<III", 1, 0xD, 8))
    with pytest.raises(ProtocolError):
        m.decode_reply(Request.GET_CONFIG, data[:12])


def test_mem_table_round_trip_and_limits() -> None:
    regions = [MemoryRegion(0, 1 << 20, 0x7000, 0), MemoryRegion(1 << 32, 4096, 0x9000, 8192)]
    payload = m.pack_mem_table(regions)
    assert len(payload) == 8 + 8 * 32  # QEMU's padded form
    assert m.unpack_mem_table(payload) == regions
    assert m.unpack_mem_table(payload[: 8 + 64]) == regions  # exact form
    with pytest.raises(ProtocolError):
        m.unpack_mem_table(payload[:50])
    with pytest.raises(ProtocolError):
        m.unpack_mem_table(struct.pack("<II", 9, 0) + bytes(9 * 32))
    assert m.unpack_mem_reg(m.pack_mem_reg(regions[1])) == regions[1]


# -- state machine ------------------------------------------------------------------------


@pytest.fixture
def dev() -> RecordingDevice:
    return RecordingDevice()


@pytest.fixture
def backend(dev: RecordingDevice) -> VhostUserBackend:
    return VhostUserBackend(dev)


@pytest.mark.parametrize(
    "request_, payload, expected",
    [
        (Request.GET_FEATURES, b"", m.U64.pack(FEATURES)),
        (Request.GET_PROTOCOL_FEATURES, b"", m.U64.pack(PROTOCOL)),
        (Request.GET_QUEUE_NUM, b"", m.U64.pack(2)),
        (Request.GET_MAX_MEM_SLOTS, b"", m.U64.pack(32)),
        (Request.GET_VRING_BASE, m.VHOST_VRING_STATE.pack(1, 0), m.VHOST_VRING_STATE.pack(1, 0)),
        (
            Request.GET_CONFIG,
            m.VHOST_USER_CONFIG.pack(0, 57, 0) + bytes(57),
            m.VHOST_USER_CONFIG.pack(0, 57, 0) + bytes(range(57)),
        ),
        (
            Request.GET_CONFIG,
            m.VHOST_USER_CONFIG.pack(90, 10, 0) + bytes(10),
            m.VHOST_USER_CONFIG.pack(90, 10, 0) + bytes(range(90, 96)) + bytes(4),
        ),
        (Request.GET_CONFIG, m.VHOST_USER_CONFIG.pack(0, 0, 0), b""),
        (Request.GET_CONFIG, m.VHOST_USER_CONFIG.pack(200, 100, 0) + bytes(100), b""),
    ],
)
def test_natural_replies(
    backend: VhostUserBackend, request_: int, payload: bytes, expected: bytes
) -> None:
    for ack in (False, True):  # NEED_REPLY never adds a second reply
        assert reply_payload(backend.handle(msg(request_, payload, ack=ack)), request_) == expected


@pytest.mark.parametrize(
    "request_, payload, fds",
    [
        (Request.SET_OWNER, b"", []),
        (Request.SET_FEATURES, m.U64.pack(1 << 32), []),
        (Request.SET_PROTOCOL_FEATURES, m.U64.pack(1 << 3), []),
        (Request.SET_VRING_NUM, m.VHOST_VRING_STATE.pack(0, 256), []),
        (Request.SET_VRING_BASE, m.VHOST_VRING_STATE.pack(0, 5), []),
        (Request.SET_VRING_CALL, m.U64.pack(1), [7]),
        (Request.SET_VRING_CALL, m.U64.pack(1 | 0x100), []),
        (Request.SET_VRING_ERR, m.U64.pack(0), [8]),
        (Request.SET_VRING_ENABLE, m.VHOST_VRING_STATE.pack(1, 0), []),
        (Request.SET_CONFIG, m.VHOST_USER_CONFIG.pack(32, 1, 0) + b"\x00", []),
        (Request.SET_BACKEND_REQ_FD, b"", [9]),
        (Request.SET_MEM_TABLE, m.pack_mem_table([MemoryRegion(0, 4096, 0, 0)]), [10]),
        (Request.ADD_MEM_REG, m.pack_mem_reg(MemoryRegion(1 << 30, 4096, 1 << 40, 0)), [11]),
    ],
)
def test_reply_ack_only_when_asked(
    backend: VhostUserBackend, request_: int, payload: bytes, fds: list[int]
) -> None:
    message = msg(request_, payload, list(fds))
    assert backend.handle(message) is None
    assert message.fds == []  # every fd was taken (owned by the device now)
    message = msg(request_, payload, list(fds), ack=True)
    assert reply_payload(backend.handle(message), request_) == m.U64.pack(0)


def test_unknown_request(backend: VhostUserBackend) -> None:
    assert backend.handle(msg(77, b"junk")) is None
    assert reply_payload(backend.handle(msg(77, ack=True)), 77) == m.U64.pack(1)
    # a known-but-unsupported one carrying an fd leaves the fd to the shell
    message = msg(Request.SET_VRING_ENDIAN, m.VHOST_VRING_STATE.pack(0, 0), [5], ack=True)
    assert reply_payload(backend.handle(message), Request.SET_VRING_ENDIAN) == m.U64.pack(1)
    assert message.fds == [5]


def test_dirty_log_messages(backend: VhostUserBackend, dev: RecordingDevice) -> None:
    backend.handle(msg(Request.SET_PROTOCOL_FEATURES, m.U64.pack(1 << 1)))
    message = msg(Request.SET_LOG_BASE, m.VHOST_USER_LOG.pack(8192, 4096), [5])
    assert reply_payload(backend.handle(message), Request.SET_LOG_BASE) == m.U64.pack(0)
    assert dev.calls[-1] == ("log_base", 5, 8192, 4096) and message.fds == []
    message = msg(Request.SET_LOG_FD, b"", [6])
    assert backend.handle(message) is None and message.fds == [6]  # the shell closes it
    backend.handle(
        msg(Request.SET_VRING_ADDR, m.VHOST_VRING_ADDR.pack(1, 1, 0, 8192, 4096, 0x3000))
    )
    assert dev.calls[-1] == ("vring_log", 1, 0x3000)
    backend.handle(
        msg(Request.SET_VRING_ADDR, m.VHOST_VRING_ADDR.pack(1, 0, 0, 8192, 4096, 0x3000))
    )
    assert dev.calls[-1] == ("vring_log", 1, None)
    backend.handle(msg(Request.SET_FEATURES, m.U64.pack(1 << 26 | 1 << 32)))
    assert dev.calls[-1] == ("features", 1 << 26 | 1 << 32)


def _setup_queue(backend: VhostUserBackend, index: int, *, enable: bool = True) -> None:
    backend.handle(
        msg(Request.SET_MEM_TABLE, m.pack_mem_table([MemoryRegion(0, 1 << 20, 0, 0)]), [3])
    )
    backend.handle(msg(Request.SET_VRING_NUM, m.VHOST_VRING_STATE.pack(index, 128)))
    backend.handle(msg(Request.SET_VRING_BASE, m.VHOST_VRING_STATE.pack(index, 40)))
    backend.handle(msg(Request.SET_VRING_ADDR, m.VHOST_VRING_ADDR.pack(index, 0, 0, 8192, 4096, 0)))
    backend.handle(msg(Request.SET_VRING_KICK, m.U64.pack(index), [4]))
    if enable:
        backend.handle(msg(Request.SET_VRING_ENABLE, m.VHOST_VRING_STATE.pack(index, 1)))


def test_queue_waits_for_enable_with_protocol_features(
    backend: VhostUserBackend, dev: RecordingDevice
) -> None:
    backend.handle(msg(Request.SET_FEATURES, m.U64.pack((1 << 32) | (1 << 30) | (1 << 29))))
    _setup_queue(backend, 1, enable=False)
    assert 1 not in dev.running
    backend.handle(msg(Request.SET_VRING_ENABLE, m.VHOST_VRING_STATE.pack(1, 1)))
    assert dev.running[1].last_avail == 40 and dev.running[1].event_idx
    assert dev.running[1].avail_addr == 4096 and dev.running[1].used_addr == 8192
    # ENABLE(0) stops (draining), GET_VRING_BASE answers where the queue stopped
    backend.handle(msg(Request.SET_VRING_ENABLE, m.VHOST_VRING_STATE.pack(1, 0)))
    assert 1 not in dev.running
    reply = backend.handle(msg(Request.GET_VRING_BASE, m.VHOST_VRING_STATE.pack(1, 0)))
    assert reply_payload(reply, Request.GET_VRING_BASE) == m.VHOST_VRING_STATE.pack(1, 47)


def test_queue_starts_at_kick_without_protocol_features(
    backend: VhostUserBackend, dev: RecordingDevice
) -> None:
    backend.handle(msg(Request.SET_FEATURES, m.U64.pack(1 << 32)))
    _setup_queue(backend, 0, enable=False)
    assert dev.running[0].last_avail == 40 and not dev.running[0].event_idx
    reply = backend.handle(msg(Request.GET_VRING_BASE, m.VHOST_VRING_STATE.pack(0, 0)))
    assert reply_payload(reply, Request.GET_VRING_BASE) == m.VHOST_VRING_STATE.pack(0, 47)
    assert dev.calls[-1] == ("stop", 0)
    # a new kick restarts the queue where it stopped
    backend.handle(msg(Request.SET_VRING_KICK, m.U64.pack(0), [6]))
    assert dev.running[0].last_avail == 47


def test_new_mem_table_restarts_running_queues(
    backend: VhostUserBackend, dev: RecordingDevice
) -> None:
    backend.handle(msg(Request.SET_FEATURES, m.U64.pack((1 << 32) | (1 << 30))))
    _setup_queue(backend, 0)
    dev.calls.clear()
    table = m.pack_mem_table(
        [MemoryRegion(0, 1 << 20, 0, 0), MemoryRegion(1 << 20, 4096, 1 << 20, 0)]
    )
    backend.handle(msg(Request.SET_MEM_TABLE, table, [20, 21]))
    assert dev.calls == [("stop", 0), ("set_memory", 2), ("start", 0, 47)]


def test_inflight_messages(backend: VhostUserBackend, dev: RecordingDevice) -> None:
    reply = backend.handle(msg(Request.GET_INFLIGHT_FD, m.VHOST_USER_INFLIGHT.pack(0, 0, 2, 128)))
    assert reply is not None and reply.fds == (99,)
    size = infl.region_size(2, 128)
    assert reply_payload(reply, Request.GET_INFLIGHT_FD) == m.VHOST_USER_INFLIGHT.pack(
        size, 0, 2, 128
    )
    backend.handle(msg(Request.SET_INFLIGHT_FD, m.VHOST_USER_INFLIGHT.pack(size, 0, 2, 128), [12]))
    assert dev.calls[-1] == ("set_inflight", 12, size, 2, 128)


@pytest.mark.parametrize(
    "request_, payload, fds",
    [
        (Request.SET_FEATURES, m.U64.pack(1 << 40), []),  # never offered
        (Request.SET_PROTOCOL_FEATURES, m.U64.pack(1 << 2), []),
        (Request.SET_LOG_BASE, m.VHOST_USER_LOG.pack(4096, 0), [3]),  # LOG_SHMFD not agreed
        (Request.SET_LOG_FD, b"", []),
        (Request.SET_VRING_NUM, m.VHOST_VRING_STATE.pack(0, 3), []),
        (Request.SET_VRING_NUM, m.VHOST_VRING_STATE.pack(0, 65536), []),
        (Request.SET_VRING_NUM, m.VHOST_VRING_STATE.pack(2, 128), []),  # no queue 2
        (Request.SET_VRING_BASE, m.VHOST_VRING_STATE.pack(0, 1 << 16), []),
        (Request.SET_VRING_KICK, m.U64.pack(0), []),
        (Request.SET_VRING_KICK, m.U64.pack(0x200), [3]),
        (Request.SET_VRING_ENABLE, m.VHOST_VRING_STATE.pack(0, 2), []),
        (Request.SET_MEM_TABLE, m.pack_mem_table([MemoryRegion(0, 4096, 0, 0)]), []),
        (Request.SET_MEM_TABLE, m.pack_mem_table([MemoryRegion(0, 0, 0, 0)]), [3]),
        (Request.ADD_MEM_REG, m.pack_mem_reg(MemoryRegion(0, 4096, 0, 0)), [3, 4]),
        (Request.REM_MEM_REG, m.pack_mem_reg(MemoryRegion(0, 4096, 0, 0)), []),
        (Request.GET_INFLIGHT_FD, m.VHOST_USER_INFLIGHT.pack(0, 0, 3, 128), []),
        (Request.GET_INFLIGHT_FD, m.VHOST_USER_INFLIGHT.pack(0, 0, 1, 100), []),
        (Request.SET_INFLIGHT_FD, m.VHOST_USER_INFLIGHT.pack(4096, 0, 1, 128), []),
        (Request.SET_CONFIG, m.VHOST_USER_CONFIG.pack(250, 10, 0) + bytes(10), []),
        (Request.SET_CONFIG, m.VHOST_USER_CONFIG.pack(0, 10, 0) + bytes(9), []),
        (Request.SET_BACKEND_REQ_FD, b"", []),
    ],
)
def test_bad_messages_raise_protocol_error(
    backend: VhostUserBackend, request_: int, payload: bytes, fds: list[int]
) -> None:
    with pytest.raises(ProtocolError):
        backend.handle(msg(request_, payload, list(fds)))


def test_reset_owner_stops_and_forgets_the_rings(
    backend: VhostUserBackend, dev: RecordingDevice
) -> None:
    backend.handle(msg(Request.SET_FEATURES, m.U64.pack(1 << 32)))
    _setup_queue(backend, 0)
    assert 0 in dev.running
    backend.handle(msg(Request.RESET_OWNER))
    assert dev.running == {} and dev.calls[-1] == ("features", 0)
    assert backend.vrings[0].num == 0 and not backend.vrings[0].kicked
    assert backend.has_memory  # memory and the connection-level state stay
    backend.handle(msg(Request.SET_VRING_NUM, m.VHOST_VRING_STATE.pack(0, 64)))
    backend.handle(msg(Request.SET_VRING_ADDR, m.VHOST_VRING_ADDR.pack(0, 0, 0, 8192, 4096, 0)))
    backend.handle(msg(Request.SET_VRING_KICK, m.U64.pack(0), [4]))
    assert dev.running[0].num == 64 and dev.running[0].last_avail == 0


REQUESTS = st.sampled_from([int(r) for r in Request] + [0, 41, 1000])


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.tuples(REQUESTS, st.binary(max_size=80), st.integers(0, 2), st.booleans()), max_size=12
    )
)
def test_fuzz_only_protocol_error_escapes(
    sequence: list[tuple[int, bytes, int, bool]],
) -> None:
    backend = VhostUserBackend(RecordingDevice())
    for request_, payload, nfds, ack in sequence:
        message = msg(request_, payload, list(range(100, 100 + nfds)), ack=ack)
        try:
            reply = backend.handle(message)
        except ProtocolError:
            continue
        if reply is not None:
            assert m.HEADER.unpack_from(reply.data)[1] == 0x5
