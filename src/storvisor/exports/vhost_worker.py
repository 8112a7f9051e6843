"""vhost-user-blk exports served by data-plane processes (see ``exports/dataplane.py``).

Theory of operation
-------------------
``VhostDataPlane`` is the daemon's side of one export. It binds the export's Unix socket
itself, so the path stays bound for as long as the export exists, then starts a process
(``python -m storvisor.exports.vhost_worker CONFIG``) that inherits the listening socket, one
end of the data-plane channel, the shared map's memfd and the pool's backing fds. That
process runs a ``VhostUserBlkServer`` on a ``RemoteVolume``: the rings, the virtio-blk
requests and the direct reads and writes run there, on their own core, while allocations,
discards and flushes are done by the daemon's pool. Several exports thus use several cores,
which one Python process cannot.

Supervision: a thread of the daemon waits for the process; if it ends while the export
still exists (a crash, or a kill), a new one is started on the same listening socket after
a short delay (growing while starts keep failing). A vhost-user front-end started with
``reconnect`` comes back to it and resubmits what was in flight (INFLIGHT_SHMFD). The process
exits when its channel breaks, so a daemon that dies takes its data planes with it: at once
(SIGKILL), completing no request with an error, so that a front-end with INFLIGHT_SHMFD
resubmits what was in flight once a new daemon serves the export again.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from storvisor.engine.volume import Volume
from storvisor.errors import IOFailure
from storvisor.exports.dataplane import PlaneHost, RemoteVolume

log = logging.getLogger(__name__)

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class WorkerConfig:
    """What a data-plane process is started with (as JSON on its command line)."""

    channel_fd: int
    map_fd: int
    listener_fd: int
    backings: dict[int, int]
    cluster_size: int
    socket_path: str
    queues: int
    read_only: bool
    serial: str

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerConfig:
        raw = json.loads(text)
        raw["backings"] = {int(k): int(v) for k, v in raw["backings"].items()}
        return cls(**raw)


class VhostDataPlane:
    """One vhost-user-blk export of ``volume`` on ``socket_path``, served by a process of its
    own (see the module docstring). The volume handle stays the caller's."""

    def __init__(
        self,
        volume: Volume,
        socket_path: str,
        *,
        num_queues: int = 1,
        read_only: bool = False,
        serial: str = "",
    ) -> None:
        self.volume = volume
        self.socket_path = socket_path
        self.num_queues = num_queues
        self.read_only = read_only or volume.read_only
        self.serial = serial
        self.starts = 0
        """Processes started so far (1 unless one had to be restarted)."""
        self._listener: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._host: PlaneHost | None = None
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._supervisor: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        """The data-plane process's pid (None while none runs)."""
        with self._lock:
            return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Bind the socket (replacing a stale one), start the process and wait until it
        serves. Raises ``OSError`` if the socket cannot be bound, ``IOFailure`` if the
        process does not come up."""
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(self.socket_path).st_mode):
                os.unlink(self.socket_path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(self.socket_path)
            listener.listen(4)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        try:
            self._spawn()
        except BaseException:
            self.close()
            raise
        self._supervisor = threading.Thread(
            target=self._supervise, name=f"vhost-plane {self.socket_path}", daemon=True
        )
        self._supervisor.start()

    def notify_config_change(self) -> None:
        """Nothing to do: an extend reaches the process through the shared map."""

    def close(self) -> None:
        """Stop the process and remove the socket. Idempotent."""
        self._closing.set()
        with self._lock:
            proc, host = self._proc, self._host
        if proc is not None:
            _stop(proc)
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join()
            self._supervisor = None
        if host is not None:
            host.close()
        with self._lock:
            self._proc = self._host = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)

    # -- internals --

    def _spawn(self) -> None:
        assert self._listener is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        host = PlaneHost(self.volume, ours, on_stuck=self._kill)
        try:
            host.start()
            pool = self.volume.state.pool
            backings = pool.backing_fds()
            config = WorkerConfig(
                channel_fd=theirs.fileno(),
                map_fd=host.map.fd,
                listener_fd=self._listener.fileno(),
                backings=backings,
                cluster_size=self.volume.cluster_size,
                socket_path=self.socket_path,
                queues=self.num_queues,
                read_only=self.read_only,
                serial=self.serial,
            )
            fds = [theirs.fileno(), host.map.fd, self._listener.fileno(), *backings.values()]
            proc = subprocess.Popen(
                [sys.executable, "-m", "storvisor.exports.vhost_worker", config.to_json()],
                pass_fds=fds,
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            theirs.close()
            host.close()
            raise
        theirs.close()
        self.starts += 1
        with self._lock:
            self._proc, self._host = proc, host
        deadline = time.monotonic() + READY_TIMEOUT
        while not host.ready.wait(0.05):
            if proc.poll() is not None or not host.alive or time.monotonic() > deadline:
                raise IOFailure(
                    f"vhost-user-blk data plane for {self.socket_path} did not start "
                    f"(exit status {proc.poll()})",
                    errno.EIO,
                )

    def _kill(self) -> None:
        with self._lock:
            proc = self._proc
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    def _supervise(self) -> None:
        delay = 0.1
        while not self._closing.is_set():
            with self._lock:
                proc, host = self._proc, self._host
            if proc is None:
                return
            started = time.monotonic()
            status = proc.wait()
            if self._closing.is_set():
                return
            log.warning(
                "vhost-user-blk data plane for %s exited (status %s); restarting",
                self.socket_path,
                status,
            )
            if host is not None:
                host.close()
            with self._lock:
                self._proc = self._host = None
            delay = 0.1 if time.monotonic() - started > 10 else min(delay * 2, 5.0)
            while not self._closing.wait(delay):
                try:
                    self._spawn()
                    break
                except Exception as e:
                    log.error("restarting the data plane for %s failed: %s", self.socket_path, e)
                    self._kill()
                    with self._lock:
                        proc, host = self._proc, self._host
                        self._proc = self._host = None
                    if proc is not None:
                        proc.wait()
                    if host is not None:
                        host.close()
                    delay = min(delay * 2, 5.0)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------- the process itself


def main(argv: Sequence[str] | None = None) -> int:
    """Serve one export until SIGTERM/SIGINT or until the channel to the owner breaks."""
    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="vhost-plane[%(process)d] %(message)s")
    if len(args) != 1:
        print("usage: python -m storvisor.exports.vhost_worker CONFIG-JSON", file=sys.stderr)
        return 2
    try:
        config = WorkerConfig.from_json(args[0])
    except (ValueError, TypeError, KeyError) as e:
        print(f"vhost_worker: bad configuration: {e}", file=sys.stderr)
        return 2
    # Imported here so that a bad command line fails fast.
    from storvisor.exports.vhost_user_blk import VhostUserBlkServer

    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    me = os.getpid()
    server: VhostUserBlkServer | None = None

    def resized() -> None:
        if server is not None:
            server.notify_config_change()

    remote = RemoteVolume(
        socket.socket(fileno=config.channel_fd),
        config.map_fd,
        config.backings,
        config.cluster_size,
        read_only=config.read_only,
        serial=config.serial,
        on_lost=lambda: os.kill(me, signal.SIGKILL),  # complete nothing with an error
        on_resized=resized,
    )
    listener = socket.socket(fileno=config.listener_fd)
    server = VhostUserBlkServer(
        remote,
        config.socket_path,
        num_queues=config.queues,
        read_only=config.read_only,
        serial=config.serial,
        listener=listener,
    )
    server.start()
    remote.ready()
    signal.sigwait(stop_signals)
    server.close()
    remote.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
