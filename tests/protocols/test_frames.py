"""The inter-process framing codec (``protocols/frames.py``): frames round-trip fed whole,
byte by byte and in random pieces, fds go with the frame that announces them, malformed
input raises ``ProtocolError`` (and nothing else, whatever the bytes)."""

from __future__ import annotations

import contextlib
import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storvisor.errors import ProtocolError
from storvisor.protocols.frames import (
    DIRECT_PAYLOAD,
    FRAME_HEADER,
    MAX_FDS,
    NEED_DATA,
    Closed,
    Decoder,
    Encoder,
    Frame,
)


def wire(frame: Frame) -> bytes:
    return b"".join(
        bytes(b)
        for b in Encoder(max_payload=1 << 24).frame(
            frame.op,
            frame.ident,
            frame.a,
            frame.b,
            frame.payload,
            frame.flags,
            len(frame.fds),
        )
    )


def drain(decoder: Decoder) -> list[Frame | Closed]:
    out: list[Frame | Closed] = []
    while True:
        event = decoder.next_event()
        if event is NEED_DATA:
            return out
        assert isinstance(event, Frame | Closed)
        out.append(event)
        if isinstance(event, Closed):
            return out


def feed(data: bytes, cuts: list[int], fds: dict[int, list[int]], **limits: int) -> list[object]:
    """Feed ``data`` cut at ``cuts`` (fds given with the piece starting at their offset),
    then EOF; every event in order. fds placed past the end of ``data`` are not sent."""
    decoder = Decoder(**limits)
    events: list[object] = []
    for piece, piece_fds in pieces(data, cuts, fds):
        decoder.receive_data(piece, piece_fds)
        events += drain(decoder)
    decoder.receive_data(b"")
    events += drain(decoder)
    return events


def pieces(
    data: bytes, cuts: list[int], fds: dict[int, list[int]]
) -> list[tuple[bytes, list[int]]]:
    inside = {k: v for k, v in fds.items() if 0 <= k < len(data)}
    points = sorted({0, len(data), *(c for c in cuts if 0 < c < len(data)), *inside})
    return [(data[start:end], inside.get(start, [])) for start, end in itertools.pairwise(points)]


