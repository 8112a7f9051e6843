"""The Cinder driver, loaded the way cinder-volume loads it, with real Cinder objects against a
live storvisor daemon; every minimum feature, the data checked through NBD."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest

from prereq import require_module

require_module("cinder", "the OpenStack virtualenv (make openstack-venv) is not in use")

from cinder import exception, objects  # noqa: E402
from cinder.interface import util as interface_util  # noqa: E402
from cinder.interface import volume_driver  # noqa: E402
from cinder_kit import (  # noqa: E402
    DRIVER_PATH,
    ImageStore,
    export_size,
    load_driver,
    make_image,
    nbd_uri,
    new_snapshot,
    new_volume,
    pread,
    pwrite,
    qemu_img,
)

from storvisor.api.client import Client  # noqa: E402
from storvisor.api.qos import QosKey  # noqa: E402
from storvisor.errors import NotFound  # noqa: E402
from storvisor.integrations.openstack.backend import ExportKind  # noqa: E402
from storvisor.integrations.openstack.cinder import StorvisorDriver  # noqa: E402
from storvisor.integrations.openstack.connection import ConnectionData  # noqa: E402

GIB = 1 << 30
MIB = 1 << 20
CONNECTOR = {"host": "compute-1", "initiator": "iqn.2026-01.test:compute-1"}


def attach(driver: Any, volume: Any) -> str:
    return nbd_uri(driver.initialize_connection(volume, CONNECTOR))


def names(sv: Client) -> set[str]:
    return {v.name for v in sv.volumes("p")}


# -- loading and compliance -------------------------------------------------------------------


def test_driver_passes_cinder_interface_compliance() -> None:
    drivers = [d for d in interface_util.get_volume_drivers() if d.cls is StorvisorDriver]
    assert len(drivers) == 1, "StorvisorDriver is not registered by @interface.volumedriver"
    assert issubclass(drivers[0].cls, volume_driver.VolumeDriverCore)
    assert drivers[0].version == StorvisorDriver.VERSION
    assert f"{StorvisorDriver.__module__}.{StorvisorDriver.__name__}" == DRIVER_PATH


def test_loaded_driver_reads_its_section_of_cinder_conf(driver: Any) -> None:
    assert isinstance(driver, StorvisorDriver)
    assert driver.configuration.storvisor_pool == "p"
    assert driver.configuration.storvisor_export_kind == "nbd"
    assert driver.configuration.storvisor_vhost_socket_dir == "/run/storvisor"


def test_volume_stats_report_the_pool_thin_and_qos(driver: Any, ctx: Any, sv: Client) -> None:
    volume = new_volume(ctx, size=2)
    driver.create_volume(volume)
    try:
        stats = driver.get_volume_stats(refresh=True)
        assert stats["volume_backend_name"] == "storvisor-1"
        assert stats["vendor_name"] == "storvisor"
        assert stats["driver_version"] == StorvisorDriver.VERSION
        assert stats["storage_protocol"] == "storvisor"
        (pool,) = stats["pools"]
        info = sv.pool_info("p")
        assert pool["pool_name"] == "p"
        assert pool["total_capacity_gb"] == round(info.stats.capacity / GIB, 2) == 4.0
        assert pool["free_capacity_gb"] == round(info.stats.free / GIB, 2)
        assert pool["provisioned_capacity_gb"] == round(info.stats.provisioned / GIB, 2) >= 2
        assert pool["total_volumes"] == len(sv.volumes("p"))
        assert pool["thin_provisioning_support"] is True
        assert pool["thick_provisioning_support"] is False
        assert pool["QoS_support"] is True
        assert pool["online_extend_support"] is True
    finally:
        driver.delete_volume(volume)


# -- bad configuration and a daemon that is not there ----------------------------------------


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"storvisor_api_url": "http://host:1"}, "expected unix:///PATH or https://HOST:PORT"),
        ({"storvisor_api_url": "unix://relative"}, "expected unix:///PATH"),
        ({"storvisor_api_url": "https://host:8443"}, "token file"),
        (
            {"storvisor_api_url": "https://host:8443", "storvisor_token_file": "/nonexistent/t"},
            "cannot read the API token file /nonexistent/t",
        ),
    ],
)
def test_bad_options_are_an_invalid_configuration_value(
    tmp_path: Path, options: dict[str, str], fragment: str
) -> None:
    with pytest.raises(exception.InvalidConfigurationValue) as e:
        load_driver(tmp_path, {"storvisor_pool": "p", **options})
    assert fragment in str(e.value)
    assert "storvisor-1" in str(e.value)


def test_unreachable_daemon_is_a_backend_api_exception(tmp_path: Path, ctx: Any) -> None:
    drv = load_driver(tmp_path, {"storvisor_api_url": f"unix://{tmp_path}/none.sock"})
    with pytest.raises(exception.VolumeBackendAPIException) as e:
        drv.check_for_setup_error()
    assert f"no answer from the daemon at {tmp_path}/none.sock" in str(e.value)
    with pytest.raises(exception.VolumeBackendAPIException):
        drv.create_volume(new_volume(ctx))


def test_missing_pool_is_a_backend_api_exception(
    storvisor_home: Path, tmp_path: Path, ctx: Any, sv: Client
) -> None:
    drv = load_driver(
        tmp_path,
        {"storvisor_api_url": f"unix://{storvisor_home}/api.sock", "storvisor_pool": "nope"},
    )
    with pytest.raises(exception.VolumeBackendAPIException, match="no pool named 'nope'"):
        drv.check_for_setup_error()
    volume = new_volume(ctx)
    with pytest.raises(exception.VolumeBackendAPIException, match="no pool named 'nope'"):
        drv.create_volume(volume)
    with pytest.raises(exception.VolumeBackendAPIException, match="no pool named 'nope'"):
        drv.delete_volume(volume)  # a missing pool is not "already deleted"
    assert volume.name not in names(sv)


# -- volumes ----------------------------------------------------------------------------------


def test_create_and_delete_volume(driver: Any, ctx: Any, sv: Client) -> None:
    volume = new_volume(ctx, size=3)
    assert driver.create_volume(volume) is None
    info = sv.volume_info("p", volume.name)
    assert info.size == 3 * GIB
    assert info.allocated == 0  # thin
    driver.delete_volume(volume)
    assert volume.name not in names(sv)
    driver.delete_volume(volume)  # already gone: still a success


def test_deleted_volume_data_never_shows_in_a_new_volume(driver: Any, ctx: Any) -> None:
    old = new_volume(ctx)
    driver.create_volume(old)
    secret = b"\x5a" * MIB
    pwrite(attach(driver, old), secret, 0)
    driver.terminate_connection(old, CONNECTOR)
    driver.delete_volume(old)
    new = new_volume(ctx)
    driver.create_volume(new)
    try:
        uri = attach(driver, new)
        assert pread(uri, MIB, 0) == bytes(MIB)
        assert pread(uri, MIB, GIB - MIB) == bytes(MIB)
    finally:
        driver.terminate_connection(new, CONNECTOR)
        driver.delete_volume(new)


def test_attach_write_detach_and_force_detach(driver: Any, ctx: Any, sv: Client) -> None:
    volume = new_volume(ctx)
    driver.create_volume(volume)
    try:
        info = driver.initialize_connection(volume, CONNECTOR)
        data = ConnectionData.from_dict(info["data"])
        assert data.volume_id == volume.id
        assert (data.pool, data.volume, data.kind) == ("p", volume.name, ExportKind.NBD)
        uri = nbd_uri(info)
        pwrite(uri, b"cinder" * 1000, 4096)
        # a second initialize_connection (another attachment) reuses the export
        assert driver.initialize_connection(volume, CONNECTOR) == info
        assert pread(uri, 6000, 4096) == b"cinder" * 1000

        driver.terminate_connection(volume, CONNECTOR)
        assert [e for e in sv.exports() if e.spec.volume == volume.name] == []
        driver.terminate_connection(volume, CONNECTOR)  # already detached: no error

        # force-detach: connector None removes every export of the volume
        driver.initialize_connection(volume, CONNECTOR)
        sv.export_nbd("p", volume.name, name=f"other-{volume.id}")
        driver.terminate_connection(volume, None)
        assert [e for e in sv.exports() if e.spec.volume == volume.name] == []

        again = attach(driver, volume)
        assert pread(again, 6000, 4096) == b"cinder" * 1000  # the data outlived the exports
        driver.terminate_connection(volume, CONNECTOR)
    finally:
        driver.delete_volume(volume)


def test_deleting_an_attached_volume_is_volume_is_busy(driver: Any, ctx: Any, sv: Client) -> None:
    volume = new_volume(ctx)
    driver.create_volume(volume)
    driver.initialize_connection(volume, CONNECTOR)
    with pytest.raises(exception.VolumeIsBusy) as e:
        driver.delete_volume(volume)
    assert "is exported" in str(e.value) or "in use" in str(e.value), str(e.value)
    assert volume.name in names(sv)  # nothing was deleted
    driver.terminate_connection(volume, CONNECTOR)
    driver.delete_volume(volume)
    assert volume.name not in names(sv)


def test_extend_online(driver: Any, ctx: Any, sv: Client) -> None:
    volume = new_volume(ctx)
    driver.create_volume(volume)
    try:
        uri = attach(driver, volume)
        pwrite(uri, b"\x11" * MIB, 0)
        driver.extend_volume(volume, 3)  # while attached
        assert sv.volume_info("p", volume.name).size == 3 * GIB
        assert export_size(uri) == 3 * GIB
        pwrite(uri, b"\x22" * MIB, 3 * GIB - MIB)
        assert pread(uri, MIB, 0) == b"\x11" * MIB
        assert pread(uri, MIB, 3 * GIB - MIB) == b"\x22" * MIB
        assert pread(uri, MIB, GIB) == bytes(MIB)
        with pytest.raises(exception.VolumeBackendAPIException, match="shrinking"):
            driver.extend_volume(volume, 2)
        driver.terminate_connection(volume, CONNECTOR)
    finally:
        driver.delete_volume(volume)


# -- snapshots and clones ---------------------------------------------------------------------


def test_snapshot_and_volume_from_snapshot_with_a_larger_size(
    driver: Any, ctx: Any, sv: Client
) -> None:
    source = new_volume(ctx)
    driver.create_volume(source)
    uri = attach(driver, source)
    pwrite(uri, b"\xaa" * MIB, 0)
    pwrite(uri, b"\xbb" * MIB, GIB - MIB)
    snapshot = new_snapshot(ctx, source)
    driver.create_snapshot(snapshot)
    assert [s.name for s in sv.snapshots("p", source.name)] == [snapshot.name]
    pwrite(uri, b"\xcc" * MIB, 0)  # after the snapshot: not in it
    driver.terminate_connection(source, CONNECTOR)

    copy = new_volume(ctx, size=2)
    driver.create_volume_from_snapshot(copy, snapshot)
    info = sv.volume_info("p", copy.name)
    assert info.size == 2 * GIB
    assert info.origin is None  # flattened: the snapshot has no dependents
    curi = attach(driver, copy)
    assert pread(curi, MIB, 0) == b"\xaa" * MIB
    assert pread(curi, MIB, GIB - MIB) == b"\xbb" * MIB
    assert pread(curi, MIB, 2 * GIB - MIB) == bytes(MIB)
    pwrite(curi, b"\xdd" * MIB, 0)  # writes to the copy stay in the copy
    driver.terminate_connection(copy, CONNECTOR)

    driver.delete_snapshot(snapshot)
    assert sv.snapshots("p", source.name) == []
    driver.delete_snapshot(snapshot)  # already gone: still a success
    assert pread(attach(driver, source), MIB, 0) == b"\xcc" * MIB
    driver.terminate_connection(source, CONNECTOR)
    assert pread(attach(driver, copy), MIB, 0) == b"\xdd" * MIB
    driver.terminate_connection(copy, CONNECTOR)
    driver.delete_volume(copy)
    driver.delete_volume(source)


def test_deleting_an_exported_snapshot_is_snapshot_is_busy(
    driver: Any, ctx: Any, sv: Client
) -> None:
    volume = new_volume(ctx)
    driver.create_volume(volume)
    snapshot = new_snapshot(ctx, volume)
    driver.create_snapshot(snapshot)
    sv.export_nbd("p", volume.name, snapshot.name, name=f"backup-{snapshot.id}")
    with pytest.raises(exception.SnapshotIsBusy) as e:
        driver.delete_snapshot(snapshot)
    assert snapshot.name in str(e.value)
    assert [s.name for s in sv.snapshots("p", volume.name)] == [snapshot.name]
    sv.remove_export(f"backup-{snapshot.id}")
    driver.delete_snapshot(snapshot)
    driver.delete_volume(volume)


def test_a_snapshot_with_a_linked_clone_is_busy(driver: Any, ctx: Any, sv: Client) -> None:
    """A linked clone made outside Cinder (``storvisor volume clone``) keeps its snapshot in
    use: deleting the snapshot is ``SnapshotIsBusy``, deleting its volume ``VolumeIsBusy``,
    and both stay as they were."""
    volume = new_volume(ctx)
    driver.create_volume(volume)
    snapshot = new_snapshot(ctx, volume)
    driver.create_snapshot(snapshot)
    linked = f"linked-{volume.id}"
    sv.clone("p", volume.name, snapshot.name, linked)
    try:
        with pytest.raises(exception.SnapshotIsBusy) as e:
            driver.delete_snapshot(snapshot)
        assert f"has clones ({linked})" in str(e.value)
        with pytest.raises(exception.VolumeIsBusy) as e2:
            driver.delete_volume(volume)
        assert f"has clones ({linked})" in str(e2.value)
        assert [s.name for s in sv.snapshots("p", volume.name)] == [snapshot.name]
        assert {volume.name, linked} <= names(sv)
    finally:
        sv.delete_volume("p", linked)
    driver.delete_snapshot(snapshot)
    driver.delete_volume(volume)
    assert volume.name not in names(sv)


def test_clone_volume(driver: Any, ctx: Any, sv: Client) -> None:
    source = new_volume(ctx)
    driver.create_volume(source)
    uri = attach(driver, source)
    pwrite(uri, b"\x42" * MIB, 5 * MIB)
    clone = new_volume(ctx, size=2)
    driver.create_cloned_volume(clone, source)  # while the source is attached
    assert sv.snapshots("p", source.name) == []  # the temporary snapshot is gone
    assert sv.volume_info("p", clone.name).origin is None
    assert sv.volume_info("p", clone.name).size == 2 * GIB
    pwrite(uri, b"\x43" * MIB, 5 * MIB)  # the source moves on
    driver.terminate_connection(source, CONNECTOR)
    curi = attach(driver, clone)
    assert pread(curi, MIB, 5 * MIB) == b"\x42" * MIB
    assert pread(curi, MIB, 2 * GIB - MIB) == bytes(MIB)
    driver.terminate_connection(clone, CONNECTOR)
    driver.delete_volume(source)  # the clone does not depend on it
    assert pread(attach(driver, clone), MIB, 5 * MIB) == b"\x42" * MIB
    driver.terminate_connection(clone, CONNECTOR)
    driver.delete_volume(clone)


def test_failed_clone_leaves_nothing_behind(driver: Any, ctx: Any, sv: Client) -> None:
    missing = new_volume(ctx)
    clone = new_volume(ctx)
    before = names(sv)
    with pytest.raises(exception.VolumeBackendAPIException, match="no volume"):
        driver.create_cloned_volume(clone, missing)
    assert names(sv) == before


# -- QoS --------------------------------------------------------------------------------------


def typed_volume(ctx: Any, consumer: str, specs: dict[str, str]) -> Any:
    qos = objects.QualityOfServiceSpecs(
        ctx, id=str(uuid.uuid4()), name="gold", consumer=consumer, specs=specs
    )
    vtype = objects.VolumeType(
        ctx, id=str(uuid.uuid4()), name="fast", qos_specs_id=qos.id, qos_specs=qos
    )
    return new_volume(ctx, volume_type_id=vtype.id, volume_type=vtype)


@pytest.mark.parametrize("consumer", ["back-end", "both"])
def test_back_end_qos_specs_are_applied_by_storvisor(
    driver: Any, ctx: Any, sv: Client, consumer: str
) -> None:
    volume = typed_volume(
        ctx, consumer, {"total_iops_sec": "500", "read_bytes_sec_per_gb": "1048576"}
    )
    driver.create_volume(volume)
    try:
        qos = sv.volume_qos("p", volume.name)
        assert set(qos.keys) == {
            QosKey("read_bytes_sec_per_gb", "1048576"),
            QosKey("total_iops_sec", "500"),
        }
    finally:
        driver.delete_volume(volume)


def test_front_end_qos_specs_are_left_to_nova(driver: Any, ctx: Any, sv: Client) -> None:
    volume = typed_volume(ctx, "front-end", {"total_iops_sec": "500"})
    driver.create_volume(volume)
    try:
        assert sv.volume_qos("p", volume.name).keys == ()
    finally:
        driver.delete_volume(volume)


def test_qos_of_a_volume_from_snapshot_and_a_clone(driver: Any, ctx: Any, sv: Client) -> None:
    source = new_volume(ctx)
    driver.create_volume(source)
    snapshot = new_snapshot(ctx, source)
    driver.create_snapshot(snapshot)
    copy = typed_volume(ctx, "back-end", {"write_iops_sec": "100"})
    driver.create_volume_from_snapshot(copy, snapshot)
    clone = typed_volume(ctx, "back-end", {"read_iops_sec": "200"})
    driver.create_cloned_volume(clone, source)
    assert sv.volume_qos("p", copy.name).keys == (QosKey("write_iops_sec", "100"),)
    assert sv.volume_qos("p", clone.name).keys == (QosKey("read_iops_sec", "200"),)
    for volume in (copy, clone):
        driver.delete_volume(volume)
    driver.delete_snapshot(snapshot)
    driver.delete_volume(source)


def test_bad_qos_spec_is_invalid_qos_specs_and_no_volume_is_left(
    driver: Any, ctx: Any, sv: Client
) -> None:
    volume = typed_volume(ctx, "back-end", {"total_iops_sec": "lots"})
    with pytest.raises(exception.InvalidQoSSpecs, match="total_iops_sec"):
        driver.create_volume(volume)
    assert volume.name not in names(sv)
    with pytest.raises(NotFound):
        sv.volume_qos("p", volume.name)


# -- images -----------------------------------------------------------------------------------


@pytest.fixture
def images(tmp_path: Path, tools: None) -> ImageStore:
    root = tmp_path / "images"
    root.mkdir()
    return ImageStore(root)


def test_image_round_trip(driver: Any, ctx: Any, sv: Client, images: ImageStore) -> None:
    image_id, raw = make_image(images, 64 * MIB)
    volume = new_volume(ctx)
    driver.create_volume(volume)
    try:
        driver.copy_image_to_volume(ctx, volume, images, image_id)
        assert [e for e in sv.exports() if e.spec.volume == volume.name] == []
        info = sv.volume_info("p", volume.name)
        assert info.size == GIB
        assert info.allocated <= 4 * MIB  # sparse: only the written MiBs (and a cluster each)
        uri = attach(driver, volume)
        assert pread(uri, MIB, 7 * MIB) == b"\x02" * MIB
        assert pread(uri, MIB, 63 * MIB) == b"\x03" * MIB
        assert pread(uri, MIB, 64 * MIB) == bytes(MIB)
        driver.terminate_connection(volume, CONNECTOR)

        with open(raw, "r+b") as f:
            f.truncate(GIB)  # what the volume holds: the image, then zeros
        for disk_format, fmt in (("qcow2", "qcow2"), ("raw", "raw"), ("vhd", "vpc")):
            out = str(uuid.uuid4())
            meta = {"id": out, "disk_format": disk_format, "container_format": "bare"}
            driver.copy_volume_to_image(ctx, volume, images, meta)
            check = qemu_img("info", "--output=json", str(images.path(out)))
            assert f'"format": "{fmt}"' in check.stdout
            compared = qemu_img("compare", "-f", fmt, "-F", "raw", str(images.path(out)), str(raw))
            assert compared.returncode == 0, compared.stdout + compared.stderr
        assert [e for e in sv.exports() if e.spec.volume == volume.name] == []
    finally:
        driver.delete_volume(volume)


def test_image_larger_than_the_volume_is_unacceptable(
    driver: Any, ctx: Any, sv: Client, images: ImageStore
) -> None:
    image_id, _ = make_image(images, 2 * GIB)
    volume = new_volume(ctx)
    driver.create_volume(volume)
    try:
        with pytest.raises(exception.ImageUnacceptable, match="exceeds the 1 GiB volume"):
            driver.copy_image_to_volume(ctx, volume, images, image_id)
        assert sv.volume_info("p", volume.name).allocated == 0
    finally:
        driver.delete_volume(volume)


def test_image_with_a_backing_file_is_unacceptable(
    driver: Any, ctx: Any, images: ImageStore
) -> None:
    base_id, _ = make_image(images, 16 * MIB)
    image_id = str(uuid.uuid4())
    made = qemu_img(
        "create", "-f", "qcow2", "-b", str(images.path(base_id)), "-F", "qcow2",
        str(images.path(image_id)),
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    volume = new_volume(ctx)
    driver.create_volume(volume)
    try:
        with pytest.raises(exception.ImageUnacceptable, match="backing file"):
            driver.copy_image_to_volume(ctx, volume, images, image_id)
    finally:
        driver.delete_volume(volume)


def test_unsupported_disk_format_is_unacceptable(driver: Any, ctx: Any, images: ImageStore) -> None:
    volume = new_volume(ctx)
    driver.create_volume(volume)
    try:
        meta = {"id": str(uuid.uuid4()), "disk_format": "iso"}
        with pytest.raises(exception.ImageUnacceptable, match="unsupported disk format 'iso'"):
            driver.copy_volume_to_image(ctx, volume, images, meta)
        assert not images.path(meta["id"]).exists()
    finally:
        driver.delete_volume(volume)


# -- vhost-user-blk attachments ---------------------------------------------------------------


def test_vhost_user_blk_attachment(
    request: pytest.FixtureRequest, storvisor_home: Path, tmp_path: Path, ctx: Any, sv: Client
) -> None:
    sockets = Path(tempfile.mkdtemp(prefix="sv-", dir="/tmp"))  # AF_UNIX paths are short
    request.addfinalizer(lambda: shutil.rmtree(sockets))
    drv = load_driver(
        tmp_path,
        {
            "storvisor_api_url": f"unix://{storvisor_home}/api.sock",
            "storvisor_pool": "p",
            "storvisor_export_kind": "vhost-user-blk",
            "storvisor_vhost_socket_dir": str(sockets),
        },
    )
    volume = new_volume(ctx)
    drv.create_volume(volume)
    try:
        info = drv.initialize_connection(volume, CONNECTOR)
        data = ConnectionData.from_dict(info["data"])
        assert data.kind is ExportKind.VHOST_USER_BLK
        assert data.uris == (str(sockets / f"{volume.name}.sock"),)
        assert (sockets / f"{volume.name}.sock").is_socket()
        drv.terminate_connection(volume, None)
        assert [e for e in sv.exports() if e.spec.volume == volume.name] == []
    finally:
        drv.delete_volume(volume)
