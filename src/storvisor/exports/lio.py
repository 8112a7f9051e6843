"""The LIO control plane: storvisor's backstores, tcm_loop LUNs and vhost-scsi targets.

Theory of operation
-------------------
LIO (the kernel's SCSI target) is configured through configfs, here with rtslib-fb (the
``lio`` extra). An export of storvisor's is one *backstore* plus one *LUN* on a fabric:

- a ``user`` backstore (``target_core_user``, TCMU) for a storvisor volume, whose commands a
  ``storvisor.exports.tcmu.TcmuHandler`` serves, with ``dev_config`` = ``storvisor/<export>``
  and ``nl_reply_supported=-1`` in ``control`` (no netlink reply is awaited, so storvisor
  coexists with tcmu-runner), or a ``block`` backstore (iblock) over an existing host block
  device;
- a LUN on a ``loopback`` target (tcm_loop: the host's SCSI layer scans it and a ``/dev/sdX``
  appears) or on a ``vhost`` target (a WWPN QEMU's vhost-scsi attaches to; several LUNs may
  share one target).

Every backstore storvisor creates is named ``storvisor-...`` (``backstore_name``); ``luns``
lists only those, and ``remove`` deletes only those and the targets they leave empty, so LIO
objects of other tools are never touched. A TCMU backstore must be served before its LUN is
created: creating a LUN makes the kernel scan it synchronously (INQUIRY, READ CAPACITY...),
so the caller creates the backstore, starts its handler, then ``attach``es it.

The objects outlive the daemon: ``ensure_*`` and ``attach`` find what a previous run created
and reuse it (a ``/dev/sdX`` with I/O in flight survives a daemon restart, its ring waiting
for the new handler), and ``remove`` is what deletes them.

Errors: ``LioUnavailable`` (a ``LocalFailure``) names what the kernel or the process lacks
(not root, no configfs, a missing module), before anything is created; ``Conflict`` for a
LUN number or WWPN in use or a device held by someone else; ``InvalidArgument`` for a
malformed WWPN or name. A failed ``create``/``attach`` leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import glob
import hashlib
import logging
import os
import re
import stat
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from storvisor.engine.device import BlockDevice
from storvisor.errors import Conflict, InvalidArgument, LocalFailure, NotFound

if TYPE_CHECKING:
    from storvisor.exports.tcmu import TcmuHandler


class TcmuServer(Protocol):
    """What serves a TCMU backstore: a ``TcmuHandler``, or a ``TcmuDataPlane`` that runs one
    in a data-plane process."""

    def start(self) -> None: ...

    def close(self) -> None: ...

    def notify_resized(self) -> None: ...


log = logging.getLogger(__name__)

PREFIX = "storvisor-"
"""Every backstore storvisor creates has a name starting with this."""

TCMU_SUBTYPE = "storvisor"
"""The ``dev_config`` subtype of storvisor's TCMU backstores: ``storvisor/<export>``."""

_WWPN_RE = re.compile(r"^naa\.[125c-fC-F][0-9a-fA-F]{15}$")
_CONFIG_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@/+-]{0,127}$")


class LioUnavailable(LocalFailure):
    """The kernel or this process lacks what LIO needs (root, configfs, a module)."""


class Fabric(enum.StrEnum):
    LOOPBACK = "loopback"  # tcm_loop: a local /dev/sdX
    VHOST = "vhost"  # vhost-scsi: a WWPN for QEMU


_FABRIC_MODULES = {Fabric.LOOPBACK: "tcm_loop", Fabric.VHOST: "vhost_scsi"}
_PLUGIN_MODULES = {"user": "target_core_user", "block": "target_core_iblock"}


@dataclass(frozen=True, slots=True)
class LioLun:
    """A storvisor backstore and the LUN it is exported as.

    ``device`` and ``by_id`` are set for a loopback LUN once the host's SCSI layer made its
    disk: ``/dev/sdX`` and ``/dev/disk/by-id/wwn-0x...`` (the link udev makes from the
    disk's NAA identifier; computed from sysfs when udev does not run, so it may not exist).
    """

    backstore: str
    plugin: str  # "user" (TCMU) or "block" (iblock)
    fabric: Fabric
    wwpn: str
    lun: int
    device: str | None = None
    by_id: str | None = None


