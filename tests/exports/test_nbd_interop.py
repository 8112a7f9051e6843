"""The NBD export against real clients: qemu-img, qemu-io, nbdinfo, nbdcopy and libnbd, with
qemu-nbd serving a copy of the same image as the differential reference."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from storvisor.engine.device import FileDevice
from storvisor.engine.home import Home
from storvisor.engine.types import BackingSpec
from storvisor.errors import IOFailure
from storvisor.exports.nbd import NBDExport, NBDServer, nbd_uri
from storvisor.protocols.nbd import constants as C
from storvisor.testing.memory import MemoryDevice

SIZE = 64 << 20


class Served:
    """A running server with a raw-file export ``disk``, a read-only ``ro`` and an in-memory
    ``mem``, listening on a Unix socket in a short temporary directory."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.image = directory / "disk.img"
        with open(self.image, "wb") as f:
            f.truncate(SIZE)
        self.sock = str(directory / "nbd.sock")
        self.mem = MemoryDevice(4 << 20)
        self.server = NBDServer()
        self.server.add_export(NBDExport("disk", lambda: FileDevice(str(self.image)), "raw file"))
        self.server.add_export(NBDExport("ro", lambda: FileDevice(str(self.image)), read_only=True))
        self.server.add_export(NBDExport("mem", lambda: self.mem))
        self.server.listen_unix(self.sock)
        self.server.start()

    def uri(self, name: str = "disk") -> str:
        return nbd_uri(name, unix_path=self.sock)

    def handle(self, name: str = "disk") -> nbd.NBD:
        h = nbd.NBD()
        h.connect_uri(self.uri(name))
        return h


@pytest.fixture
def served() -> Iterator[Served]:
    directory = Path(tempfile.mkdtemp(prefix="nbdt", dir="/tmp"))
    s = Served(directory)
    try:
        yield s
    finally:
        s.server.close()
        shutil.rmtree(directory)


def run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{argv}: {done.stderr or done.stdout}"
    return done.stdout


def qemu_io(uri: str, *commands: str, read_only: bool = False) -> str:
    args = ["qemu-io", "-f", "raw"] + (["-r"] if read_only else [])
    for c in commands:
        args += ["-c", c]
    out = run(*args, uri)
    assert "Pattern verification failed" not in out and "failed" not in out, out
    return out


# -- QEMU ------------------------------------------------------------------------------------


def test_qemu_io_pattern_write_and_read(served: Served) -> None:
    qemu_io(served.uri(), "write -P 0xab 0 64k", "read -P 0xab 0 64k", "write -P 0x11 100 1000")
    qemu_io(served.uri(), "read -P 0x11 100 1000", "read -P 0xab 1100 1000", "read -P 0 64k 64k")
    data = served.image.read_bytes()
    assert data[:100] == b"\xab" * 100 and data[100:1100] == b"\x11" * 1000
    qemu_io(served.uri(), "write -z 0 32k", "discard 32k 32k", "flush", "read -P 0 0 64k")


def test_qemu_io_read_only_export_refuses_writes(served: Served) -> None:
    done = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write 0 4k", served.uri("ro")],
        capture_output=True,
        text=True,
    )
    assert "Operation not permitted" in done.stdout + done.stderr or done.returncode != 0


def test_qemu_img_info_map_convert_compare(served: Served) -> None:
    info = json.loads(run("qemu-img", "info", "--output=json", served.uri()))
    assert info["virtual-size"] == SIZE
    qemu_io(served.uri(), "write -P 1 0 64k", "write -P 2 8M 128k")
    extents = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", served.uri()))
    data = [(e["start"], e["length"]) for e in extents if e["data"]]
    holes = [(e["start"], e["length"]) for e in extents if not e["data"]]
    assert data == [(0, 65536), (8 << 20, 131072)]
    assert holes and all(e["zero"] for e in extents if not e["data"])

    source = served.dir / "source.img"
    run("qemu-img", "create", "-f", "raw", str(source), str(SIZE))
    qemu_io(str(source), "write -P 0x5a 3M 5M", "write -P 0x77 40M 1M")
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source), served.uri())
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", served.uri(), str(source))
    out = run(
        "qemu-img", "convert", "-f", "raw", "-O", "raw", served.uri(), str(served.dir / "c.img")
    )
    assert out == ""
    assert (served.dir / "c.img").read_bytes() == source.read_bytes()


