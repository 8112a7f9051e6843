"""Links between the processes that serve the queues of one export (see
``VhostUserBlkServer``).

The control (slot 0, which talks vhost-user with the front-end) hands every message it
receives to every queue process and waits until each has applied it, then applies it
itself. The links carry frames of ``protocols/frames.py``:

* ``MESSAGE``, control to peer: ``a`` = the vhost-user request, ``b`` = its flags, the
  payload and fds of the message;
* ``RESET``, control to peer: the front-end's connection ended (start afresh);
* ``ANSWER``, peer to control, one per ``MESSAGE`` or ``RESET``: flag ``OK`` when it was
  applied; the payload lists the queues the peer stopped meanwhile, as ``(queue, next avail
  index)`` records of two u32.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

from storvisor.errors import LocalFailure
from storvisor.exports.link import Link
from storvisor.protocols.vhost_user import messages as m


class _Op(IntEnum):
    MESSAGE = 1
    RESET = 2
    ANSWER = 3


_OK = 1
_STOPPED = struct.Struct("<II")
_MAX_ANSWER = 64 * 1024  # room for far more queues than an export has


@dataclass(frozen=True)
class Reset:
    """The control's front-end connection ended."""


class Peers:
    """The control's links to the queue processes, over ``socks`` (still the caller's)."""

    def __init__(self, socks: Sequence[socket.socket]) -> None:
        self._links = [
            Link(sock, max_payload=_MAX_ANSWER, peer_max_payload=m.MAX_PAYLOAD) for sock in socks
        ]

    def forward(self, msg: m.Message) -> dict[int, int]:
        """Hand ``msg`` (with its fds) to every queue process and wait until each applied it;
        returns the next avail index of every queue they stopped. Raises ``LocalFailure`` if
        one failed or its link broke (the connection must then end)."""
        return self._each(_Op.MESSAGE, msg.request, msg.flags, msg.payload, msg.fds, msg.name)

    def reset(self) -> None:
        """Tell every queue process the connection ended. Raises like ``forward``."""
        self._each(_Op.RESET, 0, 0, b"", (), "the reset")

    def _each(
        self, op: _Op, a: int, b: int, payload: bytes, fds: Sequence[int], what: str
    ) -> dict[int, int]:
        for link in self._links:
            try:
                link.send(op, 0, a, b, payload, fds=fds)
            except OSError as e:
                raise LocalFailure(f"queue process unreachable: {e.strerror}") from e
        bases: dict[int, int] = {}
        for link in self._links:
            try:
                frame = link.receive()
            except OSError as e:
                raise LocalFailure(f"queue process did not answer: {e.strerror}") from e
            if frame is None:
                raise LocalFailure("queue process did not answer: link closed")
            if frame.op != _Op.ANSWER or len(frame.payload) % _STOPPED.size:
                raise LocalFailure(f"queue process sent a malformed answer (op {frame.op})")
            if not frame.flags & _OK:
                raise LocalFailure(f"a queue process refused {what}")
            bases.update(_STOPPED.iter_unpack(frame.payload))
        return bases


class ControlLink:
    """A queue process's link to its control, over ``sock`` (still the caller's)."""

    def __init__(self, sock: socket.socket) -> None:
        self._link = Link(
            sock, max_payload=m.MAX_PAYLOAD, max_fds=m.MAX_FDS, peer_max_payload=_MAX_ANSWER
        )

    def receive(self) -> m.Message | Reset | None:
        """The next message (its fds are the caller's), ``Reset``, or ``None`` once the
        control closed the link. Raises ``LocalFailure`` for a malformed frame, ``OSError``
        if the link fails."""
        frame = self._link.receive()
        if frame is None:
            return None
        if frame.op == _Op.MESSAGE:
            return m.Message(frame.a, frame.b, bytes(frame.payload), list(frame.fds))
        for fd in frame.fds:
            os.close(fd)
        if frame.op == _Op.RESET:
            return Reset()
        raise LocalFailure(f"unknown queue-process operation {frame.op}")

    def answer(self, ok: bool, stopped: dict[int, int]) -> None:
        """Answer the last message or reset. Raises ``OSError`` if the link fails."""
        payload = b"".join(_STOPPED.pack(index, base) for index, base in stopped.items())
        self._link.send(_Op.ANSWER, 0, 0, 0, payload, _OK if ok else 0)
