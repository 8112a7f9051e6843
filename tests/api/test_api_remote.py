"""The API on TCP: TLS with a self-signed certificate from HOME, bearer tokens (401, 403,
none in the URL), the remote client's certificate checks, and bad input refused with one
4xx before anything changes. A real ``TcpAPIServer`` and ``APIServer`` share one real
``Service``; requests are raw HTTPS or the real ``Client``."""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import ssl
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_api_server import raw

from storvisor.api.client import AccessDenied, Client, UntrustedDaemon
from storvisor.api.export_defs import TcpAddress
from storvisor.api.server import APIServer, TcpAPIServer
from storvisor.api.service import Service
from storvisor.api.tls import (
    TlsFiles,
    file_fingerprint,
    format_fingerprint,
    parse_fingerprint,
    self_signed,
    server_context,
)
from storvisor.api.tokens import TOKENS_FILE, TokenStore
from storvisor.engine.types import BackingSpec
from storvisor.errors import Conflict, InvalidArgument, NotFound


@dataclass
class Remote:
    home: Path
    unix: APIServer
    tcp: TcpAPIServer
    tls: TlsFiles
    tokens: TokenStore
    admin: str  # a read-write token
    reader: str  # a read-only token

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.tcp.address.port}"

    @property
    def fingerprint(self) -> str:
        return format_fingerprint(file_fingerprint(self.tls.cert))

    def client(self, token: str) -> Client:
        return Client.remote(self.url, token, fingerprint=self.fingerprint, timeout=30)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        token: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], object]:
        ctx = ssl.create_default_context(cafile=self.tls.cert)
        conn = http.client.HTTPSConnection("127.0.0.1", self.tcp.address.port, context=ctx)
        try:
            h = {"Content-Type": "application/json", **(headers or {})}
            if token is not None:
                h["Authorization"] = f"Bearer {token}"
            conn.request(method, path, body=body, headers=h)
            response = conn.getresponse()
            data = response.read()
            return response.status, dict(response.getheaders()), json.loads(data) if data else None
        finally:
            conn.close()


@pytest.fixture
def remote(tmp_path: Path) -> Iterator[Remote]:
    home = tmp_path / "home"
    service = Service.open(home)
    tls = self_signed(home, "127.0.0.1")
    tokens = TokenStore(home)
    _, admin = tokens.create("admin")
    _, reader = tokens.create("reader", read_only=True)
    unix = APIServer(home / "api.sock", service)
    tcp = TcpAPIServer(TcpAddress("127.0.0.1", 0), service, server_context(tls), tokens)
    unix.start()
    tcp.start()
    try:
        yield Remote(home, unix, tcp, tls, tokens, admin, reader)
    finally:
        tcp.close()
        unix.close()
        service.close()


def _state(r: Remote) -> object:
    """Everything an API call could change, as the Unix socket sees it."""
    c = Client(r.unix.path, timeout=30)
    return (c.pools(), c.volumes(), c.exports(), c.qos_specs(), r.tokens.tokens())


# -- TLS ------------------------------------------------------------------------------------


