"""Every call of the engine's public API, its errors, and persistence across reopen."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from prereq import require
from storvisor.engine import pool as pool_module
from storvisor.engine.device import BlockDevice
from storvisor.engine.home import Home
from storvisor.engine.pool import MAX_VOLUME_SIZE, Pool
from storvisor.engine.types import BackingKind, BackingSpec
from storvisor.errors import (
    Conflict,
    CorruptMetadata,
    InvalidArgument,
    IOFailure,
    NoSpace,
    NotFound,
)

CS = 64 << 10


def read(device: BlockDevice, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    device.read_into(offset, memoryview(buf))
    return bytes(buf)


def write(pool: Pool, volume: str, offset: int, data: bytes) -> None:
    handle = pool.open_volume(volume)
    try:
        handle.write(offset, data)
    finally:
        handle.close()


def content(pool: Pool, volume: str, snapshot: str | None = None) -> bytes:
    handle = pool.open_volume(volume, snapshot)
    try:
        return read(handle, 0, handle.size)
    finally:
        handle.close()


# ------------------------------------------------------------------------ Home and pools


def test_home_lock_refuses_a_second_process(home: Home) -> None:
    code = textwrap.dedent(
        f"""
        from storvisor.engine.home import Home
        from storvisor.errors import Conflict
        try:
            Home({str(home.path)!r})
        except Conflict as e:
            print(e)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert f"in use by pid {os.getpid()}" in out.stdout
    home.close()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout == ""  # free again once closed


def test_create_pool_and_stats(home: Home, tmp_path: Path) -> None:
    info = home.create_pool("p1", [BackingSpec(str(tmp_path / "a.img"), 16 << 20)])
    assert info.name == "p1"
    assert info.cluster_size == CS
    assert info.backings[0].kind is BackingKind.FILE
    assert info.backings[0].size == (16 << 20) - CS  # the header takes one cluster
    assert info.stats.capacity == info.backings[0].size
    assert (info.stats.allocated, info.stats.provisioned) == (0, 0)
    assert info.stats.free == info.stats.capacity
    assert [p.name for p in home.pools()] == ["p1"]
    assert home.pool("p1") is home.pool("p1")


@pytest.mark.parametrize("name", ["", "-x", ".x", "a/b", "a b", "x" * 64, "é"])
def test_invalid_names(home: Home, pool: Pool, tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidArgument):
        home.create_pool(name, [BackingSpec(str(tmp_path / "n.img"), 1 << 20)])
    with pytest.raises(InvalidArgument):
        pool.create_volume(name, 1 << 20)
    pool.create_volume("ok", 1 << 20)
    with pytest.raises(InvalidArgument):
        pool.create_snapshot("ok", name)
    assert not (tmp_path / "n.img").exists()


@pytest.mark.parametrize("cluster_size", [0, 2048, 3 * 4096, 4 << 20])
def test_invalid_cluster_size(home: Home, tmp_path: Path, cluster_size: int) -> None:
    with pytest.raises(InvalidArgument):
        home.create_pool("p", [BackingSpec(str(tmp_path / "a.img"), 16 << 20)], cluster_size)
    assert not (tmp_path / "a.img").exists()
    assert home.pools() == []


def test_pool_errors(home: Home, pool: Pool, tmp_path: Path) -> None:
    with pytest.raises(Conflict):
        home.create_pool("p", [BackingSpec(str(tmp_path / "b.img"), 16 << 20)])
    with pytest.raises(NotFound):
        home.pool("nope")
    with pytest.raises(NotFound):
        home.create_pool("q", [BackingSpec(str(tmp_path / "missing.img"))])
    with pytest.raises(InvalidArgument):
        home.create_pool("q", [])
    with pytest.raises(InvalidArgument):  # smaller than a header and one cluster
        home.create_pool("q", [BackingSpec(str(tmp_path / "tiny.img"), 4096)])
    # a device of pool p cannot join another pool
    with pytest.raises(Conflict, match="belongs to pool 'p'"):
        home.create_pool("q", [BackingSpec(str(tmp_path / "d0.img"))])
    assert [p.name for p in home.pools()] == ["p"]
    with pytest.raises(NotFound):
        home.delete_pool("nope")


