"""kill -9 of a process writing to an S3 pool, then the bucket alone on another HOME.

Each round runs the crash kit's worker (``python -m storvisor.testing.crashkit``) on the same
HOME over an S3 pool, SIGKILLs it after a random number of operations (or right after a
management operation returned), reopens the HOME here, requires fsck clean and every flushed
write, snapshot and clone to read back (``crashkit.check_home``). Then the pool is imported
from the bucket into a second HOME, with none of the first HOME's files: it must be fsck
clean and read exactly what the first HOME read after its last recovery.
"""

from __future__ import annotations

from pathlib import Path

from s3server import MotoServer

from crashrounds import check_bucket_alone, kill9_round, seeded, worker_args
from storvisor.engine.home import Home
from storvisor.testing import crashkit
from storvisor.testing.crashkit import History

ROUNDS = 4
VOLUME = 1 << 20
MiB = 1 << 20


def test_s3_crash_rounds_then_import_from_the_bucket(aws_env: MotoServer, tmp_path: Path) -> None:
    seed, rng = seeded()
    bucket = aws_env.bucket()
    home_dir = tmp_path / "home"
    home = Home(home_dir)
    home.create_s3_pool("p", aws_env.spec(bucket), size=64 * MiB, object_size=MiB)
    home.pool("p").create_volume("v", VOLUME)
    home.close()

    known: dict[str, bytes] = {"v": bytes(VOLUME)}
    flushed_rounds = 0
    for round_ in range(ROUNDS):
        where = f"seed {seed} (STORVISOR_CRASH_SEED), round {round_}"
        after_management = round_ % 2 == 1
        committed = rng.randrange(1, 4) if after_management else None
        worker = worker_args(rng, round_, kill_after_committed=committed)
        if after_management:
            records = kill9_round(home_dir, where, rng, worker, committed=True)
        else:
            records = kill9_round(home_dir, where, rng, worker, logged=rng.randrange(10, 400))
        history = History(known, records)
        if history.durable:
            flushed_rounds += 1
        known = crashkit.check_home(home_dir, history, where)  # closes: flushes to the bucket
    assert flushed_rounds >= 1, f"seed {seed}: no round reached a flush"

    # another host: the bucket alone
    check_bucket_alone(tmp_path / "other", aws_env.spec(bucket), History(known, []), f"seed {seed}")
