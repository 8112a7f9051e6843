"""``Home`` reports a pool that cannot open as offline with the reason, keeps the others
usable, and ``reopen_pool`` opens it once its device is back."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from storvisor.engine.home import Home, PoolOffline
from storvisor.engine.types import BackingSpec, PoolState
from storvisor.errors import CorruptMetadata, NotFound

MB = 1 << 20


def _two(tmp_path: Path) -> Path:
    with Home(tmp_path / "home") as home:
        home.create_pool("a", [BackingSpec(str(tmp_path / "a.img"), 8 * MB)])
        home.create_pool("b", [BackingSpec(str(tmp_path / "b.img"), 8 * MB)])
        home.pool("b").create_volume("v", MB)
    return tmp_path / "home"


def test_a_missing_device_makes_its_pool_offline_until_reopened(tmp_path: Path) -> None:
    path = _two(tmp_path)
    os.rename(tmp_path / "b.img", tmp_path / "b.away")
    with Home(path) as home:
        infos = {p.name: p for p in home.pools()}
        assert infos["a"].state is PoolState.ONLINE and infos["a"].reason == ""
        b = infos["b"]
        assert b.state is PoolState.OFFLINE
        assert b.reason == f"backing device {tmp_path}/b.img is missing"
        assert [x.path for x in b.backings] == [str(tmp_path / "b.img")]
        assert b.cluster_size == 64 << 10 and b.stats.capacity == 0
        with pytest.raises(PoolOffline, match=r"^pool 'b' is offline: backing device") as e:
            home.pool("b")
        assert isinstance(e.value, CorruptMetadata)
        assert home.pool_info("b") == b
        with pytest.raises(NotFound):
            home.pool_info("nope")
        home.pool("a").create_volume("w", MB)  # the other pool works

        with pytest.raises(PoolOffline, match="is missing"):
            home.reopen_pool("b")
        os.rename(tmp_path / "b.away", tmp_path / "b.img")
        assert home.pools()[1].state is PoolState.OFFLINE  # no retry until asked
        info = home.reopen_pool("b")
        assert (info.state, info.reason) == (PoolState.ONLINE, "")
        assert [v.name for v in home.pool("b").volumes()] == ["v"]
        assert home.pool("b").fsck().clean


def test_a_device_shorter_than_recorded_is_offline(tmp_path: Path) -> None:
    path = _two(tmp_path)
    with Home(path) as home:  # grown devices record their new size
        home.pool("b").add_backing(BackingSpec(str(tmp_path / "b.img"), 16 * MB))
    os.truncate(tmp_path / "b.img", 8 * MB)
    with Home(path) as home:
        b = home.pool_info("b")
        assert b.state is PoolState.OFFLINE
        assert b.reason == (
            f"backing device {tmp_path}/b.img is shorter than recorded "
            f"({8 * MB} bytes, {16 * MB} expected)"
        )
        os.truncate(tmp_path / "b.img", 16 * MB)
        assert home.reopen_pool("b").state is PoolState.ONLINE


def test_an_offline_pool_is_deleted_only_with_force(tmp_path: Path) -> None:
    path = _two(tmp_path)
    os.unlink(tmp_path / "b.img")
    with Home(path) as home:
        with pytest.raises(PoolOffline):
            home.delete_pool("b")
        home.delete_pool("b", force=True)
        assert [p.name for p in home.pools()] == ["a"]
