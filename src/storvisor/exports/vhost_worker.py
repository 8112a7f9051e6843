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
which one Python process cannot. Given the volume's QoS block (``engine/qos.py``), every
process throttles its ``RemoteVolume`` with it, so all the export's queues, in all its
processes, share the volume's one limit.

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
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from storvisor.engine.device import BlockDevice
from storvisor.engine.iostats import IoStats, StatsSet, ThreadCountedDevice
from storvisor.engine.qos import QosBlock, ThrottledDevice
from storvisor.engine.volume import Volume
from storvisor.errors import IOFailure
from storvisor.exports.dataplane import PlaneHost, RemoteVolume
from storvisor.exports.vhost_user_blk import VhostUserBlkServer, listen_unix

log = logging.getLogger(__name__)

READY_TIMEOUT = 30.0
_STATS_SLOTS = 64  # threads of one process that count in slots of their own
STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class WorkerConfig:
    """What a data-plane process is started with (as JSON on its command line).

    Slot 0 owns the vhost-user socket (``listener_fd``) and links to the other slots
    (``link_fds``); slot ``k`` > 0 serves its queues over ``link_fds[0]``."""

    channel_fd: int
    map_fd: int
    listener_fd: int
    link_fds: list[int]
    slot: int
    slots: int
    backings: dict[int, int]
    cluster_size: int
    socket_path: str
    queues: int
    read_only: bool
    serial: str
    qos_fd: int = -1  # the volume's QoS block, or -1
    stats_fd: int = -1  # this process's I/O statistics block, or -1

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerConfig:
        raw = json.loads(text)
        raw["backings"] = {int(k): int(v) for k, v in raw["backings"].items()}
        return cls(**raw)


class VhostDataPlane:
    """One vhost-user-blk export of ``volume`` on ``socket_path``, served by processes of its
    own (see the module docstring): ``min(num_queues, CPUs)`` of them, queue ``i`` in process
    ``i % processes``. The volume handle stays the caller's."""

    def __init__(
        self,
        volume: Volume,
        socket_path: str,
        *,
        num_queues: int = 1,
        read_only: bool = False,
        serial: str = "",
        processes: int | None = None,
        qos: QosBlock | None = None,
        stats: StatsSet | None = None,
    ) -> None:
        self.volume = volume
        self.qos = qos
        self.stats = stats
        """Where each process counts its requests (a block per process, a slot per thread)."""
        self.socket_path = socket_path
        self.num_queues = num_queues
        self.read_only = read_only or volume.read_only
        self.serial = serial
        self.processes = max(1, min(num_queues, processes or os.cpu_count() or 1))
        self.starts = 0
        """Process groups started so far (1 unless one had to be restarted)."""
        self._listener: socket.socket | None = None
        self._procs: list[subprocess.Popen[bytes]] = []
        self._hosts: list[PlaneHost] = []
        self._blocks: list[IoStats] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._supervisor: threading.Thread | None = None

    @property
    def pids(self) -> list[int]:
        """The data-plane processes' pids, slot 0 first (empty while none runs)."""
        with self._lock:
            return [proc.pid for proc in self._procs]

    def start(self) -> None:
        """Bind the socket (replacing a stale one), start the processes and wait until they
        serve. Raises ``OSError`` if the socket cannot be bound, ``IOFailure`` if the
        processes do not come up."""
        self._listener = listen_unix(self.socket_path)
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
        """Nothing to do: an extend reaches the processes through the shared map."""

    def close(self) -> None:
        """Stop the processes and remove the socket. Idempotent."""
        self._closing.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join()
            self._supervisor = None
        self._stop_group()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    # -- internals --

    def _spawn(self) -> None:
        """Start one process per slot (slot 0 last, once its peers listen) and wait until
        every one serves."""
        assert self._listener is not None
        slots = self.processes
        links = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(slots - 1)]
        backings = self.volume.backing_fds()
        try:
            for slot in [*range(1, slots), 0]:
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                host = PlaneHost(self.volume, ours, on_stuck=self._kill)
                block = self.stats.open(_STATS_SLOTS) if self.stats is not None else None
                if block is not None:
                    with self._lock:
                        self._blocks.append(block)
                try:
                    host.start()
                    link_fds = (
                        [a.fileno() for a, _ in links]
                        if slot == 0
                        else [links[slot - 1][1].fileno()]
                    )
                    listener_fd = self._listener.fileno() if slot == 0 else -1
                    config = WorkerConfig(
                        channel_fd=theirs.fileno(),
                        map_fd=host.map.fd,
                        listener_fd=listener_fd,
                        link_fds=link_fds,
                        slot=slot,
                        slots=slots,
                        backings=backings,
                        cluster_size=self.volume.cluster_size,
                        socket_path=self.socket_path,
                        queues=self.num_queues,
                        read_only=self.read_only,
                        serial=self.serial,
                        qos_fd=self.qos.fd if self.qos is not None else -1,
                        stats_fd=block.fd if block is not None else -1,
                    )
                    fds = [theirs.fileno(), host.map.fd, *link_fds, *backings.values()]
                    if self.qos is not None:
                        fds.append(self.qos.fd)
                    if block is not None:
                        fds.append(block.fd)
                    if listener_fd >= 0:
                        fds.append(listener_fd)
                    proc = subprocess.Popen(
                        [sys.executable, "-m", "storvisor.exports.vhost_worker", config.to_json()],
                        pass_fds=fds,
                        stdin=subprocess.DEVNULL,
                    )
                except BaseException:
                    host.close()
                    raise
                finally:
                    theirs.close()
                with self._lock:
                    self._procs.insert(0 if slot == 0 else len(self._procs), proc)
                    self._hosts.append(host)
        finally:
            for a, b in links:
                a.close()
                b.close()
        self.starts += 1
        deadline = time.monotonic() + READY_TIMEOUT
        for host, proc in zip(self._hosts, [*self._procs[1:], self._procs[0]], strict=True):
            while not host.ready.wait(0.05):
                if proc.poll() is not None or not host.alive or time.monotonic() > deadline:
                    raise IOFailure(
                        f"vhost-user-blk data plane for {self.socket_path} did not start "
                        f"(exit status {proc.poll()})",
                        errno.EIO,
                    )

    def _kill(self) -> None:
        with self._lock:
            procs = list(self._procs)
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    def _stop_group(self) -> None:
        with self._lock:
            procs, hosts, blocks = self._procs, self._hosts, self._blocks
            self._procs, self._hosts, self._blocks = [], [], []
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        for proc in procs:
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for host in hosts:
            host.close()
        if self.stats is not None:
            for block in blocks:  # their processes have ended: the counts are final
                self.stats.retire(block)

    def _supervise(self) -> None:
        """Restart the whole group when one of its processes ends (a vhost-user connection
        is one state shared by the group, so the front-end reconnects to a new one)."""
        delay = 0.1
        while not self._closing.is_set():
            with self._lock:
                procs = list(self._procs)
            started = time.monotonic()
            if procs:
                _wait_any(procs, self._wake_r)
            if self._closing.is_set():
                return
            log.warning(
                "a vhost-user-blk data plane for %s exited (status %s); restarting",
                self.socket_path,
                [proc.poll() for proc in procs],
            )
            self._stop_group()
            delay = 0.1 if time.monotonic() - started > 10 else min(delay * 2, 5.0)
            while not self._closing.wait(delay):
                try:
                    self._spawn()
                    break
                except Exception as e:
                    log.error("restarting the data plane for %s failed: %s", self.socket_path, e)
                    self._stop_group()
                    delay = min(delay * 2, 5.0)


