"""vhost-user-blk exports served by the data-plane processes, in slots
(``exports/slots.py``: the placement, the supervision, the worker's side).

Theory of operation
-------------------
``VhostDataPlane`` is the daemon's side of one export. It binds the export's Unix socket
itself, so the path stays bound for as long as the export exists, and splits the export into
*slots*: ``min(num_queues, processes)`` of them, queue ``i`` in slot ``i % slots``, each in a
worker process of its own while there are enough. Slot 0 gets the listening socket and the
links to the other slots: it talks vhost-user with the front-end and hands every message to
the other slots (``vhost_user_blk/peers.py``). In its worker every slot runs a
``VhostUserBlkServer`` on a ``RemoteVolume`` (``serve_vhost_slot``): the rings, the
virtio-blk requests and the direct reads and writes run there.

When a worker ends, the export drops its other slots and places all of them again; a
vhost-user front-end started with ``reconnect`` comes back and resubmits what was in flight
(INFLIGHT_SHMFD).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from typing import Any

from storvisor.engine.device import BlockDevice
from storvisor.engine.iostats import StatsSet
from storvisor.engine.qos import QosBlock
from storvisor.engine.volume import Volume
from storvisor.exports.nbd_worker import DataPlanes
from storvisor.exports.slots import VHOST, PlacedExport, SlotConfig, SlotServer
from storvisor.exports.vhost_user_blk import VhostUserBlkServer, listen_unix


class VhostDataPlane(PlacedExport):
    """One vhost-user-blk export of ``volume`` on ``socket_path``, its queues served by the
    worker processes of ``planes`` (see the module docstring); without ``planes``, by a
    private set of ``processes`` (default: one per CPU) that serves it alone. The volume
    handle stays the caller's."""

    kind = VHOST

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
        width = planes.processes if planes is not None else processes or os.cpu_count() or 1
        slots = max(1, min(num_queues, width))
        super().__init__(
            volume,
            socket_path,
            slots=slots,
            loads=[len(range(slot, num_queues, slots)) for slot in range(slots)],
            read_only=read_only,
            serial=serial,
            qos=qos,
            stats=stats,
            planes=planes,
        )
        self.socket_path = socket_path
        self.num_queues = num_queues
        self._listener: socket.socket | None = None
        self._links: list[tuple[socket.socket, socket.socket]] = []

    def start(self) -> None:
        """Bind the socket (replacing a stale one), place the slots and wait until they
        serve. Raises ``OSError`` if the socket cannot be bound, ``IOFailure`` if the slots
        do not come up."""
        self._listener = listen_unix(self.socket_path)
        super().start()

    def notify_config_change(self) -> None:
        """Nothing to do: an extend reaches the slots through the shared map."""

    def close(self) -> None:
        """Stop the slots and remove the socket. Idempotent."""
        super().close()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)

    def _prepare(self) -> None:
        self._links = [
            socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(self.slots - 1)
        ]

    def _finish(self) -> None:
        links, self._links = self._links, []
        for a, b in links:
            a.close()
            b.close()

    def _slot_fields(self, slot: int, fds: list[int]) -> dict[str, Any]:
        listener = self._listener
        assert listener is not None
        if slot == 0:
            link_fds = [a.fileno() for a, _ in self._links]
        else:
            link_fds = [self._links[slot - 1][1].fileno()]
        listener_at = -1
        if slot == 0:
            listener_at = len(fds)
            fds.append(listener.fileno())
        links_at = list(range(len(fds), len(fds) + len(link_fds)))
        fds += link_fds
        return {
            "listener_fd": listener_at,
            "link_fds": links_at,
            "socket_path": self.socket_path,
            "queues": self.num_queues,
        }


# ------------------------------------------------------------------ the worker process's side


class _VhostSlot:
    """The vhost-user-blk server of one slot, and its links to the other slots."""

    def __init__(self, config: SlotConfig, device: BlockDevice) -> None:
        self._server: VhostUserBlkServer | None = None
        self._peer_thread: threading.Thread | None = None
        self.links = [socket.socket(fileno=fd) for fd in config.link_fds]
        try:
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
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in self.links:
            with contextlib.suppress(OSError):
                link.shutdown(socket.SHUT_RDWR)
        if self._peer_thread is not None and self._peer_thread is not threading.current_thread():
            self._peer_thread.join()
        for link in self.links:
            link.close()

    def notify_resized(self) -> None:
        if self._server is not None:
            self._server.notify_config_change()


def serve_vhost_slot(config: SlotConfig, device: BlockDevice) -> SlotServer:
    """Serve the vhost-user-blk slot ``config`` on ``device`` (``exports/slots.py``)."""
    return _VhostSlot(config, device)
