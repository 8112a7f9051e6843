"""vhost-user-blk exports served by the data-plane processes (``exports/nbd_worker.py``'s
``DataPlanes``; see ``exports/dataplane.py`` for the channel between them and the daemon).

Theory of operation
-------------------
``VhostDataPlane`` is the daemon's side of one export. It binds the export's Unix socket
itself, so the path stays bound for as long as the export exists, and splits the export into
*slots*: ``min(num_queues, processes)`` of them, queue ``i`` in slot ``i % slots``. Each slot
goes to one worker process of the ``DataPlanes`` (the least loaded, the slots of one export to
distinct processes: ``DataPlanes.place``) with one end of its data-plane channel, the shared
map's memfd, the pool's backing fds, the links between the export's slots, and for slot 0
the listening socket. There a ``Slot`` runs a ``VhostUserBlkServer`` on a ``RemoteVolume``:
the rings, the virtio-blk requests and the direct reads and writes run in the worker, beside
the slots of other exports, while allocations, discards and flushes are done by the daemon's
pool. Slot 0 talks vhost-user with the front-end and hands every message to the other slots
(``vhost_user_blk/peers.py``). Given the volume's QoS block (``engine/qos.py``), every slot
throttles its ``RemoteVolume`` with it, so all the export's queues, in all their processes,
share the volume's one limit.

A worker serves many slots; each has threads of its own (its server's control and queue
threads, its channel's reader), so a slot whose device stalls holds only those: the other
slots of the worker keep completing requests. One thing does reach them: a slot that does not
freeze in time (``PlaneHost.freeze``: a snapshot, or the reuse of freed clusters, while the
device holds one of its direct reads or writes) ends its process, as only that stops its
direct I/O; the process's other exports then reconnect as after a crash. A pool with a data
timeout (``pool set-timeout --data``) avoids this: its planes do no direct I/O at all.

Without a ``DataPlanes`` to join, an export starts a private one of ``slots`` processes that
serves it alone and ends with it (one set of processes per export).

Supervision: when a worker ends (a crash, a kill) while the export has a slot in it, the
``DataPlanes`` starts a new worker and calls ``plane_lost``: the export drops its other slots
and places all of them again (after a short delay, growing while placements keep failing).
A vhost-user front-end started with ``reconnect`` comes back and resubmits what was in flight
(INFLIGHT_SHMFD). A slot whose channel to the daemon breaks while it is still served ends its
whole process (SIGKILL), completing no request with an error: so a daemon that dies takes its
data planes with it, and a front-end with INFLIGHT_SHMFD resubmits what was in flight once a
new daemon serves the export again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import asdict, dataclass

from storvisor.engine.device import BlockDevice
from storvisor.engine.iostats import IoStats, StatsSet, ThreadCountedDevice
from storvisor.engine.qos import QosBlock, ThrottledDevice
from storvisor.engine.volume import Volume
from storvisor.errors import IOFailure
from storvisor.exports.dataplane import PlaneHost, RemoteVolume
from storvisor.exports.nbd_worker import DataPlanes
from storvisor.exports.vhost_user_blk import VhostUserBlkServer, listen_unix

log = logging.getLogger(__name__)

READY_TIMEOUT = 30.0
_STATS_SLOTS = 64  # threads of one slot that count in slots of their own
STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class WorkerConfig:
    """What a slot is started with (sent as JSON with the ``SLOT`` frame; every ``*_fd``
    field, ``link_fds`` and the values of ``backings`` are positions in the frame's fds until
    ``resolve``).

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
    stats_fd: int = -1  # this slot's I/O statistics block, or -1

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerConfig:
        raw = json.loads(text)
        raw["backings"] = {int(k): int(v) for k, v in raw["backings"].items()}
        return cls(**raw)

    def resolve(self, fds: list[int]) -> WorkerConfig:
        """This configuration with positions replaced by the fds at them (-1 stays -1).
        Raises ``ValueError`` for a position ``fds`` lacks."""

        def at(position: int) -> int:
            if position < 0:
                return -1
            if position >= len(fds):
                raise ValueError(f"fd position {position} of {len(fds)}")
            return fds[position]

        return dataclasses.replace(
            self,
            channel_fd=at(self.channel_fd),
            map_fd=at(self.map_fd),
            listener_fd=at(self.listener_fd),
            link_fds=[at(p) for p in self.link_fds],
            backings={index: at(p) for index, p in self.backings.items()},
            qos_fd=at(self.qos_fd),
            stats_fd=at(self.stats_fd),
        )


@dataclass
class _Placed:
    """One slot of an export, as the daemon holds it."""

    key: int
    pid: int
    host: PlaneHost
    block: IoStats | None


