"""Volumes used from several threads while snapshots come and go."""

from __future__ import annotations

import random
import threading

import pytest

from gates import assert_waits_for_gate
from storvisor.engine.pool import Pool

CS = 64 << 10
REGION = 16 * CS


def test_writers_readers_and_snapshots_at_once(pool: Pool) -> None:
    pool.create_volume("v", 4 * REGION)
    handle = pool.open_volume("v")
    models = [bytearray(REGION) for _ in range(4)]
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer(i: int) -> None:
        rng = random.Random(i)
        try:
            for _ in range(300):
                offset = rng.randrange(REGION - 1)
                length = rng.randrange(1, min(REGION - offset, 3 * CS) + 1)
                if rng.random() < 0.15:
                    handle.discard(i * REGION + offset, length)
                    models[i][offset : offset + length] = bytes(length)
                else:
                    data = rng.randbytes(length)
                    handle.write(i * REGION + offset, data)
                    models[i][offset : offset + length] = data
                got = bytearray(length)
                handle.read_into(i * REGION + offset, memoryview(got))
                assert got == models[i][offset : offset + length], f"writer {i} read back"
        except BaseException as e:
            errors.append(e)

    def snapshotter() -> None:
        n = 0
        try:
            while not stop.is_set():
                pool.create_snapshot("v", f"s{n}")
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

    writers = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    helpers = [threading.Thread(target=snapshotter), threading.Thread(target=mapper)]
    for t in writers + helpers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in helpers:
        t.join()
    assert not errors, errors
    got = bytearray(4 * REGION)
    handle.read_into(0, memoryview(got))
    assert got == b"".join(models)
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
