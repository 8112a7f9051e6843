"""Fuzzing the NBD server codec: whatever bytes arrive, in whatever pieces, the only exception
that may escape is ``ProtocolError``."""

from __future__ import annotations

import contextlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nbd_wire import (
    GO_DISK,
    client_flags,
    command_stream,
    drive,
    info_data,
    meta_data,
    option,
    request,
)

from storvisor.errors import ProtocolError
from storvisor.protocols.nbd import ServerConnection
from storvisor.protocols.nbd import constants as C

VALID_SESSION = (
    client_flags()
    + option(C.NBD_OPT_LIST)
    + option(C.NBD_OPT_STRUCTURED_REPLY)
    + option(C.NBD_OPT_LIST_META_CONTEXT, meta_data("", ["base:"]))
    + option(C.NBD_OPT_INFO, info_data("disk", [0, 1, 2, 3]))
    + GO_DISK[4:]
    + request(C.NBD_CMD_WRITE, 0, 8, payload=b"12345678")
    + request(C.NBD_CMD_READ, 0, 8, flags=C.NBD_CMD_FLAG_DF)
    + request(C.NBD_CMD_BLOCK_STATUS, 0, 4096, flags=C.NBD_CMD_FLAG_REQ_ONE)
    + request(C.NBD_CMD_WRITE_ZEROES, 0, 4096, flags=C.NBD_CMD_FLAG_FAST_ZERO)
    + request(C.NBD_CMD_FLUSH)
    + request(C.NBD_CMD_DISC)
)
FUZZ = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)


def _feed(data: bytes, cuts: list[int]) -> None:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    with contextlib.suppress(ProtocolError):
        drive(ServerConnection(), [c for c in chunks if c], eof=True)


@FUZZ
@given(st.binary(max_size=600), st.lists(st.integers(0, 1000), max_size=8))
def test_random_bytes(data: bytes, cuts: list[int]) -> None:
    _feed(data, cuts)


@FUZZ
@given(st.binary(max_size=200), st.lists(st.integers(0, 1000), max_size=8))
def test_random_bytes_after_a_valid_handshake(tail: bytes, cuts: list[int]) -> None:
    _feed(GO_DISK + tail, cuts)


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.integers(0, len(VALID_SESSION) - 1),
            st.sampled_from(["flip", "insert", "delete"]),
            st.integers(0, 255),
        ),
        min_size=1,
        max_size=6,
    ),
    st.lists(st.integers(0, 1000), max_size=8),
)
def test_mutated_valid_session(mutations: list[tuple[int, str, int]], cuts: list[int]) -> None:
    data = bytearray(VALID_SESSION)
    for pos, how, value in mutations:
        pos %= len(data) or 1
        if how == "flip":
            data[pos] ^= value or 1
        elif how == "insert":
            data.insert(pos, value)
        elif data:
            del data[pos]
    _feed(bytes(data), cuts)


READ_SESSION = (
    GO_DISK
    + b"".join(request(C.NBD_CMD_READ, i * 4096, 4096, cookie=i) for i in range(6))
    + request(C.NBD_CMD_WRITE, 0, 8, payload=b"12345678", cookie=6)
    + b"".join(request(C.NBD_CMD_READ, i * 512, 512, cookie=i) for i in range(7, 12))
    + request(C.NBD_CMD_DISC)
)
MUTATIONS = st.lists(
    st.tuples(
        st.integers(len(GO_DISK), len(READ_SESSION) - 1),
        st.sampled_from(["flip", "insert", "delete"]),
        st.integers(0, 255),
    ),
    min_size=1,
    max_size=4,
)


@FUZZ
@given(MUTATIONS, st.lists(st.integers(0, 1000), max_size=8))
def test_next_reads_agrees_with_next_event_on_mutated_reads(
    mutations: list[tuple[int, str, int]], cuts: list[int]
) -> None:
    """Damage anywhere in a pipeline of READs: taking READs with ``next_reads`` first gives
    the same commands, errors and protocol error as ``next_event`` alone."""
    data = bytearray(READ_SESSION)
    for pos, how, value in mutations:
        pos %= len(data)
        if how == "flip":
            data[pos] ^= value or 1
        elif how == "insert":
            data.insert(pos, value)
        else:
            del data[pos]
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks = [bytes(data[a:b]) for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    chunks = [c for c in chunks if c]
    expected = command_stream(ServerConnection(), chunks, reads_first=False)
    assert command_stream(ServerConnection(), chunks, reads_first=True) == expected


def test_the_valid_session_itself_is_valid() -> None:
    events, _ = drive(ServerConnection(), [VALID_SESSION], eof=True)
    assert len(events) == 9  # LIST, INFO, GO, five commands, DISC
