"""Fixtures for engine tests: a fresh ``Home`` with one small pool on a sparse file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from storvisor.engine.home import Home
from storvisor.engine.pool import Pool
from storvisor.engine.types import BackingSpec


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
