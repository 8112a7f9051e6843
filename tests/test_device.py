from __future__ import annotations

from pathlib import Path

import pytest

from storvisor.engine.device import BlockDevice, FileDevice
from storvisor.errors import InvalidArgument
from storvisor.testing.conformance import check_block_device
from storvisor.testing.memory import MemoryDevice
from storvisor.units import format_size, parse_size


def test_memory_device_conforms() -> None:
    check_block_device(MemoryDevice)


def test_file_device_conforms(tmp_path: Path) -> None:
    counter = iter(range(1000))

    def make(size: int) -> BlockDevice:
        path = tmp_path / f"raw{next(counter)}.img"
        with open(path, "wb") as f:
            f.truncate(size)
        return FileDevice(str(path))

    check_block_device(make)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("512", 512),
        ("64K", 65536),
        ("64k", 65536),
        ("1M", 1 << 20),
        ("1.5G", 3 << 29),
        ("2T", 2 << 40),
        ("4KiB", 4096),
        ("10GB", 10 << 30),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "-1", "1X", "0.3", "1.5.2G", "G"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_size(text)


def test_format_size() -> None:
    assert format_size(1 << 30) == "1G"
    assert format_size(1536 << 20) == "1536M"
    assert format_size(1000) == "1000"
