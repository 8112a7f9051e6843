"""Allocation: its CPU cost on the first-write path, and the physical layout it leaves.

Rows (CPU time of the calling thread per operation, the background commit excluded, so a
busy machine disturbs them little):

* ``Allocator.allocate``: the allocator alone, handing out every cluster of a 64 GiB device;
* ``first 4k write``: ``Volume.write`` of 4 KiB to a cluster nothing maps yet (random order
  over a fresh volume: every write allocates and zero-fills a 64 KiB cluster);
* ``COW 4k write``: the same over a volume with 10 snapshots whose base owns every cluster
  (every write copies a cluster).

Then the layout test of the NBD benchmark's snapshotted volume, in miniature: random 4 KiB
copy-on-write writes, then a sequential pass of 1 MiB writes; it prints how many ``pwritev``
calls (contiguous physical runs) a 1 MiB request over the result needs, on average.

Run: ``.venv/bin/python bench/allocation.py``; about ten seconds.
"""

from __future__ import annotations

import os
import random
import resource
import sqlite3
import tempfile
from collections.abc import Callable
from pathlib import Path

from storvisor.engine.allocator import Allocator, group_clusters
from storvisor.engine.home import Home
from storvisor.engine.pool import Pool
from storvisor.engine.types import BackingSpec

CS = 64 << 10
SIZE = 256 << 20
MIB_CLUSTERS = (1 << 20) // CS
RUSAGE_THREAD = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)


def cpu_ns_per_op(func: Callable[[], object], count: int) -> tuple[float, float]:
    """User and system CPU time of this thread per operation, in ns."""
    before = resource.getrusage(RUSAGE_THREAD)
    func()
    after = resource.getrusage(RUSAGE_THREAD)
    user = (after.ru_utime - before.ru_utime) * 1e9 / count
    system = (after.ru_stime - before.ru_stime) * 1e9 / count
    return user, system


def row(label: str, times: tuple[float, float]) -> None:
    print(f"{label:<28} {times[0]:>8.0f} {times[1]:>8.0f}")


def runs_per_mib(pool: Pool, volume: str, size: int) -> float:
    """Contiguous physical runs per 1 MiB of the volume's top layer, from the catalog."""
    pool.flush()
    with sqlite3.connect(f"file:{pool.directory / 'catalog.db'}?mode=ro", uri=True) as db:
        rows = db.execute(
            "SELECT vc, phys FROM map WHERE layer = (SELECT top FROM volumes WHERE name = ?)",
            (volume,),
        ).fetchall()
    layer_map = dict(rows)
    regions = size // (1 << 20)
    runs = 0
    for region in range(regions):
        prev = None
        for vc in range(region * MIB_CLUSTERS, (region + 1) * MIB_CLUSTERS):
            phys = layer_map.get(vc)
            if phys is None or phys < 0 or prev is None or phys != prev + 1:
                runs += 1
            prev = phys
    return runs / regions


def main() -> None:
    rng = random.Random(0)
    print(f"{'CPU ns per operation':<28} {'user':>8} {'system':>8}")
    clusters = (64 << 30) // CS
    group = group_clusters(CS)
    vcs = list(range(clusters))
    rng.shuffle(vcs)
    alloc = Allocator({0: clusters}, [], group)
    homes: dict[int, int] = {}

    def place() -> None:  # what ``VolumeState.place`` does, in random virtual order
        for vc in vcs:
            g, pos = divmod(vc, group)
            homes[g] = alloc.allocate(pos, homes.get(g)) - pos

    row("place, random order", cpu_ns_per_op(place, clusters))
    alloc = Allocator({0: clusters}, [])
    row(
        "Allocator.allocate",
        cpu_ns_per_op(lambda: [alloc.allocate() for _ in range(clusters)], clusters),
    )

    data = os.urandom(4096)
    with (
        tempfile.TemporaryDirectory(prefix="storvisor-alloc-", dir="/var/tmp") as tmp,
        Home(Path(tmp) / "home") as home,
    ):
        home.create_pool("p", [BackingSpec(str(Path(tmp) / "d.img"), 4 * SIZE)], CS)
        pool = home.pool("p")
        n = SIZE // CS
        order = list(range(n))
        rng.shuffle(order)

        pool.create_volume("fresh", SIZE)
        fresh = pool.open_volume("fresh")

        def first_writes() -> None:
            for vc in order:
                fresh.write(vc * CS + 4096 * rng.randrange(16), data)

        row("first 4k write", cpu_ns_per_op(first_writes, n))
        fresh.close()
        pool.delete_volume("fresh")

        pool.create_volume("chain", SIZE)
        chain = pool.open_volume("chain")
        chain.write(0, bytes(SIZE))
        for i in range(10):
            pool.create_snapshot("chain", f"s{i}")

        def cow_writes() -> None:
            for vc in order:
                chain.write(vc * CS + 4096 * rng.randrange(16), data)

        # copy-on-write of a random half, then the sequential pass copies the rest
        half = order[: n // 2]
        row(
            "COW 4k write",
            cpu_ns_per_op(lambda: [chain.write(vc * CS, data) for vc in half], len(half)),
        )
        mib = os.urandom(1 << 20)
        for offset in range(0, SIZE, 1 << 20):
            chain.write(offset, mib)
        print(f"{'runs per 1 MiB after COW':<28} {runs_per_mib(pool, 'chain', SIZE):>8.2f}")
        chain.close()


if __name__ == "__main__":
    main()
