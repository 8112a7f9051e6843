"""Crash tests of a pool with a writeback cache tier (``engine/cache.py``).

The crashkit worker (``storvisor.testing.crashkit``) writes, flushes, snapshots, clones and
discards on a pool whose backing device sits behind a small writeback cache (a few hundred
lines: the workload keeps evicting, copying lines of closed epochs and waiting for the
destage), and is killed at a random moment. The Home is then opened here, through the
cache: ``fsck`` must be clean and every volume, snapshot and clone must match the worker's
log (``crashkit.History``): no flushed write lost, no old and new data mixed.

``test_cache_kill9_rounds`` SIGKILLs the worker (the page cache survives: the cache's
unflushed epoch, which the table never recorded, must not come back as anything but what
the contract allows). ``test_cache_powercut_rounds`` puts the Home, the backing device and
the cache device on the power-cut file system (``storvisor.testing.powercut``) and cuts the
power: only what was synced survives, on every device, in any order the syncs allow; it
runs in writethrough mode too.
"""

from __future__ import annotations

import functools
import os
import random
import signal
import time
from pathlib import Path

import pytest

from powercuts import Mount, require_fuse
from powercuts import point as _point
from storvisor.engine.cache import CacheSpec
from storvisor.engine.home import Home
from storvisor.engine.types import BackingSpec, CacheMode
from storvisor.testing import crashkit
from storvisor.testing.crashkit import History

ROUNDS = 10
VOLUME = 1 << 20
DEVICE_BYTES = 16 << 20
CACHE_BYTES = 1 << 20  # 240 lines of 4 KiB


def _create(
    home_dir: Path, backing: Path, cache: Path, mode: CacheMode = CacheMode.WRITEBACK
) -> None:
    home = Home(home_dir)
    try:
        home.create_pool("p", [BackingSpec(str(backing), size=DEVICE_BYTES)], 4096)
        pool = home.pool("p")
        pool.set_cache(CacheSpec(str(cache), CACHE_BYTES), mode)
        pool.create_volume("v", VOLUME)
        info = pool.info().cache
        assert info is not None and info.mode is mode
    finally:
        home.close()


def _check(home_dir: Path, history: History, where: str) -> dict[str, bytes]:
    known = crashkit.check_home(home_dir, history, where)
    home = Home(home_dir)
    try:
        cache = home.pool("p").info().cache
        assert cache is not None and cache.state == "ok", f"{where}: cache after reopen: {cache}"
    finally:
        home.close()
    return known


def test_cache_kill9_rounds(tmp_path: Path) -> None:
    seed = int(os.environ.get("STORVISOR_CRASH_SEED", random.randrange(1 << 32)))
    rng = random.Random(seed)
    home_dir = tmp_path / "home"
    _create(home_dir, tmp_path / "b0.img", tmp_path / "cache.img")
    known: dict[str, bytes] = {"v": bytes(VOLUME)}
    flushed_rounds = 0
    for round_ in range(ROUNDS):
        where = f"seed {seed} (STORVISOR_CRASH_SEED), round {round_}"
        worker = crashkit.WorkerProcess(
            home_dir,
            seed=rng.randrange(1 << 32),
            round_=round_,
            ops=2000,
            flush_rate=rng.choice([0.1, 0.02, 0.005]),
            discards=round_ % 3 != 0,
            snapshots=round_ % 2 == 1,
        )
        try:
            if round_ % 5 == 4:  # while it opens the Home (and the cache destages)
                time.sleep(rng.uniform(0.0, 0.4))
            else:
                assert worker.ready.wait(30), f"{where}: worker never became ready"
                count = rng.randrange(10, 2000)
                worker.wait_for(functools.partial(worker.logged, count), timeout=60)
                time.sleep(rng.uniform(0.0, 0.02))
        except TimeoutError as e:
            worker.kill()
            raise AssertionError(f"{where}: {e}; worker stderr: {worker.stderr}") from e
        records = worker.kill()
        assert worker.proc.returncode == -signal.SIGKILL, f"worker died early: {worker.stderr}"
        history = History(known, records)
        if history.durable:
            flushed_rounds += 1
        known = _check(home_dir, history, where)
    assert flushed_rounds >= ROUNDS // 4, f"seed {seed}: too few rounds reached a flush"


@pytest.fixture
def fuse() -> None:
    """Skips the test when a FUSE file system cannot be mounted here (fails it in CI)."""
    require_fuse()


@pytest.mark.usefixtures("fuse")
@pytest.mark.parametrize("mode", [CacheMode.WRITEBACK, CacheMode.WRITETHROUGH])
def test_cache_powercut_rounds(tmp_path: Path, mode: CacheMode) -> None:
    seed = int(os.environ.get("STORVISOR_CRASH_SEED", random.randrange(1 << 32)))
    rng = random.Random(seed)
    backing, mountpoint, disk = tmp_path / "backing", tmp_path / "mnt", tmp_path / "disk"
    backing.mkdir()
    mountpoint.mkdir()
    _point(disk, backing)
    home_dir = disk / "home"
    _create(home_dir, disk / "b0.img", disk / "cache.img", mode)
    known: dict[str, bytes] = {"v": bytes(VOLUME)}
    flushed_rounds = 0
    for round_ in range(ROUNDS):
        where = f"seed {seed} (STORVISOR_CRASH_SEED), round {round_}"
        cut = "open" if round_ == ROUNDS - 1 else ("sync", "moment")[round_ % 2]
        _point(disk, mountpoint)
        mount = Mount(
            backing,
            mountpoint,
            writeback=rng.choice([0.0, 0.1]),
            seed=rng.randrange(1 << 32),
            cut_at_sync=rng.randrange(1, 200) if cut == "sync" else None,
        )
        try:
            worker = crashkit.WorkerProcess(
                home_dir,
                seed=rng.randrange(1 << 32),
                round_=round_,
                ops=1500,
                flush_rate=rng.choice([0.1, 0.02]),
                discards=True,
                snapshots=round_ % 4 >= 2,
            )
            if cut == "open":
                time.sleep(rng.uniform(0.0, 0.5))
            elif cut == "sync":
                worker.wait_for(mount.has_cut, timeout=60)
            else:
                assert worker.ready.wait(30), f"{where}: worker never became ready"
                worker.wait_for(functools.partial(worker.logged, rng.randrange(10, 1500)), 60)
                time.sleep(rng.uniform(0.0, 0.02))
            alive = worker.proc.poll() is None
            cut_itself = mount.has_cut()
            mount.cut()
            records = worker.kill()
            assert alive or cut_itself, f"{where}: worker ended before the cut: {worker.stderr}"
        finally:
            mount.close()
        _point(disk, backing)
        history = History(known, records)
        if history.durable:
            flushed_rounds += 1
        known = _check(home_dir, history, where)
    assert flushed_rounds >= ROUNDS // 3, f"seed {seed}: too few rounds reached a flush"
