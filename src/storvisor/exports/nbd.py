"""The NBD export: serves ``BlockDevice``s to NBD clients over Unix sockets and TCP.

Theory of operation
-------------------
``NBDServer`` owns its listening sockets and one accept thread per socket. Each accepted
connection gets a thread that runs the handshake (``storvisor.protocols.nbd`` does all the
protocol work; this module only moves bytes and answers the questions the codec asks), opens
the chosen export's device (``NBDExport.open``, once per connection) and then serves commands.

The transmission phase uses two threads per connection, so that it can keep both cores
busy (socket and file syscalls release the GIL). The receiving thread ``recv_into``s the
codec's buffer (large WRITE payloads land straight in their own buffer), executes every
complete request that arrived, in order, and queues the replies of the whole batch. Runs of
READs take a fast path: the codec hands them over as plain tuples (``next_reads``) and
packs their reply headers into one buffer with room for the data (``reply_reads``), the
device reads straight into that buffer, and the run is sent as one piece. The
sending thread (``_Sender``) writes everything queued with one ``sendmsg`` of memoryviews
while the receiving thread goes on with the next batch. Only batches carrying much READ data
(more than ``_INLINE_DATA``) are handed over: the receiving thread sends any other batch
itself with one ``sendmsg`` when nothing is queued, because for small replies the thread
hand-off (a futex wake and the GIL changing hands) costs more than the send it overlaps.
Replies leave in request order (the protocol allows any order), and the sender serialises
the socket writes. A refused request is answered with the spec's error and the connection
carries on; a protocol violation closes that connection only (after the replies to the
requests before it), and the server keeps serving the others.

TLS: an ``NBDServer`` given an ``ssl.SSLContext`` requires TLS on its TCP listeners (the
codec's FORCEDTLS mode: a client must send NBD_OPT_STARTTLS before anything else succeeds).
After the ACK the connection's thread runs the TLS handshake and from then on reads and
writes through a ``TlsStream`` (``exports/tls.py``), which lets the receiving and the
sending thread share one TLS session. TLS has no ``sendmsg``: the sender joins small reply
buffers and sends large ones one by one (``_send_tls``); plain connections keep
``sendmsg``. Unix sockets stay plain (the daemon's is mode 0600 in its HOME). A TLS
connection is never handed to a data-plane process (``handoff``): its TLS session lives in
this process's OpenSSL and cannot move with the file descriptor, so TLS connections are
served here, by the daemon. A client that fails the TLS handshake, or sends anything else
than TLS after the ACK, loses its connection only.

Multi-conn: every export is advertised with NBD_FLAG_CAN_MULTI_CONN. This is safe because the
devices that ``NBDExport.open`` returns for one export must share one volume (an engine
volume handle, or file descriptors of one file): a FLUSH on any connection makes the writes
completed on every connection durable. An ``open`` whose handles do not share their write
cache must not be exported by this server.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import socket
import ssl
import stat
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from storvisor.engine.device import BlockDevice, Buffer
from storvisor.errors import (
    Conflict,
    InvalidArgument,
    IOFailure,
    NotFound,
    ProtocolError,
    StateError,
)
from storvisor.exports.tls import TlsStream
from storvisor.protocols.nbd import (
    NEED_DATA,
    Aborted,
    Command,
    ConnectionClosed,
    Disconnect,
    ExportDetails,
    ExportListRequest,
    ExportRequest,
    ServerConnection,
    StartTLS,
    wire_error,
)
from storvisor.protocols.nbd import constants as C

log = logging.getLogger(__name__)

_IOV_MAX = 1024
_RECV_SIZE = 256 << 10
_EAGER = 4
"""READs answered per send within a batch: the client gets the first replies, and sends its
next requests, while the rest of the batch is read. With ``qemu-img bench`` at queue depth 32
(the client as busy as the server) replies in fours gave 88k requests per second against
72k for one send per batch; with fio's lighter client the rate stayed the same."""
_INLINE_DATA = 256 << 10  # replies carrying at most this much READ data are sent inline
_TLS_JOIN = 64 << 10  # TLS: smaller reply buffers are joined before sending, larger sent alone


