"""NBD over TLS (NBD_OPT_STARTTLS) against real clients: nbdinfo, qemu-img and libnbd with
certificates from a throw-away CA; plain clients refused; broken TLS costs one connection."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import ssl
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from prereq import require
from storvisor.engine.device import FileDevice
from storvisor.errors import InvalidArgument
from storvisor.exports.nbd import NBDExport, NBDServer, nbd_uri
from storvisor.exports.tls import server_context
from storvisor.protocols.nbd import constants as C
from tls_pki import Pki, make_pki

SIZE = 16 << 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


class Served:
    """A server with TLS on TCP: a raw-file export ``disk``, listening on 127.0.0.1 and on
    a Unix socket; every connection offered to ``handoff`` is recorded (and kept here)."""

    def __init__(self, directory: Path, pki: Pki) -> None:
        self.pki = pki
        self.image = directory / "disk.img"
        self.image.write_bytes(b"\xff" * SIZE)
        self.sock = str(directory / "nbd.sock")
        self.offered: list[int] = []  # families of the sockets offered to handoff
        self.server = NBDServer(
            handoff=self._handoff, tls=server_context(pki.server_cert, pki.server_key)
        )
        self.server.add_export(NBDExport("disk", lambda: FileDevice(str(self.image))))
        self.server.listen_unix(self.sock)
        self.port = self.server.listen_tcp("127.0.0.1", 0)
        self.server.start()

    def _handoff(self, sock: socket.socket) -> bool:
        self.offered.append(sock.family)
        return False

    def tls_uri(self, name: str = "disk") -> str:
        return f"nbds://127.0.0.1:{self.port}/{name}?tls-certificates={self.pki.client_dir}"

    def plain_uri(self, name: str = "disk") -> str:
        return nbd_uri(name, host="127.0.0.1", port=self.port)

    def tls_object(self) -> str:
        return f"tls-creds-x509,id=tls0,dir={self.pki.client_dir},endpoint=client"

    def image_opts(self, *, tls: bool = True) -> str:
        opts = f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={self.port}"
        opts += ",export=disk"
        return opts + (",tls-creds=tls0" if tls else "")

    def handle(self) -> nbd.NBD:
        h = nbd.NBD()
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(str(self.pki.client_dir))
        h.set_export_name("disk")
        h.connect_tcp("127.0.0.1", str(self.port))
        return h


@pytest.fixture
def served(pki: Pki) -> Iterator[Served]:
    for tool in ("nbdinfo", "qemu-img"):
        require(shutil.which(tool), f"{tool} (Debian packages libnbd-bin and qemu-utils)")
    directory = Path(tempfile.mkdtemp(prefix="nbdtls", dir="/tmp"))
    s = Served(directory, pki)
    try:
        yield s
    finally:
        s.server.close()
        shutil.rmtree(directory)


def run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{argv}: {done.stderr or done.stdout}"
    return done.stdout


def refused(*argv: str) -> str:
    """Run a client that must fail; returns its stderr."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0, f"{argv} succeeded: {done.stdout}"
    return done.stderr


def test_nbdinfo_over_tls(served: Served) -> None:
    info = json.loads(run("nbdinfo", "--json", served.tls_uri()))
    assert info["TLS"] is True
    assert [(e["export-name"], e["export-size"]) for e in info["exports"]] == [("disk", SIZE)]
    listed = run("nbdinfo", "--list", served.tls_uri())
    assert 'export="disk"' in listed and "with TLS" in listed


def _pattern() -> bytes:
    rng = random.Random(9)
    data = bytearray(SIZE)
    for start in range(0, SIZE, 1 << 20):  # data and holes, some pieces unaligned
        if rng.random() < 0.6:
            n = rng.randrange(1, 1 << 20)
            data[start : start + n] = rng.randbytes(n)
    return bytes(data)


def test_qemu_img_writes_and_reads_through_tls_byte_for_byte(
    served: Served, tmp_path: Path
) -> None:
    source = tmp_path / "source.raw"
    source.write_bytes(_pattern())
    info = run("qemu-img", "info", "--object", served.tls_object(), "--image-opts",
               served.image_opts())  # fmt: skip
    assert f"virtual size: 16 MiB ({SIZE} bytes)" in info
    # write: the export held 0xff everywhere, so holes must be written as zeroes too
    run(
        "qemu-img", "convert", "-n", "--object", served.tls_object(), "-f", "raw",
        str(source), "--target-image-opts", served.image_opts(),
    )  # fmt: skip
    assert served.image.read_bytes() == source.read_bytes()
    # read back into a fresh file
    served.image.write_bytes(_pattern()[::-1])  # different data, same size
    back = tmp_path / "back.raw"
    run(
        "qemu-img", "convert", "--object", served.tls_object(), "--image-opts",
        served.image_opts(), "-O", "raw", str(back),
    )  # fmt: skip
    assert back.read_bytes() == served.image.read_bytes()


