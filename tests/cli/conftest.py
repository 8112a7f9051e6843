"""Fixtures for the CLI tests (the harness itself is ``cli_harness``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_harness import CLI, Daemon


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def cli(home: Path) -> CLI:
    return CLI(home)


@pytest.fixture
def daemon(home: Path) -> Iterator[Daemon]:
    d = Daemon(home).start()
    try:
        yield d
    finally:
        d.kill()