# -- libnbd tools ----------------------------------------------------------------------------


def test_nbdinfo_json_list_map(served: Served) -> None:
    qemu_io(served.uri(), "write -P 1 1M 1M")
    info = json.loads(run("nbdinfo", "--json", served.uri()))
    export = info["exports"][0]
    assert info["protocol"] == "newstyle-fixed" and info["structured"] is True
    assert export["export-name"] == "disk" and export["description"] == "raw file"
    assert export["export-size"] == SIZE and export["contexts"] == ["base:allocation"]
    assert export["can_multi_conn"] and export["can_trim"] and export["can_zero"]
    assert export["can_fua"] and export["can_flush"] and export["can_cache"]
    assert export["can_fast_zero"] and not export["is_read_only"]
    assert export["block_size_minimum"] == 1 and export["block_size_maximum"] == 32 << 20

    listed = json.loads(run("nbdinfo", "--json", "--list", served.uri("")))
    assert [e["export-name"] for e in listed["exports"]] == ["disk", "ro", "mem"]
    assert listed["exports"][1]["is_read_only"] is True

    rows = [line.split() for line in run("nbdinfo", "--map", served.uri()).splitlines()]
    assert rows == [
        ["0", str(1 << 20), "3", "hole,zero"],
        [str(1 << 20), str(1 << 20), "0", "data"],
        [str(2 << 20), str(SIZE - (2 << 20)), "3", "hole,zero"],
    ]


def test_nbdcopy_both_ways(served: Served) -> None:
    source = served.dir / "source.img"
    with open(source, "wb") as f:
        f.truncate(SIZE)
        f.seek(5 << 20)
        f.write(os.urandom(3 << 20))
        f.seek(50 << 20)
        f.write(os.urandom(333_333))
    run("nbdcopy", str(source), served.uri())  # 4 connections (multi-conn), 64 in flight each
    assert served.image.read_bytes() == source.read_bytes()
    back = served.dir / "back.img"
    run("nbdcopy", served.uri(), str(back))
    assert back.read_bytes() == source.read_bytes()


# -- libnbd, strict mode -----------------------------------------------------------------------


def test_libnbd_opt_mode(served: Served) -> None:
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(served.uri(""))
    names: list[str] = []
    h.opt_list(lambda name, description: names.append(name) or 0)
    assert names == ["disk", "ro", "mem"]
    contexts: list[str] = []
    assert h.opt_list_meta_context(lambda ctx: contexts.append(ctx) or 0) == 1
    assert contexts == ["base:allocation"]
    h.set_export_name("ro")
    h.opt_info()
    assert h.get_size() == SIZE and h.is_read_only()
    h.set_export_name("nope")
    with pytest.raises(nbd.Error):
        h.opt_info()
    h.set_export_name("mem")
    h.opt_go()
    assert h.get_size() == 4 << 20 and not h.is_read_only()
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.shutdown()


def test_libnbd_commands(served: Served) -> None:
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(served.uri("mem"))
    assert h.get_structured_replies_negotiated()
    for can in (h.can_flush, h.can_fua, h.can_trim, h.can_zero, h.can_fast_zero, h.can_cache):
        assert can()
    assert h.can_multi_conn() and h.can_df() and not h.is_rotational()
    assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
    assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 << 20

    h.pwrite(b"\x42" * 65536, 65536, nbd.CMD_FLAG_FUA)
    assert h.pread(65536, 65536) == b"\x42" * 65536
    chunks: list[tuple[bytes, int, int]] = []
    data = h.pread_structured(
        10,
        65536 - 5,
        lambda buf, off, status, err: chunks.append((buf, off, status)) or 0,
        nbd.CMD_FLAG_DF,
    )
    assert data == bytes(5) + b"\x42" * 5
    assert chunks == [(data, 65536 - 5, nbd.READ_DATA)]  # one data chunk, as DF asks
    flushes = served.mem.flushes
    h.flush()
    assert served.mem.flushes == flushes + 1
    h.cache(4096, 0)

    seen: list[tuple[int, int, int]] = []

    def extents(metacontext: str, offset: int, entries: list[int], err: int) -> int:
        assert metacontext == "base:allocation"
        seen.extend((offset, entries[i], entries[i + 1]) for i in range(0, len(entries), 2))
        return 0

    h.block_status(4 << 20, 0, extents)
    assert [(n, f) for _, n, f in seen] == [(65536, 3), (65536, 0), ((4 << 20) - 131072, 3)]
    seen.clear()
    h.block_status(1 << 20, 4096, extents, nbd.CMD_FLAG_REQ_ONE)
    assert [(n, f) for _, n, f in seen] == [(61440, 3)]

    h.trim(4096, 65536)
    h.zero(4096, 69632, nbd.CMD_FLAG_NO_HOLE)
    h.zero(4096, 73728, nbd.CMD_FLAG_FAST_ZERO)
    assert h.pread(65536, 65536) == bytes(12288) + b"\x42" * (65536 - 12288)
    assert bytes(served.mem._data[65536:131072]) == h.pread(65536, 65536)

    with pytest.raises(nbd.Error) as e:
        h.pread(2, (4 << 20) - 1)
    assert e.value.errno == "EINVAL"
    h.shutdown()