class VhostDataPlane:
    """One vhost-user-blk export of ``volume`` on ``socket_path``, its queues served by the
    worker processes of ``planes`` (see the module docstring); without ``planes``, by a
    private set of ``processes`` (default: one per CPU) that serves it alone. The volume
    handle stays the caller's."""

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
        planes: DataPlanes | None = None,
    ) -> None:
        self.volume = volume
        self.qos = qos
        self.stats = stats
        """Where each slot counts its requests (a block per slot, a slot per thread)."""
        self.socket_path = socket_path
        self.num_queues = num_queues
        self.read_only = read_only or volume.read_only
        self.serial = serial
        width = planes.processes if planes is not None else processes or os.cpu_count() or 1
        self.processes = max(1, min(num_queues, width))
        """The export's slots (each in a process, distinct ones while there are enough)."""
        self.starts = 0
        """Placements of the slots so far (1 unless they had to be placed again)."""
        self._own_planes = planes is None
        self._planes = planes
        self._listener: socket.socket | None = None
        self._placed: list[_Placed] = []
        self._lock = threading.Lock()  # placements and drops, one at a time
        self._closing = threading.Event()

    @property
    def pids(self) -> list[int]:
        """The pids of the processes serving the slots, slot 0 first (empty while none)."""
        placed = list(self._placed)
        return [p.pid for p in placed]

    @property
    def slot_keys(self) -> list[int]:
        """The ``DataPlanes`` keys of the slots, slot 0 first (empty while none is placed)."""
        return [p.key for p in list(self._placed)]

    def start(self) -> None:
        """Bind the socket (replacing a stale one), place the slots and wait until they
        serve. Raises ``OSError`` if the socket cannot be bound, ``IOFailure`` if the slots
        do not come up."""
        self._listener = listen_unix(self.socket_path)
        try:
            if self._planes is None:
                self._planes = DataPlanes(processes=self.processes)
                self._planes.start()
            with self._lock:
                self._place()
        except BaseException:
            self.close()
            raise

    def notify_config_change(self) -> None:
        """Nothing to do: an extend reaches the slots through the shared map."""

    def close(self) -> None:
        """Stop the slots and remove the socket. Idempotent."""
        self._closing.set()
        with self._lock:
            self._drop()
        if self._own_planes and self._planes is not None:
            self._planes.close()
            self._planes = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)

    # -- PlaneTenant --

    def plane_lost(self) -> None:
        """A process serving one of the slots ended: drop the others, place them again."""
        delay = 0.1
        while not self._closing.is_set():
            log.warning(
                "a data plane of vhost-user-blk export %s exited; placing its queues again",
                self.socket_path,
            )
            with self._lock:
                if self._closing.is_set():
                    return
                self._drop()
                try:
                    self._place()
                    return
                except Exception as e:
                    log.error("restarting the data plane for %s failed: %s", self.socket_path, e)
                    self._drop()
            self._closing.wait(delay)
            delay = min(delay * 2, 5.0)

    # -- internals (under _lock) --

    def _place(self) -> None:
        """Give every slot to a process and wait until every one serves."""
        planes, listener = self._planes, self._listener
        assert planes is not None and listener is not None
        slots = self.processes
        loads = [len(range(slot, self.num_queues, slots)) for slot in range(slots)]
        where = planes.place(loads)
        links = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(slots - 1)]
        backings = self.volume.backing_fds()
        placed: list[_Placed] = []
        try:
            for slot in [*range(1, slots), 0]:
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                host = PlaneHost(self.volume, ours, on_stuck=self._kill)
                block = self.stats.open(_STATS_SLOTS) if self.stats is not None else None
                try:
                    host.start()
                    link_fds = (
                        [a.fileno() for a, _ in links]
                        if slot == 0
                        else [links[slot - 1][1].fileno()]
                    )
                    fds = [theirs.fileno(), host.map.fd]
                    listener_at = qos_at = stats_at = -1
                    if slot == 0:
                        listener_at = len(fds)
                        fds.append(listener.fileno())
                    if self.qos is not None:
                        qos_at = len(fds)
                        fds.append(self.qos.fd)
                    if block is not None:
                        stats_at = len(fds)
                        fds.append(block.fd)
                    links_at = list(range(len(fds), len(fds) + len(link_fds)))
                    fds += link_fds
                    backings_at = {}
                    for index, fd in backings.items():
                        backings_at[index] = len(fds)
                        fds.append(fd)
                    config = WorkerConfig(
                        channel_fd=0,
                        map_fd=1,
                        listener_fd=listener_at,
                        link_fds=links_at,
                        slot=slot,
                        slots=slots,
                        backings=backings_at,
                        cluster_size=self.volume.cluster_size,
                        socket_path=self.socket_path,
                        queues=self.num_queues,
                        read_only=self.read_only,
                        serial=self.serial,
                        qos_fd=qos_at,
                        stats_fd=stats_at,
                    )
                    key, pid = planes.serve_slot(
                        where[slot], self, loads[slot], config.to_json().encode(), fds
                    )
                except BaseException:
                    host.close()
                    if block is not None and self.stats is not None:
                        self.stats.retire(block)
                    raise
                finally:
                    theirs.close()
                entry = _Placed(key, pid, host, block)
                if slot == 0:
                    placed.insert(0, entry)
                else:
                    placed.append(entry)
                self._placed = list(placed)
        finally:
            for a, b in links:
                a.close()
                b.close()
        deadline = time.monotonic() + READY_TIMEOUT
        for entry in placed:
            while not entry.host.ready.wait(0.05):
                if not entry.host.alive or time.monotonic() > deadline:
                    raise IOFailure(
                        f"vhost-user-blk data plane for {self.socket_path} did not start "
                        f"(slot in process {entry.pid})",
                        errno.EIO,
                    )
        self.starts += 1

    def _drop(self) -> None:
        """End every slot: each worker closes its channel once the slot's threads ended
        (bounded by ``STOP_TIMEOUT``: a slot held by a stalled device is let go)."""
        placed, self._placed = self._placed, []
        planes = self._planes
        for entry in placed:
            if planes is not None:
                planes.drop_slot(entry.key)
        deadline = time.monotonic() + STOP_TIMEOUT
        for entry in placed:
            if not entry.host.wait_closed(max(0.0, deadline - time.monotonic())):
                log.error(
                    "a slot of vhost-user-blk export %s did not stop in %.0f s",
                    self.socket_path,
                    STOP_TIMEOUT,
                )
            entry.host.close()
            if entry.block is not None and self.stats is not None:
                self.stats.retire(entry.block)  # its slot has ended: the counts are final

    def _kill(self) -> None:
        """A slot did not freeze in time (its device holds a direct read or write): end
        the processes it runs in, as only that stops their direct I/O."""
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------ the worker process's side


