"""Nova's libvirt volume driver for storvisor SCSI LUNs, in the Nova test process: hot-attach
to a running guest (a virtio-scsi controller at the lowest free index when the guest has none
with a free unit, attached before the disk), boot from volume (the LUN as the root disk on
the virtio-scsi controller 0 Nova makes for ``hw_scsi_model=virtio-scsi``), and the 'local'
connection Cinder gives an unmodified Nova.

Two seams, both filled by real implementations: Nova's ``Guest`` is a domain of libvirt's
test driver (every change is defined by ``virsh -c test:///default``, which runs libvirt's
parser and domain validator, and the domain is kept as libvirt dumps it), and the volume
driver's connector is os-brick's own ``LocalConnector``, which attaches a host block device
as it is (the storvisor connector needs a daemon with SCSI exports, ``storvisor export
scsi``, which only a guest has: ``tests/openstack/guest_scsi.py`` drives that one).
"""

from __future__ import annotations

import shutil
import subprocess
import types
import uuid
from pathlib import Path
from typing import Any

import pytest

from prereq import require, require_module

require_module("nova", "the OpenStack virtualenv (make openstack-venv) is not in use")

from lxml import etree  # noqa: E402
from nova import exception as nova_exception  # noqa: E402
from nova import objects as nova_objects  # noqa: E402
from nova.virt.libvirt import driver as libvirt_driver  # noqa: E402
from os_brick.initiator.connectors.local import LocalConnector  # noqa: E402

from storvisor.integrations.openstack import nova  # noqa: E402
from storvisor.integrations.openstack.backend import ExportKind  # noqa: E402
from storvisor.integrations.openstack.connection import (  # noqa: E402
    ADDRESS_KEY,
    ConnectionData,
    local_connection,
)

nova_objects.register_all()

LUN1 = "/dev/disk/by-id/wwn-0x6001405f00000001"
LUN2 = "/dev/disk/by-id/wwn-0x6001405f00000002"
HOT_DISK_INFO = {"type": "disk", "dev": "sdc", "bus": "scsi"}

GUEST = """<domain type='test'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type>{boot}</os>
  <devices>{devices}</devices>
</domain>
"""
ROOT_ON_LSILOGIC = (
    "<controller type='scsi' index='0' model='lsilogic'/>"
    "<disk type='file' device='disk'><source file='/var/lib/nova/instances/disk'/>"
    "<target dev='sda' bus='scsi'/>"
    "<address type='drive' controller='0' bus='0' target='0' unit='0'/></disk>"
)
NOVA_VIRTIO_SCSI = (
    "<controller type='scsi' index='0' model='virtio-scsi'/>"
    "<disk type='file' device='disk'><source file='/var/lib/nova/instances/disk'/>"
    "<target dev='sda' bus='scsi'/>"
    "<address type='drive' controller='0' bus='0' target='0' unit='0'/></disk>"
)


def virsh(*commands: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["virsh", "-q", "-c", "test:///default", "; ".join(commands)],
        capture_output=True,
        text=True,
        check=False,
    )


class VirshGuest:
    """Nova's ``Guest`` over a domain of libvirt's test driver (see the module docstring)."""

    def __init__(self, xml: str, tmp: Path) -> None:
        require(shutil.which("virsh"), "virsh (libvirt-clients) is missing")
        self.tmp = tmp
        self.name = etree.fromstring(xml).findtext("name")
        self.attached: list[str] = []
        self.xml = self._define(xml)

    def _define(self, xml: str) -> str:
        path = self.tmp / f"{self.name}.xml"
        path.write_text(xml)
        result = virsh(f"define {path}", f"dumpxml {self.name}")
        if result.returncode != 0:
            raise AssertionError(f"libvirt refused the domain: {result.stderr}")
        return result.stdout

    def get_xml_desc(self, dump_inactive: bool = False, **flags: bool) -> str:
        return self.xml

    def is_active(self) -> bool:
        return True

    def attach_device(self, conf: Any, persistent: bool = False, live: bool = False) -> None:
        assert persistent and live, "a device is attached to the running guest and its config"
        root = etree.fromstring(self.xml.encode())
        root.find("devices").append(etree.fromstring(conf.to_xml()))
        self.xml = self._define(etree.tostring(root, encoding="unicode"))
        self.attached.append(conf.root_name)


class Host:
    """The calls the volume driver makes on Nova's libvirt ``Host``."""

    def __init__(self, guest: VirshGuest | None) -> None:
        self.guest = guest

    def find_secret(self, usage_type: str, usage_id: str) -> None:
        return None

    def get_guest(self, instance: Any) -> VirshGuest:
        if self.guest is None:
            raise nova_exception.InstanceNotFound(instance_id=instance.uuid)
        return self.guest


