"""Nova's libvirt volume driver for storvisor, in a process of its own (Nova and Cinder
register clashing global options): loaded through Nova's ``VOLUME_DRIVERS`` table, its
``get_config`` producing real ``LibvirtConfigGuestDisk`` XML that ``virt-xml-validate`` and
``virsh -c test:///default define`` accept, connect and extend through the connector."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import types
from pathlib import Path
from typing import Any

import pytest

from prereq import require, require_module

require_module("nova", "the OpenStack virtualenv (make openstack-venv) is not in use")

from lxml import etree  # noqa: E402
from nova.virt.libvirt import driver as libvirt_driver  # noqa: E402

from storvisor.api.client import Client  # noqa: E402
from storvisor.integrations.openstack import nova  # noqa: E402
from storvisor.integrations.openstack.backend import ExportKind  # noqa: E402
from storvisor.integrations.openstack.connection import ConnectionData  # noqa: E402

GIB = 1 << 30
DISK_INFO = {"type": "disk", "dev": "vdb", "bus": "virtio"}

DOMAIN = """<domain type='qemu'>
  <name>storvisor-test</name>
  <memory unit='MiB'>64</memory>
  <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>{disk}</devices>
</domain>
"""


@pytest.fixture
def api(storvisor_home: Path, monkeypatch: pytest.MonkeyPatch) -> Client:
    monkeypatch.setenv("STORVISOR_API_URL", f"unix://{storvisor_home}/api.sock")
    return Client(storvisor_home / "api.sock")


class HostWithoutSecrets:
    """The one call volume drivers make on Nova's libvirt ``Host``: no volume has a secret
    (no encrypted volumes here)."""

    def find_secret(self, usage_type: str, usage_id: str) -> None:
        return None


def volume_driver() -> Any:
    """The driver the way Nova's LibvirtDriver._get_volume_driver builds it."""
    nova.register()
    state = types.SimpleNamespace(volume_drivers={}, _host=HostWithoutSecrets())
    return libvirt_driver.LibvirtDriver._get_volume_driver(
        state, {"driver_volume_type": "storvisor"}
    )


def connection(sv: Client, name: str, kind: ExportKind, tmp: Path) -> dict[str, Any]:
    sv.create_volume("p", name, GIB)
    if kind is ExportKind.NBD:
        info = sv.export_nbd("p", name, name=name)
    else:
        info = sv.export_vhost_user_blk("p", name, str(tmp / f"{name[:8]}.sock"), name=name)
    data = ConnectionData(name, "p", name, name, kind, info.uris)
    return {
        "driver_volume_type": "storvisor",
        "serial": name,
        "data": {**data.to_dict(), "qos_specs": {"total_iops_sec": "100"}, "access_mode": "rw"},
    }


def check_with_libvirt(disk_xml: str, tmp: Path) -> None:
    require(shutil.which("virt-xml-validate"), "virt-xml-validate (libvirt-clients) is missing")
    require(shutil.which("virsh"), "virsh (libvirt-clients) is missing")
    path = tmp / "domain.xml"
    path.write_text(DOMAIN.format(disk=disk_xml))
    valid = subprocess.run(
        ["virt-xml-validate", str(path), "domain"], capture_output=True, text=True, check=False
    )
    assert valid.returncode == 0, valid.stdout + valid.stderr
    defined = subprocess.run(
        ["virsh", "-c", "test:///default", "define", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert defined.returncode == 0, defined.stdout + defined.stderr


def test_registration_puts_storvisor_in_novas_table() -> None:
    drv = volume_driver()
    assert isinstance(drv, nova.LibvirtStorvisorVolumeDriver)
    assert libvirt_driver.VOLUME_DRIVERS["storvisor"] == nova.CLASS_PATH


def test_nbd_disk_over_the_unix_socket(api: Client, storvisor_home: Path, tmp_path: Path) -> None:
    drv = volume_driver()
    info = connection(api, "nova-nbd", ExportKind.NBD, tmp_path)
    try:
        drv.connect_volume(info, None)
        assert info["data"]["device_path"] == info["data"]["uris"][0]
        xml = drv.get_config(info, DISK_INFO).to_xml()
        disk = etree.fromstring(xml)
        assert disk.get("type") == "network"
        source = disk.find("source")
        assert (source.get("protocol"), source.get("name")) == ("nbd", "nova-nbd")
        host = source.find("host")
        assert host.attrib == {"transport": "unix", "socket": f"{storvisor_home}/nbd.sock"}
        assert disk.find("target").attrib == {"dev": "vdb", "bus": "virtio"}
        check_with_libvirt(xml, tmp_path)
        api.extend_volume("p", "nova-nbd", 2 * GIB)
        assert drv.extend_volume(info, None, 2 * GIB) == 2 * GIB
        drv.disconnect_volume(info, None)
    finally:
        api.remove_export("nova-nbd")
        api.delete_volume("p", "nova-nbd")


def test_nbd_disk_over_tcp_when_the_socket_is_elsewhere() -> None:
    name, host = nova.nbd_source(
        ("nbd+unix:///v1?socket=/nonexistent/nbd.sock", "nbd://192.0.2.7:10809/v1")
    )
    assert (name, host) == ("v1", {"name": "192.0.2.7", "port": "10809"})


def test_vhost_user_blk_disk(api: Client, tmp_path: Path) -> None:
    drv = volume_driver()
    sockets = Path(tempfile.mkdtemp(prefix="sv-", dir="/tmp"))  # AF_UNIX paths are short
    info = connection(api, "nova-vhost", ExportKind.VHOST_USER_BLK, sockets)
    try:
        drv.connect_volume(info, None)
        xml = drv.get_config(info, DISK_INFO).to_xml()
        disk = etree.fromstring(xml)
        assert disk.get("type") == "vhostuser"
        source = disk.find("source")
        assert source.attrib == {"type": "unix", "path": info["data"]["uris"][0]}
        assert source.find("reconnect").attrib == {"enabled": "yes", "timeout": "10"}
        for refused in ("serial", "iotune", "readonly", "blockio"):
            assert disk.find(refused) is None, refused  # libvirt refuses them on vhostuser
        assert set(disk.find("driver").attrib) <= {"name", "type", "queues"}
        check_with_libvirt(xml, tmp_path)
    finally:
        api.remove_export("nova-vhost")
        api.delete_volume("p", "nova-vhost")
        shutil.rmtree(sockets)