def test_libnbd_read_only_and_out_of_range_errors(served: Served) -> None:
    h = nbd.NBD()
    h.set_strict_mode(0)  # let the requests reach the server
    h.connect_uri(served.uri("ro"))
    assert h.is_read_only() and not h.can_trim() and not h.can_zero()
    for call in (lambda: h.pwrite(b"x" * 512, 0), lambda: h.trim(512, 0), lambda: h.zero(512, 0)):
        with pytest.raises(nbd.Error) as e:
            call()
        assert e.value.errno == "EPERM"
    assert h.pread(512, 0) == bytes(512)  # the connection survived
    h.shutdown()

    h = nbd.NBD()
    h.set_strict_mode(0)
    h.connect_uri(served.uri("disk"))
    expected = [
        (lambda: h.pread(2, SIZE - 1), "EINVAL"),
        (lambda: h.pwrite(b"xy", SIZE - 1), "ENOSPC"),
        (lambda: h.trim(2, SIZE - 1), "EINVAL"),
        (lambda: h.zero(2, SIZE - 1), "ENOSPC"),
        (lambda: h.cache(2, SIZE - 1), "EINVAL"),
    ]
    for call, code in expected:
        with pytest.raises(nbd.Error) as e:
            call()
        assert e.value.errno == code
    h.pwrite(b"ok", SIZE - 2)
    assert h.pread(2, SIZE - 2) == b"ok"
    h.shutdown()


def test_libnbd_pipelined_requests(served: Served) -> None:
    h = served.handle()
    payloads = {i: os.urandom(4096 + i) for i in range(64)}
    cookies = [h.aio_pwrite(payloads[i], i * 65536) for i in range(64)]
    while h.aio_in_flight() > 0:
        h.poll(-1)
    assert all(h.aio_command_completed(c) for c in cookies)
    bufs = {i: nbd.Buffer(4096 + i) for i in range(64)}
    cookies = [h.aio_pread(bufs[i], i * 65536) for i in range(64)]
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c in cookies:
        h.aio_command_completed(c)
    assert all(bufs[i].to_bytearray() == payloads[i] for i in range(64))
    h.shutdown()


