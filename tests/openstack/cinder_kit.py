"""Helpers of the OpenStack tests: the Cinder driver loaded the way cinder-volume loads it,
Cinder objects as the volume manager makes them, an image service over files, and NBD reads
and writes through libnbd."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path
from typing import Any

from prereq import require_module

require_module("cinder", "the OpenStack virtualenv (make openstack-venv) is not in use")

from cinder import context as cinder_context  # noqa: E402
from cinder import objects  # noqa: E402

objects.register_all()  # before cinder.volume.manager, whose annotations name the objects

from cinder.volume import configuration as cinder_configuration  # noqa: E402
from cinder.volume import manager  # noqa: E402
from oslo_config import cfg  # noqa: E402
from oslo_utils import importutils  # noqa: E402

MIB = 1 << 20
BACKEND = "storvisor-1"
DRIVER_PATH = "storvisor.integrations.openstack.cinder.StorvisorDriver"


def load_driver(conf_dir: Path, options: dict[str, str]) -> Any:
    """The driver as cinder-volume builds it: the back-end section of a cinder.conf parsed
    by oslo.config, ``Configuration(volume_backend_opts, config_group=BACKEND)``, and
    ``importutils.import_object`` of the ``volume_driver`` path with the manager's keyword
    arguments; then ``do_setup``."""
    lines = [
        "[DEFAULT]",
        f"enabled_backends = {BACKEND}",
        f"[{BACKEND}]",
        f"volume_driver = {DRIVER_PATH}",
        f"volume_backend_name = {BACKEND}",
        *(f"{k} = {v}" for k, v in options.items()),
    ]
    path = conf_dir / "cinder.conf"
    path.write_text("\n".join(lines) + "\n")
    cfg.CONF.reset()
    cfg.CONF(["--config-file", str(path)], project="cinder", validate_default_values=True)
    configuration = cinder_configuration.Configuration(
        manager.volume_backend_opts, config_group=BACKEND
    )
    driver = importutils.import_object(
        configuration.volume_driver,
        configuration=configuration,
        host=f"testhost@{BACKEND}",
        cluster_name=None,
        is_vol_db_empty=False,
        active_backend_id=None,
    )
    driver.do_setup(cinder_context.get_admin_context())
    return driver


def new_volume(ctx: Any, size: int = 1, **fields: Any) -> Any:
    """A Cinder ``Volume`` object as the volume manager hands it to a driver."""
    fields.setdefault("volume_type_id", None)
    fields.setdefault("encryption_key_id", None)
    return objects.Volume(
        ctx, id=str(uuid.uuid4()), size=size, _name_id=None, status="creating", **fields
    )


def new_snapshot(ctx: Any, volume: Any) -> Any:
    """A Cinder ``Snapshot`` object of ``volume``."""
    return objects.Snapshot(
        ctx,
        id=str(uuid.uuid4()),
        volume_id=volume.id,
        volume_size=volume.size,
        volume=volume,
        status="creating",
    )


# -- images: a Glance stand-in over files, qemu-img -------------------------------------------


class ImageStore:
    """An image service with Glance's ``download``/``update`` calls, over files in a directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, image_id: str) -> Path:
        return self.root / image_id

    def download(self, context: Any, image_id: str, data: Any = None) -> None:
        with open(self.path(image_id), "rb") as f:
            while chunk := f.read(MIB):
                data.write(chunk)

    def update(self, context: Any, image_id: str, image_meta: dict[str, Any], data: Any) -> None:
        with open(self.path(image_id), "wb") as f:
            while chunk := data.read(MIB):
                f.write(chunk)


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)


def make_image(images: ImageStore, size: int, fmt: str = "qcow2") -> tuple[str, Path]:
    """A ``fmt`` image of ``size`` bytes with data at 0, 7 MiB and its last MiB; its id and
    the raw original."""
    raw = images.root / f"original-{uuid.uuid4()}.raw"
    with open(raw, "wb") as f:
        f.truncate(size)
        for offset, byte in ((0, 1), (7 * MIB, 2), (size - MIB, 3)):
            f.seek(offset)
            f.write(bytes([byte]) * MIB)
    image_id = str(uuid.uuid4())
    made = qemu_img("convert", "-f", "raw", "-O", fmt, str(raw), str(images.path(image_id)))
    assert made.returncode == 0, made.stderr
    return image_id, raw


# -- the data path: NBD through libnbd (Debian's python3-libnbd) -------------------------------


def _nbd() -> Any:
    return require_module("nbd", "python3-libnbd is not installed (apt-get install python3-libnbd)")


def nbd_uri(connection_info: dict[str, Any]) -> str:
    """The Unix-socket NBD URI of a connection the driver returned."""
    assert connection_info["driver_volume_type"] == "storvisor"
    uris = connection_info["data"]["uris"]
    assert uris[0].startswith("nbd+unix:///"), uris
    return str(uris[0])


def pwrite(uri: str, data: bytes, offset: int) -> None:
    h = _nbd().NBD()
    h.connect_uri(uri)
    try:
        h.pwrite(data, offset)
        h.flush()
    finally:
        h.shutdown()


def pread(uri: str, length: int, offset: int) -> bytes:
    h = _nbd().NBD()
    h.connect_uri(uri)
    try:
        return bytes(h.pread(length, offset))
    finally:
        h.shutdown()


def export_size(uri: str) -> int:
    h = _nbd().NBD()
    h.connect_uri(uri)
    try:
        return int(h.get_size())
    finally:
        h.shutdown()
