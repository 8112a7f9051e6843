"""The cache tier (``engine/cache.py``): its mapping of lines to slots, the order in which
writeback destages, warm restarts, writethrough, detaching, bad input, a failing cache
device and a long destage that holds up nothing else. Crash tests are in
``test_cache_crash.py``."""

from __future__ import annotations

import os
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from itertools import count
from pathlib import Path

import pytest

from powercuts import require_fuse
from storvisor.api.service import Service
from storvisor.engine import pio
from storvisor.engine.backing import Backing, Header
from storvisor.engine.cache import CacheSpec
from storvisor.engine.device import BlockDevice
from storvisor.engine.home import Home
from storvisor.engine.pool import Pool
from storvisor.engine.types import BackingSpec, CacheMode, PoolInfo, PoolState
from storvisor.errors import (
    Conflict,
    InvalidArgument,
    IOFailure,
    NotFound,
    StateError,
)
from storvisor.testing.conformance import check_block_device
from storvisor.testing.faultfs import Fault, FaultMount
from waiting import Background, wait_until

CS = 4096
VOL = 1 << 20
DEVICE = 8 << 20


def _pool(tmp_path: Path, name: str = "p") -> Pool:
    pool = Pool.create(
        tmp_path / name, name, [BackingSpec(str(tmp_path / f"{name}.img"), DEVICE)], CS
    )
    pool.create_volume("v", VOL)
    return pool


def _read(pool: Pool, name: str = "v") -> bytes:
    vol = pool.open_volume(name)
    try:
        buf = bytearray(VOL)
        vol.read_into(0, memoryview(buf))
        return bytes(buf)
    finally:
        vol.close()


class Recording(Backing):
    """A backing device that records its whole content at every sync, and can hold a sync
    until ``release`` is set (the destage then waits while the test writes on)."""

    images: list[bytes]
    hold: threading.Event | None
    release: threading.Event

    def sync(self) -> None:
        if self.hold is not None:
            self.hold.set()
            assert self.release.wait(30)
            self.hold = None
        super().sync()
        size = (self.clusters + 1) * self.cluster_size
        self.images.append(os.pread(self.fd, size, 0))


def _recording_opener(images: list[bytes], hold: threading.Event, release: threading.Event):  # type: ignore[no-untyped-def]
    def open_backing(path: str, expected: Header) -> Backing:
        backing = Recording.open(path, expected)
        assert isinstance(backing, Recording)
        backing.images, backing.hold, backing.release = images, hold, release
        return backing

    return open_backing


def _device_view(pool: Pool) -> bytes:
    """The backing device's bytes as the pool sees them (through the cache)."""
    fd = pool.backing_fd(0)
    size = os.lseek(fd, 0, os.SEEK_END)
    buf = bytearray(size)
    pio.preadv_full(fd, [memoryview(buf)], 0)
    return bytes(buf)


def test_destage_copies_whole_epochs_in_flush_order(tmp_path: Path) -> None:
    """Every image the backing device holds at a sync of the destage is the pool's device
    content at one flush, in the order of the flushes, though lines written in one epoch
    were written again while the epoch waited for its destage (copy-on-write)."""
    pool = _pool(tmp_path)
    pool.set_cache(CacheSpec(str(tmp_path / "c.img"), 1 << 20), CacheMode.WRITEBACK)
    pool.close()
    images: list[bytes] = []
    hold, release = threading.Event(), threading.Event()
    pool = Pool.open(tmp_path / "p", "p", open_backing=_recording_opener(images, hold, release))
    try:
        rng = random.Random(7)
        vol = pool.open_volume("v")
        cuts: list[bytes] = []
        for epoch in range(6):
            for _ in range(40):
                offset = rng.randrange(0, 24) * CS + rng.randrange(0, CS - 100)
                vol.write(offset, bytes([epoch + 1]) * rng.randrange(1, 2 * CS))
            vol.flush()
            cuts.append(_device_view(pool))
            if epoch == 0:
                assert hold.wait(30), "the first epoch was never destaged"
        release.set()
        pool.flush_cache()
        info = pool.info().cache
        assert info is not None and info.dirty == 0
        vol.close()
    finally:
        release.set()
        pool.close()
    assert images, "nothing was destaged"
    position = 0
    for i, image in enumerate(images):
        assert image in cuts[position:], f"backing image {i} is no flushed state (or out of order)"
        position = cuts.index(image, position)
    assert images[-1] == cuts[-1]


