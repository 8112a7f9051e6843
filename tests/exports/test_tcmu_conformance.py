"""The block-device conformance suite through the TCMU export: ``TcmuBlockDevice`` (an
initiator on the kernel stand-in's ring) over a ``TcmuHandler``, over an in-memory device
and over thin volumes."""

from __future__ import annotations

import itertools
from pathlib import Path

from storvisor.engine.device import BlockDevice
from storvisor.engine.pool import Pool
from storvisor.exports.tcmu import TcmuHandler
from storvisor.protocols.scsi import LunIdentity
from storvisor.testing.conformance import check_block_device
from storvisor.testing.memory import MemoryDevice
from storvisor.testing.tcmu_kernel import TcmuBlockDevice, TcmuKernel


def _through_export(device: BlockDevice, root: Path) -> TcmuBlockDevice:
    root.mkdir()
    kernel = TcmuKernel(root, "storvisor/c", data_size=4 << 20)
    handler = TcmuHandler(
        device,
        "storvisor/c",
        identity=LunIdentity.for_volume(root.name),
        sysfs_root=kernel.sysfs_root,
        dev_root=kernel.dev_root,
        opener=kernel.open,
    )
    handler.start()

    def stop() -> None:
        handler.close()
        kernel.close()
        device.close()
        assert handler.error is None

    return TcmuBlockDevice(kernel, on_close=stop)


def test_memory_device_through_tcmu_conforms(tmp_path: Path) -> None:
    counter = itertools.count()
    check_block_device(
        lambda size: _through_export(MemoryDevice(size), tmp_path / f"m{next(counter)}")
    )


def test_thin_volume_through_tcmu_conforms(tmp_path: Path, pool: Pool) -> None:
    counter = itertools.count()

    def make(size: int) -> TcmuBlockDevice:
        n = next(counter)
        pool.create_volume(f"v{n}", size)
        return _through_export(pool.open_volume(f"v{n}"), tmp_path / f"t{n}")

    check_block_device(make)