def test_libnbd_pipelined_requests_over_tls(served: Served) -> None:
    # Many requests in flight of many sizes: replies small enough to be joined and large
    # enough to be sent alone, sent while the server goes on receiving.
    h = served.handle()
    try:
        assert h.get_tls_negotiated()
        rng = random.Random(4)
        model = bytearray(served.image.read_bytes())
        sizes = [512, 4096, 65536, 1 << 20, 3 << 20, 100, 70000]
        writes = []
        for i in range(64):
            n = sizes[i % len(sizes)]
            off = rng.randrange(0, SIZE - n)
            data = rng.randbytes(n)
            model[off : off + n] = data
            writes.append(h.aio_pwrite(data, off))
            if len(writes) % 16 == 0:
                _drain(h)
        _drain(h)
        h.flush()
        reads = []
        for i in range(64):
            n = sizes[i % len(sizes)]
            off = rng.randrange(0, SIZE - n)
            buf = nbd.Buffer(n)
            reads.append((off, n, buf, h.aio_pread(buf, off)))
        _drain(h)
        for off, n, buf, cookie in reads:
            assert h.aio_command_completed(cookie)
            assert buf.to_bytearray() == model[off : off + n], (off, n)
    finally:
        h.shutdown()
    assert served.image.read_bytes() == model


def _drain(h: nbd.NBD, timeout: float = 60) -> None:
    """Wait for every request in flight; a reply that does not come fails the test."""
    deadline = time.monotonic() + timeout
    while h.aio_in_flight():
        assert time.monotonic() < deadline, "replies missing"
        h.poll(1000)


def test_plain_clients_are_refused_and_the_server_keeps_serving(served: Served) -> None:
    err = refused("qemu-img", "info", "--image-opts", served.image_opts(tls=False))
    assert "TLS" in err and "Traceback" not in err
    refused("nbdinfo", served.plain_uri())
    refused("nbdinfo", "--list", served.plain_uri())
    # NBD_OPT_EXPORT_NAME cannot be refused on the wire: the server closes the connection
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as s:
        assert _recv_exactly(s, 18)[:8] == b"NBDMAGIC"
        s.sendall(struct.pack(">I", C.NBD_FLAG_C_FIXED_NEWSTYLE))
        s.sendall(struct.pack(">QII", C.IHAVEOPT, C.NBD_OPT_EXPORT_NAME, 4) + b"disk")
        assert _recv_to_eof(s) == b""
    assert "export-size: 16777216" in run("nbdinfo", served.tls_uri())


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        assert chunk, "the server closed the connection"
        data += chunk
    return data