class BadSectorDevice(MemoryDevice):
    """A memory device with one unreadable 512-byte sector (reads touching it fail with
    EIO), filled with a pattern."""

    def __init__(self, size: int, bad: int) -> None:
        super().__init__(size)
        self.bad = bad
        self.write(0, bytes(range(251)) * (size // 251) + bytes(size % 251))

    def read_into(self, offset: int, buf: memoryview) -> None:
        if offset < self.bad + 512 and self.bad < offset + len(buf):
            raise IOFailure("unreadable sector", errno.EIO)
        super().read_into(offset, buf)


def test_libnbd_pipelined_reads_with_a_failing_one(served: Served) -> None:
    """One READ of a pipeline fails with EIO (a structured error chunk); the READs before
    and after it in the same batch carry their data."""
    device = BadSectorDevice(1 << 20, bad=5 * 8192)
    served.server.add_export(NBDExport("bad", lambda: device))
    image = bytes(range(251)) * ((1 << 20) // 251) + bytes((1 << 20) % 251)
    h = served.handle("bad")
    for _ in range(3):
        bufs = [nbd.Buffer(4096) for _ in range(16)]
        cookies = [h.aio_pread(buf, i * 8192) for i, buf in enumerate(bufs)]
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for i, (buf, cookie) in enumerate(zip(bufs, cookies, strict=True)):
            if i == 5:
                with pytest.raises(nbd.Error) as failed:
                    h.aio_command_completed(cookie)
                assert failed.value.args[1] == errno.EIO
            else:
                assert h.aio_command_completed(cookie)
                assert buf.to_bytearray() == image[i * 8192 : i * 8192 + 4096]
    h.shutdown()


# -- bad input ---------------------------------------------------------------------------------


def _raw(served: Served) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(served.sock)
    greeting = _recv_exact(s, 18)
    assert greeting[:16] == struct.pack(">QQ", C.NBDMAGIC, C.IHAVEOPT)
    return s


def _recv_exact(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise EOFError(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def _closed_by_server(s: socket.socket) -> bool:
    try:
        while s.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


def _go_raw(s: socket.socket, name: bytes = b"disk") -> None:
    s.sendall(struct.pack(">I", 3))
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    s.sendall(struct.pack(">QII", C.IHAVEOPT, C.NBD_OPT_GO, len(data)) + data)
    while True:
        _, _, kind, length = struct.unpack(">QIII", _recv_exact(s, 20))
        _recv_exact(s, length)
        if kind == C.NBD_REP_ACK:
            return


def _still_serving(served: Served) -> None:
    h = served.handle()
    h.pwrite(b"alive", 0)
    assert h.pread(5, 0) == b"alive"
    h.shutdown()


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"\0\0\0\x01" + b"BADMAGIC" + bytes(8), id="bad option magic"),
        pytest.param(struct.pack(">I", 0xFF), id="unknown client flags"),
        pytest.param(
            b"\0\0\0\x01" + struct.pack(">QII", C.IHAVEOPT, 7, 100) + b"trunc", id="truncated"
        ),
        pytest.param(
            b"\0\0\0\x01" + struct.pack(">QII", C.IHAVEOPT, C.NBD_OPT_EXPORT_NAME, 0xFFFFFFF0),
            id="huge export name",
        ),
    ],
)
def test_bad_handshake_closes_only_that_connection(served: Served, garbage: bytes) -> None:
    other = served.handle()
    s = _raw(served)
    s.sendall(garbage)
    s.shutdown(socket.SHUT_WR)
    assert _closed_by_server(s)
    s.close()
    _still_serving(served)
    assert other.pread(4, 0) is not None
    other.shutdown()


def test_huge_option_is_refused_and_the_handshake_goes_on(served: Served) -> None:
    s = _raw(served)
    s.sendall(struct.pack(">I", 3) + struct.pack(">QII", C.IHAVEOPT, C.NBD_OPT_INFO, 1 << 20))
    s.sendall(bytes(1 << 20))
    _, opt, kind, length = struct.unpack(">QIII", _recv_exact(s, 20))
    _recv_exact(s, length)
    assert (opt, kind) == (C.NBD_OPT_INFO, C.NBD_REP_ERR_TOO_BIG)
    s.sendall(struct.pack(">QII", C.IHAVEOPT, C.NBD_OPT_ABORT, 0))
    assert struct.unpack(">QIII", _recv_exact(s, 20))[2] == C.NBD_REP_ACK
    s.close()


def test_bad_requests(served: Served) -> None:
    s = _raw(served)
    _go_raw(s)
    simple = struct.Struct(">IIQ")
    # unknown command, request past the end: errors, and the connection carries on
    s.sendall(struct.pack(">IHHQQI", C.NBD_REQUEST_MAGIC, 0, 42, 1, 0, 512))
    assert simple.unpack(_recv_exact(s, 16)) == (C.NBD_SIMPLE_REPLY_MAGIC, 22, 1)
    s.sendall(struct.pack(">IHHQQI", C.NBD_REQUEST_MAGIC, 0, C.NBD_CMD_READ, 2, SIZE, 1))
    assert simple.unpack(_recv_exact(s, 16)) == (C.NBD_SIMPLE_REPLY_MAGIC, 22, 2)
    s.sendall(struct.pack(">IHHQQI", C.NBD_REQUEST_MAGIC, 0, C.NBD_CMD_WRITE, 3, SIZE, 4) + b"junk")
    assert simple.unpack(_recv_exact(s, 16)) == (C.NBD_SIMPLE_REPLY_MAGIC, 28, 3)
    s.sendall(struct.pack(">IHHQQI", C.NBD_REQUEST_MAGIC, 0, C.NBD_CMD_READ, 4, 0, 4))
    assert simple.unpack(_recv_exact(s, 16)) == (C.NBD_SIMPLE_REPLY_MAGIC, 0, 4)
    _recv_exact(s, 4)
    # bad request magic: the connection is dropped
    s.sendall(struct.pack(">IHHQQI", 0xDEADBEEF, 0, C.NBD_CMD_READ, 5, 0, 4))
    assert _closed_by_server(s)
    s.close()
    _still_serving(served)


def test_bad_requests_in_a_pipeline_of_reads(served: Served) -> None:
    """Refused and failing READs in one batch get their errors and the others their data
    (simple replies); a bad magic in the batch drops that connection only, after the
    replies to the requests before it."""
    device = BadSectorDevice(1 << 20, bad=3 * 4096)
    served.server.add_export(NBDExport("bad", lambda: device))
    image = bytes(range(251)) * ((1 << 20) // 251) + bytes((1 << 20) % 251)
    other = served.handle()
    s = _raw(served)
    _go_raw(s, b"bad")
    req = struct.Struct(">IHHQQI")
    read = C.NBD_CMD_READ
    magic = C.NBD_REQUEST_MAGIC
    expected: dict[int, tuple[int, bytes]] = {}  # cookie: (error, data)
    batch = b""
    for cookie in range(1, 41):
        offset, length, flags = cookie * 4096 % (1 << 20), 4096, 0
        error = 0
        if cookie == 3:  # the bad sector
            error = 5
        elif cookie == 9:  # past the end
            offset, error = (1 << 20) - 512, 22
        elif cookie == 17:  # an unknown flag
            flags, error = 0x40, 22
        elif cookie == 25:  # larger than the maximum block size
            length, error = (32 << 20) + 1, 22
        elif cookie == 30:  # a WRITE between the READs
            batch += req.pack(magic, 0, C.NBD_CMD_WRITE, cookie, 0, 4) + b"abcd"
            expected[cookie] = (0, b"")
            image = b"abcd" + image[4:]
            continue
        batch += req.pack(magic, flags, read, cookie, offset, length)
        expected[cookie] = (error, b"" if error else image[offset : offset + length])
    batch += req.pack(0xDEADBEEF, 0, read, 99, 0, 4096)  # bad magic: the end
    batch += req.pack(magic, 0, read, 100, 0, 4096)  # never answered
    s.sendall(batch)
    got: dict[int, tuple[int, bytes]] = {}
    while len(got) < len(expected):
        reply_magic, error, cookie = struct.unpack(">IIQ", _recv_exact(s, 16))
        assert reply_magic == C.NBD_SIMPLE_REPLY_MAGIC
        want_error, data = expected[cookie]
        got[cookie] = (error, _recv_exact(s, len(data)) if error == 0 else b"")
        assert got[cookie] == (want_error, data), cookie
    assert _closed_by_server(s)
    s.close()
    assert other.pread(4, 0) is not None
    other.shutdown()
    _still_serving(served)


# -- server management -------------------------------------------------------------------------


def test_remove_export_closes_its_connections(served: Served) -> None:
    mem = served.handle("mem")
    disk = served.handle("disk")
    served.server.remove_export("mem")
    with pytest.raises(nbd.Error):
        for _ in range(50):
            mem.pread(512, 0)
            time.sleep(0.05)
    assert disk.pread(512, 0) is not None
    with pytest.raises(nbd.Error):
        served.handle("mem")
    assert [e.name for e in served.server.exports()] == ["disk", "ro"]
    disk.shutdown()


def test_tcp_and_default_export(served: Served) -> None:
    port = served.server.listen_tcp("127.0.0.1", 0)
    uri = nbd_uri("", host="127.0.0.1", port=port)
    assert uri == f"nbd://127.0.0.1:{port}/"
    qemu_io(uri, "write -P 0x33 0 4k")  # the empty name selects the first export
    assert served.image.read_bytes()[:4096] == b"\x33" * 4096


# -- a thin volume -------------------------------------------------------------------------------


def test_thin_volume_with_snapshot(served: Served) -> None:
    home = Home(served.dir / "home")
    try:
        home.create_pool("p", [BackingSpec(str(served.dir / "backing"), size=256 << 20)])
        pool = home.pool("p")
        pool.create_volume("v", SIZE)
        served.server.add_export(NBDExport("v", lambda: pool.open_volume("v")))
        served.server.add_export(NBDExport("v@s", lambda: pool.open_volume("v", "s")))
        qemu_io(served.uri("v"), "write -P 0xab 0 64k", "write -P 0xcd 1M 64k")
        pool.create_snapshot("v", "s")
        qemu_io(served.uri("v"), "write -P 0xee 0 4k", "flush")
        qemu_io(served.uri("v@s"), "read -P 0xab 0 64k", "read -P 0xcd 1M 64k", read_only=True)
        qemu_io(served.uri("v"), "read -P 0xee 0 4k", "read -P 0xab 4k 60k")
        extents = json.loads(
            run("qemu-img", "map", "--output=json", "-f", "raw", served.uri("v@s"))
        )
        assert [(e["start"], e["data"]) for e in extents][:3] == [
            (0, True),
            (65536, False),
            (1 << 20, True),
        ]
        h = nbd.NBD()
        h.set_strict_mode(0)
        h.connect_uri(served.uri("v@s"))
        assert h.is_read_only()
        with pytest.raises(nbd.Error) as e:
            h.pwrite(b"x", 0)
        assert e.value.errno == "EPERM"
        h.shutdown()
        back = served.dir / "v.raw"
        run("nbdcopy", served.uri("v"), str(back))
        data = back.read_bytes()
        assert (
            data[:4096] == b"\xee" * 4096 and data[1 << 20 : (1 << 20) + 65536] == b"\xcd" * 65536
        )
        served.server.remove_export("v")
        served.server.remove_export("v@s")
    finally:
        home.close()


# -- differential: qemu-nbd on a copy of the same image -----------------------------------------


def test_same_behaviour_as_qemu_nbd(served: Served) -> None:
    qemu_io(served.uri(), "write -P 0x10 0 1M", "write -P 0x20 10M 3M")
    reference = served.dir / "ref.img"
    shutil.copyfile(served.image, reference)
    # keep the reference sparse like the original
    run("fallocate", "--dig-holes", str(reference))
    ref_sock = str(served.dir / "ref.sock")
    qnbd = subprocess.Popen(
        [
            "qemu-nbd",
            "-t",
            "-e",
            "4",
            "-f",
            "raw",
            "-x",
            "disk",
            "-k",
            ref_sock,
            "--cache=writeback",
            "--discard=unmap",
            str(reference),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            if os.path.exists(ref_sock):
                break
            time.sleep(0.05)
        ref_uri = nbd_uri("disk", unix_path=ref_sock)
        # (no TRIM: what a trimmed range reads back as is up to the server)
        ops = [
            "write -P 0x44 512 3000",
            "write -z -u 10M 1M",
            "write -P 0x55 30M 4k",
            "aio_write -P 0x66 40M 64k",
            "aio_flush",
        ]
        for uri in (served.uri(), ref_uri):
            qemu_io(uri, *ops)
        for uri in (served.uri(), ref_uri):
            qemu_io(uri, "read -P 0x44 512 3000", "read -P 0 10M 1M", "read -P 0x55 30M 4k")
        assert served.image.read_bytes() == reference.read_bytes()

        def nbdmap(uri: str) -> list[tuple[int, bool]]:
            extents = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", uri))
            merged: list[tuple[int, bool]] = []
            for e in extents:  # compare zero-ness per 64 KiB-aligned start
                if not merged or merged[-1][1] != e["zero"]:
                    merged.append((e["start"], e["zero"]))
            return merged

        assert nbdmap(served.uri()) == nbdmap(ref_uri)
        ours = json.loads(run("nbdinfo", "--json", served.uri()))["exports"][0]
        theirs = json.loads(run("nbdinfo", "--json", ref_uri))["exports"][0]
        for key in ("export-size", "contexts", "is_read_only", "can_flush", "can_trim", "can_zero"):
            assert ours[key] == theirs[key], key
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", served.uri(), ref_uri)
    finally:
        qnbd.terminate()
        qnbd.wait(10)


def test_nbdcopy_into_a_thin_volume_with_multi_conn(served: Served) -> None:
    source = served.dir / "source.img"
    with open(source, "wb") as f:
        f.truncate(SIZE)
        for offset in range(0, SIZE, 3 << 20):
            f.seek(offset + 12345)
            f.write(os.urandom(700_000))
    home = Home(served.dir / "home")
    try:
        home.create_pool("p", [BackingSpec(str(served.dir / "backing"), size=256 << 20)])
        pool = home.pool("p")
        pool.create_volume("v", SIZE)
        served.server.add_export(NBDExport("v", lambda: pool.open_volume("v")))
        # 4 connections, 64 requests in flight each, all on one engine volume
        run("nbdcopy", "--connections=4", "--requests=64", str(source), served.uri("v"))
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", served.uri("v"), str(source))
        back = served.dir / "back.img"
        run("nbdcopy", "--connections=4", served.uri("v"), str(back))
        assert back.read_bytes() == source.read_bytes()
        served.server.remove_export("v")
    finally:
        home.close()


@pytest.mark.parametrize("rw", ["randwrite", "write"])
def test_fio_nbd_engine_writes_and_verifies(served: Served, rw: str) -> None:
    out = run(
        "fio",
        "--name=verify",
        "--ioengine=nbd",
        f"--uri={served.uri('mem')}",
        f"--rw={rw}",
        "--bsrange=512-128k",
        "--size=4m",
        "--iodepth=16",
        "--verify=crc32c",
        "--do_verify=1",
        "--output-format=json",
        f"--directory={served.dir}",
        "--verify_state_save=0",
    )
    job = json.loads(out[out.index("{") :])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 4 << 20 and job["read"]["io_bytes"] == 4 << 20


def test_mutated_sessions_never_crash_a_connection(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    flags = struct.pack(">I", 3)
    name = b"mem"
    go = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, C.NBD_INFO_BLOCK_SIZE)
    meta = struct.pack(">I", len(name)) + name + struct.pack(">II", 1, 15) + b"base:allocation"
    session = (
        flags
        + struct.pack(">QII", C.IHAVEOPT, C.NBD_OPT_STRUCTURED_REPLY, 0)
        + struct.pack(">QII", C.IHAVEOPT, C.NBD_OPT_SET_META_CONTEXT, len(meta))
        + meta
        + struct.pack(">QII", C.IHAVEOPT, C.NBD_OPT_GO, len(go))
        + go
        + struct.pack(">IHHQQI", C.NBD_REQUEST_MAGIC, 0, C.NBD_CMD_WRITE, 1, 4096, 8)
        + b"12345678"
        + struct.pack(">IHHQQI", C.NBD_REQUEST_MAGIC, 0, C.NBD_CMD_READ, 2, 0, 65536)
        + struct.pack(">IHHQQI", C.NBD_REQUEST_MAGIC, 8, C.NBD_CMD_BLOCK_STATUS, 3, 0, 1 << 20)
        + struct.pack(">IHHQQI", C.NBD_REQUEST_MAGIC, 0, C.NBD_CMD_WRITE_ZEROES, 4, 0, 4096)
        + struct.pack(">IHHQQI", C.NBD_REQUEST_MAGIC, 0, C.NBD_CMD_DISC, 5, 0, 0)
    )
    rng = random.Random(1234)
    caplog.set_level("INFO", logger="storvisor.exports.nbd")
    for _ in range(60):
        data = bytearray(session)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(data))
            data[pos] = rng.randrange(256)
        s = _raw(served)
        try:
            s.sendall(bytes(data[: rng.randrange(len(data) + 1)]))
            s.shutdown(socket.SHUT_WR)
            _closed_by_server(s)
        except OSError:
            pass  # the server may close while we still send
        finally:
            s.close()
    _still_serving(served)
    crashes = [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert not crashes, crashes[0].getMessage()
