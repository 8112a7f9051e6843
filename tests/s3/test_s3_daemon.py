"""An S3 pool created through the daemon's API and served by it over NBD (its data planes
read through the local image's fd and send their writes to the daemon, which records the
objects they touch): a completed NBD flush is in the bucket, as another HOME that takes the
pool over sees; the daemon, fenced, then fails its next flush."""

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
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.communicate()
    assert os.path.exists(first / "pools" / "s")


def test_nbd_writer_sees_no_error_while_mirrors_fail(aws_env: MotoServer, tmp_path: Path) -> None:
    import random
    import threading
    from urllib.parse import urlsplit

    from tcpproxy import Proxy

    target = urlsplit(aws_env.url)
    a, b = (Proxy((target.hostname or "127.0.0.1", target.port or 80)) for _ in range(2))
    bucket = aws_env.bucket()
    home = tmp_path / "home"
    daemon = subprocess.Popen(
        [STORVISOR, "--home", str(home), "serve"], stdout=subprocess.DEVNULL, text=True
    )
    model = bytearray(8 * MiB)
    errors: list[BaseException] = []
    stop = threading.Event()
    flushes = 0
    try:
        client = Client(home / "api.sock")
        deadline = time.monotonic() + 60
        while True:
            try:
                client.status()
                break
            except StorvisorError:
                assert daemon.poll() is None, "the daemon exited"
                assert time.monotonic() < deadline, "the daemon did not answer"
                time.sleep(0.1)
        storvisor(
            home, "pool", "create", "s", "--s3", bucket, "--endpoint", a.url, "--endpoint",
            b.url, "--region", "us-east-1", "--endpoint-timeout", "1", "--down-timeout", "15",
            "--size", "64M", "--object-size", "1M",
        )  # fmt: skip
        storvisor(home, "volume", "create", "s/v", "--size", "8M")
        uri = storvisor(home, "export", "nbd", "s/v").strip()
        handle = nbd.NBD()
        handle.connect_uri(uri)

        def writer() -> None:
            nonlocal flushes
            rng = random.Random(3)
            try:
                while not stop.is_set():
                    for _ in range(16):
                        offset = rng.randrange(8 * MiB // 4096) * 4096
                        data = rng.randbytes(4096)
                        handle.pwrite(data, offset)
                        model[offset : offset + 4096] = data
                    handle.flush()
                    flushes += 1
            except BaseException as e:
                errors.append(e)

        def state(index: int) -> str:
            return str(client.pool_info("s").endpoints[index].state)

        def until(condition: object, what: str) -> None:
            deadline = time.monotonic() + 30
            while not condition():  # type: ignore[operator]
                assert not errors, f"the NBD writer saw an error: {errors[0]!r}"
                assert time.monotonic() < deadline, f"timed out: {what}"
                time.sleep(0.1)

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            until(lambda: flushes >= 3, "flushes")
            a.stop()
            until(lambda: state(0) == "down", "a down")
            seen = flushes
            until(lambda: flushes >= seen + 3, "flushes while a is stopped")
            a.start()
            until(lambda: state(0) == "up", "a back")
            b.stalled.set()
            until(lambda: state(1) == "down", "b down")
            seen = flushes
            until(lambda: flushes >= seen + 3, "flushes while b stalls")
            b.stalled.clear()
            until(lambda: state(1) == "up", "b back")
        finally:
            stop.set()
            thread.join(60)
        assert not thread.is_alive(), "the NBD writer stalled"
        assert not errors, f"the NBD writer saw an error: {errors[0]!r}"
        assert handle.pread(8 * MiB, 0) == model
        handle.shutdown()
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.communicate()
        a.stop()
        b.stop()
    other = Home(tmp_path / "other")  # released by the daemon at exit: the bucket alone
    try:
        other.import_s3_pool("s", aws_env.spec(bucket))
        volume = other.pool("s").open_volume("v")
        got = bytearray(8 * MiB)
        volume.read_into(0, memoryview(got))
        volume.close()
        assert got == model
    finally:
        other.close()
