"""A daemon serving an S3 pool through two stoppable TCP proxies, and the failures the
mirror tests put it through while a client works on its volume.

``mirrored_daemon`` starts ``storvisor serve`` in a temporary HOME with the pool ``s``
(endpoints ``a`` and ``b``, proxies in front of one moto server, 1 s endpoint timeout, 15 s
down timeout) and its 8 MiB volume ``s/v``; ``fail_mirrors`` stops ``a``, restarts it,
stalls ``b`` (accepting, never answering) and releases it, waiting at each stage until the
pool reports the endpoint's state and the client has made progress; ``bucket_volume``
reads ``v`` back from the bucket alone, on another HOME, once the daemon released the pool.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from s3server import MotoServer
from tcpproxy import Proxy

from storvisor.api.client import Client
from storvisor.engine.home import Home
from storvisor.errors import StorvisorError

STORVISOR = str(Path(sys.executable).with_name("storvisor"))
MiB = 1 << 20
VOLUME = 8 * MiB


def storvisor(home: Path, *args: str) -> str:
    """``storvisor --home HOME ARGS``'s output; the command must succeed."""
    proc = subprocess.run(
        [STORVISOR, "--home", str(home), *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"storvisor {' '.join(args)}: {proc.stderr}"
    return proc.stdout


@contextlib.contextmanager
def serving(home: Path, *, answer_within: float = 60.0) -> Iterator[tuple[Client, Popen]]:
    """``storvisor serve`` in ``home``, once its API answers (within ``answer_within``
    seconds), and its process (stderr kept for the failure message); stopped with SIGTERM
    at the end (killed after 60 s)."""
    daemon = subprocess.Popen(
        [STORVISOR, "--home", str(home), "serve"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        client = Client(home / "api.sock")
        deadline = time.monotonic() + answer_within
        while True:
            try:
                client.status()
                break
            except StorvisorError:
                assert daemon.poll() is None, f"the daemon exited: {daemon.communicate()}"
                assert time.monotonic() < deadline, "the daemon did not answer"
                time.sleep(0.1)
        yield client, daemon
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.communicate()


Popen = subprocess.Popen[str]


@dataclass
class MirroredDaemon:
    home: Path
    bucket: str
    client: Client
    a: Proxy
    b: Proxy
    process: subprocess.Popen[str]

    def state(self, index: int) -> str:
        """The pool's view of endpoint ``index`` (0: ``a``, 1: ``b``)."""
        return str(self.client.pool_info("s").endpoints[index].state)

    def stop(self) -> int:
        """SIGTERM, then the daemon's exit status (killed after 60 s)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.communicate()
        return self.process.returncode


@contextlib.contextmanager
def mirrored_daemon(aws_env: MotoServer, tmp_path: Path) -> Iterator[MirroredDaemon]:
    """A daemon with the pool ``s`` behind two proxies and its volume ``v``; stopped (and
    the proxies closed) at the end."""
    target = urlsplit(aws_env.url)
    a, b = (Proxy((target.hostname or "127.0.0.1", target.port or 80)) for _ in range(2))
    home = tmp_path / "home"
    process = subprocess.Popen(
        [STORVISOR, "--home", str(home), "serve"], stdout=subprocess.DEVNULL, text=True
    )
    daemon = MirroredDaemon(home, aws_env.bucket(), Client(home / "api.sock"), a, b, process)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                daemon.client.status()
                break
            except StorvisorError:
                assert process.poll() is None, "the daemon exited"
                assert time.monotonic() < deadline, "the daemon did not answer"
                time.sleep(0.1)
        storvisor(
            home, "pool", "create", "s", "--s3", daemon.bucket, "--endpoint", a.url,
            "--endpoint", b.url, "--region", "us-east-1", "--endpoint-timeout", "1",
            "--down-timeout", "15", "--size", "64M", "--object-size", "1M",
        )  # fmt: skip
        storvisor(home, "volume", "create", "s/v", "--size", "8M")
        yield daemon
    finally:
        if process.poll() is None:
            daemon.stop()
        a.stop()
        b.stop()


def fail_mirrors(
    daemon: MirroredDaemon, progress: Callable[[], int], errors: list[str], step: int
) -> None:
    """Stop ``a``, restart it, stall ``b``, release it; before the first failure, while each
    lasts and after the recovery, wait for ``step`` more units of the client's ``progress``.
    Fails at once when the client recorded an error in ``errors``; 30 s per stage."""

    def until(condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 30
        while not condition():
            assert not errors, f"the client saw an error: {errors[0]}"
            assert time.monotonic() < deadline, f"timed out: {what}"
            time.sleep(0.1)

    def advances(what: str) -> None:
        seen = progress()
        until(lambda: progress() >= seen + step, what)

    advances("progress before any failure")
    daemon.a.stop()
    until(lambda: daemon.state(0) == "down", "a down")
    advances("progress while a is stopped")
    daemon.a.start()
    until(lambda: daemon.state(0) == "up", "a back")
    daemon.b.stalled.set()
    until(lambda: daemon.state(1) == "down", "b down")
    advances("progress while b stalls")
    daemon.b.stalled.clear()
    until(lambda: daemon.state(1) == "up", "b back")
    advances("progress after the recovery")


def bucket_volume(aws_env: MotoServer, bucket: str, tmp_path: Path) -> bytes:
    """Volume ``v`` as the bucket alone holds it, read through a pool import on another HOME
    (the daemon must have released the pool)."""
    other = Home(tmp_path / "other")
    try:
        other.import_s3_pool("s", aws_env.spec(bucket))
        volume = other.pool("s").open_volume("v")
        got = bytearray(VOLUME)
        volume.read_into(0, memoryview(got))
        volume.close()
        return bytes(got)
    finally:
        other.close()
