"""libvirt domain XML for storvisor volumes attached as SCSI devices.

Two forms, both built from a volume's SCSI export (the caller passes its device path or WWPN):

* ``lun``: ``<disk type='block' device='lun'>`` on the host block device of the volume's local
  SCSI LUN, addressed to a virtio-scsi controller, so the guest sends SCSI commands through
  (``sg_inq``, persistent reservations, SAN-aware software).
* ``vhost``: ``<hostdev mode='subsystem' type='scsi_host' model='virtio'>`` with ``<source
  protocol='vhost' wwpn=...>``: the kernel's vhost-scsi target serves every LUN of the WWPN.

Theory of operation
-------------------
``DomainDevices.parse`` reads a domain's XML (what ``virsh dumpxml`` prints, or a hand-written
definition) and records what placing a LUN depends on:

* the SCSI controllers by index, with their model. A controller without ``index`` gets the
  lowest index unused by the controllers before it, as libvirt's parser gives it. A controller
  an address names but the domain lacks is one libvirt adds itself, of the default model (not
  virtio-scsi), so its index is taken too.
* the drive addresses in use (controller, bus, target, unit) of disks and SCSI hostdevs. A disk
  on the scsi bus without ``<address>`` gets the one libvirt derives from its target name on
  define (``sdX`` number *n*: controller n // 7, unit n % 7); an unaddressed SCSI hostdev the
  first free unit of the lowest controller, as libvirt assigns it.
* the target names in use, and the per-device boot orders and ``<os><boot dev=...>``.

``plan_lun`` then picks the lowest-index virtio-scsi controller with a free unit (units 0-6 on
bus 0, target 0: libvirt's own mapping for QEMU, so a disk added later without an address never
collides), or, when the domain has no virtio-scsi controller or every one is full, a new
``<controller type='scsi' model='virtio-scsi'>`` at the lowest free index (a default lsilogic
controller is never used: it cannot pass a LUN through). The target name is the first ``sdX``
no disk uses.

With ``boot``, the new LUN disk gets ``<boot order='1'/>`` (libvirt refuses a boot order
on a vhost-scsi hostdev). libvirt refuses two devices with the
same order and per-device orders beside ``<os><boot dev=.../>``, so the plan also lists the
changes the domain needs: the devices whose orders 1, 2, ... form a run from 1 each move one
down (their elements with the new order, to apply with ``virsh update-device --config``), and
the ``<os><boot>`` elements are to be removed. ``apply`` makes those changes to a domain's XML.

Errors: malformed or non-domain XML, bad numbers in it, a bad device path or WWPN are
``InvalidArgument`` with one line naming the problem.
"""

from __future__ import annotations

import copy
import enum
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from storvisor.errors import InvalidArgument
from storvisor.integrations.libvirt.vhostuser import to_text

VIRTIO_SCSI = "virtio-scsi"
UNITS_PER_CONTROLLER = 7
"""Units 0-6 on bus 0, target 0: libvirt's default drive mapping for QEMU (a narrow bus)."""

VHOST_BOOT_REFUSED = (
    "libvirt cannot boot from a vhost-scsi hostdev: boot from the volume's LUN (--scsi lun)"
)

_WWPN = re.compile(r"naa\.[0-9a-fA-F]{16}")
_DECIMAL = re.compile(r"[0-9]{1,9}")
_SD_NAME = re.compile(r"sd([a-z]{1,4})")


class ScsiMode(enum.StrEnum):
    """How a volume's SCSI export reaches a guest."""

    LUN = "lun"  # <disk device='lun'> on the local SCSI LUN's block device
    VHOST = "vhost"  # <hostdev type='scsi_host'> on the vhost-scsi target


@dataclass(frozen=True, slots=True, order=True)
class DriveAddress:
    """A ``<address type='drive'>``: a unit on a bus and target of a SCSI controller."""

    controller: int
    bus: int = 0
    target: int = 0
    unit: int = 0

    def element(self) -> ET.Element:
        return ET.Element(
            "address",
            type="drive",
            controller=str(self.controller),
            bus=str(self.bus),
            target=str(self.target),
            unit=str(self.unit),
        )


@dataclass(frozen=True, slots=True)
class BootEntry:
    """A device of the domain with a per-device boot order: its position among the children
    of ``<devices>``, its order, a one-line description for the operator, and a copy of its
    element."""

    position: int
    order: int
    description: str
    element: ET.Element


