"""``exports/link.py``: frames and their fds over a real Unix socket pair."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator

import pytest

from storvisor.errors import LocalFailure
from storvisor.exports.link import Link
from storvisor.protocols.frames import DIRECT_PAYLOAD, FRAME_HEADER, Frame


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def test_frames_and_fds_arrive_in_order(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    sender, receiver = Link(a, max_payload=1 << 22), Link(b, max_payload=1 << 22, max_fds=2)
    r, w = os.pipe()
    big = bytes(range(256)) * (3 * DIRECT_PAYLOAD // 256)
    try:
        thread = threading.Thread(
            target=lambda: [
                sender.send(1, 5, 6, 7, b"small", flags=3),
                sender.send(2, 8, payload=big, fds=[r, w]),
                sender.send(3, fds=[r]),
            ]
        )
        thread.start()
        first, second, third = receiver.receive(), receiver.receive(), receiver.receive()
        thread.join()
        a.close()
        assert receiver.receive() is None
        assert first == Frame(1, 3, 5, 6, 7, bytearray(b"small"))
        assert second is not None and second[:6] == (2, 0, 8, 0, 0, big)
        assert third is not None and third.op == 3 and len(third.fds) == 1
        got_r, got_w = second.fds
        os.write(got_w, b"through the passed pipe")
        assert os.read(r, 100) == b"through the passed pipe"
        for fd in (got_r, got_w, third.fds[0]):
            os.close(fd)
    finally:
        os.close(r)
        os.close(w)


def test_a_malformed_frame_is_a_local_failure_and_its_fds_are_closed(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    receiver = Link(b, max_fds=2)
    r, w = os.pipe()
    try:
        bad = FRAME_HEADER.pack(1, 0, 1, 0, 0, 0, 0, 7)  # reserved field set
        socket.send_fds(a, [bad], [r])
        with pytest.raises(LocalFailure, match="reserved"):
            receiver.receive()
        with pytest.raises(LocalFailure):
            receiver.receive()
        os.close(w)
        w = -1
        # the fd that came with the frame is closed: the pipe has no writer left
        assert os.read(r, 1) == b""
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_more_fds_than_the_link_takes_is_a_protocol_error(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    receiver = Link(b, max_fds=1)
    r, w = os.pipe()
    try:
        socket.send_fds(a, [FRAME_HEADER.pack(1, 0, 3, 0, 0, 0, 0, 0)], [r, w, r])
        with pytest.raises(LocalFailure, match="too many file descriptors"):
            receiver.receive()
    finally:
        os.close(r)
        os.close(w)


def test_closing_inside_a_frame_is_a_protocol_error(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    a.sendall(FRAME_HEADER.pack(1, 0, 0, 0, 0, 0, 100, 0) + b"only part")
    a.close()
    with pytest.raises(LocalFailure, match="inside a frame"):
        Link(b).receive()
