"""The os-brick connector, built and called by real os-brick code (``InitiatorConnector.factory``,
``get_connector_properties``) and by Cinder's own attach path, on the connection info the
driver returned, against a live daemon."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from prereq import require_module

require_module("os_brick", "the OpenStack virtualenv (make openstack-venv) is not in use")

from cinder_kit import nbd_uri, new_volume, pread, pwrite  # noqa: E402
from os_brick import exception as brick_exception  # noqa: E402
from os_brick.initiator import connector as brick_connector  # noqa: E402
from oslo_utils import importutils  # noqa: E402

from storvisor.integrations.openstack import brick  # noqa: E402

GIB = 1 << 30
MIB = 1 << 20
CONNECTOR = {"host": "compute-1"}


@pytest.fixture
def connector(storvisor_home: Path) -> Any:
    brick.register()
    return brick_connector.InitiatorConnector.factory(
        "storvisor", None, storvisor_api_url=f"unix://{storvisor_home}/api.sock"
    )


def test_register_makes_os_brick_build_the_connector(storvisor_home: Path) -> None:
    brick.register()
    brick.register()  # idempotent
    assert brick_connector.unix_connector_list.count(brick.CLASS_PATH) == 1
    for arch in ("x86_64", "s390x", "ppc64le"):
        assert brick_connector.get_connector_mapping(arch)["STORVISOR"] == brick.CLASS_PATH
    made = brick_connector.InitiatorConnector.factory("storvisor", None)
    assert isinstance(made, brick.StorvisorConnector)
    # get_connector_properties merges what each class of this list reports (the others run
    # iSCSI and NVMe tools as root, so only storvisor's is asked here, the way it asks)
    assert brick.CLASS_PATH in brick_connector._get_connector_list()
    cls = importutils.import_class(brick.CLASS_PATH)
    props = cls.get_connector_properties(
        None, host="compute-1", multipath=False, enforce_multipath=False, execute=None
    )
    assert props == {"storvisor_export_kinds": ["nbd", "vhost-user-blk", "scsi"]}


def test_connect_extend_paths_and_disconnect(
    driver: Any, ctx: Any, connector: Any, storvisor_home: Path
) -> None:
    volume = new_volume(ctx)
    driver.create_volume(volume)
    try:
        info = driver.initialize_connection(volume, CONNECTOR)
        device = connector.connect_volume(info["data"])
        assert device == {"type": "nbd", "path": nbd_uri(info)}
        pwrite(device["path"], b"brick" * 100, 0)
        assert connector.get_volume_paths(info["data"]) == [device["path"]]
        assert connector.check_valid_device(device["path"]) is True

        driver.extend_volume(volume, 2)
        assert connector.extend_volume(info["data"]) == 2 * GIB

        connector.disconnect_volume(info["data"], device)
        assert pread(device["path"], 500, 0) == b"brick" * 100  # the export is Cinder's
        driver.terminate_connection(volume, CONNECTOR)
        assert connector.get_volume_paths(info["data"]) == []
        assert connector.check_valid_device(device["path"]) is False
        with pytest.raises(brick_exception.VolumeDeviceNotFound, match=volume.name):
            connector.connect_volume(info["data"])
    finally:
        driver.delete_volume(volume)


def test_bad_connection_properties_are_a_brick_exception(connector: Any) -> None:
    with pytest.raises(brick_exception.BrickException, match="'export' is missing"):
        connector.connect_volume(
            {"volume_id": "v", "pool": "p", "volume": "v", "export_kind": "nbd", "uris": []}
        )
    with pytest.raises(brick_exception.BrickException, match="unknown export kind 'iscsi'"):
        connector.connect_volume(
            {
                "volume_id": "v",
                "pool": "p",
                "volume": "v",
                "export": "v",
                "export_kind": "iscsi",
                "uris": [],
            }
        )


def test_unreachable_daemon_is_a_brick_exception(tmp_path: Path) -> None:
    brick.register()
    conn = brick_connector.InitiatorConnector.factory(
        "storvisor", None, storvisor_api_url=f"unix://{tmp_path}/none.sock"
    )
    data = {
        "volume_id": "v",
        "pool": "p",
        "volume": "v",
        "export": "v",
        "export_kind": "nbd",
        "uris": ["nbd+unix:///v?socket=/x"],
    }
    with pytest.raises(brick_exception.BrickException, match="no answer from the daemon"):
        conn.connect_volume(data)


def test_cinder_attach_path_uses_the_connector(
    driver: Any, ctx: Any, storvisor_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cinder's generic ``_attach_volume`` / ``_detach_volume`` (its image and backup copy
    path) reach the volume through os-brick and this connector."""
    monkeypatch.setenv("STORVISOR_API_URL", f"unix://{storvisor_home}/api.sock")
    brick.register()
    volume = new_volume(ctx)
    driver.create_volume(volume)
    try:
        attach_info, _ = driver._attach_volume(ctx, volume, CONNECTOR)
        path = attach_info["device"]["path"]
        assert attach_info["device"]["type"] == "nbd"
        pwrite(path, b"\x77" * MIB, MIB)
        assert pread(path, MIB, MIB) == b"\x77" * MIB
        driver._detach_volume(ctx, attach_info, volume, CONNECTOR)
        assert connector_paths(storvisor_home, attach_info) == []
    finally:
        driver.delete_volume(volume)


def connector_paths(storvisor_home: Path, attach_info: dict[str, Any]) -> list[str]:
    conn = brick_connector.InitiatorConnector.factory(
        "storvisor", None, storvisor_api_url=f"unix://{storvisor_home}/api.sock"
    )
    paths: list[str] = conn.get_volume_paths(attach_info["conn"]["data"])
    return paths