@dataclass(frozen=True, slots=True)
class DomainDevices:
    """What placing a SCSI device in a domain depends on (see the module docstring).

    ``controllers`` maps each SCSI controller index to its model (``None``: libvirt's
    default); ``used`` holds the drive addresses taken; ``sources`` maps the device of each
    block disk on the scsi bus to its address; ``target_devs`` holds every disk target name;
    ``boot`` the per-device boot orders; ``os_boot`` the ``dev`` of each ``<os><boot>``.
    """

    controllers: Mapping[int, str | None] = field(default_factory=dict)
    used: frozenset[DriveAddress] = frozenset()
    sources: Mapping[str, DriveAddress] = field(default_factory=dict)
    target_devs: frozenset[str] = frozenset()
    boot: tuple[BootEntry, ...] = ()
    os_boot: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str, source: str = "domain XML") -> DomainDevices:
        """Read a domain definition. ``InvalidArgument`` (naming ``source``) for text that is
        not XML, a root other than ``<domain>``, or an index, address or boot order that is
        not a non-negative integer."""
        return _parse(_domain_root(text, source), source)

    def virtio_controllers(self) -> list[int]:
        return sorted(i for i, model in self.controllers.items() if model == VIRTIO_SCSI)

    def free_unit(self, controller: int) -> int | None:
        """The lowest free unit (bus 0, target 0) of ``controller``, or ``None`` when full."""
        for unit in range(UNITS_PER_CONTROLLER):
            if DriveAddress(controller, 0, 0, unit) not in self.used:
                return unit
        return None

    def free_controller_index(self) -> int:
        """The lowest SCSI controller index neither declared nor named by an address."""
        taken = set(self.controllers) | {a.controller for a in self.used}
        return next(i for i in range(len(taken) + 1) if i not in taken)

    def free_target_dev(self) -> str:
        """The first ``sdX`` name no disk of the domain uses."""
        taken = {_sd_index(dev) for dev in self.target_devs} - {None}
        return _sd_name(next(i for i in range(len(taken) + 1) if i not in taken))


@dataclass(frozen=True, slots=True)
class BootChange:
    """A device of the domain that must move down the boot order: ``element`` is its new
    form (to apply with ``virsh update-device DOMAIN FILE --config``; XML comments cannot
    hold that option's dashes, so the printed text says "persistent config")."""

    position: int
    old_order: int
    new_order: int
    description: str
    element: ET.Element


@dataclass(frozen=True, slots=True)
class ScsiAttachment:
    """What to add to a domain for one volume, and what to change in it.

    ``devices`` go into ``<devices>`` in this order (a new controller before its disk);
    ``address`` and ``target_dev`` are the LUN disk's (``None`` for a vhost hostdev);
    ``boot_changes`` and ``remove_os_boot`` are the changes ``boot`` needs.
    """

    devices: tuple[ET.Element, ...]
    address: DriveAddress | None = None
    target_dev: str | None = None
    new_controller: int | None = None
    boot_changes: tuple[BootChange, ...] = ()
    remove_os_boot: tuple[str, ...] = ()


# -- elements ----------------------------------------------------------------------------------


def controller_element(index: int, queues: int | None = None) -> ET.Element:
    """``<controller type='scsi' index=N model='virtio-scsi'>`` (with ``<driver queues>``)."""
    element = ET.Element("controller", type="scsi", index=str(index), model=VIRTIO_SCSI)
    if queues is not None:
        if not 1 <= queues <= 1024:
            raise InvalidArgument(f"queues must be between 1 and 1024: {queues}")
        ET.SubElement(element, "driver", queues=str(queues))
    return element


def lun_disk_element(
    device_path: str, address: DriveAddress, target_dev: str, *, boot_order: int | None = None
) -> ET.Element:
    """``<disk type='block' device='lun'>`` on ``device_path`` at ``address``.

    ``sgio='filtered'`` (libvirt no longer accepts ``unfiltered``), raw, no host cache; no
    ``<serial>``: the guest reads the LUN's own serial and identifiers through SCSI.
    ``InvalidArgument`` for a device path that is not an absolute path under /dev.
    """
    check_device_path(device_path)
    if _sd_index(target_dev) is None:
        raise InvalidArgument(f"target dev must look like sda, sdb, ...: {target_dev!r}")
    element = ET.Element("disk", type="block", device="lun", sgio="filtered", rawio="no")
    ET.SubElement(element, "driver", name="qemu", type="raw", cache="none")
    ET.SubElement(element, "source", dev=device_path)
    ET.SubElement(element, "target", dev=target_dev, bus="scsi")
    if boot_order is not None:
        ET.SubElement(element, "boot", order=str(boot_order))
    element.append(address.element())
    return element