@dataclass(frozen=True)
class NBDExport:
    """A named export. ``open`` is called once per client connection that chooses it (and
    for NBD_OPT_INFO), and the server closes what it returns when that connection ends. The
    export is read-only if ``read_only`` is set or the device says so.

    Every export is advertised with NBD_FLAG_CAN_MULTI_CONN, so the devices ``open`` returns
    must all be handles of one volume (engine volumes and ``FileDevice``s of one file are): a
    FLUSH on one connection then covers the writes completed on all of them.
    """

    name: str
    open: Callable[[], BlockDevice]
    description: str = ""
    read_only: bool = False


class NBDServer:
    """An NBD server for a set of exports; thread-safe.

    Lifecycle: add exports and listen (any order), ``start`` to serve in background
    threads, ``close`` to stop. Exports may be added and removed while serving.

    ``handoff``, if given, is offered every accepted plain connection first; when it returns
    True it has taken the socket (to serve it elsewhere, see ``exports/nbd_worker.py``).

    ``tls``, a server-side context, makes TLS required on every TCP listener (see "TLS" in
    the module docstring); Unix sockets stay plain.

    Raises:
        InvalidArgument: ``tls`` is a client-side context or allows TLS older than 1.2.
    """

    def __init__(
        self,
        handoff: Callable[[socket.socket], bool] | None = None,
        *,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        if tls is not None and tls.protocol is ssl.PROTOCOL_TLS_CLIENT:
            raise InvalidArgument("NBD over TLS needs a server-side SSL context")
        if tls is not None and tls.minimum_version < ssl.TLSVersion.TLSv1_2:
            raise InvalidArgument("NBD over TLS needs TLS 1.2 or later (set minimum_version)")
        self._handoff = handoff
        self._tls = tls
        self._lock = threading.Lock()
        self._exports: dict[str, NBDExport] = {}
        self._listeners: list[socket.socket] = []
        self._unix_paths: list[tuple[str, int, int]] = []  # path, st_dev, st_ino
        self._threads: list[threading.Thread] = []
        self._connections: set[_Connection] = set()
        self._started = False
        self._closed = False

    # -- exports ------------------------------------------------------------------------

    def add_export(self, export: NBDExport) -> None:
        """Serve ``export`` to new connections.

        Raises:
            Conflict: an export with that name exists.
        """
        with self._lock:
            if export.name in self._exports:
                raise Conflict(f"NBD export {export.name!r} already exists")
            self._exports[export.name] = export

    def remove_export(self, name: str) -> None:
        """Stop serving ``name`` and close the connections using it.

        Raises:
            NotFound: no export has that name.
        """
        with self._lock:
            if name not in self._exports:
                raise NotFound(f"no NBD export named {name!r}")
            del self._exports[name]
            victims = [c for c in self._connections if c.export_name == name]
        for connection in victims:
            connection.abort()

    def exports(self) -> list[NBDExport]:
        """The exports, in the order they were added."""
        with self._lock:
            return list(self._exports.values())

    def _lookup(self, name: str) -> NBDExport | None:
        """The export for a client's name; the empty name selects the first export."""
        with self._lock:
            if name:
                return self._exports.get(name)
            return next(iter(self._exports.values()), None)

    # -- listening ------------------------------------------------------------------------

    def listen_unix(self, path: str) -> None:
        """Listen on a Unix socket at ``path``, replacing a stale socket file.

        Raises:
            Conflict: ``path`` exists and is not a socket.
            StateError: the server is closed.
            IOFailure: the socket cannot be bound.
        """
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise Conflict(f"{path} exists and is not a socket")
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            sock.listen(128)
        except OSError as e:
            sock.close()
            raise IOFailure(f"cannot listen on {path}: {e.strerror}", e.errno or errno.EIO) from e
        st = os.stat(path)
        self._add_listener(sock, (path, st.st_dev, st.st_ino))

    def listen_tcp(self, host: str = "127.0.0.1", port: int = 10809) -> int:
        """Listen on TCP ``host:port`` (port 0 picks a free port); returns the port. With a
        TLS context, clients of this listener must start TLS.

        Raises:
            StateError: the server is closed.
            IOFailure: the address cannot be bound (in use, not local).
        """
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
        except OSError as e:
            sock.close()
            raise IOFailure(
                f"cannot listen on {host}:{port}: {e.strerror}", e.errno or errno.EIO
            ) from e
        bound: int = sock.getsockname()[1]
        self._add_listener(sock, None)
        return bound

    def _add_listener(self, sock: socket.socket, unix_path: tuple[str, int, int] | None) -> None:
        with self._lock:
            if self._closed:
                sock.close()
                raise StateError("the NBD server is closed")
            self._listeners.append(sock)
            if unix_path is not None:
                self._unix_paths.append(unix_path)
            if self._started:
                self._spawn(self._accept_loop, sock)

    def start(self) -> None:
        """Serve every listening socket (present and future) in background threads.

        Raises:
            StateError: already started or closed.
        """
        with self._lock:
            if self._started or self._closed:
                raise StateError("the NBD server is already started or closed")
            self._started = True
            for sock in self._listeners:
                self._spawn(self._accept_loop, sock)

    def close(self) -> None:
        """Stop listening, end every connection (closing its device) and wait for the
        threads. Idempotent."""
        with self._lock:
            self._closed = True
            listeners, self._listeners = self._listeners, []
            paths, self._unix_paths = self._unix_paths, []
            connections = list(self._connections)
            threads = list(self._threads)
        for sock in listeners:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for path, dev, ino in paths:
            with contextlib.suppress(OSError):
                st = os.stat(path)
                if (st.st_dev, st.st_ino) == (dev, ino):  # not replaced by another server
                    os.unlink(path)
        for connection in connections:
            connection.abort()
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(timeout=10)

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True, name="nbd")
        self._threads = [t for t in self._threads if t.is_alive()]
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self, listener: socket.socket) -> None:
        tls = self._tls is not None and listener.family != socket.AF_UNIX
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return  # shut down by close()
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # a TLS session cannot move to another process: served here (module docstring)
            if not tls and self._handoff is not None and self._handoff(sock):
                continue
            if not self.serve_socket(sock, tls=tls):
                return

    def serve_socket(self, sock: socket.socket, *, tls: bool = False) -> bool:
        """Serve a connected client socket (handshake first) in a background thread; the
        server owns it from now on. With ``tls`` the client must start TLS (with the
        server's context). False (socket closed) if the server is closed.

        Raises:
            StateError: ``tls`` is asked of a server without a TLS context.
        """
        if tls and self._tls is None:
            sock.close()
            raise StateError("this NBD server has no TLS context")
        connection = _Connection(self, sock, self._tls if tls else None)
        with self._lock:
            if self._closed:
                sock.close()
                return False
            self._connections.add(connection)
            self._spawn(connection.run)
        return True

    def _claim(self, connection: _Connection, export: NBDExport) -> bool:
        """Bind a connection to the export it negotiated; False if that export was removed
        (or the connection aborted) in the meantime."""
        with self._lock:
            if self._exports.get(export.name) is not export or connection.aborted:
                return False
            connection.export_name = export.name
            return True

    def _forget(self, connection: _Connection) -> None:
        with self._lock:
            self._connections.discard(connection)


