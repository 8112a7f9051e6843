"""The block-device conformance suite run through the vhost-user-blk export and the Python
front-end (a real client), over an in-memory device and over a thin volume."""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from storvisor.engine.device import BlockDevice
from storvisor.engine.home import Home
from storvisor.engine.types import BackingSpec
from storvisor.exports.vhost_user_blk import VhostUserBlkServer
from storvisor.protocols.virtio.blk import Status
from storvisor.testing.conformance import check_block_device
from storvisor.testing.memory import MemoryDevice
from storvisor.testing.vhost_frontend import FrontendBlockDevice, VhostUserFrontend


@pytest.fixture
def sockdir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="vub-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _through_export(device: BlockDevice, sock: str, queues: int = 1) -> FrontendBlockDevice:
    server = VhostUserBlkServer(device, sock, num_queues=queues)
    server.start()
    frontend = VhostUserFrontend(sock, num_queues=queues, queue_size=64)
    frontend.setup()

    def stop() -> None:
        server.close()
        device.close()

    return FrontendBlockDevice(frontend, on_close=stop)


def test_memory_device_through_vhost_conforms(sockdir: str) -> None:
    counter = itertools.count()
    check_block_device(
        lambda size: _through_export(MemoryDevice(size), f"{sockdir}/m{next(counter)}.sock")
    )


def test_thin_volume_through_vhost_conforms(tmp_path: Path, sockdir: str) -> None:
    with Home(tmp_path / "home") as home:
        home.create_pool("p", [BackingSpec(str(tmp_path / "backing.img"), size=256 << 20)])
        pool = home.pool("p")
        counter = itertools.count()

        def make(size: int) -> FrontendBlockDevice:
            n = next(counter)
            pool.create_volume(f"v{n}", size)
            return _through_export(pool.open_volume(f"v{n}"), f"{sockdir}/t{n}.sock")

        check_block_device(make)


def test_thin_volume_two_queues_data_lands_in_the_volume(tmp_path: Path, sockdir: str) -> None:
    with Home(tmp_path / "home") as home:
        home.create_pool("p", [BackingSpec(str(tmp_path / "backing.img"), size=64 << 20)])
        pool = home.pool("p")
        pool.create_volume("v", 8 << 20)
        volume = pool.open_volume("v")
        server = VhostUserBlkServer(volume, f"{sockdir}/v.sock", num_queues=2, serial="v")
        server.start()
        try:
            with VhostUserFrontend(f"{sockdir}/v.sock", num_queues=2) as fe:
                fe.setup()
                for i in range(64):
                    data = bytes([i]) * 65536
                    assert fe.blk.write(65536 * i, data, queue=i % 2, segments=4) == Status.OK
                assert fe.blk.flush() == Status.OK
                assert fe.blk.discard([(0, 128, 0)]) == Status.OK
        finally:
            server.close()
        buf = bytearray(8 << 20)
        volume.read_into(0, memoryview(buf))
        volume.close()
        assert buf[:65536] == bytes(65536)
        for i in range(1, 64):
            assert buf[65536 * i : 65536 * (i + 1)] == bytes([i]) * 65536
