"""The vhost-user front-end (the role QEMU plays)."""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import socket
import struct
import time
from types import TracebackType

from storvisor.errors import ProtocolError
from storvisor.protocols.vhost_user import messages as m
from storvisor.protocols.vhost_user.dirty_log import log_size_for
from storvisor.protocols.vhost_user.messages import MemoryRegion, ProtocolFeature, Request
from storvisor.protocols.virtio import blk
from storvisor.protocols.virtio.blk import RequestType, Status, bit
from storvisor.protocols.virtio.ring import (
    VIRTQ_DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
    vring_need_event,
)
from storvisor.testing.vhost_frontend.driver_ring import _FENCE, Segment, _Queue
from storvisor.testing.vhost_frontend.guest_memory import USER_BASE, RegionSpec, _Region


class VhostUserFrontend:
    """A vhost-user-blk front-end over a Unix socket. See the module docstring.

    ``regions`` default to one 32 MiB region at guest-physical 0. Rings of ``queue_size``
    entries for ``num_queues`` queues live at the start of the first region; request buffers
    are carved from the rest by a bump allocator that rewinds when nothing is in flight.
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
        self.regions: list[_Region] = []
        self.queues: list[_Queue] = []
        self.features = 0
        self.offered_features = 0
        self.protocol_features = 0
        self.inflight_fd: int | None = None
        self.inflight_size = 0
        self.backend_channel: socket.socket | None = None
        self.config = b""
        self._alloc_start = 0
        self._alloc_next = 0
        self._alloc_region = 0
        self._create_memory()

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

    def _create_memory(self) -> None:
        uva = USER_BASE
        for spec in self.specs:
            fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
            os.ftruncate(fd, spec.mmap_offset + spec.size)
            mm = mmap.mmap(fd, spec.mmap_offset + spec.size, mmap.MAP_SHARED)
            self.regions.append(_Region(spec, fd, mm, uva))
            uva += (spec.size + (1 << 30)) & ~0xFFF  # leave a gap: user != guest addresses

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
            os.close(q.kick)
            os.close(q.call)
        self.queues = []
        for r in self.regions:
            r.mm.close()
            os.close(r.fd)
        self.regions = []
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
        self.request(Request.SET_FEATURES, m.U64.pack(self.features))

    def mem_regions(self) -> list[MemoryRegion]:
        return [
            MemoryRegion(r.spec.gpa, r.spec.size, r.uva, r.spec.mmap_offset) for r in self.regions
        ]

    def set_mem_table(self) -> None:
        regions = self.mem_regions()
        self.request(Request.SET_MEM_TABLE, m.pack_mem_table(regions), [r.fd for r in self.regions])

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
            self._layout_queues()
        for q in self.queues:
            self.start_queue(q.index)

    def _layout_queues(self) -> None:
        region = self.regions[0]
        cursor = region.spec.gpa
        n = self.queue_size
        for index in range(self.num_queues):
            desc = _align(cursor, 4096)
            avail = _align(desc + desc_table_size(n), 4096)
            used = _align(avail + avail_ring_size(n), 4096)
            cursor = used + used_ring_size(n)
            kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self.queues.append(_Queue(index, n, desc, avail, used, kick, call, free=list(range(n))))
        self._alloc_start = _align(cursor, 4096)
        self._alloc_next = self._alloc_start
        if not region.contains(self._alloc_start, 4096):
            raise ValueError("first region too small for the rings")

    def start_queue(self, index: int, *, base: int | None = None) -> None:
        """NUM, BASE, ADDR, KICK, CALL, ENABLE(1) for one queue."""
        q = self.queues[index]
        self.request(Request.SET_VRING_NUM, m.VHOST_VRING_STATE.pack(index, q.size))
        start = q.avail_idx if base is None else base
        self.request(Request.SET_VRING_BASE, m.VHOST_VRING_STATE.pack(index, start))
        addr = m.VHOST_VRING_ADDR.pack(
            index, 0, self.uva(q.desc_gpa), self.uva(q.used_gpa), self.uva(q.avail_gpa), 0
        )
        self.request(Request.SET_VRING_ADDR, addr)
        self.request(Request.SET_VRING_KICK, m.U64.pack(index), [q.kick])
        self.request(Request.SET_VRING_CALL, m.U64.pack(index), [q.call])
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
            self.start_queue(q.index, base=self._used_idx(q))

    def start_logging(self) -> None:
        """Start dirty logging as QEMU does at migration: SET_LOG_BASE with a fresh bitmap,
        SET_FEATURES with ``VHOST_F_LOG_ALL``, SET_VRING_ADDR with ``VHOST_VRING_F_LOG``.
        Needs ``dirty_log=True`` (LOG_SHMFD)."""
        end = max(r.spec.gpa + r.spec.size for r in self.regions)
        self.log_size = log_size_for(end)
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
                self.uva(q.desc_gpa),
                self.uva(q.used_gpa),
                self.uva(q.avail_gpa),
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

    # -- guest memory ---------------------------------------------------------------------------

    def _region_of(self, gpa: int, length: int = 1) -> _Region:
        for r in self.regions:
            if r.contains(gpa, length):
                return r
        raise ValueError(f"{gpa:#x}+{length} is not inside one region")

    def uva(self, gpa: int) -> int:
        r = self._region_of(gpa)
        return r.uva + (gpa - r.spec.gpa)

    def view(self, gpa: int, length: int) -> memoryview:
        r = self._region_of(gpa, length)
        start = r.spec.mmap_offset + gpa - r.spec.gpa
        return memoryview(r.mm)[start : start + length]

    def write_mem(self, gpa: int, data: bytes) -> None:
        """Write guest memory (may cross adjacent regions)."""
        done = 0
        while done < len(data):
            r = self._region_of(gpa + done)
            n = min(len(data) - done, r.spec.gpa + r.spec.size - (gpa + done))
            with self.view(gpa + done, n) as v:
                v[:] = data[done : done + n]
            done += n

    def read_mem(self, gpa: int, length: int) -> bytes:
        out = b""
        while len(out) < length:
            r = self._region_of(gpa + len(out))
            n = min(length - len(out), r.spec.gpa + r.spec.size - (gpa + len(out)))
            with self.view(gpa + len(out), n) as v:
                out += bytes(v)
        return out

    def alloc(self, length: int, align: int = 8) -> int:
        """Carve ``length`` bytes of guest memory (within one region)."""
        while True:
            r = self.regions[self._alloc_region]
            start = _align(max(self._alloc_next, r.spec.gpa), align)
            if r.contains(start, length):
                self._alloc_next = start + length
                return start
            if self._alloc_region + 1 >= len(self.regions):
                raise MemoryError("guest memory exhausted; complete requests first")
            self._alloc_region += 1
            self._alloc_next = self.regions[self._alloc_region].spec.gpa

    def alloc_across(self, length: int) -> int:
        """A buffer straddling the end of one region and the start of the next (which must
        be GPA-adjacent)."""
        for a, b in zip(self.regions, self.regions[1:], strict=False):
            end = a.spec.gpa + a.spec.size
            if b.spec.gpa == end and length >= 2:
                return end - length // 2
        raise ValueError("no two GPA-adjacent regions")

    def _maybe_rewind(self) -> None:
        if all(not q.chains for q in self.queues):
            self._alloc_next = self._alloc_start
            self._alloc_region = 0

    # -- rings ----------------------------------------------------------------------------------

    def _u16(self, gpa: int) -> int:
        with self.view(gpa, 2) as v:
            value: int = v.cast("H")[0]
        return value

    def _set_u16(self, gpa: int, value: int) -> None:
        with self.view(gpa, 2) as v:
            v.cast("H")[0] = value & 0xFFFF

    def _used_idx(self, q: _Queue) -> int:
        return self._u16(q.used_gpa + 2)

    def write_desc(
        self, queue: int, index: int, addr: int, length: int, flags: int, nxt: int
    ) -> None:
        """Write descriptor ``index`` of a queue's table directly (for bad-chain tests)."""
        q = self.queues[queue]
        self.write_mem(q.desc_gpa + 16 * index, VIRTQ_DESC.pack(addr, length, flags, nxt))

    def publish(self, queue: int, head: int, *, kick: bool = True) -> None:
        """Put ``head`` in the avail ring and advance ``avail.idx`` (then maybe kick)."""
        q = self.queues[queue]
        self._set_u16(q.avail_gpa + 4 + 2 * (q.avail_idx % q.size), head)
        q.avail_idx = (q.avail_idx + 1) & 0xFFFF
        self._set_u16(q.avail_gpa + 2, q.avail_idx)
        if kick:
            self._kick(q)

    def _kick(self, q: _Queue) -> None:
        # "old" is avail.idx at the previous notification decision (a whole batch)
        old, q.notified_idx = q.notified_idx, q.avail_idx
        with _FENCE:  # full barrier between the avail.idx store and the avail_event load
            pass
        if self.features & bit(blk.VIRTIO_RING_F_EVENT_IDX):
            avail_event = self._u16(q.used_gpa + 4 + 8 * q.size)
            if not vring_need_event(avail_event, q.avail_idx, old):
                return
        elif self._u16(q.used_gpa) & VRING_USED_F_NO_NOTIFY:
            return
        os.eventfd_write(q.kick, 1)
        q.kicks += 1

    def kick(self, queue: int) -> None:
        """Kick unconditionally."""
        os.eventfd_write(self.queues[queue].kick, 1)
        self.queues[queue].kicks += 1

    def submit(
        self,
        queue: int,
        readable: list[Segment],
        writable: list[Segment],
        *,
        indirect: bool = False,
        kick: bool = True,
    ) -> int:
        """Build a chain (or an indirect table) over these buffers and publish it.

        Returns the head descriptor id, the key of :meth:`wait`.
        """
        q = self.queues[queue]
        segments = [(a, n, 0) for a, n in readable] + [
            (a, n, VRING_DESC_F_WRITE) for a, n in writable
        ]
        if indirect:
            table = self.alloc(16 * len(segments), 16)
            raw = b"".join(
                VIRTQ_DESC.pack(
                    a, n, f | (VRING_DESC_F_NEXT if i + 1 < len(segments) else 0), i + 1
                )
                for i, (a, n, f) in enumerate(segments)
            )
            self.write_mem(table, raw)
            segments = [(table, len(raw), VRING_DESC_F_INDIRECT)]
        if len(q.free) < len(segments):
            raise RuntimeError("no free descriptors; wait for completions first")
        ids = [q.free.pop() for _ in segments]
        for i, (a, n, f) in enumerate(segments):
            last = i + 1 == len(segments)
            nxt = 0 if last else ids[i + 1]
            self.write_desc(queue, ids[i], a, n, f | (0 if last else VRING_DESC_F_NEXT), nxt)
        q.chains[ids[0]] = ids
        self.publish(queue, ids[0], kick=kick)
        return ids[0]

    def poll_used(self, queue: int) -> int:
        """Collect completions from the used ring; returns how many were new."""
        q = self.queues[queue]
        used = self._used_idx(q)
        count = 0
        while q.last_used != used:
            slot = q.used_gpa + 4 + 8 * (q.last_used % q.size)
            head, length = struct.unpack("<II", self.read_mem(slot, 8))
            ids = q.chains.pop(head, None)
            if ids is None:
                raise ProtocolError(f"used ring returned id {head}, which is not in flight")
            q.free.extend(ids)
            q.completions[head] = length
            q.last_used = (q.last_used + 1) & 0xFFFF
            count += 1
        if self.features & bit(blk.VIRTIO_RING_F_EVENT_IDX):
            self._set_u16(q.avail_gpa + 4 + 2 * q.size, q.last_used)  # used_event
        return count

    def wait(self, queue: int, head: int) -> int:
        """Wait until ``head`` completes; return its ``used.len``."""
        q = self.queues[queue]
        deadline = time.monotonic() + self.timeout
        while head not in q.completions:
            self.poll_used(queue)
            if head in q.completions:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"request {head} on queue {queue} did not complete")
            poller = select.poll()
            poller.register(q.call, select.POLLIN)
            if poller.poll(min(remaining, 0.05) * 1000):
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(q.call)
        length = q.completions.pop(head)
        self._maybe_rewind()
        return length

    def in_flight(self, queue: int = 0) -> int:
        return len(self.queues[queue].chains)

    # -- virtio-blk requests -----------------------------------------------------------------

    def blk_submit(
        self,
        rtype: int,
        sector: int = 0,
        *,
        out: bytes = b"",
        in_len: int = 0,
        queue: int = 0,
        segments: int = 1,
        indirect: bool = False,
        across: bool = False,
        kick: bool = True,
    ) -> tuple[int, int, int]:
        """Submit one request; returns ``(head, data gpa, status gpa)``.

        ``out`` is device-readable data after the header, ``in_len`` device-writable bytes
        before the status; the data is split into ``segments`` descriptors; with ``across``
        the data buffer straddles two GPA-adjacent regions.
        """
        header = self.alloc(16)
        self.write_mem(header, blk.VIRTIO_BLK_OUTHDR.pack(rtype, 0, sector))
        length = len(out) or in_len
        data = self.alloc_across(length) if across else (self.alloc(length, 512) if length else 0)
        if out:
            self.write_mem(data, out)
        elif in_len:
            self.write_mem(data, b"\xee" * in_len)
        status = self.alloc(1)
        self.write_mem(status, b"\xff")
        pieces = _split(data, length, segments) if length else []
        readable = [(header, 16)] + (pieces if out else [])
        writable = ([] if out else pieces) + [(status, 1)]
        head = self.submit(queue, readable, writable, indirect=indirect, kick=kick)
        return head, data, status

    def blk_request(
        self,
        rtype: int,
        sector: int = 0,
        *,
        out: bytes = b"",
        in_len: int = 0,
        queue: int = 0,
        segments: int = 1,
        indirect: bool = False,
        across: bool = False,
    ) -> tuple[int, bytes, int]:
        """Submit, wait; returns ``(status, data read, used.len)``."""
        head, data, status = self.blk_submit(
            rtype,
            sector,
            out=out,
            in_len=in_len,
            queue=queue,
            segments=segments,
            indirect=indirect,
            across=across,
        )
        used_len = self.wait(queue, head)
        got = self.read_mem(data, in_len) if in_len else b""
        return self.read_mem(status, 1)[0], got, used_len

    def read(
        self,
        offset: int,
        length: int,
        *,
        queue: int = 0,
        segments: int = 1,
        indirect: bool = False,
        across: bool = False,
    ) -> tuple[int, bytes]:
        """virtio-blk IN at byte ``offset`` (a multiple of 512); ``(status, data)``.

        Raises ``ProtocolError`` if a successful read reports a ``used.len`` other than
        data + 1.
        """
        status, data, used_len = self.blk_request(
            RequestType.IN,
            offset >> 9,
            in_len=length,
            queue=queue,
            segments=segments,
            indirect=indirect,
            across=across,
        )
        if status == Status.OK and used_len != length + 1:
            raise ProtocolError(f"IN: used.len {used_len}, expected {length + 1}")
        return status, data

    def write(
        self,
        offset: int,
        data: bytes,
        *,
        queue: int = 0,
        segments: int = 1,
        indirect: bool = False,
        across: bool = False,
    ) -> int:
        """virtio-blk OUT; returns the status (``ProtocolError`` if used.len is not 1)."""
        status, _, used_len = self.blk_request(
            RequestType.OUT,
            offset >> 9,
            out=data,
            queue=queue,
            segments=segments,
            indirect=indirect,
            across=across,
        )
        if used_len != 1:
            raise ProtocolError(f"OUT: used.len {used_len}, expected 1")
        return status

    def flush(self, *, queue: int = 0) -> int:
        status, _, _ = self.blk_request(RequestType.FLUSH, queue=queue)
        return status

    def get_id(self, length: int = 20, *, queue: int = 0) -> tuple[int, bytes]:
        """GET_ID into a ``length``-byte buffer; ``(status, bytes the device wrote)``."""
        status, data, used_len = self.blk_request(RequestType.GET_ID, in_len=length, queue=queue)
        return status, data[: max(0, used_len - 1)]

    def discard(self, ranges: list[tuple[int, int, int]], *, queue: int = 0) -> int:
        """DISCARD ``[(sector, num_sectors, flags)]``; returns the status."""
        return self._ranges(RequestType.DISCARD, ranges, queue)

    def write_zeroes(self, ranges: list[tuple[int, int, int]], *, queue: int = 0) -> int:
        """WRITE_ZEROES ``[(sector, num_sectors, flags)]`` (flag 1 = may unmap)."""
        return self._ranges(RequestType.WRITE_ZEROES, ranges, queue)

    def _ranges(self, rtype: int, ranges: list[tuple[int, int, int]], queue: int) -> int:
        out = b"".join(blk.VIRTIO_BLK_DISCARD_WRITE_ZEROES.pack(*r) for r in ranges)
        status, _, _ = self.blk_request(rtype, out=out, queue=queue)
        return status

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


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


def _split(addr: int, length: int, parts: int) -> list[Segment]:
    parts = max(1, min(parts, length))
    step = length // parts
    out = []
    for i in range(parts):
        n = step if i + 1 < parts else length - step * (parts - 1)
        out.append((addr + i * step, n))
    return out
