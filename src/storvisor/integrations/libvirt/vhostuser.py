"""libvirt domain XML for storvisor volumes attached as vhost-user-blk disks.

A vhost-user disk is ``<disk type='vhostuser' device='disk'>``: QEMU connects (always as the
client) to the Unix socket storvisor's export listens on, and with ``<reconnect>`` it
reconnects after the back-end restarts. The guest's RAM must be shareable with that back-end
process, which is what ``<memoryBacking>`` with a memfd source and shared access provides.

What libvirt (9.x) accepts here, and therefore what this module emits:

* ``<source type='unix' path=...>`` with no ``mode`` attribute: the schema has none for
  vhostuser disks, libvirt is always the client.
* ``<driver name='qemu' type='raw' queues='N'/>``; ``cache``, ``io``, ``discard``,
  ``<iotune>`` and friends are refused for vhostuser disks (QoS is enforced by storvisor).
* No ``<serial>`` and no ``<readonly/>``: libvirt rejects both on vhostuser disks ("serial is
  not supported with vhostuser disk"). The guest gets both from the back-end instead: the serial
  through vhost-user-blk's GET_ID and read-only through VIRTIO_BLK_F_RO, so they are properties
  of the export. They are recorded in an XML comment inside the ``<disk>`` for the operator.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass

from storvisor.errors import InvalidArgument

_TARGET_DEV = re.compile(r"vd[a-z]{1,3}")
_DOMAIN_NAME = re.compile(r"[^/\s][^/]*")


@dataclass(frozen=True, slots=True)
class VhostUserDisk:
    """A storvisor vhost-user-blk export as a guest disk.

    ``socket_path`` is the export's Unix socket (absolute), ``target_dev`` the guest device name
    (``vda``, ``vdb``, ...), ``queues`` the number of virtqueues QEMU asks for (at most what
    the export offers), ``reconnect_timeout`` the seconds between QEMU's reconnect attempts.
    ``serial`` and ``read_only`` describe the export (see the module docstring).

    Raises ``InvalidArgument`` when a field is out of range.
    """

    socket_path: str
    target_dev: str = "vda"
    queues: int = 1
    serial: str = ""
    read_only: bool = False
    reconnect_timeout: int = 10

    def __post_init__(self) -> None:
        if not self.socket_path.startswith("/") or "\0" in self.socket_path:
            raise InvalidArgument(f"socket path must be absolute: {self.socket_path!r}")
        if not _TARGET_DEV.fullmatch(self.target_dev):
            raise InvalidArgument(f"target dev must look like vda, vdb, ...: {self.target_dev!r}")
        if not 1 <= self.queues <= 1024:
            raise InvalidArgument(f"queues must be between 1 and 1024: {self.queues}")
        if not 1 <= self.reconnect_timeout <= 3600:
            raise InvalidArgument(
                f"reconnect timeout must be 1..3600 seconds: {self.reconnect_timeout}"
            )
        if "--" in self.serial or not self.serial.isprintable():
            raise InvalidArgument(f"serial must be printable and not contain '--': {self.serial!r}")


def disk_element(disk: VhostUserDisk) -> ET.Element:
    """The ``<disk type='vhostuser' device='disk'>`` element for ``disk``."""
    element = ET.Element("disk", type="vhostuser", device="disk")
    notes = []
    if disk.serial:
        notes.append(f"serial {disk.serial} (from the export, GET_ID)")
    if disk.read_only:
        notes.append("read-only (from the export, VIRTIO_BLK_F_RO)")
    if notes:
        element.append(ET.Comment(f" storvisor: {'; '.join(notes)} "))
    ET.SubElement(element, "driver", name="qemu", type="raw", queues=str(disk.queues))
    source = ET.SubElement(element, "source", type="unix", path=disk.socket_path)
    ET.SubElement(source, "reconnect", enabled="yes", timeout=str(disk.reconnect_timeout))
    ET.SubElement(element, "target", dev=disk.target_dev, bus="virtio")
    return element


def memory_backing_element() -> ET.Element:
    """The ``<memoryBacking>`` a domain with vhost-user disks needs (shared memfd RAM)."""
    element = ET.Element("memoryBacking")
    ET.SubElement(element, "source", type="memfd")
    ET.SubElement(element, "access", mode="shared")
    return element


def to_text(element: ET.Element) -> str:
    """``element`` as indented XML text (two spaces per level, no trailing newline)."""
    ET.indent(element, space="  ")
    return ET.tostring(element, encoding="unicode").replace(" />", "/>")


def vhost_user_disk_xml(
    socket_path: str,
    serial: str = "",
    queues: int = 1,
    target_dev: str = "vda",
    read_only: bool = False,
    *,
    reconnect_timeout: int = 10,
) -> str:
    """The ``<disk>`` element, then the ``<memoryBacking>`` element, as text.

    This is what ``storvisor libvirt-xml`` prints: paste the disk into ``<devices>`` and the
    memory backing into ``<domain>``. Raises ``InvalidArgument`` for a relative socket path,
    a bad target dev, or queues outside 1..1024.
    """
    disk = VhostUserDisk(
        socket_path,
        target_dev=target_dev,
        queues=queues,
        serial=serial,
        read_only=read_only,
        reconnect_timeout=reconnect_timeout,
    )
    return f"{to_text(disk_element(disk))}\n{to_text(memory_backing_element())}\n"


def domain_xml(
    name: str,
    disks: Sequence[VhostUserDisk],
    *,
    memory_mib: int = 1024,
    vcpus: int = 1,
    domain_type: str = "kvm",
) -> str:
    """A minimal complete ``<domain>`` document with ``disks`` and the memory backing they need.

    Meant as a starting point and for validation; real deployments merge ``disk_element`` and
    ``memory_backing_element`` into their own domain. Raises ``InvalidArgument`` for an empty
    or slash-containing name, duplicate target devs, or non-positive sizes.
    """
    if not _DOMAIN_NAME.fullmatch(name):
        raise InvalidArgument(f"bad domain name: {name!r}")
    if memory_mib < 1 or vcpus < 1:
        raise InvalidArgument("memory and vcpus must be positive")
    targets = [d.target_dev for d in disks]
    if len(set(targets)) != len(targets):
        raise InvalidArgument(f"duplicate target devs: {targets}")
    domain = ET.Element("domain", type=domain_type)
    ET.SubElement(domain, "name").text = name
    ET.SubElement(domain, "memory", unit="MiB").text = str(memory_mib)
    domain.append(memory_backing_element())
    ET.SubElement(domain, "vcpu").text = str(vcpus)
    os_element = ET.SubElement(domain, "os")
    ET.SubElement(os_element, "type", arch="x86_64", machine="q35").text = "hvm"
    devices = ET.SubElement(domain, "devices")
    for disk in disks:
        devices.append(disk_element(disk))
    return to_text(domain) + "\n"
