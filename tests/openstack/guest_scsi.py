"""In a host-root guest (LIO, tcm_loop and udev, which the host lacks): the Cinder driver with
``storvisor_export_kind = scsi`` against a live daemon, its attachments being real SCSI disks.

A compute host without storvisor's connector (an unmodified Nova) gets ``driver_volume_type
'local'`` with the LUN's ``/dev/disk/by-id/`` path, a block device that os-brick's own
``LocalConnector`` attaches as it is; data written through the disk reads back over NBD and
the other way round, an extend reaches the disk, and detaching removes it. A host with the
storvisor connector registered gets a 'storvisor' connection of kind scsi, which the connector
(built by os-brick's factory) resolves to the same kind of device and Nova's libvirt volume
driver turns into a ``device='lun'`` disk on the virtio-scsi controller Nova makes for
``hw_scsi_model=virtio-scsi`` (in a process of its own: ``nova/nova_config.py``).

Collected on the host by ``conftest.py``: one guest runs every test here with this
interpreter (the OpenStack virtualenv).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from prereq import require, require_module

require_module("cinder", "the OpenStack virtualenv (make openstack-venv) is not in use")

from cinder import exception as cinder_exception  # noqa: E402
from cinder_kit import load_driver, new_volume, pread, pwrite  # noqa: E402
from lxml import etree  # noqa: E402
from os_brick import exception as brick_exception  # noqa: E402
from os_brick.initiator import connector as brick_connector  # noqa: E402
from os_brick.initiator.connectors.local import LocalConnector  # noqa: E402

from cli.cli_harness import CLI, Daemon  # noqa: E402
from storvisor.api.client import Client  # noqa: E402
from storvisor.integrations.openstack import brick  # noqa: E402
from storvisor.integrations.openstack.backend import ExportKind  # noqa: E402
from storvisor.integrations.openstack.connection import ConnectionData  # noqa: E402
from storvisor.testing.direct_io import read_direct, write_direct  # noqa: E402

GIB = 1 << 30
MIB = 1 << 20
NOVA_CONFIG = Path(__file__).parent / "nova" / "nova_config.py"
PLAIN_CONNECTOR = {"host": "compute-1", "initiator": "iqn.1993-08.org.debian:01:compute-1"}
"""What os-brick reports on a compute host where the storvisor connector is not registered."""

DOMAIN = """<domain type='test'>
  <name>storvisor-bfv</name>
  <memory unit='MiB'>64</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  {devices}