def test_delete_pool(home: Home, pool: Pool, tmp_path: Path) -> None:
    existing = tmp_path / "lun.img"
    existing.write_bytes(bytes(8 << 20))
    pool.add_backing(BackingSpec(str(existing)))
    pool.create_volume("v", 1 << 20)
    handle = pool.open_volume("v")
    with pytest.raises(Conflict):
        home.delete_pool("p")
    with pytest.raises(Conflict):
        home.delete_pool("p", force=True)
    handle.close()
    home.delete_pool("p", force=True)
    assert home.pools() == []
    assert not (tmp_path / "d0.img").exists()  # created for the pool: removed
    assert existing.exists()  # given to the pool: kept, header erased, so it can be reused
    home.create_pool("q", [BackingSpec(str(existing))])
    home.delete_pool("q")


def test_add_backing_online(home: Home, pool: Pool, tmp_path: Path) -> None:
    pool.create_volume("v", 8 << 20)
    handle = pool.open_volume("v")
    before = pool.info().stats.capacity
    info = pool.add_backing(BackingSpec(str(tmp_path / "d1.img"), 32 << 20))
    assert len(info.backings) == 2
    assert info.stats.capacity == before + (32 << 20) - CS
    with pytest.raises(Conflict):
        pool.add_backing(BackingSpec(str(tmp_path / "d1.img")))
    info = pool.add_backing(BackingSpec(str(tmp_path / "d1.img"), 64 << 20))  # grows it
    assert info.stats.capacity == before + (64 << 20) - CS
    handle.write(0, b"x" * 4096)
    handle.close()
    home.close()
    with Home(home.path) as again:
        assert again.pool("p").info().stats.capacity == before + (64 << 20) - CS
        assert content(again.pool("p"), "v")[:4096] == b"x" * 4096


def test_block_device_backing(home: Home, tmp_path: Path) -> None:
    """A LUN is a block device path: a loop device stands in for one (needs root)."""
    image = tmp_path / "lun.img"
    image.write_bytes(b"")
    os.truncate(image, 8 << 20)
    try:
        out = subprocess.run(
            ["losetup", "--find", "--show", str(image)], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError) as e:
        require(False, f"no loop device available: {e}")
        raise
    device = out.stdout.strip()
    try:
        info = home.create_pool("lun", [BackingSpec(device)])
        assert info.backings[0].kind is BackingKind.BLOCK
        assert info.stats.capacity == (8 << 20) - CS
        pool = home.pool("lun")
        pool.create_volume("v", 1 << 20)
        write(pool, "v", 0, b"on a LUN")
        assert pool.fsck().clean
        home.close()
        with Home(home.path) as again:
            assert content(again.pool("lun"), "v")[:8] == b"on a LUN"
            again.delete_pool("lun", force=True)
    finally:
        subprocess.run(["losetup", "-d", device], check=False)
    assert image.exists()


# -------------------------------------------------------------------------------- volumes


