"""The I/O shell of storvisor's inter-process links: frames (``protocols/frames.py``) with
their file descriptors over a Unix stream socket.

``Link.send`` may be called from any thread (a frame's buffers go out together, under a
lock); ``Link.receive`` from one thread at a time, the link's reader.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import threading
from collections.abc import Sequence

from storvisor.errors import LocalFailure, ProtocolError
from storvisor.protocols.frames import (
    DEFAULT_MAX_PAYLOAD,
    NEED_DATA,
    Buffer,
    Closed,
    Decoder,
    Encoder,
    Frame,
)

_FD_SIZE = array.array("i").itemsize
_RECEIVE = 64 << 10  # bytes asked of each recv
_MSG_CTRUNC = int(socket.MSG_CTRUNC)  # a plain int: an IntFlag operation costs microseconds


class Link:
    """Frames over ``sock`` (the link's end; closing it stays the caller's business).

    ``max_payload`` and ``max_fds`` limit what this end accepts; ``peer_max_payload``
    (default ``max_payload``) what it may send. A link that receives no fds reads with
    ``recv_into``; fds the peer sends anyway are then discarded by the kernel.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        max_fds: int = 0,
        peer_max_payload: int | None = None,
    ) -> None:
        self.sock = sock
        self._frame = Encoder(
            max_payload=max_payload if peer_max_payload is None else peer_max_payload
        ).frame
        self._decoder = Decoder(max_payload=max_payload, max_fds=max_fds)
        self._ancillary = socket.CMSG_SPACE(max_fds * _FD_SIZE) if max_fds else 0
        self._lock = threading.Lock()

    def send(
        self,
        op: int,
        ident: int = 0,
        a: int = 0,
        b: int = 0,
        payload: Buffer = b"",
        flags: int = 0,
        fds: Sequence[int] = (),
    ) -> None:
        """Send one frame; ``fds`` are duplicated into the peer (the caller keeps its own).

        Raises ``OSError`` if the socket fails (the frame may then be cut short: drop the
        link), ``ValueError`` for a field out of its range.
        """
        buffers = self._frame(op, ident, a, b, payload, flags, len(fds))
        with self._lock:
            if fds:
                first = buffers[0]
                sent = socket.send_fds(self.sock, [first], list(fds))
                if sent < len(first):
                    self.sock.sendall(memoryview(first)[sent:])
                for buf in buffers[1:]:
                    self.sock.sendall(buf)
            elif len(buffers) == 1:
                self.sock.sendall(buffers[0])
            else:
                for buf in buffers:
                    self.sock.sendall(buf)

    def receive(self) -> Frame | None:
        """The next frame (its fds are now the caller's), or ``None`` once the peer closed
        its end between frames.

        Raises ``LocalFailure`` for a malformed frame or a peer that closed inside one (fds
        received and not handed out are closed; the link is then unusable), ``OSError`` if
        the socket fails.
        """
        decoder = self._decoder
        while True:
            try:
                event = decoder.next_event()
            except ProtocolError as e:  # a link between our own processes: a local failure
                self.close_pending()
                raise LocalFailure(f"broken link: {e}") from e
            if event is not NEED_DATA:
                if type(event) is Frame:
                    return event
                assert isinstance(event, Closed)
                return None
            view = decoder.get_buffer(_RECEIVE)
            try:
                if not self._ancillary:
                    decoder.buffer_updated(self.sock.recv_into(view))
                    continue
                n, ancillary, flags, _ = self.sock.recvmsg_into([view], self._ancillary)
            finally:
                view.release()
            if ancillary or flags & _MSG_CTRUNC:
                decoder.buffer_updated(n, self._fds(ancillary, flags))
            else:
                decoder.buffer_updated(n)

    def close_pending(self) -> None:
        """Close the fds received that no frame handed out (call once the reader stops)."""
        _close_all(self._decoder.take_fds())

    @staticmethod
    def _fds(ancillary: list[tuple[int, int, bytes]], flags: int) -> array.array[int]:
        fds = array.array("i")
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % _FD_SIZE])
        if flags & _MSG_CTRUNC:
            _close_all(fds)
            raise LocalFailure("too many file descriptors with one frame")
        return fds


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
