"""Export definitions, their persistence in HOME, and the servers that run them.

Theory of operation
-------------------
An export is a *definition* (``ExportSpec``: which volume, over which protocol, under which
name) plus, while the daemon runs, a *live server* for it. Definitions are kept in
``HOME/exports.json`` (written to a temporary file, fsynced and renamed over the old one, so a
crash leaves either the old or the new list). A command run without the daemon only edits
definitions; the daemon starts every definition when it starts (``ExportRuntime``), and a
definition whose volume has gone is reported with state ``broken``, never fatal.

NBD exports share one ``NBDServer`` listening on ``HOME/nbd.sock`` (and on TCP when asked);
each client connection opens its own volume handle, which is closed when it ends. The daemon
has a fixed set of data-plane processes (``exports/nbd_worker.py``'s ``DataPlanes``, one per
CPU unless told otherwise): it hands every accepted NBD connection to one of them, and puts
the queues of every vhost-user-blk export of a volume and the ring of every TCMU backstore on
the least loaded ones (``exports/vhost_worker.py``, ``exports/tcmu_plane.py``), so several
clients and exports use several cores whatever their number; the daemon holds such an
export's volume handle for as long as the export lives and does its allocations and flushes.
With ``per_export_planes`` every vhost-user-blk export and TCMU backstore has processes of
its own instead; without data planes they are served in the daemon.

The service opens every export's volume through a ``ThrottledDevice`` holding the volume's
QoS block (``api/qos.py``); the data planes are handed that block with the volume, so all
of a volume's exports draw from one set of buckets.

SCSI exports go through LIO (``exports/lio.py``): ``scsi`` is a tcm_loop LUN (a host
``/dev/sdX``), ``vhost-scsi`` a LUN of a vhost target (``wwpn``, ``lun``) for QEMU, of a
volume (a TCMU backstore, its ring served by one of the data-plane processes, like a
vhost-user-blk export's queues: ``exports/tcmu_plane.py``) or of a host block device
(``device``: an iblock backstore). Their LIO objects outlive the daemon: stopping it closes
the handlers only, so a restarted daemon serves the same LUNs again; removing the export
deletes them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from storvisor.api.export_defs import (
    SCSI_KINDS,
    ExportKind,
    ExportSpec,
    TcpAddress,
)
from storvisor.engine.device import BlockDevice
from storvisor.engine.iostats import StatsSet
from storvisor.engine.qos import QosBlock, ThrottledDevice
from storvisor.errors import Conflict, InvalidArgument, NotFound
from storvisor.exports.nbd import NBDExport, NBDServer, nbd_uri

if TYPE_CHECKING:
    from storvisor.exports.lio import Lio, ScsiExport
    from storvisor.exports.nbd_worker import DataPlanes
    from storvisor.exports.tcmu_plane import TcmuDataPlane
    from storvisor.exports.vhost_user_blk import VhostUserBlkServer
    from storvisor.exports.vhost_worker import VhostDataPlane

log = logging.getLogger(__name__)

NBD_SOCKET = "nbd.sock"


def export_uris(
    spec: ExportSpec, nbd_socket: Path, nbd_tcp: TcpAddress | None = None, *, tls: bool = False
) -> tuple[str, ...]:
    """How a client reaches ``spec``: NBD URIs (Unix socket first; ``nbds://`` for TCP when
    ``tls``), or the vhost-user socket."""
    if spec.kind is ExportKind.VHOST_USER_BLK:
        return (spec.socket or "",)
    if spec.kind is ExportKind.VHOST_SCSI:
        return (spec.wwpn or "",)
    if spec.kind is ExportKind.SCSI:
        return ()
    uris = [nbd_uri(spec.name, unix_path=str(nbd_socket))]
    if nbd_tcp is not None:
        uris.append(nbd_uri(spec.name, host=nbd_tcp.host, port=nbd_tcp.port, tls=tls))
    return tuple(uris)


class ExportRuntime:
    """The live export servers of the daemon.

    ``start`` binds ``HOME/nbd.sock`` (and TCP when ``nbd_tcp`` is given, with TLS required
    when ``nbd_tls`` is given: such connections stay in this process) and starts
    ``plane_processes`` data-plane processes (default: one per CPU); ``activate`` and
    ``deactivate`` add and remove one export; ``close`` stops everything and closes every
    volume handle it holds. Not thread-safe: the service serialises calls.
    """

    def __init__(
        self,
        home: Path,
        nbd_tcp: TcpAddress | None = None,
        *,
        data_planes: bool = True,
        nbd_tls: ssl.SSLContext | None = None,
        plane_processes: int | None = None,
        per_export_planes: bool = False,
    ) -> None:
        self.nbd_socket = home / NBD_SOCKET
        self._nbd_tcp_request = nbd_tcp
        self.nbd_tcp: TcpAddress | None = None
        self._planes: DataPlanes | None = None
        self._per_export = per_export_planes
        if data_planes:
            from storvisor.exports.nbd_worker import DataPlanes

            self._planes = DataPlanes(plane_processes)
        self._nbd = NBDServer(handoff=self._planes.hand_over if self._planes else None, tls=nbd_tls)
        self._nbd_tls = nbd_tls is not None
        self._nbd_names: set[str] = set()
        self._vhost: dict[str, tuple[VhostUserBlkServer | VhostDataPlane, BlockDevice]] = {}
        self._stats: dict[str, tuple[ExportSpec, StatsSet]] = {}
        self._scsi: dict[str, tuple[ScsiExport, BlockDevice | None]] = {}
        self._lio: Lio | None = None
        self._started = False

    def start(self) -> None:
        """Listen on the NBD socket(s). Raises ``Conflict`` if an address is taken."""
        with contextlib.suppress(FileNotFoundError):
            self.nbd_socket.unlink()
        try:
            self._nbd.listen_unix(str(self.nbd_socket))
            os.chmod(self.nbd_socket, 0o600)
            if self._nbd_tcp_request is not None:
                req = self._nbd_tcp_request
                port = self._nbd.listen_tcp(req.host, req.port)
                self.nbd_tcp = TcpAddress(req.host, port)
        except OSError as e:
            self._nbd.close()
            raise Conflict(f"cannot listen for NBD: {e.strerror or e}") from e
        if self._planes is not None:
            self._planes.start()
        self._nbd.start()
        self._started = True

    def uris(self, spec: ExportSpec) -> tuple[str, ...]:
        """How a client reaches ``spec`` once it is active."""
        entry = self._scsi.get(spec.name)
        if entry is not None and spec.kind is ExportKind.SCSI:
            found = entry[0].info()
            return tuple(p for p in (found.device, found.by_id) if p) if found else ()
        return export_uris(spec, self.nbd_socket, self.nbd_tcp, tls=self._nbd_tls)

    def activate(
        self, spec: ExportSpec, open_volume: Callable[[], BlockDevice], serial: str = ""
    ) -> None:
        """Start serving ``spec``; ``open_volume`` opens a handle to its volume.

        Raises ``Conflict`` when the vhost-user socket cannot be bound, and whatever
        ``open_volume`` raises (the export is then not active).
        """
        read_only = spec.read_only or spec.snapshot is not None
        if spec.kind in SCSI_KINDS:
            self._activate_scsi(spec, open_volume, serial)
            return
        if spec.kind is ExportKind.NBD:
            stats = StatsSet(spec.name)
            self._nbd.add_export(
                NBDExport(
                    spec.name,
                    stats.counted(open_volume),
                    description=spec.target,
                    read_only=read_only,
                )
            )
            if self._planes is not None:
                self._planes.add_export(spec.name, open_volume, spec.target, read_only, stats)
            self._nbd_names.add(spec.name)
            self._stats[spec.name] = (spec, stats)
            return
        if spec.socket is None:
            raise InvalidArgument(f"export {spec.name}: no vhost-user socket path")
        # Imported here: commands that only edit definitions need not load the data path.
        from storvisor.engine.volume import Volume
        from storvisor.exports.vhost_user_blk import VhostUserBlkServer
        from storvisor.exports.vhost_worker import VhostDataPlane

        device = open_volume()
        server: VhostUserBlkServer | VhostDataPlane
        counters: StatsSet | None = None
        try:
            Path(spec.socket).parent.mkdir(parents=True, exist_ok=True)
            volume, qos = _unthrottled(device)
            if isinstance(volume, Volume):
                counters = StatsSet(spec.name)
                server = VhostDataPlane(
                    volume,
                    spec.socket,
                    num_queues=spec.queues,
                    read_only=read_only,
                    serial=serial,
                    qos=qos,
                    stats=counters,
                    planes=None if self._per_export else self._planes,
                )
            else:
                server = VhostUserBlkServer(
                    device, spec.socket, num_queues=spec.queues, read_only=read_only, serial=serial
                )
            server.start()
        except OSError as e:
            device.close()
            raise Conflict(f"cannot listen on {spec.socket}: {e.strerror or e}") from e
        except BaseException:
            device.close()
            raise
        self._vhost[spec.name] = (server, device)
        if counters is not None:
            self._stats[spec.name] = (spec, counters)

    def _activate_scsi(
        self, spec: ExportSpec, open_volume: Callable[[], BlockDevice], serial: str
    ) -> None:
        from storvisor.engine.volume import Volume
        from storvisor.exports.lio import Fabric, Lio, ScsiExport

        if self._lio is None:
            self._lio = Lio()
        volume = open_volume() if spec.device is None else None
        counters: StatsSet | None = None
        plane: Callable[[str, int, str], TcmuDataPlane] | None = None
        inner, qos = _unthrottled(volume) if volume is not None else (None, None)
        if isinstance(inner, Volume) and self._planes is not None:
            from storvisor.exports.tcmu_plane import TcmuDataPlane

            served: Volume = inner
            stats = counters = StatsSet(spec.name)
            planes = None if self._per_export else self._planes

            def plane(dev_config: str, block_size: int, reset_path: str) -> TcmuDataPlane:
                return TcmuDataPlane(
                    served,
                    dev_config,
                    block_size=block_size,
                    serial=serial,
                    reset_path=reset_path,
                    qos=qos,
                    stats=stats,
                    planes=planes,
                )

        export = ScsiExport(
            self._lio,
            spec.name,
            Fabric.LOOPBACK if spec.kind is ExportKind.SCSI else Fabric.VHOST,
            volume=volume,
            host_device=spec.device,
            wwpn=spec.wwpn,
            lun=spec.lun,
            serial=serial,
            plane=plane,
        )
        try:
            export.start()
        except BaseException:
            if volume is not None:
                volume.close()
            raise
        self._scsi[spec.name] = (export, volume)
        if counters is not None:
            self._stats[spec.name] = (spec, counters)

    def scsi_lun(self, name: str) -> int | None:
        """The LUN number an active SCSI export got (None if it is not active)."""
        entry = self._scsi.get(name)
        found = entry[0].found if entry is not None else None
        return found.lun if found is not None else None

    def is_active(self, name: str) -> bool:
        return name in self._nbd_names or name in self._vhost or name in self._scsi

    def deactivate(self, name: str, *, forget: bool = False) -> None:
        """Stop serving ``name`` (no-op if it is not active) and close what it held. The
        LIO objects of a SCSI export stay unless ``forget``."""
        scsi = self._scsi.pop(name, None)
        if scsi is not None:
            export, volume = scsi
            try:
                if forget:
                    export.remove()
                else:
                    export.stop()
            finally:
                if volume is not None:
                    volume.close()
        if name in self._nbd_names:
            self._nbd_names.discard(name)
            self._nbd.remove_export(name)
            if self._planes is not None:
                self._planes.remove_export(name)
        self._stats.pop(name, None)  # its blocks are retired as their connections end
        entry = self._vhost.pop(name, None)
        if entry is not None:
            server, device = entry
            try:
                server.close()
            finally:
                device.close()

    def io_stats(self) -> list[tuple[ExportSpec, StatsSet]]:
        """The request counters of every active export that keeps them (NBD exports, and
        vhost-user-blk exports and TCMU backstores served by data-plane processes)."""
        return list(self._stats.values())

    def restarts(self) -> list[tuple[str, str, int]]:
        """``(kind, export, count)``: data-plane processes started again after one ended,
        for the NBD workers (export ``""``) and each vhost-user-blk export and TCMU backstore
        they serve."""
        from storvisor.exports.slots import PlacedExport

        found = [(ExportKind.NBD.value, "", self._planes.restarts if self._planes else 0)]
        for name, (server, _) in sorted(self._vhost.items()):
            if isinstance(server, PlacedExport):
                found.append((ExportKind.VHOST_USER_BLK.value, name, max(server.starts - 1, 0)))
        for name, (export, _) in sorted(self._scsi.items()):
            if isinstance(export.handler, PlacedExport):
                kind = ExportKind.SCSI if export.is_loopback else ExportKind.VHOST_SCSI
                found.append((kind.value, name, max(export.handler.starts - 1, 0)))
        return found

    def notify_resized(self, names: list[str]) -> None:
        """Tell the front-ends of these vhost-user exports that the disk size changed."""
        for name in names:
            entry = self._vhost.get(name)
            if entry is not None:
                entry[0].notify_config_change()
            scsi = self._scsi.get(name)
            if scsi is not None:
                scsi[0].notify_resized()

    def close(self) -> None:
        """Stop every export and the NBD listeners; remove the NBD socket file."""
        for name in [*self._vhost, *self._scsi]:
            try:
                self.deactivate(name)
            except Exception:
                log.exception("closing export %s failed", name)
        self._nbd_names.clear()
        self._nbd.close()
        if self._planes is not None:
            self._planes.close()
        with contextlib.suppress(FileNotFoundError):
            self.nbd_socket.unlink()


def _unthrottled(device: BlockDevice) -> tuple[BlockDevice, QosBlock | None]:
    """The device a ``ThrottledDevice`` wraps and its QoS block, which data planes are
    handed apart; any other device as it is, with no block."""
    if isinstance(device, ThrottledDevice):
        return device.inner, device.qos
    return device, None


def forget_lio_objects(spec: ExportSpec) -> None:
    """Delete the LIO objects of a SCSI export that no daemon serves (no-op if there are
    none). Raises ``LioUnavailable`` when LIO cannot be changed by this process."""
    from storvisor.exports.lio import Lio, backstore_name

    lio = Lio(load_modules=False)
    name = backstore_name(spec.name)
    if lio.has_backstore(name):
        lio.require()
        lio.remove(name)


def without(specs: list[ExportSpec], name: str) -> list[ExportSpec]:
    """``specs`` minus the one called ``name``; ``NotFound`` if there is none."""
    rest = [s for s in specs if s.name != name]
    if len(rest) == len(specs):
        raise NotFound(f"no export named {name!r}")
    return rest
