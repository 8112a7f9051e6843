"""``pool create`` and ``pool add-backing`` refuse a device holding a file system in one
line and a non-zero exit, leave nothing behind, and overwrite it with ``--force``."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from cli_harness import CLI

from prereq import require


def _blkid(path: Path) -> str:
    tool = shutil.which("blkid") or shutil.which("blkid", path="/usr/sbin:/sbin")
    assert tool is not None
    return subprocess.run(
        [tool, "-p", "-o", "export", str(path)], capture_output=True, text=True, timeout=60
    ).stdout


def _ext4(tmp_path: Path) -> Path:
    mkfs = shutil.which("mkfs.ext4") or shutil.which("mkfs.ext4", path="/usr/sbin:/sbin")
    require(mkfs, "mkfs.ext4 (e2fsprogs) is not installed")
    assert mkfs is not None
    path = tmp_path / "fs.img"
    with open(path, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run([mkfs, "-q", "-F", str(path)], check=True, capture_output=True, timeout=60)
    assert "TYPE=ext4" in _blkid(path)
    return path


def test_pool_create_refuses_a_file_system(cli: CLI, home: Path, tmp_path: Path) -> None:
    fs = _ext4(tmp_path)
    line = cli.fails("pool", "create", "pfs", "--backing", str(fs))
    assert line == (
        f"storvisor: error: {fs} holds an ext4 file system (use --force to overwrite it)"
    )
    assert not (home / "pools" / "pfs").exists()
    assert "TYPE=ext4" in _blkid(fs)
    assert cli("pool", "list", "--json").json() == []

    cli("pool", "create", "pfs", "--backing", str(fs), "--force")
    assert "TYPE=" not in _blkid(fs)
    assert [p["name"] for p in cli("pool", "list", "--json").json()] == ["pfs"]


def test_add_backing_refuses_a_file_system_through_the_daemon(
    cli: CLI, daemon: object, tmp_path: Path
) -> None:
    fs = _ext4(tmp_path)
    cli("pool", "create", "p", "--backing", f"{tmp_path}/first.img:64M")
    line = cli.fails("pool", "add-backing", "p", "--backing", str(fs))
    assert line.endswith(f"{fs} holds an ext4 file system (use --force to overwrite it)")
    assert len(cli("pool", "show", "p", "--json").json()["backings"]) == 1
    assert "TYPE=ext4" in _blkid(fs)
    cli("pool", "add-backing", "p", "--backing", str(fs), "--force")
    assert len(cli("pool", "show", "p", "--json").json()["backings"]) == 2
    assert "TYPE=" not in _blkid(fs)
