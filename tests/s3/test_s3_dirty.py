"""What an S3 pool's flush uploads: the objects written since their last upload, found
without reading the rest of the local image; after a crash of the process, every object
compared again; after an import or a clean close, nothing compared at open."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from s3server import REGION, MotoServer
from tcpproxy import Proxy

from powercuts import require_fuse
from storvisor.engine.home import Home
from storvisor.engine.object_backing import S3Config
from storvisor.engine.object_pool import object_backing
from storvisor.engine.s3 import S3Spec
from storvisor.errors import IOFailure
from storvisor.exports.dataplane import Op, PlaneHost, RemoteVolume
from storvisor.testing.faultfs import Fault, FaultMount

MiB = 1 << 20
_128K = 128 << 10
VOLUME = 8 * MiB


def read_bytes() -> int:
    """Bytes this process has read through system calls (page-cache hits included)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def volume_bytes(home: Home) -> bytes:
    volume = home.pool("d").open_volume("v")
    try:
        buf = bytearray(VOLUME)
        volume.read_into(0, memoryview(buf))
        return bytes(buf)
    finally:
        volume.close()


def make_pool(home: Home, spec: S3Spec) -> bytearray:
    """Pool "d" (objects of 1 MiB) with volume "v" written whole and flushed."""
    home.create_s3_pool("d", spec, size=64 * MiB, object_size=MiB)
    pool = home.pool("d")
    pool.create_volume("v", VOLUME)
    model = bytearray(os.urandom(VOLUME))
    volume = pool.open_volume("v")
    volume.write(0, model)
    volume.close()
    pool.flush()
    return model


def data_objects(moto: MotoServer, bucket: str) -> dict[str, str]:
    return {k: etag for k, etag in moto.keys(bucket).items() if k.startswith("data/")}


def test_a_flush_uploads_the_written_objects_without_reading_the_others(
    aws_env: MotoServer, s3home: Home
) -> None:
    model = make_pool(s3home, aws_env.spec(aws_env.bucket()))
    pool = s3home.pool("d")
    backing = object_backing(pool)
    volume = pool.open_volume("v")
    try:
        for offset in (3 * MiB + 100, 5 * MiB + 7000):
            volume.write(offset, b"x" * 512)  # in place: no metadata changes
            model[offset : offset + 512] = b"x" * 512
        before, read_before = backing.uploads, read_bytes()
        volume.flush()
        assert backing.uploads - before == 2, "a flush uploads exactly the written objects"
        assert read_bytes() - read_before <= 3 * MiB, "a flush read objects nobody wrote"
        volume.flush()
        assert backing.uploads - before == 2, "a second flush uploads nothing"
    finally:
        volume.close()


def test_a_data_plane_writes_in_place_and_marks_what_the_flush_uploads(
    aws_env: MotoServer, s3home: Home
) -> None:
    """A data plane of an S3 volume writes the local image in place, as on a local pool,
    and sets the shared marks of the objects it touched; the owner's next flush takes them
    and uploads exactly those objects, then the marks are clear."""
    model = make_pool(s3home, aws_env.spec(aws_env.bucket()))
    pool = s3home.pool("d")
    backing = object_backing(pool)
    volume = pool.open_volume("v")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    host = PlaneHost(volume, ours)
    host.start()
    remote = RemoteVolume(theirs, os.dup(host.map.fd), pool.backing_fds(), pool.cluster_size)
    try:
        owner_writes = []
        host_execute = host._execute

        def execute(op: int, *args: Any) -> bytes:
            owner_writes.extend([op] if op == Op.WRITE else [])
            return host_execute(op, *args)

        host._execute = execute  # type: ignore[method-assign]
        writes = [(1 * MiB + 4096, b"p" * 4096), (6 * MiB - 512, b"q" * 1024)]
        for offset, data in writes:
            remote.write(offset, data)
            model[offset : offset + len(data)] = data
        assert owner_writes == [], "the plane sent its writes to the owner"
        marked = [i for i, byte in enumerate(backing._shared[:64]) if byte]
        assert 2 <= len(marked) <= 3, marked  # the second write spans two clusters
        before = backing.uploads
        volume.flush()
        assert backing.uploads - before == len(marked), "the flush uploaded other objects"
        assert not any(backing._shared[:64])
    finally:
        remote.close()
        host.close()
        volume.close()
    other_home = s3home.path.parent / "other"
    other = Home(other_home)
    try:
        other.import_s3_pool("d", aws_env.spec(backing.bucket.spec.bucket), force=True)
        same = volume_bytes(other) == model
        assert same, "the bucket lacks the plane's flushed writes"
    finally:
        other.close()


