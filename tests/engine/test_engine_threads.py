"""Volumes used from several threads while snapshots come and go."""

from __future__ import annotations

import itertools
import os
import random
import socket
import sys
import threading
import time

import pytest

from gates import STALL, assert_waits_for_gate
from storvisor.engine import pio
from storvisor.engine.device import BlockDevice
from storvisor.engine.pool import Pool
from storvisor.exports.dataplane import PlaneHost, RemoteVolume
from waiting import Background

CS = 64 << 10
REGION = 16 * CS


class Plane:
    """A handle of volume ``name`` served through a ``PlaneHost`` to a ``RemoteVolume`` (both
    ends in this process), the way a data-plane process writes in place."""

    def __init__(self, pool: Pool, name: str) -> None:
        self.volume = pool.open_volume(name)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.host = PlaneHost(self.volume, ours)
        self.host.start()
        self.remote = RemoteVolume(
            theirs, os.dup(self.host.map.fd), pool.backing_fds(), pool.cluster_size
        )

    def close(self) -> None:
        self.remote.close()
        self.host.close()
        self.volume.close()


SECTOR = 512
BLOCK = 4096
STRIPES = 4
SNAPSHOTS = 20
"""Writer ``i`` owns the 4 KiB blocks ``b`` with ``b % STRIPES == i``: the writers share every
cluster, so a write that lands in a cluster after a snapshot shared it is lost to a
neighbour's copy-on-write."""


class _Writes:
    """One writer's writes, in order: ``log[j]`` is ``(offset, data)`` (zeros for
    write-zeroes); ``started`` counts the writes issued, ``completed`` those that returned."""

    def __init__(self) -> None:
        self.log: list[tuple[int, bytes]] = []
        self.started = 0
        self.completed = 0


def _check_snapshot(
    data: bytes, writes: list[_Writes], low: list[int], high: list[int], where: str
) -> None:
    """``data`` (a snapshot's content) holds, in every sector, what that sector held after
    some number of each writer's writes between ``low`` (completed before the snapshot call)
    and ``high`` (issued before it returned)."""
    state = bytearray(len(data))
    for w, lo in zip(writes, low, strict=True):
        for offset, chunk in w.log[:lo]:
            state[offset : offset + len(chunk)] = chunk
    wrong = {
        s for s in range(0, len(data), SECTOR) if data[s : s + SECTOR] != state[s : s + SECTOR]
    }
    for w, lo, hi in zip(writes, low, high, strict=True):
        for offset, chunk in w.log[lo:hi]:  # the writes that may or may not be in it
            state[offset : offset + len(chunk)] = chunk
            first = offset // SECTOR * SECTOR
            for s in range(first, offset + len(chunk), SECTOR):
                if s in wrong and data[s : s + SECTOR] == state[s : s + SECTOR]:
                    wrong.discard(s)
    assert not wrong, f"{where}: sectors {sorted(wrong)[:8]} hold no write of their window"