def backstore_name(export: str) -> str:
    """The backstore name of an export: ``storvisor-`` plus the export name with every
    character configfs or rtslib refuses replaced, plus a short hash when anything was
    replaced (so two exports never share a backstore)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "-", export)
    if safe != export:
        safe = f"{safe[:40]}-{hashlib.sha256(export.encode()).hexdigest()[:8]}"
    return PREFIX + safe


def tcmu_dev_config(export: str) -> str:
    """``storvisor/<export>``: how the TCMU handler finds the export's uio device.
    ``InvalidArgument`` for a name the kernel's ``dev_config`` cannot hold (a ``:``)."""
    if not _CONFIG_NAME_RE.match(export):
        raise InvalidArgument(
            f"export name {export!r} cannot name a TCMU backstore: use letters, digits "
            "and . _ @ / + - (no ':')"
        )
    return f"{TCMU_SUBTYPE}/{export}"


def check_wwpn(wwpn: str) -> str:
    """Return ``wwpn`` if it is a vhost-scsi WWPN (``naa.`` and 16 hex digits whose first is
    1, 2, 5 or C-F), else raise ``InvalidArgument``."""
    if not _WWPN_RE.match(wwpn):
        raise InvalidArgument(
            f"invalid WWPN {wwpn!r}: expected naa. and 16 hex digits, e.g. naa.5001405123456789"
        )
    return wwpn


def generate_wwpn() -> str:
    """A new WWPN in LIO's own form: ``naa.5001405`` and 9 random hex digits."""
    return "naa.5001405" + os.urandom(5).hex()[:9]


def unit_serial(seed: str) -> str:
    """A stable T10 unit serial (UUID form, as LIO writes it) derived from ``seed``."""
    h = hashlib.sha256(seed.encode()).hexdigest()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