FRAMES = [
    Frame(1, 0, 0, 0, 0, bytearray()),
    Frame(2, 1, 7, 4096, 4096, bytearray(b"x" * 4096)),
    Frame(255, 255, 0xFFFF_FFFF, 2**64 - 1, 2**64 - 1, bytearray(b"\0")),
    Frame(6, 0, 3, 0, 0, bytearray(), (10,)),
    Frame(9, 2, 4, 1, 2, bytearray(b"with fds"), (11, 12, 13)),
    Frame(2, 0, 5, 0, DIRECT_PAYLOAD, bytearray(range(256)) * (DIRECT_PAYLOAD // 256)),
    Frame(2, 0, 6, 0, 0, bytearray(b"y" * (DIRECT_PAYLOAD * 3 + 5))),
]


def _stream(frames: list[Frame]) -> tuple[bytes, dict[int, list[int]]]:
    data = b""
    fds: dict[int, list[int]] = {}
    for frame in frames:
        if frame.fds:
            fds[len(data)] = list(frame.fds)
        data += wire(frame)
    return data, fds


@pytest.mark.parametrize(
    "frame", FRAMES, ids=lambda f: f"op{f.op}-{len(f.payload)}b-{len(f.fds)}fd"
)
def test_frame_round_trips_whole_and_byte_by_byte(frame: Frame) -> None:
    data, fds = _stream([frame])
    whole = feed(data, [], fds, max_payload=1 << 24, max_fds=4)
    assert whole == [frame, Closed()]
    if len(data) < 10_000:
        one_by_one = feed(data, list(range(len(data))), fds, max_payload=1 << 24, max_fds=4)
        assert one_by_one == [frame, Closed()]


def test_a_stream_of_frames_round_trips_in_any_pieces() -> None:
    data, fds = _stream(FRAMES * 2)
    expected = [*FRAMES * 2, Closed()]
    assert feed(data, [], fds, max_payload=1 << 24, max_fds=4) == expected
    assert feed(data, list(range(0, len(data), 7)), fds, max_payload=1 << 24, max_fds=4) == (
        expected
    )
    assert feed(data, list(range(0, len(data), 4099)), fds, max_payload=1 << 24, max_fds=4) == (
        expected
    )


def test_zero_copy_receive_lands_large_payloads_in_their_own_buffer() -> None:
    frame = Frame(2, 0, 1, 0, 0, bytearray(b"z" * (DIRECT_PAYLOAD * 2)))
    data = wire(frame) + wire(Frame(1, 0, 2, 0, 0, bytearray(b"r")))
    decoder = Decoder(max_payload=1 << 24)
    pos = 0
    events: list[object] = []
    while pos < len(data):
        with decoder.get_buffer(100) as view:
            n = min(len(view), len(data) - pos, 1000)
            view[:n] = data[pos : pos + n]
        decoder.buffer_updated(n)
        pos += n
        events += drain(decoder)
    decoder.buffer_updated(0)
    events += drain(decoder)
    assert events == [frame, Frame(1, 0, 2, 0, 0, bytearray(b"r")), Closed()]


def header(op: int = 1, flags: int = 0, fds: int = 0, length: int = 0, reserved: int = 0) -> bytes:
    return FRAME_HEADER.pack(op, flags, fds, 0, 0, 0, length, reserved)


BAD = [
    ("reserved field", header(reserved=1), {}, "reserved"),
    ("payload above the limit", header(length=1025), {}, "at most 1024"),
    ("more fds than allowed", header(fds=3), {0: [1, 2, 3]}, "at most 2"),
    ("announced fds missing", header(fds=2), {0: [5]}, "announces 2 fds"),
    ("fds without a frame", header(), {1: [5]}, "without a frame"),
    ("closed inside a header", header()[:10], {}, "inside a frame"),
    ("closed inside a payload", header(length=10) + b"abc", {}, "inside a frame"),
    ("closed inside a direct payload", header(length=1000) + b"a" * 10, {}, "inside a frame"),
]


@pytest.mark.parametrize(("data", "fds", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_malformed_input_raises_protocol_error(
    data: bytes, fds: dict[int, list[int]], message: str
) -> None:
    for cuts in ([], list(range(len(data)))):
        decoder = Decoder(max_payload=1024, max_fds=2)
        with pytest.raises(ProtocolError, match=message):
            feed_into(decoder, data, cuts, fds)
        with pytest.raises(ProtocolError, match=message):  # and again: the link is dead
            decoder.next_event()


def feed_into(decoder: Decoder, data: bytes, cuts: list[int], fds: dict[int, list[int]]) -> None:
    for piece, piece_fds in pieces(data, cuts, fds):
        decoder.receive_data(piece, piece_fds)
        drain(decoder)
    decoder.receive_data(b"")
    drain(decoder)


def test_fds_no_frame_claimed_are_handed_back() -> None:
    decoder = Decoder(max_fds=2)
    decoder.receive_data(header(fds=1)[:5], [7, 8])
    assert decoder.next_event() is NEED_DATA
    decoder.receive_data(header(fds=1)[5:])
    assert decoder.next_event() == Frame(1, 0, 0, 0, 0, bytearray(), (7,))
    assert decoder.take_fds() == [8]
    assert decoder.take_fds() == []


def test_encoder_refuses_what_the_peer_would_refuse() -> None:
    encoder = Encoder(max_payload=16)
    with pytest.raises(ValueError, match="at most 16"):
        encoder.frame(1, payload=b"x" * 17)
    with pytest.raises(ValueError, match="fds"):
        encoder.frame(1, fds=MAX_FDS + 1)
    with pytest.raises(ValueError, match="out of range"):
        encoder.frame(256)
    with pytest.raises(ValueError, match="out of range"):
        encoder.frame(1, a=-1)
    assert encoder.frame(1, payload=b"x" * 16) == [header(length=16) + b"x" * 16]
    big = memoryview(b"y" * DIRECT_PAYLOAD)
    parts = Encoder(max_payload=DIRECT_PAYLOAD).frame(2, payload=big)
    assert parts[1] is big  # a large payload is not copied


FUZZ = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
VALID = _stream(FRAMES[:5])


@FUZZ
@given(
    st.binary(max_size=300),
    st.lists(st.integers(0, 400), max_size=20),
    st.dictionaries(st.integers(0, 300), st.lists(st.integers(3, 9), max_size=3), max_size=3),
)
def test_fuzz_random_bytes_raise_only_protocol_error(
    data: bytes, cuts: list[int], fds: dict[int, list[int]]
) -> None:
    with contextlib.suppress(ProtocolError):
        feed(data, cuts, fds, max_payload=256, max_fds=4)


@FUZZ
@given(
    st.lists(st.tuples(st.integers(0, len(VALID[0]) - 1), st.integers(0, 255)), max_size=8),
    st.lists(st.integers(0, len(VALID[0])), max_size=20),
    st.integers(0, len(VALID[0])),
)
def test_fuzz_mutated_streams_raise_only_protocol_error(
    flips: list[tuple[int, int]], cuts: list[int], cut_at: int
) -> None:
    data = bytearray(VALID[0])
    for pos, value in flips:
        data[pos] = value
    with contextlib.suppress(ProtocolError):
        events = feed(bytes(data[:cut_at]), cuts, VALID[1], max_payload=8192, max_fds=4)
        assert events and isinstance(events[-1], Closed)