def _recv_to_eof(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(65536):  # the socket's timeout makes a stall fail the test
        data += chunk
    return data


def _starttls(s: socket.socket) -> None:
    """Greeting, client flags, NBD_OPT_STARTTLS and its ACK, in plain text."""
    _recv_exactly(s, 18)
    s.sendall(struct.pack(">I", C.NBD_FLAG_C_FIXED_NEWSTYLE | C.NBD_FLAG_C_NO_ZEROES))
    s.sendall(struct.pack(">QII", C.IHAVEOPT, C.NBD_OPT_STARTTLS, 0))
    ack = struct.pack(">QIII", C.NBD_REP_MAGIC, C.NBD_OPT_STARTTLS, C.NBD_REP_ACK, 0)
    assert _recv_exactly(s, 20) == ack


@pytest.mark.parametrize(
    "garbage",
    [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", os.urandom(1 << 16), b"\x16\x03\x01\x00"],
    ids=["http", "random", "truncated hello"],
)
def test_garbage_instead_of_a_client_hello_closes_only_that_connection(
    served: Served, garbage: bytes
) -> None:
    h = served.handle()  # a TLS client that stays connected throughout
    try:
        h.pwrite(b"\x42" * 4096, 0)
        with socket.create_connection(("127.0.0.1", served.port), timeout=10) as s:
            _starttls(s)
            s.sendall(garbage)
            if garbage.startswith(b"\x16"):
                s.shutdown(socket.SHUT_WR)  # a hello cut short by the client's end
            rest = _recv_to_eof(s)
            assert rest == b"" or rest[:1] == b"\x15"  # nothing, or a TLS alert
        assert h.pread(4096, 0) == b"\x42" * 4096
    finally:
        h.shutdown()
    assert "export-size: 16777216" in run("nbdinfo", served.tls_uri())


def test_tls_1_2_and_the_negotiation_over_tls(served: Served) -> None:
    # TLS 1.2 is the version every NBD implementation must support; gnutls clients pick 1.3
    context = ssl.create_default_context(cafile=str(served.pki.ca_cert))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as raw:
        _starttls(raw)
        with context.wrap_socket(raw, server_hostname="localhost") as s:
            assert s.version() == "TLSv1.2"
            # a second STARTTLS is invalid; then LIST answers over TLS
            s.sendall(struct.pack(">QII", C.IHAVEOPT, C.NBD_OPT_STARTTLS, 0))
            magic, opt, kind, length = struct.unpack(">QIII", _recv_exactly(s, 20))
            assert (opt, kind) == (C.NBD_OPT_STARTTLS, C.NBD_REP_ERR_INVALID)
            _recv_exactly(s, length)
            s.sendall(struct.pack(">QII", C.IHAVEOPT, C.NBD_OPT_LIST, 0))
            magic, opt, kind, length = struct.unpack(">QIII", _recv_exactly(s, 20))
            assert (magic, opt, kind) == (C.NBD_REP_MAGIC, C.NBD_OPT_LIST, C.NBD_REP_SERVER)
            assert _recv_exactly(s, length) == b"\0\0\0\x04disk"
            s.sendall(struct.pack(">QII", C.IHAVEOPT, C.NBD_OPT_ABORT, 0))


def test_unix_socket_stays_plain_and_only_plain_connections_are_handed_off(
    served: Served,
) -> None:
    unix = nbd_uri("disk", unix_path=served.sock)
    assert "export-size: 16777216" in run("nbdinfo", unix)
    assert served.offered == [socket.AF_UNIX]
    # STARTTLS on the Unix socket is refused by policy
    tls_unix = f"nbds+unix:///disk?socket={served.sock}&tls-certificates={served.pki.client_dir}"
    refused("nbdinfo", tls_unix)
    run("nbdinfo", served.tls_uri())
    refused("nbdinfo", served.plain_uri())
    assert served.offered == [socket.AF_UNIX, socket.AF_UNIX]  # no TCP connection offered


def test_bad_certificates_are_one_clear_error(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="cannot read TLS certificate"):
        server_context(tmp_path / "missing.pem", pki.server_key)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(InvalidArgument, match="not a PEM certificate and its private key"):
        server_context(junk, pki.server_key)
    with pytest.raises(InvalidArgument, match="not a PEM certificate and its private key"):
        server_context(pki.server_cert, pki.ca_cert.with_name("ca-key.pem"))  # another key
    encrypted = tmp_path / "encrypted.pem"
    subprocess.run(
        ["openssl", "pkey", "-in", str(pki.server_key), "-aes256", "-passout", "pass:secret",
         "-out", str(encrypted)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    with pytest.raises(InvalidArgument, match="is encrypted"):
        server_context(pki.server_cert, encrypted)


def test_tls_older_than_1_2_or_a_client_context_is_refused() -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    with pytest.raises(InvalidArgument, match=r"TLS 1\.2"):
        NBDServer(tls=context)
    with pytest.raises(InvalidArgument, match="server-side"):
        NBDServer(tls=ssl.create_default_context())


def test_a_client_hello_sent_with_starttls_is_not_lost(served: Served) -> None:
    # A client that sends its ClientHello right behind NBD_OPT_STARTTLS, without waiting
    # for the ACK: the bytes the server already read go to its TLS layer.
    context = ssl.create_default_context(cafile=str(served.pki.ca_cert))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as s:
        _recv_exactly(s, 18)
        s.sendall(
            struct.pack(">I", C.NBD_FLAG_C_FIXED_NEWSTYLE | C.NBD_FLAG_C_NO_ZEROES)
            + struct.pack(">QII", C.IHAVEOPT, C.NBD_OPT_STARTTLS, 0)
            + hello
        )
        ack = struct.pack(">QIII", C.NBD_REP_MAGIC, C.NBD_OPT_STARTTLS, C.NBD_REP_ACK, 0)
        assert _recv_exactly(s, 20) == ack

        def exchange(data: bytes = b"") -> None:
            if data:
                tls.write(data)
            if outgoing.pending:
                s.sendall(outgoing.read())

        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                exchange()
                chunk = s.recv(65536)
                assert chunk, "the server closed the connection during the handshake"
                incoming.write(chunk)
        exchange(struct.pack(">QII", C.IHAVEOPT, C.NBD_OPT_LIST, 0))
        reply = b""
        while len(reply) < 20 + 8 + 20:  # REP_SERVER "disk", then the ACK
            try:
                reply += tls.read(4096)
            except ssl.SSLWantReadError:
                exchange()
                chunk = s.recv(65536)
                assert chunk, "the server closed the connection"
                incoming.write(chunk)
        server = struct.pack(">QIII", C.NBD_REP_MAGIC, C.NBD_OPT_LIST, C.NBD_REP_SERVER, 8)
        done = struct.pack(">QIII", C.NBD_REP_MAGIC, C.NBD_OPT_LIST, C.NBD_REP_ACK, 0)
        assert reply == server + b"\0\0\0\x04disk" + done
