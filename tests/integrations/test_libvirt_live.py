"""Attaching to a running guest: a real libvirtd (session mode, QEMU under TCG, the domain
started paused so no guest code runs) takes what ``storvisor.integrations.libvirt`` plans
with ``virsh attach-device --live``.

* The virtio-scsi controller planned against the live domain (an lsilogic controller at 0:
  the new one at index 1) is hot-plugged, and planning again against the changed domain puts
  the next LUN on it.
* A storvisor vhost-user-blk export, as ``storvisor libvirt-xml`` prints it, is hot-plugged:
  QEMU realizes the device, which needs the back-end's answers (features, config).

The ``device='lun'`` disk itself needs a SCSI device that answers SG_IO (QEMU refuses a loop
device: "cannot get SG_IO version number"), and the vhost-scsi hostdev needs
``/dev/vhost-scsi``; both are hot-plugged in a guest with LIO
(``tests/lio/guest_libvirt_scsi.py``). The libvirtd is ``tests/libvirt_kit.py``'s.
"""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from cli.cli_harness import CLI, Daemon
from libvirt_kit import DOMAIN, Virsh, attach_live, ok, write
from storvisor.integrations.libvirt import scsi
from storvisor.integrations.libvirt.scsi import DriveAddress, ScsiMode
from storvisor.integrations.libvirt.vhostuser import to_text

pytestmark = [
    pytest.mark.slow,
    pytest.mark.vm,
    pytest.mark.requires(
        shutil.which("libvirtd") is not None,
        "libvirtd is not installed (libvirt-daemon, libvirt-daemon-driver-qemu)",
    ),
    pytest.mark.requires(
        shutil.which("qemu-system-x86_64") is not None, "qemu-system-x86_64 is not installed"
    ),
]


def test_virtio_scsi_controller_hot_plugged_where_planned(
    virsh: Virsh, workdir: Path, paused_guest: str
) -> None:
    live = ok(virsh("dumpxml", paused_guest))
    attachment = scsi.plan(ScsiMode.LUN, "/dev/disk/by-id/wwn-0x6001405f00000001", live)
    assert attachment.new_controller == 1
    attach_live(virsh, paused_guest, workdir, "controller.xml", to_text(attachment.devices[0]))

    after = ok(virsh("dumpxml", paused_guest))
    controllers = {
        c.get("index"): c for c in ET.fromstring(after).iterfind("devices/controller[@type='scsi']")
    }
    assert controllers["0"].get("model") == "lsilogic"
    assert controllers["1"].get("model") == "virtio-scsi"
    assert controllers["1"].find("alias") is not None  # QEMU has the device
    again = scsi.plan(ScsiMode.LUN, "/dev/disk/by-id/wwn-0x6001405f00000001", after)
    assert again.new_controller is None
    assert again.address == DriveAddress(1, 0, 0, 0)


def test_vhost_user_blk_export_hot_plugged(virsh: Virsh, workdir: Path, paused_guest: str) -> None:
    home = workdir / "storvisor"
    sockets = workdir / "sockets"
    sockets.mkdir()
    sockets.chmod(0o777)
    cli = CLI(home)
    cli("pool", "create", "p", "--backing", f"{workdir}/disk.img:256M")
    cli("volume", "create", "p/v", "--size", "64M")
    daemon = Daemon(home).start()
    try:
        socket = sockets / "v.sock"
        cli("export", "vhost-user-blk", "p/v", "--socket", str(socket))
        socket.chmod(0o666)
        printed = cli("libvirt-xml", "p/v").out
        disk_text = printed[: printed.index("</disk>") + len("</disk>")]
        attach_live(virsh, paused_guest, workdir, "vhu.xml", disk_text)
        after = ET.fromstring(ok(virsh("dumpxml", paused_guest)))
        (disk,) = after.iterfind("devices/disk[@type='vhostuser']")
        assert disk.find("source").get("path") == str(socket)  # type: ignore[union-attr]
        assert disk.find("alias") is not None
        qtree = ok(virsh("qemu-monitor-command", paused_guest, "--hmp", "info qtree"))
        assert 'chardev = "chr-vu-' in qtree and "dev: vhost-user-blk," in qtree
    finally:
        daemon.stop()


def test_qemu_driver_defines_a_lun_to_boot_from(virsh: Virsh, workdir: Path) -> None:
    """The QEMU driver's own validation (beyond test:///default's) accepts the planned LUN
    with boot order 1 and the changes the domain needed; it refuses a boot order on a
    vhost-scsi hostdev, which is why ``plan_vhost`` refuses ``boot``."""
    qemu = str(shutil.which("qemu-system-x86_64"))
    text = (
        DOMAIN.format(qemu=qemu)
        .replace("<name>storvisor-live</name>", "<name>storvisor-boot</name>")
        .replace(
            "<memballoon",
            "<interface type='user'><mac address='52:54:00:12:34:56'/><boot order='1'/></interface>"
            "<memballoon",
        )
    )
    attachment = scsi.plan(ScsiMode.LUN, "/dev/disk/by-id/wwn-0x6001405f00000001", text, boot=True)
    assert [(c.description, c.new_order) for c in attachment.boot_changes] == [
        ("interface 52:54:00:12:34:56", 2)
    ]
    ok(virsh("define", str(write(workdir, "boot.xml", scsi.apply(text, attachment)))))
    try:
        dumped = ET.fromstring(ok(virsh("dumpxml", "storvisor-boot")))
        (disk,) = dumped.iterfind("devices/disk[@device='lun']")
        assert disk.find("boot").get("order") == "1"  # type: ignore[union-attr]
    finally:
        ok(virsh("undefine", "storvisor-boot"))

    hostdev = (
        "<hostdev mode='subsystem' type='scsi_host' model='virtio'>"
        "<source protocol='vhost' wwpn='naa.5001405123456789'/><boot order='1'/></hostdev>"
    )
    refused = virsh(
        "define",
        str(
            write(
                workdir,
                "hostdev.xml",
                DOMAIN.format(qemu=qemu)
                .replace("storvisor-live", "storvisor-hostdev")
                .replace("<memballoon", hostdev + "<memballoon"),
            )
        ),
    )
    assert refused.returncode != 0
    assert "booting from assigned devices is not supported by vhost SCSI" in refused.stderr
