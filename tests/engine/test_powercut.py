"""Power-cut tests: the durability contract against a crash of the machine, not only of the
process.

The Home and its backing device live on ``storvisor.testing.powercut``, a FUSE file system
that keeps every file's unsynced writes in memory. Each round mounts it, runs the crashkit
worker on the Home through the mount, and cuts the power: SIGKILL of the file system
(whatever was not fsync'd or fdatasync'd vanishes), then of the worker. The cut comes after a
random number of operations, while the worker opens the Home, or from the file system itself
as a random sync arrives (where a catalog committed before its data would show). The Home
is then opened from the backing directory itself: fsck must be clean and every volume,
snapshot and clone must match the worker's log (``crashkit.History``). A data sync missing
before a catalog commit leaves committed mappings over clusters whose data never reached the
disk, which the checker reports.

The catalog records device paths, so the Home is reached through a symbolic link that points
at the mount during a round and at the backing directory before and after it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storvisor.engine.home import Home
from storvisor.engine.types import BackingSpec
from storvisor.exports.dataplane import PlaneHost, RemoteVolume
from storvisor.testing import crashkit
from storvisor.testing.crashkit import History
from storvisor.testing.powercut import SECTOR, FileCache

ROUNDS = 10
VOLUME = 1 << 20
DEVICE_BYTES = 16 << 20


def _missing_requirement() -> str | None:
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not usable"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (Debian package fuse3)"
    if importlib.util.find_spec("mfusepy") is None:
        return "mfusepy is not installed"
    try:
        import mfusepy  # noqa: F401  (it loads libfuse3 on import)
    except (ImportError, OSError) as e:
        return f"mfusepy cannot load libfuse: {e}"
    return None


def _mounted(path: Path) -> bool:
    """Whether ``path`` is a mount point, dead FUSE mounts included (``os.path.ismount``
    cannot see those: it stats the mount point, which then fails)."""
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


class Mount:
    """``python -m storvisor.testing.powercut BACKING MOUNTPOINT`` and its mount."""

    def __init__(
        self,
        backing: Path,
        mountpoint: Path,
        *,
        writeback: float,
        seed: int,
        cut_at_sync: int | None = None,
    ) -> None:
        self.mountpoint = mountpoint
        args = [
            sys.executable,
            "-m",
            "storvisor.testing.powercut",
            str(backing),
            str(mountpoint),
            f"--writeback={writeback}",
            f"--seed={seed}",
        ]
        if cut_at_sync is not None:
            args.append(f"--cut-at-sync={cut_at_sync}")
        self.stderr = ""
        self.proc = subprocess.Popen(args, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while not _mounted(mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise AssertionError(f"the powercut file system did not mount: {self.stderr}")
            time.sleep(0.01)

    def has_cut(self) -> bool:
        """Whether the file system has ended (it cut the power itself)."""
        return self.proc.poll() is not None

    def cut(self) -> None:
        """Cut the power: SIGKILL the file system (unless it cut itself); its unsynced data
        is gone."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def close(self) -> None:
        """Kill the file system if it still runs and remove the mount."""
        if self.proc.poll() is None:
            self.proc.kill()
        _, err = self.proc.communicate(timeout=30)
        self.stderr = err.decode(errors="replace")
        if _mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], check=True)


def _point(link: Path, target: Path) -> None:
    """Make the symbolic link ``link`` point at ``target`` (atomically)."""
    tmp = link.with_name(link.name + ".new")
    tmp.symlink_to(target)
    tmp.replace(link)


@pytest.fixture
def fuse() -> None:
    """Skips the test when a FUSE file system cannot be mounted here."""
    missing = _missing_requirement()
    if missing is not None:
        pytest.skip(missing)