@pytest.mark.parametrize("where", ["volume", "plane"])
def test_writers_readers_and_snapshots_at_once(pool: Pool, where: str) -> None:
    """Writers (on the volume's handle, or in a data plane), a reader of block status and a
    snapshotter at once. Every write reads back; every snapshot, read back at once, holds in
    each sector the content of a state between the writes completed before the snapshot
    call and those issued before it returned; the volume ends with the model's content."""
    size = 4 * REGION
    pool.create_volume("v", size)
    handle = pool.open_volume("v")
    plane: Plane | None = Plane(pool, "v") if where == "plane" else None
    device: BlockDevice = handle if plane is None else plane.remote
    writes = [_Writes() for _ in range(STRIPES)]
    lock = threading.Lock()
    errors: list[BaseException] = []
    stop = threading.Event()
    enough = threading.Event()  # the writers may end once SNAPSHOTS were checked
    checked = [0]

    def writer(i: int) -> None:
        rng = random.Random(i)
        mine = writes[i]
        try:
            for op in itertools.count():
                if op >= 300 and enough.is_set():
                    break
                block = rng.randrange(i, size // BLOCK, STRIPES)
                start = rng.randrange(BLOCK)
                length = rng.randrange(1, BLOCK - start + 1)
                offset = block * BLOCK + start
                zero = rng.random() < 0.15
                data = bytes(length) if zero else rng.randbytes(length)
                with lock:
                    mine.log.append((offset, data))
                    mine.started += 1
                if zero:
                    device.write_zeroes(offset, length)
                else:
                    device.write(offset, data)
                with lock:
                    mine.completed += 1
                got = bytearray(length)
                device.read_into(offset, memoryview(got))
                assert got == data, f"writer {i} read back at {offset}"
        except BaseException as e:
            errors.append(e)

    def snapshotter() -> None:
        n = 0
        try:
            while not stop.is_set():
                with lock:
                    low = [w.completed for w in writes]
                pool.create_snapshot("v", f"s{n}")
                with lock:
                    high = [w.started for w in writes]
                snap = pool.open_volume("v", f"s{n}")
                data = bytearray(size)
                snap.read_into(0, memoryview(data))
                snap.close()
                _check_snapshot(bytes(data), writes, low, high, f"snapshot s{n}")
                checked[0] += 1
                if checked[0] == SNAPSHOTS:
                    enough.set()
                if n >= 2:
                    pool.delete_snapshot("v", f"s{n - 2}")
                n += 1
        except BaseException as e:
            errors.append(e)

    def mapper() -> None:
        try:
            while not stop.is_set():
                extents = handle.block_status(0, handle.size)
                assert sum(e.length for e in extents) == handle.size
        except BaseException as e:
            errors.append(e)

    writers = [threading.Thread(target=writer, args=(i,)) for i in range(STRIPES)]
    helpers = [threading.Thread(target=snapshotter), threading.Thread(target=mapper)]
    try:
        for t in writers + helpers:
            t.start()
        for t in writers:
            t.join(STALL)
        stop.set()
        for t in helpers:
            t.join(STALL)
        assert not any(t.is_alive() for t in writers + helpers), "a thread hung"
        assert not errors, errors
        model = bytearray(size)
        for w in writes:
            for offset, chunk in w.log:
                model[offset : offset + len(chunk)] = chunk
        got = bytearray(size)
        device.read_into(0, memoryview(got))
        assert got == model
    finally:
        stop.set()
        if plane is not None:
            plane.close()
    handle.close()
    report = pool.fsck()
    assert report.clean, report


@pytest.mark.parametrize("round_", range(4))
def test_concurrent_first_writes_to_one_cluster_all_land(pool: Pool, round_: int) -> None:
    """Threads writing different sectors of the same new clusters: no write may be lost to a
    second allocation of the same cluster."""
    pool.create_volume("v", 8 * CS)
    handle = pool.open_volume("v")
    handle.write(0, b"\xee" * 4 * CS)
    pool.create_snapshot("v", "s")  # half of the clusters are then copied on write
    errors: list[BaseException] = []
    sectors = CS // 512
    barrier = threading.Barrier(8)

    def writer(i: int) -> None:
        try:
            barrier.wait()
            for sector in range(i, 8 * sectors, 8):
                handle.write(sector * 512, bytes([i + 1]) * 512)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    got = bytearray(8 * CS)
    handle.read_into(0, memoryview(got))
    expected = b"".join(bytes([s % 8 + 1]) * 512 for s in range(8 * sectors))
    assert got == expected
    assert pool.volume_info("v").allocated == 8 * CS
    handle.close()
    assert pool.fsck().clean


def _same(got: bytes | bytearray, expected: bytes) -> None:
    wrong = [
        i for i in range(0, len(expected), BLOCK) if got[i : i + BLOCK] != expected[i : i + BLOCK]
    ]
    assert not wrong, f"the 4 KiB blocks at {wrong[:8]} differ"


class _Held:
    """A route (``pio.route``) for a pool's fd that holds every write of exactly ``size``
    bytes until ``release`` is set, and records the length of each write."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.held = threading.Event()
        self.release = threading.Event()
        self.writes: list[int] = []

    def read(self, views: list[memoryview], offset: int) -> None:
        assert os.preadv(self.fd, views, offset) == sum(len(v) for v in views)

    def write(self, views: list[memoryview], offset: int) -> None:
        size = sum(len(v) for v in views)
        self.writes.append(size)
        if size == self.size and not self.release.is_set():
            self.held.set()
            assert self.release.wait(30), "never released"
        assert os.pwritev(self.fd, views, offset) == size


def test_new_clusters_of_one_write_are_written_together(pool: Pool) -> None:
    """A write of whole clusters the volume does not have yet places them together and
    writes them with one system call where they lie contiguous (here: all of them)."""
    pool.create_volume("v", 32 * CS)
    handle = pool.open_volume("v")
    (fd,) = pool.backing_fds().values()
    route = _Held(fd, -1)
    pio.route(fd, route)
    try:
        handle.write(0, b"\x01" * 16 * CS)
        handle.write(20 * CS + 512, b"\x02" * 4 * CS)  # a partial cluster at each end
    finally:
        pio.route(fd, None)
    assert route.writes == [16 * CS, CS, 3 * CS, CS]
    got = bytearray(32 * CS)
    handle.read_into(0, memoryview(got))
    _same(got, b"\x01" * 16 * CS + bytes(4 * CS + 512) + b"\x02" * 4 * CS + bytes(8 * CS - 512))
    handle.close()
    assert pool.fsck().clean


def test_a_run_of_new_clusters_waits_for_one_being_allocated(pool: Pool) -> None:
    """A write of whole new clusters that meets one another writer is still allocating
    allocates the others, waits for that one and then writes it in place: the cluster ends
    up all the later write's, with none of the zeros around the first writer's 4 KiB."""
    pool.create_volume("v", 8 * CS)
    handle = pool.open_volume("v")
    (fd,) = pool.backing_fds().values()
    route = _Held(fd, CS)
    pio.route(fd, route)
    try:
        first = Background(lambda: handle.write(3 * CS + 4096, b"a" * 4096))
        assert route.held.wait(10), "the first write never reached its cluster"
        run = Background(lambda: handle.write(CS, b"b" * 5 * CS))
        run.join(1.0)  # it must wait for cluster 3 (a run that took it too returns now)
        route.release.set()
        first.join(10)
        run.join(10)
        assert not first.is_alive() and not run.is_alive(), "a write hangs"
        assert first.outcome is None and run.outcome is None, (first.outcome, run.outcome)
    finally:
        pio.route(fd, None)
    got = bytearray(8 * CS)
    handle.read_into(0, memoryview(got))
    _same(got, bytes(CS) + b"b" * 5 * CS + bytes(2 * CS))
    assert pool.volume_info("v").allocated == 5 * CS
    handle.close()
    assert pool.fsck().clean


def test_snapshot_waits_for_in_place_writes_in_flight(pool: Pool) -> None:
    """A write that found its cluster owned holds the volume's gate until its pwritev is
    done; a snapshot freezes the gate before the cluster becomes shared, so the write can
    never land in the snapshot after it was taken."""
    pool.create_volume("v", 1 << 20)
    volume = pool.open_volume("v")
    volume.write(0, b"a" * 65536)
    # the gate held as by a write between its lookup and its pwritev
    assert_waits_for_gate(
        volume._state.gate,
        lambda: pool.create_snapshot("v", "s"),
        "the snapshot did not wait for the write in flight",
    )
    volume.write(0, b"b" * 512)
    snap = pool.open_volume("v", "s")
    buf = bytearray(512)
    snap.read_into(0, memoryview(buf))
    assert bytes(buf) == b"a" * 512
    snap.close()
    volume.close()


def _parked_in_gate(thread: threading.Thread) -> bool:
    """Whether ``thread`` waits inside ``Gate.enter`` (for a frozen gate to thaw)."""
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        if frame.f_code.co_name == "enter" and "sharedmap" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def test_an_owned_write_parked_at_the_gate_copies_after_a_snapshot(pool: Pool) -> None:
    """An allocating write that finds its cluster owned (another writer allocated it) and then
    waits at the gate while a snapshot shares that cluster must look again inside the gate
    and copy on write: the snapshot keeps its data."""
    pool.create_volume("v", 1 << 20)
    volume = pool.open_volume("v")
    volume.write(0, b"a" * 65536)
    state = volume._state
    state.gate.freeze()  # as a snapshot or a reuse of freed clusters in progress
    errors: list[BaseException] = []

    def write() -> None:
        try:
            state.allocating_write(0, 0, memoryview(b"b" * 512))  # finds cluster 0 owned
        except BaseException as e:
            errors.append(e)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    deadline = time.monotonic() + STALL
    while not _parked_in_gate(writer):
        assert writer.is_alive(), f"the write did not wait for the frozen gate: {errors}"
        assert time.monotonic() < deadline, "the write hung before the gate"
        time.sleep(0.01)
    pool.create_snapshot("v", "s")  # freezes the gate again, shares the cluster, thaws
    state.gate.thaw()
    writer.join(STALL)
    assert not writer.is_alive() and not errors, errors
    snap = pool.open_volume("v", "s")
    buf = bytearray(1024)
    snap.read_into(0, memoryview(buf))
    snap.close()
    assert bytes(buf) == b"a" * 1024, "a write landed in the snapshot after it was taken"
    volume.read_into(0, memoryview(buf))
    assert bytes(buf) == b"b" * 512 + b"a" * 512
    volume.close()
    assert pool.fsck().clean


def test_freed_clusters_wait_for_reads_in_flight(pool: Pool) -> None:
    """A read that found a cluster holds the gate until its preadv is done; the commit that
    would make a discarded cluster reusable waits for it, so the read can never return
    another volume's data."""
    pool.create_volume("v", 1 << 20)
    volume = pool.open_volume("v")
    volume.write(0, b"a" * 65536)
    volume.flush()
    volume.discard(0, 65536)
    # the gate held as by a read between its lookup and its preadv
    assert_waits_for_gate(
        volume._state.gate, pool.flush, "the freed cluster was recycled under a read in flight"
    )
    volume.close()
