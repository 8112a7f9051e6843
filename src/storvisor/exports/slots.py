"""Exports served by the data-plane processes in *slots* (``exports/nbd_worker.py``'s
``DataPlanes``; see ``exports/dataplane.py`` for the channel between them and the daemon).

Theory of operation
-------------------
A slot is the part of one export that runs in one worker process, on a ``RemoteVolume``: the
requests and the direct reads and writes run in the worker, beside the slots of other
exports, while allocations, discards and flushes are done by the daemon's pool. Two kinds of
export are served so: vhost-user-blk (``exports/vhost_worker.py``: one slot per process it
spreads its queues over) and TCMU (``exports/tcmu_plane.py``: one slot serving the ring).

``PlacedExport`` is the daemon's side of one export. Each placement gives every slot to one
worker of the ``DataPlanes`` (the least loaded, the slots of one export to distinct
processes: ``DataPlanes.place``) with one end of its data-plane channel, the shared map's
memfd, the pool's backing fds, the volume's QoS block and a block of I/O statistics, plus
what its kind needs (``SlotConfig``), and waits until every slot serves. Given the volume's
QoS block (``engine/qos.py``), every slot throttles its ``RemoteVolume`` with it, so all of
an export's slots, in all their processes, share the volume's one limit.

A worker serves many slots; each has threads of its own (its server's threads, its channel's
reader), so a slot whose device stalls holds only those: the other slots of the worker keep
completing requests. One thing does reach them: a slot that does not freeze in time
(``PlaneHost.freeze``: a snapshot, or the reuse of freed clusters, while the device holds one
of its direct reads or writes) ends its process, as only that stops its direct I/O; the
process's other exports then recover as after a crash. A pool with a data timeout (``pool
set-timeout --data``) avoids this: its planes do no direct I/O at all.

Without a ``DataPlanes`` to join, an export starts a private one that serves it alone and
ends with it.

Supervision: when a worker ends (a crash, a kill) while the export has a slot in it, the
``DataPlanes`` starts a new worker and calls ``plane_lost``: the export drops its other slots
and places all of them again (after a short delay, growing while placements keep failing).
A slot whose channel to the daemon breaks while it is still served ends its whole process
(SIGKILL), completing no request with an error: so a daemon that dies takes its data planes
with it, and what was in flight is served again once a new daemon serves the export (a
vhost-user front-end resubmits it, a TCMU ring still holds it).
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
from typing import Any, Protocol

from storvisor.engine.device import BlockDevice
from storvisor.engine.iostats import IoStats, StatsSet, ThreadCountedDevice
from storvisor.engine.qos import QosBlock, ThrottledDevice
from storvisor.engine.volume import Volume
from storvisor.errors import IOFailure
from storvisor.exports.dataplane import PlaneHost, RemoteVolume
from storvisor.exports.nbd_worker import DataPlanes

log = logging.getLogger(__name__)

READY_TIMEOUT = 30.0
_STATS_SLOTS = 64  # threads of one slot that count in slots of their own
STOP_TIMEOUT = 10.0

VHOST = "vhost-user-blk"
TCMU = "tcmu"


@dataclass(frozen=True)
class SlotConfig:
    """What a slot is started with (sent as JSON with the ``SLOT`` frame; every ``*_fd``
    field, ``link_fds`` and the values of ``backings`` are positions in the frame's fds until
    ``resolve``).

    ``kind`` is ``VHOST`` or ``TCMU``. vhost-user-blk: slot 0 owns the socket
    (``listener_fd``) and links to the other slots (``link_fds``); slot ``k`` > 0 serves its
    queues over ``link_fds[0]``. TCMU: the one slot serves the uio device ``uio`` (its map of
    ``uio_size`` bytes) the daemon opened (``event_fd``, ``uio_fd``), resetting a broken
    ring through the configfs file ``reset_path``."""

    kind: str
    channel_fd: int
    map_fd: int
    backings: dict[int, int]
    cluster_size: int
    read_only: bool
    serial: str
    name: str  # what the logs call the export
    slot: int = 0
    slots: int = 1
    qos_fd: int = -1  # the volume's QoS block, or -1
    stats_fd: int = -1  # this slot's I/O statistics block, or -1
    listener_fd: int = -1
    link_fds: list[int] = dataclasses.field(default_factory=list)
    socket_path: str = ""
    queues: int = 1
    event_fd: int = -1
    uio_fd: int = -1
    uio: str = ""
    uio_size: int = 0
    dev_config: str = ""
    block_size: int = 512
    reset_path: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SlotConfig:
        raw = json.loads(text)
        raw["backings"] = {int(k): int(v) for k, v in raw["backings"].items()}
        return cls(**raw)

    def fds(self) -> set[int]:
        """What the fd fields hold: positions, or fds once resolved (no -1)."""
        found = {
            self.channel_fd,
            self.map_fd,
            self.qos_fd,
            self.stats_fd,
            self.listener_fd,
            self.event_fd,
            self.uio_fd,
            *self.link_fds,
            *self.backings.values(),
        }
        return found - {-1}

    def resolve(self, fds: list[int]) -> SlotConfig:
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
            event_fd=at(self.event_fd),
            uio_fd=at(self.uio_fd),
        )


@dataclass
class _Placed:
    """One slot of an export, as the daemon holds it."""

    key: int
    pid: int
    host: PlaneHost
    block: IoStats | None


class PlacedExport:
    """The daemon's side of one export of ``volume`` served in ``slots`` slots by the
    worker processes of ``planes`` (see the module docstring); without ``planes``, by a
    private set of one process per slot that serves it alone. ``loads`` weighs each slot (its
    queues) for the placement. The volume handle stays the caller's.

    A kind subclasses it: ``_slot_fields`` says what its slots are started with, and
    ``_prepare``/``_finish`` bracket each placement."""

    kind = ""

    def __init__(
        self,
        volume: Volume,
        name: str,
        *,
        slots: int,
        loads: list[int],
        read_only: bool = False,
        serial: str = "",
        qos: QosBlock | None = None,
        stats: StatsSet | None = None,
        planes: DataPlanes | None = None,
    ) -> None:
        self.volume = volume
        self.name = name
        self.qos = qos
        self.stats = stats
        """Where each slot counts its requests (a block per slot, a slot per thread)."""
        self.read_only = read_only or volume.read_only
        self.serial = serial
        self.slots = slots
        self.loads = loads
        self.starts = 0
        """Placements of the slots so far (1 unless they had to be placed again)."""
        self._own_planes = planes is None
        self._planes = planes
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
        """Place the slots and wait until they serve. Raises ``IOFailure`` if the slots do
        not come up, and what ``_prepare`` raises."""
        try:
            if self._planes is None:
                self._planes = DataPlanes(processes=self.slots)
                self._planes.start()
            with self._lock:
                self._place()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop the slots. Idempotent."""
        self._closing.set()
        with self._lock:
            self._drop()
        if self._own_planes and self._planes is not None:
            self._planes.close()
            self._planes = None

    # -- PlaneTenant --

    def plane_lost(self) -> None:
        """A process serving one of the slots ended: drop the others, place them again."""
        delay = 0.1
        while not self._closing.is_set():
            log.warning(
                "a data plane of %s export %s exited; placing it again", self.kind, self.name
            )
            with self._lock:
                if self._closing.is_set():
                    return
                self._drop()
                try:
                    self._place()
                    return
                except Exception as e:
                    log.error("restarting the data plane for %s failed: %s", self.name, e)
                    self._drop()
            self._closing.wait(delay)
            delay = min(delay * 2, 5.0)

    # -- what a kind adds --

    def _prepare(self) -> None:
        """Before a placement: get what the slots are handed (under ``_lock``)."""

    def _finish(self) -> None:
        """After a placement, whether it succeeded: let go of what ``_prepare`` got."""

    def _slot_fields(self, slot: int, fds: list[int]) -> dict[str, Any]:
        """The ``SlotConfig`` fields of ``slot`` this kind sets; its fds are appended to
        ``fds`` (which stay the caller's) and named by their positions there."""
        raise NotImplementedError

    # -- internals (under _lock) --

    def _place(self) -> None:
        """Give every slot to a process and wait until every one serves."""
        planes = self._planes
        assert planes is not None
        where = planes.place(self.loads)
        backings = self.volume.backing_fds()
        placed: list[_Placed] = []
        self._prepare()
        try:
            for slot in [*range(1, self.slots), 0]:  # slot 0 last: it starts serving
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                host = PlaneHost(self.volume, ours, on_stuck=self._kill)
                block = self.stats.open(_STATS_SLOTS) if self.stats is not None else None
                try:
                    host.start()
                    fds = [theirs.fileno(), host.map.fd]
                    qos_at = stats_at = -1
                    if self.qos is not None:
                        qos_at = len(fds)
                        fds.append(self.qos.fd)
                    if block is not None:
                        stats_at = len(fds)
                        fds.append(block.fd)
                    fields = self._slot_fields(slot, fds)
                    backings_at = {}
                    for index, fd in backings.items():
                        backings_at[index] = len(fds)
                        fds.append(fd)
                    config = SlotConfig(
                        kind=self.kind,
                        channel_fd=0,
                        map_fd=1,
                        backings=backings_at,
                        cluster_size=self.volume.cluster_size,
                        read_only=self.read_only,
                        serial=self.serial,
                        name=self.name,
                        slot=slot,
                        slots=self.slots,
                        qos_fd=qos_at,
                        stats_fd=stats_at,
                        **fields,
                    )
                    key, pid = planes.serve_slot(
                        where[slot], self, self.loads[slot], config.to_json().encode(), fds
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
            self._finish()
        deadline = time.monotonic() + READY_TIMEOUT
        for entry in placed:
            while not entry.host.ready.wait(0.05):
                if not entry.host.alive or time.monotonic() > deadline:
                    raise IOFailure(
                        f"{self.kind} data plane for {self.name} did not start "
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
                    "a slot of %s export %s did not stop in %.0f s",
                    self.kind,
                    self.name,
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


class SlotServer(Protocol):
    """What serves a slot in the worker, on its device: ``close`` it to stop;
    ``notify_resized`` once the volume grew."""

    def close(self) -> None: ...

    def notify_resized(self) -> None: ...


class Slot:
    """One slot served in a worker process (``DataPlanes`` hands it over with ``SLOT``):
    the server its kind runs (``exports/vhost_worker.py``'s ``serve_vhost_slot``,
    ``exports/tcmu_plane.py``'s ``serve_tcmu_slot``) on a ``RemoteVolume`` (throttled and
    counted as configured).

    Owns ``fds`` (the frame's, in the positions ``config`` names), also when it raises
    (``ValueError`` for a bad configuration, ``StorvisorError``, ``OSError``)."""

    def __init__(self, config: SlotConfig, fds: list[int]) -> None:
        self._dropping = False
        self._server: SlotServer | None = None
        self._device: BlockDevice | None = None
        loose = set(fds)  # what nothing owns yet
        try:
            if config.kind not in (VHOST, TCMU):
                raise ValueError(f"unknown kind of slot {config.kind!r}")
            config = config.resolve(fds)
            self.config = config
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
            loose -= config.fds()  # the kind's server owns the rest, also when it raises
            self._server = _serve(config, device)
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
        if self._device is not None:
            self._device.close()

    def _lost(self) -> None:
        if not self._dropping:  # the daemon is gone: complete nothing with an error
            os.kill(os.getpid(), signal.SIGKILL)

    def _resized(self) -> None:
        if self._server is not None:
            self._server.notify_resized()


def _serve(config: SlotConfig, device: BlockDevice) -> SlotServer:
    """Start what serves ``config``'s kind on ``device``. It owns the fds of the kind's
    fields (the listener, links, uio fds) from here on, and closes them when it raises."""
    if config.kind == TCMU:
        from storvisor.exports.tcmu_plane import serve_tcmu_slot

        return serve_tcmu_slot(config, device)
    from storvisor.exports.vhost_worker import serve_vhost_slot

    return serve_vhost_slot(config, device)
