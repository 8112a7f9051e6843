"""The vhost-user front-end (the role QEMU plays): the socket, its messages, negotiation,
memory table, queue set-up, reconnection and dirty logging. Guest memory, the driver rings
and the virtio-blk driver are parts it is composed of (``memory``, ``queues``, ``blk``)."""

from __future__ import annotations

import os
import socket
import struct
import time
from types import TracebackType

from storvisor.errors import ProtocolError
from storvisor.protocols.vhost_user import messages as m
from storvisor.protocols.vhost_user.dirty_log import log_size_for
from storvisor.protocols.vhost_user.messages import ProtocolFeature, Request
from storvisor.protocols.virtio import blk
from storvisor.protocols.virtio.blk import bit
from storvisor.testing.vhost_frontend.blk_driver import BlkDriver
from storvisor.testing.vhost_frontend.driver_ring import DriverQueue, layout_queues
from storvisor.testing.vhost_frontend.guest_memory import GuestRam, RegionSpec


class VhostUserFrontend:
    """A vhost-user-blk front-end over a Unix socket. See the module docstring.

    ``regions`` default to one 32 MiB region at guest-physical 0 (``memory``, a
    ``GuestRam``). Rings of ``queue_size`` entries for ``num_queues`` queues (``queues``,
    ``DriverQueue`` s) live at the start of the first region; ``blk`` (a ``BlkDriver``)
    submits virtio-blk requests on them, its buffers carved from the rest.
    """

    def __init__(
        self,
        socket_path: str,
        *,
        regions: list[RegionSpec] | None = None,
        num_queues: int = 1,
        queue_size: int = 128,
        event_idx: bool = True,
        indirect: bool = True,
        inflight: bool = False,
        dirty_log: bool = False,
        timeout: float = 10.0,
    ) -> None:
        self.socket_path = socket_path
        self.specs = regions or [RegionSpec(0, 32 << 20)]
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.want_event_idx = event_idx
        self.want_indirect = indirect
        self.want_inflight = inflight
        self.want_dirty_log = dirty_log
        self.log_fd: int | None = None
        self.log_size = 0
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.memory = GuestRam(self.specs)
        self.queues: list[DriverQueue] = []
        self.blk = BlkDriver(self.memory, self.queues)
        self.features = 0
        self.offered_features = 0
        self.protocol_features = 0
        self.inflight_fd: int | None = None
        self.inflight_size = 0
        self.backend_channel: socket.socket | None = None
        self.config = b""

    # -- life cycle --------------------------------------------------------------------------

    def __enter__(self) -> VhostUserFrontend:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def connect(self, *, wait: float = 5.0) -> None:
        """Connect to the back-end's socket, retrying for up to ``wait`` seconds."""
        deadline = time.monotonic() + wait
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(self.socket_path)
                break
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        sock.settimeout(self.timeout)
        self.sock = sock

    def close(self) -> None:
        """Disconnect and free guest memory and eventfds."""
        self.disconnect()
        for q in self.queues:
            q.close()
        self.queues.clear()  # the list blk uses
        self.memory.close()
        if self.inflight_fd is not None:
            os.close(self.inflight_fd)
            self.inflight_fd = None
        if self.log_fd is not None:
            os.close(self.log_fd)
            self.log_fd = None

    def disconnect(self) -> None:
        """Close the socket only (guest memory, rings and the inflight fd stay)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.backend_channel is not None:
            self.backend_channel.close()
            self.backend_channel = None

    # -- messages ----------------------------------------------------------------------------

    def send(
        self,
        request: int,
        payload: bytes = b"",
        fds: list[int] | tuple[int, ...] = (),
        *,
        flags: int | None = None,
        need_reply: bool = False,
    ) -> None:
        """Send one message (``flags`` overrides the computed flags, for bad-input tests)."""
        assert self.sock is not None, "not connected"
        if flags is None:
            flags = m.VHOST_USER_VERSION | (m.VHOST_USER_NEED_REPLY_MASK if need_reply else 0)
        data = m.encode(request, payload, flags=flags)
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.sendall(data)

    def send_raw(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Send arbitrary bytes (and fds) on the socket."""
        assert self.sock is not None, "not connected"
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.sendall(data)

    def recv_reply(self, request: int) -> tuple[bytes, list[int]]:
        """Read one reply to ``request``; ``ProtocolError`` unless flags are exactly 0x5."""
        assert self.sock is not None, "not connected"
        header, fds, _, _ = socket.recv_fds(self.sock, m.HEADER.size, m.MAX_FDS)
        if len(header) < m.HEADER.size:
            raise ProtocolError(f"back-end closed the connection (reply to {request})")
        _, size = m.decode_reply(request, header)
        payload = b""
        while len(payload) < size:
            more = self.sock.recv(size - len(payload))
            if not more:
                raise ProtocolError("back-end closed the connection inside a reply")
            payload += more
        return payload, fds

    def call(
        self, request: int, payload: bytes = b"", fds: list[int] | tuple[int, ...] = ()
    ) -> bytes:
        """Send a message that has a natural reply; return the reply payload."""
        self.send(request, payload, fds)
        reply, got = self.recv_reply(request)
        for fd in got:
            os.close(fd)
        return reply

    def request(
        self, request: int, payload: bytes = b"", fds: list[int] | tuple[int, ...] = ()
    ) -> None:
        """Send a message without a natural reply; with REPLY_ACK, check its ack."""
        ack = bool(self.protocol_features & bit(ProtocolFeature.REPLY_ACK))
        self.send(request, payload, fds, need_reply=ack)
        if ack:
            reply, _ = self.recv_reply(request)
            if reply != m.U64.pack(0):
                raise ProtocolError(f"{Request(request).name} failed: {reply!r}")

    def get_u64(self, request: int) -> int:
        reply = self.call(request)
        if len(reply) != 8:
            raise ProtocolError(f"{Request(request).name}: reply of {len(reply)} bytes")
        value: int = m.U64.unpack(reply)[0]
        return value

    def is_connected_alive(self, wait: float = 1.0) -> bool:
        """Whether the back-end still answers (GET_FEATURES) within ``wait`` seconds."""
        assert self.sock is not None
        old = self.sock.gettimeout()
        self.sock.settimeout(wait)
        try:
            self.get_u64(Request.GET_FEATURES)
            return True
        except (OSError, ProtocolError):
            return False
        finally:
            if self.sock is not None:
                self.sock.settimeout(old)

    # -- negotiation and set-up ---------------------------------------------------------------

    def negotiate(self) -> None:
        """Connect-time exchange as QEMU does it: features, protocol features, queue count,
        back-end channel, owner, config."""
        self.offered_features = self.get_u64(Request.GET_FEATURES)
        if not self.offered_features & bit(m.VHOST_USER_F_PROTOCOL_FEATURES):
            raise ProtocolError("back-end does not offer PROTOCOL_FEATURES")
        offered = self.get_u64(Request.GET_PROTOCOL_FEATURES)
        wanted = (
            bit(ProtocolFeature.MQ)
            | bit(ProtocolFeature.REPLY_ACK)
            | bit(ProtocolFeature.CONFIG)
            | bit(ProtocolFeature.BACKEND_REQ)
            | bit(ProtocolFeature.CONFIGURE_MEM_SLOTS)
            | (bit(ProtocolFeature.INFLIGHT_SHMFD) if self.want_inflight else 0)
            | (bit(ProtocolFeature.LOG_SHMFD) if self.want_dirty_log else 0)
        )
        self.protocol_features = offered & wanted
        self.send(Request.SET_PROTOCOL_FEATURES, m.U64.pack(self.protocol_features))
        if self.protocol_features & bit(ProtocolFeature.MQ):
            queues = self.get_u64(Request.GET_QUEUE_NUM)
            if queues < self.num_queues:
                raise ProtocolError(f"back-end has {queues} queues, {self.num_queues} wanted")
        if self.protocol_features & bit(ProtocolFeature.BACKEND_REQ):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            self.request(Request.SET_BACKEND_REQ_FD, b"", [theirs.fileno()])
            theirs.close()
            ours.settimeout(self.timeout)
            self.backend_channel = ours
        self.request(Request.SET_OWNER)
        self.config = self.get_config(0, 60)

    def get_config(self, offset: int, size: int) -> bytes:
        reply = self.call(
            Request.GET_CONFIG, m.VHOST_USER_CONFIG.pack(offset, size, 0) + bytes(size)
        )
        if len(reply) != 12 + size:
            raise ProtocolError(f"GET_CONFIG: reply of {len(reply)} bytes")
        return reply[12:]

    @property
    def capacity(self) -> int:
        """Capacity in bytes from the last config read."""
        value: int = struct.unpack_from("<Q", self.config)[0]
        return value << 9

    def set_features(self) -> None:
        features = bit(blk.VIRTIO_F_VERSION_1) | bit(m.VHOST_USER_F_PROTOCOL_FEATURES)
        for feature in (
            blk.VIRTIO_BLK_F_FLUSH,
            blk.VIRTIO_BLK_F_BLK_SIZE,
            blk.VIRTIO_BLK_F_SEG_MAX,
            blk.VIRTIO_BLK_F_MQ,
            blk.VIRTIO_BLK_F_RO,
            blk.VIRTIO_BLK_F_DISCARD,
            blk.VIRTIO_BLK_F_WRITE_ZEROES,
            blk.VIRTIO_BLK_F_CONFIG_WCE,
        ):
            features |= bit(feature)
        if self.want_event_idx:
            features |= bit(blk.VIRTIO_RING_F_EVENT_IDX)
        if self.want_indirect:
            features |= bit(blk.VIRTIO_RING_F_INDIRECT_DESC)
        self.features = features & self.offered_features
        self._sync_queues()
        self.request(Request.SET_FEATURES, m.U64.pack(self.features))

    def _sync_queues(self) -> None:
        event_idx = bool(self.features & bit(blk.VIRTIO_RING_F_EVENT_IDX))
        for q in self.queues:
            q.event_idx = event_idx

    def set_mem_table(self) -> None:
        regions = self.memory.mem_regions()
        fds = [r.fd for r in self.memory.regions]
        self.request(Request.SET_MEM_TABLE, m.pack_mem_table(regions), fds)

    def setup_inflight(self) -> None:
        """GET_INFLIGHT_FD once (the buffer is kept), then SET_INFLIGHT_FD."""
        if self.inflight_fd is None:
            payload = m.VHOST_USER_INFLIGHT.pack(0, 0, self.num_queues, self.queue_size)
            self.send(Request.GET_INFLIGHT_FD, payload)
            reply, fds = self.recv_reply(Request.GET_INFLIGHT_FD)
            if len(reply) != 24 or len(fds) != 1:
                raise ProtocolError("GET_INFLIGHT_FD: bad reply")
            self.inflight_size = m.VHOST_USER_INFLIGHT.unpack(reply)[0]
            self.inflight_fd = fds[0]
        payload = m.VHOST_USER_INFLIGHT.pack(
            self.inflight_size, 0, self.num_queues, self.queue_size
        )
        self.request(Request.SET_INFLIGHT_FD, payload, [self.inflight_fd])

    def setup(self) -> None:
        """connect (if needed), negotiate, and start every queue: a ready device."""
        if self.sock is None:
            self.connect()
        self.negotiate()
        if self.want_inflight and self.protocol_features & bit(ProtocolFeature.INFLIGHT_SHMFD):
            self.setup_inflight()
        self.set_features()
        self.set_mem_table()
        if not self.queues:
            self.layout_queues()
        for q in self.queues:
            self.start_queue(q.index)

    def layout_queues(self) -> None:
        """Lay the rings out in guest memory (``setup`` does it before starting queues)."""
        self.queues.extend(
            layout_queues(self.memory, self.num_queues, self.queue_size, timeout=self.timeout)
        )
        self._sync_queues()

    def start_queue(self, index: int, *, base: int | None = None) -> None:
        """NUM, BASE, ADDR, KICK, CALL, ENABLE(1) for one queue."""
        q = self.queues[index]
        self.request(Request.SET_VRING_NUM, m.VHOST_VRING_STATE.pack(index, q.size))
        start = q.avail_idx if base is None else base
        self.request(Request.SET_VRING_BASE, m.VHOST_VRING_STATE.pack(index, start))
        uva = self.memory.uva
        addr = m.VHOST_VRING_ADDR.pack(
            index, 0, uva(q.desc_gpa), uva(q.used_gpa), uva(q.avail_gpa), 0
        )
        self.request(Request.SET_VRING_ADDR, addr)
        self.request(Request.SET_VRING_KICK, m.U64.pack(index), [q.kick_fd])
        self.request(Request.SET_VRING_CALL, m.U64.pack(index), [q.call_fd])
        self.request(Request.SET_VRING_ENABLE, m.VHOST_VRING_STATE.pack(index, 1))

    def stop_queue(self, index: int) -> int:
        """ENABLE(0) then GET_VRING_BASE; returns the back-end's next avail index."""
        self.request(Request.SET_VRING_ENABLE, m.VHOST_VRING_STATE.pack(index, 0))
        reply = self.call(Request.GET_VRING_BASE, m.VHOST_VRING_STATE.pack(index, 0))
        got_index, num = m.VHOST_VRING_STATE.unpack(reply)
        if got_index != index:
            raise ProtocolError(f"GET_VRING_BASE answered for queue {got_index}")
        base: int = num
        return base

    def reconnect(self) -> None:
        """After the back-end restarted: connect again and restore the device as QEMU does
        (same memory and rings; inflight buffer handed back; base = used index)."""
        self.disconnect()
        self.connect()
        self.negotiate()
        if self.inflight_fd is not None:
            self.setup_inflight()
        self.set_features()
        self.set_mem_table()
        for q in self.queues:
            self.start_queue(q.index, base=q.used_idx())

    def start_logging(self) -> None:
        """Start dirty logging as QEMU does at migration: SET_LOG_BASE with a fresh bitmap,
        SET_FEATURES with ``VHOST_F_LOG_ALL``, SET_VRING_ADDR with ``VHOST_VRING_F_LOG``.
        Needs ``dirty_log=True`` (LOG_SHMFD)."""
        self.log_size = log_size_for(self.memory.end)
        if self.log_fd is None:
            self.log_fd = os.memfd_create("dirty-log", os.MFD_CLOEXEC)
        os.ftruncate(self.log_fd, 0)
        os.ftruncate(self.log_fd, self.log_size)
        reply = self.call(
            Request.SET_LOG_BASE, m.VHOST_USER_LOG.pack(self.log_size, 0), [self.log_fd]
        )
        if reply != m.U64.pack(0):
            raise ProtocolError(f"SET_LOG_BASE failed: {reply!r}")
        self.features |= bit(m.VHOST_F_LOG_ALL)
        self.request(Request.SET_FEATURES, m.U64.pack(self.features))
        for q in self.queues:
            addr = m.VHOST_VRING_ADDR.pack(
                q.index,
                m.VHOST_VRING_F_LOG,
                self.memory.uva(q.desc_gpa),
                self.memory.uva(q.used_gpa),
                self.memory.uva(q.avail_gpa),
                q.used_gpa,
            )
            self.request(Request.SET_VRING_ADDR, addr)

    def stop_logging(self) -> None:
        self.features &= ~bit(m.VHOST_F_LOG_ALL)
        self.request(Request.SET_FEATURES, m.U64.pack(self.features))

    def dirty_pages(self, *, clear: bool = True) -> set[int]:
        """Guest page numbers (gpa // 4096) marked in the log; ``clear`` resets the log."""
        assert self.log_fd is not None, "logging never started"
        raw = os.pread(self.log_fd, self.log_size, 0)
        pages = {8 * i + b for i, byte in enumerate(raw) if byte for b in range(8) if byte >> b & 1}
        if clear:
            os.pwrite(self.log_fd, bytes(self.log_size), 0)
        return pages

    def set_wce(self, enabled: bool) -> None:
        """SET_CONFIG of the ``wce`` byte (write-back cache on or off)."""
        payload = m.VHOST_USER_CONFIG.pack(blk.WCE_OFFSET, 1, 0) + bytes([int(enabled)])
        self.request(Request.SET_CONFIG, payload)

    def wait_backend_message(self) -> tuple[int, bytes]:
        """Read one back-end initiated message (e.g. CONFIG_CHANGE_MSG) from the channel."""
        assert self.backend_channel is not None, "BACKEND_REQ not negotiated"
        header = b""
        while len(header) < m.HEADER.size:
            more = self.backend_channel.recv(m.HEADER.size - len(header))
            if not more:
                raise ProtocolError("back-end channel closed")
            header += more
        request, flags, size = m.decode_header(header)
        payload = self.backend_channel.recv(size, socket.MSG_WAITALL) if size else b""
        if flags & m.VHOST_USER_NEED_REPLY_MASK:
            self.backend_channel.sendall(m.encode_reply(request, m.U64.pack(0)))
        return request, payload
