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
import struct
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from mirror_kit import VOLUME, bucket_volume, fail_mirrors, mirrored_daemon, storvisor
from s3server import MotoServer


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="s3vub-", dir="/tmp"))  # short: AF_UNIX paths
    yield path
    shutil.rmtree(path, ignore_errors=True)


def pattern(size: int) -> bytes:
    """vhost-blk-bench's (nbdkit's) pattern: each 8-byte word holds its offset, big-endian."""
    return b"".join(struct.pack(">Q", offset) for offset in range(0, size, 8))


def test_vhost_user_blk_verify_sees_no_error_while_mirrors_fail(
    aws_env: MotoServer, tmp_path: Path, socket_dir: Path, bench: Path
) -> None:
    sock = socket_dir / "v.sock"
    failures: list[str] = []
    stop = threading.Event()
    passes = 0
    with mirrored_daemon(aws_env, tmp_path) as daemon:
        storvisor(daemon.home, "export", "vhost-user-blk", "s/v", "--socket", str(sock))

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

        thread = threading.Thread(target=workload)
        thread.start()
        try:
            fail_mirrors(daemon, lambda: passes, failures, step=2)
        finally:
            stop.set()
            thread.join(150)
        assert not thread.is_alive(), "the vhost-user-blk workload stalled"
        assert not failures, f"a verify pass failed: {failures[0]}"
        endpoints = daemon.client.pool_info("s").endpoints
        assert all(e.errors >= 1 and e.requests > e.errors for e in endpoints), endpoints
        status = daemon.stop()
    assert status == 0, f"the daemon exited with {status}"
    same = bucket_volume(aws_env, daemon.bucket, tmp_path) == pattern(VOLUME)
    assert same, "the bucket lacks the flushed pattern"  # (no diff of 8 MiB on failure)