def volume_driver(host: Host) -> Any:
    """The driver as Nova's ``_get_volume_driver`` builds it, attaching through os-brick's
    ``LocalConnector``."""
    nova.register()
    state = types.SimpleNamespace(volume_drivers={}, _host=host)
    drv = libvirt_driver.LibvirtDriver._get_volume_driver(state, lun_connection(LUN1))
    assert isinstance(drv, nova.LibvirtStorvisorVolumeDriver)
    drv.connector = LocalConnector(None)
    return drv


def lun_connection(path: str, name: str = "volume-1") -> dict[str, Any]:
    data = ConnectionData(name, "p", name, name, ExportKind.SCSI, ("/dev/sdc", path))
    return {
        "driver_volume_type": "storvisor",
        "serial": name,
        "data": {**data.to_dict(), "device_path": path, "access_mode": "rw"},
    }


def instance() -> Any:
    return nova_objects.Instance(uuid=str(uuid.uuid4()))


def hot_attach(drv: Any, guest: VirshGuest, path: str, dev: str) -> Any:
    """What Nova's ``attach_volume`` does: connect, config, attach; the disk as libvirt
    keeps it."""
    info = lun_connection(path, name=f"volume-{dev}")
    drv.connect_volume(info, instance())
    conf = drv.get_config(info, {**HOT_DISK_INFO, "dev": dev})
    guest.attach_device(conf, persistent=True, live=True)
    dumped = etree.fromstring(guest.xml.encode())
    (disk,) = dumped.xpath(f"devices/disk[source/@dev='{path}']")
    return disk


def address(disk: Any) -> tuple[int, int]:
    where = disk.find("address")
    assert where.get("type") == "drive" and (where.get("bus"), where.get("target")) == ("0", "0")
    return int(where.get("controller")), int(where.get("unit"))


def scsi_models(guest: VirshGuest) -> dict[int, str | None]:
    dumped = etree.fromstring(guest.xml.encode())
    return {
        int(c.get("index")): c.get("model")
        for c in dumped.xpath("devices/controller[@type='scsi']")
    }


def test_hot_attach_adds_a_virtio_scsi_controller_beside_the_lsilogic_one(
    tmp_path: Path,
) -> None:
    guest = VirshGuest(GUEST.format(name="nova-lsi", boot="", devices=ROOT_ON_LSILOGIC), tmp_path)
    drv = volume_driver(Host(guest))

    first = hot_attach(drv, guest, LUN1, "sdb")
    assert guest.attached == ["controller", "disk"]
    assert scsi_models(guest) == {0: "lsilogic", 1: "virtio-scsi"}
    assert (first.get("type"), first.get("device")) == ("block", "lun")
    assert (first.get("sgio"), first.get("rawio")) == ("filtered", "no")
    assert first.find("target").attrib == {"dev": "sdb", "bus": "scsi"}
    assert address(first) == (1, 0)
    assert first.find("serial") is None

    second = hot_attach(drv, guest, LUN2, "sdc")
    assert guest.attached == ["controller", "disk", "disk"]  # the controller has room
    assert address(second) == (1, 1)

    # connecting a LUN the domain has (a hard reboot) keeps its address, adds nothing
    again = lun_connection(LUN1)
    drv.connect_volume(again, instance())
    assert again["data"][ADDRESS_KEY] == {"controller": 1, "bus": 0, "target": 0, "unit": 0}
    assert guest.attached == ["controller", "disk", "disk"]


def test_hot_attach_uses_novas_virtio_scsi_controller(tmp_path: Path) -> None:
    guest = VirshGuest(GUEST.format(name="nova-vs", boot="", devices=NOVA_VIRTIO_SCSI), tmp_path)
    disk = hot_attach(volume_driver(Host(guest)), guest, LUN1, "sdb")
    assert guest.attached == ["disk"]
    assert scsi_models(guest) == {0: "virtio-scsi"}
    assert address(disk) == (0, 1)


def test_a_full_controller_gets_a_new_one(tmp_path: Path) -> None:
    units = "".join(
        f"<disk type='file' device='disk'><source file='/var/lib/nova/d{u}'/>"
        f"<target dev='sd{chr(97 + u)}' bus='scsi'/>"
        f"<address type='drive' controller='0' bus='0' target='0' unit='{u}'/></disk>"
        for u in range(7)
    )
    devices = "<controller type='scsi' index='0' model='virtio-scsi'/>" + units
    guest = VirshGuest(GUEST.format(name="nova-full", boot="", devices=devices), tmp_path)
    disk = hot_attach(volume_driver(Host(guest)), guest, LUN1, "sdh")
    assert scsi_models(guest) == {0: "virtio-scsi", 1: "virtio-scsi"}
    assert address(disk) == (1, 0)


