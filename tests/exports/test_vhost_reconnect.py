"""Back-end restart with INFLIGHT_SHMFD: SIGKILL the server process while a request is in
flight, start a new one on the same socket, reconnect the front-end with the inflight buffer
it kept; every request completes exactly once and the data is on disk."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from storvisor.protocols.vhost_user import inflight as infl
from storvisor.protocols.virtio.blk import RequestType, Status
from storvisor.testing.vhost_frontend import VhostUserFrontend

SERVER = textwrap.dedent(
    """
    import sys, time, signal
    from storvisor.engine.device import FileDevice
    from storvisor.exports.vhost_user_blk import VhostUserBlkServer

    path, sock, fast_writes = sys.argv[1], sys.argv[2], int(sys.argv[3])

    class Stalling(FileDevice):
        '''Completes the first ``fast_writes`` writes, then hangs on every write.'''
        writes = 0
        def write(self, offset, data, *, fua=False):
            Stalling.writes += 1
            if fast_writes >= 0 and Stalling.writes > fast_writes:
                time.sleep(3600)
            super().write(offset, data, fua=fua)

    server = VhostUserBlkServer(Stalling(path), sock)
    server.start()
    print("ready", flush=True)
    signal.sigwait({signal.SIGTERM})
    server.close()
    """
)


@pytest.fixture
def sock() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="vub-", dir="/tmp")
    yield f"{path}/vub.sock"
    shutil.rmtree(path, ignore_errors=True)


class _Server:
    def __init__(self, image: Path, sock: str) -> None:
        self.image, self.sock = image, sock
        self.proc: subprocess.Popen[str] | None = None

    def start(self, fast_writes: int) -> None:
        src = str(Path(__file__).resolve().parents[2] / "src")
        env = {**os.environ, "PYTHONPATH": src}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(self.image), self.sock, str(fast_writes)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def server(tmp_path: Path, sock: str) -> Iterator[_Server]:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 << 20))
    srv = _Server(image, sock)
    yield srv
    if srv.proc is not None:
        srv.kill()


def _inflight_flags(fe: VhostUserFrontend) -> list[int]:
    assert fe.inflight_fd is not None
    raw = os.pread(fe.inflight_fd, fe.inflight_size, 0)
    header = infl.QUEUE_HEADER.size
    return [
        head for head in range(fe.queue_size) if raw[header + infl.DESC_STATE_SPLIT.size * head]
    ]


@pytest.mark.parametrize(
    "claimed_base, block, stuck",
    [
        ("used", 4096, 1),  # small requests run in order on the queue thread: one stuck
        ("avail", 4096, 1),
        # large ones run on the I/O pool (one thread per CPU), whose threads pop the next
        # chains themselves once every thread is busy: one stalled write per thread
        ("used", 256 << 10, min(5, os.cpu_count() or 1)),
    ],
    ids=["used-small", "avail-small", "used-large"],
)
def test_sigkill_with_requests_in_flight(
    server: _Server, sock: str, claimed_base: str, block: int, stuck: int
) -> None:
    server.start(fast_writes=3)
    with VhostUserFrontend(sock, inflight=True, queue_size=32, timeout=10) as fe:
        fe.setup()
        assert fe.inflight_fd is not None
        heads = []
        for i in range(8):
            head, _, status = fe.blk.submit(
                RequestType.OUT, i * block // 512, out=bytes([i + 1]) * block, kick=False
            )
            heads.append((head, status))
        fe.queues[0].kick()
        # three complete, the fourth write hangs inside the device: what was popped and not
        # completed is recorded in flight
        q = fe.queues[0]
        deadline = time.monotonic() + 10
        while len(_inflight_flags(fe)) != stuck or q.used_idx() != 3:
            assert time.monotonic() < deadline, "the back-end never stalled"
            time.sleep(0.01)
        if stuck == 1:
            assert _inflight_flags(fe) == [heads[3][0]]

        server.kill()
        server.start(fast_writes=-1)
        fe.disconnect()
        fe.connect()
        fe.negotiate()
        fe.setup_inflight()
        fe.set_features()
        fe.set_mem_table()
        # QEMU sends the used index; a front-end that lost track may claim everything was
        # taken: the inflight buffer decides either way
        base = q.used_idx() if claimed_base == "used" else q.avail_idx
        fe.start_queue(0, base=base)

        for head, status in heads:
            assert fe.blk.wait(0, head) == 1  # each completes exactly once (else ProtocolError)
            assert fe.memory.read(status, 1)[0] == Status.OK
        assert _inflight_flags(fe) == []
        for i in range(8):
            assert fe.blk.read(block * i, block) == (Status.OK, bytes([i + 1]) * block)
        assert fe.stop_queue(0) == q.avail_idx
    data = server.image.read_bytes()
    for i in range(8):
        assert data[block * i : block * (i + 1)] == bytes([i + 1]) * block
    server.stop()


def test_reconnect_helper_after_clean_restart(server: _Server, sock: str) -> None:
    server.start(fast_writes=-1)
    with VhostUserFrontend(sock, inflight=True, timeout=10) as fe:
        fe.setup()
        assert fe.blk.write(0, b"a" * 512) == Status.OK
        server.stop()
        server.start(fast_writes=-1)
        fe.reconnect()
        assert fe.blk.read(0, 512) == (Status.OK, b"a" * 512)
        assert fe.blk.write(512, b"b" * 512) == Status.OK
    server.stop()
    assert server.image.read_bytes()[:1024] == b"a" * 512 + b"b" * 512
