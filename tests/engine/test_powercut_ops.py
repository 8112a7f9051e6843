"""Power cuts right after single operations (``powercuts.Mount``), for durability claims that
the randomised rounds of ``test_powercut.py`` cannot reach: growing a backing device, and the
ranged sync of a block device (``Backing.sync_clusters``), which a file on the FUSE file
system never takes (its file system is neither ext4 nor XFS).

For the ranged sync the pool's device is a loop device over a file on the power-cut file
system: the block device's page cache holds the writes not yet written to the device, and a
cache flush of the loop device is an ``fsync`` of that file, so whatever the ranged sync left
in the page cache or left unflushed is gone after the cut.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

from powercuts import Loop, Mount, point, require_fuse, require_loop
from storvisor.engine.home import Home
from storvisor.engine.types import BackingKind, BackingSpec
from storvisor.exports.dataplane import PlaneHost, RemoteVolume

MiB = 1 << 20
CS = 64 << 10


@contextlib.contextmanager
def _power_cut(tmp_path: Path) -> Iterator[Path]:
    """A directory on the power-cut file system; the power is cut when the block ends, and
    the directory then shows what survived."""
    require_fuse()
    backing, mountpoint, disk = _places(tmp_path)
    point(disk, mountpoint)
    mount = Mount(backing, mountpoint)
    try:
        yield disk
        mount.cut()
    finally:
        mount.close()
    point(disk, backing)


def _places(tmp_path: Path) -> tuple[Path, Path, Path]:
    backing, mountpoint, disk = tmp_path / "backing", tmp_path / "mnt", tmp_path / "disk"
    backing.mkdir()
    mountpoint.mkdir()
    return backing, mountpoint, disk


def test_a_grown_device_keeps_its_size_across_a_cut(tmp_path: Path) -> None:
    """``add_backing`` that grows a device is durable when it returns: after a power cut
    right after it, the pool has the grown capacity, and data flushed to the grown part is
    there."""
    with _power_cut(tmp_path) as disk:
        home = Home(disk / "home")
        home.create_pool("p", [BackingSpec(str(disk / "b0.img"), size=4 * MiB)], CS)
        pool = home.pool("p")
        pool.create_volume("v", 8 * MiB)
        volume = pool.open_volume("v")
        volume.write(0, b"a" * (3 * MiB))  # most of the first 4 MiB
        volume.flush()
        grown = pool.add_backing(BackingSpec(str(disk / "b0.img"), size=8 * MiB))
    with Home(disk / "home") as again:
        pool = again.pool("p")
        assert pool.info().stats.capacity == grown.stats.capacity, "the grown size was lost"
        assert pool.fsck().clean
        volume = pool.open_volume("v")
        buf = bytearray(3 * MiB)
        volume.read_into(0, memoryview(buf))
        volume.close()
        assert buf == b"a" * (3 * MiB)


# The workload of the ranged-sync test, run in a process of its own so that the cut can take
# every open descriptor of the loop device with it (argv: home, device path).
_RANGED_WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from storvisor.engine.home import Home
    from storvisor.engine.types import BackingSpec

    CS = 64 << 10
    home = Home(Path(sys.argv[1]))
    home.create_pool("p", [BackingSpec(sys.argv[2])], CS)
    pool = home.pool("p")
    pool.create_volume("v", 16 * CS)
    volume = pool.open_volume("v")
    volume.write(0, b"A" * (16 * CS))
    pool.create_snapshot("v", "s")  # durable: the A clusters now belong to the snapshot
    before = pool.metadata_writes
    for c in range(16):  # copy-on-write: new clusters, A around B, metadata to commit
        volume.write(c * CS + 512, b"B" * 512)
    # wait for the background commit of all of it: a change, then two quiet intervals
    deadline = time.monotonic() + 30
    while pool.metadata_writes == before:
        assert time.monotonic() < deadline, "no background commit within 30 s"
        time.sleep(0.05)
    seen, quiet = pool.metadata_writes, time.monotonic()
    while time.monotonic() - quiet < 1.2:
        time.sleep(0.05)
        if pool.metadata_writes != seen:
            seen, quiet = pool.metadata_writes, time.monotonic()
    print(pool.info().backings[0].kind.value, flush=True)
    time.sleep(3600)
    """
)


