"""NBDServer's management interface: export registry, listeners, lifecycle, URIs."""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from storvisor.engine.device import BlockDevice
from storvisor.errors import Conflict, InvalidArgument, NotFound, StateError
from storvisor.exports.nbd import NBDExport, NBDServer, nbd_uri
from storvisor.testing.memory import MemoryDevice


@pytest.fixture
def short_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="nbds", dir="/tmp"))
    yield directory
    shutil.rmtree(directory)


def test_nbd_uri() -> None:
    assert nbd_uri("disk", unix_path="/run/s.sock") == "nbd+unix:///disk?socket=/run/s.sock"
    assert nbd_uri("a b", host="127.0.0.1", port=10809) == "nbd://127.0.0.1:10809/a%20b"
    assert nbd_uri("", host="::1", port=1) == "nbd://[::1]:1/"
    assert nbd_uri("x", host="localhost") == "nbd://localhost/x"
    with pytest.raises(InvalidArgument):
        nbd_uri("x")
    with pytest.raises(InvalidArgument):
        nbd_uri("x", unix_path="/s", host="h")


def test_export_registry() -> None:
    server = NBDServer()
    a = NBDExport("a", lambda: MemoryDevice(4096))
    server.add_export(a)
    with pytest.raises(Conflict):
        server.add_export(NBDExport("a", lambda: MemoryDevice(4096)))
    with pytest.raises(NotFound):
        server.remove_export("b")
    assert server.exports() == [a]
    server.remove_export("a")
    assert server.exports() == []
    server.close()
    server.close()  # idempotent


def test_listen_unix_replaces_a_stale_socket_not_a_file(short_dir: Path) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(short_dir / "s.sock"))
    stale.close()
    (short_dir / "file").write_text("not a socket")
    server = NBDServer()
    try:
        server.listen_unix(str(short_dir / "s.sock"))
        with pytest.raises(Conflict):
            server.listen_unix(str(short_dir / "file"))
        assert (short_dir / "file").read_text() == "not a socket"
    finally:
        server.close()
    assert not (short_dir / "s.sock").exists(), "close() removes the socket it created"


def test_start_twice_and_listen_after_close(short_dir: Path) -> None:
    server = NBDServer()
    server.start()
    with pytest.raises(StateError):
        server.start()
    server.close()
    with pytest.raises(StateError):
        server.listen_unix(str(short_dir / "late.sock"))


def test_devices_are_opened_per_connection_and_closed(short_dir: Path) -> None:
    opened: list[MemoryDevice] = []

    def open_device() -> BlockDevice:
        device = MemoryDevice(1 << 20)
        opened.append(device)
        return device

    server = NBDServer()
    server.add_export(NBDExport("d", open_device, description="per connection"))
    sock = str(short_dir / "s.sock")
    server.listen_unix(sock)
    server.start()  # listeners added after start are served too
    port = server.listen_tcp("127.0.0.1", 0)
    try:
        handles = []
        for uri in (nbd_uri("d", unix_path=sock), nbd_uri("d", host="127.0.0.1", port=port)):
            h = nbd.NBD()
            h.connect_uri(uri)
            h.pwrite(b"hello", 0)
            handles.append(h)
        assert len(opened) == 2 and not any(d.closed for d in opened)
        handles[0].shutdown()
        for _ in range(100):
            if opened[0].closed:
                break
            threading.Event().wait(0.02)
        assert opened[0].closed and not opened[1].closed
    finally:
        server.close()
    assert all(d.closed for d in opened), "close() ends every connection and closes its device"


def test_open_failure_is_an_option_error(short_dir: Path) -> None:
    def broken() -> BlockDevice:
        raise NotFound("volume vanished")

    server = NBDServer()
    server.add_export(NBDExport("gone", broken))
    server.add_export(NBDExport("ok", lambda: MemoryDevice(4096)))
    sock = str(short_dir / "s.sock")
    server.listen_unix(sock)
    server.start()
    try:
        h = nbd.NBD()
        h.set_opt_mode(True)
        h.connect_uri(nbd_uri("gone", unix_path=sock))
        with pytest.raises(nbd.Error):
            h.opt_go()
        h.set_export_name("ok")  # the handshake goes on
        h.opt_go()
        assert h.get_size() == 4096
        h.shutdown()
    finally:
        server.close()


