"""Frames of storvisor's inter-process links, sans I/O.

Theory of operation
-------------------
Three links join storvisor's processes: the data-plane channel between a pool's owner and a
data plane (``exports/dataplane.py``), the control link between the daemon and an NBD worker
(``exports/nbd_worker.py``), and the links between the processes that serve the queues of
one vhost-user-blk export (``exports/vhost_user_blk/peers.py``). All three carry frames of
one shape, a fixed header and a payload::

    header, 32 bytes, little-endian (FRAME_HEADER, "<BBHIQQII"):
        op      u8   what the frame asks or answers; each link names its own operations
        flags   u8   modifiers of op
        fds     u16  file descriptors sent with the frame (SCM_RIGHTS on its first byte)
        ident   u32  pairs a reply with its request (0 when nothing answers)
        a, b    u64  two integer arguments (an offset and a length, an errno, ...)
        length  u32  bytes of payload that follow
        0       u32  reserved, must be zero
    payload, length bytes

The codec knows nothing of what an operation means: a link's shell maps frames to its own
calls. ``Encoder.frame`` turns a frame into buffers to send (the header and a large payload
stay apart, so a payload is never copied to be sent). A ``Decoder`` is fed what the socket
delivered, bytes and the file descriptors that came with them (``receive_data``, or
zero-copy through ``get_buffer`` + ``buffer_updated`` and ``recv_into``/``recvmsg_into``), and
``next_event`` returns a ``Frame``, ``Closed`` once the peer closed its end between frames,
or ``NEED_DATA``. A large payload is received straight into its own buffer, which the
``Frame`` then carries. File descriptors are handed out with the frame that announces them,
in the order they arrived; their ownership passes to the caller with the ``Frame``, and
``take_fds`` returns the ones no frame claimed (the caller closes them).

Bad input (a reserved field that is not zero, a payload or fd count above the decoder's
limits, a frame announcing fds that did not come with it, fds without a frame, a peer that
closes inside a frame) raises ``ProtocolError`` and nothing else; the link is then unusable
(every later ``next_event`` raises it again) and must be closed.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

from storvisor.errors import ProtocolError
from storvisor.protocols.feed import feed, make_room

Buffer = bytes | bytearray | memoryview

FRAME_HEADER = struct.Struct("<BBHIQQII")
"""op, flags, fds, ident, a, b, payload length, reserved (see the module docstring)."""

MAX_FDS = 253
"""``SCM_MAX_FD``: the most fds one ``sendmsg`` may carry on Linux."""

DEFAULT_MAX_PAYLOAD = 1 << 20
"""A decoder's payload limit unless the link chooses another."""

DIRECT_PAYLOAD = 64 << 10
"""Payloads at least this long are received into their own buffer (and sent apart from the
header) instead of going through the decoder's receive buffer."""

_INITIAL_BUFFER = 128 << 10
_unpack_header = FRAME_HEADER.unpack_from
_SIZE = FRAME_HEADER.size


class Sentinel(Enum):
    """What ``Decoder.next_event`` returns when no frame is ready."""

    NEED_DATA = "NEED_DATA"
    """Feed more bytes (``receive_data`` or ``get_buffer``/``buffer_updated``) first."""


NEED_DATA = Sentinel.NEED_DATA


class Frame(NamedTuple):
    """One frame. ``payload`` is the frame's own (a receiver may keep or change it); ``fds``
    now belong to whoever took the frame. (A named tuple rather than a frozen dataclass:
    it is built once per frame on the data-plane hot path, and builds several times faster.)
    """

    op: int
    flags: int
    ident: int
    a: int
    b: int
    payload: bytearray
    fds: tuple[int, ...] = ()


_FrameFields = tuple[int, int, int, int, int, bytearray, tuple[int, ...]]
_new_frame: Callable[[type[Frame], _FrameFields], Frame] = tuple.__new__
"""``_new_frame(Frame, fields)`` is ``Frame(*fields)`` without the named tuple's Python-level
``__new__`` (the decoder's hot path)."""


