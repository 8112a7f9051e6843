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
``/dev/vhost-scsi``; both belong to a guest with LIO (the tcm_loop LUN of ``storvisor export
scsi``). libvirtd runs as root's ``nobody`` when the tests run as root (a session daemon of
its own, no system configuration touched), with ``stdio_handler = "file"`` (no virtlogd).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cli.cli_harness import CLI, Daemon
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

NOBODY = 65534
DOMAIN = """<domain type='qemu'>
  <name>storvisor-live</name>
  <memory unit='MiB'>128</memory>
  <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>
  <vcpu>1</vcpu>
  <features><acpi/></features>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <emulator>{qemu}</emulator>
    <controller type='scsi' index='0' model='lsilogic'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""

Virsh = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    """A directory the session daemon's user can reach (pytest's tmp is root's only)."""
    top = Path(tempfile.mkdtemp(prefix="sv-libvirt-", dir="/tmp"))
    top.chmod(0o755)
    try:
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(scope="module")
def virsh(workdir: Path) -> Iterator[Virsh]:
    """``virsh -c qemu:///session`` of a libvirtd of this module's own."""
    root = workdir / "libvirt"
    for sub in ("run", "config/libvirt", "cache", "home"):
        (root / sub).mkdir(parents=True)
    (root / "config/libvirt/qemu.conf").write_text('stdio_handler = "file"\n')
    env = {
        "HOME": f"{root}/home",
        "XDG_RUNTIME_DIR": f"{root}/run",
        "XDG_CONFIG_HOME": f"{root}/config",
        "XDG_CACHE_HOME": f"{root}/cache",
        "PATH": "/usr/sbin:/usr/bin:/bin",
    }
    as_user: list[str] = []
    if os.geteuid() == 0:
        for path in [root, *root.rglob("*")]:
            os.chown(path, NOBODY, NOBODY)
        as_user = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    log = (workdir / "libvirtd.log").open("w")
    daemon = subprocess.Popen(
        [*as_user, "env", "-i", *(f"{k}={v}" for k, v in env.items()), "libvirtd"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                *as_user,
                "env",
                "-i",
                *(f"{k}={v}" for k, v in env.items()),
                "virsh",
                "-c",
                "qemu:///session",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    try:
        deadline = time.monotonic() + 60
        while run("version").returncode != 0:
            assert daemon.poll() is None, (workdir / "libvirtd.log").read_text()
            assert time.monotonic() < deadline, "libvirtd did not answer within 60 s"
            time.sleep(0.5)
        yield run
    finally:
        run("destroy", "storvisor-live")
        run("undefine", "storvisor-live")
        daemon.terminate()
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        log.close()


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def write(workdir: Path, name: str, text: str) -> Path:
    path = workdir / name
    path.write_text(text)
    path.chmod(0o644)
    return path


@pytest.fixture(scope="module")
def paused_guest(virsh: Virsh, workdir: Path) -> str:
    qemu = shutil.which("qemu-system-x86_64")
    ok(virsh("define", str(write(workdir, "domain.xml", DOMAIN.format(qemu=qemu)))))
    ok(virsh("start", "--paused", "storvisor-live"))
    return "storvisor-live"


def test_virtio_scsi_controller_hot_plugged_where_planned(
    virsh: Virsh, workdir: Path, paused_guest: str
) -> None:
    live = ok(virsh("dumpxml", paused_guest))
    attachment = scsi.plan(ScsiMode.LUN, "/dev/disk/by-id/wwn-0x6001405f00000001", live)
    assert attachment.new_controller == 1
    controller_file = write(workdir, "controller.xml", to_text(attachment.devices[0]))
    ok(virsh("attach-device", paused_guest, str(controller_file), "--live"))

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
        ok(
            virsh(
                "attach-device", paused_guest, str(write(workdir, "vhu.xml", disk_text)), "--live"
            )
        )
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