def test_ranged_sync_of_a_block_device_survives_a_cut(tmp_path: Path) -> None:
    """The background commit of a pool on a block device syncs only the new clusters
    (``sync_file_range``, then an ``RWF_DSYNC`` write for the cache flush). Once that commit
    is in the catalog, a power cut must leave every cluster it maps with its data: the
    copied-on-write clusters read as the snapshot's data with the new write in it, never as
    zeros."""
    require_fuse()
    require_loop()
    backing, mountpoint, disk = _places(tmp_path)
    device = tmp_path / "dev0"  # the path the catalog records, pointed at the loop device
    point(disk, mountpoint)
    mount = Mount(backing, mountpoint)
    loop: Loop | None = None
    worker: subprocess.Popen[str] | None = None
    try:
        with open(disk / "lun.img", "wb") as f:
            f.truncate(16 * MiB)
            os.fsync(f.fileno())
        loop = Loop(disk / "lun.img")
        point(device, Path(loop.device))
        worker = subprocess.Popen(
            [sys.executable, "-c", _RANGED_WORKER, str(disk / "home"), str(device)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert worker.stdout is not None
        line = worker.stdout.readline().strip()  # the worker ends (EOF) if it fails
        assert line == BackingKind.BLOCK.value, f"the worker failed: {line!r} {worker.stderr}"
        mount.cut()
    finally:
        if worker is not None:
            worker.kill()
            _, err = worker.communicate(timeout=60)
            if worker.returncode not in (-9, 0):
                print(err, file=sys.stderr)
        if loop is not None:
            loop.detach()
        mount.close()
    point(disk, backing)
    loop = Loop(backing / "lun.img")  # the disk as the cut left it
    try:
        point(device, Path(loop.device))
        with Home(disk / "home") as again:
            pool = again.pool("p")
            assert pool.info().backings[0].kind is BackingKind.BLOCK
            snap = pool.open_volume("v", "s")
            volume = pool.open_volume("v")
            for handle, expected in (
                (snap, b"A" * CS),
                (volume, b"A" * 512 + b"B" * 512 + b"A" * (CS - 1024)),
            ):
                buf = bytearray(16 * CS)
                handle.read_into(0, memoryview(buf))
                handle.close()
                for c in range(16):
                    got = bytes(buf[c * CS : (c + 1) * CS])
                    assert got == expected, (
                        f"{handle}: cluster {c} lost its data after the committed ranged sync "
                        f"(zeros: {not any(got)})"
                    )
            assert pool.fsck().clean
    finally:
        loop.detach()


def test_a_snapshot_is_durable_when_it_returns(tmp_path: Path) -> None:
    """A power cut right after ``create_snapshot`` returns: the snapshot exists and holds
    every write completed before it (none of them was flushed), and so does the volume."""
    with _power_cut(tmp_path) as disk:
        home = Home(disk / "home")
        home.create_pool("p", [BackingSpec(str(disk / "b0.img"), size=4 * MiB)], CS)
        pool = home.pool("p")
        pool.create_volume("v", 1 * MiB)
        volume = pool.open_volume("v")
        volume.write(0, b"s" * (CS + 4096))  # allocates two clusters, no flush
        pool.create_snapshot("v", "s")
    with Home(disk / "home") as again:
        pool = again.pool("p")
        assert [s.name for s in pool.snapshots("v")] == ["s"], "the snapshot was lost"
        for snapshot in ("s", None):
            handle = pool.open_volume("v", snapshot)
            buf = bytearray(CS + 4096)
            handle.read_into(0, memoryview(buf))
            handle.close()
            assert buf == b"s" * (CS + 4096), f"a write before the snapshot was lost ({snapshot})"
        assert pool.fsck().clean


def test_an_owner_flush_syncs_data_plane_writes(tmp_path: Path) -> None:
    """``Pool.flush`` must sync the data planes' in-place writes although the pool never saw
    them and has nothing pending: a management operation flushes this way after the
    background commit took its batch, and must then still make durable every write a plane
    acknowledged before it (a snapshot taken then holds them)."""
    with _power_cut(tmp_path) as disk:
        home = Home(disk / "home")
        home.create_pool("p", [BackingSpec(str(disk / "b0.img"), size=4 * MiB)], 4096)
        pool = home.pool("p")
        pool.create_volume("v", MiB)
        volume = pool.open_volume("v")
        ours, theirs = socket.socketpair()
        host = PlaneHost(volume, ours)
        host.start()
        remote = RemoteVolume(theirs, os.dup(host.map.fd), pool.backing_fds(), 4096)
        remote.write(0, b"a" * 4096)  # allocates: done by the owner
        remote.flush()
        remote.write(0, b"b" * 4096)  # in place: the owner never sees it
        pool.flush()  # nothing pending, as after a background commit took the batch
        remote.close()
        host.close()
    with Home(disk / "home") as again:
        v = again.pool("p").open_volume("v")
        buf = bytearray(4096)
        v.read_into(0, memoryview(buf))
        v.close()
        assert bytes(buf) == b"b" * 4096, "a flush left a data plane's in-place write unsynced"
