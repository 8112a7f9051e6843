"""TCMU backstores served by the data-plane processes, in a slot (``exports/slots.py``: the
placement, the supervision, the worker's side).

Theory of operation
-------------------
``TcmuDataPlane`` is the daemon's side of one TCMU export: one slot, since a backstore has one
command ring. Each placement opens the backstore's uio device in the daemon (``open_ring``:
the kernel lets one process at a time hold it, so a worker killed a moment ago is waited
for), hands its fds to the worker with the slot and closes its own: from then on the worker
holds the device, and its end releases it. There ``serve_tcmu_slot`` maps the ring and runs a
``TcmuHandler`` on a ``RemoteVolume``: the SCSI emulation, the copies between the data area
and the volume and the direct reads and writes run in the worker, beside the slots of other
exports, while allocations, discards and flushes are done by the daemon's pool. The handler
resets a broken ring itself, through the backstore's configfs file ``action/reset_ring``.

The ring outlives the worker: when a worker ends, the export places its slot again and the
new handler serves first what the ring still holds (commands fetched and not completed
included), before it waits for the kernel; the initiator sees no error meanwhile. An extend
reaches the slot through the shared map, whose ``RESIZED`` makes the handler raise CAPACITY
DATA HAS CHANGED.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from storvisor.engine.device import BlockDevice
from storvisor.engine.iostats import StatsSet
from storvisor.engine.qos import QosBlock
from storvisor.engine.volume import Volume
from storvisor.exports.lio import reset_ring_at
from storvisor.exports.nbd_worker import DataPlanes
from storvisor.exports.slots import TCMU, PlacedExport, SlotConfig, SlotServer
from storvisor.exports.tcmu import (
    TcmuHandler,
    UioOpener,
    UioRing,
    lun_identity,
    open_ring,
    open_uio,
)


class TcmuDataPlane(PlacedExport):
    """``volume`` served on the TCMU backstore whose ``dev_config`` is ``dev_config`` by a
    worker process of ``planes`` (see the module docstring); without ``planes``, by a
    private process. ``block_size`` must match the backstore's; ``serial`` is the stable
    name the LUN's identity derives from; ``reset_path`` is the backstore's
    ``action/reset_ring`` file ("": a broken ring stops the handler). ``sysfs_root``,
    ``dev_root`` and ``opener`` are ``open_ring``'s. The volume handle stays the caller's."""

    kind = TCMU

    def __init__(
        self,
        volume: Volume,
        dev_config: str,
        *,
        block_size: int,
        serial: str = "",
        reset_path: str = "",
        qos: QosBlock | None = None,
        stats: StatsSet | None = None,
        planes: DataPlanes | None = None,
        sysfs_root: str = "/sys",
        dev_root: str = "/dev",
        opener: UioOpener = open_uio,
    ) -> None:
        super().__init__(
            volume,
            dev_config,
            slots=1,
            loads=[1],
            serial=serial,
            qos=qos,
            stats=stats,
            planes=planes,
        )
        self.dev_config = dev_config
        self.block_size = block_size
        self.reset_path = reset_path
        self._open: Callable[[], UioRing] = functools.partial(
            open_ring, dev_config, sysfs_root=sysfs_root, dev_root=dev_root, opener=opener
        )
        self._ring: UioRing | None = None

    def notify_resized(self) -> None:
        """Nothing to do: an extend reaches the slot through the shared map."""

    def _prepare(self) -> None:
        self._ring = self._open()

    def _finish(self) -> None:
        ring, self._ring = self._ring, None
        if ring is not None:
            ring.close()  # the worker holds its own copies

    def _slot_fields(self, slot: int, fds: list[int]) -> dict[str, Any]:
        ring = self._ring
        assert ring is not None
        fds += [ring.event_fd, ring.map_fd]
        return {
            "event_fd": len(fds) - 2,
            "uio_fd": len(fds) - 1,
            "uio": ring.uio,
            "uio_size": ring.size,
            "dev_config": self.dev_config,
            "block_size": self.block_size,
            "reset_path": self.reset_path,
        }


# ------------------------------------------------------------------ the worker process's side


def serve_tcmu_slot(config: SlotConfig, device: BlockDevice) -> SlotServer:
    """Serve the TCMU slot ``config`` on ``device`` (``exports/slots.py``)."""
    ring = UioRing(config.uio, config.uio_size, config.event_fd, config.uio_fd)
    reset = functools.partial(reset_ring_at, config.reset_path) if config.reset_path else None
    try:
        handler = TcmuHandler(
            device,
            config.dev_config,
            identity=lun_identity(config.serial, config.dev_config),
            block_size=config.block_size,
            reset_ring=reset,
            ring=ring,
        )
    except BaseException:
        ring.close()
        raise
    handler.start()  # it owns the ring's fds from here on, also when it raises
    return handler
