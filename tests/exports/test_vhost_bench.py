"""The vhost-user-blk export against the independent C front-end ``vhost-blk-bench``.

The bench is compiled from ``../shared/tools/vhost-blk-bench`` (relative to the repository
root) into a temporary directory; the tests skip when that source or a C compiler is absent
(and fail in CI).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from prereq import require
from storvisor.engine.device import FileDevice
from storvisor.exports.vhost_user_blk import VhostUserBlkServer


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="vub-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _serve(tmp_path: Path, sock: Path, size: int, queues: int) -> tuple[VhostUserBlkServer, Path]:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(size)
    server = VhostUserBlkServer(FileDevice(str(image)), str(sock), num_queues=queues)
    server.start()
    return server, image


def _run(bench: Path, sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(bench), "--socket", str(sock), "--timeout", "20", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "args",
    [
        ["--bs", "64k", "--iodepth", "8"],
        ["--bs", "4k", "--iodepth", "32", "--queues", "2", "--segments", "2"],
        ["--bs", "12k", "--gpa-base", "0x100000000", "--mmap-offset", "1M", "--segments", "3"],
        ["--bs", "8k", "--no-reply-ack", "--min-features", "--ring-size", "16", "--iodepth", "4"],
    ],
    ids=["64k", "2q-sg", "gpa-offset", "minimal"],
)
def test_bench_verify(bench: Path, tmp_path: Path, socket_dir: Path, args: list[str]) -> None:
    sock = socket_dir / "vub.sock"
    server, image = _serve(tmp_path, sock, 16 << 20, queues=2)
    try:
        result = _run(bench, sock, "--verify", *args)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "verify pass" in result.stdout
        assert "GET_VRING_BASE consistent" in result.stdout
    finally:
        server.close()
    # the pattern really is in the file: word at offset 8 holds 8, big-endian
    data = image.read_bytes()
    assert data[8:16] == (8).to_bytes(8, "big")
    assert data[(1 << 20) + 8 : (1 << 20) + 16] == ((1 << 20) + 8).to_bytes(8, "big")


def test_bench_reconnects_and_pattern_reads(bench: Path, tmp_path: Path, socket_dir: Path) -> None:
    sock = socket_dir / "vub.sock"
    server, _ = _serve(tmp_path, sock, 8 << 20, queues=1)
    try:
        first = _run(bench, sock, "--verify", "--bs", "1M", "--iodepth", "4")
        assert first.returncode == 0, first.stderr
        again = _run(bench, sock, "--rw", "randread", "--pattern", "--seconds", "1")
        assert again.returncode == 0, again.stdout + again.stderr
        assert server.connections == 2
    finally:
        server.close()
    assert not sock.exists()


def test_raw_file_queue_processes_verify(bench: Path, socket_dir: Path, tmp_path: Path) -> None:
    """``testing.vhost_server`` serves a raw file's queues from several processes, as the
    daemon serves a volume's: two queues, two processes, data verified end to end, and the
    queue process goes when slot 0 does."""
    import os
    import signal

    from storvisor.testing import procs
    from storvisor.testing.vhost_backend import StorvisorVhostBackend

    require((os.cpu_count() or 1) >= 2, "one CPU: the queues are served by one process")
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    sock = socket_dir / "q.sock"
    backend = StorvisorVhostBackend(str(image), str(sock), num_queues=2)
    backend.start()
    try:
        assert backend.pid is not None
        peers = [c.pid for c in procs.children(backend.pid)]
        assert len(peers) == 1
        args = ["--verify", "--queues", "2", "--bs", "64k", "--iodepth", "8"]
        result = _run(bench, sock, *args, "--size-limit", str(32 << 20))
        assert result.returncode == 0, result.stdout + result.stderr
        os.kill(backend.pid, signal.SIGKILL)
        try:
            procs.wait_gone(peers)
        except TimeoutError as e:
            raise AssertionError(f"a queue process outlived slot 0: {e}") from e
    finally:
        backend.close()
