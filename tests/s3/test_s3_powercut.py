"""Power cuts under an S3 pool: the HOME (catalog, journal, local image) lives on the
powercut file system (``storvisor.testing.powercut``: unsynced writes vanish at the cut),
the bucket on the S3 server.

Rounds of the crash kit's workload end in a power cut; the HOME then opens from what was
synced (fsck clean, every flushed write there: ``crashkit.check_home``), and uploads what it
recovered. The last round's cut leaves the HOME behind for good: the pool is imported from
the bucket alone into another HOME (``--force``: the dead host still holds the lease), which
must hold every write flushed before that cut.
"""

from __future__ import annotations

import functools
import os
import random
import time
from pathlib import Path

import pytest
from s3server import MotoServer

from powercuts import Mount, require_fuse
from powercuts import point as _point
from storvisor.engine.home import Home
from storvisor.testing import crashkit
from storvisor.testing.crashkit import History
from storvisor.testing.crashkit.writers import EngineReader

ROUNDS = 4
VOLUME = 1 << 20
MiB = 1 << 20


@pytest.fixture
def fuse() -> None:
    require_fuse()


@pytest.mark.usefixtures("fuse")
def test_powercut_rounds_then_the_bucket_alone(aws_env: MotoServer, tmp_path: Path) -> None:
    seed = int(os.environ.get("STORVISOR_CRASH_SEED", random.randrange(1 << 32)))
    rng = random.Random(seed)
    bucket = aws_env.bucket()
    backing, mountpoint, disk = tmp_path / "backing", tmp_path / "mnt", tmp_path / "disk"
    backing.mkdir()
    mountpoint.mkdir()
    _point(disk, backing)
    home_dir = disk / "home"
    home = Home(home_dir)
    home.create_s3_pool("p", aws_env.spec(bucket), size=16 * MiB, object_size=MiB)
    home.pool("p").create_volume("v", VOLUME)
    home.close()

    known: dict[str, bytes] = {"v": bytes(VOLUME)}
    flushed_rounds = 0
    for round_ in range(ROUNDS):
        where = f"seed {seed} (STORVISOR_CRASH_SEED), round {round_}"
        cut = ("sync", "moment")[round_ % 2]
        _point(disk, mountpoint)
        mount = Mount(
            backing,
            mountpoint,
            writeback=rng.choice([0.0, 0.1]),
            seed=rng.randrange(1 << 32),
            cut_at_sync=rng.randrange(1, 60) if cut == "sync" else None,
        )
        try:
            worker = crashkit.WorkerProcess(
                home_dir,
                seed=rng.randrange(1 << 32),
                round_=round_,
                ops=400,
                flush_rate=rng.choice([0.1, 0.02]),
                discards=True,
                snapshots=round_ % 2 == 1,
            )
            if cut == "sync":
                try:
                    worker.wait_for(mount.has_cut, timeout=60)
                except TimeoutError as e:
                    worker.kill()
                    raise AssertionError(f"{where}: {e}; worker stderr: {worker.stderr}") from e
            else:
                assert worker.ready.wait(60), f"{where}: worker never became ready"
                worker.wait_for(functools.partial(worker.logged, rng.randrange(10, 400)), 60)
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
        if round_ < ROUNDS - 1:
            known = crashkit.check_home(home_dir, history, where)
            continue
        other = Home(tmp_path / "other")  # the HOME is lost: the bucket alone
        try:
            other.import_s3_pool("p", aws_env.spec(bucket), force=True)
            pool = other.pool("p")
            report = pool.fsck()
            assert report.clean, f"{where}: fsck of the bucket's pool: {report}"
            problems = history.verify(EngineReader(pool))
            assert not problems, f"{where}: the bucket: " + "; ".join(map(str, problems))
        finally:
            other.close()
    assert flushed_rounds >= 1, f"seed {seed}: no round reached a flush"
