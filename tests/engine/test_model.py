"""The engine against a ``bytearray`` model, driven by a Hypothesis state machine.

Volumes, snapshots (read-only, frozen copies), linked clones, flatten, rollback, discard,
write-zeroes, extend and close/reopen of the Home are applied to both the engine and a plain
in-memory model; every read must match the model, the pool's space accounting must stay
consistent after every step, and ``fsck`` must stay clean (checked every third step, after each
reopen and at the end). ``test_out_of_space`` checks the one case the model avoids: a full pool.
"""

from __future__ import annotations

import errno
import random
import shutil
import tempfile
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from storvisor.engine.device import BlockDevice
from storvisor.engine.home import Home
from storvisor.engine.pool import Pool
from storvisor.engine.types import BackingSpec
from storvisor.errors import Conflict, InvalidArgument, IOFailure, NoSpace, NotFound

KIB = 1024
POOL_BYTES = 16 << 20
MAX_VOLUMES = 5
MAX_SNAPSHOTS = 3
MAX_IO = 40 * KIB

volume_sizes = st.sampled_from([64 * KIB, 68 * KIB, 128 * KIB, 200 * KIB, 256 * KIB])


def _read(device: BlockDevice, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    device.read_into(offset, memoryview(buf))
    return bytes(buf)


class EngineModel(RuleBasedStateMachine):
    """One pool in a fresh Home per example; volume names ``v<N>``, clones ``c<N>``."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="storvisor-model-"))
        self.home: Home | None = None
        self.cluster_size = 0
        self.counter = 0
        self.volumes: dict[str, bytearray] = {}
        self.snaps: dict[str, dict[str, bytes]] = {}
        self.origin: dict[str, tuple[str, str] | None] = {}
        self.handles: dict[str, BlockDevice] = {}
        self.snap_handles: dict[tuple[str, str], BlockDevice] = {}
        self.backings = 1
        self.steps_since_reopen = 0

    # -- helpers -----------------------------------------------------------------------------

    @property
    def pool(self) -> Pool:
        assert self.home is not None
        return self.home.pool("p")

    def handle(self, name: str) -> BlockDevice:
        if name not in self.handles:
            self.handles[name] = self.pool.open_volume(name)
        return self.handles[name]

    def close_handle(self, name: str) -> None:
        device = self.handles.pop(name, None)
        if device is not None:
            device.close()

    def new_name(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def clones_of(self, volume: str, snapshot: str) -> list[str]:
        return [v for v, o in self.origin.items() if o == (volume, snapshot)]

    def pick_volume(self, data: st.DataObject) -> str:
        return data.draw(st.sampled_from(sorted(self.volumes)), label="volume")

    def pick_range(self, data: st.DataObject, size: int) -> tuple[int, int]:
        offset = data.draw(st.integers(0, size - 1), label="offset")
        length = data.draw(st.integers(1, min(MAX_IO, size - offset)), label="length")
        return offset, length

    def pick_snapshot(self, data: st.DataObject) -> tuple[str, str]:
        pairs = sorted((v, s) for v, snaps in self.snaps.items() for s in snaps)
        return data.draw(st.sampled_from(pairs), label="snapshot")

    def has_volumes(self) -> bool:
        return bool(self.volumes)

    def has_snapshots(self) -> bool:
        return any(self.snaps.values())

    def check_volume(self, name: str) -> None:
        expected = self.volumes[name]
        device = self.handle(name)
        assert device.size == len(expected), f"{name}: size {device.size} != {len(expected)}"
        assert _read(device, 0, len(expected)) == expected, f"{name} differs from the model"

    def close_snapshot_handles(self, volume: str, snapshot: str | None = None) -> None:
        for key in [k for k in self.snap_handles if k[0] == volume and snapshot in (None, k[1])]:
            self.snap_handles.pop(key).close()

    def check_snapshot(self, volume: str, snapshot: str) -> None:
        """Read the snapshot through its long-lived handle if one is open, else a new one."""
        expected = self.snaps[volume][snapshot]
        kept = self.snap_handles.get((volume, snapshot))
        device = kept or self.pool.open_volume(volume, snapshot)
        try:
            assert device.read_only, f"{volume}@{snapshot} opened writable"
            assert device.size == len(expected)
            got = _read(device, 0, len(expected))
            assert got == expected, f"{volume}@{snapshot} differs from its frozen copy"
            try:
                device.write(0, b"x")
            except IOFailure as e:
                assert e.errno == errno.EPERM, f"write to a snapshot: errno {e.errno}"
            else:
                raise AssertionError(f"write to snapshot {volume}@{snapshot} succeeded")
        finally:
            if kept is None:
                device.close()

    # -- set-up and tear-down ----------------------------------------------------------------

    @initialize(cluster_size=st.sampled_from([4 * KIB, 16 * KIB]), size=volume_sizes)
    def create_pool(self, cluster_size: int, size: int) -> None:
        self.cluster_size = cluster_size
        self.home = Home(self.dir / "home")
        backing = BackingSpec(str(self.dir / "backing0.img"), size=POOL_BYTES)
        info = self.home.create_pool("p", [backing], cluster_size=cluster_size)
        assert info.cluster_size == cluster_size
        assert info.stats.allocated == 0
        assert info.stats.provisioned == 0
        self.create_volume(size)

    def teardown(self) -> None:
        try:
            if self.home is not None:
                report = self.pool.fsck()
                assert report.clean, report
            for volume, _ in list(self.snap_handles):
                self.close_snapshot_handles(volume)
            for name in list(self.handles):
                self.close_handle(name)
            if self.home is not None:
                self.home.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- volumes -----------------------------------------------------------------------------

    @precondition(lambda self: len(self.volumes) < MAX_VOLUMES)
    @rule(size=volume_sizes)
    def create_volume(self, size: int) -> None:
        name = self.new_name("v")
        info = self.pool.create_volume(name, size)
        assert (info.name, info.size, info.allocated, info.origin) == (name, size, 0, None)
        self.volumes[name] = bytearray(size)
        self.snaps[name] = {}
        self.origin[name] = None

    @precondition(has_volumes)
    @rule(data=st.data())
    def create_duplicate_volume(self, data: st.DataObject) -> None:
        name = self.pick_volume(data)
        try:
            self.pool.create_volume(name, 64 * KIB)
        except Conflict:
            pass
        else:
            raise AssertionError(f"creating {name} twice succeeded")

    @precondition(has_volumes)
    @rule(data=st.data(), seed=st.integers(0, 2**32), count=st.integers(1, 3))
    def write(self, data: st.DataObject, seed: int, count: int) -> None:
        """Up to three writes to one volume (writes are most of what a disk sees)."""
        name = self.pick_volume(data)
        rng = random.Random(seed)
        for _ in range(count):
            offset, length = self.pick_range(data, len(self.volumes[name]))
            fua = data.draw(st.booleans(), label="fua")
            payload = rng.randbytes(length)
            self.handle(name).write(offset, payload, fua=fua)
            self.volumes[name][offset : offset + length] = payload

    @precondition(has_volumes)
    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        name = self.pick_volume(data)
        offset, length = self.pick_range(data, len(self.volumes[name]))
        got = _read(self.handle(name), offset, length)
        assert got == self.volumes[name][offset : offset + length], (
            f"read {name} [{offset}, +{length})"
        )

    @precondition(has_volumes)
    @rule(data=st.data())
    def block_status(self, data: st.DataObject) -> None:
        name = self.pick_volume(data)
        size = len(self.volumes[name])
        offset, length = self.pick_range(data, size)
        extents = self.handle(name).block_status(offset, length)
        assert extents, "block_status returned nothing"
        pos = offset
        for extent in extents:
            assert extent.offset == pos and extent.length > 0, f"gap or overlap: {extents}"
            if extent.zero or not extent.allocated:
                region = self.volumes[name][extent.offset : extent.offset + extent.length]
                assert region == bytes(len(region)), f"{name}: {extent} holds data"
            pos += extent.length
        assert pos >= offset + length, f"extents stop short: {extents}"

    @precondition(has_volumes)
    @rule(data=st.data())
    def read_through_second_handle(self, data: st.DataObject) -> None:
        name = self.pick_volume(data)
        self.handle(name)  # a first handle stays open
        second = self.pool.open_volume(name)
        try:
            assert _read(second, 0, second.size) == self.volumes[name]
        finally:
            second.close()

    @precondition(has_volumes)
    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        name = self.pick_volume(data)
        offset, length = self.pick_range(data, len(self.volumes[name]))
        self.handle(name).discard(offset, length)
        self.volumes[name][offset : offset + length] = bytes(length)

    @precondition(has_volumes)
    @rule(data=st.data(), may_unmap=st.booleans(), fua=st.booleans())
    def write_zeroes(self, data: st.DataObject, may_unmap: bool, fua: bool) -> None:
        name = self.pick_volume(data)
        offset, length = self.pick_range(data, len(self.volumes[name]))
        self.handle(name).write_zeroes(offset, length, may_unmap=may_unmap, fua=fua)
        self.volumes[name][offset : offset + length] = bytes(length)

    @precondition(has_volumes)
    @rule(data=st.data())
    def discard_everything(self, data: st.DataObject) -> None:
        """Discarding a whole volume frees every cluster it owns (once the free commits)."""
        name = self.pick_volume(data)
        size = len(self.volumes[name])
        owned = self.pool.volume_info(name).allocated
        before = self.pool.info().stats.allocated
        self.handle(name).discard(0, size)
        self.volumes[name][:] = bytes(size)
        self.pool.flush()
        # a partial last cluster may legitimately stay mapped
        slack = self.cluster_size if size % self.cluster_size else 0
        after_owned = self.pool.volume_info(name).allocated
        assert after_owned <= slack, f"{name} still owns {after_owned} bytes after discard"
        after = self.pool.info().stats.allocated
        assert after <= before - owned + slack, f"pool allocated {before} -> {after}"

    @precondition(has_volumes)
    @rule(data=st.data(), grow=st.sampled_from([4 * KIB, 16 * KIB, 60 * KIB]))
    def extend(self, data: st.DataObject, grow: int) -> None:
        name = self.pick_volume(data)
        new_size = len(self.volumes[name]) + grow
        info = self.pool.extend_volume(name, new_size)
        assert info.size == new_size
        self.volumes[name].extend(bytes(grow))
        assert self.handle(name).size == new_size, "an open handle must see the new size"

    @precondition(has_volumes)
    @rule(data=st.data())
    def shrink_is_refused(self, data: st.DataObject) -> None:
        name = self.pick_volume(data)
        try:
            self.pool.extend_volume(name, len(self.volumes[name]) - 4 * KIB)
        except InvalidArgument:
            pass
        else:
            raise AssertionError(f"shrinking {name} succeeded")

    @precondition(has_volumes)
    @rule(data=st.data(), whole_pool=st.booleans())
    def flush(self, data: st.DataObject, whole_pool: bool) -> None:
        if whole_pool:
            self.pool.flush()
        else:
            self.handle(self.pick_volume(data)).flush()

    @precondition(has_volumes)
    @rule(data=st.data())
    def delete_volume(self, data: st.DataObject) -> None:
        name = self.pick_volume(data)
        pinned = [s for s in self.snaps[name] if self.clones_of(name, s)]
        self.handle(name)
        try:
            self.pool.delete_volume(name)
        except Conflict:
            pass
        else:
            raise AssertionError(f"deleted {name} while a handle was open")
        self.close_handle(name)
        self.close_snapshot_handles(name)
        owned = self.pool.volume_info(name).allocated
        before = self.pool.info().stats.allocated
        if pinned:
            try:
                self.pool.delete_volume(name)
            except Conflict:
                return
            raise AssertionError(f"deleted {name} although clones depend on {pinned}")
        self.pool.delete_volume(name)
        del self.volumes[name], self.snaps[name], self.origin[name]
        self.pool.flush()
        after = self.pool.info().stats.allocated
        assert after <= before - owned, f"pool allocated {before} -> {after} deleting {owned}"
        try:
            self.pool.volume_info(name)
        except NotFound:
            pass
        else:
            raise AssertionError(f"{name} still listed after delete")

    # -- snapshots ---------------------------------------------------------------------------

    @precondition(has_volumes)
    @rule(data=st.data())
    def create_snapshot(self, data: st.DataObject) -> None:
        name = self.pick_volume(data)
        if len(self.snaps[name]) >= MAX_SNAPSHOTS:
            return
        snap = self.new_name("s")
        info = self.pool.create_snapshot(name, snap)
        assert (info.volume, info.name, info.size) == (name, snap, len(self.volumes[name]))
        self.snaps[name][snap] = bytes(self.volumes[name])
        try:
            self.pool.create_snapshot(name, snap)
        except Conflict:
            pass
        else:
            raise AssertionError(f"snapshot {name}@{snap} created twice")

    @precondition(has_snapshots)
    @rule(data=st.data())
    def read_snapshot(self, data: st.DataObject) -> None:
        self.check_snapshot(*self.pick_snapshot(data))

    @precondition(has_snapshots)
    @rule(data=st.data())
    def keep_snapshot_open(self, data: st.DataObject) -> None:
        """A snapshot handle left open must keep reading the frozen data while its volume
        is written, discarded, rolled back or snapshotted again."""
        key = self.pick_snapshot(data)
        if key not in self.snap_handles:
            self.snap_handles[key] = self.pool.open_volume(*key)
        self.check_snapshot(*key)

    @precondition(has_snapshots)
    @rule(data=st.data())
    def delete_snapshot(self, data: st.DataObject) -> None:
        volume, snap = self.pick_snapshot(data)
        if (volume, snap) in self.snap_handles:
            try:
                self.pool.delete_snapshot(volume, snap)
            except Conflict:
                pass
            else:
                raise AssertionError(f"deleted {volume}@{snap} while a handle was open")
            self.close_snapshot_handles(volume, snap)
        if self.clones_of(volume, snap):
            try:
                self.pool.delete_snapshot(volume, snap)
            except Conflict:
                return
            raise AssertionError(f"deleted {volume}@{snap} although clones depend on it")
        self.pool.delete_snapshot(volume, snap)
        del self.snaps[volume][snap]
        assert snap not in {s.name for s in self.pool.snapshots(volume)}

    @precondition(has_snapshots)
    @rule(data=st.data())
    def rollback(self, data: st.DataObject) -> None:
        volume, snap = self.pick_snapshot(data)
        self.handle(volume)
        try:
            self.pool.rollback(volume, snap)
        except Conflict:
            pass
        else:
            raise AssertionError(f"rolled back {volume} while a handle was open")
        self.close_handle(volume)
        info = self.pool.rollback(volume, snap)
        self.volumes[volume] = bytearray(self.snaps[volume][snap])
        assert info.size == len(self.volumes[volume])
        self.check_volume(volume)

    @precondition(lambda self: self.has_snapshots() and len(self.volumes) < MAX_VOLUMES)
    @rule(data=st.data())
    def clone(self, data: st.DataObject) -> None:
        volume, snap = self.pick_snapshot(data)
        new = self.new_name("c")
        info = self.pool.clone(volume, snap, new)
        assert info.origin == f"{volume}@{snap}", info
        assert info.size == len(self.snaps[volume][snap])
        self.volumes[new] = bytearray(self.snaps[volume][snap])
        self.snaps[new] = {}
        self.origin[new] = (volume, snap)
        clones = {s.name: s.clones for s in self.pool.snapshots(volume)}
        assert new in clones[snap], f"{volume}@{snap} lists clones {clones[snap]}"

    @precondition(lambda self: any(o is not None for o in self.origin.values()))
    @rule(data=st.data())
    def flatten(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(v for v, o in self.origin.items() if o)))
        info = self.pool.flatten(name)
        assert info.origin is None
        self.origin[name] = None
        self.check_volume(name)

    # -- the pool ---------------------------------------------------------------------------

    @precondition(lambda self: self.backings < 3)
    @rule(megabytes=st.integers(1, 4))
    def add_backing(self, megabytes: int) -> None:
        """A device added online adds its clusters to the pool's capacity."""
        self.pool.flush()  # add_backing commits; clusters whose release is pending free up
        before = self.pool.info().stats
        path = self.dir / f"backing{self.backings}.img"
        info = self.pool.add_backing(BackingSpec(str(path), size=megabytes << 20))
        self.backings += 1
        assert len(info.backings) == self.backings, info.backings
        grown = info.stats.capacity - before.capacity
        assert (megabytes << 20) - 2 * self.cluster_size <= grown <= megabytes << 20, info
        assert info.stats.allocated == before.allocated, info

    # -- the whole Home ----------------------------------------------------------------------

    @precondition(lambda self: self.steps_since_reopen >= 10)
    @rule()
    def reopen_home(self) -> None:
        """After a flush and a clean close, everything persists."""
        assert self.home is not None
        self.pool.flush()
        stats = self.pool.info().stats
        capacity_allocated = (stats.capacity, stats.allocated)
        for name in list(self.handles):
            self.close_handle(name)
        for volume, _ in list(self.snap_handles):
            self.close_snapshot_handles(volume)
        self.home.close()
        self.steps_since_reopen = 0
        self.home = Home(self.dir / "home")
        assert [p.name for p in self.home.pools()] == ["p"]
        info = self.pool.info()
        assert len(info.backings) == self.backings, info.backings
        assert (info.stats.capacity, info.stats.allocated) == capacity_allocated, info
        assert sorted(v.name for v in self.pool.volumes()) == sorted(self.volumes)
        for name in self.volumes:
            self.check_volume(name)
            assert sorted(s.name for s in self.pool.snapshots(name)) == sorted(self.snaps[name])
            for snap in self.snaps[name]:
                self.check_snapshot(name, snap)
            origin = self.origin[name]
            expected = None if origin is None else f"{origin[0]}@{origin[1]}"
            assert self.pool.volume_info(name).origin == expected

    # -- invariants --------------------------------------------------------------------------

    @invariant()
    def fsck_clean(self) -> None:
        """Every third step (``fsck`` commits, and steps in between must not need it)."""
        if self.home is None:
            return
        self.steps_since_reopen += 1
        if self.steps_since_reopen % 3:
            return
        report = self.pool.fsck()
        assert report.clean, report

    @invariant()
    def space_accounting(self) -> None:
        if self.home is None:
            return
        info = self.pool.info()
        stats = info.stats
        assert stats.allocated + stats.free == stats.capacity, stats
        assert stats.allocated % self.cluster_size == 0, stats
        assert stats.provisioned == sum(len(v) for v in self.volumes.values()), stats
        volumes = self.pool.volumes()
        assert sorted(v.name for v in volumes) == sorted(self.volumes)
        owned = 0
        for v in volumes:
            assert v.size == len(self.volumes[v.name]), v
            clusters = -(-v.size // self.cluster_size)
            assert 0 <= v.allocated <= clusters * self.cluster_size, v
            owned += v.allocated
        assert owned <= stats.allocated, f"volumes own {owned} > pool allocated {stats}"


EngineModel.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=60,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestEngineModel = EngineModel.TestCase


def test_out_of_space(tmp_path: Path) -> None:
    """A write that finds no free cluster fails with ``NoSpace`` (ENOSPC) and changes nothing
    else: earlier data stays, fsck stays clean, and space freed by a discard is usable again
    once the discard is committed."""
    home = Home(tmp_path / "home")
    try:
        home.create_pool("p", [BackingSpec(str(tmp_path / "small.img"), size=1 << 20)], 4096)
        pool = home.pool("p")
        capacity = pool.info().stats.capacity
        pool.create_volume("v", 2 * capacity)
        device = pool.open_volume("v")
        rng = random.Random(7)
        model = bytearray(2 * capacity)
        offset = 0
        with pytest.raises(NoSpace) as failure:
            while True:
                chunk = rng.randbytes(10_000)
                device.write(offset, chunk)
                model[offset : offset + len(chunk)] = chunk
                offset += len(chunk)
        assert failure.value.errno == errno.ENOSPC
        assert offset >= capacity - 10_000 - 4096, f"NoSpace after {offset} of {capacity} bytes"
        stats = pool.info().stats
        assert (stats.allocated, stats.free) == (capacity, 0), stats
        # the failed write may have filled the clusters it could get; all else is unchanged
        assert _read(device, 0, offset) == model[:offset]
        tail = _read(device, offset + 10_000, len(model) - offset - 10_000)
        assert tail == bytes(len(tail))
        assert pool.fsck().clean
        device.discard(0, 64 * KIB)
        model[: 64 * KIB] = bytes(64 * KIB)
        device.flush()
        device.write(offset + 10_000, b"x" * 20_000)
        model[offset + 10_000 : offset + 30_000] = b"x" * 20_000
        assert _read(device, offset + 10_000, 20_000) == model[offset + 10_000 : offset + 30_000]
        assert _read(device, 0, offset) == model[:offset]
        device.close()
        report = pool.fsck()
        assert report.clean, report
    finally:
        home.close()
