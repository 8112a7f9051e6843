"""vhost-user-blk exports on a fixed set of data-plane processes (``DataPlanes``,
``exports/nbd_worker.py``; ``VhostDataPlane``, ``exports/vhost_worker.py``): many exports in
few processes, queues placed on the least loaded one, a stalled volume that does not stall
its neighbours in the same process, a killed process whose exports alone reconnect, and one
QoS limit for a volume whose queues run in two processes."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from powercuts import require_fuse
from storvisor.engine.home import Home
from storvisor.engine.pool import Pool
from storvisor.engine.qos import QosBlock, QosSpec
from storvisor.engine.types import BackingSpec
from storvisor.engine.volume import Volume
from storvisor.exports.nbd_worker import DataPlanes
from storvisor.exports.vhost_worker import VhostDataPlane
from storvisor.protocols.vhost_user import inflight as infl
from storvisor.protocols.virtio.blk import RequestType, Status
from storvisor.testing import procs
from storvisor.testing.faultfs import Fault, FaultMount
from storvisor.testing.vhost_frontend import VhostUserFrontend

MiB = 1 << 20
CS = 64 << 10


class Exports:
    """Exports of one pool's volumes on one ``DataPlanes``; closes what it opened."""

    def __init__(self, planes: DataPlanes, sockdir: Path) -> None:
        self.planes = planes
        self.sockdir = sockdir
        self.live: dict[str, tuple[VhostDataPlane, Volume]] = {}

    def add(self, pool: Pool, name: str, *, queues: int = 1, size: int = 16 * MiB,
            qos: QosBlock | None = None) -> VhostDataPlane:  # fmt: skip
        if name not in {v.name for v in pool.volumes()}:
            pool.create_volume(name, size)
        volume = pool.open_volume(name)
        export = VhostDataPlane(
            volume,
            str(self.sockdir / f"{pool.name}-{name}.sock"),
            num_queues=queues,
            qos=qos,
            planes=self.planes,
        )
        try:
            export.start()
        except BaseException:
            volume.close()
            raise
        self.live[f"{pool.name}/{name}"] = (export, volume)
        return export

    def remove(self, key: str) -> None:
        export, volume = self.live.pop(key)
        try:
            export.close()
        finally:
            volume.close()

    def close(self) -> None:
        for key in list(self.live):
            self.remove(key)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="planes-", dir="/tmp"))  # short socket paths
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _planes(processes: int) -> DataPlanes:
    planes = DataPlanes(processes=processes)
    planes.start()
    return planes


def pattern(key: str) -> bytes:
    return (key.encode() * 4096)[:4096]