def test_volume_lifecycle(pool: Pool) -> None:
    info = pool.create_volume("v", 1 << 30)
    assert (info.pool, info.name, info.size, info.allocated, info.origin) == (
        "p",
        "v",
        1 << 30,
        0,
        None,
    )
    assert 0 < len(info.serial) <= 20
    with pytest.raises(Conflict):
        pool.create_volume("v", 1 << 20)
    for bad in (0, -512, 1000):
        with pytest.raises(InvalidArgument):
            pool.create_volume("w", bad)
    assert [v.name for v in pool.volumes()] == ["v"]
    assert pool.info().stats.provisioned == 1 << 30
    handle = pool.open_volume("v")
    assert (handle.size, handle.read_only, handle.block_size) == (1 << 30, False, 512)
    assert isinstance(handle, BlockDevice)
    handle.write(CS * 3 + 5, b"abc")
    assert pool.volume_info("v").allocated == CS
    assert pool.info().stats.allocated == CS
    with pytest.raises(Conflict):
        pool.delete_volume("v")
    handle.close()
    with pytest.raises(IOFailure) as e:
        handle.read_into(0, memoryview(bytearray(1)))
    assert e.value.errno == errno.EBADF
    pool.delete_volume("v")
    pool.flush()
    assert pool.info().stats.allocated == 0
    for call in (
        lambda: pool.volume_info("v"),
        lambda: pool.open_volume("v"),
        lambda: pool.delete_volume("v"),
        lambda: pool.extend_volume("v", 1 << 31),
        lambda: pool.create_snapshot("v", "s"),
        lambda: pool.snapshots("v"),
        lambda: pool.flatten("v"),
    ):
        with pytest.raises(NotFound):
            call()


def test_extend_online(pool: Pool) -> None:
    pool.create_volume("v", 1 << 20)
    a, b = pool.open_volume("v"), pool.open_volume("v")
    with pytest.raises(InvalidArgument):
        pool.extend_volume("v", 512 << 10)
    assert pool.extend_volume("v", 3 << 20).size == 3 << 20
    assert (a.size, b.size) == (3 << 20, 3 << 20)
    a.write((3 << 20) - 3, b"end")
    assert read(b, (3 << 20) - 3, 3) == b"end"
    assert read(b, 1 << 20, 4096) == bytes(4096)
    a.close()
    b.close()


def test_unaligned_writes_fill_new_clusters_with_zeros_not_stale_data(
    home: Home, tmp_path: Path
) -> None:
    home.create_pool("small", [BackingSpec(str(tmp_path / "s.img"), 9 * 4096)], 4096)
    pool = home.pool("small")
    pool.create_volume("a", 8 * 4096)
    write(pool, "a", 0, b"\xff" * 8 * 4096)  # every cluster of the pool now holds 0xff
    pool.delete_volume("a")
    pool.flush()  # the frees commit: the clusters may be reused
    pool.create_volume("b", 8 * 4096)
    handle = pool.open_volume("b")
    for i in range(8):
        handle.write(i * 4096 + 100 * i, b"x")
    expected = bytearray(8 * 4096)
    for i in range(8):
        expected[i * 4096 + 100 * i] = ord("x")
    assert read(handle, 0, 8 * 4096) == expected
    assert pool.info().stats.free == 0
    with pytest.raises(NoSpace) as e:
        pool.create_volume("c", 4096)
        pool.open_volume("c").write(0, b"y")
    assert e.value.errno == errno.ENOSPC
    assert read(handle, 0, 8 * 4096) == expected  # still usable after ENOSPC
    handle.close()
    assert pool.fsck().clean


