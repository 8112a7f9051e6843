"""Inside a host-root guest: what the LIO tests rely on is there."""

from __future__ import annotations

import os
from pathlib import Path


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
