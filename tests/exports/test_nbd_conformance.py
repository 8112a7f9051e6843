"""The block-device conformance suite through the NBD export: a ``BlockDevice`` that is a
libnbd client of storvisor's server must pass the same contract as the device it serves."""

from __future__ import annotations

import errno
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from storvisor.engine.device import BlockDevice, Buffer, Extent, FileDevice
from storvisor.engine.home import Home
from storvisor.engine.types import BackingSpec
from storvisor.errors import IOFailure
from storvisor.exports.nbd import NBDExport, NBDServer, nbd_uri
from storvisor.testing.conformance import check_block_device
from storvisor.testing.memory import MemoryDevice


class NBDClientDevice:
    """A ``BlockDevice`` over an NBD connection (libnbd, strict mode off so that the server's
    own checks are what the contract sees)."""

    def __init__(self, uri: str) -> None:
        self._h = nbd.NBD()
        self._h.set_strict_mode(0)
        self._h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        self._h.connect_uri(uri)

    def _call(self, func: object, *args: object) -> object:
        try:
            return func(*args)  # type: ignore[operator]
        except nbd.Error as e:
            code = getattr(errno, e.errno, errno.EIO) if isinstance(e.errno, str) else e.errno
            raise IOFailure(str(e), code) from e

    @property
    def size(self) -> int:
        return int(self._h.get_size())

    @property
    def read_only(self) -> bool:
        return bool(self._h.is_read_only())

    @property
    def block_size(self) -> int:
        return max(512, int(self._h.get_block_size(nbd.SIZE_PREFERRED)))

    def read_into(self, offset: int, buf: memoryview) -> None:
        if len(buf) == 0 and offset <= self.size:
            return
        buf[:] = self._call(self._h.pread, len(buf), offset)  # type: ignore[index]

    def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        if len(data) == 0:
            return
        self._call(self._h.pwrite, bytes(data), offset, nbd.CMD_FLAG_FUA if fua else 0)

    def flush(self) -> None:
        self._call(self._h.flush)

    def discard(self, offset: int, length: int) -> None:
        if length:
            self._call(self._h.trim, length, offset)

    def write_zeroes(
        self, offset: int, length: int, *, may_unmap: bool = True, fua: bool = False
    ) -> None:
        flags = (0 if may_unmap else nbd.CMD_FLAG_NO_HOLE) | (nbd.CMD_FLAG_FUA if fua else 0)
        if length:
            self._call(self._h.zero, length, offset, flags)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        extents: list[Extent] = []
        end = offset + length
        pos = offset

        def callback(context: str, start: int, entries: list[int], err: int) -> int:
            nonlocal pos
            for i in range(0, len(entries), 2):
                n = min(entries[i], end - pos)
                if n > 0:
                    flags = entries[i + 1]
                    extents.append(Extent(pos, n, allocated=not flags & 1, zero=bool(flags & 2)))
                    pos += n
            return 0

        while pos < end:
            self._call(self._h.block_status, end - pos, pos, callback)
        return extents

    def close(self) -> None:
        self._h.shutdown()


@pytest.fixture
def server() -> Iterator[tuple[NBDServer, Path]]:
    directory = Path(tempfile.mkdtemp(prefix="nbdc", dir="/tmp"))
    s = NBDServer()
    s.listen_unix(str(directory / "s.sock"))
    s.start()
    yield s, directory
    s.close()
    shutil.rmtree(directory)


def _maker(server: NBDServer, sock: str, backend: object) -> object:
    counter = iter(range(1000))

    def make(size: int) -> BlockDevice:
        name = f"e{next(counter)}"
        device = backend(name, size)  # type: ignore[operator]
        server.add_export(NBDExport(name, lambda: device))
        return NBDClientDevice(nbd_uri(name, unix_path=sock))

    return make


def test_memory_device_through_nbd(server: tuple[NBDServer, Path]) -> None:
    s, directory = server
    check_block_device(_maker(s, str(directory / "s.sock"), lambda n, size: MemoryDevice(size)))  # type: ignore[arg-type]


def test_file_device_through_nbd(server: tuple[NBDServer, Path]) -> None:
    s, directory = server

    def backend(name: str, size: int) -> BlockDevice:
        path = directory / f"{name}.img"
        with open(path, "wb") as f:
            f.truncate(size)
        return FileDevice(str(path))

    check_block_device(_maker(s, str(directory / "s.sock"), backend))  # type: ignore[arg-type]


def test_thin_volume_through_nbd(server: tuple[NBDServer, Path]) -> None:
    s, directory = server
    home = Home(directory / "home")
    try:
        home.create_pool("p", [BackingSpec(str(directory / "backing"), size=128 << 20)])
        pool = home.pool("p")

        def backend(name: str, size: int) -> BlockDevice:
            pool.create_volume(name, size)
            return pool.open_volume(name)

        check_block_device(_maker(s, str(directory / "s.sock"), backend))  # type: ignore[arg-type]
    finally:
        s.close()
        home.close()