def test_an_import_and_a_clean_close_open_without_comparing(
    aws_env: MotoServer, tmp_path: Path
) -> None:
    spec = aws_env.spec(aws_env.bucket())
    first = Home(tmp_path / "first")
    model = make_pool(first, spec)
    first.close()
    assert S3Config.load(tmp_path / "first" / "pools" / "d").clean

    other = Home(tmp_path / "other")
    try:
        start = read_bytes()
        other.import_s3_pool("d", spec)  # downloads, then opens and flushes
        assert read_bytes() - start < MiB, "the import read the local image to compare it"
        config = S3Config.load(tmp_path / "other" / "pools" / "d")
        assert not config.clean, "the pool is open: its image is not known clean"
    finally:
        other.close()
    assert S3Config.load(tmp_path / "other" / "pools" / "d").clean

    other = Home(tmp_path / "other")
    try:
        start = read_bytes()
        pool = other.pool("d")  # reopened: its open flushes
        assert read_bytes() - start < MiB, "the open read the local image to compare it"
        assert object_backing(pool).uploads == 0
        same = volume_bytes(other) == model
        assert same
    finally:
        other.close()


CRASHER = textwrap.dedent(
    """
    import os, signal, sys
    from storvisor.engine.home import Home
    home = Home(sys.argv[1])
    volume = home.pool("d").open_volume("v")
    volume.write(2 * 1024 * 1024, b"B" * 4096)   # in place, never flushed
    volume.write(6 * 1024 * 1024, b"C" * 4096)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_marks_lost_in_a_crash_are_rebuilt_by_comparing_every_object(
    aws_env: MotoServer, tmp_path: Path
) -> None:
    spec = aws_env.spec(aws_env.bucket())
    first = Home(tmp_path / "first")
    model = make_pool(first, spec)
    first.close()  # clean
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-c", CRASHER, str(tmp_path / "first")],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    model[2 * MiB : 2 * MiB + 4096] = b"B" * 4096  # a process crash keeps the page cache
    model[6 * MiB : 6 * MiB + 4096] = b"C" * 4096

    first = Home(tmp_path / "first")
    try:
        same = volume_bytes(first) == model
        assert same, "the image lost writes of the crashed process"
    finally:
        first.close()  # the open compared every object: the bucket has the writes now
    other = Home(tmp_path / "other")
    try:
        other.import_s3_pool("d", spec)
        same = volume_bytes(other) == model
        assert same, "the bucket differs from the image it came from"
    finally:
        other.close()


def test_marks_of_a_failed_upload_are_kept_for_the_next_flush(
    aws_env: MotoServer, tmp_path: Path
) -> None:
    target = urlsplit(aws_env.url)
    proxy = Proxy((target.hostname or "127.0.0.1", target.port or 80))
    bucket = aws_env.bucket()
    spec = S3Spec(bucket, (proxy.url,), REGION, timeout=1.0, down_timeout=3.0)
    home = Home(tmp_path / "home")
    try:
        model = make_pool(home, spec)
        pool = home.pool("d")
        volume = pool.open_volume("v")
        volume.write(4 * MiB, b"F" * 4096)
        model[4 * MiB : 4 * MiB + 4096] = b"F" * 4096
        proxy.stop()
        with pytest.raises(IOFailure):
            volume.flush()
        proxy.start()
        volume.flush()
        volume.close()
    finally:
        home.close()
        proxy.stop()
    other = Home(tmp_path / "other")
    try:
        other.import_s3_pool("d", aws_env.spec(bucket))
        same = volume_bytes(other) == model
        assert same, "the write whose upload failed never reached it"
    finally:
        other.close()


def test_an_upload_the_image_cuts_short_fails_the_flush_and_stores_nothing(
    aws_env: MotoServer, tmp_path: Path
) -> None:
    """A file system that dies mid-read returns the pages before the failing one (a short
    read, not an error): an upload must never store that part as the whole object. Here the
    local image is on faultfs, and every read of an object's second 128 KiB ends before it
    (the rule ``short``): the flush must fail and leave the bucket's objects whole."""
    require_fuse()
    bucket = aws_env.bucket()
    home = Home(tmp_path / "home")
    try:
        make_pool(home, aws_env.spec(bucket))
    finally:
        home.close()
    before = data_objects(aws_env, bucket)
    image = tmp_path / "home" / "pools" / "d" / "data"
    backing, mountpoint = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    mountpoint.mkdir()
    os.rename(image, backing / "data")
    os.symlink(mountpoint / "data", image)
    home = Home(tmp_path / "home")
    with FaultMount(backing, mountpoint) as faults:
        try:
            volume = home.pool("d").open_volume("v")
            volume.write(0, os.urandom(VOLUME))  # every object of the volume written again
            objects = range(image.stat().st_size // MiB + 1)
            faults.set(
                *(Fault("read", "short", i * MiB + _128K, i * MiB + 2 * _128K) for i in objects)
            )
            with pytest.raises(IOFailure):
                volume.flush()
            assert faults.hits().get("read", 0) > 0, "no upload read the image"
            after = data_objects(aws_env, bucket)
            assert after == before, "a failed flush changed the bucket's objects"
            client = aws_env.client()
            sizes = {k: client.head_object(Bucket=bucket, Key=k)["ContentLength"] for k in after}
            assert set(sizes.values()) == {MiB}, f"objects cut short: {sizes}"
            faults.clear()
            volume.close()
        finally:
            home.close()
