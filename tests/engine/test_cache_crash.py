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

from pathlib import Path

import pytest

from crashrounds import CutDisk, cut_schedule, kill9_round, powercut_round, seeded, worker_args
from powercuts import require_fuse
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
    seed, rng = seeded()
    home_dir = tmp_path / "home"
    _create(home_dir, tmp_path / "b0.img", tmp_path / "cache.img")
    known: dict[str, bytes] = {"v": bytes(VOLUME)}
    flushed_rounds = 0
    for round_ in range(ROUNDS):
        where = f"seed {seed} (STORVISOR_CRASH_SEED), round {round_}"
        worker = worker_args(
            rng,
            round_,
            ops=2000,
            flush_rates=(0.1, 0.02, 0.005),
            discards=round_ % 3 != 0,
            snapshots=round_ % 2 == 1,
        )
        if round_ % 5 == 4:  # while it opens the Home (and the cache destages)
            when = {"opening": rng.uniform(0.0, 0.4)}
        else:
            when = {"logged": rng.randrange(10, 2000), "jitter": 0.02}
        records = kill9_round(home_dir, where, rng, worker, ready_timeout=30, **when)
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
    seed, rng = seeded()
    disk = CutDisk.make(tmp_path)
    home_dir = disk.link / "home"
    _create(home_dir, disk.link / "b0.img", disk.link / "cache.img", mode)
    known: dict[str, bytes] = {"v": bytes(VOLUME)}
    flushed_rounds = 0
    for round_ in range(ROUNDS):
        where = f"seed {seed} (STORVISOR_CRASH_SEED), round {round_}"
        worker = worker_args(rng, round_, ops=1500, snapshots=round_ % 4 >= 2)
        cut = cut_schedule(rng, round_, ROUNDS, syncs=200, ops=1500)
        records = powercut_round(disk, home_dir, where, rng, worker, **cut)
        history = History(known, records)
        if history.durable:
            flushed_rounds += 1
        known = _check(home_dir, history, where)
    assert flushed_rounds >= ROUNDS // 3, f"seed {seed}: too few rounds reached a flush"