def nbd_uri(
    export_name: str,
    *,
    unix_path: str | None = None,
    host: str | None = None,
    port: int | None = None,
    tls: bool = False,
) -> str:
    """The NBD URI of an export: ``nbd+unix:///NAME?socket=PATH`` or ``nbd://HOST:PORT/NAME``
    (``nbds`` for TLS).

    Raises:
        InvalidArgument: neither or both of ``unix_path`` and ``host`` are given.
    """
    name = urllib.parse.quote(export_name, safe="")
    if (unix_path is None) == (host is None):
        raise InvalidArgument("give either a Unix socket path or a host for the NBD URI")
    scheme = "nbds" if tls else "nbd"
    if unix_path is not None:
        return f"{scheme}+unix:///{name}?socket={urllib.parse.quote(unix_path, safe='/')}"
    assert host is not None
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    return f"{scheme}://{netloc}/{name}"


class _Stream(Protocol):
    """What a connection reads and writes: a ``socket.socket``, or a ``TlsStream``."""

    def recv_into(self, buffer: memoryview, /) -> int: ...
    def sendall(self, data: Buffer, /) -> None: ...
    def shutdown(self, how: int, /) -> None: ...
    def close(self) -> None: ...


class _Connection:
    """One client: the handshake, then the transmission loop, in the connection's thread.
    With ``tls`` the client must start TLS; ``sock`` is then replaced by a ``TlsStream``."""

    def __init__(self, server: NBDServer, sock: socket.socket, tls: ssl.SSLContext | None) -> None:
        self.server = server
        self.sock: _Stream = sock
        self._plain: socket.socket | None = sock  # None once TLS runs
        self._tls = tls
        self.export_name: str | None = None
        self.codec = ServerConnection(require_tls=tls is not None)
        self.device: BlockDevice | None = None
        self.aborted = False

    def abort(self) -> None:
        """End the connection from another thread (wakes the blocked receive)."""
        self.aborted = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def run(self) -> None:
        try:
            if self._handshake():
                self._transmission()
        except ProtocolError as e:
            log.info("NBD client dropped: %s", e)
        except OSError as e:
            if not self.aborted:
                log.info("NBD connection ended: %s", e)
        except Exception:
            log.exception("NBD connection failed")
        finally:
            if self.device is not None:
                try:
                    self.device.close()
                except Exception:
                    log.exception("closing the device of an NBD connection failed")
            self.sock.close()
            self.server._forget(self)

    def _receive(self) -> None:
        view = self.codec.get_buffer(_RECV_SIZE)
        try:
            n = self.sock.recv_into(view)
        finally:
            view.release()
        self.codec.buffer_updated(n)

    def _handshake(self) -> bool:
        """Negotiate; True when the transmission phase begins."""
        codec = self.codec
        self.sock.sendall(codec.data_to_send())
        opened: tuple[NBDExport, BlockDevice] | None = None
        try:
            while True:
                event = codec.next_event()
                if event is NEED_DATA:
                    self.sock.sendall(codec.data_to_send())
                    self._receive()
                    continue
                if isinstance(event, ExportListRequest):
                    codec.send_export_list([(e.name, e.description) for e in self.server.exports()])
                elif isinstance(event, ExportRequest):
                    opened = self._answer_export(event, opened)
                    if codec.export is not None:
                        assert opened is not None
                        export, self.device, opened = opened[0], opened[1], None
                        self.sock.sendall(codec.data_to_send())
                        # an export removed meanwhile must not go on being served
                        return self.server._claim(self, export)
                elif isinstance(event, StartTLS):
                    self.sock.sendall(codec.data_to_send())  # the ACK, in plain text
                    self._start_tls(event.received)
                elif isinstance(event, (Aborted, ConnectionClosed)):
                    self.sock.sendall(codec.data_to_send())
                    return False
                self.sock.sendall(codec.data_to_send())
        finally:
            if opened is not None:
                opened[1].close()

    def _start_tls(self, received: bytes) -> None:
        """Run the TLS handshake and go on over TLS (raises ``ProtocolError`` if it fails)."""
        assert self._tls is not None and self._plain is not None
        stream = TlsStream(self._plain, self._tls, received)
        self.sock = stream  # from here ``abort`` and ``close`` go through the stream
        self._plain = None
        stream.handshake()
        self.codec.tls_started()
        log.debug("NBD client started %s", stream.version)

    def _answer_export(
        self, request: ExportRequest, opened: tuple[NBDExport, BlockDevice] | None
    ) -> tuple[NBDExport, BlockDevice] | None:
        """Answer INFO/GO/EXPORT_NAME, keeping the opened device for a following GO."""
        codec = self.codec
        export = self.server._lookup(request.name)
        if export is None:
            codec.send_export_error(C.NBD_REP_ERR_UNKNOWN, f"no export named {request.name!r}")
            return opened
        if opened is not None and opened[0] is not export:
            opened[1].close()
            opened = None
        if opened is None:
            try:
                opened = (export, export.open())
            except Exception as e:
                log.warning("cannot open NBD export %r: %s", export.name, e)
                codec.send_export_error(C.NBD_REP_ERR_UNKNOWN, f"cannot open export: {e}")
                return None
        device = opened[1]
        details = ExportDetails(
            name=export.name,
            size=device.size,
            read_only=export.read_only or device.read_only,
            description=export.description,
            preferred_block_size=max(4096, device.block_size),
        )
        codec.send_export(details)
        return opened

    def _transmission(self) -> None:
        codec = self.codec
        next_event = codec.next_event
        next_reads = codec.next_reads
        if self._plain is not None:
            send = functools.partial(_send_all, self._plain)
        else:
            send = functools.partial(_send_tls, self.sock)
        sender = _Sender(send)
        try:
            while True:
                replies: list[Buffer] = []
                data = 0  # READ payload bytes in this batch's replies
                while True:
                    reads = next_reads()
                    if reads:
                        for i in range(0, len(reads), _EAGER):
                            data += self._reads(reads[i : i + _EAGER], replies)
                            if i + _EAGER < len(reads):
                                sender.send(replies, inline=data <= _INLINE_DATA)
                                replies = []
                                data = 0
                    try:
                        event = next_event()
                    except ProtocolError:
                        sender.send(replies)  # answer what came before the bad request
                        raise
                    if type(event) is Command:
                        if event.type == C.NBD_CMD_READ and not event.error:
                            data += event.length
                            replies += self._read(event, memoryview(bytearray(event.length)))
                        else:
                            replies += self._execute(event)
                    elif event is NEED_DATA:
                        break
                    else:  # Disconnect, ConnectionClosed
                        assert isinstance(event, (Disconnect, ConnectionClosed))
                        sender.send(replies)
                        return
                sender.send(replies, inline=data <= _INLINE_DATA)
                self._receive()
        finally:
            sender.close()

    def _reads(self, reads: list[tuple[int, int, int]], replies: list[Buffer]) -> int:
        """Execute the READs ``reads`` (from ``next_reads``) into one reply buffer and add
        its pieces to ``replies``; returns the bytes of data read."""
        buf, starts = self.codec.reply_reads(reads)
        view = memoryview(buf)
        assert self.device is not None
        read_into = self.device.read_into
        piece = 0  # start of the part of buf not yet in replies
        end = 0  # end of the previous reply
        total = 0
        for (cookie, offset, length), pos in zip(reads, starts, strict=True):
            stop = pos + length
            try:
                read_into(offset, view[pos:stop])
            except IOFailure as e:
                # answer this one with an error and leave its part of buf out
                if end > piece:
                    replies.append(view[piece:end])
                command = Command(C.NBD_CMD_READ, 0, cookie, offset, length)
                replies += self.codec.reply_error(command, wire_error(e.errno))
                piece = stop
            end = stop
            total += length
        if end > piece:
            replies.append(view[piece:end])
        return total

    def _read(self, command: Command, buf: memoryview) -> list[Buffer]:
        assert self.device is not None
        try:
            self.device.read_into(command.offset, buf)
        except IOFailure as e:
            return self.codec.reply_error(command, wire_error(e.errno))
        return self.codec.reply_read(command, buf)

    def _execute(self, command: Command) -> list[Buffer]:
        codec = self.codec
        if command.error:
            return codec.reply_error(command, command.error)
        device = self.device
        assert device is not None
        kind = command.type
        fua = bool(command.flags & C.NBD_CMD_FLAG_FUA)
        try:
            if kind == C.NBD_CMD_WRITE:
                assert command.payload is not None
                device.write(command.offset, command.payload, fua=fua)
                codec.release_payload(command.payload)  # written: devices keep no reference
            elif kind == C.NBD_CMD_FLUSH:
                device.flush()
            elif kind == C.NBD_CMD_TRIM:
                device.discard(command.offset, command.length)
                if fua:
                    device.flush()
            elif kind == C.NBD_CMD_WRITE_ZEROES:
                may_unmap = not command.flags & C.NBD_CMD_FLAG_NO_HOLE
                device.write_zeroes(command.offset, command.length, may_unmap=may_unmap, fua=fua)
            elif kind == C.NBD_CMD_BLOCK_STATUS:
                extents = device.block_status(command.offset, command.length)
                return codec.reply_block_status(
                    command,
                    (
                        (
                            e.length,
                            (0 if e.allocated else C.NBD_STATE_HOLE)
                            | (C.NBD_STATE_ZERO if e.zero else 0),
                        )
                        for e in extents
                    ),
                )
            # NBD_CMD_CACHE: the device has no prefetch hint; success is a valid answer
        except IOFailure as e:
            return codec.reply_error(command, wire_error(e.errno))
        except Exception:
            log.exception("NBD command %r failed", command)
            return codec.reply_error(command, C.NBD_EIO)
        return codec.reply_ok(command)