def test_self_signed_certificate_is_private_and_reused(remote: Remote) -> None:
    assert stat.S_IMODE(remote.tls.key.stat().st_mode) == 0o600
    assert stat.S_IMODE(remote.tls.cert.parent.stat().st_mode) == 0o700
    before = remote.tls.cert.read_bytes()
    assert self_signed(remote.home, "127.0.0.1") == remote.tls
    assert remote.tls.cert.read_bytes() == before
    # The fingerprint is the one openssl computes, and the one the server presents.
    out = subprocess.run(
        ["openssl", "x509", "-in", str(remote.tls.cert), "-noout", "-fingerprint", "-sha256"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip().split("=", 1)[1] == remote.fingerprint
    ctx = ssl.create_default_context(cafile=remote.tls.cert)
    with (
        socket.create_connection(("127.0.0.1", remote.tcp.address.port)) as s,
        ctx.wrap_socket(s, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    assert format_fingerprint(hashlib.sha256(der).digest()) == remote.fingerprint


def test_plain_http_on_the_tls_port_is_dropped_and_the_server_carries_on(remote: Remote) -> None:
    with socket.create_connection(("127.0.0.1", remote.tcp.address.port), timeout=30) as s:
        s.sendall(b"GET /v1/status HTTP/1.0\r\n\r\n")
        assert not s.recv(4096).startswith(b"HTTP/")
    assert remote.client(remote.reader).status().home == str(remote.home)


def test_a_client_that_never_starts_tls_does_not_hold_up_others(remote: Remote) -> None:
    """The handshake runs in the connection's own thread, not in the accepting one."""
    idle = [socket.create_connection(("127.0.0.1", remote.tcp.address.port)) for _ in range(3)]
    try:
        start = time.monotonic()
        assert remote.client(remote.reader).pools() == []
        assert time.monotonic() - start < 10
    finally:
        for s in idle:
            s.close()


def test_fingerprint_forms() -> None:
    digest = bytes(range(32))
    text = format_fingerprint(digest)
    assert parse_fingerprint(text) == digest
    assert parse_fingerprint("SHA256:" + digest.hex()) == digest
    for bad in ("", "AB:CD", text + ":00", "zz" * 32):
        with pytest.raises(InvalidArgument, match="fingerprint"):
            parse_fingerprint(bad)


def test_client_checks_the_server_certificate(remote: Remote, tmp_path: Path) -> None:
    assert remote.client(remote.reader).pools() == []
    by_ca = Client.remote(remote.url, remote.reader, ca_file=remote.tls.cert, timeout=30)
    assert by_ca.pools() == []
    with pytest.raises(UntrustedDaemon, match="cannot verify"):
        Client.remote(remote.url, remote.reader, timeout=30).pools()
    other = bytearray(parse_fingerprint(remote.fingerprint))
    other[0] ^= 1
    with pytest.raises(UntrustedDaemon, match="not the pinned"):
        Client.remote(
            remote.url, remote.admin, fingerprint=format_fingerprint(bytes(other)), timeout=30
        ).create_volume("p", "v", 1 << 20)
    for url in ("http://127.0.0.1:1", "https://127.0.0.1:1/v1", "127.0.0.1:1", "https://:1"):
        with pytest.raises(InvalidArgument, match="URL"):
            Client.remote(url, remote.reader, fingerprint=remote.fingerprint)
    with pytest.raises(InvalidArgument, match="token"):
        Client.remote(remote.url, "two words", fingerprint=remote.fingerprint)


# -- tokens ---------------------------------------------------------------------------------


def test_tokens_are_stored_as_hashes_only(remote: Remote) -> None:
    text = (remote.home / TOKENS_FILE).read_text()
    assert remote.admin not in text and remote.reader not in text
    assert hashlib.sha256(remote.admin.encode()).hexdigest() in text
    assert stat.S_IMODE((remote.home / TOKENS_FILE).stat().st_mode) == 0o600
    assert [(t.name, t.read_only) for t in remote.tokens.tokens()] == [
        ("admin", False),
        ("reader", True),
    ]
    with pytest.raises(Conflict):
        remote.tokens.create("admin")
    with pytest.raises(InvalidArgument):
        remote.tokens.create("no/slash")
    with pytest.raises(NotFound):
        remote.tokens.revoke("nobody")


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer ", "Basic YWRtaW46eA==", "Bearer svt_wrong", "Bearer x y"],
)
def test_no_or_wrong_token_is_401(remote: Remote, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    before = _state(remote)
    for method, path, body in [
        ("GET", "/v1/pools", None),
        ("GET", "/v1/nothing", None),
        ("POST", "/v1/pools", b'{"name": "p", "backings": [{"path": "/tmp/x", "size": 1}]}'),
    ]:
        status, resp_headers, doc = remote.request(method, path, body, headers=headers)
        assert status == 401, (authorization, path, doc)
        assert doc["error"]["type"] == "Unauthorized"
        assert resp_headers["WWW-Authenticate"].startswith("Bearer")
    assert _state(remote) == before


def test_read_only_token_reads_but_never_writes(remote: Remote, tmp_path: Path) -> None:
    admin = remote.client(remote.admin)
    admin.create_pool("p", [BackingSpec(str(tmp_path / "d.img"), 1 << 30)])
    admin.create_volume("p", "v", 1 << 20)
    reader = remote.client(remote.reader)
    assert [v.name for v in reader.volumes()] == ["v"]
    assert reader.fsck("p").clean  # a check changes nothing: a reader may run it
    before = _state(remote)
    with pytest.raises(AccessDenied, match="read-only"):
        reader.create_volume("p", "w", 1 << 20)
    with pytest.raises(AccessDenied, match="read-only"):
        reader.delete_volume("p", "v")
    status, _, doc = remote.request("DELETE", "/v1/pools/p?force=1", token=remote.reader)
    assert status == 403 and doc["error"]["type"] == "Forbidden"
    assert _state(remote) == before


def test_revoked_token_is_refused_at_once(remote: Remote) -> None:
    client = remote.client(remote.admin)
    assert client.pools() == []
    remote.tokens.revoke("admin")
    with pytest.raises(AccessDenied, match="unknown or revoked"):
        client.pools()
    _, again = remote.tokens.create("admin")
    assert again != remote.admin
    assert remote.client(again).pools() == []


@pytest.mark.parametrize(
    "query", ["access_token=abc", "token=abc", "force=1&TOKEN=x", "x={t}", "force={t}"]
)
def test_token_in_the_url_is_400_on_both_sockets(remote: Remote, query: str) -> None:
    path = "/v1/pools/p?" + query.format(t=remote.admin)
    status, _, doc = remote.request("DELETE", path, token=remote.admin)
    assert status == 400 and "never in the URL" in doc["error"]["message"]
    status, doc = raw(remote.unix, "DELETE", path)
    assert status == 400 and "never in the URL" in doc["error"]["message"]


def test_unix_socket_needs_no_token(remote: Remote) -> None:
    assert stat.S_IMODE(remote.unix.path.stat().st_mode) == 0o600
    status, doc = raw(remote.unix, "GET", "/v1/pools")
    assert status == 200 and doc == []


# -- bad input ------------------------------------------------------------------------------

_POOL = json.dumps({"name": "q", "backings": [{"path": "/nonexistent/q.img", "size": 1 << 30}]})


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "words"),
    [
        ("POST", "/v1/pools/p/volumes", b'{"name": "w", "size":', {}, 400, "not JSON"),
        ("POST", "/v1/pools/p/volumes", b"[1, 2", {}, 400, "not JSON"),
        ("POST", "/v1/pools/p/volumes", b'{"name": "w"}', {}, 400, "missing field 'size'"),
        (
            "POST",
            "/v1/pools/p/volumes",
            b'{"name": "w", "size": 1048576, "colour": "red"}',
            {},
            400,
            "unknown field 'colour'",
        ),
        (
            "POST",
            "/v1/pools/p/volumes/v/extend",
            b'{"size": 23756448705577874458532642816}',
            {},
            400,
            "out of range",
        ),
        (
            "POST",
            "/v1/pools/p/volumes",
            b'{"name": "w", "size": 1048576}',
            {"Content-Type": "text/plain"},
            415,
            "application/json",
        ),
        (
            "POST",
            "/v1/pools/p/volumes",
            b'{"name": "w", "size": 1048576}',
            {"Content-Type": "application/x-www-form-urlencoded"},
            415,
            "application/json",
        ),
        ("POST", "/v1/pools/p/volumes", b"", {}, 400, "malformed request body"),
        ("DELETE", "/v1/pools/p/volumes/../../q", None, {}, 400, "'..'"),
        ("DELETE", "/v1/pools/p/volumes/%2e%2e", None, {}, 400, "'..'"),
        ("GET", "/v1/pools/p/../q", None, {}, 400, "'..'"),
        ("POST", "/v1/pools/p/volumes/v/flatten", b"{}", {}, 400, "takes no request body"),
        ("DELETE", "/v1/pools/p?force=1&cascade=1", None, {}, 400, "unknown query parameter"),
        ("GET", "/v1/pools?force=1", None, {}, 400, "unknown query parameter"),
        ("DELETE", "/v1/pools/p?force=-1.5", None, {}, 400, "takes one of true, false"),
        ("DELETE", "/v1/pools/p?force=1&force=0", None, {}, 400, "takes one of true, false"),
        ("DELETE", "/v1/pools/p?force", None, {}, 400, "malformed query string"),
        ("PUT", "/v1/pools/p", None, {}, 405, "not allowed"),
        ("GET", "/v2/pools", None, {}, 404, "no such resource"),
        ("POST", "/v1/pools", b"{}", {"Content-Length": "-5"}, 400, "Content-Length"),
    ],
)
def test_bad_input_gets_one_4xx_and_changes_nothing(
    remote: Remote, tmp_path: Path, method, path, body, headers, status, words
) -> None:
    admin = remote.client(remote.admin)
    admin.create_pool("p", [BackingSpec(str(tmp_path / "d.img"), 1 << 30)])
    admin.create_volume("p", "v", 1 << 20)
    before = _state(remote)
    got, _, doc = remote.request(method, path, body, token=remote.admin, headers=headers)
    assert got == status, doc
    assert set(doc) == {"error"} and set(doc["error"]) == {"type", "message"}
    assert words in doc["error"]["message"]
    assert "\n" not in doc["error"]["message"] and "Traceback" not in doc["error"]["message"]
    assert _state(remote) == before


def test_a_1gb_body_is_refused_from_its_length_without_being_read(remote: Remote) -> None:
    ctx = ssl.create_default_context(cafile=remote.tls.cert)
    port = remote.tcp.address.port
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as s,
        ctx.wrap_socket(s, server_hostname="localhost") as tls,
    ):
        start = time.monotonic()
        tls.sendall(
            b"POST /v1/pools HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {remote.admin}\r\n".encode()
            + b"Content-Length: 1073741824\r\n\r\n"
            + b'{"name": "p", '
        )
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
        elapsed = time.monotonic() - start
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 413"), data
    doc = json.loads(body)
    assert "too large" in doc["error"]["message"] and "1073741824" in doc["error"]["message"]
    assert elapsed < 10  # answered at once: the server did not wait for 1 GB
    assert _state(remote)[0] == []


def test_a_chunked_body_is_refused(remote: Remote) -> None:
    status, _, doc = remote.request(
        "POST",
        "/v1/pools",
        b"{}",
        token=remote.admin,
        headers={"Transfer-Encoding": "chunked", "Content-Length": ""},
    )
    assert status == 411 and "Content-Length" in doc["error"]["message"]
