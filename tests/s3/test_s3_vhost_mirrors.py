"""Mirror failures under a vhost-user-blk workload with verification: the daemon serves a
volume of an S3 pool, reached through two stoppable TCP proxies, to the independent C
front-end ``vhost-blk-bench``, which runs ``--verify`` passes back to back (the offset
pattern written over the volume, a FLUSH, which uploads it through the mirrors, then
everything read back and compared). One proxy is stopped, restarted, then the other
stalled (accepting, never answering), and released: every pass must succeed (no I/O
error, no mismatch), and the bucket alone must then hold the pattern.

The bench is compiled from ``shared/tools/vhost-blk-bench`` beside the repository (or beside
one of its parent directories); the test skips when that source or a C compiler is absent
(and fails in CI).
"""

from __future__ import annotations

import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from s3server import MotoServer
from tcpproxy import Proxy

from prereq import require
from storvisor.api.client import Client
from storvisor.engine.home import Home
from storvisor.errors import StorvisorError

REPO = Path(__file__).resolve().parents[2]
_TOOL = Path("shared", "tools", "vhost-blk-bench", "vhost-blk-bench.c")
BENCH_SRC = next((p / _TOOL for p in REPO.parents if (p / _TOOL).is_file()), REPO.parent / _TOOL)
STORVISOR = str(Path(sys.executable).with_name("storvisor"))
MiB = 1 << 20
VOLUME = 8 * MiB


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require(BENCH_SRC.is_file(), f"{BENCH_SRC} is absent")
    cc = shutil.which("gcc") or shutil.which("cc")
    require(cc is not None, "no C compiler (Debian package gcc)")
    assert cc is not None
    out = tmp_path_factory.mktemp("bench") / "vhost-blk-bench"
    subprocess.run([cc, "-O2", "-o", str(out), str(BENCH_SRC)], check=True)
    return out


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="s3vub-", dir="/tmp"))  # short: AF_UNIX paths
    yield path
    shutil.rmtree(path, ignore_errors=True)


def storvisor(home: Path, *args: str) -> str:
    proc = subprocess.run(
        [STORVISOR, "--home", str(home), *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"storvisor {' '.join(args)}: {proc.stderr}"
    return proc.stdout


def pattern(size: int) -> bytes:
    """vhost-blk-bench's (nbdkit's) pattern: each 8-byte word holds its offset, big-endian."""
    return b"".join(struct.pack(">Q", offset) for offset in range(0, size, 8))


def test_vhost_user_blk_verify_sees_no_error_while_mirrors_fail(
    aws_env: MotoServer, tmp_path: Path, socket_dir: Path, bench: Path
) -> None:
    target = urlsplit(aws_env.url)
    a, b = (Proxy((target.hostname or "127.0.0.1", target.port or 80)) for _ in range(2))
    bucket = aws_env.bucket()
    home = tmp_path / "home"
    sock = socket_dir / "v.sock"
    daemon = subprocess.Popen(
        [STORVISOR, "--home", str(home), "serve"], stdout=subprocess.DEVNULL, text=True
    )
    failures: list[str] = []
    stop = threading.Event()
    passes = 0
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
        storvisor(home, "export", "vhost-user-blk", "s/v", "--socket", str(sock))

        def workload() -> None:
            nonlocal passes
            while not stop.is_set():
                run = subprocess.run(
                    [str(bench), "--socket", str(sock), "--verify", "--bs", "64k",
                     "--iodepth", "8", "--timeout", "30", "--wait-socket", "10"],
                    capture_output=True, text=True, timeout=120,
                )  # fmt: skip
                if run.returncode != 0 or "verify pass" not in run.stdout:
                    failures.append(f"exit {run.returncode}: {run.stdout}{run.stderr}")
                    return
                passes += 1

        def state(index: int) -> str:
            return str(client.pool_info("s").endpoints[index].state)

        def until(condition: Callable[[], bool], what: str) -> None:
            deadline = time.monotonic() + 30
            while not condition():
                assert not failures, f"a verify pass failed: {failures[0]}"
                assert time.monotonic() < deadline, f"timed out: {what}"
                time.sleep(0.1)

        thread = threading.Thread(target=workload)
        thread.start()
        try:
            until(lambda: passes >= 2, "passes before any failure")
            a.stop()
            until(lambda: state(0) == "down", "a down")
            seen = passes
            until(lambda: passes >= seen + 2, "passes while a is stopped")
            a.start()
            until(lambda: state(0) == "up", "a back")
            b.stalled.set()
            until(lambda: state(1) == "down", "b down")
            seen = passes
            until(lambda: passes >= seen + 2, "passes while b stalls")
            b.stalled.clear()
            until(lambda: state(1) == "up", "b back")
            seen = passes
            until(lambda: passes >= seen + 1, "a pass after recovery")
        finally:
            stop.set()
            thread.join(150)
        assert not thread.is_alive(), "the vhost-user-blk workload stalled"
        assert not failures, f"a verify pass failed: {failures[0]}"
        endpoints = client.pool_info("s").endpoints
        assert all(e.errors >= 1 and e.requests > e.errors for e in endpoints), endpoints
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.communicate()
        a.stop()
        b.stop()
    assert daemon.returncode == 0, f"the daemon exited with {daemon.returncode}"
    other = Home(tmp_path / "other")  # released by the daemon at exit: the bucket alone
    try:
        other.import_s3_pool("s", aws_env.spec(bucket))
        volume = other.pool("s").open_volume("v")
        got = bytearray(VOLUME)
        volume.read_into(0, memoryview(got))
        volume.close()
        same = got == pattern(VOLUME)  # (no diff of 8 MiB on failure)
        assert same, "the bucket lacks the flushed pattern"
    finally:
        other.close()