class _Sender:
    """A connection's reply writer thread: the receiving thread queues the replies of each
    batch of requests, and this thread sends everything queued with one ``sendmsg``, so
    sending overlaps with receiving and executing the next batch (both release the GIL).
    Small replies while nothing is queued or being sent are sent by the caller itself: a
    thread hand-off would cost more than it overlaps. The queue is bounded: a client
    that stops reading stalls the receiving thread."""

    LIMIT = 64 << 20

    def __init__(self, send: Callable[[list[Buffer]], None]) -> None:
        self._send = send  # sends every buffer of a list, in order
        self._cond = threading.Condition()
        self._pending: list[Buffer] = []
        self._pending_bytes = 0
        self._closing = False
        self._busy = False  # the thread is sending (set only by the thread)
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="nbd-send")
        self._thread.start()

    def send(self, buffers: list[Buffer], *, inline: bool = False) -> None:
        """Queue ``buffers`` (kept alive until sent), or send them now if ``inline`` and
        the sender is idle. Raises the ``OSError`` that stopped the sender, if any."""
        if not buffers:
            return
        if inline and not (self._busy or self._pending):
            # Only the caller queues work, so with nothing queued and nothing being sent
            # the thread stays idle until the next ``send``: no lock is needed to send now.
            self._send(buffers)
            return
        size = sum(len(b) for b in buffers)
        with self._cond:
            while self._pending_bytes > self.LIMIT and self._error is None:
                self._cond.wait()
            if self._error is not None:
                raise self._error
            self._pending += buffers
            self._pending_bytes += size
            self._cond.notify_all()

    def close(self) -> None:
        """Send what is queued, then stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()

    def _run(self) -> None:
        cond = self._cond
        while True:
            with cond:
                while not self._pending and not self._closing:
                    cond.wait()
                if not self._pending:
                    return
                # busy before the queue empties: ``send`` looks at both without the lock
                self._busy = True
                batch, self._pending = self._pending, []
                self._pending_bytes = 0
                cond.notify_all()
            try:
                self._send(batch)
            except OSError as e:
                with cond:
                    self._error = e  # stays busy: every later ``send`` raises this
                    self._pending = []
                    cond.notify_all()
                return
            with cond:
                self._busy = False
                cond.notify_all()


def _send_all(sock: socket.socket, buffers: list[Buffer]) -> None:
    """``sendmsg`` every buffer, in batches of at most IOV_MAX, retrying partial sends."""
    while buffers:
        batch = buffers[:_IOV_MAX]
        sent = sock.sendmsg(batch)
        if sent == sum(len(b) for b in batch):
            buffers = buffers[len(batch) :]
            continue
        rest: list[Buffer] = []
        for i, b in enumerate(buffers):
            n = len(b)
            if sent >= n:
                sent -= n
                continue
            rest = [memoryview(b)[sent:], *buffers[i + 1 :]]
            break
        buffers = rest


def _send_tls(stream: _Stream, buffers: list[Buffer]) -> None:
    """Send every buffer over TLS, which has no ``sendmsg``: runs of small buffers are joined
    (each send is at least one TLS record), large ones are sent as they are."""
    small: list[Buffer] = []
    size = 0
    for b in buffers:
        n = len(b)
        if n < _TLS_JOIN:
            small.append(b)
            size += n
            if size < _TLS_JOIN:
                continue
        if small:
            stream.sendall(b"".join(small))
            small = []
            size = 0
        if n >= _TLS_JOIN:
            stream.sendall(b)
    if small:
        stream.sendall(b"".join(small))
