"""A writeback cache tier in front of an S3 pool (``engine/cache.py``).

kill -9 rounds of the crash kit's worker on an S3 pool behind a small writeback cache, and
power-cut rounds with the HOME and the cache device on the power-cut file system: after
each, the HOME reopened through the cache must be fsck clean with every flushed write,
snapshot and clone intact. Then a clean ``flush-cache`` destages everything (data, then the
catalog that points at it), the first HOME closes, its cache device is deleted, and the
bucket alone, imported on a second HOME, must read exactly the same."""

from __future__ import annotations

from pathlib import Path

import pytest
from s3server import MotoServer

from crashrounds import (
    CutDisk,
    check_bucket_alone,
    cut_schedule,
    kill9_round,
    powercut_round,
    seeded,
    worker_args,
)
from powercuts import require_fuse
from storvisor.engine.cache import CacheSpec
from storvisor.engine.home import Home
from storvisor.engine.types import CacheMode
from storvisor.testing import crashkit
from storvisor.testing.crashkit import History
from storvisor.testing.crashkit.writers import EngineReader

ROUNDS = 4
VOLUME = 1 << 20
MiB = 1 << 20


def test_s3_writeback_cache_kill9_rounds_then_the_bucket_alone(
    aws_env: MotoServer, tmp_path: Path
) -> None:
    seed, rng = seeded()
    bucket = aws_env.bucket()
    home_dir = tmp_path / "home"
    cache = tmp_path / "cache.img"
    home = Home(home_dir)
    home.create_s3_pool("p", aws_env.spec(bucket), size=64 * MiB, object_size=MiB)
    pool = home.pool("p")
    pool.set_cache(CacheSpec(str(cache), 2 * MiB), CacheMode.WRITEBACK)
    pool.create_volume("v", VOLUME)
    home.close()

    known: dict[str, bytes] = {"v": bytes(VOLUME)}
    flushed_rounds = 0
    for round_ in range(ROUNDS):
        where = f"seed {seed} (STORVISOR_CRASH_SEED), round {round_}"
        worker = worker_args(rng, round_)
        records = kill9_round(home_dir, where, rng, worker, logged=rng.randrange(10, 400))
        history = History(known, records)
        if history.durable:
            flushed_rounds += 1
        known = crashkit.check_home(home_dir, history, where)
    assert flushed_rounds >= 1, f"seed {seed}: no round reached a flush"

    home = Home(home_dir)
    try:
        pool = home.pool("p")
        pool.flush_cache()
        info = pool.info().cache
        assert info is not None and info.dirty == 0 and info.state == "ok"
    finally:
        home.close()
    cache.unlink()  # the cache device is gone with the first host

    other = Home(tmp_path / "other")  # another host: the bucket alone
    try:
        other.import_s3_pool("p", aws_env.spec(bucket))
        pool = other.pool("p")
        assert pool.info().cache is None
        assert pool.fsck().clean
        problems = History(known, []).verify(EngineReader(pool))
        assert not problems, f"seed {seed}: the bucket differs: " + "; ".join(map(str, problems))
    finally:
        other.close()


def test_s3_writeback_flush_leaves_the_bucket_behind_until_the_destage(
    aws_env: MotoServer, tmp_path: Path
) -> None:
    """A flush with a writeback cache returns once the cache device holds the data; the
    bucket gets it (data objects first, then the catalog) from the destage."""
    bucket = aws_env.bucket()
    home = Home(tmp_path / "home")
    try:
        home.create_s3_pool("p", aws_env.spec(bucket), size=64 * MiB, object_size=MiB)
        pool = home.pool("p")
        pool.set_cache(CacheSpec(str(tmp_path / "c.img"), 4 * MiB), CacheMode.WRITEBACK)
        pool.create_volume("v", VOLUME)
        pool.flush_cache()
        before = aws_env.keys(bucket)
        vol = pool.open_volume("v")
        vol.write(0, b"\x17" * VOLUME)
        vol.flush()
        pool.flush_cache()
        after = aws_env.keys(bucket)
        assert after != before
        vol.close()
    finally:
        home.close()


@pytest.fixture
def fuse() -> None:
    require_fuse()


@pytest.mark.usefixtures("fuse")
def test_s3_writeback_cache_powercut_rounds_then_the_bucket_alone(
    aws_env: MotoServer, tmp_path: Path
) -> None:
    """The HOME and the cache device on the power-cut file system, the bucket on the S3
    server: after each cut the HOME reopens through the cache with every flushed write;
    after the last, a clean ``flush-cache`` and the bucket alone reads the same."""
    seed, rng = seeded()
    bucket = aws_env.bucket()
    disk = CutDisk.make(tmp_path)
    home_dir = disk.link / "home"
    home = Home(home_dir)
    home.create_s3_pool("p", aws_env.spec(bucket), size=16 * MiB, object_size=MiB)
    pool = home.pool("p")
    pool.set_cache(CacheSpec(str(disk.link / "cache.img"), 2 * MiB), CacheMode.WRITEBACK)
    pool.create_volume("v", VOLUME)
    home.close()

    known: dict[str, bytes] = {"v": bytes(VOLUME)}
    flushed_rounds = 0
    for round_ in range(ROUNDS):
        where = f"seed {seed} (STORVISOR_CRASH_SEED), round {round_}"
        worker = worker_args(rng, round_, snapshots=round_ % 2 == 1)
        # the file system cuts the power itself at a sync, or the test after some operations
        cut = cut_schedule(rng, round_, ROUNDS, syncs=80, ops=400, opening=False)
        records = powercut_round(disk, home_dir, where, rng, worker, **cut)
        history = History(known, records)
        if history.durable:
            flushed_rounds += 1
        known = crashkit.check_home(home_dir, history, where)
    assert flushed_rounds >= 1, f"seed {seed}: no round reached a flush"

    home = Home(home_dir)
    try:
        home.pool("p").flush_cache()
    finally:
        home.close()
    (disk.backing / "cache.img").unlink()
    check_bucket_alone(tmp_path / "other", aws_env.spec(bucket), History(known, []), f"seed {seed}")