def _wait(predicate, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_many_exports_share_few_processes_placed_by_load(pool: Pool, sockdir: Path) -> None:
    planes = _planes(2)
    exports = Exports(planes, sockdir)
    try:
        for i in range(12):
            exports.add(pool, f"v{i}")
        wide = exports.add(pool, "wide", queues=4)
        # 16 queues on two processes, nothing else started: 8 each, the 4-queue export's two
        # slots in distinct processes
        assert planes.loads() == [8, 8]
        assert sorted(planes.pids) == sorted(
            {pid for e, _ in exports.live.values() for pid in e.pids}
        )
        assert len(set(wide.pids)) == 2
        assert procs.data_planes(os.getpid()) == sorted(planes.pids)
        for key in ("p/v0", "p/v7", "p/wide"):
            export = exports.live[key][0]
            with VhostUserFrontend(
                export.socket_path, queue_size=16, num_queues=export.num_queues
            ) as fe:
                fe.setup()
                assert fe.blk.write(CS, pattern(key)) == Status.OK  # allocates
                assert (
                    fe.blk.write(CS + 4096, b"\x5a" * 4096, queue=export.num_queues - 1)
                    == Status.OK
                )
                status, data = fe.blk.read(CS, 8192)
                assert status == Status.OK
                assert data == pattern(key) + b"\x5a" * 4096

        # exports that go free their process's load; new queues go where the load is least
        first = planes.pids[0]
        gone = [k for k, (e, _) in exports.live.items() if e.pids == [first]][:3]
        assert len(gone) == 3
        for key in gone:
            exports.remove(key)
        assert planes.loads() == [5, 8]
        fresh = [exports.add(pool, f"n{i}") for i in range(3)]
        assert [e.pids for e in fresh] == [[first]] * 3
        assert planes.loads() == [8, 8]
    finally:
        exports.close()
        planes.close()


def test_a_stalled_volume_does_not_stall_its_neighbours(sockdir: Path) -> None:
    require_fuse()
    top = Path(tempfile.mkdtemp(prefix="planes-stall-", dir="/tmp"))
    (top / "backing").mkdir()
    (top / "mnt").mkdir()
    mount = FaultMount(top / "backing", top / "mnt")
    home = Home(top / "home")
    planes = _planes(1)  # every export in one process
    exports = Exports(planes, sockdir)
    try:
        home.create_pool("f", [BackingSpec(str(top / "mnt" / "f.img"), 64 * MiB)], CS)
        home.create_pool("g", [BackingSpec(str(top / "g.img"), 64 * MiB)], CS)
        stalled = exports.add(home.pool("f"), "a")
        neighbour = exports.add(home.pool("g"), "b")
        assert stalled.pids == neighbour.pids
        with (
            VhostUserFrontend(stalled.socket_path, queue_size=16, timeout=60) as fa,
            VhostUserFrontend(neighbour.socket_path, queue_size=16) as fb,
        ):
            fa.setup()
            fb.setup()
            assert fa.blk.write(0, b"\xaa" * CS) == Status.OK
            assert fb.blk.write(0, b"\xbb" * CS) == Status.OK
            mount.set(Fault("read", "stall", 0, None, 120.0))
            held: list[tuple[int, bytes]] = []
            reader = threading.Thread(target=lambda: held.append(fa.blk.read(0, 4096)))
            reader.start()
            _wait(lambda: mount.hits().get("read", 0) >= 1)  # the read is held in the plane

            # the neighbour's reads, in-place writes, allocations and flushes go on
            start = time.monotonic()
            for i in range(200):
                assert fb.blk.write(i % 16 * 4096, bytes([i]) * 4096) == Status.OK
                assert fb.blk.read(i % 16 * 4096, 4096) == (Status.OK, bytes([i]) * 4096)
            assert fb.blk.write(5 * CS, b"\xcc" * 4096) == Status.OK
            assert fb.blk.flush() == Status.OK  # a flush of its own pool
            assert reader.is_alive() and not held, "the stalled read was not held"

            # removing the stalled export does not hold the process either: another export
            # is added and served meanwhile
            removing = threading.Thread(target=exports.remove, args=("f/a",))
            removing.start()
            late = exports.add(home.pool("g"), "c")
            assert late.pids == neighbour.pids
            with VhostUserFrontend(late.socket_path, queue_size=16) as fc:
                fc.setup()
                assert fc.blk.write(0, b"\xdd" * 4096) == Status.OK
                assert fc.blk.read(0, 4096) == (Status.OK, b"\xdd" * 4096)
            assert fb.blk.read(5 * CS, 4096) == (Status.OK, b"\xcc" * 4096)
            assert time.monotonic() - start < 30
            assert reader.is_alive() and not held

            mount.clear()
            reader.join(60)
            removing.join(60)
            assert not reader.is_alive() and not removing.is_alive()
    finally:
        mount.clear()
        exports.close()
        planes.close()
        try:
            home.close()
        finally:
            mount.close()
            shutil.rmtree(top, ignore_errors=True)


def test_a_killed_plane_restarts_and_only_its_exports_reconnect(pool: Pool, sockdir: Path) -> None:
    planes = _planes(2)
    exports = Exports(planes, sockdir)
    slow = QosBlock()  # holds x's requests in flight when its process is killed
    try:
        x = exports.add(pool, "x", qos=slow)
        y = exports.add(pool, "y")
        z = exports.add(pool, "z", queues=2)  # a slot in each process
        assert x.pids != y.pids and len(set(z.pids)) == 2
        y_keys = y.slot_keys
        with (
            VhostUserFrontend(x.socket_path, queue_size=16, inflight=True) as fx,
            VhostUserFrontend(y.socket_path, queue_size=16, inflight=True) as fy,
            VhostUserFrontend(z.socket_path, queue_size=16, num_queues=2, inflight=True) as fz,
        ):
            for fe in (fx, fy, fz):
                fe.setup()
                assert fe.blk.write(0, b"\x11" * CS) == Status.OK
            slow.set_limits(QosSpec.parse({"write_iops_sec": 1}).limits(16 * MiB))
            heads = [
                fx.blk.submit(RequestType.OUT, (CS + i * 4096) >> 9, out=bytes([i + 1]) * 4096)
                for i in range(4)
            ]
            q = fx.queues[0]
            # one write passes, the rest are held by QoS (a token a second: under load, more)
            _wait(lambda: 1 <= q.used_idx() < 4 and _inflight(fx))
            victim = x.pids[0]
            os.kill(victim, signal.SIGKILL)
            # the other process's export is served all along
            for i in range(50):
                assert fy.blk.write(4096, bytes([i]) * 4096) == Status.OK
                assert fy.blk.read(4096, 4096) == (Status.OK, bytes([i]) * 4096)
            _wait(lambda: x.starts == 2 and z.starts == 2)
            assert victim not in planes.pids and len(planes.pids) == 2
            assert planes.restarts == 1
            assert y.starts == 1 and y.slot_keys == y_keys  # never placed again
            slow.set_limits(QosSpec.parse({}).limits(16 * MiB))
            for fe in (fx, fz):
                fe.reconnect()
            # what was in flight in the killed process is resubmitted, each completes once
            for head, _, status in heads:
                assert fx.blk.wait(0, head) == 1
                assert fx.memory.read(status, 1)[0] == Status.OK
            assert _inflight(fx) == []
            for i in range(4):
                assert fx.blk.read(CS + i * 4096, 4096) == (Status.OK, bytes([i + 1]) * 4096)
            for fe in (fx, fz):
                assert fe.blk.read(0, 4096) == (Status.OK, b"\x11" * 4096)
                assert fe.blk.write(8192, b"\x22" * 4096, queue=fe.num_queues - 1) == Status.OK
                assert fe.blk.read(8192, 4096) == (Status.OK, b"\x22" * 4096)
            assert fy.blk.read(0, 4096) == (Status.OK, b"\x11" * 4096)
    finally:
        exports.close()
        planes.close()
        slow.close()


def _inflight(fe: VhostUserFrontend) -> list[int]:
    """The heads queue 0's inflight buffer records as in flight."""
    assert fe.inflight_fd is not None
    raw = os.pread(fe.inflight_fd, fe.inflight_size, 0)
    header = infl.QUEUE_HEADER.size
    return [h for h in range(fe.queue_size) if raw[header + infl.DESC_STATE_SPLIT.size * h]]


def test_qos_is_one_limit_for_queues_in_two_processes(pool: Pool, sockdir: Path) -> None:
    planes = _planes(2)
    exports = Exports(planes, sockdir)
    qos = QosBlock()
    qos.set_limits(QosSpec.parse({"total_iops_sec": 50}).limits(16 * MiB))
    try:
        export = exports.add(pool, "q", queues=2, qos=qos)
        assert len(set(export.pids)) == 2
        with VhostUserFrontend(export.socket_path, queue_size=16, num_queues=2) as fe:
            fe.setup()
            assert fe.blk.write(0, b"\x01" * CS) == Status.OK
            start = time.monotonic()
            for i in range(60):  # alternating queues: each process does every other request
                assert fe.blk.read(i % 16 * 4096, 4096, queue=i % 2)[0] == Status.OK
            elapsed = time.monotonic() - start
        # 61 requests at 50/s: at least 60/50 s less the 10 ms each slot may be late; two
        # processes with a limit each would take half that
        assert elapsed >= 60 / 50 - 0.1, elapsed
        assert elapsed < 60 / 50 * 3, elapsed
    finally:
        exports.close()
        planes.close()
        qos.close()
