"""The back-end process helpers the guest tests and the benchmark rely on (no guest here)."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from storvisor.testing.vhost_backend import (
    BackendError,
    QsdVhostBackend,
    StorvisorVhostBackend,
)


@pytest.fixture
def sockdir() -> Iterator[str]:
    path = f"/tmp/sv-be-{os.getpid()}-{os.urandom(3).hex()}"
    os.mkdir(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def image(tmp_path: Path) -> str:
    path = tmp_path / "disk.raw"
    with path.open("wb") as f:
        f.truncate(8 << 20)
    return str(path)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def connectable(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def test_storvisor_backend_kill_and_restart_on_the_same_socket(image: str, sockdir: str) -> None:
    sock = f"{sockdir}/sv.sock"
    backend = StorvisorVhostBackend(image, sock)
    with backend:
        first = backend.pid
        assert first is not None and alive(first)
        assert connectable(sock)
        backend.kill()
        assert backend.pid is None and not alive(first)
        assert os.path.exists(sock)  # a SIGKILLed server leaves its socket file behind
        backend.start()
        assert backend.pid not in (None, first)
        assert connectable(sock)
        assert backend.stop() == 0
    assert backend.output.count("ready") == 2


def test_storvisor_backend_reports_a_bad_target(sockdir: str) -> None:
    backend = StorvisorVhostBackend("/nonexistent/disk.raw", f"{sockdir}/sv.sock")
    with pytest.raises(BackendError, match="exited with status 1") as info:
        backend.start()
    assert "/nonexistent/disk.raw" in str(info.value)
    backend.close()


def test_grow_extends_the_served_file(image: str, sockdir: str) -> None:
    backend = StorvisorVhostBackend(image, f"{sockdir}/sv.sock")
    with backend:
        backend.grow(16 << 20)
        assert os.path.getsize(image) == 16 << 20
        with pytest.raises(BackendError, match="could not grow"):
            backend.grow(1 << 20)
        assert backend.pid is not None  # a refused grow leaves the export serving
        assert backend.stop() == 0


def test_qsd_backend_starts_and_stops_by_pid(image: str, sockdir: str) -> None:
    sock = f"{sockdir}/qsd.sock"
    backend = QsdVhostBackend(image, sock, num_queues=2)
    with backend:
        pid = backend.pid
        assert pid is not None and alive(pid)
        assert os.path.exists(sock)
    assert not alive(pid)


def test_qsd_backend_reports_a_bad_image(sockdir: str) -> None:
    backend = QsdVhostBackend("/nonexistent/disk.raw", f"{sockdir}/qsd.sock")
    with pytest.raises(BackendError, match="nonexistent"):
        backend.start()
    backend.close()
