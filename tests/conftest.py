"""Shared pytest set-up.

Debian's ``python3-libnbd`` lives in the system dist-packages; it is made importable for the
test process only (appended, so nothing else is shadowed). The ``home`` and ``pool`` fixtures
give engine-level tests a fresh ``Home`` with one small pool on a sparse file (the CLI tests
have a ``home`` directory fixture of their own). The ``requires(condition, reason)`` marker
skips a test whose prerequisite is missing, and fails it in CI (``prereq.require``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from prereq import require
from storvisor.engine.home import Home
from storvisor.engine.pool import Pool
from storvisor.engine.types import BackingSpec

_REPO = Path(__file__).resolve().parents[1]

# tests/openstack runs in its own process from .venv-openstack (make pytest-openstack sets
# STORVISOR_OPENSTACK_TESTS=1): importing Cinder patches eventlet and registers global options.
collect_ignore = [] if os.environ.get("STORVISOR_OPENSTACK_TESTS") == "1" else ["openstack"]

_DEBIAN_DIST = "/usr/lib/python3/dist-packages"
if _DEBIAN_DIST not in sys.path:
    sys.path.append(_DEBIAN_DIST)


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Home]:
    h = Home(tmp_path / "home")
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def pool(home: Home, tmp_path: Path) -> Pool:
    home.create_pool("p", [BackingSpec(str(tmp_path / "d0.img"), 256 << 20)], 64 << 10)
    return home.pool("p")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules that boot guests first, then those with slow tests (each in their own order):
    under ``pytest -n``, whose workers take whole modules as they become free, the longest
    work is handed out first instead of ending the run on one worker. (A module with both
    kinds of test is split by the sort; ``--dist loadfile`` still runs it on one worker.)"""
    items.sort(
        key=lambda item: (
            item.get_closest_marker("vm") is None,
            item.get_closest_marker("slow") is None,
        )
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("requires"):
        condition, reason = mark.args
        require(condition, reason)


_VHOST_BLK_BENCH = Path("shared", "tools", "vhost-blk-bench", "vhost-blk-bench.c")
VHOST_BLK_BENCH_SRC = next(
    (p / _VHOST_BLK_BENCH for p in _REPO.parents if (p / _VHOST_BLK_BENCH).is_file()),
    _REPO.parent / _VHOST_BLK_BENCH,
)
"""The C vhost-user-blk front-end's source: ``shared/tools`` beside the repository (or beside
one of its parent directories)."""


@pytest.fixture(scope="session")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``vhost-blk-bench`` compiled from ``VHOST_BLK_BENCH_SRC`` (once per session)."""
    require(VHOST_BLK_BENCH_SRC.is_file(), f"{VHOST_BLK_BENCH_SRC} is absent")
    cc = shutil.which("gcc") or shutil.which("cc")
    require(cc is not None, "no C compiler (Debian package gcc)")
    assert cc is not None
    out = tmp_path_factory.mktemp("bench") / "vhost-blk-bench"
    subprocess.run([cc, "-O2", "-o", str(out), str(VHOST_BLK_BENCH_SRC)], check=True)
    return out