@pytest.mark.usefixtures("fuse")
def test_a_cut_keeps_only_synced_content(tmp_path: Path) -> None:
    """Through the mount: reads see unsynced writes and truncates, closing a file does not
    sync it, and after the cut each file holds its last synced content; names and the
    pass-through ``-shm`` file are on the backing directory at once."""
    backing, mountpoint = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    mountpoint.mkdir()
    mount = Mount(backing, mountpoint, writeback=0.0, seed=0)
    try:
        fd = os.open(mountpoint / "f", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.pwrite(fd, b"a" * 10_000, 0)
            os.fdatasync(fd)
            os.pwrite(fd, b"b" * 5000, 8000)
            os.ftruncate(fd, 12_000)
            assert os.pread(fd, 20_000, 0) == b"a" * 8000 + b"b" * 4000
            assert os.fstat(fd).st_size == 12_000
        finally:
            os.close(fd)
        (mountpoint / "g").write_bytes(b"never synced")
        (mountpoint / "x-shm").write_bytes(b"index")
        assert (backing / "f").read_bytes() == b"a" * 10_000
        assert (backing / "x-shm").read_bytes() == b"index"
        mount.cut()
    finally:
        mount.close()
    assert (backing / "f").read_bytes() == b"a" * 10_000
    assert (backing / "g").read_bytes() == b""


@pytest.mark.usefixtures("fuse")
def test_powercut_rounds(tmp_path: Path) -> None:
    """Rounds of workload and power cut on one Home; what survived a round is the known
    content of the next (see the module docstring)."""
    seed = int(os.environ.get("STORVISOR_CRASH_SEED", random.randrange(1 << 32)))
    rng = random.Random(seed)
    backing, mountpoint, disk = tmp_path / "backing", tmp_path / "mnt", tmp_path / "disk"
    backing.mkdir()
    mountpoint.mkdir()
    _point(disk, backing)
    home_dir = disk / "home"
    home = Home(home_dir)
    home.create_pool("p", [BackingSpec(str(disk / "b0.img"), size=DEVICE_BYTES)], 4096)
    home.pool("p").create_volume("v", VOLUME)
    home.close()

    known: dict[str, bytes] = {"v": bytes(VOLUME)}
    flushed_rounds = 0
    for round_ in range(ROUNDS):
        where = f"seed {seed} (STORVISOR_CRASH_SEED), round {round_}"
        # the file system cuts the power itself at a sync, or the test cuts it at a random
        # moment: after some operations, or while the worker opens the Home (and recovers)
        cut = "open" if round_ == ROUNDS - 1 else ("sync", "moment")[round_ % 2]
        _point(disk, mountpoint)
        mount = Mount(
            backing,
            mountpoint,
            writeback=rng.choice([0.0, 0.1]),
            seed=rng.randrange(1 << 32),
            cut_at_sync=rng.randrange(1, 150) if cut == "sync" else None,
        )
        try:
            worker = crashkit.WorkerProcess(
                home_dir,
                seed=rng.randrange(1 << 32),
                round_=round_,
                ops=1500,
                flush_rate=rng.choice([0.1, 0.02]),
                discards=True,
                snapshots=round_ % 4 >= 2,
            )
            if cut == "open":
                time.sleep(rng.uniform(0.0, 0.5))
            elif cut == "sync":
                worker.wait_for(mount.has_cut)
            else:
                assert worker.ready.wait(30), f"{where}: worker never became ready"
                worker.wait_for(functools.partial(worker.logged, rng.randrange(10, 1500)))
                time.sleep(rng.uniform(0.0, 0.02))
            alive = worker.proc.poll() is None
            cut_itself = mount.has_cut()  # the worker then fails, and may end
            mount.cut()
            records = worker.kill()
            assert alive or cut_itself, f"{where}: worker ended before the cut: {worker.stderr}"
        finally:
            mount.close()
        _point(disk, backing)
        history = History(known, records)
        if history.durable:
            flushed_rounds += 1
        known = crashkit.check_home(home_dir, history, where)
    assert flushed_rounds >= ROUNDS // 3, f"seed {seed}: too few rounds reached a flush"


@pytest.mark.usefixtures("fuse")
def test_data_plane_writes_survive_a_cut_after_flush(tmp_path: Path) -> None:
    """A data plane writes in place itself; its flush, done by the pool's owner, must sync
    those writes too (the owner never saw them) before it returns."""
    backing, mountpoint, disk = tmp_path / "backing", tmp_path / "mnt", tmp_path / "disk"
    backing.mkdir()
    mountpoint.mkdir()
    _point(disk, mountpoint)
    mount = Mount(backing, mountpoint, writeback=0.0, seed=0)
    try:
        home = Home(disk / "home")
        home.create_pool("p", [BackingSpec(str(disk / "b0.img"), size=DEVICE_BYTES)], 4096)
        pool = home.pool("p")
        pool.create_volume("v", VOLUME)
        volume = pool.open_volume("v")
        ours, theirs = socket.socketpair()
        host = PlaneHost(volume, ours)
        host.start()
        remote = RemoteVolume(theirs, os.dup(host.map.fd), pool.backing_fds(), 4096)
        remote.write(0, b"a" * 8192)  # allocates: done by the owner
        remote.flush()
        remote.write(0, b"b" * 4096)  # in place: done by the data plane alone
        remote.flush()
        remote.write(4096, b"c" * 4096)  # never flushed: may be lost
        mount.cut()
        remote.close()
        host.close()
    finally:
        mount.close()
    _point(disk, backing)
    home = Home(disk / "home")
    try:
        v = home.pool("p").open_volume("v")
        buf = bytearray(8192)
        v.read_into(0, memoryview(buf))
        assert bytes(buf[:4096]) == b"b" * 4096, "a flushed in-place write was lost"
        assert bytes(buf[4096:]) in (b"a" * 4096, b"c" * 4096)
        v.close()
    finally:
        home.close()


@pytest.mark.usefixtures("fuse")
def test_an_owner_flush_syncs_data_plane_writes(tmp_path: Path) -> None:
    """``Pool.flush`` must sync the data planes' in-place writes although the pool never saw
    them and has nothing pending: a management operation flushes this way after the
    background commit took its batch, and must then still make durable every write a plane
    acknowledged before it (a snapshot taken then holds them)."""
    backing, mountpoint, disk = tmp_path / "backing", tmp_path / "mnt", tmp_path / "disk"
    backing.mkdir()
    mountpoint.mkdir()
    _point(disk, mountpoint)
    mount = Mount(backing, mountpoint, writeback=0.0, seed=0)
    try:
        home = Home(disk / "home")
        home.create_pool("p", [BackingSpec(str(disk / "b0.img"), size=DEVICE_BYTES)], 4096)
        pool = home.pool("p")
        pool.create_volume("v", VOLUME)
        volume = pool.open_volume("v")
        ours, theirs = socket.socketpair()
        host = PlaneHost(volume, ours)
        host.start()
        remote = RemoteVolume(theirs, os.dup(host.map.fd), pool.backing_fds(), 4096)
        remote.write(0, b"a" * 4096)  # allocates: done by the owner
        remote.flush()
        remote.write(0, b"b" * 4096)  # in place: the owner never sees it
        pool.flush()  # nothing pending, as after a background commit took the batch
        mount.cut()
        remote.close()
        host.close()
    finally:
        mount.close()
    _point(disk, backing)
    home = Home(disk / "home")
    try:
        v = home.pool("p").open_volume("v")
        buf = bytearray(4096)
        v.read_into(0, memoryview(buf))
        v.close()
        assert bytes(buf) == b"b" * 4096, "a flush left a data plane's in-place write unsynced"
    finally:
        home.close()


def test_file_cache_against_a_model(tmp_path: Path) -> None:
    """``FileCache`` shows every write and truncate at once but keeps them off the backing
    file, puts exactly the shown content there at a sync, writes back early only one sector
    of the newest content (zeros past the end) and never a size, and after a cut (a fresh
    cache) shows what the backing file holds."""
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    path = tmp_path / "f"
    path.write_bytes(rng.randbytes(10_000))
    fd = os.open(path, os.O_RDWR)
    try:
        cache = FileCache(fd)
        shown = bytearray(path.read_bytes())
        disk = bytes(shown)  # what the backing file must hold
        for step in range(3000):
            where = f"seed {seed}, step {step}"
            roll = rng.random()
            if roll < 0.45:
                offset, data = rng.randrange(40_000), rng.randbytes(rng.randrange(1, 9000))
                cache.write(offset, data)
                shown.extend(bytes(max(offset + len(data) - len(shown), 0)))
                shown[offset : offset + len(data)] = data
            elif roll < 0.6:
                size = rng.randrange(40_000)
                cache.truncate(size)
                shown = shown[:size] + bytes(max(size - len(shown), 0))
            elif roll < 0.75:
                cache.write_back_one(rng)
                now = path.read_bytes()
                assert len(now) == len(disk), f"{where}: an early write-back changed the size"
                changed = [
                    i
                    for i in range(0, len(now), SECTOR)
                    if now[i : i + SECTOR] != disk[i : i + SECTOR]
                ]
                assert len(changed) <= 1, f"{where}: more than one sector written back"
                newest = shown + bytes(max(len(now) - len(shown), 0))  # zeros past the end
                for i in changed:
                    assert now[i : i + SECTOR] == newest[i : i + SECTOR], f"{where}: stale sector"
                disk = now
            elif roll < 0.8:
                cache.sync()
                disk = bytes(shown)
                assert path.read_bytes() == disk, f"{where}: the sync wrote something else"
            elif roll < 0.85:
                cache = FileCache(fd)  # the power cut: the cache is gone
                shown = bytearray(disk)
            else:
                offset, length = rng.randrange(45_000), rng.randrange(1, 20_000)
                got = cache.read(offset, length)
                assert got == shown[offset : offset + length], f"{where}: read"
            assert cache.size == len(shown), f"{where}: size"
            if roll < 0.6:
                assert path.read_bytes() == disk, f"{where}: a write or truncate reached the disk"
    finally:
        os.close(fd)
