"""Fixtures of the S3 tests: a moto server per module (``s3server``), its credentials in the
standard AWS environment variables, a HOME."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from s3server import MotoServer, start, stop

from storvisor.engine.home import Home


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = start(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        yield server
    finally:
        stop(server.proc)


@pytest.fixture
def aws_env(moto: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> MotoServer:
    """The server's credentials in the standard environment variables (no other source)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto.secret)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    return moto


@pytest.fixture
def s3home(tmp_path: Path) -> Iterator[Home]:
    h = Home(tmp_path / "home")
    try:
        yield h
    finally:
        h.close()
