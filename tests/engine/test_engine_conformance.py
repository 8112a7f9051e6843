"""The block-device conformance suite against every kind of thin volume."""

from __future__ import annotations

from itertools import count
from pathlib import Path

import pytest

from storvisor.engine.device import BlockDevice
from storvisor.engine.home import Home
from storvisor.engine.pool import Pool
from storvisor.engine.types import BackingSpec
from storvisor.testing.conformance import check_block_device


@pytest.mark.parametrize("cluster_size", [4096, 64 << 10, 1 << 20])
def test_thin_volume_conforms(home: Home, tmp_path: Path, cluster_size: int) -> None:
    home.create_pool("c", [BackingSpec(str(tmp_path / "c.img"), 64 << 20)], cluster_size)
    pool = home.pool("c")
    names = count()

    def make(size: int) -> BlockDevice:
        name = f"v{next(names)}"
        pool.create_volume(name, size)
        return pool.open_volume(name)

    check_block_device(make)
    assert pool.fsck().clean


def test_clone_of_snapshot_conforms(pool: Pool) -> None:
    names = count()

    def make(size: int) -> BlockDevice:
        n = next(names)
        pool.create_volume(f"base{n}", size)
        pool.create_snapshot(f"base{n}", "s")
        pool.clone(f"base{n}", "s", f"clone{n}")
        return pool.open_volume(f"clone{n}")

    check_block_device(make)
    assert pool.fsck().clean


def test_volume_with_deep_snapshot_chain_conforms(pool: Pool) -> None:
    names = count()

    def make(size: int) -> BlockDevice:
        name = f"deep{next(names)}"
        pool.create_volume(name, size)
        for depth in range(10):
            handle = pool.open_volume(name)
            handle.write(depth * 4096, bytes(4096))  # zeros: the device must still read as zeros
            handle.close()
            pool.create_snapshot(name, f"s{depth}")
        return pool.open_volume(name)

    check_block_device(make)
    assert pool.fsck().clean


def test_volume_on_two_backing_devices_conforms(home: Home, tmp_path: Path) -> None:
    # the first device holds fewer clusters than one volume needs, so data spans both
    specs = [BackingSpec(str(tmp_path / "lun0.img"), 3 << 20)]
    specs.append(BackingSpec(str(tmp_path / "lun1.img"), 64 << 20))
    home.create_pool("two", specs, 64 << 10)
    pool = home.pool("two")
    names = count()

    def make(size: int) -> BlockDevice:
        name = f"v{next(names)}"
        pool.create_volume(name, size)
        return pool.open_volume(name)

    check_block_device(make)
    assert pool.fsck().clean