</domain>
"""


@pytest.fixture(scope="module")
def hostname() -> None:
    """A host name for the guest, which boots without one (``(none)``, which Nova's ``host``
    option refuses)."""
    if socket.gethostname() == "(none)":
        socket.sethostname("compute-1")


@pytest.fixture(scope="module")
def storvisor_home(
    tmp_path_factory: pytest.TempPathFactory, udev: None, hostname: None
) -> Iterator[Path]:
    """A running daemon whose HOME has the pool ``p`` (4 GiB, sparse). Its LUNs are removed
    before it stops (a LUN without its handler holds sd's last commands)."""
    tmp = tmp_path_factory.mktemp("storvisor")
    home = tmp / "home"
    CLI(home)("pool", "create", "p", "--backing", f"{tmp}/disk.img:4G")
    daemon = Daemon(home).start(timeout=120)
    try:
        yield home
    finally:
        with contextlib.suppress(Exception):
            client = Client(home / "api.sock")
            for export in client.exports():
                client.remove_export(export.spec.name)
        daemon.stop(timeout=120)


@pytest.fixture
def api_url(storvisor_home: Path) -> str:
    return f"unix://{storvisor_home}/api.sock"


@pytest.fixture
def scsi_driver(api_url: str, tmp_path: Path) -> Any:
    driver = load_driver(
        tmp_path,
        {"storvisor_api_url": api_url, "storvisor_pool": "p", "storvisor_export_kind": "scsi"},
    )
    driver.check_for_setup_error()
    return driver


@pytest.fixture
def volume(scsi_driver: Any, ctx: Any) -> Iterator[Any]:
    """A 1 GiB Cinder volume, detached and deleted afterwards."""
    vol = new_volume(ctx)
    scsi_driver.create_volume(vol)
    try:
        yield vol
    finally:
        scsi_driver.terminate_connection(vol, None)
        scsi_driver.delete_volume(vol)


# -- the block device ------------------------------------------------------------------------


def wait_for_link(path: str, present: bool = True, seconds: float = 60) -> None:
    """Wait until udev has made (or removed) the link ``path``. (``udevadm settle`` does
    nothing in the guest's chroot.)"""
    deadline = time.monotonic() + seconds
    while os.path.lexists(path) != present:
        assert time.monotonic() < deadline, f"udev did not {'make' if present else 'remove'} {path}"
        time.sleep(0.1)


def disk_of(path: str) -> str:
    """The kernel name (``sdX``) of the disk ``path`` leads to."""
    disk = os.path.basename(os.path.realpath(path))
    assert re.fullmatch(r"sd[a-z]+", disk), (path, disk)
    return disk


def disk_bytes(disk: str) -> int:
    return int(Path(f"/sys/block/{disk}/size").read_text()) * 512


def wait_for_size(disk: str, size: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while disk_bytes(disk) != size:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@contextlib.contextmanager
def nbd_export(sv: Client, volume: Any) -> Iterator[str]:
    """A second export of the volume, over NBD: its Unix-socket URI."""
    name = f"check-{volume.id}"
    info = sv.export_nbd("p", volume.name, name=name)
    try:
        yield info.uris[0]
    finally:
        sv.remove_export(name)


def exports_of(sv: Client, volume: Any) -> list[str]:
    return [e.spec.name for e in sv.exports() if e.spec.volume == volume.name]


# -- Nova, in a process of its own -----------------------------------------------------------


def nova_devices(connection_info: dict[str, Any], api_url: str, *properties: str) -> Any:
    """The ``<devices>`` Nova's libvirt driver writes for the volume as the root disk of a new
    instance whose image has ``properties``."""
    proc = subprocess.run(
        [sys.executable, str(NOVA_CONFIG), *properties],
        input=json.dumps(connection_info),
        capture_output=True,
        text=True,
        env={**os.environ, "STORVISOR_API_URL": api_url},
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return etree.fromstring(proc.stdout)


def check_with_libvirt(devices: Any, tmp: Path) -> None:
    """The domain with ``devices`` passes libvirt's schema and its test driver's parser."""
    require(shutil.which("virt-xml-validate"), "virt-xml-validate (libvirt-clients) is missing")
    require(shutil.which("virsh"), "virsh (libvirt-clients) is missing")
    path = tmp / "domain.xml"
    path.write_text(DOMAIN.format(devices=etree.tostring(devices, encoding="unicode")))
    for command in (
        ["virt-xml-validate", str(path), "domain"],
        ["virsh", "-q", "-c", "test:///default", "define", str(path)],
    ):
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, f"{command[0]}: {done.stdout}{done.stderr}"


# -- the tests -------------------------------------------------------------------------------


def test_a_plain_connector_gets_the_lun_as_a_local_block_device(
    scsi_driver: Any, volume: Any, sv: Client
) -> None:
    info = scsi_driver.initialize_connection(volume, PLAIN_CONNECTOR)
    assert info["driver_volume_type"] == "local"
    assert set(info["data"]) == {"device_path"}
    path = info["data"]["device_path"]
    assert path.startswith("/dev/disk/by-id/wwn-0x6001405"), path
    wait_for_link(path)
    assert stat.S_ISBLK(os.stat(path).st_mode)
    disk = disk_of(path)
    assert disk_bytes(disk) == GIB
    # a second call (Cinder retrying an attachment) answers the same export
    assert scsi_driver.initialize_connection(volume, PLAIN_CONNECTOR) == info
    assert exports_of(sv, volume) == [volume.name]

    local = brick_connector.InitiatorConnector.factory(info["driver_volume_type"], None)
    assert isinstance(local, LocalConnector)
    assert local.connect_volume(info["data"]) == {"type": "local", "path": path}
    assert local.get_volume_paths(info["data"]) == [path]

    with pytest.raises(cinder_exception.VolumeIsBusy):
        scsi_driver.delete_volume(volume)

    with nbd_export(sv, volume) as uri:
        through_lun = os.urandom(64 << 10)
        write_direct(path, MIB, through_lun)
        assert pread(uri, len(through_lun), MIB) == through_lun
        through_nbd = os.urandom(64 << 10)
        pwrite(uri, through_nbd, 3 * MIB)
        assert read_direct(path, 3 * MIB, len(through_nbd)) == through_nbd

        scsi_driver.extend_volume(volume, 2)
        if not wait_for_size(disk, 2 * GIB, 10):
            # sd rereads the capacity on a rescan of the disk: the daemon's extend may do it;
            # when it does not, the host that uses the disk does (as os-brick's SCSI
            # connectors do on extend_volume)
            Path(f"/sys/block/{disk}/device/rescan").write_text("1")
            assert wait_for_size(disk, 2 * GIB, 30), disk_bytes(disk)
        tail = os.urandom(64 << 10)
        write_direct(path, 2 * GIB - len(tail), tail)  # past the old end
        assert pread(uri, len(tail), 2 * GIB - len(tail)) == tail

    scsi_driver.terminate_connection(volume, PLAIN_CONNECTOR)
    assert not Path(f"/sys/block/{disk}").exists()
    wait_for_link(path, present=False)
    assert exports_of(sv, volume) == []
    scsi_driver.terminate_connection(volume, PLAIN_CONNECTOR)  # already detached: no error


def test_the_storvisor_connector_and_novas_lun_disk(
    scsi_driver: Any, volume: Any, sv: Client, api_url: str, tmp_path: Path
) -> None:
    brick.register()
    connector = {"host": "compute-1", **brick.StorvisorConnector.get_connector_properties(None)}
    info = scsi_driver.initialize_connection(volume, connector)
    assert info["driver_volume_type"] == "storvisor"
    data = ConnectionData.from_dict(info["data"])
    assert (data.kind, data.export) == (ExportKind.SCSI, volume.name)
    assert data.path.startswith("/dev/disk/by-id/wwn-0x6001405"), data.uris
    wait_for_link(data.path)

    attach = brick_connector.InitiatorConnector.factory(
        info["driver_volume_type"], None, storvisor_api_url=api_url
    )
    assert isinstance(attach, brick.StorvisorConnector)
    assert attach.connect_volume(info["data"]) == {"type": "scsi", "path": data.path}
    assert stat.S_ISBLK(os.stat(data.path).st_mode)
    disk = disk_of(data.path)
    assert attach.get_volume_paths(info["data"]) == [data.path]
    assert attach.check_valid_device(data.path)
    assert attach.extend_volume(info["data"]) == GIB == disk_bytes(disk)

    info["serial"] = volume.id
    devices = nova_devices(info, api_url, "hw_disk_bus=scsi", "hw_scsi_model=virtio-scsi")
    (lun,) = devices.findall("disk")
    assert (lun.get("type"), lun.get("device")) == ("block", "lun")
    assert (lun.get("sgio"), lun.get("rawio")) == ("filtered", "no")
    assert lun.find("source").attrib == {"dev": data.path}
    assert lun.find("target").attrib == {"dev": "sda", "bus": "scsi"}
    address = lun.find("address")
    assert address.get("type") == "drive"
    assert (address.get("controller"), address.get("unit")) == ("0", "0")
    (controller,) = devices.findall("controller")
    assert controller.attrib == {"type": "scsi", "index": "0", "model": "virtio-scsi"}
    check_with_libvirt(devices, tmp_path)

    scsi_driver.terminate_connection(volume, connector)
    assert not Path(f"/sys/block/{disk}").exists()
    with pytest.raises(brick_exception.VolumeDeviceNotFound):
        attach.connect_volume(info["data"])
    assert attach.get_volume_paths(info["data"]) == []
    wait_for_link(data.path, present=False)
