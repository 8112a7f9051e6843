"""An S3 pool created through the daemon's API and served by it over NBD (its data planes
write in place through the local image's fd): a completed NBD flush is in the bucket, as
another HOME that takes the pool over sees; the daemon, fenced, then fails its next flush."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from s3server import MotoServer

from prereq import require_module
from storvisor.api.client import Client
from storvisor.engine.home import Home
from storvisor.errors import StorvisorError

nbd = require_module("nbd", "python3-libnbd is not installed")
STORVISOR = str(Path(sys.executable).with_name("storvisor"))
MiB = 1 << 20


def storvisor(home: Path, *args: str) -> str:
    proc = subprocess.run(
        [STORVISOR, "--home", str(home), *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"storvisor {' '.join(args)}: {proc.stderr}"
    return proc.stdout


def test_nbd_flush_reaches_the_bucket_and_a_fenced_daemon_stops(
    aws_env: MotoServer, tmp_path: Path
) -> None:
    bucket = aws_env.bucket()
    first = tmp_path / "first"
    where = ["--s3", bucket, "--endpoint", aws_env.url, "--region", "us-east-1"]
    daemon = subprocess.Popen(
        [STORVISOR, "--home", str(first), "serve"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        client = Client(first / "api.sock")
        deadline = time.monotonic() + 60
        while True:
            try:
                client.status()
                break
            except StorvisorError:
                assert daemon.poll() is None, f"daemon exited: {daemon.communicate()}"
                assert time.monotonic() < deadline, "the daemon did not answer"
                time.sleep(0.1)
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

        other = Home(tmp_path / "other")
        try:
            other.import_s3_pool("s", aws_env.spec(bucket), force=True)
            volume = other.pool("s").open_volume("v")
            got = bytearray(8 * MiB)
            volume.read_into(0, memoryview(got))
            volume.close()
            assert got == expected, "the bucket lacks what the NBD flush acknowledged"
        finally:
            other.close()

        handle.pwrite(b"late" * 128, 0)
        with pytest.raises(nbd.Error):
            handle.flush()  # the daemon lost the lease: its flushes fail
        handle.shutdown()
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.communicate()
    assert os.path.exists(first / "pools" / "s")
