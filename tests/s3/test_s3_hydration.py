"""An imported S3 pool serves before its objects are local (``engine/hydration.py``).

The pool is imported into a second HOME through a proxy that slows the bucket's answers, so
that the objects are still being fetched while the tests read, write, flush, serve data
planes, attach a cache and kill the process. Every byte read is checked against a model,
and the bucket alone (a third HOME) must then read what the second HOME wrote and flushed.
"""

from __future__ import annotations

import json
import random
import shutil
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from s3server import MotoServer
from tcpproxy import Proxy

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
from prereq import require, require_module
from storvisor.api.metrics import MetricsSample, PoolSample, render
from storvisor.cli.output import pool_details
from storvisor.engine import hydration
from storvisor.engine.cache import CacheSpec
from storvisor.engine.home import Home
from storvisor.engine.hydration import DONE_NAME, PENDING_NAME
from storvisor.engine.object_backing import ObjectBacking
from storvisor.engine.pool import Pool
from storvisor.engine.s3 import S3Spec
from storvisor.engine.types import CacheMode
from storvisor.testing import crashkit
from storvisor.testing.crashkit import History
from storvisor.testing.crashkit.writers import EngineReader
from waiting import wait_until

KiB = 1 << 10
MiB = 1 << 20
OBJECT = 256 * KiB


@pytest.fixture
def fuse() -> None:
    require_fuse()


@pytest.fixture
def slow(aws_env: MotoServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Proxy]:
    """A proxy to the S3 server whose connections answer at 256 KiB/s each (an object in
    1 s); two background fetches at a time in this process."""
    monkeypatch.setattr(hydration, "FETCH_THREADS", 2)
    url = urlsplit(aws_env.url)
    proxy = Proxy((url.hostname or "127.0.0.1", url.port or 80))
    proxy.rate = 256 * KiB
    try:
        yield proxy
    finally:
        proxy.stop()


def _exported(
    aws_env: MotoServer, tmp_path: Path, sizes: dict[str, int], gone: int = 16 * MiB
) -> tuple[str, dict[str, bytes]]:
    """A bucket holding pool ``p`` with volumes of random bytes (``sizes``), after the
    clusters of a deleted volume of ``gone`` bytes: the first objects, which the background
    fetches first, stale data that the pool may hand out again. Its HOME released it.
    Returns the bucket and each volume's bytes."""
    bucket = aws_env.bucket()
    rng = random.Random(5)
    first = Home(tmp_path / "first")
    try:
        first.create_s3_pool(
            "p",
            aws_env.spec(bucket),
            size=gone + sum(sizes.values()) + 16 * MiB,
            object_size=OBJECT,
        )
        pool = first.pool("p")
        content = {}
        for name, size in {"gone": gone, **sizes}.items():
            pool.create_volume(name, size)
            data = rng.randbytes(size)
            volume = pool.open_volume(name)
            try:
                volume.write(0, data)
            finally:
                volume.close()
            content[name] = data
        pool.delete_volume("gone")
        del content["gone"]
        pool.flush()
    finally:
        first.close()
    return bucket, content


def _backing(pool: Pool) -> ObjectBacking:
    (backing,) = pool._backings.values()
    assert isinstance(backing, ObjectBacking)
    return backing


