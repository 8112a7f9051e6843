"""The links between the control of a vhost-user-blk export and its queue processes
(``exports/vhost_user_blk/peers.py``), both ends over real socket pairs."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from storvisor.errors import LocalFailure
from storvisor.exports.link import Link
from storvisor.exports.vhost_user_blk.peers import ControlLink, Peers, Reset
from storvisor.protocols.vhost_user import messages as m


@pytest.fixture
def pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
    try:
        yield pairs
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def peer(sock: socket.socket, answer: Callable[[ControlLink, object], None]) -> threading.Thread:
    def run() -> None:
        link = ControlLink(sock)
        while (msg := link.receive()) is not None:
            answer(link, msg)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_messages_and_resets_reach_every_peer_with_their_fds(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    seen: list[list[object]] = [[], []]

    def answerer(slot: int) -> Callable[[ControlLink, object], None]:
        def answer(link: ControlLink, msg: object) -> None:
            if isinstance(msg, m.Message):
                contents = [os.pread(fd, 100, 0) for fd in msg.fds]
                for fd in msg.fds:
                    os.close(fd)
                seen[slot].append((msg.request, msg.flags, msg.payload, contents))
                link.answer(True, {slot + 1: 40 + slot} if msg.request == 24 else {})
            else:
                seen[slot].append(msg)
                link.answer(True, {})

        return answer

    threads = [peer(b, answerer(i)) for i, (_, b) in enumerate(pairs)]
    peers = Peers([a for a, _ in pairs])
    ram = os.memfd_create("guest-ram")
    try:
        os.write(ram, b"guest ram")
        msg = m.Message(int(m.Request.SET_MEM_TABLE), 1, b"table", [ram])
        assert peers.forward(msg) == {}
        stop = m.Message(24, 1, m.VHOST_VRING_STATE.pack(1, 0), [])  # GET_VRING_BASE
        assert peers.forward(stop) == {1: 40, 2: 41}
        peers.reset()
    finally:
        os.close(ram)
    for a, _ in pairs:
        a.shutdown(socket.SHUT_WR)
    for thread in threads:
        thread.join(5)
        assert not thread.is_alive()
    for slot in (0, 1):
        first, second, third = seen[slot]
        assert first == (int(m.Request.SET_MEM_TABLE), 1, b"table", [b"guest ram"])
        assert second == (24, 1, m.VHOST_VRING_STATE.pack(1, 0), [])
        assert third == Reset()


def test_a_refusing_silent_or_garbled_peer_ends_the_connection(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    (a, b), (c, d) = pairs
    msg = m.Message(int(m.Request.SET_OWNER), 1, b"", [])
    peer(b, lambda link, _: link.answer(False, {}))
    with pytest.raises(LocalFailure, match="refused SET_OWNER"):
        Peers([a]).forward(msg)
    threading.Thread(target=lambda: (ControlLink(d).receive(), d.close()), daemon=True).start()
    with pytest.raises(LocalFailure, match="did not answer"):
        Peers([c]).forward(msg)


def test_a_garbled_answer_is_a_protocol_error(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    a, b = pairs[0]

    def garble() -> None:
        ControlLink(b).receive()
        Link(b).send(3, 0, 0, 0, b"odd", 1)  # an ANSWER whose records do not divide

    threading.Thread(target=garble, daemon=True).start()
    with pytest.raises(LocalFailure, match="malformed answer"):
        Peers([a]).forward(m.Message(int(m.Request.SET_OWNER), 1, b"", []))
