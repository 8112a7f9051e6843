"""Local SCSI LUN attachments (``storvisor_export_kind = scsi``).

The connection data with fixed inputs: the 'local' connection an unmodified Nova attaches,
the by-id path chosen among a LUN export's paths, the drive address the Nova driver records.
Then, against a live daemon with a SCSI export (``storvisor export scsi``, which needs LIO:
configfs, tcm_loop, root), the connection Cinder gets for a plain connector ('local', the
by-id path of a real block device, attached by os-brick's own ``LocalConnector``) and for a
connector with storvisor's (a 'storvisor' connection of kind scsi), and the export gone after
detaching. Those tests skip where the daemon or the kernel lacks SCSI exports, and fail in CI.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from prereq import require_module

require_module("cinder", "the OpenStack virtualenv (make openstack-venv) is not in use")

from cinder_kit import load_driver, new_volume  # noqa: E402  # registers objects

# isort: split
from os_brick.initiator.connectors.local import LocalConnector  # noqa: E402

from storvisor.api.client import Client  # noqa: E402
from storvisor.errors import InvalidArgument  # noqa: E402
from storvisor.integrations.libvirt.scsi import DriveAddress  # noqa: E402
from storvisor.integrations.openstack import brick  # noqa: E402
from storvisor.integrations.openstack.backend import ExportKind  # noqa: E402
from storvisor.integrations.openstack.connection import (  # noqa: E402
    ADDRESS_KEY,
    ConnectionData,
    export_path,
    local_connection,
)

BY_ID = "/dev/disk/by-id/wwn-0x6001405f00dcafe0"
SCSI_URIS = ("/dev/sdc", BY_ID)

# -- the connection data, fixed inputs ---------------------------------------------------------


def test_local_connection_is_what_novas_local_driver_reads() -> None:
    assert local_connection(BY_ID) == {
        "driver_volume_type": "local",
        "data": {"device_path": BY_ID},
    }
    # os-brick's own connector for 'local' attaches it as it is
    connected = LocalConnector(None).connect_volume(local_connection(BY_ID)["data"])
    assert connected == {"type": "local", "path": BY_ID}


@pytest.mark.parametrize(
    ("kind", "uris", "path"),
    [
        (ExportKind.SCSI, SCSI_URIS, BY_ID),
        (ExportKind.SCSI, ("/dev/sdc",), "/dev/sdc"),
        (ExportKind.NBD, ("nbd+unix:///v?socket=/s", "nbd://h:1/v"), "nbd+unix:///v?socket=/s"),
        (ExportKind.VHOST_USER_BLK, ("/run/storvisor/v.sock",), "/run/storvisor/v.sock"),
    ],
)
def test_export_path(kind: ExportKind, uris: tuple[str, ...], path: str) -> None:
    assert export_path(kind, uris) == path


@pytest.mark.parametrize("uris", [(), ("nbd+unix:///v?socket=/s",)])
def test_a_scsi_export_without_a_device_is_invalid(uris: tuple[str, ...]) -> None:
    with pytest.raises(InvalidArgument, match="scsi export lists no path"):
        export_path(ExportKind.SCSI, uris)


def test_connection_data_keeps_the_drive_address() -> None:
    data = ConnectionData("id", "p", "volume-1", "volume-1", ExportKind.SCSI, SCSI_URIS)
    placed = dataclasses.replace(data, address=DriveAddress(1, 0, 0, 3))
    as_dict = placed.to_dict()
    assert as_dict[ADDRESS_KEY] == {"controller": 1, "bus": 0, "target": 0, "unit": 3}
    assert ConnectionData.from_dict(as_dict) == placed
    assert ADDRESS_KEY not in data.to_dict()
    assert ConnectionData.from_dict(data.to_dict()).path == BY_ID


@pytest.mark.parametrize(
    "address",
    [
        {"controller": 1, "bus": 0, "target": 0},
        {"controller": -1, "bus": 0, "target": 0, "unit": 0},
        {"controller": "1", "bus": 0, "target": 0, "unit": 0},
        {"controller": True, "bus": 0, "target": 0, "unit": 0},
        [1, 0, 0, 0],
    ],
)
def test_bad_drive_address_is_invalid(address: object) -> None:
    data = ConnectionData("id", "p", "v", "v", ExportKind.SCSI, SCSI_URIS).to_dict()
    with pytest.raises(InvalidArgument, match=ADDRESS_KEY):
        ConnectionData.from_dict({**data, ADDRESS_KEY: address})


# -- against a daemon with SCSI exports ---------------------------------------------------------

_MISSING = [
    reason
    for present, reason in [
        (hasattr(Client, "export_scsi"), "the daemon has no SCSI export (storvisor export scsi)"),
        (
            os.geteuid() == 0 and Path("/sys/kernel/config/target").is_dir(),
            "LIO is not usable here (root and configfs with target_core_mod are needed)",
        ),
    ]
    if not present
]
needs_scsi_exports = pytest.mark.requires(not _MISSING, "; ".join(_MISSING))


@pytest.fixture
def scsi_driver(storvisor_home: Path, tmp_path: Path) -> Any:
    return load_driver(
        tmp_path,
        {
            "storvisor_api_url": f"unix://{storvisor_home}/api.sock",
            "storvisor_pool": "p",
            "storvisor_export_kind": "scsi",
        },
    )


@needs_scsi_exports
def test_plain_connector_gets_a_local_block_device(scsi_driver: Any, ctx: Any, sv: Client) -> None:
    volume = new_volume(ctx)
    scsi_driver.create_volume(volume)
    try:
        info = scsi_driver.initialize_connection(volume, {"host": "compute-1"})
        assert info["driver_volume_type"] == "local"
        path = info["data"]["device_path"]
        assert path.startswith("/dev/disk/by-id/"), path
        assert stat.S_ISBLK(os.stat(path).st_mode)
        assert LocalConnector(None).connect_volume(info["data"])["path"] == path
        with open(path, "r+b", buffering=0) as device:  # the volume's data through the LUN
            device.write(b"\x5c" * 4096)
            os.fsync(device.fileno())
        scsi_driver.terminate_connection(volume, {"host": "compute-1"})
        assert [e for e in sv.exports() if e.spec.volume == volume.name] == []
    finally:
        scsi_driver.delete_volume(volume)


@needs_scsi_exports
def test_storvisor_connector_gets_a_storvisor_connection(
    scsi_driver: Any, ctx: Any, sv: Client
) -> None:
    volume = new_volume(ctx)
    scsi_driver.create_volume(volume)
    brick.register()
    connector = {"host": "compute-1", **brick.StorvisorConnector.get_connector_properties(None)}
    try:
        info = scsi_driver.initialize_connection(volume, connector)
        assert info["driver_volume_type"] == "storvisor"
        data = ConnectionData.from_dict(info["data"])
        assert data.kind is ExportKind.SCSI
        assert data.path.startswith("/dev/disk/by-id/")
        assert stat.S_ISBLK(os.stat(data.path).st_mode)
    finally:
        scsi_driver.terminate_connection(volume, connector)
        scsi_driver.delete_volume(volume)