def _wait_any(procs: list[subprocess.Popen[bytes]], wake_fd: int) -> None:
    """Return when one of ``procs`` has ended or ``wake_fd`` is readable."""
    poller = select.poll()
    pidfds = []
    try:
        for proc in procs:
            try:
                fd = os.pidfd_open(proc.pid)
            except ProcessLookupError:
                return
            pidfds.append(fd)
            poller.register(fd, select.POLLIN)
        poller.register(wake_fd, select.POLLIN)
        poller.poll()
    finally:
        for fd in pidfds:
            os.close(fd)


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
    device: BlockDevice = remote
    if config.qos_fd >= 0:
        device = ThrottledDevice(remote, QosBlock(fd=config.qos_fd), owns_qos=True)
    if config.stats_fd >= 0:
        device = ThreadCountedDevice(device, IoStats(fd=config.stats_fd), owns_stats=True)
    links = [socket.socket(fileno=fd) for fd in config.link_fds]
    if config.slot > 0:  # a queue process: serves its queues until the link closes
        peer = VhostUserBlkServer(
            device,
            config.socket_path,
            num_queues=config.queues,
            read_only=config.read_only,
            serial=config.serial,
            slot=config.slot,
            slots=config.slots,
        )
        remote.ready()

        def serve() -> None:
            peer.serve_peer(links[0])
            os.kill(me, signal.SIGTERM)  # slot 0 has gone: so do we

        threading.Thread(target=serve, name="vhost-peer", daemon=True).start()
        signal.sigwait(stop_signals)
        links[0].close()
        device.close()
        return 0
    server = VhostUserBlkServer(
        device,
        config.socket_path,
        num_queues=config.queues,
        read_only=config.read_only,
        serial=config.serial,
        listener=socket.socket(fileno=config.listener_fd),
        peers=links,
    )
    server.start()
    remote.ready()
    signal.sigwait(stop_signals)
    server.close()
    for link in links:
        link.close()
    device.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
