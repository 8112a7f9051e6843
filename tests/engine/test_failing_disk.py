"""A failing backing device fails requests, never the process, the metadata or other pools.

Pool ``f`` lives on ``storvisor.testing.faultfs`` (a FUSE file that fails or stalls reads,
writes and syncs on demand), pool ``g`` on a plain file. Faults are switched on and off
under the engine, an NBD client (libnbd) and the vhost-user-blk front-end: the affected
request fails with the device's errno, ``f`` degrades with the reason and counts the
failure, ``g`` keeps serving, a failed sync fails every later flush until ``reopen_pool``
(fsyncgate), a stalled sync fails its flush after the pool's I/O timeout, a stalled read or
write fails after the pool's data timeout (off by default). Once the fault
clears, the content matches a model (a failed write leaves its range either old or new,
sector by sector; anything else exactly as written) and fsck is clean.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from powercuts import require_fuse
from prereq import require_module
from storvisor.api.service import Service
from storvisor.engine.home import Home
from storvisor.engine.pool import Pool
from storvisor.engine.types import BackingSpec, PoolState
from storvisor.engine.volume import Volume
from storvisor.errors import IOFailure, NotFound
from storvisor.testing.crashkit import EngineWriter, History, Workload, check_home, run_workload
from storvisor.testing.crashkit.log import COMPLETES, ISSUES
from storvisor.testing.faultfs import Fault, FaultMount

CS = 64 << 10
VOL = 1 << 20
DATA = CS  # the first byte of the backing file after its header: every data cluster
SECTOR = 512
ERRNOS = {"eio": errno.EIO, "enospc": errno.ENOSPC}


@dataclass
class Model:
    """What a volume must read as: ``data``, except sectors in ``either`` (sector -> old
    bytes of a failed write's range), which may also read as those."""

    data: bytearray = field(default_factory=lambda: bytearray(VOL))
    either: dict[int, bytes] = field(default_factory=dict)

    def wrote(self, offset: int, payload: bytes) -> None:
        self.data[offset : offset + len(payload)] = payload
        for s in range(offset // SECTOR, (offset + len(payload)) // SECTOR):
            self.either.pop(s, None)

    def failed(self, offset: int, payload: bytes) -> None:
        """A write of ``payload`` failed: each sector is old or new."""
        for s in range(offset // SECTOR, (offset + len(payload)) // SECTOR):
            old = bytes(self.data[s * SECTOR : (s + 1) * SECTOR])
            self.either.setdefault(s, old)
        self.data[offset : offset + len(payload)] = payload

    def check(self, content: bytes) -> None:
        assert len(content) == VOL
        bad = []
        for s in range(VOL // SECTOR):
            got = content[s * SECTOR : (s + 1) * SECTOR]
            if got != self.data[s * SECTOR : (s + 1) * SECTOR] and got != self.either.get(s):
                bad.append(s)
        assert not bad, f"sectors differing from the model: {bad[:10]}"


@dataclass
class Rig:
    mount: FaultMount
    home: Home
    f: Pool
    g: Pool

    def read(self, pool: Pool, name: str = "v") -> bytes:
        with contextlib.closing(pool.open_volume(name)) as vol:
            return _read(vol, 0, VOL)

    def settle(self, model: Model) -> None:
        """After the fault cleared: reopen ``f``; the content matches ``model``, fsck is
        clean for both pools, and both pools are online."""
        self.mount.clear()
        info = self.home.reopen_pool("f")
        assert (info.state, info.reason) == (PoolState.ONLINE, "")
        model.check(self.read(self.f))
        assert self.f.fsck().clean and self.g.fsck().clean


@pytest.fixture
def rig() -> Iterator[Rig]:
    require_fuse()
    top = Path(tempfile.mkdtemp(prefix="faildisk-", dir="/tmp"))
    (top / "backing").mkdir()
    (top / "mnt").mkdir()
    mount = FaultMount(top / "backing", top / "mnt")
    home = Home(top / "home")
    try:
        home.create_pool("f", [BackingSpec(str(top / "mnt" / "f.img"), 16 << 20)], CS)
        home.create_pool("g", [BackingSpec(str(top / "g.img"), 16 << 20)], CS)
        f, g = home.pool("f"), home.pool("g")
        f.create_volume("v", VOL)
        g.create_volume("v", VOL)
        yield Rig(mount, home, f, g)
    finally:
        mount.clear()
        try:
            home.close()
        finally:
            mount.close()
            shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def vol(rig: Rig) -> Iterator[Volume]:
    """Pool ``f``'s volume ``v``, open (closed before the rig)."""
    volume = rig.f.open_volume("v")
    yield volume
    volume.close()


def _payload(seed: int, n: int) -> bytes:
    return bytes((i * 31 + seed) & 0xFF for i in range(256)) * (n // 256)


def _degraded(pool: Pool, what: str) -> None:
    info = pool.info()
    assert info.state is PoolState.DEGRADED, info
    assert what in info.reason, info.reason


def _other_pool_serves(rig: Rig, seed: int) -> None:
    vol = rig.g.open_volume("v")
    try:
        data = _payload(seed, 8192)
        vol.write(3 * CS, data)
        vol.flush()
        buf = bytearray(8192)
        vol.read_into(3 * CS, memoryview(buf))
        assert bytes(buf) == data
    finally:
        vol.close()
    assert rig.g.info().state is PoolState.ONLINE


def _eventually(done: Callable[[], bool], what: str, seconds: float = 10.0) -> None:
    """Poll ``done`` until it is true; ``what`` fails the test after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def _reopen_once_released(rig: Rig) -> None:
    """Clear the faults and reopen ``f`` once its stalled requests have returned."""
    rig.mount.clear()

    def reopened() -> bool:
        try:
            rig.home.reopen_pool("f")
        except IOFailure as e:
            assert "still stalled" in str(e), e
            return False
        return True

    _eventually(reopened, "the released request never completed")


def _times_out(call: Callable[[], object]) -> None:
    """``call`` fails with ETIMEDOUT after the pool's 0.5 s timeout, long before the
    stall (30 s) ends."""
    start = time.monotonic()
    with pytest.raises(IOFailure) as e:
        call()
    took = time.monotonic() - start
    assert e.value.errno == errno.ETIMEDOUT
    assert 0.5 <= took < 5, took


class _Calls:
    """Calls run in threads, each one's outcome kept."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def start(self, call: Callable[[], object]) -> threading.Thread:
        def run() -> None:
            try:
                call()
            except BaseException as e:
                self.errors.append(e)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.threads.append(thread)
        return thread

    def join(self) -> None:
        for thread in self.threads:
            thread.join(10)
            assert not thread.is_alive(), "a call never returned once the stall was released"
        assert not self.errors, self.errors


def _answers_within(call: Callable[[], object], what: str, seconds: float = 5.0) -> None:
    """Run ``call`` in a thread: it must return within ``seconds``, without error."""
    calls = _Calls()
    calls.start(call).join(seconds)
    assert not calls.threads[0].is_alive(), f"{what} was held up by a wait for the stalled read"
    assert not calls.errors, calls.errors


def _read(vol: Volume, offset: int, n: int) -> bytes:
    buf = bytearray(n)
    vol.read_into(offset, memoryview(buf))
    return bytes(buf)


def _stall_a_read(
    rig: Rig,
    vol: Volume,
    calls: _Calls,
    offset: int = 0,
    device: tuple[int, int | None] = (DATA, None),
) -> list[bytes]:
    """Stall the reads of ``f``'s ``device`` range (all its data by default) and read 4 KiB
    of ``vol`` at ``offset`` in a thread (one of ``calls``); return once the read is in the
    file system, with the list the read's bytes are appended to once released."""
    rig.mount.set(Fault("read", "stall", *device, seconds=30))
    got: list[bytes] = []
    calls.start(lambda: got.append(_read(vol, offset, 4096)))
    _eventually(lambda: rig.mount.hits()["read"] >= 1, "the read never reached the device")
    return got


def _count_waits(vol: Volume) -> list[None]:
    """A list that grows by one each time a freezer of ``vol`` starts waiting for the I/O
    in flight (the gate's ``on_wait`` seam)."""
    waits: list[None] = []
    vol._state.gate.on_wait = lambda: waits.append(None)
    return waits


def _waiting(waits: list[None], count: int, *snapshots: threading.Thread) -> None:
    """Return once ``count`` freezers wait; ``snapshots`` must all still be running."""
    _eventually(lambda: len(waits) >= count, "a snapshot did not wait for the read in flight")
    assert all(s.is_alive() for s in snapshots), "a snapshot did not wait for the read"


@pytest.mark.parametrize("action", ["eio", "enospc"])
def test_a_failed_write_fails_that_request_and_maps_nothing(
    rig: Rig, vol: Volume, action: str, caplog: pytest.LogCaptureFixture
) -> None:
    model = Model()
    first = _payload(1, 2 * CS)
    vol.write(0, first)  # two owned clusters
    model.wrote(0, first)
    vol.flush()
    rig.mount.set(Fault("write", action, DATA))
    caplog.set_level(logging.ERROR, logger="storvisor.engine.pool")
    fresh = _payload(2, 4096)
    with pytest.raises(IOFailure) as e:  # a new cluster: the allocation is undone
        vol.write(5 * CS + 512, fresh)
    assert e.value.errno == ERRNOS[action]
    model.failed(5 * CS + 512, fresh)
    run = _payload(6, 3 * CS)
    with pytest.raises(IOFailure) as e:  # new whole clusters, written together: undone too
        vol.write(8 * CS, run)
    assert e.value.errno == ERRNOS[action]
    model.failed(8 * CS, run)
    assert rig.f.volume_info("v").allocated == 2 * CS
    over = _payload(3, 4096)
    with pytest.raises(IOFailure) as e:  # in place
        vol.write(CS, over)
    assert e.value.errno == ERRNOS[action]
    model.failed(CS, over)
    assert rig.mount.hits()["write"] >= 3
    _degraded(rig.f, "a write of a backing device failed: write of ")
    assert rig.f.io_errors.write == 3
    records = [r for r in caplog.records if "a write of a backing device failed" in r.message]
    assert len(records) == 1, "logged once, not per request"
    vol.flush()  # a failed write is no failed sync: flushes go on
    _other_pool_serves(rig, 4)

    rig.mount.clear()
    again = _payload(5, 4096)
    vol.write(5 * CS, again)  # the fault cleared: the same cluster allocates now
    model.wrote(5 * CS, again)
    vol.flush()
    rig.settle(model)
    assert rig.f.volume_info("v").allocated == 3 * CS


@pytest.mark.parametrize("action", ["eio", "enospc"])
def test_a_failed_read_fails_that_request(rig: Rig, vol: Volume, action: str) -> None:
    model = Model()
    data = _payload(1, 3 * CS)
    vol.write(0, data)
    model.wrote(0, data)
    vol.flush()
    rig.mount.set(Fault("read", action, DATA))
    buf = bytearray(4096)
    vol.read_into(8 * CS, memoryview(buf))  # unmapped: no read of the device
    assert bytes(buf) == bytes(4096)
    with pytest.raises(IOFailure) as e:
        vol.read_into(CS, memoryview(buf))
    assert e.value.errno == ERRNOS[action]
    with pytest.raises(IOFailure):  # a span over the bad cluster
        vol.read_into(0, memoryview(bytearray(3 * CS)))
    copy = _payload(7, 4096)  # copy-on-write after a snapshot reads the old cluster
    rig.f.create_snapshot("v", "s")
    with pytest.raises(IOFailure):
        vol.write(CS + 4096, copy)
    model.failed(CS + 4096, copy)
    assert rig.f.io_errors.read == 2 and rig.f.io_errors.write == 1
    _degraded(rig.f, "a read of a backing device failed")
    _other_pool_serves(rig, 2)
    rig.settle(model)
    assert rig.f.volume_info("v").allocated == 0  # the failed copy mapped nothing


@pytest.mark.parametrize("action", ["eio", "enospc"])
def test_a_failed_sync_fails_every_flush_until_reopen(rig: Rig, vol: Volume, action: str) -> None:
    """The fault file system loses the writes since the last sync when a sync fails, as
    Linux does, and the next sync succeeds: only the latch keeps flushes from lying. Reopen
    returns the pool to its last commit (a crash of the pool): an allocation since then
    is gone, in-place data written after the failure stays."""
    model = Model()
    data = _payload(1, CS)
    vol.write(0, data)
    model.wrote(0, data)
    vol.flush()
    lost = _payload(2, 4096)
    vol.write(4096, lost)  # in place, since the last sync: lost by the failed sync
    model.failed(4096, lost)
    new = _payload(3, CS)
    vol.write(2 * CS, new)  # allocating: lost, unless a background commit synced it
    model.failed(2 * CS, new)
    rig.mount.set(Fault("sync", action))
    with pytest.raises(IOFailure) as e:
        vol.flush()
    assert e.value.errno == ERRNOS[action]
    rig.mount.clear()
    after = _payload(4, 4096)
    vol.write(8192, after)  # writes still work: in place...
    model.wrote(8192, after)
    dropped = _payload(5, CS)
    vol.write(4 * CS, dropped)  # ...and allocating, until reopen drops the mapping
    buf = bytearray(CS)
    vol.read_into(4 * CS, memoryview(buf))
    assert bytes(buf) == dropped
    for attempt in (vol.flush, rig.f.flush, lambda: vol.write(0, data[:512], fua=True)):
        with pytest.raises(IOFailure) as e:  # ...but no flush says they are durable
            attempt()
        assert e.value.errno == errno.EIO
        assert "an earlier sync of a backing device failed" in str(e.value)
    model.wrote(0, data[:512])  # the same bytes: the FUA write itself landed
    with pytest.raises(IOFailure):  # management operations fail with their flush...
        rig.f.create_snapshot("v", "s")
    with pytest.raises(IOFailure):
        rig.f.extend_volume("v", 2 * VOL)
    assert vol.size == 2 * VOL  # ...and are undone by the reopen
    _degraded(rig.f, "flushes fail until the pool is reopened")
    assert rig.f.io_errors.sync == 1
    before = rig.f.metadata_writes
    time.sleep(1.2)  # no background commit either
    assert rig.f.metadata_writes == before
    _other_pool_serves(rig, 3)
    rig.settle(model)  # the open handle sees the committed maps
    assert vol.size == VOL and rig.f.volume_info("v").size == VOL
    assert rig.f.snapshots("v") == []
    vol.read_into(4 * CS, memoryview(buf))
    assert bytes(buf) == bytes(CS)
    assert rig.f.volume_info("v").allocated in (CS, 2 * CS)
    vol.write(4 * CS, dropped)  # and allocates again
    vol.flush()
    model.wrote(4 * CS, dropped)
    rig.settle(model)


def test_a_stalled_sync_fails_its_flush_within_the_timeout(rig: Rig, vol: Volume) -> None:
    model = Model()
    rig.f.set_io_timeout(0.5)
    data = _payload(1, CS)
    vol.write(0, data)
    model.failed(0, data)  # reopen drops it, unless a background commit came first
    rig.mount.set(Fault("sync", "stall", seconds=30))
    _times_out(vol.flush)
    _degraded(rig.f, "did not complete within 0.5 s")
    assert rig.f.io_errors.sync == 1 and rig.f.io_errors.timeout == 1
    _other_pool_serves(rig, 2)
    with pytest.raises(IOFailure, match="still stalled"):
        rig.home.reopen_pool("f")
    assert rig.f.info().state is PoolState.DEGRADED
    _reopen_once_released(rig)  # the stalled sync completes
    rig.settle(model)


def test_the_timeout_is_kept_per_pool_and_checked(rig: Rig) -> None:
    for bad in (0, 1e-200, 0.05, 1e300, float("inf"), float("nan")):
        with pytest.raises(Exception, match="invalid I/O timeout"):
            rig.f.set_io_timeout(bad)
    rig.f.set_io_timeout(2.5)  # flushes: the pool was not degraded by what it refused
    assert rig.g.io_timeout == 30.0
    rig.home.close()
    home = Home(rig.home.path)
    try:
        assert home.pool("f").io_timeout == 2.5
    finally:
        home.close()
    rig.home = Home(rig.home.path)  # for the fixture's close


# ----------------------------------------------------------------------- through exports


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fd-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_nbd_clients_get_the_errno_and_the_other_pool_serves(rig: Rig, short_dir: Path) -> None:
    nbd = require_module("nbd", "python3-libnbd is not installed")
    from storvisor.exports.nbd import NBDExport, NBDServer, nbd_uri

    rig.f.set_io_timeout(0.5)
    server = NBDServer()
    for name in ("f", "g"):
        pool = rig.f if name == "f" else rig.g
        server.add_export(NBDExport(name, lambda p=pool: p.open_volume("v")))
    sock = str(short_dir / "nbd.sock")
    server.listen_unix(sock)
    server.start()
    model = Model()
    try:
        hf, hg = nbd.NBD(), nbd.NBD()
        hf.connect_uri(nbd_uri("f", unix_path=sock))
        hg.connect_uri(nbd_uri("g", unix_path=sock))
        base = _payload(1, 2 * CS)
        hf.pwrite(base, 0)
        model.wrote(0, base)
        hf.flush()
        for action, op in (("eio", "write"), ("enospc", "write"), ("eio", "read")):
            rig.mount.set(Fault(op, action, DATA))
            with pytest.raises(nbd.Error) as e:
                if op == "write":
                    payload = _payload(2, 4096)
                    model.failed(4 * CS, payload)
                    hf.pwrite(payload, 4 * CS)
                else:
                    hf.pread(4096, 0)
            assert e.value.errno == errno.errorcode[ERRNOS[action]], (action, op, e.value)
            hg.pwrite(b"g" * 4096, 0)  # the other pool serves meanwhile
            hg.flush()
            rig.mount.clear()
            assert hf.pread(4096, 0) == base[:4096]  # the connection carries on
        rig.mount.set(Fault("sync", "stall", seconds=30))
        start = time.monotonic()
        with pytest.raises(nbd.Error) as e:
            hf.flush()
        assert time.monotonic() - start < 5
        assert e.value.errno == "EIO"  # ETIMEDOUT has no NBD error: EIO on the wire
        rig.mount.clear()
        with pytest.raises(nbd.Error):  # fsyncgate: still failing until reopen
            hf.flush()
        hg.flush()
        assert hg.pread(4096, 0) == b"g" * 4096
        _reopen_once_released(rig)
        hf.flush()
        for h in (hf, hg):
            h.shutdown()
    finally:
        server.close()
    rig.settle(model)


def test_vhost_user_blk_requests_get_ioerr(rig: Rig, vol: Volume, short_dir: Path) -> None:
    from storvisor.exports.vhost_user_blk import VhostUserBlkServer
    from storvisor.protocols.virtio.blk import Status
    from storvisor.testing.vhost_frontend import VhostUserFrontend

    model = Model()
    sock = str(short_dir / "vub.sock")
    server = VhostUserBlkServer(vol, sock, num_queues=1, serial="faildisk")
    server.start()
    try:
        with VhostUserFrontend(sock, queue_size=16) as fe:
            fe.setup()
            base = _payload(1, 2 * CS)
            assert fe.blk.write(0, base) == Status.OK
            model.wrote(0, base)
            assert fe.blk.flush() == Status.OK
            for action in ("eio", "enospc"):
                rig.mount.set(Fault("write", action, DATA))
                payload = _payload(3, 4096)
                assert fe.blk.write(6 * CS, payload) == Status.IOERR
                model.failed(6 * CS, payload)
                rig.mount.set(Fault("read", action, DATA))
                status, _ = fe.blk.read(0, 4096)
                assert status == Status.IOERR
                _other_pool_serves(rig, 5)
                rig.mount.clear()
                assert fe.blk.read(0, 4096) == (Status.OK, base[:4096])
            rig.mount.set(Fault("sync", "eio"))
            assert fe.blk.flush() == Status.IOERR
            rig.mount.clear()
            assert fe.blk.flush() == Status.IOERR  # until the pool is reopened
            rig.home.reopen_pool("f")
            assert fe.blk.flush() == Status.OK
            again = _payload(4, 4096)
            assert fe.blk.write(6 * CS, again) == Status.OK
            model.wrote(6 * CS, again)
        assert rig.mount.hits() == {"read": 2, "write": 2, "sync": 1}
    finally:
        server.close()
    rig.settle(model)


def test_a_stall_does_not_hold_up_the_other_pool(rig: Rig, vol: Volume) -> None:
    """A read stalled on ``f`` (no data timeout: the device's own applies) holds only
    its own request: ``g`` serves meanwhile, and the read completes once released."""
    data = _payload(1, CS)
    vol.write(0, data)
    calls = _Calls()
    got = _stall_a_read(rig, vol, calls)
    _other_pool_serves(rig, 6)
    rig.g.flush()
    assert not got and rig.mount.hits()["read"] == 1
    rig.mount.clear()
    calls.join()
    assert got == [data[:4096]]


def test_a_data_plane_reports_its_failed_direct_io_to_the_pool(rig: Rig, vol: Volume) -> None:
    """Reads and in-place writes a data plane does itself fail there with the errno, and
    reach the owner's pool as failures: counted, and the pool degraded."""
    import os
    import socket

    from storvisor.exports.dataplane import PlaneHost, RemoteVolume

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    host = PlaneHost(vol, a)
    host.start()
    remote = RemoteVolume(b, os.dup(host.map.fd), rig.f.backing_fds(), CS)
    model = Model()
    try:
        data = _payload(1, 2 * CS)
        remote.write(0, data)  # allocating: the owner writes
        model.wrote(0, data)
        remote.flush()
        assert rig.f.io_errors == type(rig.f.io_errors)()
        rig.mount.set(Fault("write", "enospc", DATA), Fault("read", "eio", DATA))
        over = _payload(2, 4096)
        with pytest.raises(IOFailure) as e:
            remote.write(4096, over)  # in place: the plane writes
        assert e.value.errno == errno.ENOSPC
        model.failed(4096, over)
        with pytest.raises(IOFailure) as e:
            remote.read_into(0, memoryview(bytearray(4096)))  # one cluster
        assert e.value.errno == errno.EIO
        with pytest.raises(IOFailure) as e:
            remote.vectors.read_into(0, [memoryview(bytearray(CS + 4096))])  # a span
        assert e.value.errno == errno.EIO
        _eventually(  # the reports are one-way frames
            lambda: (rig.f.io_errors.read, rig.f.io_errors.write) == (2, 1),
            "the plane's failures were not reported",
            seconds=5,
        )
        _degraded(rig.f, "a write of a backing device failed: write of 4096 bytes")
        rig.mount.clear()
        remote.write(4096, over)
        model.wrote(4096, over)
        remote.flush()
    finally:
        remote.close()
        host.close()
    rig.settle(model)


# ------------------------------------------------------- a random workload under faults


class _FaultLog:
    """A crashkit ``Log`` that drops the completion of every operation that failed: to
    the checker, a failed write may or may not have landed, a failed flush made nothing
    durable, a failed management operation may or may not have happened."""

    def __init__(self) -> None:
        self.records: list[dict[str, object]] = []
        self.failed: set[object] = set()
        self.last: object = None

    def append(self, record: Mapping[str, object]) -> None:
        if record["t"] in COMPLETES and record["seq"] in self.failed:
            return
        if record["t"] in ISSUES:
            self.last = record["seq"]
        self.records.append(dict(record))

    def forget_since_durable(self) -> None:
        """A pool whose sync failed was reopened: it went back to its last commit, and the
        device lost what was written since its last sync. Every operation completed since
        the last durability point becomes one that may or may not have happened."""
        points = [i for i, r in enumerate(self.records) if r["t"] in ("durable", "committed")]
        since = points[-1] + 1 if points else 0
        self.records[since:] = [r for r in self.records[since:] if r["t"] != "done"]


class _FaultyWriter:
    """An ``EngineWriter`` over pool ``f`` that switches the faults at random before each
    operation, reopens the pool now and then while no fault is on, and turns a failed
    operation into a dropped completion (``_FaultLog``)."""

    FAULTS = (
        (),
        (Fault("write", "eio", DATA),),
        (Fault("write", "enospc", DATA),),
        (Fault("read", "eio", DATA),),
        (Fault("sync", "eio"),),
        (Fault("sync", "enospc"), Fault("write", "eio", DATA + 4 * CS)),
    )

    def __init__(self, rig: Rig, log: _FaultLog, rng: random.Random) -> None:
        self.rig = rig
        self.log = log
        self.rng = rng
        self.inner = EngineWriter(rig.f)
        self.faulty = False
        self.failures = 0
        self.syncs_failed = 0

    def reopen(self) -> None:
        if self.rig.f.io_errors.sync > self.syncs_failed:
            self.syncs_failed = self.rig.f.io_errors.sync
            self.log.forget_since_durable()
        self.rig.home.reopen_pool("f")

    @property
    def management_durable(self) -> bool:
        return True

    def _do(self, call: Callable[[], object]) -> None:
        if self.rng.random() < 0.15:
            faults = self.rng.choice(self.FAULTS)
            self.rig.mount.set(*faults)
            self.faulty = bool(faults)
        if not self.faulty and self.rng.random() < 0.1:
            self.reopen()
        try:
            call()
        except (IOFailure, NotFound):  # NotFound: a snapshot a reopen dropped
            self.log.failed.add(self.log.last)
            self.failures += 1

    def write(self, target: str, offset: int, data: bytes, *, fua: bool) -> None:
        self._do(lambda: self.inner.write(target, offset, data, fua=fua))

    def discard(self, target: str, offset: int, length: int) -> None:
        self._do(lambda: self.inner.discard(target, offset, length))

    def write_zeroes(self, target: str, offset: int, length: int, *, may_unmap: bool) -> None:
        self._do(lambda: self.inner.write_zeroes(target, offset, length, may_unmap=may_unmap))

    def flush(self) -> None:
        self._do(self.inner.flush)

    def snapshot(self, volume: str, snapshot: str) -> None:
        self._do(lambda: self.inner.snapshot(volume, snapshot))

    def clone(self, volume: str, snapshot: str, new: str) -> None:
        self._do(lambda: self.inner.clone(volume, snapshot, new))

    def delete_snapshot(self, volume: str, snapshot: str) -> None:
        self._do(lambda: self.inner.delete_snapshot(volume, snapshot))

    def delete_volume(self, volume: str) -> None:
        self._do(lambda: self.inner.delete_volume(volume))

    def flatten(self, volume: str) -> None:
        self._do(lambda: self.inner.flatten(volume))

    def rollback(self, volume: str, snapshot: str) -> None:
        self._do(lambda: self.inner.rollback(volume, snapshot))

    def extend(self, volume: str, size: int) -> None:
        self._do(lambda: self.inner.extend(volume, size))

    def detach(self, target: str) -> bool:
        return self.inner.detach(target)


@pytest.mark.parametrize("seed", [1, 2])
def test_random_faults_under_a_workload_keep_the_contract(rig: Rig, seed: int) -> None:
    """A random workload (writes, FUA, discards, write-zeroes, flushes, snapshots) on pool
    ``f`` while faults switch on and off: afterwards, with the faults cleared and the pool
    reopened, the Home is closed and opened again and crashkit's checker finds fsck clean
    and every volume and snapshot as the log allows (what a failed flush or a latched pool
    did not make durable may be lost, nothing acknowledged durable is)."""
    rng = random.Random(seed)
    log = _FaultLog()
    writer = _FaultyWriter(rig, log, rng)
    workload = Workload(
        {"v": VOL}, ops=300, discards=True, snapshot_ops=True, max_volumes=1, flush_rate=0.15
    )
    try:
        run_workload(writer, log, rng, workload)
        rig.mount.clear()
        writer.faulty = False
        writer.reopen()
        last = max(int(str(r["seq"])) for r in log.records)
        log.append({"t": "flush", "seq": last + 1})
        writer.inner.flush()  # durable now: the pool is online and the device healthy
        log.append({"t": "durable", "seq": last + 1})
    finally:
        writer.inner.close()
    assert writer.failures > 10, writer.failures  # the faults were hit
    assert sum(rig.mount.hits().values()) > 10
    history = History({"v": bytes(VOL)}, log.records)
    rig.home.close()
    survivors = check_home(rig.home.path, history, f"seed {seed}", pool="f")
    assert "v" in survivors
    rig.home = Home(rig.home.path)  # for the fixture's close


# ------------------------------------------------------------ reads and writes timing out


def _io_threads() -> set[threading.Thread]:
    """The pools' I/O threads (``engine/bounded.py``) alive now."""
    return {t for t in threading.enumerate() if t.name.endswith("-io")}


def test_the_data_timeout_is_off_by_default_kept_per_pool_and_checked(rig: Rig) -> None:
    assert (rig.f.data_timeout, rig.g.data_timeout) == (0.0, 0.0)
    for bad in (-1, 1e-200, 0.05, 1e300, float("inf"), float("nan")):
        with pytest.raises(Exception, match="invalid data I/O timeout"):
            rig.f.set_data_timeout(bad)
    rig.f.set_data_timeout(1.5)
    assert rig.g.data_timeout == 0.0
    rig.home.close()
    home = Home(rig.home.path)
    try:
        assert home.pool("f").data_timeout == 1.5
        home.pool("f").set_data_timeout(0)
        assert home.pool("f").data_timeout == 0.0
    finally:
        home.close()
    rig.home = Home(rig.home.path)
    assert rig.home.pool("f").data_timeout == 0.0


def test_without_a_data_timeout_a_stalled_read_waits_in_the_callers_thread(
    rig: Rig, vol: Volume
) -> None:
    """Off (the default), nothing changes: the read runs in the caller's thread, into the
    caller's buffer, and waits for the stalled device however long it takes."""
    before = _io_threads()
    data = _payload(1, CS)
    vol.write(0, data)
    calls = _Calls()
    got = _stall_a_read(rig, vol, calls)
    time.sleep(1.2)
    assert not got
    assert not _io_threads() - before  # no hand-off to an I/O thread
    rig.mount.clear()
    calls.join()
    assert got == [data[:4096]]
    assert rig.f.info().state is PoolState.ONLINE


def test_a_stalled_read_fails_within_the_data_timeout_and_never_touches_the_buffer(
    rig: Rig,
    vol: Volume,
) -> None:
    model = Model()
    rig.f.set_data_timeout(0.5)
    data = _payload(1, 2 * CS)
    vol.write(0, data)
    vol.flush()
    model.wrote(0, data)
    rig.mount.set(Fault("read", "stall", DATA, seconds=30))
    buf = bytearray(b"\xee" * (CS + 4096))  # two clusters
    _times_out(lambda: vol.read_into(CS - 4096, memoryview(buf)))
    _degraded(rig.f, "a read of a backing device did not complete within 0.5 s")
    assert rig.f.io_errors.read == 1 and rig.f.io_errors.timeout == 1
    _other_pool_serves(rig, 2)
    vol.flush()  # a read that timed out wrote nothing: flushes still succeed
    _reopen_once_released(rig)  # the stalled read completes into its own buffer
    assert buf == b"\xee" * (CS + 4096)
    got = bytearray(CS + 4096)
    vol.read_into(CS - 4096, memoryview(got))
    assert got == data[CS - 4096 : 2 * CS]
    rig.settle(model)


def test_a_stalled_write_fails_latches_and_maps_nothing(rig: Rig, vol: Volume) -> None:
    model = Model()
    rig.f.set_data_timeout(0.5)
    base = _payload(1, CS)
    vol.write(0, base)
    vol.flush()
    model.wrote(0, base)
    rig.mount.set(Fault("write", "stall", DATA, seconds=30))
    overwrite = bytearray(_payload(2, 4096))
    _times_out(lambda: vol.write(4096, overwrite))  # in place
    model.failed(4096, bytes(overwrite))  # it may still land
    overwrite[:] = b"X" * 4096  # the caller reuses its buffer: what lands is a copy
    with pytest.raises(IOFailure) as e:
        vol.write(5 * CS, _payload(3, 4096))  # allocating
    assert e.value.errno == errno.ETIMEDOUT
    _degraded(rig.f, "a write of a backing device timed out")
    assert rig.f.io_errors.write == 2 and rig.f.io_errors.timeout == 2
    with pytest.raises(IOFailure) as e:  # no later flush may claim durability
        vol.flush()
    assert e.value.errno == errno.EIO
    with pytest.raises(IOFailure, match="still stalled"):
        rig.home.reopen_pool("f")
    _other_pool_serves(rig, 4)
    rig.mount.clear()
    _eventually(lambda: not rig.f._io_threads.stalled(), "the released writes never completed")
    # the allocating write finished after it was abandoned: its cluster is not mapped
    assert [x.allocated for x in vol.block_status(5 * CS, CS)] == [False]
    with pytest.raises(IOFailure):
        vol.flush()  # still latched
    _reopen_once_released(rig)
    vol.flush()
    again = _payload(5, 4096)
    vol.write(5 * CS, again)
    vol.flush()
    model.wrote(5 * CS, again)
    rig.settle(model)


def test_nbd_and_vhost_clients_get_an_error_within_the_data_timeout(
    rig: Rig, short_dir: Path
) -> None:
    nbd = require_module("nbd", "python3-libnbd is not installed")
    from storvisor.exports.nbd import NBDExport, NBDServer, nbd_uri
    from storvisor.exports.vhost_user_blk import VhostUserBlkServer
    from storvisor.protocols.virtio.blk import Status
    from storvisor.testing.vhost_frontend import VhostUserFrontend

    rig.f.set_data_timeout(0.5)
    rig.f.create_volume("w", VOL)
    model = Model()
    server = NBDServer()
    server.add_export(NBDExport("f", lambda: rig.f.open_volume("v")))
    sock = str(short_dir / "nbd.sock")
    server.listen_unix(sock)
    server.start()
    volume: Volume = rig.f.open_volume("w")
    vsock = str(short_dir / "vub.sock")
    vhost = VhostUserBlkServer(volume, vsock, num_queues=1, serial="timeout")
    vhost.start()
    try:
        h = nbd.NBD()
        h.connect_uri(nbd_uri("f", unix_path=sock))
        base = _payload(1, 2 * CS)
        h.pwrite(base, 0)
        model.wrote(0, base)
        h.flush()
        with VhostUserFrontend(vsock, queue_size=16) as fe:
            fe.setup()
            assert fe.blk.write(0, base) == Status.OK
            rig.mount.set(Fault("read", "stall", DATA, seconds=30))
            start = time.monotonic()
            with pytest.raises(nbd.Error) as e:
                h.pread(4096, 0)
            assert e.value.errno == "EIO"  # ETIMEDOUT: EIO on the wire
            assert 0.5 <= time.monotonic() - start < 5
            start = time.monotonic()
            assert fe.blk.read(0, 4096)[0] == Status.IOERR
            assert 0.5 <= time.monotonic() - start < 5
            h.flush()  # reads that timed out do not latch
            _reopen_once_released(rig)
            assert h.pread(4096, 0) == base[:4096]
            assert fe.blk.read(0, 4096) == (Status.OK, base[:4096])

            rig.mount.set(Fault("write", "stall", DATA, seconds=30))
            payload = _payload(2, 4096)
            with pytest.raises(nbd.Error) as e:
                h.pwrite(payload, 0)
            assert e.value.errno == "EIO"
            model.failed(0, payload)
            assert fe.blk.write(0, payload) == Status.IOERR
            with pytest.raises(nbd.Error):
                h.flush()
            assert fe.blk.flush() == Status.IOERR
            _other_pool_serves(rig, 3)
            _reopen_once_released(rig)
            h.flush()
            assert fe.blk.flush() == Status.OK
        h.shutdown()
    finally:
        vhost.close()
        volume.close()
        server.close()
    rig.settle(model)


# ------------------------------------------------- management while a snapshot drains


def test_a_snapshot_waits_for_a_stalled_read_without_holding_up_management(
    rig: Rig, vol: Volume
) -> None:
    """A snapshot waits for the reads and writes in flight on its volume (no in-place write
    that found its cluster owned may land in it afterwards), but not while it holds the
    pool's lock, nor the service's: with a read stalled on ``f`` and a snapshot waiting
    for it, ``pool list``, ``f``'s and ``g``'s records and management calls on both pools
    answer. Released, the snapshot holds every write completed before it, and no write
    issued after it returned."""
    service = Service(rig.home)
    calls = _Calls()
    try:
        before = _payload(1, 2 * CS)
        vol.write(0, before)  # owned clusters: later writes to them go in place
        _stall_a_read(rig, vol, calls)
        waits = _count_waits(vol)
        snapshot = calls.start(lambda: service.create_snapshot("f", "v", "s"))
        _waiting(waits, 1, snapshot)
        meanwhile = _payload(2, 4096)
        writer = calls.start(lambda: vol.write(CS, meanwhile))  # held at the frozen gate
        _answers_within(rig.home.pools, "Home.pools")
        _answers_within(service.pools, "Service.pools (pool list)")
        _answers_within(rig.f.info, "pool f's record")
        _answers_within(lambda: rig.f.create_volume("w", VOL), "a volume created in f")
        _answers_within(lambda: service.create_volume("g", "w", VOL), "a volume created in g")
        _answers_within(lambda: rig.g.create_snapshot("v", "s"), "a snapshot in g")
        assert snapshot.is_alive() and writer.is_alive()
        rig.mount.clear()
        calls.join()
        after = _payload(3, 4096)
        vol.write(4096, after)
        with contextlib.closing(rig.f.open_volume("v", "s")) as snap:
            taken = _read(snap, 0, 2 * CS)
        assert taken[:CS] == before[:CS]
        assert taken[CS : CS + 4096] in (before[CS : CS + 4096], meanwhile)  # in flight
        assert taken[CS + 4096 :] == before[CS + 4096 :]
        expected = bytearray(before)
        expected[CS : CS + 4096] = meanwhile
        expected[4096 : 2 * 4096] = after
        assert _read(vol, 0, 2 * CS) == expected
    finally:
        rig.mount.clear()
    assert rig.f.fsck().clean


def test_snapshots_racing_a_reopen_of_their_volume_each_freeze_what_it_has(
    rig: Rig, vol: Volume
) -> None:
    """Two snapshots of one volume wait for the same stalled read; meanwhile every handle
    of the volume closes and a new one opens and writes in place. Both snapshots then
    complete: each holds what was written before it was asked for, and a write through the
    new handle after they returned reaches neither."""
    calls = _Calls()
    again: Volume | None = None
    try:
        before = _payload(1, 2 * CS)
        vol.write(0, before)
        _stall_a_read(rig, vol, calls)
        waits = _count_waits(vol)
        first = calls.start(lambda: rig.f.create_snapshot("v", "s1"))
        second = calls.start(lambda: rig.f.create_snapshot("v", "s2"))
        _waiting(waits, 2, first, second)
        vol.close()  # the state the snapshots wait for is dropped...
        again = rig.f.open_volume("v")  # ...and the volume opens anew: a new state
        meanwhile = _payload(2, 4096)
        again.write(CS, meanwhile)  # in place, through a state no snapshot froze yet
        _answers_within(lambda: rig.f.extend_volume("v", 2 * VOL), "an extend of the volume")
        rig.mount.clear()
        calls.join()
        after = _payload(3, 4096)
        again.write(CS, after)
        for name in ("s1", "s2"):
            with contextlib.closing(rig.f.open_volume("v", name)) as snap:
                taken = _read(snap, 0, 2 * CS)
            assert taken[:CS] == before[:CS], name
            assert taken[CS : CS + 4096] in (before[CS : CS + 4096], meanwhile), name
            assert taken[CS + 4096 :] == before[CS + 4096 :], name
        assert _read(again, CS, 4096) == after
        assert sorted(s.name for s in rig.f.snapshots("v")) == ["s1", "s2"]
    finally:
        rig.mount.clear()
        if again is not None:
            again.close()
    assert rig.f.fsck().clean


def test_a_flatten_waits_for_a_stalled_read_without_holding_up_management(rig: Rig) -> None:
    """A flatten swaps the clone's view once the copy is done, with no direct I/O running:
    it waits for a read stalled on a cluster the clone owns without holding the pool's
    lock, and completes with the clone's data once the read is released."""
    origin = _payload(1, CS)
    with contextlib.closing(rig.f.open_volume("v")) as vol:
        vol.write(0, origin)
    rig.f.create_snapshot("v", "s")
    rig.f.clone("v", "s", "c")
    calls = _Calls()
    with contextlib.closing(rig.f.open_volume("c")) as clone:
        own = _payload(2, CS)
        clone.write(CS, own)  # a cluster of the clone's own, found in the device's file
        clone.flush()
        image = (rig.mount.mountpoint.parent / "backing" / "f.img").read_bytes()
        at = image.index(own)
        try:
            _stall_a_read(rig, clone, calls, CS, (at, at + CS))
            waits = _count_waits(clone)
            flatten = calls.start(lambda: rig.f.flatten("c"))
            _waiting(waits, 1, flatten)
            _answers_within(rig.home.pools, "Home.pools")
            _answers_within(lambda: rig.f.create_volume("w", VOL), "a volume created in f")
            rig.mount.clear()
            calls.join()
        finally:
            rig.mount.clear()
        assert rig.f.volume_info("c").origin is None
        assert _read(clone, 0, 2 * CS) == origin + own
    rig.f.delete_snapshot("v", "s")  # the clone no longer depends on it
    assert rig.f.fsck().clean
