"""fsck on clean pools and on pools whose catalog or devices were corrupted by hand."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from storvisor.engine.backing import PHYS_SHIFT
from storvisor.engine.home import Home
from storvisor.engine.types import BackingSpec, FsckReport

CS = 64 << 10


def build(home_dir: Path, tmp_path: Path) -> None:
    """A pool with a volume, a snapshot, a clone and data in each layer."""
    with Home(home_dir) as home:
        home.create_pool("p", [BackingSpec(str(tmp_path / "d0.img"), 32 << 20)], CS)
        pool = home.pool("p")
        pool.create_volume("v", 4 << 20)
        handle = pool.open_volume("v")
        handle.write(0, b"v" * 3 * CS)
        pool.create_snapshot("v", "s")
        handle.write(CS, b"w" * CS)
        handle.close()
        pool.clone("v", "s", "c")
        clone = pool.open_volume("c")
        clone.write(2 * CS, b"c")
        clone.close()
        report = pool.fsck()
        assert report.clean, report
        assert report.clusters_used == 5
        assert report.clusters_total == (32 << 20) // CS - 1


def corrupt_and_check(
    home_dir: Path, sql: list[str] | Callable[[sqlite3.Connection], None]
) -> FsckReport:
    db = sqlite3.connect(home_dir / "pools" / "p" / "catalog.db")
    if callable(sql):
        sql(db)
    else:
        for statement in sql:
            db.execute(statement)
    db.commit()
    db.close()
    with Home(home_dir) as home:
        return home.pool("p").fsck()


@pytest.fixture
def home_dir(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    build(path, tmp_path)
    return path


def test_clean_after_reopen(home_dir: Path) -> None:
    report = corrupt_and_check(home_dir, [])
    assert report.clean, report


def test_leaked_cluster(home_dir: Path) -> None:
    report = corrupt_and_check(home_dir, ["INSERT INTO refcount VALUES (77, 1)"])
    assert report.leaked == (77,)
    assert not report.clean


def test_map_entry_dropped_leaks_its_cluster(home_dir: Path) -> None:
    def drop(db: sqlite3.Connection) -> None:
        (phys,) = db.execute("SELECT phys FROM map WHERE phys >= 0 LIMIT 1").fetchone()
        db.execute("DELETE FROM map WHERE phys = ?", (phys,))
        drop.phys = phys  # type: ignore[attr-defined]

    report = corrupt_and_check(home_dir, drop)
    assert report.leaked == (drop.phys,)  # type: ignore[attr-defined]


def test_doubly_owned_cluster(home_dir: Path) -> None:
    def share(db: sqlite3.Connection) -> None:
        (layer, phys) = db.execute(
            "SELECT v.top, m.phys FROM volumes v, map m WHERE v.name = 'c' AND m.phys >= 0"
            " AND m.layer != v.top LIMIT 1"
        ).fetchone()
        db.execute("INSERT INTO map VALUES (?, 60, ?)", (layer, phys))
        share.phys = phys  # type: ignore[attr-defined]

    report = corrupt_and_check(home_dir, share)
    assert report.doubly_owned == (share.phys,)  # type: ignore[attr-defined]
    assert not report.leaked


def test_referenced_cluster_not_marked_used(home_dir: Path) -> None:
    def unmark(db: sqlite3.Connection) -> None:
        (phys,) = db.execute("SELECT phys FROM refcount LIMIT 1").fetchone()
        db.execute("DELETE FROM refcount WHERE phys = ?", (phys,))
        unmark.phys = phys  # type: ignore[attr-defined]

    report = corrupt_and_check(home_dir, unmark)
    assert report.doubly_owned == (unmark.phys,)  # type: ignore[attr-defined]


def test_reference_beyond_the_devices(home_dir: Path) -> None:
    far = 5 << PHYS_SHIFT | 3  # device 5 does not exist
    end = 10_000  # device 0 has 511 clusters
    report = corrupt_and_check(
        home_dir,
        [
            f"UPDATE map SET phys = {far} WHERE vc = 0 AND phys >= 0",
            f"INSERT INTO map SELECT top, 50, {end} FROM volumes WHERE name = 'v'",
            f"INSERT INTO refcount VALUES ({end}, 1)",
        ],
    )
    assert any(str(far) in line for line in report.dangling), report
    assert any(str(end) in line for line in report.dangling), report
    assert report.leaked  # the clusters vc 0 used to reference


def test_missing_parent_layer(home_dir: Path) -> None:
    report = corrupt_and_check(
        home_dir,
        ["DELETE FROM layers WHERE id = (SELECT layer FROM snapshots WHERE name = 's')"],
    )
    assert any("parent layer" in line and "missing" in line for line in report.dangling)
    assert any("missing layer" in line for line in report.dangling)
    assert any("snapshot s" in line for line in report.dangling)


def test_layer_cycle_and_orphan_layer(home_dir: Path) -> None:
    report = corrupt_and_check(
        home_dir,
        [
            "INSERT INTO layers VALUES (900, 901)",
            "INSERT INTO layers VALUES (901, 900)",
            "INSERT INTO layers VALUES (902, NULL)",
        ],
    )
    assert any("loops" in line for line in report.errors), report
    assert any("layer 902 is needed by no" in line for line in report.errors), report


def test_volume_with_missing_top(home_dir: Path) -> None:
    report = corrupt_and_check(home_dir, ["UPDATE volumes SET top = 999 WHERE name = 'c'"])
    assert any("volume c: top layer 999 is missing" in line for line in report.dangling)


def test_bad_device_header(home_dir: Path, tmp_path: Path) -> None:
    with Home(home_dir) as home:
        pool = home.pool("p")
        fd = os.open(tmp_path / "d0.img", os.O_RDWR)
        os.pwrite(fd, b"\xff" * 16, 20)  # scribble over the pool uuid
        os.close(fd)
        report = pool.fsck()
    assert any("header" in line for line in report.errors), report


def test_catalog_changed_behind_an_open_pool(home_dir: Path) -> None:
    """A consistent-looking catalog that no longer matches what the open pool holds."""
    with Home(home_dir) as home:
        pool = home.pool("p")
        assert pool.fsck().clean
        db = sqlite3.connect(home_dir / "pools" / "p" / "catalog.db")
        (layer, vc, phys) = db.execute("SELECT * FROM map WHERE phys >= 0 LIMIT 1").fetchone()
        db.execute("DELETE FROM map WHERE layer = ? AND vc = ?", (layer, vc))
        db.execute("DELETE FROM refcount WHERE phys = ?", (phys,))
        db.commit()
        db.close()
        report = pool.fsck()
    assert not report.leaked and not report.doubly_owned and not report.dangling
    assert report.errors == (f"layer {layer} cluster {vc}: {phys} in memory, None in the catalog",)
