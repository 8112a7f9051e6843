"""An S3 pool created through the daemon's API and served by it over NBD (its data planes
read through the local image's fd and send their writes to the daemon, which records the
objects they touch): a completed NBD flush is in the bucket, as another HOME that takes the
pool over sees; the daemon, fenced, then fails its next flush."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import pytest
from mirror_kit import VOLUME, bucket_volume, fail_mirrors, mirrored_daemon, serving, storvisor
from s3server import MotoServer

from prereq import require_module
from storvisor.engine.home import Home

nbd = require_module("nbd", "python3-libnbd is not installed")
MiB = 1 << 20


def test_nbd_flush_reaches_the_bucket_and_a_fenced_daemon_stops(
    aws_env: MotoServer, tmp_path: Path
) -> None:
    bucket = aws_env.bucket()
    first = tmp_path / "first"
    where = ["--s3", bucket, "--endpoint", aws_env.url, "--region", "us-east-1"]
    with serving(first):
        # through the daemon's API: the daemon's own AWS environment is used
        storvisor(first, "pool", "create", "s", *where, "--size", "64M", "--object-size", "1M")
        storvisor(first, "volume", "create", "s/v", "--size", "8M")
        uri = storvisor(first, "export", "nbd", "s/v").strip()
        handle = nbd.NBD()
        handle.connect_uri(uri)
        expected = bytearray(8 * MiB)
        for i in range(8):
            block = bytes([i + 1]) * 65536
            handle.pwrite(block, i * MiB)  # allocating: the daemon
            expected[i * MiB : i * MiB + 65536] = block
            patch = bytes([i + 0x41]) * 512
            handle.pwrite(patch, i * MiB + 4096)  # in place: a data plane
            expected[i * MiB + 4096 : i * MiB + 4608] = patch
        handle.flush()
        for i in range(8):  # objects already in the bucket: only these writes change them
            patch = bytes([i + 0x61]) * 4096
            handle.pwrite(patch, i * MiB + 32768)  # in place: a data plane
            expected[i * MiB + 32768 : i * MiB + 36864] = patch
        handle.flush()

        other = Home(tmp_path / "other")
        try:
            other.import_s3_pool("s", aws_env.spec(bucket), force=True)
            volume = other.pool("s").open_volume("v")
            got = bytearray(8 * MiB)
            volume.read_into(0, memoryview(got))
            volume.close()
            same = got == expected  # (no diff of 8 MiB on failure)
            assert same, "the bucket lacks what the NBD flush acknowledged"
        finally:
            other.close()

        handle.pwrite(b"late" * 128, 0)
        with pytest.raises(nbd.Error):
            handle.flush()  # the daemon lost the lease: its flushes fail
        handle.shutdown()
    assert os.path.exists(first / "pools" / "s")


def test_nbd_writer_sees_no_error_while_mirrors_fail(aws_env: MotoServer, tmp_path: Path) -> None:
    model = bytearray(VOLUME)
    errors: list[str] = []
    stop = threading.Event()
    flushes = 0
    with mirrored_daemon(aws_env, tmp_path) as daemon:
        uri = storvisor(daemon.home, "export", "nbd", "s/v").strip()
        handle = nbd.NBD()
        handle.connect_uri(uri)

        def writer() -> None:
            nonlocal flushes
            rng = random.Random(3)
            try:
                while not stop.is_set():
                    for _ in range(16):
                        offset = rng.randrange(VOLUME // 4096) * 4096
                        data = rng.randbytes(4096)
                        handle.pwrite(data, offset)
                        model[offset : offset + 4096] = data
                    handle.flush()
                    flushes += 1
            except BaseException as e:
                errors.append(repr(e))

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            fail_mirrors(daemon, lambda: flushes, errors, step=3)
        finally:
            stop.set()
            thread.join(60)
        assert not thread.is_alive(), "the NBD writer stalled"
        assert not errors, f"the NBD writer saw an error: {errors[0]}"
        assert handle.pread(VOLUME, 0) == model
        handle.shutdown()
        daemon.stop()
    assert bucket_volume(aws_env, daemon.bucket, tmp_path) == model
