"""Fixtures of the OpenStack tests: a live storvisor daemon in a temporary HOME and the Cinder
driver loaded the way cinder-volume loads it.

These tests run in their own pytest process from ``.venv-openstack`` (``make
pytest-openstack``): importing Cinder patches eventlet and registers global oslo.config
options, which the main test run must not see.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cli.cli_harness import CLI, Daemon
from prereq import require, require_module

require_module("cinder", "the OpenStack virtualenv (make openstack-venv) is not in use")

from cinder import context as cinder_context  # noqa: E402
from cinder import objects  # noqa: E402

objects.register_all()  # before cinder.volume.manager, whose annotations name the objects

from cinder.volume import configuration as cinder_configuration  # noqa: E402
from cinder.volume import manager  # noqa: E402
from oslo_config import cfg  # noqa: E402
from oslo_utils import importutils  # noqa: E402

BACKEND = "storvisor-1"
DRIVER_PATH = "storvisor.integrations.openstack.cinder.StorvisorDriver"


@pytest.fixture(scope="session")
def tools() -> None:
    for tool in ("qemu-img", "qemu-io"):
        require(shutil.which(tool), f"{tool} is not installed (apt-get install qemu-utils)")


@pytest.fixture(scope="module")
def storvisor_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A running daemon whose HOME has the pool ``p`` (4 GiB, sparse)."""
    tmp = tmp_path_factory.mktemp("storvisor")
    home = tmp / "home"
    CLI(home)("pool", "create", "p", "--backing", f"{tmp}/disk.img:4G")
    daemon = Daemon(home).start()
    try:
        yield home
    finally:
        daemon.stop()


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


@pytest.fixture
def driver(storvisor_home: Path, tmp_path: Path) -> Any:
    drv = load_driver(
        tmp_path,
        {"storvisor_api_url": f"unix://{storvisor_home}/api.sock", "storvisor_pool": "p"},
    )
    drv.check_for_setup_error()
    return drv


@pytest.fixture
def ctx() -> Any:
    return cinder_context.get_admin_context()


def new_volume(ctx: Any, size: int = 1, **fields: Any) -> Any:
    """A Cinder ``Volume`` object as the volume manager hands it to a driver."""
    fields.setdefault("volume_type_id", None)
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
