"""A libvirtd of a test module's own, for tests that hot-plug into a running domain:
``qemu:///session`` run as ``nobody`` when the tests run as root (no system configuration
touched), with ``stdio_handler = "file"`` (no virtlogd), and a paused TCG domain
(``start --paused``: devices are realized, no guest code runs). Used on the host
(``tests/integrations/test_libvirt_live.py``) and in a host-root guest with LIO
(``tests/lio/guest_libvirt_scsi.py``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

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


def attach_live(virsh: Virsh, domain: str, workdir: Path, name: str, text: str) -> None:
    """``virsh attach-device DOMAIN FILE --live`` of the one element ``text``, written to
    ``workdir / name``."""
    ok(virsh("attach-device", domain, str(write(workdir, name, text)), "--live"))


@pytest.fixture(scope="module")
def paused_guest(virsh: Virsh, workdir: Path) -> str:
    qemu = shutil.which("qemu-system-x86_64")
    ok(virsh("define", str(write(workdir, "domain.xml", DOMAIN.format(qemu=qemu)))))
    ok(virsh("start", "--paused", "storvisor-live"))
    return "storvisor-live"