def test_read_only_device_makes_a_read_only_export(short_dir: Path) -> None:
    server = NBDServer()
    server.add_export(NBDExport("r", lambda: MemoryDevice(4096, read_only=True)))
    sock = str(short_dir / "s.sock")
    server.listen_unix(sock)
    server.start()
    try:
        h = nbd.NBD()
        h.connect_uri(nbd_uri("r", unix_path=sock))
        assert h.is_read_only() and not h.can_trim() and h.can_multi_conn()
        h.shutdown()
    finally:
        server.close()


def test_close_leaves_no_thread_behind(short_dir: Path) -> None:
    before = set(threading.enumerate())
    server = NBDServer()
    server.add_export(NBDExport("d", lambda: MemoryDevice(1 << 20)))
    sock = str(short_dir / "s.sock")
    server.listen_unix(sock)
    server.start()
    handles = []
    for _ in range(3):
        h = nbd.NBD()
        h.connect_uri(nbd_uri("d", unix_path=sock))
        h.pread(4096, 0)
        handles.append(h)
    idle = socket.socket(socket.AF_UNIX)  # a client stuck in the handshake
    idle.connect(sock)
    server.close()
    idle.close()
    leftover = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not leftover, leftover
    with pytest.raises(nbd.Error):
        handles[0].pread(4096, 0)


def test_pipelined_small_and_large_reads_and_writes(short_dir: Path) -> None:
    """Batches of small replies are sent by the receiving thread and batches carrying much
    READ data by the sending thread; mixed in one pipeline, every reply still carries its
    own request's data and every write lands."""
    half = 4 << 20
    device = MemoryDevice(2 * half)
    image = bytearray(bytes(range(251)) * (2 * half // 251 + 1))[: 2 * half]
    device.write(0, image)
    server = NBDServer()
    server.add_export(NBDExport("d", lambda: device))
    sock = str(short_dir / "s.sock")
    server.listen_unix(sock)
    server.start()
    try:
        h = nbd.NBD()
        h.connect_uri(nbd_uri("d", unix_path=sock))
        for round_ in range(4):
            reads: list[tuple[int, nbd.Buffer]] = []
            for i in range(96):
                if i % 7 == 3:  # writes go to the second half, reads to the first
                    offset = half + (i * 36864 + round_ * 512) % (half - 4096)
                    data = bytes([i + round_]) * 4096
                    h.aio_pwrite(data, offset)
                    image[offset : offset + 4096] = data
                    continue
                length = (1 << 20) if i % 24 == 5 else 4096 * (1 + i % 3)
                offset = (i * 69632 + round_ * 4096) % (half - length)
                buf = nbd.Buffer(length)
                reads.append((offset, buf))
                h.aio_pread(buf, offset)
            while h.aio_in_flight() > 0:
                h.poll(-1)
            for offset, buf in reads:
                got = buf.to_bytearray()
                assert got == image[offset : offset + len(got)]
        assert h.pread(2 * half, 0) == image
        h.shutdown()
    finally:
        server.close()


class UncheckedDevice(MemoryDevice):
    """A device that does no bounds check of its own: a READ past its end returns 0xAA bytes
    instead of failing. Only the codec's check can refuse such a READ."""

    def read_into(self, offset: int, buf: memoryview) -> None:
        inside = self._data[offset : offset + len(buf)] if offset < self.size else b""
        buf[: len(inside)] = inside
        buf[len(inside) :] = b"\xaa" * (len(buf) - len(inside))


def test_codec_refuses_reads_past_the_end_on_the_wire(short_dir: Path) -> None:
    """ "The server MUST NOT send data past the end" (NBD spec, NBD_CMD_READ): a READ that
    ends past the export's size gets EINVAL from the codec itself, on its fast path (a
    pipeline of READs) and on the general one (a zero-length READ), through a device that
    would answer it; the connection goes on serving."""
    size = 1 << 20
    device = UncheckedDevice(size)
    device.write(size - 4096, b"e" * 4096)
    server = NBDServer()
    server.add_export(NBDExport("d", lambda: device))
    sock = str(short_dir / "s.sock")
    server.listen_unix(sock)
    server.start()
    try:
        h = nbd.NBD()
        h.set_strict_mode(h.get_strict_mode() & ~(nbd.STRICT_BOUNDS | nbd.STRICT_ZERO_SIZE))
        h.connect_uri(nbd_uri("d", unix_path=sock))
        assert h.get_size() == size
        for offset, length in ((size - 512, 1024), (size, 512), (size + 4096, 0)):
            with pytest.raises(nbd.Error) as refused:
                h.pread(length, offset)
            assert refused.value.errno == "EINVAL", (offset, length, refused.value)
        assert h.pread(4096, size - 4096) == b"e" * 4096
        h.shutdown()
    finally:
        server.close()
