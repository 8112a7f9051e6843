"""S3 pools against a real S3 server (moto): the block-device contract, the engine's
semantics, durability in the bucket alone, the lease, and refusals of bad input."""

from __future__ import annotations

import hashlib
from itertools import count
from pathlib import Path

import pytest
from s3server import MotoServer

from storvisor.engine.device import BlockDevice
from storvisor.engine.home import Home
from storvisor.engine.object_backing import S3Config
from storvisor.engine.object_pool import object_backing
from storvisor.engine.pool import Pool
from storvisor.engine.s3 import LEASE_KEY, Bucket, LeaseLost, S3Spec
from storvisor.engine.types import BackingSpec
from storvisor.errors import Conflict, InvalidArgument, IOFailure, NotFound
from storvisor.testing.conformance import check_block_device

MiB = 1 << 20
POOL_BYTES = 64 * MiB


def create(home: Home, moto: MotoServer, bucket: str, name: str = "s") -> Pool:
    home.create_s3_pool(name, moto.spec(bucket), size=POOL_BYTES, object_size=MiB)
    return home.pool(name)


def contents(pool: Pool, name: str) -> bytes:
    volume, _, snapshot = name.partition("@")
    handle = pool.open_volume(volume, snapshot or None)
    try:
        buf = bytearray(handle.size)
        handle.read_into(0, memoryview(buf))
        return bytes(buf)
    finally:
        handle.close()


def test_s3_volume_conforms(aws_env: MotoServer, s3home: Home) -> None:
    pool = create(s3home, aws_env, aws_env.bucket())
    names = count()

    def make(size: int) -> BlockDevice:
        name = f"v{next(names)}"
        pool.create_volume(name, size)
        return pool.open_volume(name)

    check_block_device(make)
    assert pool.fsck().clean


def test_engine_semantics_on_s3_and_reopen_from_the_bucket_alone(
    aws_env: MotoServer, tmp_path: Path
) -> None:
    bucket = aws_env.bucket()
    first = Home(tmp_path / "first")
    pool = create(first, aws_env, bucket)
    pool.create_volume("v", 4 * MiB)
    v = pool.open_volume("v")
    v.write(0, b"A" * MiB)
    v.write(3 * MiB, b"B" * 4096)
    v.close()
    pool.create_snapshot("v", "s1")
    v = pool.open_volume("v")
    v.write(0, b"C" * 4096)  # copy-on-write over the snapshot
    v.discard(3 * MiB, 64 << 10)
    v.close()
    pool.clone("v", "s1", "c")
    c = pool.open_volume("c")
    c.write(MiB, b"D" * 8192)
    c.close()
    pool.flatten("c")
    pool.extend_volume("c", 6 * MiB)
    pool.create_snapshot("v", "s2")
    pool.rollback("v", "s1")
    pool.delete_snapshot("v", "s2")
    assert pool.fsck().clean
    expected = {name: contents(pool, name) for name in ("v", "v@s1", "c")}
    assert expected["v"][:MiB] == b"A" * MiB  # rolled back to s1
    assert expected["c"][MiB : MiB + 8192] == b"D" * 8192
    assert len(expected["c"]) == 6 * MiB
    first.close()  # flushes and releases the lease

    keys = aws_env.keys(bucket)
    assert {"storvisor/pool.json", "storvisor/catalog.db", LEASE_KEY} <= set(keys)
    data_keys = [k for k in keys if k.startswith("data/")]
    assert 1 <= len(data_keys) < POOL_BYTES // MiB  # thin: unwritten objects are absent
    for key in data_keys:  # each stored object is what the local image holds there
        index = int(key.removeprefix("data/"), 16)
        with open(tmp_path / "first/pools/s/data", "rb") as f:
            f.seek(index * MiB)
            local = f.read(MiB)
        assert keys[key].strip('"') == hashlib.md5(local).hexdigest()

    second = Home(tmp_path / "second")  # another host: only the bucket is shared
    try:
        second.import_s3_pool("s", aws_env.spec(bucket))
        other = second.pool("s")
        assert other.fsck().clean
        assert {name: contents(other, name) for name in expected} == expected
        assert sorted(v.name for v in other.volumes()) == ["c", "v"]
    finally:
        second.close()


