"""Placement: whatever order clusters are first written in, each 1 MiB of a volume ends up as
one contiguous run on the backing device (looked at in the committed maps)."""

from __future__ import annotations

import os
import random
import sqlite3
from itertools import pairwise

from storvisor.engine.home import Home
from storvisor.engine.pool import Pool
from storvisor.engine.volume import Volume

CS = 64 << 10
MIB = 1 << 20
SIZE = 32 << 20


def top_map(pool: Pool, volume: str) -> dict[int, int]:
    """The committed map of the volume's top layer: virtual -> physical cluster."""
    pool.flush()
    db = sqlite3.connect(f"file:{pool.directory / 'catalog.db'}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT vc, phys FROM map WHERE layer = (SELECT top FROM volumes WHERE name = ?)",
            (volume,),
        ).fetchall()
    finally:
        db.close()
    return dict(rows)


def runs(pool: Pool, volume: str, size: int) -> list[int]:
    """Contiguous physical runs in each 1 MiB region of the volume's top layer."""
    layer_map = top_map(pool, volume)
    per = MIB // CS
    counts = []
    for region in range(size // MIB):
        phys = [layer_map.get(vc, -2) for vc in range(region * per, (region + 1) * per)]
        assert min(phys) >= 0, f"region {region} is not wholly owned by the top"
        counts.append(1 + sum(b != a + 1 for a, b in pairwise(phys)))
    return counts


def random_4k_writes(handle: Volume, count: int, seed: int) -> None:
    rng = random.Random(seed)
    data = os.urandom(4096)
    for _ in range(count):
        handle.write(rng.randrange(handle.size // 4096) * 4096, data)


def sequential_1m_pass(handle: Volume) -> None:
    data = os.urandom(MIB)
    for offset in range(0, handle.size, MIB):
        handle.write(offset, data)


def test_copy_on_write_after_snapshots_keeps_each_mib_contiguous(pool: Pool) -> None:
    pool.create_volume("v", SIZE)
    handle = pool.open_volume("v")
    for i in range(10):  # each layer of the chain owns data
        handle.write(i * 3 * MIB, os.urandom(3 * MIB))
        pool.create_snapshot("v", f"s{i}")
    random_4k_writes(handle, 300, seed=1)  # copy-on-write, scattered
    sequential_1m_pass(handle)
    assert runs(pool, "v", SIZE) == [1] * (SIZE // MIB)
    handle.close()
    assert pool.fsck().clean


def test_random_first_writes_then_a_fill_are_contiguous(pool: Pool) -> None:
    pool.create_volume("v", SIZE)
    handle = pool.open_volume("v")
    random_4k_writes(handle, 200, seed=2)
    sequential_1m_pass(handle)
    assert runs(pool, "v", SIZE) == [1] * (SIZE // MIB)
    handle.close()


def test_placement_survives_a_reopen(home: Home, pool: Pool) -> None:
    """After a restart the anchors come from the top layer's map."""
    pool.create_volume("v", SIZE)
    handle = pool.open_volume("v")
    handle.write(0, os.urandom(SIZE))
    pool.create_snapshot("v", "s")
    random_4k_writes(handle, 100, seed=3)
    handle.close()
    home.close()
    with Home(home.path) as again:
        pool = again.pool("p")
        handle = pool.open_volume("v")
        random_4k_writes(handle, 100, seed=4)
        sequential_1m_pass(handle)
        assert runs(pool, "v", SIZE) == [1] * (SIZE // MIB)
        handle.close()


def test_flatten_copies_into_contiguous_groups(pool: Pool) -> None:
    pool.create_volume("v", SIZE)
    handle = pool.open_volume("v")
    random_4k_writes(handle, 400, seed=5)  # the base: scattered first writes
    pool.create_snapshot("v", "s")
    handle.close()
    pool.clone("v", "s", "c")
    clone = pool.open_volume("c")
    random_4k_writes(clone, 50, seed=6)
    clone.close()
    pool.flatten("c")
    layer_map = top_map(pool, "c")
    per = MIB // CS
    for region in range(SIZE // MIB):
        vcs = [vc for vc in range(region * per, (region + 1) * per) if vc in layer_map]
        # every cluster of the region sits at its own position in one group
        assert len({layer_map[vc] - vc % per for vc in vcs}) == 1
    assert pool.fsck().clean
