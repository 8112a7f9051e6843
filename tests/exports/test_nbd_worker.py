"""NBD worker processes (``exports/nbd_worker.py``) driven directly: what the daemon tells a
worker over the control link (exports, their descriptions and read-only flags, a client
socket, the answer to an open, failures included) reaches a real NBD client."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from storvisor.engine.device import BlockDevice
from storvisor.engine.pool import Pool
from storvisor.errors import NotFound
from storvisor.exports.nbd_worker import DataPlanes

nbd = pytest.importorskip("nbd")


@pytest.fixture
def planes() -> Iterator[DataPlanes]:
    planes = DataPlanes(processes=1)
    planes.start()
    try:
        yield planes
    finally:
        planes.close()


def connect(planes: DataPlanes, name: str) -> nbd.NBD:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    assert planes.hand_over(theirs)
    handle = nbd.NBD()
    handle.set_export_name(name)
    handle.set_full_info(True)
    handle.connect_socket(ours.detach())
    return handle


def test_exports_reach_clients_through_a_worker(pool: Pool, planes: DataPlanes) -> None:
    pool.create_volume("v", 1 << 20)
    writer = pool.open_volume("v")
    writer.write(4096, b"\xab" * 4096)
    writer.flush()
    writer.close()

    def missing() -> BlockDevice:
        raise NotFound("volume p/gone does not exist")

    planes.add_export("v", lambda: pool.open_volume("v"), "données \u2713", read_only=True)
    planes.add_export("rw", lambda: pool.open_volume("v"), "", read_only=False)
    planes.add_export("gone", missing, "", read_only=False)

    ro = connect(planes, "v")
    assert ro.get_export_description() == "données \u2713"
    assert ro.is_read_only()
    assert ro.get_size() == 1 << 20
    assert ro.pread(8192, 0) == bytes(4096) + b"\xab" * 4096

    rw = connect(planes, "rw")
    assert not rw.is_read_only()
    rw.pwrite(b"\xcd" * 65536, 65536)  # allocating: done by the daemon's pool
    rw.flush()
    assert ro.pread(4096, 65536) == b"\xcd" * 4096
    ro.shutdown()
    rw.shutdown()

    with pytest.raises(nbd.Error):
        connect(planes, "gone")
    planes.remove_export("v")
    with pytest.raises(nbd.Error):
        connect(planes, "v")
    still = connect(planes, "rw")  # the worker serves on after refusals
    assert still.pread(512, 65536) == b"\xcd" * 512
    still.shutdown()
    assert pool.fsck().clean