def test_flush_is_an_upload_barrier(aws_env: MotoServer, s3home: Home) -> None:
    bucket = aws_env.bucket()
    pool = create(s3home, aws_env, bucket)
    pool.create_volume("v", 2 * MiB)
    v = pool.open_volume("v")
    v.write(0, b"x" * MiB)
    before = aws_env.keys(bucket)
    v.write(4096, b"y" * 4096)  # an in-place overwrite: in the bucket only after a flush
    v.flush()
    after = aws_env.keys(bucket)
    changed = {k for k in after if before.get(k) != after[k] and k.startswith("data/")}
    assert len(changed) == 1, changed
    (key,) = changed
    raw = aws_env.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    assert b"y" * 4096 in raw
    uploads = object_backing(pool).uploads
    v.flush()  # nothing changed: nothing is uploaded again
    assert object_backing(pool).uploads == uploads
    v.close()


def test_lease_excludes_a_second_host_and_fences_the_loser(
    aws_env: MotoServer, tmp_path: Path
) -> None:
    bucket = aws_env.bucket()
    first = Home(tmp_path / "first")
    pool = create(first, aws_env, bucket)
    pool.create_volume("v", MiB)
    second = Home(tmp_path / "second")
    try:
        with pytest.raises(Conflict, match="in use on another host"):
            second.import_s3_pool("s", aws_env.spec(bucket))
        assert not (tmp_path / "second/pools/s").exists()
        # the other host takes the pool over by force (the first one is presumed gone)
        second.import_s3_pool("s", aws_env.spec(bucket), force=True)
        before = aws_env.keys(bucket)
        v = pool.open_volume("v")
        v.write(0, b"stale" * 100)
        with pytest.raises(LeaseLost):
            v.flush()
        with pytest.raises(IOFailure):
            v.flush()
        v.close()
        after = aws_env.keys(bucket)
        assert {k: e for k, e in after.items() if k != LEASE_KEY} == {
            k: e for k, e in before.items() if k != LEASE_KEY
        }, "a fenced host wrote to the bucket"
        first.close()  # latched by the lost lease: closed without a commit, writing nothing
        assert "s" in [p.name for p in second.pools()]
        assert second.pool("s").fsck().clean
        assert contents(second.pool("s"), "v") == bytes(MiB)
    finally:
        second.close()
    # the first HOME's copy is stale now: it is refused, the pool goes offline there
    again = Home(tmp_path / "first")
    try:
        info = again.pool_info("s")
        assert info.state.value == "offline" and "another host took the pool" in (info.reason or "")
    finally:
        again.close()


def test_released_pool_moves_between_homes(aws_env: MotoServer, tmp_path: Path) -> None:
    bucket = aws_env.bucket()
    first = Home(tmp_path / "first")
    pool = create(first, aws_env, bucket)
    pool.create_volume("v", MiB)
    v = pool.open_volume("v")
    v.write(0, b"one" * 1000)
    v.close()
    first.close()
    second = Home(tmp_path / "second")
    second.import_s3_pool("s", aws_env.spec(bucket))
    assert contents(second.pool("s"), "v")[:3000] == b"one" * 1000
    v = second.pool("s").open_volume("v")
    v.write(0, b"two" * 1000)
    v.close()
    second.close()
    third = Home(tmp_path / "third")
    try:
        third.import_s3_pool("s", aws_env.spec(bucket))
        assert contents(third.pool("s"), "v")[:3000] == b"two" * 1000
    finally:
        third.close()