def vhost_hostdev_element(wwpn: str) -> ET.Element:
    """``<hostdev mode='subsystem' type='scsi_host' model='virtio'>`` on the vhost-scsi target
    ``wwpn`` (``naa.`` and 16 hex digits). ``InvalidArgument`` for another WWPN form."""
    check_wwpn(wwpn)
    element = ET.Element("hostdev", mode="subsystem", type="scsi_host", model="virtio")
    ET.SubElement(element, "source", protocol="vhost", wwpn=wwpn)
    return element


def check_device_path(path: str) -> str:
    if not path.startswith("/dev/") or "\0" in path or "/../" in path or path.endswith("/"):
        raise InvalidArgument(f"the LUN's device must be a path under /dev: {path!r}")
    return path


def check_wwpn(wwpn: str) -> str:
    if not _WWPN.fullmatch(wwpn):
        raise InvalidArgument(f"a vhost-scsi WWPN is naa. and 16 hex digits: {wwpn!r}")
    return wwpn


def export_target(mode: ScsiMode, uris: Sequence[str]) -> str | None:
    """What a SCSI export's ``uris`` give the XML: for ``lun`` its stable
    ``/dev/disk/by-id/`` path (else its first ``/dev/`` path), for ``vhost`` its WWPN. ``None``
    when the export lists neither."""
    if mode is ScsiMode.LUN:
        paths = [u for u in uris if u.startswith("/dev/")]
        by_id = [p for p in paths if p.startswith("/dev/disk/by-id/")]
        candidates = by_id or paths
        return candidates[0] if candidates else None
    for uri in uris:
        match = _WWPN.search(uri)
        if match is not None:
            return match.group(0)
    return None


# -- planning ----------------------------------------------------------------------------------


def plan_lun(
    device_path: str,
    domain: DomainDevices | None = None,
    *,
    boot: bool = False,
    queues: int | None = None,
) -> ScsiAttachment:
    """The LUN disk for ``device_path`` placed in ``domain`` (an empty domain when ``None``),
    preceded by a new virtio-scsi controller when the domain has none with a free unit.
    ``queues`` sets a new controller's queue count. See the module docstring for the rules.
    """
    domain = domain or DomainDevices()
    for index in domain.virtio_controllers():
        unit = domain.free_unit(index)
        if unit is not None:
            address, new_controller = DriveAddress(index, 0, 0, unit), None
            break
    else:
        new_controller = domain.free_controller_index()
        address = DriveAddress(new_controller)
    target_dev = domain.free_target_dev()
    changes, os_boot = _boot_changes(domain) if boot else ((), ())
    disk = lun_disk_element(device_path, address, target_dev, boot_order=1 if boot else None)
    if new_controller is None:
        devices: tuple[ET.Element, ...] = (disk,)
    else:
        devices = (controller_element(new_controller, queues), disk)
    return ScsiAttachment(devices, address, target_dev, new_controller, changes, os_boot)


def plan_vhost(
    wwpn: str, domain: DomainDevices | None = None, *, boot: bool = False
) -> ScsiAttachment:
    """The vhost-scsi hostdev for ``wwpn`` (libvirt gives it a PCI slot of its own).

    ``boot`` is ``InvalidArgument``: libvirt's QEMU driver refuses a boot order on it
    ("booting from assigned devices is not supported by vhost SCSI devices")."""
    if boot:
        raise InvalidArgument(VHOST_BOOT_REFUSED)
    return ScsiAttachment((vhost_hostdev_element(wwpn),))


def plan(
    mode: ScsiMode,
    target: str,
    domain_text: str | None = None,
    *,
    boot: bool = False,
    source: str = "domain XML",
) -> ScsiAttachment:
    """``plan_lun`` (``target`` is the device path) or ``plan_vhost`` (``target`` is the
    WWPN) for the domain in ``domain_text`` (none: an empty domain)."""
    domain = DomainDevices.parse(domain_text, source) if domain_text is not None else None
    if mode is ScsiMode.LUN:
        return plan_lun(target, domain, boot=boot)
    return plan_vhost(target, domain, boot=boot)


