"""In a host-root guest: vhost-scsi endpoints over host block devices (iblock backstores on
brd ram disks), driven by the fake guest of ``storvisor.testing.vhost_scsi_frontend``, and the
errors of the LIO control plane. Each test leaves LIO as it found it. First: what every LIO
test relies on is there (root, the modules, configfs, the ram disks, the overlay root)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from storvisor.errors import Conflict, InvalidArgument, NotFound
from storvisor.exports.lio import (
    PREFIX,
    Fabric,
    Lio,
    LioUnavailable,
    backstore_name,
)
from storvisor.testing.direct_io import read_direct
from storvisor.testing.vhost_scsi_frontend import VhostScsiFrontend

WWPN = "naa.5001405aabbccdd0"
RAM_BLOCKS = (64 << 20) // 512


def configfs_snapshot() -> set[str]:
    """Every backstore and vhost/loopback target in configfs."""
    root = Path("/sys/kernel/config/target")
    found = {str(p.relative_to(root)) for p in root.glob("core/*_*/*") if p.is_dir()}
    for fabric in ("vhost", "loopback"):
        found |= {str(p.relative_to(root)) for p in root.glob(f"{fabric}/naa.*")}
        found |= {str(p.relative_to(root)) for p in root.glob(f"{fabric}/naa.*/tpgt_*/lun/*")}
    return found


@pytest.fixture
def lio() -> Iterator[Lio]:
    before = configfs_snapshot()
    lio = Lio()
    yield lio
    for found in lio.luns():
        lio.remove(found.backstore)
    assert configfs_snapshot() == before


def test_runs_as_root_in_the_guest_kernel_with_lio_loaded() -> None:
    assert os.geteuid() == 0
    modules = {line.split()[0] for line in Path("/proc/modules").read_text().splitlines()}
    for name in ("target_core_user", "tcm_loop", "vhost_scsi", "target_core_iblock", "nbd"):
        assert name in modules, sorted(modules)
    assert os.path.ismount("/sys/kernel/config")
    assert Path("/sys/kernel/config/target/core").is_dir()
    assert Path("/etc/target").is_dir()


def test_ram_disks_and_device_nodes() -> None:
    assert Path("/sys/block/ram0/size").read_text().strip() == str(64 << 11)
    for node in ("/dev/ram0", "/dev/ram1", "/dev/nbd0", "/dev/vhost-scsi"):
        assert os.path.exists(node), node


def test_the_root_is_an_overlay_over_the_host() -> None:
    mounts = Path("/proc/mounts").read_text().split("\n")
    assert any(line.split()[1:3] == ["/", "overlay"] for line in mounts if line), mounts
    Path("/etc/storvisor-guest-write-check").write_text("x")  # the tmpfs upper takes writes


def test_vhost_endpoint_on_a_ram_disk_inquiry_capacity_and_data(lio: Lio) -> None:
    name = backstore_name("vs-ram0")
    lio.ensure_block_backstore(name, "/dev/ram0")
    lun = lio.attach(name, Fabric.VHOST, wwpn=WWPN, lun=3)
    assert (lun.fabric, lun.wwpn, lun.lun, lun.plugin) == (Fabric.VHOST, WWPN, 3, "block")
    assert lio.luns() == [lun]
    assert lio.attach(name, Fabric.VHOST, wwpn=WWPN, lun=3) == lun  # idempotent
    pattern = b"".join(i.to_bytes(4, "little") * 128 for i in range(64))  # 32 KiB
    with VhostScsiFrontend(WWPN) as fe:
        assert fe.abi_version == 1 and fe.features & (1 << 32)  # VIRTIO_F_VERSION_1 offered
        assert fe.ready(3).ok
        inquiry = fe.inquiry(3)
        assert inquiry.ok, inquiry
        assert inquiry.data[0] == 0  # a direct-access block device, connected
        assert inquiry.data[8:16].strip() == b"LIO-ORG"
        blocks, block_size, result = fe.read_capacity16(3)
        assert result.ok and (blocks, block_size) == (RAM_BLOCKS, 512)
        assert fe.write16(1000, pattern, lun=3).ok
        assert fe.synchronize_cache(3).ok
        back = fe.read16(1000, len(pattern) // 512, lun=3)
        assert back.ok and back.resid == 0 and back.data == pattern
        missing = fe.inquiry(9)  # no LUN 9
        assert (missing.status, missing.sense_key, missing.asc) == (2, 5, (0x25, 0))
        beyond = fe.read16(RAM_BLOCKS, 1, lun=3)
        assert beyond.status == 2 and beyond.sense_key == 5  # ILLEGAL REQUEST
        assert beyond.asc == (0x21, 0x00)  # LBA out of range
    assert read_direct("/dev/ram0", 1000 * 512, len(pattern)) == pattern


def test_two_luns_share_one_vhost_target(lio: Lio) -> None:
    first, second = backstore_name("vs-a"), backstore_name("vs-b")
    lio.ensure_block_backstore(first, "/dev/ram0")
    lio.ensure_block_backstore(second, "/dev/ram1")
    a = lio.attach(first, Fabric.VHOST)
    assert a.wwpn.startswith("naa.5001405") and a.lun == 0
    b = lio.attach(second, Fabric.VHOST, wwpn=a.wwpn)
    assert (b.wwpn, b.lun) == (a.wwpn, 1)
    with VhostScsiFrontend(a.wwpn) as fe:
        assert fe.ready(0).ok and fe.ready(1).ok  # past REPORTED LUNS DATA HAS CHANGED
        assert fe.write16(0, b"A" * 512, lun=0).ok
        assert fe.write16(0, b"B" * 512, lun=1).ok
    assert read_direct("/dev/ram0", 0, 512) == b"A" * 512
    assert read_direct("/dev/ram1", 0, 512) == b"B" * 512
    lio.remove(first)  # the target keeps its other LUN
    assert [(x.backstore, x.wwpn, x.lun) for x in lio.luns()] == [(second, a.wwpn, 1)]
    assert Path(f"/sys/kernel/config/target/vhost/{a.wwpn}").is_dir()
    lio.remove(second)  # ... and goes with its last
    assert not Path(f"/sys/kernel/config/target/vhost/{a.wwpn}").exists()


def test_a_lun_number_in_use_is_a_conflict_and_leaves_nothing(lio: Lio) -> None:
    first, second = backstore_name("vs-c"), backstore_name("vs-d")
    lio.ensure_block_backstore(first, "/dev/ram0")
    lio.attach(first, Fabric.VHOST, wwpn=WWPN, lun=0)
    lio.ensure_block_backstore(second, "/dev/ram1")
    before = configfs_snapshot()
    with pytest.raises(Conflict, match=f"LUN 0 of {WWPN} is in use"):
        lio.attach(second, Fabric.VHOST, wwpn=WWPN, lun=0)
    assert configfs_snapshot() == before
    with pytest.raises(InvalidArgument, match="invalid WWPN"):
        lio.attach(second, Fabric.VHOST, wwpn="naa.123")
    assert configfs_snapshot() == before


def test_bad_devices_are_clear_errors_and_leave_nothing(lio: Lio, tmp_path: Path) -> None:
    before = configfs_snapshot()
    with pytest.raises(NotFound, match="no block device /dev/nonexistent"):
        lio.ensure_block_backstore(backstore_name("vs-e"), "/dev/nonexistent")
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(InvalidArgument, match="is not a block device"):
        lio.ensure_block_backstore(backstore_name("vs-e"), str(tmp_path / "file"))
    with pytest.raises(NotFound, match="no LIO backstore"):
        lio.attach(backstore_name("vs-none"), Fabric.VHOST)
    with pytest.raises(InvalidArgument, match="not a storvisor backstore"):
        lio.remove("foreign")
    assert configfs_snapshot() == before


def test_foreign_backstores_are_not_listed_or_removed(lio: Lio) -> None:
    import rtslib_fb

    foreign = rtslib_fb.BlockStorageObject("foreign-disk", dev="/dev/ram1")
    try:
        assert all(not x.backstore.startswith("foreign") for x in lio.luns())
        assert Path("/sys/kernel/config/target/core").glob("iblock_*/foreign-disk")
    finally:
        foreign.delete()
    assert PREFIX == "storvisor-"


def test_missing_kernel_support_is_one_line_naming_it(lio: Lio, tmp_path: Path) -> None:
    with pytest.raises(LioUnavailable, match=f"configfs is not mounted at {tmp_path}"):
        Lio(configfs=str(tmp_path)).require()
    name = backstore_name("vs-f")
    lio.ensure_block_backstore(name, "/dev/ram0")
    subprocess.run(["rmmod", "tcm_loop"], check=True)
    try:
        before = configfs_snapshot()
        with pytest.raises(LioUnavailable, match=r"^kernel module tcm_loop is missing$"):
            Lio(load_modules=False).attach(name, Fabric.LOOPBACK)
        assert configfs_snapshot() == before
    finally:
        subprocess.run(["modprobe", "tcm_loop"], check=True)
    code = "from storvisor.exports.lio import Lio; Lio().require()"
    src = str(Path(__import__("storvisor").__file__).parents[1])
    as_nobody = subprocess.run(  # Debian's python3: the venv's interpreter is under /root
        ["/usr/bin/python3", "-c", code],
        user=65534,
        env={"PYTHONPATH": src},
        cwd="/",
        capture_output=True,
        text=True,
        check=False,
    )
    assert as_nobody.returncode != 0
    assert "LioUnavailable: LIO needs root" in as_nobody.stderr