class Slot:
    """One slot served in a worker process (``DataPlanes`` hands it over with ``SLOT``):
    a ``VhostUserBlkServer`` on a ``RemoteVolume`` (throttled and counted as configured).

    Owns ``fds`` (the frame's, in the positions ``config`` names), also when it raises
    (``ValueError`` for a bad configuration, ``StorvisorError``, ``OSError``)."""

    def __init__(self, config: WorkerConfig, fds: list[int]) -> None:
        self._dropping = False
        self._server: VhostUserBlkServer | None = None
        self._peer_thread: threading.Thread | None = None
        self._device: BlockDevice | None = None
        self.links: list[socket.socket] = []
        loose = set(fds)  # what nothing owns yet
        try:
            config = config.resolve(fds)
            self.config = config
            self.links = [socket.socket(fileno=fd) for fd in config.link_fds]
            loose -= set(config.link_fds)
            channel = socket.socket(fileno=config.channel_fd)
            loose.discard(config.channel_fd)
            try:
                remote = RemoteVolume(
                    channel,
                    config.map_fd,
                    config.backings,
                    config.cluster_size,
                    read_only=config.read_only,
                    serial=config.serial,
                    on_lost=self._lost,
                    on_resized=self._resized,
                    owns_backings=True,
                )
            except BaseException:
                channel.close()
                raise
            loose -= {config.map_fd, *config.backings.values()}
            device: BlockDevice = remote
            self._device = device
            if config.qos_fd >= 0:  # each block owns its fd from here on
                loose.discard(config.qos_fd)
                device = self._device = ThrottledDevice(
                    device, QosBlock(fd=config.qos_fd), owns_qos=True
                )
            if config.stats_fd >= 0:
                loose.discard(config.stats_fd)
                device = self._device = ThreadCountedDevice(
                    device, IoStats(fd=config.stats_fd), owns_stats=True
                )
            if config.slot > 0:
                peer = VhostUserBlkServer(
                    device,
                    config.socket_path,
                    num_queues=config.queues,
                    read_only=config.read_only,
                    serial=config.serial,
                    slot=config.slot,
                    slots=config.slots,
                )
                self._peer_thread = threading.Thread(
                    target=peer.serve_peer, args=(self.links[0],), name="vhost-peer", daemon=True
                )
                self._peer_thread.start()
            else:
                listener = socket.socket(fileno=config.listener_fd)
                loose.discard(config.listener_fd)
                self._server = VhostUserBlkServer(
                    device,
                    config.socket_path,
                    num_queues=config.queues,
                    read_only=config.read_only,
                    serial=config.serial,
                    listener=listener,
                    peers=self.links,
                )
                self._server.start()
            remote.ready()
        except BaseException:
            self._dropping = True
            for fd in loose:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._close_parts()
            raise

    def close(self) -> None:
        """Stop serving and close everything the slot holds (its channel last: the daemon
        sees the slot end when it closes)."""
        self._dropping = True
        self._close_parts()

    def _close_parts(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in self.links:
            with contextlib.suppress(OSError):
                link.shutdown(socket.SHUT_RDWR)
        if self._peer_thread is not None and self._peer_thread is not threading.current_thread():
            self._peer_thread.join()
        for link in self.links:
            link.close()
        if self._device is not None:
            self._device.close()

    def _lost(self) -> None:
        if not self._dropping:  # the daemon is gone: complete nothing with an error
            os.kill(os.getpid(), signal.SIGKILL)

    def _resized(self) -> None:
        if self._server is not None:
            self._server.notify_config_change()