def _check_metrics(pool: Pool, url: str) -> None:
    """``pool show`` and the metrics tell the objects still to fetch and the endpoint."""
    info = pool.info()
    assert info.fetching is not None and 0 < info.fetching.left <= info.fetching.total
    text = render(MetricsSample((), (PoolSample(info, (), 0),), (), ())).decode()
    left = float(info.fetching.left)
    assert f'storvisor_pool_objects_to_fetch{{pool="p"}} {left}' in text, text
    assert f'storvisor_pool_endpoint_up{{endpoint="{url}",pool="p"}} 1.0' in text, text
    assert f'storvisor_pool_endpoint_requests_total{{endpoint="{url}",pool="p"}}' in text
    assert "objects still in the bucket" in pool_details(info)
    promtool = shutil.which("promtool")
    require(promtool, "promtool is not installed (Debian package prometheus)")
    assert promtool is not None
    lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_an_imported_pool_reads_and_writes_while_its_objects_arrive(
    aws_env: MotoServer, slow: Proxy, tmp_path: Path
) -> None:
    bucket, model = _exported(aws_env, tmp_path, {"v": 4 * MiB})
    second = Home(tmp_path / "second")
    try:
        second.import_s3_pool("p", S3Spec(bucket, (slow.url,), "us-east-1"))
        pool = second.pool("p")
        backing = _backing(pool)
        directory = tmp_path / "second" / "pools" / "p"
        assert (directory / PENDING_NAME).exists()
        progress = backing.hydrating
        assert progress is not None and progress[0] > progress[1] // 2, progress
        _check_metrics(pool, slow.url)
        rng = random.Random(9)
        v = bytearray(model["v"])
        volume = pool.open_volume("v")
        try:
            for i in range(24):  # reads of objects not fetched yet fetch them first
                length = rng.choice([512, 4 * KiB, 64 * KiB, 300 * KiB])
                offset = rng.randrange((len(v) - length) // 512) * 512
                if i % 3 == 0:  # writes land after the fetch, never under it
                    data = rng.randbytes(length)
                    volume.write(offset, data)
                    v[offset : offset + length] = data
                buf = bytearray(length)
                volume.read_into(offset, memoryview(buf))
                assert buf == v[offset : offset + length], (i, offset, length)
            pool.create_volume("w", 2 * MiB)  # allocates clusters the bucket held stale
            w = pool.open_volume("w")
            try:
                fresh = rng.randbytes(2 * MiB)
                w.write(0, fresh)
            finally:
                w.close()
            volume.flush()
            left = backing.hydrating
            assert left is not None and left[0] > 0, "every object arrived: the test ran late"
        finally:
            volume.close()
        slow.rate = 0.0
        wait_until(lambda: backing.hydrating is None, "the rest of the objects", timeout=60)
        assert not (directory / PENDING_NAME).exists() and not (directory / DONE_NAME).exists()
        assert pool.info().fetching is None
        assert EngineReader(pool).read("v") == v
        assert EngineReader(pool).read("w") == fresh
        assert pool.fsck().clean
    finally:
        second.close()

    third = Home(tmp_path / "third")  # the bucket alone
    try:
        third.import_s3_pool("p", aws_env.spec(bucket))
        pool = third.pool("p")
        assert EngineReader(pool).read("v") == v
        assert EngineReader(pool).read("w") == fresh
        assert pool.fsck().clean
    finally:
        third.close()


def test_data_planes_read_through_the_pool_until_the_image_is_whole(
    aws_env: MotoServer, slow: Proxy, tmp_path: Path
) -> None:
    """NBD served by a data-plane process reads the imported volume while its objects are
    fetched (the plane sends its reads to the pool), then directly once they are all in."""
    nbd = require_module("nbd", "libnbd's Python binding (Debian package python3-libnbd)")
    from storvisor.exports.nbd_worker import DataPlanes

    bucket, model = _exported(aws_env, tmp_path, {"v": 4 * MiB})
    second = Home(tmp_path / "second")
    planes = DataPlanes(processes=1)
    planes.start()
    try:
        second.import_s3_pool("p", S3Spec(bucket, (slow.url,), "us-east-1"))
        pool = second.pool("p")
        backing = _backing(pool)
        planes.add_export("v", lambda: pool.open_volume("v"), "", read_only=False)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        assert planes.hand_over(theirs)
        h = nbd.NBD()
        h.set_export_name("v")
        h.connect_socket(ours.detach())
        try:
            assert backing.hydrating is not None
            rng = random.Random(3)
            for _ in range(6):
                offset = rng.randrange((4 * MiB - 64 * KiB) // 512) * 512
                assert h.pread(64 * KiB, offset) == model["v"][offset : offset + 64 * KiB]
            assert backing.hydrating is not None, "every object arrived: the test ran late"
            slow.rate = 0.0
            wait_until(lambda: backing.hydrating is None, "the rest of the objects", timeout=60)
            wait_until(lambda: not pool._reads_here, "the planes told to read directly")
            assert h.pread(4 * MiB, 0) == model["v"]
        finally:
            h.shutdown()
    finally:
        planes.close()
        second.close()


def test_a_cache_attached_while_objects_arrive_waits_for_them(
    aws_env: MotoServer, slow: Proxy, tmp_path: Path
) -> None:
    bucket, model = _exported(aws_env, tmp_path, {"v": 2 * MiB}, gone=2 * MiB)
    second = Home(tmp_path / "second")
    try:
        second.import_s3_pool("p", S3Spec(bucket, (slow.url,), "us-east-1"))
        pool = second.pool("p")
        backing = _backing(pool)
        assert backing.hydrating is not None
        slow.rate = MiB
        pool.set_cache(CacheSpec(str(tmp_path / "cache.img"), 4 * MiB), CacheMode.WRITEBACK)
        assert backing.hydrating is None  # the cache reads and writes the image directly
        assert EngineReader(pool).read("v") == model["v"]
        assert pool.fsck().clean
    finally:
        second.close()


def test_a_torn_record_of_a_fetch_fetches_that_object_again(
    aws_env: MotoServer, slow: Proxy, tmp_path: Path
) -> None:
    """A crash can leave the log's last record half written: it is ignored, and the object
    it named is fetched again over whatever the image holds there."""
    bucket, model = _exported(aws_env, tmp_path, {"v": 2 * MiB})
    second = Home(tmp_path / "second")
    spec = S3Spec(bucket, (slow.url,), "us-east-1")
    second.import_s3_pool("p", spec)
    second.close()  # at once: few objects were fetched
    directory = tmp_path / "second" / "pools" / "p"
    listed = set(json.loads((directory / PENDING_NAME).read_text()))
    log = (directory / DONE_NAME).read_bytes()
    recorded = {index for index, _ in struct.iter_unpack("<QI", log)}  # index, CRC-32
    unfetched = max(listed - recorded)  # one of v's, the last the background fetches
    with open(directory / DONE_NAME, "ab") as f:
        f.write(bytes(7))  # a torn record
    with open(directory / "data", "r+b") as f:  # garbage where an object not recorded goes
        f.seek(OBJECT * unfetched)
        f.write(b"\xa5" * OBJECT)
    slow.rate = 0.0
    second = Home(tmp_path / "second")
    try:
        pool = second.pool("p")
        backing = _backing(pool)
        wait_until(lambda: backing.hydrating is None, "every object", timeout=60)
        assert EngineReader(pool).read("v") == model["v"]
        assert pool.fsck().clean
    finally:
        second.close()


ROUNDS = 4


@pytest.mark.slow
def test_kill9_rounds_while_objects_arrive_then_the_bucket_alone(
    aws_env: MotoServer, slow: Proxy, tmp_path: Path
) -> None:
    """The crash kit's workload on an imported pool whose objects are still being fetched,
    killed at random points: every flushed write is there after each restart, fsck is clean,
    and a fetch resumed after a crash never lays the bucket's old bytes over a write."""
    seed, rng = seeded()
    bucket, known = _exported(aws_env, tmp_path, {"v": MiB}, gone=64 * MiB)
    slow.rate = 64 * KiB  # 16 fetches at a time, 4 s each: 65 s for them all
    home_dir = tmp_path / "second"
    home = Home(home_dir)
    home.import_s3_pool("p", S3Spec(bucket, (slow.url,), "us-east-1"))
    home.close()
    pending = home_dir / "pools" / "p" / PENDING_NAME

    mid_fetch = flushed_rounds = 0
    for round_ in range(ROUNDS):
        where = f"seed {seed} (STORVISOR_CRASH_SEED), round {round_}"
        # the first round flushes often and runs long enough to reach a flush (at 0.02 and
        # 10-200 operations, every round could end before one)
        first = round_ == 0
        rates = (0.1,) if first else (0.1, 0.02)
        worker = worker_args(rng, round_, snapshots=False, flush_rates=rates)
        logged = rng.randrange(100 if first else 10, 200)
        records = kill9_round(home_dir, where, rng, worker, logged=logged)
        mid_fetch += pending.exists()
        history = History(known, records)
        flushed_rounds += history.durable
        known = crashkit.check_home(home_dir, history, where)
    assert flushed_rounds >= 1, f"seed {seed}: no round reached a flush"
    assert mid_fetch >= 2, f"seed {seed}: only {mid_fetch} rounds were killed while fetching"

    slow.rate = 0.0
    home = Home(home_dir)
    try:
        pool = home.pool("p")
        backing = _backing(pool)
        wait_until(lambda: backing.hydrating is None, "every object", timeout=60)
        problems = History(known, []).verify(EngineReader(pool))
        assert not problems, f"seed {seed}: " + "; ".join(map(str, problems))
    finally:
        home.close()
    check_bucket_alone(tmp_path / "other", aws_env.spec(bucket), History(known, []), f"seed {seed}")


def test_the_wait_for_an_object_fails_with_the_bucket_and_recovers(
    aws_env: MotoServer, slow: Proxy, tmp_path: Path
) -> None:
    """A read that needs an object while no endpoint answers fails (EIO after the pool's
    down timeout) and loses nothing; once the endpoint is back the read succeeds."""
    from storvisor.errors import IOFailure

    bucket, model = _exported(aws_env, tmp_path, {"v": 4 * MiB})
    second = Home(tmp_path / "second")
    try:
        spec = S3Spec(bucket, (slow.url,), "us-east-1", down_timeout=1.0)
        second.import_s3_pool("p", spec)
        pool = second.pool("p")
        slow.stop()
        volume = pool.open_volume("v")
        try:
            buf = bytearray(64 * KiB)
            last = 4 * MiB - len(buf)  # fetched last
            with pytest.raises(IOFailure):
                volume.read_into(last, memoryview(buf))
            slow.start()
            slow.rate = 0.0
            volume.read_into(last, memoryview(buf))
            assert buf == model["v"][last:]
        finally:
            volume.close()
        backing = _backing(pool)
        wait_until(lambda: backing.hydrating is None, "every object", timeout=60)
        assert EngineReader(pool).read("v") == model["v"]
    finally:
        second.close()


@pytest.mark.slow
@pytest.mark.usefixtures("fuse")
def test_power_cuts_while_objects_arrive_then_the_bucket_alone(
    aws_env: MotoServer, slow: Proxy, tmp_path: Path
) -> None:
    """The HOME on the power-cut file system (unsynced writes vanish at the cut) while its
    objects are fetched: an object is recorded as fetched only once its bytes are synced,
    so after each cut the volumes read every flushed write and every byte they had."""
    seed, rng = seeded()
    bucket, known = _exported(aws_env, tmp_path, {"v": MiB}, gone=64 * MiB)
    slow.rate = 64 * KiB  # as above
    disk = CutDisk.make(tmp_path)
    home_dir = disk.link / "home"
    home = Home(home_dir)
    home.import_s3_pool("p", S3Spec(bucket, (slow.url,), "us-east-1"))
    home.close()
    pending = home_dir / "pools" / "p" / PENDING_NAME

    mid_fetch = 0
    for round_ in range(3):
        where = f"seed {seed} (STORVISOR_CRASH_SEED), round {round_}"
        worker = worker_args(rng, round_, snapshots=False)
        # the file system cuts the power itself at a sync, or the test after some operations
        cut = cut_schedule(rng, round_, 3, syncs=40, ops=200, opening=False)
        records = powercut_round(disk, home_dir, where, rng, worker, **cut)
        mid_fetch += pending.exists()
        known = crashkit.check_home(home_dir, History(known, records), where)
    assert mid_fetch >= 2, f"seed {seed}: only {mid_fetch} cuts came while fetching"

    slow.rate = 0.0
    home = Home(home_dir)
    try:
        pool = home.pool("p")
        wait_until(lambda: _backing(pool).hydrating is None, "every object", timeout=60)
        problems = History(known, []).verify(EngineReader(pool))
        assert not problems, f"seed {seed}: " + "; ".join(map(str, problems))
    finally:
        home.close()
    check_bucket_alone(tmp_path / "other", aws_env.spec(bucket), History(known, []), f"seed {seed}")
