"""In a host-root guest: SCSI exports made with the CLI against a running daemon, restored
when it restarts and deleted from LIO by ``export remove``."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))
from cli_harness import CLI, Daemon

from storvisor.testing.vhost_scsi_frontend import VhostScsiFrontend

WWPN = "naa.5001405c0ffee001"
TARGET = Path(f"/sys/kernel/config/target/vhost/{WWPN}")


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("exports") / "home"


@pytest.fixture(scope="module")
def cli(home: Path) -> CLI:
    return CLI(home)


@pytest.fixture(scope="module")
def daemon(home: Path) -> Iterator[Daemon]:
    """One daemon for the module (a start costs about 10 s under TCG); the restart test
    stops and starts it again."""
    d = Daemon(home).start(timeout=120)
    try:
        yield d
    finally:
        d.kill()


def test_vhost_scsi_of_a_host_device_survives_a_daemon_restart(
    cli: CLI, daemon: Daemon, home: Path
) -> None:
    out = cli("export", "vhost-scsi", "--device", "/dev/ram1", "--wwpn", WWPN, "--lun", "2").out
    assert out == f"{WWPN} LUN 2\n"
    assert (TARGET / "tpgt_1" / "lun" / "lun_2").is_dir()
    listed = cli("export", "list", "--json").json()
    assert isinstance(listed, list) and len(listed) == 1
    assert listed[0]["state"] == "active" and listed[0]["spec"]["device"] == "/dev/ram1"
    assert f"{WWPN} LUN 2" in cli("export", "list").out
    with VhostScsiFrontend(WWPN) as fe:
        assert fe.ready(2).ok
        assert fe.write16(8, b"\xab" * 4096, lun=2).ok
    rc, _ = daemon.stop(signal.SIGTERM)
    assert rc == 0
    assert (TARGET / "tpgt_1" / "lun" / "lun_2").is_dir()  # LIO objects outlive the daemon
    daemon.start(timeout=120)
    listed = cli("export", "list", "--json").json()
    assert isinstance(listed, list) and listed[0]["state"] == "active"
    with VhostScsiFrontend(WWPN) as fe:
        assert fe.ready(2).ok
        back = fe.read16(8, 8, lun=2)
        assert back.ok and back.data == b"\xab" * 4096
    cli("export", "remove", "vhost-scsi/ram1")
    assert not TARGET.exists()
    assert not list(Path("/sys/kernel/config/target/core").glob("iblock_*/storvisor-*"))


def test_a_missing_device_leaves_nothing(cli: CLI, daemon: Daemon) -> None:
    line = cli.fails("export", "vhost-scsi", "--device", "/dev/nonexistent", "--wwpn", WWPN)
    assert line == "storvisor: error: no block device /dev/nonexistent: No such file or directory"
    assert not TARGET.exists()
    assert cli("export", "list", "--json").json() == []
