"""Links between the processes that serve the queues of one export (see
``VhostUserBlkServer``): every vhost-user message is forwarded to every peer, which answers
once it applied it."""

from __future__ import annotations

import errno
import json
import socket
import struct

from storvisor.errors import ProtocolError
from storvisor.protocols.vhost_user import messages as m

_PEER_RESET = 0
"""A request number no vhost-user message uses: the control's "connection ended"."""

_ANSWER = struct.Struct("<I")


def _forward(peers: list[socket.socket], msg: m.Message) -> dict[int, int]:
    """Hand ``msg`` (with its fds) to every queue process and wait until each applied it;
    returns the next avail index of every queue they stopped. Raises ``ProtocolError`` if
    one failed or its link broke (the connection must then end)."""
    data = m.encode(msg.request, msg.payload, flags=msg.flags)
    for peer in peers:
        try:
            if msg.fds:
                socket.send_fds(peer, [data], msg.fds)
            else:
                peer.sendall(data)
        except OSError as e:
            raise ProtocolError(f"queue process unreachable: {e.strerror}") from e
    bases: dict[int, int] = {}
    for peer in peers:
        try:
            size = _ANSWER.unpack(_recv_all(peer, _ANSWER.size))[0]
            answer = json.loads(_recv_all(peer, size))
        except (OSError, ValueError, struct.error) as e:
            raise ProtocolError(f"queue process did not answer: {e}") from e
        if not answer.get("ok"):
            raise ProtocolError(f"a queue process refused {msg.name}")
        bases.update({int(k): int(v) for k, v in answer.get("stopped", {}).items()})
    return bases


def _recv_all(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            raise OSError(errno.EPIPE, "link closed")
        data += more
    return bytes(data)
