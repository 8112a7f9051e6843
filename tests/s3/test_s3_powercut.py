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

from pathlib import Path

import pytest
from s3server import MotoServer

from crashrounds import (
    CutDisk,
    check_bucket_alone,
    cut_schedule,
    powercut_round,
    seeded,
    worker_args,
)
from powercuts import require_fuse
from storvisor.engine.home import Home
from storvisor.testing import crashkit
from storvisor.testing.crashkit import History

ROUNDS = 4
VOLUME = 1 << 20
MiB = 1 << 20


@pytest.fixture
def fuse() -> None:
    require_fuse()


@pytest.mark.usefixtures("fuse")
def test_powercut_rounds_then_the_bucket_alone(aws_env: MotoServer, tmp_path: Path) -> None:
    seed, rng = seeded()
    bucket = aws_env.bucket()
    disk = CutDisk.make(tmp_path)
    home_dir = disk.link / "home"
    home = Home(home_dir)
    home.create_s3_pool("p", aws_env.spec(bucket), size=16 * MiB, object_size=MiB)
    home.pool("p").create_volume("v", VOLUME)
    home.close()

    known: dict[str, bytes] = {"v": bytes(VOLUME)}
    flushed_rounds = 0
    for round_ in range(ROUNDS):
        where = f"seed {seed} (STORVISOR_CRASH_SEED), round {round_}"
        worker = worker_args(rng, round_, snapshots=round_ % 2 == 1)
        # the file system cuts the power itself at a sync, or the test after some operations
        cut = cut_schedule(rng, round_, ROUNDS, syncs=60, ops=400, opening=False)
        records = powercut_round(disk, home_dir, where, rng, worker, **cut)
        history = History(known, records)
        if history.durable:
            flushed_rounds += 1
        if round_ < ROUNDS - 1:
            known = crashkit.check_home(home_dir, history, where)
            continue
        # the HOME is lost: the bucket alone
        check_bucket_alone(tmp_path / "other", aws_env.spec(bucket), history, where, force=True)
    assert flushed_rounds >= 1, f"seed {seed}: no round reached a flush"