def test_boot_from_volume_on_novas_controller(tmp_path: Path) -> None:
    """No guest yet: Nova builds the domain, with a virtio-scsi controller 0 for
    ``hw_scsi_model=virtio-scsi``, unit 0 for the root volume and ``<boot dev='hd'/>``."""
    drv = volume_driver(Host(None))
    info = lun_connection(LUN1)
    drv.connect_volume(info, instance())
    assert ADDRESS_KEY not in info["data"]
    disk_info = {"type": "disk", "dev": "sda", "bus": "scsi", "boot_index": "1", "unit": 0}
    disk_xml = drv.get_config(info, disk_info).to_xml()
    domain = GUEST.format(
        name="nova-bfv",
        boot="<boot dev='hd'/>",
        devices=disk_xml + "<controller type='scsi' index='0' model='virtio-scsi'/>",
    )
    path = tmp_path / "bfv.xml"
    path.write_text(domain)
    require(shutil.which("virt-xml-validate"), "virt-xml-validate (libvirt-clients) is missing")
    valid = subprocess.run(
        ["virt-xml-validate", str(path), "domain"], capture_output=True, text=True, check=False
    )
    assert valid.returncode == 0, valid.stdout + valid.stderr
    guest = VirshGuest(domain, tmp_path)
    dumped = etree.fromstring(guest.xml.encode())
    root = dumped.find("devices/disk")
    assert (root.get("device"), root.find("source").get("dev")) == ("lun", LUN1)
    assert address(root) == (0, 0)
    assert scsi_models(guest) == {0: "virtio-scsi"}
    assert dumped.find("os/boot").get("dev") == "hd"


def test_unmodified_nova_attaches_the_local_connection(tmp_path: Path) -> None:
    """Nova's own 'local' volume driver, with the connection Cinder returns for a plain
    connector: a LUN disk on Nova's controller 0 and unit."""
    state = types.SimpleNamespace(volume_drivers={}, _host=Host(None))
    info = local_connection(LUN1)
    drv = libvirt_driver.LibvirtDriver._get_volume_driver(state, info)
    assert type(drv).__name__ == "LibvirtVolumeDriver"
    drv.connect_volume(info, instance())
    disk_info = {"type": "lun", "dev": "sdb", "bus": "scsi", "unit": 1}
    disk_xml = drv.get_config(info, disk_info).to_xml()
    guest = VirshGuest(
        GUEST.format(name="nova-local", boot="", devices=NOVA_VIRTIO_SCSI + disk_xml), tmp_path
    )
    (disk,) = etree.fromstring(guest.xml.encode()).xpath(f"devices/disk[source/@dev='{LUN1}']")
    assert (disk.get("type"), disk.get("device")) == ("block", "lun")
    assert address(disk) == (0, 1)


def test_unreadable_guest_domain_is_volume_attach_failed(tmp_path: Path) -> None:
    guest = VirshGuest(GUEST.format(name="nova-bad", boot="", devices=""), tmp_path)
    guest.xml = "<domain><devices>"  # what no libvirt prints
    drv = volume_driver(Host(guest))
    with pytest.raises(nova_exception.VolumeAttachFailed, match="not well-formed"):
        drv.connect_volume(lun_connection(LUN1), instance())
    assert guest.attached == []


def test_nbd_volume_of_a_virtio_scsi_image_is_a_disk_on_novas_controller(tmp_path: Path) -> None:
    """``hw_scsi_model=virtio-scsi`` with an NBD export: a SCSI disk (not a LUN: NBD has no
    SCSI commands to pass) on Nova's controller 0 at Nova's unit."""
    drv = volume_driver(Host(None))
    data = ConnectionData("v", "p", "v", "v", ExportKind.NBD, ("nbd://192.0.2.7:10809/v",))
    info = {"driver_volume_type": "storvisor", "serial": "v", "data": data.to_dict()}
    disk_info = {"type": "disk", "dev": "sdb", "bus": "scsi", "unit": 1}
    disk_xml = drv.get_config(info, disk_info).to_xml()
    guest = VirshGuest(
        GUEST.format(name="nova-nbd-scsi", boot="", devices=NOVA_VIRTIO_SCSI + disk_xml), tmp_path
    )
    (disk,) = etree.fromstring(guest.xml.encode()).xpath("devices/disk[@type='network']")
    assert (disk.get("device"), disk.find("source").get("protocol")) == ("disk", "nbd")
    assert disk.find("target").attrib == {"dev": "sdb", "bus": "scsi"}
    assert address(disk) == (0, 1)