@pytest.mark.parametrize("pause", [0.0, 1.2])
def test_crash_without_flush(home: Home, pool: Pool, pause: float) -> None:
    """Allocations not yet committed vanish (no leak); after a second they are committed by
    the background thread even without a flush."""
    pool.create_volume("v", 8 << 20)
    write(pool, "v", 0, b"a" * CS)
    pool.flush()
    home.close()
    code = textwrap.dedent(
        f"""
        import os
        import time
        from storvisor.engine.home import Home
        pool = Home({str(home.path)!r}).pool("p")
        handle = pool.open_volume("v")
        handle.write({CS}, b"b" * {4 * CS})
        time.sleep({pause})
        os._exit(0)  # no flush, no close: a crash
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    with Home(home.path) as again:
        pool2 = again.pool("p")
        report = pool2.fsck()
        assert report.clean, report
        assert content(pool2, "v")[:CS] == b"a" * CS
        used = pool2.info().stats.allocated
        if pause:
            assert used == 5 * CS, "the background commit did not run within a second"
            assert content(pool2, "v")[CS : 5 * CS] == b"b" * (4 * CS)
        else:
            assert used in (CS, 5 * CS)  # the background commit may have run
        assert pool2.volume_info("v").allocated == used


# ------------------------------------------------------------------ snapshots and clones


def test_snapshot_is_frozen_and_read_only(pool: Pool) -> None:
    pool.create_volume("v", 1 << 20)
    handle = pool.open_volume("v")
    handle.write(0, b"old" * 1000)
    info = pool.create_snapshot("v", "s")
    assert (info.volume, info.name, info.size, info.clones) == ("v", "s", 1 << 20, ())
    with pytest.raises(Conflict):
        pool.create_snapshot("v", "s")
    handle.write(0, b"new")  # live volume, open across the snapshot
    snap = pool.open_volume("v", "s")
    assert snap.read_only
    assert read(snap, 0, 3000) == b"old" * 1000
    assert read(handle, 0, 6) == b"newold"
    with pytest.raises(IOFailure) as e:
        snap.write(0, b"x")
    assert e.value.errno == errno.EPERM
    with pytest.raises(Conflict):
        pool.delete_snapshot("v", "s")
    snap.close()
    handle.close()
    with pytest.raises(NotFound):
        pool.open_volume("v", "nope")
    assert [s.name for s in pool.snapshots("v")] == ["s"]
    pool.delete_snapshot("v", "s")
    assert pool.snapshots("v") == []
    assert content(pool, "v")[:6] == b"newold"
    assert pool.fsck().clean


def test_delete_middle_snapshot_keeps_everyone_s_data(pool: Pool) -> None:
    pool.create_volume("v", 1 << 20)
    expected: dict[str, bytes] = {}
    for i in range(4):
        write(pool, "v", 0, bytes([i + 1]) * (2 * CS))  # overwrite: shadowed clusters
        write(pool, "v", (i + 2) * CS, bytes([0x10 + i]) * 100)  # new data each time
        pool.create_snapshot("v", f"s{i}")
        expected[f"s{i}"] = content(pool, "v")
    write(pool, "v", 0, b"top")
    top = content(pool, "v")
    before = pool.info().stats.allocated
    pool.delete_snapshot("v", "s1")
    pool.delete_snapshot("v", "s2")
    pool.flush()
    assert pool.info().stats.allocated == before - 4 * CS  # s1's and s2's shadowed clusters
    for name in ("s0", "s3"):
        assert content(pool, "v", name) == expected[name]
    assert content(pool, "v") == top
    pool.delete_snapshot("v", "s0")
    pool.delete_snapshot("v", "s3")
    assert content(pool, "v") == top
    assert pool.fsck().clean
    pool.flush()
    assert pool.info().stats.allocated == pool.volume_info("v").allocated


def test_rollback(pool: Pool) -> None:
    pool.create_volume("v", 1 << 20)
    write(pool, "v", 0, b"one")
    pool.create_snapshot("v", "s1")
    write(pool, "v", 0, b"two")
    pool.extend_volume("v", 2 << 20)
    pool.create_snapshot("v", "s2")
    write(pool, "v", 0, b"three")
    handle = pool.open_volume("v")
    with pytest.raises(Conflict):
        pool.rollback("v", "s1")
    handle.close()
    info = pool.rollback("v", "s1")
    assert info.size == 1 << 20
    assert content(pool, "v")[:3] == b"one"
    write(pool, "v", 0, b"uno")
    assert content(pool, "v", "s2")[:3] == b"two"  # later snapshots stay
    # s1 now has two children (s2 and the live volume): deleting it keeps it hidden
    pool.delete_snapshot("v", "s1")
    assert content(pool, "v", "s2")[:3] == b"two"
    assert content(pool, "v")[:3] == b"uno"
    pool.delete_snapshot("v", "s2")
    assert content(pool, "v")[:3] == b"uno"
    assert pool.fsck().clean
    pool.flush()
    assert pool.info().stats.allocated == pool.volume_info("v").allocated
    with pytest.raises(NotFound):
        pool.rollback("v", "s1")


def test_clone_and_flatten(pool: Pool) -> None:
    pool.create_volume("v", 1 << 20)
    write(pool, "v", 0, b"base" * 50_000)
    pool.create_snapshot("v", "s")
    info = pool.clone("v", "s", "c")
    assert (info.origin, info.size, info.allocated) == ("v@s", 1 << 20, 0)
    assert pool.snapshots("v")[0].clones == ("c",)
    with pytest.raises(Conflict):
        pool.clone("v", "s", "c")
    with pytest.raises(NotFound):
        pool.clone("v", "nope", "d")
    write(pool, "c", 10, b"clone")
    write(pool, "v", 10, b"vol")
    assert content(pool, "c")[:20] == (b"base" * 5)[:10] + b"clone" + (b"base" * 5)[15:]
    with pytest.raises(Conflict):
        pool.delete_snapshot("v", "s")
    with pytest.raises(Conflict):
        pool.delete_volume("v")
    clone_handle = pool.open_volume("c")  # flatten works online
    before = content(pool, "c")
    info = pool.flatten("c")
    assert info.origin is None
    assert info.allocated == 4 * CS  # 200,000 bytes of base data: 4 clusters
    assert read(clone_handle, 0, 1 << 20) == before
    clone_handle.write(0, b"after")
    clone_handle.close()
    pool.delete_snapshot("v", "s")
    pool.delete_volume("v")
    assert content(pool, "c")[:20] == b"after" + before[5:20]
    assert pool.fsck().clean
    pool.flush()
    assert pool.info().stats.allocated == pool.volume_info("c").allocated


def test_discard_frees_owned_clusters(pool: Pool) -> None:
    pool.create_volume("v", 1 << 20)
    handle = pool.open_volume("v")
    handle.write(0, b"\x55" * (1 << 20))
    pool.flush()
    assert pool.info().stats.allocated == 1 << 20
    handle.discard(100, 5 * CS)  # frees clusters 1..4, zeroes the rest of the range
    handle.write_zeroes(8 * CS, 2 * CS, may_unmap=False)  # keeps its clusters
    handle.write_zeroes(12 * CS, 2 * CS)  # frees them
    assert pool.volume_info("v").allocated == (16 - 4 - 2) * CS
    assert pool.info().stats.allocated == 1 << 20  # frees count until they commit
    pool.flush()
    assert pool.info().stats.allocated == (16 - 4 - 2) * CS
    expected = bytearray(b"\x55" * (1 << 20))
    expected[100 : 100 + 5 * CS] = bytes(5 * CS)
    expected[8 * CS : 10 * CS] = bytes(2 * CS)
    expected[12 * CS : 14 * CS] = bytes(2 * CS)
    assert read(handle, 0, 1 << 20) == expected
    holes = [(e.offset, e.length) for e in handle.block_status(0, 1 << 20) if not e.allocated]
    assert holes == [(CS, 4 * CS), (12 * CS, 2 * CS)]
    handle.close()
    assert pool.fsck().clean


def test_discard_and_zeroes_over_a_parent(home: Home, pool: Pool) -> None:
    pool.create_volume("v", 1 << 20)
    write(pool, "v", 0, b"\xaa" * (1 << 20))
    pool.create_snapshot("v", "s")
    pool.clone("v", "s", "c")
    handle = pool.open_volume("c")
    handle.discard(CS, 2 * CS)  # whole clusters shared with the parent: explicit zeros
    handle.write_zeroes(5 * CS + 7, 10, may_unmap=False)  # partial: copy-on-write
    data = read(handle, 0, 1 << 20)
    assert data[CS : 3 * CS] == bytes(2 * CS)
    assert data[5 * CS + 7 : 5 * CS + 17] == bytes(10)
    assert data[:CS] == b"\xaa" * CS and data[3 * CS : 5 * CS] == b"\xaa" * (2 * CS)
    extents = handle.block_status(0, 4 * CS)
    assert [(e.offset, e.length, e.allocated, e.zero) for e in extents] == [
        (0, CS, True, False),
        (CS, 2 * CS, False, True),
        (3 * CS, CS, True, False),
    ]
    assert pool.volume_info("c").allocated == CS  # only the copied-on-write cluster
    handle.write(CS, b"z")  # writing into an explicit zero allocates a zero-filled cluster
    assert read(handle, CS, CS) == b"z" + bytes(CS - 1)
    clone_data = read(handle, 0, 1 << 20)
    handle.close()
    assert content(pool, "v", "s") == b"\xaa" * (1 << 20)
    assert pool.fsck().clean
    home.close()
    with Home(home.path) as again:  # the explicit zeros persist
        assert content(again.pool("p"), "c") == clone_data


def test_persistence_across_reopen(home: Home, pool: Pool) -> None:
    pool.create_volume("v", 4 << 20)
    write(pool, "v", 12345, b"persist" * 1000)
    pool.create_snapshot("v", "s")
    pool.clone("v", "s", "c")
    write(pool, "c", 0, b"clone data")
    handle = pool.open_volume("v")
    handle.discard(0, 4 << 20)
    handle.close()
    expected = {name: content(pool, *name) for name in [("v", None), ("v", "s"), ("c", None)]}
    infos = pool.volumes()
    home.close()
    with Home(home.path) as again:
        pool2 = again.pool("p")
        assert pool2.volumes() == infos
        for name, data in expected.items():
            assert content(pool2, *name) == data
        assert pool2.fsck().clean


def test_snapshot_and_clone_creation_are_o1(pool: Pool) -> None:
    """The catalog rows written to snapshot or clone a volume do not depend on its size."""
    costs = []
    for name, size, mapped in (("small", 1 << 20, 1), ("big", 1 << 40, 1000)):
        pool.create_volume(name, size)
        handle = pool.open_volume(name)
        for i in range(mapped):
            handle.write(i * 7 * CS, b"d")
        handle.close()
        pool.flush()
        before = pool.metadata_writes
        pool.create_snapshot(name, "s")
        pool.clone(name, "s", f"{name}-clone")
        costs.append(pool.metadata_writes - before)
    assert costs[0] == costs[1] <= 8, costs
    assert content(pool, "small-clone")[:1] == b"d"


def test_freed_clusters_are_not_reused_before_the_free_commits(
    home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pool_module, "COMMIT_INTERVAL", 3600.0)  # only explicit flushes commit
    home.create_pool("tight", [BackingSpec(str(tmp_path / "t.img"), 5 * 4096)], 4096)
    pool = home.pool("tight")
    pool.create_volume("v", 8 * 4096)
    handle = pool.open_volume("v")
    handle.write(0, b"\x01" * 4 * 4096)  # the pool is full
    handle.discard(0, 4096)
    with pytest.raises(NoSpace):
        handle.write(5 * 4096, b"x")  # the discarded cluster is not free yet
    pool.flush()
    handle.write(5 * 4096, b"x")
    assert read(handle, 0, 6 * 4096) == bytes(4096) + b"\x01" * 3 * 4096 + bytes(
        4096
    ) + b"x" + bytes(4095)
    handle.close()
    assert pool.fsck().clean


def test_busy_snapshot_blocks_volume_delete(pool: Pool) -> None:
    pool.create_volume("v", 1 << 20)
    pool.create_snapshot("v", "s")
    snap = pool.open_volume("v", "s")
    with pytest.raises(Conflict):
        pool.delete_volume("v")
    snap.close()
    pool.delete_volume("v")
    assert pool.volumes() == []


def test_swapped_devices_are_refused(home: Home, tmp_path: Path) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    home.create_pool("two", [BackingSpec(str(a), 4 << 20), BackingSpec(str(b), 4 << 20)])
    home.close()
    a.rename(tmp_path / "x.img")
    b.rename(a)
    (tmp_path / "x.img").rename(b)
    with Home(home.path) as again, pytest.raises(CorruptMetadata):
        again.pool("two")


def test_pool_with_a_missing_device(home: Home, tmp_path: Path) -> None:
    home.create_pool("gone", [BackingSpec(str(tmp_path / "g.img"), 4 << 20)])
    home.close()
    (tmp_path / "g.img").unlink()
    with Home(home.path) as again:
        with pytest.raises(CorruptMetadata, match="missing"):
            again.pool("gone")
        with pytest.raises(CorruptMetadata):
            again.delete_pool("gone")
        again.delete_pool("gone", force=True)
        assert again.pools() == []


def test_flatten_reports_progress_and_stops_consistently(pool: Pool) -> None:
    """``flatten``'s progress callback sees every copied byte; an exception from it stops the
    copy with the volume still a clone that reads the same, and a later flatten finishes."""
    cs = pool.cluster_size
    handle = pool.open_volume(pool.create_volume("v", 8 * cs).name)
    data = bytes(range(256)) * (8 * cs // 256)
    handle.write(0, data)
    handle.close()
    pool.create_snapshot("v", "s")
    pool.clone("v", "s", "c")
    seen: list[tuple[int, int]] = []

    class Stop(Exception):
        pass

    def stop_after_three(done: int, total: int) -> None:
        seen.append((done, total))
        if done >= 3 * cs:
            raise Stop

    with pytest.raises(Stop):
        pool.flatten("c", stop_after_three)
    assert seen == [(i * cs, 8 * cs) for i in range(4)]
    assert pool.volume_info("c").origin == "v@s"
    assert _contents(pool, "c", 8 * cs) == data
    assert pool.fsck().clean
    seen.clear()
    assert pool.flatten("c", lambda done, total: seen.append((done, total))).origin is None
    assert seen[0] == (0, 5 * cs) and seen[-1] == (5 * cs, 5 * cs)
    pool.delete_snapshot("v", "s")
    assert _contents(pool, "c", 8 * cs) == data
    assert pool.fsck().clean


def _contents(pool: Pool, volume: str, size: int) -> bytes:
    handle = pool.open_volume(volume)
    try:
        buf = bytearray(size)
        handle.read_into(0, memoryview(buf))
        return bytes(buf)
    finally:
        handle.close()


def test_volume_sizes_are_bounded(pool: Pool) -> None:
    """A size the catalog or the wire protocols cannot carry is refused before anything
    changes, on create and on extend; the largest one is accepted and committed."""
    for bad in (0, -512, 1000, MAX_VOLUME_SIZE + 512, 1 << 63, 99999999999 << 40):
        with pytest.raises(InvalidArgument):
            pool.create_volume("v", bad)
    assert pool.volumes() == []
    pool.create_volume("v", 1 << 20)
    with pytest.raises(InvalidArgument, match="at most 1 EiB"):
        pool.extend_volume("v", 1 << 63)
    assert pool.volume_info("v").size == 1 << 20
    assert pool.extend_volume("v", MAX_VOLUME_SIZE).size == MAX_VOLUME_SIZE
    pool.flush()  # the commit carries it
    assert pool.fsck().clean


def test_a_flush_after_the_pool_closed_touches_no_device(pool: Pool) -> None:
    """A flush that comes once the pool closed (a volume's handle that raced the close)
    fails with ESHUTDOWN before it syncs anything: the devices' fds are closed, and their
    numbers may already be another file's."""
    pool.close()
    with pytest.raises(IOFailure) as refused:
        pool.flush()
    assert refused.value.errno == errno.ESHUTDOWN
