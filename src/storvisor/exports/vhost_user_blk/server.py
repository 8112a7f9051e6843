"""The vhost-user-blk server: the Unix socket, the control thread reading vhost-user
messages, and the connection life cycle (see the package docstring)."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import select
import socket
import stat
import threading
from collections.abc import Sequence

from storvisor.engine.device import BlockDevice
from storvisor.errors import ProtocolError, StateError, StorvisorError
from storvisor.exports.vhost_user_blk.device import _Device
from storvisor.exports.vhost_user_blk.peers import ControlLink, Peers, Reset
from storvisor.exports.vhost_user_blk.queues import _IOPool
from storvisor.protocols.vhost_user import messages as m
from storvisor.protocols.vhost_user.backend import VhostUserBackend

log = logging.getLogger(__name__)


MAX_QUEUES = 64


class VhostUserBlkServer:
    """Serve ``device`` as a vhost-user-blk device on the Unix socket ``socket_path``.

    ``num_queues`` virtqueues (1..64) are offered; ``read_only`` offers VIRTIO_BLK_F_RO and
    fails writes; ``serial`` is what GET_ID returns (at most 20 bytes are used).
    Queue processes: with ``peers`` (links to ``VhostUserBlkServer.serve_peer`` in other
    processes serving the same device), queue ``i`` runs in process ``i % (len(peers) + 1)``
    and this one in slot 0: every vhost-user message is first handed to every peer (which
    runs the same state machine, so its memory map, rings and fds match) and applied there,
    then here; a peer's queue stop reports its next avail index back. Several queues of one
    export thus run on several cores.

    The device is used, never closed, by the server. With ``listener`` (a bound, listening
    Unix socket, e.g. inherited from the process that owns the path) the server accepts on
    it instead of binding ``socket_path``, and leaves the path alone on ``close``.
    """

    def __init__(
        self,
        device: BlockDevice,
        socket_path: str,
        *,
        num_queues: int = 1,
        read_only: bool = False,
        serial: str = "",
        listener: socket.socket | None = None,
        peers: Sequence[socket.socket] = (),
        slot: int = 0,
        slots: int = 1,
    ) -> None:
        if not 1 <= num_queues <= MAX_QUEUES:
            raise ValueError(f"num_queues must be 1..{MAX_QUEUES}, not {num_queues}")
        if peers:
            slots = len(peers) + 1
        if not 0 <= slot < slots:
            raise ValueError(f"slot {slot} of {slots}")
        self.peers = list(peers)
        self._peers = Peers(self.peers)
        self.slot, self.slots = slot, slots
        self.device = device
        self.socket_path = socket_path
        self.num_queues = num_queues
        self.read_only = read_only or device.read_only
        self.serial = serial
        self._listener: socket.socket | None = None
        self._given_listener = listener
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._lock = threading.Lock()
        self._conn: socket.socket | None = None
        self._device: _Device | None = None
        self.connections = 0
        """Front-end connections served so far (for tests and metrics)."""
        self._pool: _IOPool | None = None
        self._pool_lock = threading.Lock()

    def start(self) -> None:
        """Bind the socket (replacing a stale one) and serve in a background thread.

        Raises ``OSError`` if the socket cannot be bound, ``StateError`` if already started or
        closed.
        """
        if self._listener is not None or self._wake_r < 0:
            raise StateError(f"vhost-user-blk server on {self.socket_path} already started")
        if platform.machine() not in ("x86_64", "AMD64", "i686", "i386"):
            # the rings rely on x86's ordering of plain loads and stores (see ring.py)
            log.warning(
                "vhost-user-blk rings are only safe on x86 hosts, not %s", platform.machine()
            )
        self._listener = self._given_listener or listen_unix(self.socket_path)
        self._thread = threading.Thread(
            target=self._serve, name=f"vhost-blk {self.socket_path}", daemon=True
        )
        self._thread.start()

    def notify_config_change(self) -> None:
        """Tell the connected front-end that the config (capacity) changed.

        Needs the BACKEND_REQ channel; without a front-end or a channel this does nothing
        (the next GET_CONFIG reports the new capacity anyway).
        """
        with self._lock:
            device = self._device
        if device is not None:
            device.send_config_change()

    def close(self) -> None:
        """Stop serving: disconnect the front-end, stop the queues, remove the socket.

        The block device is left open. Idempotent.
        """
        self._stop.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        with self._lock:
            conn = self._conn
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            if self._given_listener is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.socket_path)
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown()

    def io_pool(self) -> _IOPool | None:
        """The shared pool large requests run on (``None`` on a one-CPU machine)."""
        with self._pool_lock:
            if self._pool is None and (os.cpu_count() or 1) > 1:
                self._pool = _IOPool(os.cpu_count() or 1)
            return self._pool

    @property
    def connected(self) -> bool:
        """Whether a front-end is connected right now."""
        with self._lock:
            return self._device is not None

    @property
    def broken_queues(self) -> frozenset[int]:
        """Queues of the current front-end stopped by a bad descriptor chain."""
        with self._lock:
            device = self._device
        return frozenset(device.broken) if device is not None else frozenset()

    # -- serving ---------------------------------------------------------------------------

    def _serve(self) -> None:
        assert self._listener is not None
        poller = select.poll()
        poller.register(self._listener, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._stop.is_set():
            poller.poll()
            if self._stop.is_set():
                return
            try:
                conn, _ = self._listener.accept()
            except OSError:
                continue
            self._handle_connection(conn)

    def _handle_connection(self, conn: socket.socket) -> None:
        device = _Device(self)
        backend = VhostUserBackend(device)
        with self._lock:
            self._conn, self._device = conn, device
        self.connections += 1
        try:
            while not self._stop.is_set():
                msg = _receive(conn)
                if msg is None:
                    break
                try:
                    if self.peers:
                        device.remote_bases.update(self._peers.forward(msg))
                    reply = backend.handle(msg)
                finally:
                    for fd in msg.fds:
                        os.close(fd)
                if reply is not None:
                    try:
                        if reply.fds:
                            socket.send_fds(conn, [reply.data], list(reply.fds))
                        else:
                            conn.sendall(reply.data)
                    finally:
                        for fd in reply.fds:
                            os.close(fd)
        except ProtocolError as e:
            log.warning("vhost-user front-end dropped: %s", e)
        except OSError as e:
            if not self._stop.is_set():
                log.warning("vhost-user connection failed: %s", e)
        except StorvisorError as e:
            log.error("vhost-user connection failed: %s", e)
        finally:
            with self._lock:
                self._conn, self._device = None, None
            try:
                device.reset()
                if self.peers:
                    try:
                        self._peers.reset()
                    except (OSError, StorvisorError) as e:
                        log.error("vhost-user-blk queue processes did not reset: %s", e)
            finally:
                conn.close()

    def serve_peer(self, link: socket.socket) -> None:
        """Run as a queue process (slot ``slot`` of ``slots``) of the server at the other end
        of ``link``: apply every message it forwards, run this slot's queues, until the link
        closes. Raises nothing for a broken link (it just returns)."""
        control = ControlLink(link)
        device = _Device(self)
        backend = VhostUserBackend(device)
        with self._lock:
            self._device = device
        try:
            while True:
                try:
                    msg = control.receive()
                except (OSError, StorvisorError):
                    return
                if msg is None:
                    return
                ok = True
                device.stopped.clear()
                try:
                    if isinstance(msg, Reset):
                        device.reset()
                        device = _Device(self)
                        backend = VhostUserBackend(device)
                        with self._lock:
                            self._device = device
                    else:
                        reply = backend.handle(msg)
                        if reply is not None:
                            for fd in reply.fds:
                                os.close(fd)
                except (ProtocolError, StorvisorError) as e:
                    log.warning("vhost-user-blk queue process: %s", e)
                    ok = False
                finally:
                    if not isinstance(msg, Reset):
                        for fd in msg.fds:
                            os.close(fd)
                try:
                    control.answer(ok, device.stopped)
                except OSError:
                    return
        finally:
            with self._lock:
                self._device = None
            device.reset()


def listen_unix(path: str) -> socket.socket:
    """A listening Unix socket bound at ``path`` (a stale socket file there is replaced).
    Raises ``OSError`` if it cannot be bound."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind(path)
        listener.listen(4)
    except OSError:
        listener.close()
        raise
    return listener


def _receive(conn: socket.socket) -> m.Message | None:
    """Read one message with its fds; ``None`` on a clean EOF between messages."""
    data, fds, flags, _ = socket.recv_fds(conn, m.HEADER.size, m.MAX_FDS)
    try:
        if flags & socket.MSG_CTRUNC:
            raise ProtocolError("too many file descriptors with one message")
        if not data:
            if fds:
                raise ProtocolError("file descriptors without a message")
            return None
        header = bytearray(data)
        while len(header) < m.HEADER.size:
            more = conn.recv(m.HEADER.size - len(header))
            if not more:
                raise ProtocolError("connection closed inside a header")
            header += more
        request, msg_flags, size = m.decode_header(header)
        payload = bytearray()
        while len(payload) < size:
            more = conn.recv(size - len(payload), socket.MSG_WAITALL)
            if not more:
                raise ProtocolError("connection closed inside a payload")
            payload += more
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return m.Message(request, msg_flags, bytes(payload), list(fds))
