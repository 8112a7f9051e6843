"""Choose the default cluster size: I/O through a thin ``Volume`` at several cluster sizes.

For each cluster size a fresh pool on a sparse file gets one volume, then:

* ``4k-wr-new``: 4 KiB random writes to a fresh volume (each one allocates a cluster the
  first time it touches it: the cost of thin provisioning and of copy-on-write after a
  snapshot, which writes a whole cluster);
* ``4k-wr``: 4 KiB random writes to allocated clusters (in place);
* ``4k-rd``: 4 KiB random reads;
* ``1m-wr-new`` / ``1m-rd``: 1 MiB sequential writes to a fresh volume, then reads;
* ``meta``: map entries (SQLite rows and view entries) per GiB written, and the time of one
  ``flush`` that commits them.

Every write phase ends with a ``flush`` (fdatasync of the device, then the metadata commit),
which is part of its time. Run: ``.venv/bin/python bench/cluster_size.py [--quick]``; it takes
well under a minute.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from storvisor.engine.home import Home
from storvisor.engine.types import BackingSpec
from storvisor.engine.volume import Volume
from storvisor.units import format_size

KIB = 1024
MIB = 1 << 20


def timed(func: Callable[[], None]) -> float:
    start = time.perf_counter()
    func()
    return time.perf_counter() - start


def run(directory: Path, cluster_size: int, volume_size: int, ops: int) -> dict[str, float]:
    results: dict[str, float] = {}
    rng = random.Random(1)
    block = os.urandom(4 * KIB)
    big = os.urandom(MIB)
    with Home(directory / f"home-{cluster_size}") as home:
        backing = BackingSpec(str(directory / f"pool-{cluster_size}.img"), 4 * volume_size)
        home.create_pool("bench", [backing], cluster_size)
        pool = home.pool("bench")
        pool.create_volume("rand", volume_size)
        pool.create_volume("seq", volume_size)
        vol: Volume = pool.open_volume("rand")
        offsets = [rng.randrange(volume_size // (4 * KIB)) * 4 * KIB for _ in range(ops)]

        def random_writes() -> None:
            for offset in offsets:
                vol.write(offset, block)
            vol.flush()

        def random_reads() -> None:
            buf = memoryview(bytearray(4 * KIB))
            for offset in offsets:
                vol.read_into(offset, buf)

        results["4k-wr-new"] = ops / timed(random_writes)
        results["4k-wr"] = ops / timed(random_writes)
        results["4k-rd"] = ops / timed(random_reads)
        vol.close()

        seq = pool.open_volume("seq")
        chunks = volume_size // MIB

        def seq_writes() -> None:
            for i in range(chunks):
                seq.write(i * MIB, big)
            seq.flush()

        def seq_reads() -> None:
            buf = memoryview(bytearray(MIB))
            for i in range(chunks):
                seq.read_into(i * MIB, buf)

        results["1m-wr-new"] = volume_size / MIB / timed(seq_writes)
        results["1m-rd"] = volume_size / MIB / timed(seq_reads)
        seq.close()
        # metadata cost of a fully written GiB, and of committing it
        results["rows/GiB"] = (1 << 30) / cluster_size
        mapped = pool.open_volume("rand")
        per_commit = 2048
        start = time.perf_counter()
        for i in range(per_commit):
            mapped.write(i * cluster_size % volume_size, b"m")
        mapped.close()
        pool.flush()
        results["flush-ms"] = (time.perf_counter() - start) * 1000
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller volume, fewer ops")
    parser.add_argument("--sizes", default="4K,16K,64K,256K,1M,2M", help="cluster sizes to compare")
    args = parser.parse_args()
    from storvisor.units import parse_size

    sizes = [parse_size(s) for s in args.sizes.split(",")]
    volume_size = (64 if args.quick else 256) * MIB
    ops = 2000 if args.quick else 8000
    columns = ["4k-wr-new", "4k-wr", "4k-rd", "1m-wr-new", "1m-rd", "rows/GiB", "flush-ms"]
    units = ["IOPS", "IOPS", "IOPS", "MiB/s", "MiB/s", "", "2048 allocs"]
    print(f"volume {format_size(volume_size)}, {ops} random 4k ops, one Python thread")
    print(f"{'cluster':>8} " + " ".join(f"{c:>11}" for c in columns))
    print(f"{'':>8} " + " ".join(f"{u:>11}" for u in units))
    with tempfile.TemporaryDirectory(prefix="storvisor-bench-", dir="/var/tmp") as tmp:
        for cluster_size in sizes:
            results = run(Path(tmp), cluster_size, volume_size, ops)
            print(
                f"{format_size(cluster_size):>8} "
                + " ".join(f"{results[c]:>11.0f}" for c in columns),
                flush=True,
            )


if __name__ == "__main__":
    main()