class Lio:
    """storvisor's objects in LIO (see the module docstring).

    ``configfs`` is where configfs is (or gets) mounted, ``sysfs`` and ``dev`` where the
    disks of loopback LUNs are looked for; ``load_modules`` lets a missing module be loaded
    with ``modprobe``. Not thread-safe: the caller serialises calls.
    """

    def __init__(
        self,
        *,
        configfs: str = "/sys/kernel/config",
        sysfs: str = "/sys",
        dev: str = "/dev",
        load_modules: bool = True,
        disk_timeout: float = 30.0,
    ) -> None:
        self.configfs = configfs
        self.sysfs = sysfs
        self.dev = dev
        self.load_modules = load_modules
        self.disk_timeout = disk_timeout

    # -- prerequisites --------------------------------------------------------------------

    def require(self, modules: Iterable[str] = ()) -> None:
        """Check (and where it can, provide) what LIO needs: root, configfs mounted, the
        target core and ``modules`` loaded, ``/etc/target``. Raises ``LioUnavailable``
        naming the first thing missing; creates nothing in LIO."""
        if os.geteuid() != 0:
            raise LioUnavailable("LIO needs root: configfs is writable by root only")
        self._load("configfs")
        if not os.path.ismount(self.configfs) and self.configfs == "/sys/kernel/config":
            subprocess.run(
                ["mount", "-t", "configfs", "configfs", self.configfs],
                capture_output=True,
                check=False,
            )
        if not os.path.isdir(self.configfs) or not _is_configfs(self.configfs):
            raise LioUnavailable(f"configfs is not mounted at {self.configfs}")
        self._load("target_core_mod")
        if not os.path.isdir(os.path.join(self.configfs, "target", "core")):
            raise LioUnavailable(
                f"kernel module target_core_mod is missing ({self.configfs}/target/core absent)"
            )
        for module in modules:
            self._load(module)
            if not os.path.isdir(os.path.join(self.sysfs, "module", module)):
                raise LioUnavailable(f"kernel module {module} is missing")
        # LIO writes SCSI-3 persistent reservation (and ALUA) state under its dbroot, and
        # fails PERSISTENT RESERVE OUT with NOT READY when that directory is missing.
        roots = {"/etc/target"}
        dbroot = os.path.join(self.configfs, "target", "dbroot")
        with contextlib.suppress(OSError), open(dbroot) as f:
            roots.add(f.read().strip() or "/etc/target")
        for root in roots:
            for sub in ("pr", "alua"):
                os.makedirs(os.path.join(root, sub), exist_ok=True)

    def _load(self, module: str) -> None:
        if os.path.isdir(os.path.join(self.sysfs, "module", module)) or not self.load_modules:
            return
        try:
            subprocess.run(["modprobe", "-q", module], capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            log.debug("modprobe %s: %s", module, e)

    # -- backstores -----------------------------------------------------------------------

    def ensure_user_backstore(
        self,
        name: str,
        dev_config: str,
        size: int,
        *,
        block_size: int = 512,
        wwn: str | None = None,
        max_data_area_mb: int = 32,
    ) -> None:
        """Create the TCMU backstore ``name`` (``dev_config``, ``size`` bytes), or keep it if
        it exists with this ``dev_config`` (its ring may hold commands for the new handler).
        Raises ``LioUnavailable``, ``Conflict`` (the name is taken by another backstore)."""
        self.require(["target_core_user"])
        rts = _rtslib()
        existing = self._find_backstore(name)
        if existing is not None:
            if existing.plugin == "user" and existing.config == dev_config:
                try:  # extended while no daemon ran
                    self.resize_user_backstore(name, size)
                except (LocalFailure, NotFound, OSError) as e:
                    log.warning("LIO keeps the old size of %s: %s", name, e)
                return
            raise Conflict(f"LIO backstore {existing.plugin}/{name} exists with another config")
        control = f"hw_block_size={block_size},max_data_area_mb={max_data_area_mb},"
        control += "nl_reply_supported=-1"
        _fresh_index_cache()
        with _translated(f"cannot create TCMU backstore {name}"):
            rts.UserBackedStorageObject(
                name, config=dev_config, size=size, wwn=wwn, control=control
            )
        log.info("created TCMU backstore %s (%s, %d bytes)", name, dev_config, size)

    def ensure_block_backstore(self, name: str, device: str, *, wwn: str | None = None) -> None:
        """Create the iblock backstore ``name`` over the host block device ``device``, or
        keep it if it exists over that device. Raises ``LioUnavailable``, ``NotFound`` (no
        such block device), ``Conflict`` (the device is in use, or the name is taken)."""
        self.require(["target_core_iblock"])
        try:
            mode = os.stat(device).st_mode
        except OSError as e:
            raise NotFound(f"no block device {device}: {e.strerror}") from e
        if not stat.S_ISBLK(mode):
            raise InvalidArgument(f"{device} is not a block device")
        rts = _rtslib()
        existing = self._find_backstore(name)
        if existing is not None:
            if existing.plugin == "block" and os.path.realpath(existing.udev_path) == (
                os.path.realpath(device)
            ):
                return
            raise Conflict(f"LIO backstore {existing.plugin}/{name} exists with another device")
        _fresh_index_cache()
        with _translated(f"cannot create iblock backstore {name} on {device}"):
            rts.BlockStorageObject(name, dev=device, wwn=wwn)
        log.info("created iblock backstore %s on %s", name, device)

    def resize_user_backstore(self, name: str, size: int) -> None:
        """Set the ``dev_size`` of TCMU backstore ``name`` to ``size`` bytes (after an online
        extend). The kernel accepts the write on an enabled device only while a process
        listens to TCMU's netlink ``config`` group (``exports.tcmu_netlink``); the backstore
        waits for no reply (``nl_reply_supported=-1``).

        Raises ``NotFound`` (no such TCMU backstore, or target_core_user not loaded),
        ``LocalFailure`` (netlink or the kernel refused)."""
        from storvisor.exports.tcmu_netlink import config_listener

        path = self._user_attrib(name, "dev_size")
        with open(path) as f:
            if int(f.read().strip() or 0) == size:
                return
        with config_listener():
            try:
                with open(path, "w") as f:
                    f.write(str(size))
            except OSError as e:
                raise LocalFailure(f"cannot set the size of {name}: {e.strerror}") from e
        log.info("TCMU backstore %s is now %d bytes", name, size)

    def reset_ring(self, name: str, level: int = 1) -> None:
        """Reset the command ring of TCMU backstore ``name`` (``action/reset_ring``): the
        kernel answers every command in flight BUSY (``level`` 1; 2: CHECK CONDITION) and
        starts the ring again at 0. Its handler must run no request meanwhile
        (``TcmuHandler`` calls this itself, at the right moment, after the ring broke).
        Raises ``NotFound``, or ``OSError`` from configfs."""
        reset_ring_at(self.reset_ring_path(name), level)

    def reset_ring_path(self, name: str) -> str:
        """The configfs file that resets the ring of TCMU backstore ``name``. Raises
        ``NotFound``."""
        return self._user_attrib(name, "reset_ring", group="action")

    def _user_attrib(self, name: str, attrib: str, group: str = "attrib") -> str:
        pattern = os.path.join(
            self.configfs, "target", "core", "user_*", glob.escape(name), group, attrib
        )
        found = sorted(glob.glob(pattern))
        if not found:
            raise NotFound(f"no TCMU backstore {name}")
        return found[0]

    # -- LUNs -----------------------------------------------------------------------------

    def attach(
        self, name: str, fabric: Fabric, *, wwpn: str | None = None, lun: int | None = None
    ) -> LioLun:
        """Export backstore ``name`` as a LUN on ``fabric`` and return it, or return the LUN
        it already has there. Loopback: a target of its own, LUN 0, and this waits for the
        ``/dev/sdX``. Vhost: target ``wwpn`` (created if absent; generated when None), LUN
        ``lun`` (the lowest free one when None).

        Raises ``LioUnavailable``, ``NotFound`` (no such backstore), ``Conflict`` (the LUN
        number is taken), ``InvalidArgument`` (a malformed WWPN), ``LocalFailure`` (the
        loopback disk did not appear). On failure nothing this call created is left.
        """
        if wwpn is not None:
            check_wwpn(wwpn)
        if lun is not None and not 0 <= lun <= 16383:
            raise InvalidArgument(f"invalid LUN {lun}: expected 0 to 16383")
        self.require([_FABRIC_MODULES[fabric]])
        so = self._find_backstore(name)
        if so is None:
            raise NotFound(f"no LIO backstore {name}")
        for found in self._luns_of(so):
            if found.fabric is fabric:
                return self._with_disk(found) if fabric is Fabric.LOOPBACK else found
        rts = _rtslib()
        created_target = None
        with _translated(f"cannot export {name} over {fabric}"):
            module = rts.FabricModule(fabric.value)
            target = None
            if wwpn is not None:
                with contextlib.suppress(rts.RTSLibNotInCFSError):
                    target = rts.Target(module, wwpn, mode="lookup")
            if target is None:
                target = created_target = rts.Target(module, wwpn, mode="create")
            try:
                tpg = rts.TPG(target, 1, mode="any")
                if lun is not None and any(int(x.lun) == lun for x in tpg.luns):
                    raise Conflict(f"LUN {lun} of {target.wwn} is in use")
                made = rts.LUN(tpg, lun, so)
                result = LioLun(name, so.plugin, fabric, target.wwn, int(made.lun))
                if fabric is Fabric.LOOPBACK:
                    result = self._wait_for_disk(result)
            except BaseException:
                if created_target is not None:
                    with contextlib.suppress(Exception):
                        created_target.delete()
                else:
                    with contextlib.suppress(Exception):
                        for x in rts.TPG(target, 1).luns:
                            if x.storage_object.name == name:
                                x.delete()
                raise
        log.info("exported %s as %s LUN %d of %s", name, fabric, result.lun, result.wwpn)
        return result

    def rescan_disk(self, name: str) -> str | None:
        """Make the host's SCSI layer reread the loopback LUN of backstore ``name`` (as a
        udev rule does on CAPACITY DATA HAS CHANGED): sd reads the capacity again and
        ``/sys/block/sdX/size`` follows before this returns. Returns the disk's path, or None
        when the backstore has no loopback disk. ``LocalFailure`` when the rescan fails."""
        so = self._find_backstore(name)
        if so is None:
            return None
        for lun in self._luns_of(so):
            if lun.fabric is not Fabric.LOOPBACK:
                continue
            found = self._with_disk(lun)
            if found.device is None:
                return None
            address = self._scsi_address(lun)
            path = os.path.join(self.sysfs, "bus", "scsi", "devices", address, "rescan")
            try:
                with open(path, "w") as f:
                    f.write("1")
            except OSError as e:
                raise LocalFailure(f"cannot rescan {found.device}: {e.strerror}") from e
            return found.device
        return None

    def luns(self) -> list[LioLun]:
        """Every storvisor backstore's LUNs (a backstore without one is listed with an empty
        WWPN and LUN -1), sorted by backstore name. Empty when LIO is not loaded."""
        if not os.path.isdir(os.path.join(self.configfs, "target", "core")):
            return []
        found: list[LioLun] = []
        for so in self._backstores():
            luns = self._luns_of(so)
            if not luns:
                found.append(LioLun(so.name, so.plugin, Fabric.LOOPBACK, "", -1))
            for lun in luns:
                found.append(self._with_disk(lun) if lun.fabric is Fabric.LOOPBACK else lun)
        return sorted(found, key=lambda x: (x.backstore, x.fabric, x.wwpn, x.lun))

    def has_backstore(self, name: str) -> bool:
        """Whether backstore ``name`` exists (False when LIO is not loaded)."""
        if not os.path.isdir(os.path.join(self.configfs, "target", "core")):
            return False
        return self._find_backstore(name) is not None

    def detach(self, name: str) -> None:
        """Delete the LUNs of backstore ``name`` and the targets they leave empty (the
        backstore stays); a no-op if it does not exist."""
        if not name.startswith(PREFIX):
            raise InvalidArgument(f"{name} is not a storvisor backstore")
        if not os.path.isdir(os.path.join(self.configfs, "target", "core")):
            return
        so = self._find_backstore(name)
        if so is None:
            return
        with _translated(f"cannot remove the LUNs of {name}"):
            for lun in list(so.attached_luns):
                tpg = lun.parent_tpg
                target = tpg.parent_target
                lun.delete()
                if not any(True for _ in tpg.luns):
                    target.delete()

    def remove(self, name: str) -> None:
        """Delete backstore ``name`` with its LUNs and the targets they leave empty; a no-op
        if it does not exist. ``InvalidArgument`` for a name that is not storvisor's;
        ``Conflict`` when the kernel refuses (a vhost-scsi endpoint still in use)."""
        if not name.startswith(PREFIX):
            raise InvalidArgument(f"{name} is not a storvisor backstore")
        if not os.path.isdir(os.path.join(self.configfs, "target", "core")):
            return
        self.detach(name)
        so = self._find_backstore(name)
        if so is None:
            return
        with _translated(f"cannot remove LIO backstore {name}"):
            so.delete()
            _fresh_index_cache()
        log.info("removed LIO backstore %s", name)

    # -- helpers --------------------------------------------------------------------------

    def _backstores(self) -> list[Any]:
        rts = _rtslib()
        _fresh_index_cache()
        found = []
        for so in rts.RTSRoot().storage_objects:
            if so.name.startswith(PREFIX):
                found.append(so)
        return found

    def _find_backstore(self, name: str) -> Any:
        for so in self._backstores():
            if so.name == name:
                return so
        return None

    def _luns_of(self, so: Any) -> list[LioLun]:
        found = []
        for lun in so.attached_luns:
            target = lun.parent_tpg.parent_target
            try:
                fabric = Fabric(target.fabric_module.name)
            except ValueError:
                continue  # exported elsewhere by hand (iSCSI...): not ours to report
            found.append(LioLun(so.name, so.plugin, fabric, target.wwn, int(lun.lun)))
        return found

    def _scsi_address(self, lun: LioLun) -> str:
        path = os.path.join(self.configfs, "target", "loopback", lun.wwpn, "tpgt_1", "address")
        with open(path) as f:
            return f"{f.read().strip()}:{lun.lun}"  # H:C:T:L

    def _with_disk(self, lun: LioLun) -> LioLun:
        try:
            address = self._scsi_address(lun)
        except OSError:
            return lun
        blocks = glob.glob(
            os.path.join(self.sysfs, "bus", "scsi", "devices", address, "block", "*")
        )
        if not blocks:
            return lun
        disk = os.path.basename(blocks[0])
        return LioLun(
            lun.backstore,
            lun.plugin,
            lun.fabric,
            lun.wwpn,
            lun.lun,
            os.path.join(self.dev, disk),
            self._by_id(disk),
        )

    def _wait_for_disk(self, lun: LioLun) -> LioLun:
        deadline = time.monotonic() + self.disk_timeout
        while True:
            found = self._with_disk(lun)
            if found.device is not None and os.path.exists(found.device):
                return found
            if time.monotonic() > deadline:
                raise LocalFailure(
                    f"the SCSI disk of {lun.backstore} ({lun.wwpn}) did not appear within "
                    f"{self.disk_timeout:.0f} s"
                )
            time.sleep(0.05)

    def _by_id(self, disk: str) -> str | None:
        by_id = os.path.join(self.dev, "disk", "by-id")
        with contextlib.suppress(OSError):
            for link in sorted(os.listdir(by_id)):
                if (
                    link.startswith("wwn-")
                    and os.path.basename(os.path.realpath(os.path.join(by_id, link))) == disk
                ):
                    return os.path.join(by_id, link)
        try:
            with open(os.path.join(self.sysfs, "block", disk, "device", "wwid")) as f:
                wwid = f.read().strip()
        except OSError:
            return None
        kind, _, value = wwid.partition(".")
        if kind in ("naa", "eui") and value:
            return os.path.join(by_id, f"wwn-0x{value.lower()}")
        return None


class ScsiExport:
    """One export through LIO: a storvisor volume (``volume``: a TCMU backstore) or a host
    block device (``host_device``: iblock), as a LUN on ``fabric`` (see ``Lio.attach`` for
    ``wwpn`` and ``lun``).

    The backstore of a volume is served by a ``TcmuHandler`` in this process, or, given
    ``plane`` (which builds a ``TcmuDataPlane`` from the backstore's ``dev_config``, block
    size and ``action/reset_ring`` file), in a data-plane process.

    ``start`` creates (or, after a restart, finds) the backstore, starts the handler before
    the LUN exists, then creates the LUN; on failure it closes the handler and deletes what
    it created. ``stop`` closes the handler and leaves the LIO objects (a restarted daemon
    serves them again; commands wait in the ring meanwhile). ``remove`` deletes the LUN
    first, then closes the handler, then deletes the backstore. The volume is not closed.
    """

    def __init__(
        self,
        lio: Lio,
        export: str,
        fabric: Fabric,
        *,
        volume: BlockDevice | None = None,
        host_device: str | None = None,
        wwpn: str | None = None,
        lun: int | None = None,
        serial: str = "",
        plane: Callable[[str, int, str], TcmuServer] | None = None,
    ) -> None:
        if (volume is None) == (host_device is None):
            raise InvalidArgument("an SCSI export is of a volume or of a host block device")
        self.lio = lio
        self.export = export
        self.fabric = fabric
        self.volume = volume
        self.host_device = host_device
        self.wwpn = wwpn
        self.lun = lun
        self.serial = serial
        self.backstore = backstore_name(export)
        self.plane = plane
        self.handler: TcmuServer | None = None
        self.found: LioLun | None = None

    def start(self) -> LioLun:
        """Export it; returns its LUN. Raises what ``Lio`` raises, and ``LocalFailure`` or
        ``NotFound`` when the TCMU handler cannot serve the backstore."""
        existed = self.lio.has_backstore(self.backstore)
        wwn = unit_serial(self.serial or self.export)
        try:
            if self.host_device is not None:
                self.lio.ensure_block_backstore(self.backstore, self.host_device, wwn=wwn)
            else:
                assert self.volume is not None
                block_size = 4096 if self.volume.block_size >= 4096 else 512
                dev_config = tcmu_dev_config(self.export)
                self.lio.ensure_user_backstore(
                    self.backstore, dev_config, self.volume.size, block_size=block_size, wwn=wwn
                )
                backstore = self.backstore
                if self.plane is not None:
                    server = self.plane(dev_config, block_size, self.lio.reset_ring_path(backstore))
                    self.handler = server
                    server.start()
                else:
                    self.handler = _start_handler(
                        self.volume,
                        dev_config,
                        self.serial,
                        block_size,
                        lambda: self.lio.reset_ring(backstore),
                    )
            self.found = self.lio.attach(self.backstore, self.fabric, wwpn=self.wwpn, lun=self.lun)
        except BaseException:
            self.stop()
            if not existed:
                with contextlib.suppress(Exception):
                    self.lio.remove(self.backstore)
            raise
        return self.found

    @property
    def is_loopback(self) -> bool:
        """Whether the LUN is a local one (tcm_loop), not a vhost target's."""
        return self.fabric is Fabric.LOOPBACK

    def info(self) -> LioLun | None:
        """Its LUN as it is now (the loopback disk may have been renamed), or None."""
        for found in self.lio.luns():
            if found.backstore == self.backstore and found.fabric is self.fabric:
                return found
        return None

    def notify_resized(self) -> None:
        """Tell the LUN that the volume grew: the LUN raises the unit attention CAPACITY
        DATA HAS CHANGED at its next command, the backstore's ``dev_size`` in LIO follows,
        and the disk of a loopback LUN is rescanned, so that ``/sys/block/sdX/size`` shows
        the new size when this returns (what a udev rule would do; a vhost-scsi guest's own
        kernel sees the unit attention). The volume is extended either way: a failure past
        the unit attention is logged, not raised."""
        if self.handler is None or self.volume is None:
            return
        self.handler.notify_resized()
        try:
            self.lio.resize_user_backstore(self.backstore, self.volume.size)
        except (LocalFailure, NotFound, OSError) as e:
            log.warning("LIO keeps the old size of %s: %s", self.backstore, e)
        if self.fabric is Fabric.LOOPBACK:
            try:
                self.lio.rescan_disk(self.backstore)
            except (LocalFailure, OSError) as e:
                log.warning("the disk of %s was not rescanned: %s", self.backstore, e)

    def stop(self) -> None:
        """Stop serving; the LIO objects stay. Idempotent."""
        handler, self.handler = self.handler, None
        if handler is not None:
            handler.close()

    def remove(self) -> None:
        """Delete the LUN, stop serving, delete the backstore."""
        try:
            self.lio.detach(self.backstore)
        finally:
            self.stop()
        self.lio.remove(self.backstore)


def _start_handler(
    volume: BlockDevice,
    dev_config: str,
    serial: str,
    block_size: int,
    reset_ring: Callable[[], None],
) -> TcmuHandler:
    """A started TCMU handler serving ``volume`` on the backstore ``dev_config``, with the
    identity (unit serial, NAA designator) derived from the volume's stable ``serial``; it
    resets a broken ring with ``reset_ring``."""
    from storvisor.exports.tcmu import TcmuHandler, lun_identity

    identity = lun_identity(serial, dev_config)
    handler = TcmuHandler(
        volume, dev_config, identity=identity, block_size=block_size, reset_ring=reset_ring
    )
    handler.start()
    return handler


def reset_ring_at(path: str, level: int = 1) -> None:
    """Reset a TCMU backstore's command ring through its configfs file ``path``
    (``Lio.reset_ring_path``): the kernel answers every command in flight BUSY (``level`` 1;
    2: CHECK CONDITION) and starts the ring again at 0. Raises ``OSError``."""
    with open(path, "w") as f:
        f.write(str(level))
    log.warning("reset the TCMU ring through %s", path)


def _is_configfs(path: str) -> bool:
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 2 and fields[1] == path and fields[2] == "configfs":
                    return True
    except OSError:
        pass
    return False


def _rtslib() -> Any:
    try:
        import rtslib_fb
    except ImportError as e:
        raise LioUnavailable(
            f"rtslib-fb is not installed (pip install 'storvisor[lio]'): {e}"
        ) from e
    return rtslib_fb


def _fresh_index_cache() -> None:
    """Forget rtslib's cache of backstore indexes: another process (targetcli, a previous
    daemon) may have created or deleted backstores since it was filled."""
    import rtslib_fb.tcm

    rtslib_fb.tcm.bs_cache.clear()


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    """Turn rtslib's and the kernel's errors into storvisor's."""
    rts = _rtslib()
    try:
        yield
    except rts.RTSLibError as e:
        text = str(e)
        if "exists" in text or "in use" in text or "busy" in text.lower():
            raise Conflict(f"{what}: {text}") from e
        raise LocalFailure(f"{what}: {text}") from e
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise Conflict(f"{what}: {e.strerror}") from e
        raise LocalFailure(f"{what}: {e.strerror or e}") from e
