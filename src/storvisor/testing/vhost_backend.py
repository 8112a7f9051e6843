"""vhost-user-blk back-ends run as separate processes, for guest tests and benchmarks.

Two interchangeable peers serve a disk on a Unix socket:

* ``QsdVhostBackend``: qemu-storage-daemon's vhost-user-blk export of a raw file, the reference
  implementation (``qemu-system-common``).
* ``StorvisorVhostBackend``: storvisor's ``VhostUserBlkServer`` in a child process started as
  ``python -m storvisor.testing.vhost_server``, serving a raw file or a thin volume of a pool
  home.

Both are started and stopped by PID only, so a test can SIGKILL one in the middle of guest I/O
and start it again on the same socket (``kill`` then ``start``). ``start`` returns once the
socket is listening; every method raises ``BackendError`` with the child's output when
the child fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from storvisor.errors import StorvisorError

READY = "storvisor-vhost-server: ready"
"""The line ``storvisor.testing.vhost_server`` prints once its socket listens."""
GROWN = "storvisor-vhost-server: grown to"
"""The line prefix it prints after an online extend."""


class BackendError(StorvisorError):
    """A back-end process could not be started or died unexpectedly."""


@dataclass(frozen=True, slots=True)
class VolumeRef:
    """A thin volume in a pool home directory: ``Home(home).pool(pool).open_volume(volume)``."""

    home: str
    pool: str
    volume: str


class _Process:
    """A child process with its output in a file, stopped by PID."""

    def __init__(self, name: str, socket_path: str) -> None:
        self.name = name
        self.socket_path = socket_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._final_output = ""
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 (lives as long as self)
            prefix=f"storvisor-{name}-", suffix=".log", delete=True
        )

    @property
    def pid(self) -> int | None:
        """PID of the running child, None when stopped."""
        return self._proc.pid if self._proc and self._proc.poll() is None else None

    @property
    def output(self) -> str:
        """Everything the child (all its runs) printed so far, also after ``close``."""
        if self._log.closed:
            return self._final_output
        return Path(self._log.name).read_text(errors="replace")

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = 15.0) -> None:
        """Start the child and wait until its socket accepts connections.

        Removes a stale socket file first. Raises ``BackendError`` if the child exits or the
        socket does not appear within ``timeout`` (the child is then killed).
        """
        if self.pid is not None:
            raise BackendError(f"{self.name} already running (pid {self.pid})")
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        offset = self._log.tell()
        self._proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while not self._ready(offset):
            if self._proc.poll() is not None:
                raise BackendError(
                    f"{self.name} exited with status {self._proc.returncode} while starting\n"
                    f"{self.output}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise BackendError(f"{self.name} not ready after {timeout} s\n{self.output}")
            time.sleep(0.02)

    def _ready(self, offset: int) -> bool:
        return os.path.exists(self.socket_path)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the child and wait (SIGKILL after ``timeout``); return its exit status."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._proc = None
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL the child (a crash, as far as the guest can tell) and reap it."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        self._proc = None

    def close(self) -> None:
        """Stop the child if it runs and drop its log file (``output`` stays readable)."""
        self.stop()
        if not self._log.closed:
            self._final_output = self.output
            self._log.close()

    def __enter__(self) -> _Process:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class QsdVhostBackend(_Process):
    """qemu-storage-daemon exporting the raw file ``image`` over vhost-user-blk.

    Discards punch holes in the file (``discard=unmap``); the page cache is used unless
    ``direct`` is set.
    """

    def __init__(
        self,
        image: str,
        socket_path: str,
        *,
        num_queues: int = 1,
        read_only: bool = False,
        direct: bool = False,
    ) -> None:
        super().__init__("qemu-storage-daemon", socket_path)
        self.image = image
        self.num_queues = num_queues
        self.read_only = read_only
        self.direct = direct

    def command(self) -> list[str]:
        direct = "on" if self.direct else "off"
        writable = "off" if self.read_only else "on"
        ro = "on" if self.read_only else "off"
        return [
            "qemu-storage-daemon",
            "--blockdev",
            f"driver=file,node-name=f0,filename={self.image},cache.direct={direct},"
            f"discard=unmap,read-only={ro},aio={'native' if self.direct else 'threads'}",
            "--blockdev",
            f"driver=raw,node-name=d0,file=f0,discard=unmap,read-only={ro}",
            "--export",
            f"type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,"
            f"addr.path={self.socket_path},writable={writable},num-queues={self.num_queues}",
        ]


class StorvisorVhostBackend(_Process):
    """storvisor's vhost-user-blk export in a child process (``storvisor.testing.vhost_server``).

    ``target`` is a raw file path or a ``VolumeRef``.
    """

    def __init__(
        self,
        target: str | VolumeRef,
        socket_path: str,
        *,
        num_queues: int = 1,
        read_only: bool = False,
        serial: str = "",
    ) -> None:
        super().__init__("storvisor-vhost", socket_path)
        self.target = target
        self.num_queues = num_queues
        self.read_only = read_only
        self.serial = serial
        self._grow_file = f"{self._log.name}.grow"

    def grow(self, size: int, timeout: float = 10.0) -> None:
        """Grow the served file or volume to ``size`` bytes while it is being served, and
        have the back-end notify the front-end (a virtio config change).

        Raises ``BackendError`` if the child refuses or does not answer within ``timeout``.
        """
        pid = self.pid
        if pid is None:
            raise BackendError(f"{self.name} is not running")
        with open(self._grow_file, "w") as f:
            f.write(str(size))
        offset = len(self.output)
        os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            new = self.output[offset:]
            if f"{GROWN} {size}" in new:
                return
            if "GROW FAILED" in new:
                raise BackendError(f"{self.name} could not grow to {size}:\n{new}")
            time.sleep(0.02)
        raise BackendError(f"{self.name} did not report growing to {size}\n{self.output}")

    def close(self) -> None:
        super().close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._grow_file)

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "storvisor.testing.vhost_server"]
        if isinstance(self.target, VolumeRef):
            cmd += [
                "--home",
                self.target.home,
                "--volume",
                f"{self.target.pool}/{self.target.volume}",
            ]
        else:
            cmd += ["--file", self.target]
        cmd += ["--socket", self.socket_path, "--queues", str(self.num_queues)]
        cmd += ["--grow-file", self._grow_file]
        if self.serial:
            cmd += ["--serial", self.serial]
        if self.read_only:
            cmd.append("--read-only")
        return cmd

    def _ready(self, offset: int) -> bool:
        with open(self._log.name, "rb") as f:
            f.seek(offset)
            return READY.encode() in f.read()
