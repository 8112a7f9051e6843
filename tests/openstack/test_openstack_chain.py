"""End to end: the Cinder driver makes and attaches a volume, the os-brick connector connects
it, Nova's libvirt volume driver writes its ``<disk>``, and a QEMU guest (TCG) given that disk
reads what was written through NBD and writes back what the host then reads."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from prereq import require_module

require_module("cinder", "the OpenStack virtualenv (make openstack-venv) is not in use")

from cinder_kit import load_driver, new_volume, pread, pwrite  # noqa: E402

from storvisor.integrations.openstack import brick  # noqa: E402
from storvisor.testing.guest import Guest, vhost_user_blk_args  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.vm,
    pytest.mark.requires(shutil.which("qemu-system-x86_64") is not None, "needs QEMU"),
]

MIB = 1 << 20
NOVA_CONFIG = Path(__file__).parent / "nova" / "nova_config.py"

SCRIPT = """
wait_for_block /dev/vda || exit 10
echo "size-sectors $(cat /sys/block/vda/size)"
echo "serial [$(cat /sys/block/vda/serial 2>/dev/null)]"
echo "read-md5 $(dd if=/dev/vda bs=1M skip=3 count=1 iflag=direct 2>/dev/null | md5sum)"
seq -w 0 999999 | head -c 1048576 > pattern
dd if=pattern of=/dev/vda bs=1M seek=5 oflag=direct conv=fsync 2>/dev/null || exit 11
"""


def guest_pattern() -> bytes:
    """What ``seq -w 0 999999 | head -c 1M`` prints inside the guest."""
    return "".join(f"{i:06d}\n" for i in range(MIB // 7 + 1)).encode()[:MIB]


def nova_disk(connection_info: dict[str, Any], api_url: str) -> Any:
    proc = subprocess.run(
        [sys.executable, str(NOVA_CONFIG)],
        input=json.dumps(connection_info),
        capture_output=True,
        text=True,
        env={**os.environ, "STORVISOR_API_URL": api_url},
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return etree.fromstring(proc.stdout).find("disk")


def qemu_args(disk: Any) -> list[str]:
    """The QEMU arguments libvirt gives for the two disks Nova's driver writes."""
    source = disk.find("source")
    if disk.get("type") == "vhostuser":
        assert source.find("reconnect").get("enabled") == "yes"
        return vhost_user_blk_args(source.get("path"), reconnect=True)
    assert (disk.get("type"), source.get("protocol")) == ("network", "nbd")
    host = source.find("host")
    assert host.get("transport") == "unix"
    serial = disk.findtext("serial")
    return [
        "-blockdev",
        f"driver=nbd,server.type=unix,server.path={host.get('socket')},"
        f"export={source.get('name')},node-name=sv0",
        "-device",
        f"virtio-blk-pci,drive=sv0,serial={serial}",
    ]


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sv-", dir="/tmp"))  # AF_UNIX paths are short
    yield path
    shutil.rmtree(path)


@pytest.mark.parametrize("kind", ["nbd", "vhost-user-blk"])
def test_driver_connector_nova_config_and_a_guest(
    storvisor_home: Path, tmp_path: Path, socket_dir: Path, ctx: Any, kind: str
) -> None:
    api_url = f"unix://{storvisor_home}/api.sock"
    driver = load_driver(
        tmp_path,
        {
            "storvisor_api_url": api_url,
            "storvisor_pool": "p",
            "storvisor_export_kind": kind,
            "storvisor_vhost_socket_dir": str(socket_dir),
        },
    )
    volume = new_volume(ctx)
    driver.create_volume(volume)
    data = os.urandom(MIB)
    with driver._image_export(volume, read_only=False) as uri:
        pwrite(uri, data, 3 * MIB)
    try:
        connection_info = driver.initialize_connection(volume, {"host": "compute-1"})
        connection_info["serial"] = volume.id
        brick.register()
        connector = brick.StorvisorConnector(None, storvisor_api_url=api_url)
        device = connector.connect_volume(connection_info["data"])
        assert device["type"] == kind
        disk = nova_disk(connection_info, api_url)
        with Guest(SCRIPT, qemu_args=qemu_args(disk), timeout=240) as guest:
            result = guest.wait().check()
        assert f"size-sectors {(1 << 30) // 512}" in result.console
        if kind == "nbd":  # vhost-user-blk has no serial in libvirt's XML
            assert f"serial [{volume.id[:20]}" in result.console
        assert f"read-md5 {hashlib.md5(data).hexdigest()}" in result.console
        connector.disconnect_volume(connection_info["data"], device)
        driver.terminate_connection(volume, None)
        with driver._image_export(volume, read_only=True) as uri:
            assert pread(uri, MIB, 5 * MIB) == guest_pattern()
    finally:
        driver.terminate_connection(volume, None)
        driver.delete_volume(volume)