@dataclass(frozen=True, slots=True)
class Closed:
    """The peer closed its end between two frames (and sent no fds without a frame)."""


class Encoder:
    """Builds frames to send. ``max_payload`` is the peer's limit; a larger payload, or a
    field out of its range, is a bug of the caller and raises ``ValueError``."""

    def __init__(self, *, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self.max_payload = max_payload

    def frame(
        self,
        op: int,
        ident: int = 0,
        a: int = 0,
        b: int = 0,
        payload: Buffer = b"",
        flags: int = 0,
        fds: int = 0,
    ) -> list[Buffer]:
        """The buffers of one frame, to be sent in order; the fds (``fds`` of them) go with
        the first buffer. A payload shorter than ``DIRECT_PAYLOAD`` is copied behind the
        header (one buffer); a longer one is returned as given, after the header."""
        length = len(payload)
        if length > self.max_payload or fds > MAX_FDS:
            if fds > MAX_FDS:
                raise ValueError(f"frame with {fds} fds (at most {MAX_FDS})")
            raise ValueError(f"frame payload of {length} bytes (at most {self.max_payload})")
        try:
            header = FRAME_HEADER.pack(op, flags, fds, ident, a, b, length, 0)
        except struct.error as e:
            raise ValueError(f"frame field out of range: {e}") from e
        if not length:
            return [header]
        if length < DIRECT_PAYLOAD:
            return [header + payload]
        return [header, payload]


class Decoder:
    """Parses the frames of one direction of a link (see the module docstring).

    A frame with a payload longer than ``max_payload`` or more than ``max_fds`` fds is a
    protocol error.
    """

    def __init__(self, *, max_payload: int = DEFAULT_MAX_PAYLOAD, max_fds: int = 0) -> None:
        if max_fds > MAX_FDS:
            raise ValueError(f"max_fds {max_fds} is above {MAX_FDS}")
        self.max_payload = max_payload
        self.max_fds = max_fds
        self._buf = bytearray(_INITIAL_BUFFER)
        self._start = 0
        self._end = 0
        self._want = _SIZE  # bytes the frame at _start needs in all
        self._fds: deque[int] = deque()
        self._payload: bytearray | None = None  # a direct payload being received
        self._ready: bytearray | None = None  # ... and complete (its frame comes next)
        self._filled = 0
        self._header: tuple[int, int, int, int, int, int] = (0, 0, 0, 0, 0, 0)
        self._eof = False
        self._error: ProtocolError | None = None

    # -- input ---------------------------------------------------------------------------

    def receive_data(self, data: Buffer, fds: Iterable[int] = ()) -> None:
        """Feed received bytes and the fds that came with them; ``b""`` means the peer closed
        its end. The decoder owns the fds until a frame hands them out (or ``take_fds``)."""
        self._fds.extend(fds)
        if not data:
            self._eof = True
            return
        feed(data, self.get_buffer, self.buffer_updated)

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """A writable view of free receive space, for ``recv_into``; report what was written
        with ``buffer_updated`` before calling any other method.

        The view holds at least ``sizehint`` bytes and the rest of the frame being assembled,
        except while a direct payload is received: then it is the rest of that payload's
        own buffer (so the data lands where the ``Frame`` will carry it)."""
        if self._payload is not None:
            return memoryview(self._payload)[self._filled :]
        buf, end = self._buf, self._end
        free = len(buf) - end
        if free >= sizehint and free >= self._want - end + self._start and free:
            return memoryview(buf)[end:]
        used = self._end - self._start
        need = max(sizehint, self._want - used, 1)
        if len(self._buf) - self._end < need:  # the usual case needs no call
            self._buf, self._start, self._end = make_room(self._buf, self._start, self._end, need)
        return memoryview(self._buf)[self._end :]

    def buffer_updated(self, nbytes: int, fds: Iterable[int] = ()) -> None:
        """``nbytes`` were written at the start of the last ``get_buffer`` view (0 is EOF),
        with these fds."""
        if fds:
            self._fds.extend(fds)
        if nbytes == 0:
            self._eof = True
        elif self._payload is not None:
            self._filled += nbytes
            if self._filled == len(self._payload):
                self._ready, self._payload = self._payload, None
        else:
            self._end += nbytes

    def take_fds(self) -> list[int]:
        """The fds received that no frame has handed out yet (now the caller's to close)."""
        fds = list(self._fds)
        self._fds.clear()
        return fds

    # -- events --------------------------------------------------------------------------

    def next_event(self) -> Frame | Closed | Sentinel:
        """The next frame, ``Closed``, or ``NEED_DATA``.

        Raises:
            ProtocolError: the peer broke the framing; close the link. Raised again on every
                later call.
        """
        if self._payload is None and self._ready is None and self._error is None:  # common
            start, end = self._start, self._end
            if end - start < _SIZE:
                if not self._eof:
                    return NEED_DATA
            else:
                buf = self._buf
                op, flags, nfds, ident, a, b, length, reserved = _unpack_header(buf, start)
                stop = start + _SIZE + length
                if stop <= end and not (reserved or nfds) and length <= self.max_payload:
                    if stop == end:
                        self._start = self._end = 0
                    else:
                        self._start = stop
                    self._want = _SIZE
                    return _new_frame(
                        Frame, (op, flags, ident, a, b, buf[start + _SIZE : stop], ())
                    )
        if self._error is not None:
            raise self._error
        try:
            return self._next_event()
        except ProtocolError as e:
            self._error = e
            raise

    def _next_event(self) -> Frame | Closed | Sentinel:
        payload = self._ready
        if payload is not None:
            self._ready = None
            op, flags, nfds, ident, a, b = self._header
            return Frame(op, flags, ident, a, b, payload, self._claim(nfds))
        if self._payload is not None:
            if self._eof:
                raise ProtocolError("link closed inside a frame's payload")
            return NEED_DATA
        start = self._start
        have = self._end - start
        if have < _SIZE:
            self._want = _SIZE
            return self._starved(have)
        op, flags, nfds, ident, a, b, length, reserved = FRAME_HEADER.unpack_from(self._buf, start)
        if reserved:
            raise ProtocolError(f"frame header with reserved field {reserved:#x}")
        if length > self.max_payload:
            raise ProtocolError(f"frame payload of {length} bytes (at most {self.max_payload})")
        if nfds > self.max_fds:
            raise ProtocolError(f"frame with {nfds} fds (at most {self.max_fds})")
        if nfds > len(self._fds):
            raise ProtocolError(f"frame announces {nfds} fds, {len(self._fds)} came with it")
        end = start + _SIZE + length
        if end <= self._end:
            self._start = end
            self._want = _SIZE
            data = self._buf[start + _SIZE : end]
            return Frame(op, flags, ident, a, b, data, self._claim(nfds))
        if length < DIRECT_PAYLOAD or self._eof:
            self._want = _SIZE + length
            return self._starved(have)
        # receive the rest of the payload straight into its own buffer
        body = have - _SIZE
        payload = bytearray(length)
        payload[:body] = memoryview(self._buf)[start + _SIZE : self._end]
        self._start = self._end = 0
        self._want = _SIZE
        self._payload = payload
        self._filled = body
        self._header = (op, flags, nfds, ident, a, b)
        return NEED_DATA

    def _claim(self, nfds: int) -> tuple[int, ...]:
        if not nfds:
            return ()
        fds = self._fds
        return tuple(fds.popleft() for _ in range(nfds))

    def _starved(self, have: int) -> Closed | Sentinel:
        if not self._eof:
            return NEED_DATA
        if have:
            raise ProtocolError("link closed inside a frame")
        if self._fds:
            raise ProtocolError(f"{len(self._fds)} fds came without a frame")
        return Closed()