def test_mapping_reads_fill_hit_and_evict(tmp_path: Path) -> None:
    """Reads fill whole lines and hit afterwards; a working set larger than the cache
    evicts (CLOCK) and still reads right; the data is the pool's whatever the mode."""
    pool = _pool(tmp_path)
    data = random.Random(1).randbytes(VOL)
    vol = pool.open_volume("v")
    vol.write(0, data)
    vol.flush()
    pool.set_cache(CacheSpec(str(tmp_path / "c.img"), 256 << 10), CacheMode.WRITETHROUGH)
    info = pool.info().cache
    assert info is not None
    lines = info.size // CS
    assert 32 <= lines < VOL // CS
    buf = bytearray(CS)
    for _ in range(2):
        for i in range(lines // 2):
            vol.read_into(i * CS + 10, memoryview(buf)[: CS - 10])
            assert buf[: CS - 10] == data[i * CS + 10 : (i + 1) * CS]
    info = pool.info().cache
    assert info is not None
    assert (info.misses, info.hits) == (lines // 2, lines // 2)
    assert _read(pool) == data  # more lines than slots: evictions
    info = pool.info().cache
    assert info is not None and 0 < info.used <= info.size and info.dirty == 0
    assert info.misses >= VOL // CS - info.hits
    vol.close()
    pool.close()


def test_writeback_is_warm_after_a_clean_restart(tmp_path: Path) -> None:
    """Written lines stay in the cache across a clean close; reads after the reopen hit
    and see the newest data; the backing gets everything after flush-cache."""
    pool = _pool(tmp_path)
    pool.set_cache(CacheSpec(str(tmp_path / "c.img"), 1 << 20), CacheMode.WRITEBACK)
    data = random.Random(2).randbytes(128 << 10)
    vol = pool.open_volume("v")
    vol.write(0, data)
    vol.close()
    pool.close()
    pool = Pool.open(tmp_path / "p", "p")
    try:
        vol = pool.open_volume("v")
        buf = bytearray(len(data))
        vol.read_into(0, memoryview(buf))
        assert buf == data
        info = pool.info().cache
        assert info is not None and info.misses == 0 and info.hits == len(data) // CS
        vol.close()
        pool.flush_cache()
        info = pool.info().cache
        assert info is not None and info.dirty == 0
        with open(tmp_path / "p.img", "rb") as f:
            assert data in f.read()
    finally:
        pool.close()


def test_writethrough_acknowledges_after_the_backing(tmp_path: Path) -> None:
    """A writethrough write is on the backing device when it returns; flush syncs it."""
    pool = _pool(tmp_path)
    pool.set_cache(CacheSpec(str(tmp_path / "c.img"), 1 << 20), CacheMode.WRITETHROUGH)
    vol = pool.open_volume("v")
    try:
        vol.write(0, b"x" * CS)
        vol.read_into(0, memoryview(bytearray(CS)))  # cached now
        vol.write(100, b"y" * 50)
        with open(tmp_path / "p.img", "rb") as f:
            raw = f.read()
        assert b"x" * 100 + b"y" * 50 + b"x" * (CS - 150) in raw
        info = pool.info().cache
        assert info is not None and info.dirty == 0
        assert (info.hits, info.misses) == (1, 2)  # a write, a read (which filled), a write
        buf = bytearray(CS)
        vol.read_into(0, memoryview(buf))
        assert buf == b"x" * 100 + b"y" * 50 + b"x" * (CS - 150)
    finally:
        vol.close()
        pool.close()


def test_detach_destages_and_frees_the_device(tmp_path: Path) -> None:
    """``--mode none`` destages everything, routes I/O to the device again and erases the
    cache header: the backing alone holds the data, and another pool may take the device."""
    pool = _pool(tmp_path)
    cache = CacheSpec(str(tmp_path / "c.img"), 1 << 20)
    pool.set_cache(cache, CacheMode.WRITEBACK)
    data = random.Random(3).randbytes(VOL)
    vol = pool.open_volume("v")
    vol.write(0, data)  # no flush: detaching flushes
    info = pool.set_cache(None, CacheMode.NONE)
    assert info.cache is None
    assert not pio.routed()
    vol.close()
    pool.close()
    pool = Pool.open(tmp_path / "p", "p")
    assert pool.cache is None and _read(pool) == data
    pool.close()
    other = _pool(tmp_path, "q")
    other.set_cache(cache, CacheMode.WRITETHROUGH)
    other.close()


def test_mode_changes(tmp_path: Path) -> None:
    """writeback -> writethrough destages first; writethrough -> writeback; both durable."""
    pool = _pool(tmp_path)
    pool.set_cache(CacheSpec(str(tmp_path / "c.img"), 1 << 20), CacheMode.WRITEBACK)
    vol = pool.open_volume("v")
    vol.write(0, b"a" * 3 * CS)
    info = pool.set_cache(None, CacheMode.WRITETHROUGH)
    assert info.cache is not None and info.cache.mode is CacheMode.WRITETHROUGH
    assert info.cache.dirty == 0
    with open(tmp_path / "p.img", "rb") as f:
        assert b"a" * 3 * CS in f.read()
    vol.close()
    pool.close()
    pool = Pool.open(tmp_path / "p", "p")
    info = pool.info()
    assert info.cache is not None and info.cache.mode is CacheMode.WRITETHROUGH
    pool.set_cache(None, CacheMode.WRITEBACK)
    pool.close()
    pool = Pool.open(tmp_path / "p", "p")
    info = pool.info()
    assert info.cache is not None and info.cache.mode is CacheMode.WRITEBACK
    pool.close()


def test_bad_input_changes_nothing(tmp_path: Path) -> None:
    pool = _pool(tmp_path)
    other = _pool(tmp_path, "q")
    try:
        with pytest.raises(InvalidArgument, match="unknown cache mode 'writebak'"):
            CacheMode.parse("writebak")
        with pytest.raises(NotFound, match="no such cache device"):
            pool.set_cache(CacheSpec(str(tmp_path / "missing")), CacheMode.WRITEBACK)
        assert not (tmp_path / "missing").exists()
        with pytest.raises(InvalidArgument, match="too small"):
            pool.set_cache(CacheSpec(str(tmp_path / "tiny"), 64 << 10), CacheMode.WRITEBACK)
        assert not (tmp_path / "tiny").exists()
        with pytest.raises(InvalidArgument, match="no cache to detach"):
            pool.set_cache(None, CacheMode.NONE)
        with pytest.raises(InvalidArgument, match="needed"):
            pool.set_cache(None, CacheMode.WRITEBACK)
        with pytest.raises(Conflict, match="belongs to pool 'q'"):
            pool.set_cache(CacheSpec(str(tmp_path / "q.img")), CacheMode.WRITEBACK)
        other.set_cache(CacheSpec(str(tmp_path / "c.img"), 1 << 20), CacheMode.WRITEBACK)
        with pytest.raises(Conflict, match="cache of another pool"):
            pool.set_cache(CacheSpec(str(tmp_path / "c.img")), CacheMode.WRITEBACK)
        with pytest.raises(Conflict, match="detach it first"):
            other.set_cache(CacheSpec(str(tmp_path / "d.img"), 1 << 20), CacheMode.WRITEBACK)
        with pytest.raises(InvalidArgument, match="PATH"):
            CacheSpec.parse(":1M")
        with pytest.raises(InvalidArgument):
            CacheSpec.parse("x:lots")
        assert pool.info().cache is None
    finally:
        pool.close()
        other.close()


@pytest.fixture
def faulty() -> Iterator[FaultMount]:
    require_fuse()
    top = Path(tempfile.mkdtemp(prefix="faildisk-", dir="/tmp"))
    (top / "backing").mkdir()
    (top / "mnt").mkdir()
    mount = FaultMount(top / "backing", top / "mnt")
    try:
        yield mount
    finally:
        mount.close()


@pytest.mark.parametrize("op", ["write", "sync"])
def test_a_failing_cache_device_latches_and_keeps_flushed_data(
    tmp_path: Path, faulty: FaultMount, op: str
) -> None:
    """The cache device fails writes or syncs (EIO; a failed sync drops the pages it could
    not write, as Linux does): the request or the flush fails with EIO, the pool is degraded
    with the cache failure named, every later flush fails; once the device works again
    ``recover`` (``pool reopen``) reopens the cache from its table and every flushed write
    reads back."""
    pool = _pool(tmp_path)
    pool.set_cache(CacheSpec(str(faulty.mountpoint / "c.img"), 1 << 20), CacheMode.WRITEBACK)
    vol = pool.open_volume("v")
    flushed = random.Random(4).randbytes(64 << 10)
    vol.write(0, flushed)
    vol.flush()
    faulty.set(Fault(op, "eio"))
    with pytest.raises(IOFailure) as failed:
        vol.write(256 << 10, b"z" * CS)
        vol.write(4 * CS, b"y" * CS)  # over a flushed line: a copy of it in the open epoch
        vol.flush()
    assert failed.value.errno == 5
    info = pool.info()
    assert info.state is PoolState.DEGRADED and "cache device failed" in info.reason
    assert info.cache is not None and info.cache.state.startswith("failed")
    with pytest.raises(IOFailure):
        vol.flush()
    faulty.clear()
    pool.recover()
    info = pool.info()
    assert info.state is PoolState.ONLINE and info.cache is not None and info.cache.state == "ok"
    buf = bytearray(len(flushed))
    vol.read_into(0, memoryview(buf))
    assert buf == flushed
    vol.close()
    pool.flush_cache()
    pool.close()
    pool = Pool.open(tmp_path / "p", "p")
    assert _read(pool)[: len(flushed)] == flushed
    assert pool.fsck().clean
    pool.close()


def test_the_epoch_of_a_failed_flush_is_never_destaged(tmp_path: Path, faulty: FaultMount) -> None:
    """A write over a line whose epoch waits for its destage goes to a new slot; the flush
    of that write fails, and the device drops the new slot's data. The destage, held in the
    backing's sync meanwhile, goes on once the device works again: it must not copy the
    dropped slot over the line, which reads as the last good flush left it (or as the write,
    had it survived) once the pool reopens the cache."""
    pool = _pool(tmp_path)
    pool.set_cache(CacheSpec(str(faulty.mountpoint / "c.img"), 1 << 20), CacheMode.WRITEBACK)
    pool.close()
    images: list[bytes] = []
    hold, release = threading.Event(), threading.Event()
    pool = Pool.open(tmp_path / "p", "p", open_backing=_recording_opener(images, hold, release))
    try:
        vol = pool.open_volume("v")
        flushed = random.Random(5).randbytes(16 * CS)
        vol.write(0, flushed)
        vol.flush()
        assert hold.wait(30), "the epoch was never destaged"
        faulty.set(Fault("sync", "eio"))
        vol.write(4 * CS, b"y" * CS)  # its epoch waits for the destage: copied to a new slot
        with pytest.raises(IOFailure):
            vol.flush()
        release.set()
        faulty.clear()
        wait_until(lambda: images, "the held destage to go on", timeout=30)
        time.sleep(2.5)  # a destage that went on after the failure retries within a second
        pool.recover()
        buf = bytearray(len(flushed))
        vol.read_into(0, memoryview(buf))
        line = bytes(buf[4 * CS : 5 * CS])
        assert line in (flushed[4 * CS : 5 * CS], b"y" * CS), f"line 4 reads {line[:16]!r}..."
        assert buf[: 4 * CS] == flushed[: 4 * CS] and buf[5 * CS :] == flushed[5 * CS :]
        vol.close()
        pool.flush_cache()
        assert pool.fsck().clean
    finally:
        release.set()
        pool.close()


@pytest.mark.parametrize("mode", [CacheMode.WRITEBACK, CacheMode.WRITETHROUGH])
@pytest.mark.parametrize("cluster_size", [4096, 64 << 10])
def test_volume_of_a_cached_pool_conforms(
    tmp_path: Path, mode: CacheMode, cluster_size: int
) -> None:
    """The block-device conformance suite on volumes of a pool behind a cache small enough
    to evict (and, in writeback, to wait for the destage)."""
    pool = Pool.create(tmp_path / "c", "c", [BackingSpec(str(tmp_path / "c.img"), 64 << 20)],
                       cluster_size)  # fmt: skip
    pool.set_cache(CacheSpec(str(tmp_path / "cache.img"), 40 * cluster_size), mode)
    names = count()

    def make(size: int) -> BlockDevice:
        name = f"v{next(names)}"
        pool.create_volume(name, size)
        return pool.open_volume(name)

    try:
        check_block_device(make)
        assert pool.fsck().clean
        info = pool.info().cache
        assert info is not None and info.hits and info.misses and info.state == "ok"
    finally:
        pool.close()


def test_deleting_a_cached_pool_frees_its_cache_device(tmp_path: Path) -> None:
    """``Home.delete_pool`` erases the cache header too: another pool may take the device."""
    from storvisor.engine.home import Home

    home = Home(tmp_path / "home")
    try:
        home.create_pool("p", [BackingSpec(str(tmp_path / "p.img"), DEVICE)], CS)
        device = str(tmp_path / "c.img")
        home.set_cache("p", f"{device}:1M", CacheMode.WRITEBACK)
        home.pool("p").create_volume("v", VOL)
        home.delete_pool("p", force=True)
        home.create_pool("q", [BackingSpec(str(tmp_path / "q.img"), DEVICE)], CS)
        info = home.set_cache("q", device, CacheMode.WRITETHROUGH)
        assert info.cache is not None and info.cache.device == device
    finally:
        home.close()


def _service_with_a_stalled_destage(tmp_path: Path, faulty: FaultMount) -> Service:
    """Pools "p" (its device on ``faulty``, a writeback cache holding 1 MiB not destaged,
    every write of the device stalled for 60 s) and "q"."""
    service = Service(Home(tmp_path / "home"))
    service.create_pool("p", [BackingSpec(str(faulty.mountpoint / "p.img"), DEVICE)], CS)
    service.create_pool("q", [BackingSpec(str(tmp_path / "q.img"), DEVICE)], CS)
    service.create_volume("p", "v", VOL)
    service.set_cache("p", f"{tmp_path / 'c.img'}:1M", CacheMode.WRITEBACK)
    vol = service.home.pool("p").open_volume("v")
    vol.write(0, random.Random(5).randbytes(VOL))
    vol.close()
    faulty.set(Fault("write", "stall", 0, None, 60))
    return service


def _stalled(faulty: FaultMount, call: Callable[[], object]) -> Background:
    """``call`` in the background, once a destage write reached the device after it began."""
    hits = faulty.hits()["write"]
    waiting = Background(call)
    wait_until(lambda: faulty.hits()["write"] > hits, "a destage write reaching the device")
    return waiting


def _waits_for_the_destage(
    service: Service, faulty: FaultMount, call: Callable[[], object]
) -> object:
    """Run ``call`` while the destage is stalled: it waits, the service's other calls
    answer within 5 s meanwhile (pool "p" showing dirty bytes), and it returns once the
    device works again. Its outcome."""
    waiting = _stalled(faulty, call)
    answered: list[PoolInfo] = []

    def meanwhile() -> None:
        answered.append(service.pool_info("p"))
        assert [p.name for p in service.pools()] == ["p", "q"]
        service.create_volume("q", f"w{len(service.volumes('q'))}", VOL)
        service.metrics_sample()

    others = threading.Thread(target=meanwhile)
    others.start()
    others.join(5)
    assert not others.is_alive(), "the other calls waited for the destage"
    (info,) = answered
    assert info.cache is not None and info.cache.dirty > 0
    assert waiting.is_alive()
    faulty.clear()
    waiting.join(30)
    assert not waiting.is_alive(), "it did not return once the device did"
    return waiting.outcome


def test_a_long_destage_holds_up_nothing_else(tmp_path: Path, faulty: FaultMount) -> None:
    """``flush-cache`` waits for the destage, which a slow backing device makes as long as
    it likes: the service's other calls (the pool's own state, with its dirty bytes, above
    all) answer meanwhile, and closing the pool ends the wait with an error instead of
    leaving it hung."""
    service = _service_with_a_stalled_destage(tmp_path, faulty)
    try:
        done = _waits_for_the_destage(service, faulty, lambda: service.flush_cache("p"))
        assert isinstance(done, PoolInfo) and done.cache is not None and done.cache.dirty == 0

        # two epochs to destage, each of 16 lines written 0.2 s apiece: the pool closes
        # during the first, and the destage stops after it
        faulty.set(Fault("write", "stall", 0, None, 0.2))
        vol = service.home.pool("p").open_volume("v")
        vol.write(0, b"a" * (16 * CS))
        vol.flush()
        vol.write(0, b"b" * (16 * CS))
        vol.close()
        flushing = _stalled(faulty, lambda: service.flush_cache("p"))
        service.close()  # a local pool's cache stays warm: the second epoch stays in it
        flushing.join(30)
        assert not flushing.is_alive(), "flush-cache hung after its pool closed"
        ended = flushing.outcome
        assert isinstance(ended, StateError) and "before its destage finished" in str(ended)
    finally:
        faulty.clear()
        service.close()


def test_a_detach_destages_first_and_holds_up_nothing_else(
    tmp_path: Path, faulty: FaultMount
) -> None:
    """``set-cache --mode none`` destages before it detaches; the service's other calls
    answer while it waits, and the detach completes once the device does."""
    service = _service_with_a_stalled_destage(tmp_path, faulty)
    try:
        done = _waits_for_the_destage(
            service, faulty, lambda: service.set_cache("p", None, CacheMode.NONE)
        )
        assert isinstance(done, PoolInfo) and done.cache is None, done
        assert _read(service.home.pool("p")) == random.Random(5).randbytes(VOL)
    finally:
        faulty.clear()
        service.close()
