"""``export scsi`` and ``export vhost-scsi`` on the host: definitions, validation, errors.

The host kernel may have no LIO at all; then a daemon refuses these exports with one line
naming what is missing and records nothing. The exports themselves are shown in a guest
(``tests/lio``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cli_harness import CLI, Daemon

WWPN = "naa.5001405000000001"


def setup_volume(cli: CLI, tmp_path: Path) -> None:
    cli("pool", "create", "p", "--backing", f"{tmp_path / 'b.img'}:1G")
    cli("volume", "create", "p/v", "--size", "64M")
    cli("volume", "create", "p/w", "--size", "64M")


def test_definitions_without_the_daemon(cli: CLI, tmp_path: Path) -> None:
    setup_volume(cli, tmp_path)
    scsi = cli("export", "scsi", "p/v", "--json").json()
    assert isinstance(scsi, dict)
    assert (scsi["spec"]["name"], scsi["spec"]["kind"], scsi["state"]) == (
        "scsi/p/v",
        "scsi",
        "inactive",
    )
    first = cli("export", "vhost-scsi", "p/v", "--wwpn", WWPN, "--json").json()
    second = cli("export", "vhost-scsi", "p/w", "--wwpn", WWPN, "--json").json()
    assert isinstance(first, dict) and isinstance(second, dict)
    assert (first["spec"]["wwpn"], first["spec"]["lun"]) == (WWPN, 0)
    assert (second["spec"]["wwpn"], second["spec"]["lun"]) == (WWPN, 1)  # lowest free LUN
    assert first["uris"] == [WWPN]
    generated = cli("export", "vhost-scsi", "p/w", "--name", "gen", "--json").json()
    assert isinstance(generated, dict)
    assert generated["spec"]["wwpn"].startswith("naa.5001405") and generated["spec"]["lun"] == 0
    table = cli("export", "list").out
    assert f"{WWPN} LUN 0" in table and f"{WWPN} LUN 1" in table
    assert "scsi/p/v" in table and "vhost-scsi/p/w" in table
    details = cli("export", "show", "vhost-scsi/p/w").out
    assert f"wwpn       {WWPN}" in details or WWPN in details
    assert "lun" in details
    cli("export", "remove", "vhost-scsi/p/v")
    again = cli("export", "vhost-scsi", "p/v", "--wwpn", WWPN, "--json").json()
    assert isinstance(again, dict) and again["spec"]["lun"] == 0  # freed by the removal


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["p/v", "--wwpn", "naa.123"], "invalid WWPN 'naa.123'"),
        (["p/v", "--wwpn", "iqn.2003-01.org:x"], "invalid WWPN"),
        (["p/v", "--lun", "16384"], "invalid LUN 16384"),
        (["p/v", "--device", "/dev/null"], "not both"),
        ([], "give a volume (POOL/VOL) or --device PATH"),
        (["p/nope"], "nope"),
    ],
)
def test_bad_vhost_scsi_requests_are_one_line(
    cli: CLI, tmp_path: Path, args: list[str], message: str
) -> None:
    setup_volume(cli, tmp_path)
    line = cli.fails("export", "vhost-scsi", *args)
    assert message in line
    assert cli("export", "list", "--json").json() == []


def test_a_taken_lun_or_device_is_a_conflict(cli: CLI, tmp_path: Path) -> None:
    setup_volume(cli, tmp_path)
    cli("export", "vhost-scsi", "p/v", "--wwpn", WWPN, "--lun", "5")
    assert "LUN 5 of naa.5001405000000001 is used" in cli.fails(
        "export", "vhost-scsi", "p/w", "--wwpn", WWPN, "--lun", "5"
    )
    cli("export", "vhost-scsi", "--device", "/dev/null", "--name", "d1")
    assert "device /dev/null is already exported" in cli.fails(
        "export", "vhost-scsi", "--device", "/dev/null", "--name", "d2"
    )
    assert "cannot name a TCMU backstore" not in cli("export", "list").out


@pytest.mark.skipif(
    os.path.isdir("/sys/kernel/config/target"), reason="this host kernel has LIO loaded"
)
def test_a_daemon_without_lio_refuses_with_what_is_missing(
    cli: CLI, daemon: Daemon, tmp_path: Path
) -> None:
    setup_volume(cli, tmp_path)
    line = cli.fails("export", "scsi", "p/v")
    assert line.endswith(("configfs is not mounted at /sys/kernel/config", "is missing")), line
    line = cli.fails("export", "vhost-scsi", "p/v")
    assert "configfs" in line or "module" in line, line
    assert cli("export", "list", "--json").json() == []
