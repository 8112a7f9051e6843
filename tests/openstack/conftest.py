"""Fixtures of the OpenStack tests: a live storvisor daemon in a temporary HOME and the Cinder
driver loaded the way cinder-volume loads it (``cinder_kit``).

These tests run in their own pytest process from ``.venv-openstack`` (``make
pytest-openstack``): importing Cinder patches eventlet and registers global oslo.config
options, which the main test run must not see.

``guest_*.py`` modules (SCSI LUNs need LIO, which the host kernel lacks) are collected the way
``tests/lio`` collects its own: one host-root guest runs a module's tests with this
interpreter (the OpenStack virtualenv, seen through the host root), and each host item
reports what its test did inside.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cli.cli_harness import CLI, Daemon
from lio.conftest import (  # noqa: F401 # hooks
    pytest_collect_file,
    pytest_collection_finish,
    pytest_pycollect_makemodule,
    pytest_sessionfinish,
    udev,
)
from prereq import require
from storvisor.api.client import Client


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


@pytest.fixture
def driver(storvisor_home: Path, tmp_path: Path) -> Any:
    from cinder_kit import load_driver  # Cinder only where a test asks for it

    drv = load_driver(
        tmp_path,
        {"storvisor_api_url": f"unix://{storvisor_home}/api.sock", "storvisor_pool": "p"},
    )
    drv.check_for_setup_error()
    return drv


@pytest.fixture
def ctx() -> Any:
    from cinder_kit import cinder_context

    return cinder_context.get_admin_context()


@pytest.fixture
def sv(storvisor_home: Path) -> Client:
    """A storvisor client of the same daemon, to check what the driver did."""
    return Client(storvisor_home / "api.sock")