def _boot_changes(domain: DomainDevices) -> tuple[tuple[BootChange, ...], tuple[str, ...]]:
    """Order 1 for the new device: the run of orders 1, 2, ... moves one down."""
    by_order = {entry.order: entry for entry in domain.boot}
    changes = []
    order = 1
    while order in by_order:
        entry = by_order[order]
        element = copy.deepcopy(entry.element)
        boot_element = element.find("boot")
        assert boot_element is not None  # the entry came from this <boot order>
        boot_element.set("order", str(order + 1))
        changes.append(BootChange(entry.position, order, order + 1, entry.description, element))
        order += 1
    return tuple(changes), domain.os_boot


# -- output ------------------------------------------------------------------------------------


def attachment_text(attachment: ScsiAttachment, what: str) -> str:
    """The attachment as text: a comment saying where it goes, the elements, then the changes
    the domain needs (as comments and the changed devices), each element on its own lines."""
    lines = [
        f"<!-- storvisor: {_comment(what)}: add to the domain's <devices>, in this order "
        "(virsh attach-device takes one element per file) -->"
    ]
    lines += [_text(e) for e in attachment.devices]
    if attachment.boot_changes:
        lines.append(
            "<!-- storvisor: boot order 1 is the new device's; change these devices of the "
            "domain (virsh update-device DOMAIN FILE, to its persistent config): -->"
        )
        for change in attachment.boot_changes:
            lines.append(
                f"<!-- {_comment(change.description)}: boot order "
                f"{change.old_order} -> {change.new_order} -->"
            )
            lines.append(_text(change.element))
    for dev in attachment.remove_os_boot:
        lines.append(
            f"<!-- storvisor: remove <boot dev='{_comment(dev)}'/> from the domain's <os>: "
            "libvirt refuses it beside per-device boot orders -->"
        )
    return "\n".join(lines) + "\n"


def apply(domain_text: str, attachment: ScsiAttachment, source: str = "domain XML") -> str:
    """``domain_text`` with the attachment's devices added and its changes made (the boot
    orders moved, ``<os><boot>`` removed). The attachment must come from ``plan`` on the same
    text. ``InvalidArgument`` for text ``parse`` refuses."""
    root = _domain_root(domain_text, source)
    devices = root.find("devices")
    if devices is None:
        devices = ET.SubElement(root, "devices")
    children = list(devices)
    for change in attachment.boot_changes:
        boot_element = children[change.position].find("boot")
        if boot_element is None or boot_element.get("order") != str(change.old_order):
            raise InvalidArgument(f"{source} is not the domain this attachment was planned for")
        boot_element.set("order", str(change.new_order))
    os_element = root.find("os")
    if attachment.remove_os_boot and os_element is not None:
        for boot_element in os_element.findall("boot"):
            os_element.remove(boot_element)
    for element in attachment.devices:
        devices.append(copy.deepcopy(element))
    for element in root.iter():  # re-indented by to_text
        element.tail = None
        if element.text is not None and not element.text.strip():
            element.text = None
    return to_text(root) + "\n"


def _text(element: ET.Element) -> str:
    element = copy.deepcopy(element)
    element.tail = None
    return to_text(element)


def _comment(text: str) -> str:
    return text.replace("--", "- -")


# -- parsing -----------------------------------------------------------------------------------


def _domain_root(text: str, source: str) -> ET.Element:
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        raise InvalidArgument(f"{source}: document type declarations are not accepted")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise InvalidArgument(f"{source} is not well-formed XML: {e}") from None
    if root.tag != "domain":
        raise InvalidArgument(f"{source}: the root element is <{root.tag}>, not <domain>")
    return root


def _number(element: ET.Element, attribute: str, source: str, default: int | None = 0) -> int:
    text = element.get(attribute)
    if text is None:
        if default is None:
            raise InvalidArgument(f"{source}: <{element.tag}> has no {attribute}")
        return default
    if not _DECIMAL.fullmatch(text):
        raise InvalidArgument(
            f"{source}: <{element.tag}> {attribute}={text!r} is not a non-negative integer"
        )
    return int(text)


