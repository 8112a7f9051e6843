"""Local SCSI LUN attachments (``storvisor_export_kind = scsi``).

The connection data with fixed inputs: the 'local' connection an unmodified Nova attaches,
the by-id path chosen among a LUN export's paths, the drive address the Nova driver records.
(A live SCSI export needs LIO, which the host lacks: ``guest_scsi.py`` drives the driver,
the connectors and Nova's driver on real LUNs in a guest.)
"""

from __future__ import annotations

import dataclasses

import pytest

from prereq import require_module

require_module("cinder", "the OpenStack virtualenv (make openstack-venv) is not in use")


# isort: split
from os_brick.initiator.connectors.local import LocalConnector  # noqa: E402

from storvisor.errors import InvalidArgument  # noqa: E402
from storvisor.integrations.libvirt.scsi import DriveAddress  # noqa: E402
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
