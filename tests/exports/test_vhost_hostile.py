"""A hostile vhost-user front-end: bad chains break only that queue; bad messages close only
that connection; the server (and every other export) keeps working."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storvisor.exports.vhost_user_blk import VhostUserBlkServer
from storvisor.protocols.vhost_user import messages as m
from storvisor.protocols.vhost_user.messages import MemoryRegion, Request
from storvisor.protocols.virtio.blk import RequestType, Status
from storvisor.protocols.virtio.ring import (
    VIRTQ_DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
)
from storvisor.testing.memory import MemoryDevice
from storvisor.testing.vhost_frontend import VhostUserFrontend
from waiting import wait_until

SIZE = 4 << 20


@pytest.fixture
def sockdir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="vub-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def servers(sockdir: str) -> Iterator[tuple[VhostUserBlkServer, VhostUserBlkServer]]:
    """The export under attack and a bystander export on another socket."""
    victim = VhostUserBlkServer(MemoryDevice(SIZE), f"{sockdir}/victim.sock", num_queues=2)
    other = VhostUserBlkServer(MemoryDevice(SIZE), f"{sockdir}/other.sock")
    victim.start()
    other.start()
    yield victim, other
    victim.close()
    other.close()


@pytest.fixture
def fe(servers: tuple[VhostUserBlkServer, VhostUserBlkServer]) -> Iterator[VhostUserFrontend]:
    with VhostUserFrontend(servers[0].socket_path, num_queues=2, queue_size=16, timeout=5) as f:
        f.setup()
        yield f


def _still_serving(server: VhostUserBlkServer) -> None:
    with VhostUserFrontend(server.socket_path, timeout=5) as fresh:
        fresh.setup()
        assert fresh.blk.write(0, b"ok" * 256) == Status.OK
        assert fresh.blk.read(0, 512) == (Status.OK, b"ok" * 256)


def _header_and_status(fe: VhostUserFrontend, rtype: int = RequestType.IN) -> tuple[int, int]:
    header = fe.memory.alloc(16)
    fe.memory.write(header, bytes(16))
    status = fe.memory.alloc(1)
    fe.memory.write(status, b"\xff")
    return header, status


def _loop(fe: VhostUserFrontend) -> None:
    header, status = _header_and_status(fe)
    fe.queues[0].write_desc(0, header, 16, VRING_DESC_F_NEXT, 1)
    fe.queues[0].write_desc(1, status, 1, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0)
    fe.queues[0].publish(0)


def _outside_memory(fe: VhostUserFrontend) -> None:
    header, _ = _header_and_status(fe)
    fe.queues[0].write_desc(0, header, 16, VRING_DESC_F_NEXT, 1)
    fe.queues[0].write_desc(1, 1 << 40, 4096, VRING_DESC_F_WRITE, 0)
    fe.queues[0].publish(0)


def _huge_length(fe: VhostUserFrontend) -> None:
    header, _ = _header_and_status(fe)
    fe.queues[0].write_desc(0, header, 16, VRING_DESC_F_NEXT, 1)
    fe.queues[0].write_desc(1, header, 0xFFFFFFFF, VRING_DESC_F_WRITE, 0)
    fe.queues[0].publish(0)


def _head_out_of_range(fe: VhostUserFrontend) -> None:
    fe.queues[0].publish(16)


def _next_out_of_range(fe: VhostUserFrontend) -> None:
    header, _ = _header_and_status(fe)
    fe.queues[0].write_desc(0, header, 16, VRING_DESC_F_NEXT, 999)
    fe.queues[0].publish(0)


def _avail_jump(fe: VhostUserFrontend) -> None:
    q = fe.queues[0]
    q.avail_idx = (q.avail_idx + 100) & 0xFFFF
    fe.memory.set_u16(q.avail_gpa + 2, q.avail_idx)
    fe.queues[0].kick()


def _oversized_indirect(fe: VhostUserFrontend) -> None:
    table = fe.memory.alloc(16 * 2048, 16)
    fe.queues[0].write_desc(0, table, 16 * 2048, VRING_DESC_F_INDIRECT, 0)
    fe.queues[0].publish(0)


def _indirect_loop(fe: VhostUserFrontend) -> None:
    header, status = _header_and_status(fe)
    table = fe.memory.alloc(32, 16)
    fe.memory.write(
        table,
        VIRTQ_DESC.pack(header, 16, VRING_DESC_F_NEXT, 1)
        + VIRTQ_DESC.pack(status, 1, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0),
    )
    fe.queues[0].write_desc(0, table, 32, VRING_DESC_F_INDIRECT, 0)
    fe.queues[0].publish(0)


def _nested_indirect(fe: VhostUserFrontend) -> None:
    inner = fe.memory.alloc(16, 16)
    outer = fe.memory.alloc(16, 16)
    fe.memory.write(outer, VIRTQ_DESC.pack(inner, 16, VRING_DESC_F_INDIRECT, 0))
    fe.queues[0].write_desc(0, outer, 16, VRING_DESC_F_INDIRECT, 0)
    fe.queues[0].publish(0)


def _misaligned_indirect(fe: VhostUserFrontend) -> None:
    table = fe.memory.alloc(32, 16)
    fe.queues[0].write_desc(0, table, 20, VRING_DESC_F_INDIRECT, 0)
    fe.queues[0].publish(0)


def _readable_after_writable(fe: VhostUserFrontend) -> None:
    header, status = _header_and_status(fe)
    fe.queues[0].write_desc(0, status, 1, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1)
    fe.queues[0].write_desc(1, header, 16, 0, 0)
    fe.queues[0].publish(0)


def _no_status(fe: VhostUserFrontend) -> None:
    header, _ = _header_and_status(fe)
    fe.queues[0].write_desc(0, header, 16, 0, 0)
    fe.queues[0].publish(0)


def _short_header(fe: VhostUserFrontend) -> None:
    header, status = _header_and_status(fe)
    fe.queues[0].write_desc(0, header, 8, VRING_DESC_F_NEXT, 1)
    fe.queues[0].write_desc(1, status, 1, VRING_DESC_F_WRITE, 0)
    fe.queues[0].publish(0)


@pytest.mark.parametrize(
    "attack",
    [
        _loop,
        _outside_memory,
        _huge_length,
        _head_out_of_range,
        _next_out_of_range,
        _avail_jump,
        _oversized_indirect,
        _indirect_loop,
        _nested_indirect,
        _misaligned_indirect,
        _readable_after_writable,
        _no_status,
        _short_header,
    ],
)
def test_bad_chain_breaks_only_that_queue(
    attack: Callable[[VhostUserFrontend], None],
    fe: VhostUserFrontend,
    servers: tuple[VhostUserBlkServer, VhostUserBlkServer],
) -> None:
    victim, other = servers
    attack(fe)
    wait_until(lambda: victim.broken_queues == {0}, "queue 0 broken", timeout=5)
    # the other queue of the same device still works, as does the control plane
    assert fe.blk.write(0, b"q1" * 256, queue=1) == Status.OK
    assert fe.blk.read(0, 512, queue=1) == (Status.OK, b"q1" * 256)
    assert fe.is_connected_alive()
    _still_serving(other)
    # the broken queue can be reset by the front-end: stop, new base, start
    fe.stop_queue(0)
    q = fe.queues[0]
    q.chains.clear()
    q.free = list(range(q.size))
    q.last_used = q.used_idx()
    q.avail_idx = q.notified_idx = q.last_used
    fe.memory.set_u16(q.avail_gpa + 2, q.avail_idx)
    fe.start_queue(0)
    assert fe.blk.read(0, 512) == (Status.OK, b"q1" * 256)
    assert victim.broken_queues == frozenset()


def _closed(fe: VhostUserFrontend) -> bool:
    """Whether the back-end dropped the connection."""
    assert fe.sock is not None
    fe.sock.settimeout(5)
    try:
        data = fe.sock.recv(64)
    except ConnectionResetError:
        return True
    return data == b""


def _bad(
    request: int, payload: bytes = b"", fds: tuple[int, ...] = ()
) -> Callable[[VhostUserFrontend], None]:
    def send(fe: VhostUserFrontend) -> None:
        fe.send(request, payload, fds)

    return send


def _bad_mem_table(fe: VhostUserFrontend) -> None:
    regions = fe.memory.mem_regions()
    fe.send(Request.SET_MEM_TABLE, m.pack_mem_table(regions))  # no fds


def _region_beyond_file(fe: VhostUserFrontend) -> None:
    r = fe.memory.regions[0]
    region = MemoryRegion(0, r.spec.size * 4, r.uva, 0)
    fe.send(Request.SET_MEM_TABLE, m.pack_mem_table([region]), [r.fd])


def _overlapping_regions(fe: VhostUserFrontend) -> None:
    r = fe.memory.regions[0]
    region = MemoryRegion(0, 1 << 20, r.uva, 0)
    fe.send(Request.SET_MEM_TABLE, m.pack_mem_table([region, region]), [r.fd, r.fd])


def _huge_size(fe: VhostUserFrontend) -> None:
    fe.send_raw(m.HEADER.pack(Request.GET_FEATURES, 1, 1 << 30))


def _bad_version(fe: VhostUserFrontend) -> None:
    fe.send(Request.GET_FEATURES, flags=2)


def _reply_flag(fe: VhostUserFrontend) -> None:
    fe.send(Request.GET_FEATURES, flags=m.REPLY_FLAGS)


def _too_many_fds(fe: VhostUserFrontend) -> None:
    fds = [os.eventfd(0) for _ in range(12)]
    try:
        fe.send(Request.SET_VRING_KICK, m.U64.pack(0), fds)
    finally:
        for fd in fds:
            os.close(fd)


def _truncated(fe: VhostUserFrontend) -> None:
    fe.send_raw(m.HEADER.pack(Request.SET_VRING_NUM, 1, 8) + b"\x00\x00")
    assert fe.sock is not None
    fe.sock.shutdown(socket.SHUT_WR)


@pytest.mark.parametrize(
    "attack",
    [
        _bad(Request.SET_VRING_NUM, b"\x00" * 4),
        _bad(Request.SET_VRING_NUM, m.VHOST_VRING_STATE.pack(0, 100)),
        _bad(Request.SET_VRING_NUM, m.VHOST_VRING_STATE.pack(7, 16)),
        _bad(Request.SET_VRING_ADDR, b"\x00" * 39),
        _bad(Request.SET_FEATURES, b"\x00" * 4),
        _bad(Request.SET_FEATURES, m.U64.pack(1 << 34)),
        _bad(Request.SET_VRING_KICK, m.U64.pack(0)),  # fd missing
        _bad(Request.SET_VRING_CALL, m.U64.pack(1 << 20)),
        _bad(Request.SET_INFLIGHT_FD, b"\x00" * 20),
        _bad(Request.GET_CONFIG, m.VHOST_USER_CONFIG.pack(0, 60, 0)),  # size says 60, none sent
        _bad(Request.ADD_MEM_REG, b"\x00" * 40),  # no fd
        _bad(Request.GET_VRING_BASE, m.VHOST_VRING_STATE.pack(5, 0)),
        _bad_mem_table,
        _region_beyond_file,
        _overlapping_regions,
        _huge_size,
        _bad_version,
        _reply_flag,
        _too_many_fds,
        _truncated,
    ],
)
def test_bad_message_closes_connection(
    attack: Callable[[VhostUserFrontend], None],
    fe: VhostUserFrontend,
    servers: tuple[VhostUserBlkServer, VhostUserBlkServer],
) -> None:
    victim, other = servers
    attack(fe)
    assert _closed(fe)
    fe.disconnect()
    _still_serving(victim)
    _still_serving(other)


def test_unknown_request(fe: VhostUserFrontend) -> None:
    fe.send(99, b"\x01\x02\x03")  # no reply wanted: ignored
    assert fe.is_connected_alive()
    fe.send(99, need_reply=True)
    reply, _ = fe.recv_reply(99)
    assert reply == m.U64.pack(1)
    fe.send(Request.SET_VRING_ENDIAN, m.VHOST_VRING_STATE.pack(0, 0), need_reply=True)
    assert fe.recv_reply(Request.SET_VRING_ENDIAN)[0] == m.U64.pack(1)
    assert fe.blk.read(0, 512)[0] == Status.OK


def test_get_config_out_of_range_is_an_empty_reply(fe: VhostUserFrontend) -> None:
    reply = fe.call(Request.GET_CONFIG, m.VHOST_USER_CONFIG.pack(250, 60, 0) + bytes(60))
    assert reply == b""
    assert fe.is_connected_alive()


def test_second_frontend_waits_for_the_first(
    servers: tuple[VhostUserBlkServer, VhostUserBlkServer],
) -> None:
    victim, _ = servers
    with VhostUserFrontend(victim.socket_path, timeout=5) as first:
        first.setup()
        second = VhostUserFrontend(victim.socket_path, timeout=0.3)
        second.connect()
        with pytest.raises(OSError):
            second.get_u64(Request.GET_FEATURES)
        second.close()
        assert first.blk.write(0, b"1" * 512) == Status.OK
    _still_serving(victim)


def test_rings_outside_memory_break_the_queue(
    fe: VhostUserFrontend, servers: tuple[VhostUserBlkServer, VhostUserBlkServer]
) -> None:
    victim, _ = servers
    base = fe.stop_queue(0)
    fe.request(Request.SET_VRING_BASE, m.VHOST_VRING_STATE.pack(0, base))
    fe.request(Request.SET_VRING_ADDR, m.VHOST_VRING_ADDR.pack(0, 0, 1 << 50, 1 << 51, 1 << 52, 0))
    fe.request(Request.SET_VRING_KICK, m.U64.pack(0), [fe.queues[0].kick_fd])
    fe.request(Request.SET_VRING_ENABLE, m.VHOST_VRING_STATE.pack(0, 1))
    assert victim.broken_queues == {0}
    assert fe.stop_queue(0) == base
    assert fe.blk.write(0, b"q1" * 256, queue=1) == Status.OK


def test_messages_arriving_byte_by_byte(fe: VhostUserFrontend) -> None:
    assert fe.sock is not None
    data = m.encode(Request.GET_CONFIG, m.VHOST_USER_CONFIG.pack(0, 36, 0) + bytes(36))
    for i in range(len(data)):
        fe.sock.send(data[i : i + 1])
        time.sleep(0.001)
    reply, _ = fe.recv_reply(Request.GET_CONFIG)
    assert len(reply) == 12 + 36 and reply[12:20] == (SIZE // 512).to_bytes(8, "little")
    # an fd travelling with the first byte of a header split in two
    q = fe.queues[1]
    data = m.encode(Request.SET_VRING_CALL, m.U64.pack(1))
    socket.send_fds(fe.sock, [data[:1]], [q.call_fd])
    time.sleep(0.01)
    fe.sock.send(data[1:])
    assert fe.is_connected_alive()
    assert fe.blk.write(0, b"z" * 512, queue=1) == Status.OK


def test_no_fd_or_thread_leak(servers: tuple[VhostUserBlkServer, VhostUserBlkServer]) -> None:
    victim, _ = servers

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    def cycle() -> None:
        with VhostUserFrontend(victim.socket_path, num_queues=2, timeout=5) as fe:
            fe.setup()
            fe.blk.write(0, b"x" * 512)
            fe.blk.write(0, b"y" * 512, queue=1)
            _region_beyond_file(fe)  # dropped with queues running and memory mapped
            assert _closed(fe)
        deadline = time.monotonic() + 5
        while victim.connected:
            assert time.monotonic() < deadline
            time.sleep(0.01)

    cycle()  # warm up (lazy imports, logging)
    fds, threads = open_fds(), threading.active_count()
    for _ in range(5):
        cycle()
    assert open_fds() == fds
    assert threading.active_count() == threads


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(st.integers(0, 45), st.binary(max_size=64), st.integers(0, 2)),
        min_size=1,
        max_size=6,
    )
)
def test_fuzzed_messages_never_hurt_the_server(
    servers: tuple[VhostUserBlkServer, VhostUserBlkServer], messages: list[tuple[int, bytes, int]]
) -> None:
    victim, _ = servers
    fe = VhostUserFrontend(victim.socket_path, timeout=2)
    try:
        fe.connect()
        for request, payload, nfds in messages:
            fds = [os.eventfd(0) for _ in range(nfds)]
            try:
                fe.send(request, payload, fds)
            except OSError:
                break  # the back-end already dropped us
            finally:
                for fd in fds:
                    os.close(fd)
    finally:
        fe.close()
    deadline = time.monotonic() + 5
    while victim.connected:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    _still_serving(victim)


def test_broken_queue_signals_the_error_eventfd(
    fe: VhostUserFrontend, servers: tuple[VhostUserBlkServer, VhostUserBlkServer]
) -> None:
    err = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        fe.request(Request.SET_VRING_ERR, m.U64.pack(0), [err])
        _loop(fe)
        wait_until(lambda: servers[0].broken_queues == {0}, "queue 0 broken", timeout=5)
        assert os.eventfd_read(err) == 1
    finally:
        os.close(err)