def test_bad_input_is_refused_and_nothing_is_created(
    aws_env: MotoServer, s3home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = aws_env.bucket()
    pools = tmp_path / "home/pools"

    def refused(exc: type[Exception], match: str, spec: S3Spec) -> None:
        with pytest.raises(exc, match=match):
            s3home.create_s3_pool("s", spec, size=POOL_BYTES, object_size=MiB)
        assert not (pools / "s").exists()

    refused(NotFound, "does not exist", aws_env.spec("no-such-bucket"))
    refused(IOFailure, "no endpoint answers", S3Spec(bucket, ("http://127.0.0.1:9",), "us-east-1"))
    for url in ("", "127.0.0.1:9", "ftp://127.0.0.1:9", "http://", "http://127.0.0.1:99999"):
        refused(InvalidArgument, "not an http|out of range", S3Spec(bucket, (url,), "us-east-1"))
    refused(InvalidArgument, "region", S3Spec(bucket, (aws_env.url,), "not a region!"))
    refused(InvalidArgument, "invalid bucket name", aws_env.spec("a bucket?"))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    refused(InvalidArgument, "refused the credentials", aws_env.spec(bucket))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", aws_env.secret)
    assert aws_env.keys(bucket) == {}
    with pytest.raises(InvalidArgument, match="S3 pool: it takes no devices"):
        create(s3home, aws_env, aws_env.bucket(), name="t").add_backing(
            BackingSpec(str(tmp_path / "extra.img"), 64 * MiB)
        )
    assert not (tmp_path / "extra.img").exists()
    with pytest.raises(InvalidArgument, match="multiple of the cluster size"):
        s3home.create_s3_pool("s", aws_env.spec(bucket), object_size=1000)
    for cluster_size in (0, -4096, 3000):
        with pytest.raises(InvalidArgument, match="invalid cluster size"):
            s3home.create_s3_pool("s", aws_env.spec(bucket), cluster_size=cluster_size)

    aws_env.client().put_object(Bucket=bucket, Key="photos/cat.jpg", Body=b"meow")
    refused(Conflict, "not empty", aws_env.spec(bucket))
    assert aws_env.keys(bucket).keys() == {"photos/cat.jpg"}

    other = aws_env.bucket()
    create(s3home, aws_env, other, name="p")
    with pytest.raises(InvalidArgument, match="not an http"):
        s3home.add_endpoint("p", "")
    with pytest.raises(Conflict, match="holds the storvisor pool 'p'"):
        s3home.create_s3_pool("s", aws_env.spec(other), size=POOL_BYTES, object_size=MiB)
    assert not (pools / "s").exists()


def test_delete_erases_the_bucket_but_not_a_pool_taken_elsewhere(
    aws_env: MotoServer, tmp_path: Path
) -> None:
    bucket = aws_env.bucket()
    home = Home(tmp_path / "home")
    try:
        pool = create(home, aws_env, bucket)
        pool.create_volume("v", MiB)
        v = pool.open_volume("v")
        v.write(0, b"z" * MiB)
        v.close()
        pool.flush()
        assert any(k.startswith("data/") for k in aws_env.keys(bucket))
        home.delete_pool("s", force=True)
        assert aws_env.keys(bucket) == {}
        assert not (tmp_path / "home/pools/s").exists()
        create(home, aws_env, bucket)  # the bucket is free again
    finally:
        home.close()
    other = Home(tmp_path / "other")
    try:
        other.import_s3_pool("s", aws_env.spec(bucket))
    finally:
        other.close()
    stale = Home(tmp_path / "home")  # its copy is stale: only the local catalog goes
    try:
        stale.delete_pool("s", force=True)
        assert "storvisor/pool.json" in aws_env.keys(bucket)
    finally:
        stale.close()


def test_a_take_of_the_lease_whose_save_was_lost_is_still_this_homes(
    aws_env: MotoServer, tmp_path: Path
) -> None:
    """A crash between the bucket's new lease and the HOME's save of its epoch leaves the
    bucket one epoch ahead under this HOME's own owner: the pool opens again. Two epochs
    ahead, or another owner, is another host's take: refused."""
    bucket = aws_env.bucket()
    home = Home(tmp_path / "home")
    create(home, aws_env, bucket).create_volume("v", MiB)
    home.close()
    directory = tmp_path / "home/pools/s"
    config = S3Config.load(directory)
    s3 = Bucket(config.spec)
    s3.take_lease(config.owner, s3.lease())  # the take whose save the crash lost
    again = Home(tmp_path / "home")
    try:
        assert again.pool_info("s").state.value == "online"
    finally:
        again.close()
    config = S3Config.load(directory)
    s3.take_lease(config.owner, s3.lease())
    s3.take_lease(config.owner, s3.lease())
    third = Home(tmp_path / "home")
    try:
        info = third.pool_info("s")
        assert info.state.value == "offline" and "another host took the pool" in (info.reason or "")
    finally:
        third.close()


def test_get_into_reads_an_object_whole_and_refuses_one_too_long(aws_env: MotoServer) -> None:
    """``Bucket.get_into`` (the fetches of an imported pool): the object's bytes, its length
    and ETag into the caller's buffer, the rest of the buffer untouched; None for a missing
    key; an object longer than the buffer is an error, not a truncated copy; the client's
    connection serves the next request."""
    s3 = Bucket(aws_env.spec(aws_env.bucket()))
    try:
        data = bytes(range(256)) * 4096  # 1 MiB
        etag = s3.put("k", data)
        buf = memoryview(bytearray(b"\xee" * (2 * MiB)))
        assert s3.get_into("k", buf) == (MiB, etag)
        assert buf[:MiB] == data and buf[MiB:] == b"\xee" * MiB
        assert s3.get_into("missing", buf) is None
        with pytest.raises(IOFailure, match="more than the"):
            s3.get_into("k", buf[: MiB - 1])
        assert s3.get_into("k", buf[:MiB]) == (MiB, etag)
        assert hashlib.md5(buf[:MiB]).hexdigest() == etag
    finally:
        s3.close()
