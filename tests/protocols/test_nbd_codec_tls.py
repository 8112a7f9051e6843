"""NBD_OPT_STARTTLS in the sans-I/O codec: FORCEDTLS (``require_tls``) and NOTLS, every input
fed whole and byte by byte. TLS itself is the identity here (see ``nbd_wire.answer``)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nbd_wire import (
    GO_DISK,
    answer,
    client_flags,
    drive,
    info_data,
    meta_data,
    option,
    rep,
    request,
    whole_and_bytewise,
)

from storvisor.errors import ProtocolError, StateError
from storvisor.protocols.nbd import (
    NEED_DATA,
    Aborted,
    Command,
    ExportListRequest,
    ExportRequest,
    ServerConnection,
    StartTLS,
)
from storvisor.protocols.nbd import constants as C
from storvisor.protocols.nbd._state import State

STARTTLS = option(C.NBD_OPT_STARTTLS)
ACK = rep(C.NBD_OPT_STARTTLS, C.NBD_REP_ACK)
REQUIRED = b"TLS is required: send NBD_OPT_STARTTLS first"


def tls_reqd(opt: int) -> bytes:
    return rep(opt, C.NBD_REP_ERR_TLS_REQD, REQUIRED)


def test_without_tls_starttls_is_refused_by_policy() -> None:
    events, out = whole_and_bytewise(client_flags() + STARTTLS + option(C.NBD_OPT_LIST))
    assert events == [ExportListRequest()]
    assert out.startswith(
        rep(C.NBD_OPT_STARTTLS, C.NBD_REP_ERR_POLICY, b"TLS is not offered on this connection")
    )


BEFORE_TLS = [
    ("list", C.NBD_OPT_LIST, b""),
    ("info", C.NBD_OPT_INFO, info_data("disk", [C.NBD_INFO_NAME])),
    ("go", C.NBD_OPT_GO, info_data("disk", [C.NBD_INFO_BLOCK_SIZE])),
    ("structured reply", C.NBD_OPT_STRUCTURED_REPLY, b""),
    ("list meta context", C.NBD_OPT_LIST_META_CONTEXT, meta_data("disk", [])),
    ("set meta context", C.NBD_OPT_SET_META_CONTEXT, meta_data("disk", ["base:allocation"])),
    ("extended headers", C.NBD_OPT_EXTENDED_HEADERS, b""),
    ("unknown", 99, b"whatever"),
    ("malformed go", C.NBD_OPT_GO, b"\0\0\0\x10ab"),
]


@pytest.mark.parametrize(
    ("opt", "data"), [c[1:] for c in BEFORE_TLS], ids=[c[0] for c in BEFORE_TLS]
)
def test_every_option_before_starttls_gets_tls_reqd(opt: int, data: bytes) -> None:
    # Nothing reaches the server (no export list, no export details) before TLS, and the
    # client may go on to start TLS afterwards.
    events, out = whole_and_bytewise(
        client_flags() + option(opt, data) + option(opt, data) + STARTTLS, require_tls=True
    )
    assert events == [StartTLS()]
    assert out == tls_reqd(opt) * 2 + ACK


def test_an_oversized_option_before_starttls_gets_tls_reqd() -> None:
    conn = ServerConnection(require_tls=True, max_option_length=16)
    events, out = drive(conn, [client_flags() + option(C.NBD_OPT_INFO, b"x" * 17)])
    assert events == [] and out == tls_reqd(C.NBD_OPT_INFO)


def test_abort_before_starttls_still_works() -> None:
    events, out = whole_and_bytewise(
        client_flags() + option(C.NBD_OPT_LIST) + option(C.NBD_OPT_ABORT), require_tls=True
    )
    assert events == [Aborted()]
    assert out == tls_reqd(C.NBD_OPT_LIST) + rep(C.NBD_OPT_ABORT, C.NBD_REP_ACK)


def test_export_name_before_starttls_ends_the_connection() -> None:
    data = client_flags() + option(C.NBD_OPT_EXPORT_NAME, b"disk")
    for chunks in ([data], [data[i : i + 1] for i in range(len(data))]):
        conn = ServerConnection(require_tls=True)
        with pytest.raises(ProtocolError, match="TLS is required"):
            drive(conn, chunks)
        assert conn.state is State.CLOSED


def test_a_client_without_fixed_newstyle_cannot_get_tls() -> None:
    conn = ServerConnection(require_tls=True)
    with pytest.raises(ProtocolError, match="fixed-newstyle"):
        drive(conn, [client_flags(0) + STARTTLS])
    # without TLS such a client is served as before
    events, _ = drive(ServerConnection(), [client_flags(0) + option(C.NBD_OPT_EXPORT_NAME)])
    assert events == [ExportRequest(C.NBD_OPT_EXPORT_NAME, "", frozenset())]


def test_starttls_then_a_whole_session_over_tls() -> None:
    plain_events, plain_out = whole_and_bytewise(GO_DISK + request(C.NBD_CMD_READ, 0, 512))
    events, out = whole_and_bytewise(
        client_flags() + STARTTLS + GO_DISK[4:] + request(C.NBD_CMD_READ, 0, 512),
        require_tls=True,
    )
    assert events == [StartTLS(), *plain_events]
    assert out == ACK + plain_out
    assert isinstance(events[-1], Command) and events[-1].error == 0


def test_bytes_received_with_starttls_are_handed_over() -> None:
    conn = ServerConnection(require_tls=True)
    conn.receive_data(client_flags() + STARTTLS + b"\x16\x03\x01hello")
    conn.data_to_send()
    event = conn.next_event()
    assert isinstance(event, StartTLS) and event.received == b"\x16\x03\x01hello"
    assert conn.data_to_send() == ACK
    assert conn.state is State.AWAIT_TLS and not conn.tls
    with pytest.raises(StateError):
        conn.next_event()
    conn.tls_started()
    assert conn.tls and conn.state is State.OPTIONS
    assert conn.next_event() is NEED_DATA  # the buffer was emptied


def test_starttls_twice_is_invalid() -> None:
    events, out = whole_and_bytewise(
        client_flags() + STARTTLS + STARTTLS + option(C.NBD_OPT_LIST), require_tls=True
    )
    assert events == [StartTLS(), ExportListRequest()]
    assert out.startswith(
        ACK + rep(C.NBD_OPT_STARTTLS, C.NBD_REP_ERR_INVALID, b"TLS is already started")
    )


def test_starttls_with_data_is_invalid_and_tls_stays_required() -> None:
    events, out = whole_and_bytewise(
        client_flags() + option(C.NBD_OPT_STARTTLS, b"x") + option(C.NBD_OPT_LIST),
        require_tls=True,
    )
    assert events == []
    assert out == rep(
        C.NBD_OPT_STARTTLS, C.NBD_REP_ERR_INVALID, b"NBD_OPT_STARTTLS takes no data"
    ) + tls_reqd(C.NBD_OPT_LIST)


def test_tls_started_without_starttls_is_a_state_error() -> None:
    conn = ServerConnection(require_tls=True)
    with pytest.raises(StateError):
        conn.tls_started()
    conn.receive_data(client_flags())
    assert conn.next_event() is NEED_DATA
    with pytest.raises(StateError):
        conn.tls_started()


FUZZ = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)


@FUZZ
@given(st.binary(max_size=400), st.lists(st.integers(0, 1000), max_size=6), st.booleans())
def test_fuzz_only_protocol_errors_escape(tail: bytes, cuts: list[int], started: bool) -> None:
    data = client_flags() + (STARTTLS if started else b"") + tail
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    conn = ServerConnection(require_tls=True)
    with contextlib.suppress(ProtocolError):
        for chunk in [*(c for c in chunks if c), b""]:
            conn.receive_data(chunk)
            while (event := conn.next_event()) is not NEED_DATA:
                # nothing about the exports is asked for before TLS
                if isinstance(event, (ExportRequest, ExportListRequest)):
                    assert conn.tls
                answer(conn, event)
                if conn.state is State.CLOSED:
                    return
