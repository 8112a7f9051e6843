"""Power-cut tests: the durability contract against a crash of the machine, not only of the
process.

The Home and its backing device live on ``storvisor.testing.powercut``, a FUSE file system
that keeps every file's unsynced writes in memory. Each round mounts it, runs the crashkit
worker on the Home through the mount, and cuts the power: SIGKILL of the file system
(whatever was not fsync'd or fdatasync'd vanishes), then of the worker. The cut comes after a
random number of operations, while the worker opens the Home, or from the file system itself
as a random sync arrives (where a catalog committed before its data would show). The Home
is then opened from the backing directory itself: fsck must be clean and every volume,
snapshot and clone must match the worker's log (``crashkit.History``). A data sync missing
before a catalog commit leaves committed mappings over clusters whose data never reached the
disk, which the checker reports.

The catalog records device paths, so the Home is reached through a symbolic link that points
at the mount during a round and at the backing directory before and after it.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from crashrounds import CutDisk, cut_schedule, powercut_round, seeded, worker_args
from powercuts import Mount, require_fuse
from storvisor.engine.home import Home
from storvisor.engine.types import BackingSpec
from storvisor.testing import crashkit
from storvisor.testing.crashkit import History
from storvisor.testing.powercut import SECTOR, FileCache

ROUNDS = 10
VOLUME = 1 << 20
DEVICE_BYTES = 16 << 20


@pytest.fixture
def fuse() -> None:
    """Skips the test when a FUSE file system cannot be mounted here (fails it in CI)."""
    require_fuse()


@pytest.mark.usefixtures("fuse")
def test_a_cut_keeps_only_synced_content(tmp_path: Path) -> None:
    """Through the mount: reads see unsynced writes and truncates, closing a file does not
    sync it, and after the cut each file holds its last synced content; names and the
    pass-through ``-shm`` file are on the backing directory at once."""
    backing, mountpoint = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    mountpoint.mkdir()
    mount = Mount(backing, mountpoint, writeback=0.0, seed=0)
    try:
        fd = os.open(mountpoint / "f", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.pwrite(fd, b"a" * 10_000, 0)
            os.fdatasync(fd)
            os.pwrite(fd, b"b" * 5000, 8000)
            os.ftruncate(fd, 12_000)
            assert os.pread(fd, 20_000, 0) == b"a" * 8000 + b"b" * 4000
            assert os.fstat(fd).st_size == 12_000
        finally:
            os.close(fd)
        (mountpoint / "g").write_bytes(b"never synced")
        (mountpoint / "x-shm").write_bytes(b"index")
        assert (backing / "f").read_bytes() == b"a" * 10_000
        assert (backing / "x-shm").read_bytes() == b"index"
        mount.cut()
    finally:
        mount.close()
    assert (backing / "f").read_bytes() == b"a" * 10_000
    assert (backing / "g").read_bytes() == b""


@pytest.mark.usefixtures("fuse")
def test_powercut_rounds(tmp_path: Path) -> None:
    """Rounds of workload and power cut on one Home; what survived a round is the known
    content of the next (see the module docstring)."""
    seed, rng = seeded()
    disk = CutDisk.make(tmp_path)
    home_dir = disk.link / "home"
    home = Home(home_dir)
    home.create_pool("p", [BackingSpec(str(disk.link / "b0.img"), size=DEVICE_BYTES)], 4096)
    home.pool("p").create_volume("v", VOLUME)
    home.close()

    known: dict[str, bytes] = {"v": bytes(VOLUME)}
    flushed_rounds = 0
    for round_ in range(ROUNDS):
        where = f"seed {seed} (STORVISOR_CRASH_SEED), round {round_}"
        # the file system cuts the power itself at a sync, or the test cuts it at a random
        # moment: after some operations, or while the worker opens the Home (and recovers)
        worker = worker_args(rng, round_, ops=1500, snapshots=round_ % 4 >= 2)
        cut = cut_schedule(rng, round_, ROUNDS, syncs=150, ops=1500)
        records = powercut_round(disk, home_dir, where, rng, worker, **cut)
        history = History(known, records)
        if history.durable:
            flushed_rounds += 1
        known = crashkit.check_home(home_dir, history, where)
    assert flushed_rounds >= ROUNDS // 3, f"seed {seed}: too few rounds reached a flush"


def test_file_cache_against_a_model(tmp_path: Path) -> None:
    """``FileCache`` shows every write and truncate at once but keeps them off the backing
    file, puts exactly the shown content there at a sync, writes back early only one sector
    of the newest content (zeros past the end) and never a size, and after a cut (a fresh
    cache) shows what the backing file holds."""
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    path = tmp_path / "f"
    path.write_bytes(rng.randbytes(10_000))
    fd = os.open(path, os.O_RDWR)
    try:
        cache = FileCache(fd)
        shown = bytearray(path.read_bytes())
        disk = bytes(shown)  # what the backing file must hold
        for step in range(3000):
            where = f"seed {seed}, step {step}"
            roll = rng.random()
            if roll < 0.45:
                offset, data = rng.randrange(40_000), rng.randbytes(rng.randrange(1, 9000))
                cache.write(offset, data)
                shown.extend(bytes(max(offset + len(data) - len(shown), 0)))
                shown[offset : offset + len(data)] = data
            elif roll < 0.6:
                size = rng.randrange(40_000)
                cache.truncate(size)
                shown = shown[:size] + bytes(max(size - len(shown), 0))
            elif roll < 0.75:
                cache.write_back_one(rng)
                now = path.read_bytes()
                assert len(now) == len(disk), f"{where}: an early write-back changed the size"
                changed = [
                    i
                    for i in range(0, len(now), SECTOR)
                    if now[i : i + SECTOR] != disk[i : i + SECTOR]
                ]
                assert len(changed) <= 1, f"{where}: more than one sector written back"
                newest = shown + bytes(max(len(now) - len(shown), 0))  # zeros past the end
                for i in changed:
                    assert now[i : i + SECTOR] == newest[i : i + SECTOR], f"{where}: stale sector"
                disk = now
            elif roll < 0.8:
                cache.sync()
                disk = bytes(shown)
                assert path.read_bytes() == disk, f"{where}: the sync wrote something else"
            elif roll < 0.85:
                cache = FileCache(fd)  # the power cut: the cache is gone
                shown = bytearray(disk)
            else:
                offset, length = rng.randrange(45_000), rng.randrange(1, 20_000)
                got = cache.read(offset, length)
                assert got == shown[offset : offset + length], f"{where}: read"
            assert cache.size == len(shown), f"{where}: size"
            if roll < 0.6:
                assert path.read_bytes() == disk, f"{where}: a write or truncate reached the disk"
    finally:
        os.close(fd)