def _parse(root: ET.Element, source: str) -> DomainDevices:
    devices = root.find("devices")
    children = list(devices) if devices is not None else []

    controllers: dict[int, str | None] = {}
    for element in children:
        if element.tag != "controller" or element.get("type") != "scsi":
            continue
        if element.get("index") is None:
            index = next(i for i in range(len(controllers) + 1) if i not in controllers)
        else:
            index = _number(element, "index", source)
        if index in controllers:
            raise InvalidArgument(f"{source}: two SCSI controllers have index {index}")
        controllers[index] = element.get("model")

    used: set[DriveAddress] = set()
    sources: dict[str, DriveAddress] = {}
    target_devs: set[str] = set()
    unaddressed_hostdevs = 0
    for element in children:
        address = element.find("address")
        drive = address is not None and address.get("type") == "drive"
        if element.tag == "disk":
            target = element.find("target")
            dev = target.get("dev") if target is not None else None
            if dev:
                if dev in target_devs:
                    raise InvalidArgument(f"{source}: two disks have target dev {dev}")
                target_devs.add(dev)
            if target is None or target.get("bus") != "scsi":
                continue
            if drive:
                assert address is not None
                where = _drive_address(address, source)
            elif dev and (number := _sd_index(dev)) is not None:
                controller, unit = divmod(number, UNITS_PER_CONTROLLER)
                where = DriveAddress(controller, 0, 0, unit)
            else:
                continue
            used.add(where)
            disk_source = element.find("source")
            if element.get("type") == "block" and disk_source is not None:
                sources[disk_source.get("dev", "")] = where
        elif element.tag == "hostdev" and element.get("type") == "scsi":
            if drive:
                assert address is not None
                used.add(_drive_address(address, source))
            else:
                unaddressed_hostdevs += 1
    for _ in range(unaddressed_hostdevs):
        used.add(_first_free(used))

    boot: list[BootEntry] = []
    for position, element in enumerate(children):
        boot_element = element.find("boot")
        if boot_element is not None:
            order = _number(boot_element, "order", source, default=None)
            if order in {entry.order for entry in boot}:
                raise InvalidArgument(f"{source}: two devices have boot order {order}")
            description = _describe(element, position)
            boot.append(BootEntry(position, order, description, copy.deepcopy(element)))
    os_element = root.find("os")
    os_boot = tuple(
        b.get("dev", "") for b in (os_element.findall("boot") if os_element is not None else [])
    )
    return DomainDevices(
        controllers, frozenset(used), sources, frozenset(target_devs), tuple(boot), os_boot
    )


def _drive_address(address: ET.Element, source: str) -> DriveAddress:
    return DriveAddress(
        _number(address, "controller", source),
        _number(address, "bus", source),
        _number(address, "target", source),
        _number(address, "unit", source),
    )


def _first_free(used: set[DriveAddress]) -> DriveAddress:
    """Where libvirt puts an unaddressed SCSI hostdev: the first free unit of the lowest
    controller, counting from 0 whether or not the controller is declared yet."""
    controller = 0
    while True:
        for unit in range(UNITS_PER_CONTROLLER):
            address = DriveAddress(controller, 0, 0, unit)
            if address not in used:
                return address
        controller += 1


def _describe(element: ET.Element, position: int) -> str:
    """A device as an operator finds it in ``virsh dumpxml``."""
    target = element.find("target")
    if element.tag == "disk" and target is not None and target.get("dev"):
        return f"disk {target.get('dev')}"
    mac = element.find("mac")
    if element.tag == "interface" and mac is not None and mac.get("address"):
        return f"interface {mac.get('address')}"
    alias = element.find("alias")
    if alias is not None and alias.get("name"):
        return f"{element.tag} {alias.get('name')}"
    source = element.find("source")
    if source is not None and source.get("wwpn"):
        return f"{element.tag} {source.get('wwpn')}"
    return f"{element.tag} (device {position + 1} of <devices>)"


def _sd_index(dev: str) -> int | None:
    """libvirt's index of a disk name (``sda`` 0, ``sdz`` 25, ``sdaa`` 26), else ``None``."""
    match = _SD_NAME.fullmatch(dev)
    if match is None:
        return None
    index = -1
    for letter in match.group(1):
        index = (index + 1) * 26 + ord(letter) - ord("a")
    return index


def _sd_name(index: int) -> str:
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("a") + rest) + letters
    return "sd" + letters
