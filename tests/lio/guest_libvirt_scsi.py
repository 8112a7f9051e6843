"""In a host-root guest with LIO: what ``storvisor libvirt-xml --scsi`` prints, hot-plugged
with ``virsh attach-device --live`` into a running domain of a real libvirtd
(``tests/libvirt_kit.py``: a paused TCG domain, whose devices QEMU realizes):

* ``--scsi lun``: the virtio-scsi controller planned against the live domain, then the
  ``device='lun'`` disk of the tcm_loop LUN that ``export scsi`` made. QEMU serves it as
  ``scsi-block``, which needs a device that answers SG_IO (a loop device is refused);
* ``--scsi vhost``: the ``scsi_host`` hostdev of an ``export vhost-scsi`` target: libvirt
  opens ``/dev/vhost-scsi`` and QEMU's ``vhost-scsi-pci`` checks the target's ABI.

The session libvirtd runs QEMU as ``nobody``: the test opens the LUN's node and
``/dev/vhost-scsi`` to it (the guest's own ``/dev``). udev makes the LUN's
``/dev/disk/by-id`` link, which the disk's source names."""

from __future__ import annotations

import os
import shutil
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))
from cli_harness import CLI, Daemon
from lio_kit import pool_of_volumes, serving

from libvirt_kit import Virsh, attach_live, ok, write
from waiting import wait_until

WWPN = "naa.5001405beef00002"
pytestmark = pytest.mark.requires(
    shutil.which("libvirtd") is not None,
    "libvirtd is not installed (libvirt-daemon, libvirt-daemon-driver-qemu)",
)


@pytest.fixture(scope="module")
def home(workdir: Path) -> Path:
    return workdir / "home"


@pytest.fixture(scope="module")
def cli(home: Path) -> CLI:
    return pool_of_volumes(home, 2)


@pytest.fixture(scope="module")
def daemon(cli: CLI, home: Path) -> Iterator[Daemon]:
    with serving(home) as d:
        yield d


def elements(printed: str) -> list[ET.Element]:
    """The elements ``libvirt-xml`` printed, in order (its comments dropped)."""
    return list(ET.fromstring(f"<printed>{printed}</printed>"))


def attach(virsh: Virsh, domain: str, workdir: Path, element: ET.Element, name: str) -> None:
    attach_live(virsh, domain, workdir, name, ET.tostring(element, encoding="unicode"))


@pytest.mark.usefixtures("udev")
def test_lun_disk_hot_plugged_on_a_new_virtio_scsi_controller(
    cli: CLI, daemon: Daemon, virsh: Virsh, workdir: Path, paused_guest: str
) -> None:
    device, by_id = cli("export", "scsi", "p/v0").out.split()
    os.chmod(device, 0o666)
    wait_until(lambda: os.path.realpath(by_id) == device, f"udev's link {by_id}", 60)
    live = write(workdir, "live.xml", ok(virsh("dumpxml", paused_guest)))
    printed = cli("libvirt-xml", "p/v0", "--scsi", "lun", "--domain-xml", str(live)).out
    controller, disk = elements(printed)
    assert controller.tag == "controller" and controller.get("model") == "virtio-scsi"
    assert controller.get("index") == "1"  # the domain's lsilogic controller has 0
    assert disk.tag == "disk" and disk.get("device") == "lun"
    attach(virsh, paused_guest, workdir, controller, "controller.xml")
    attach(virsh, paused_guest, workdir, disk, "lun.xml")

    after = ET.fromstring(ok(virsh("dumpxml", paused_guest)))
    (attached,) = after.iterfind("devices/disk[@device='lun']")
    source, address = attached.find("source"), attached.find("address")
    assert source is not None and source.get("dev") == by_id
    assert address is not None and address.get("controller") == "1"
    assert attached.find("alias") is not None  # QEMU has the device
    qtree = ok(virsh("qemu-monitor-command", paused_guest, "--hmp", "info qtree"))
    assert "dev: virtio-scsi-pci" in qtree and "dev: scsi-block" in qtree, qtree
    cli("export", "remove", "scsi/p/v0")  # with the daemon up: quick (LIO waits for it else)


def test_vhost_scsi_hostdev_hot_plugged(
    cli: CLI, daemon: Daemon, virsh: Virsh, workdir: Path, paused_guest: str
) -> None:
    assert cli("export", "vhost-scsi", "p/v1", "--wwpn", WWPN).out == f"{WWPN} LUN 0\n"
    os.chmod("/dev/vhost-scsi", 0o666)
    (hostdev,) = elements(cli("libvirt-xml", "p/v1", "--scsi", "vhost").out)
    source = hostdev.find("source")
    assert hostdev.tag == "hostdev" and source is not None and source.get("wwpn") == WWPN
    attach(virsh, paused_guest, workdir, hostdev, "hostdev.xml")

    after = ET.fromstring(ok(virsh("dumpxml", paused_guest)))
    (attached,) = after.iterfind("devices/hostdev[@type='scsi_host']")
    assert attached.find("alias") is not None
    qtree = ok(virsh("qemu-monitor-command", paused_guest, "--hmp", "info qtree"))
    assert "dev: vhost-scsi-pci" in qtree, qtree
    cli("export", "remove", "vhost-scsi/p/v1")
