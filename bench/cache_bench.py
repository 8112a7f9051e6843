"""Cache tier benchmark: a pool behind a writeback cache against a plain local-file pool.

Two pools in one process, each on its own sparse file in the work directory, with a volume
of ``--size`` written once (so that the measured writes are in place): ``plain``, and
``cached`` with a writeback cache (``engine/cache.py``) on another file, large enough for
the volume, read once so that every line is cached. For each pool, 4k random writes and
then 4k random reads (cache hits) at queue depth 32: 32 threads, each with one request in
flight, on one ``Volume`` handle, as an export's connection threads would. Rounds alternate
the pools (in both orders) and each figure is the median of ``--repeat`` rounds; the ratio
is cached / plain. The cached pool's writes are flushed and destaged between rounds (not
timed), so every round starts clean.

With ``--nbd``, the same through the daemon's NBD data-plane processes and fio's ``nbd``
engine: the plain pool's planes read and write the backing file themselves; the cached
pool's planes read cached lines and write lines dirty in the open epoch in the cache device
themselves (``engine/cachelines.py``); only a line's first write after the cache was filled
goes to the serving process, where the cache lives.

Usage::

    .venv/bin/python bench/cache_bench.py [--seconds 3] [--repeat 5] [--size 256M] [--nbd]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import planes_fio
from planes_fio import BLOCK, QD


def _setup(work: Path, size: int) -> Any:
    from storvisor.engine.cache import CacheSpec
    from storvisor.engine.home import Home
    from storvisor.engine.types import BackingSpec, CacheMode

    home = Home(work / "home")
    for name in ("plain", "cached"):
        home.create_pool(name, [BackingSpec(str(work / f"{name}.img"), 2 * size)])
        pool = home.pool(name)
        pool.create_volume("v", size)
        vol = pool.open_volume("v")
        chunk = os.urandom(1 << 20)
        for offset in range(0, size, len(chunk)):
            vol.write(offset, chunk)
        vol.flush()
        vol.close()
    cached = home.pool("cached")
    cached.set_cache(CacheSpec(str(work / "cache.img"), size + (size >> 3)), CacheMode.WRITEBACK)
    vol = cached.open_volume("v")
    buf = memoryview(bytearray(1 << 20))
    for offset in range(0, size, len(buf)):
        vol.read_into(offset, buf)
    vol.close()
    return home


def _run(vol: Any, size: int, seconds: float, write: bool) -> float:
    """IOPS of 4k random requests from ``QD`` threads for ``seconds``."""
    stop = time.monotonic() + seconds
    counts = [0] * QD
    blocks = size // BLOCK

    def worker(i: int) -> None:
        rng = random.Random(i)
        buf = memoryview(bytearray(os.urandom(BLOCK)))
        n = 0
        while time.monotonic() < stop:
            for _ in range(64):
                offset = rng.randrange(blocks) * BLOCK
                if write:
                    vol.write(offset, buf)
                else:
                    vol.read_into(offset, buf)
            n += 64
        counts[i] = n

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(QD)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.monotonic() - started)


def engine(work: Path, size: int, seconds: float, repeat: int) -> dict[str, Any]:
    home = _setup(work, size)
    results: dict[str, dict[str, list[float]]] = {
        p: {"write": [], "read": []} for p in ("plain", "cached")
    }
    try:
        for round_ in range(repeat):
            order = ("plain", "cached") if round_ % 2 == 0 else ("cached", "plain")
            for name in order:
                pool = home.pool(name)
                vol = pool.open_volume("v")
                try:
                    results[name]["write"].append(_run(vol, size, seconds, True))
                    results[name]["read"].append(_run(vol, size, seconds, False))
                finally:
                    vol.close()
                if name == "cached":
                    pool.flush_cache()
        info = home.pool("cached").info().cache
        assert info is not None
        hit_ratio = info.hit_ratio
    finally:
        home.close()
    return _summary(results, {"hit_ratio": hit_ratio})


def _summary(results: dict[str, dict[str, list[float]]], extra: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = dict(extra)
    for kind in ("write", "read"):
        plain = statistics.median(results["plain"][kind])
        cached = statistics.median(results["cached"][kind])
        rounds = {p: [round(x) for x in results[p][kind]] for p in results}
        out[kind] = {"plain_iops": round(plain), "cached_iops": round(cached),
                     "ratio": round(cached / plain, 3), "rounds": rounds}  # fmt: skip
    return out


def serve(work: str, size: int, sock: str) -> None:
    """Child process of ``--nbd``: both volumes exported through NBD data planes."""
    planes_fio.serve(_setup(Path(work), size), ("plain", "cached"), sock)


def nbd(work: Path, size: int, seconds: float, repeat: int) -> dict[str, Any]:
    results: dict[str, dict[str, list[float]]] = {
        p: {"write": [], "read": []} for p in ("plain", "cached")
    }
    with planes_fio.Planes(__file__, [str(work), str(size)], work) as planes:
        for round_ in range(repeat):
            order = ("plain", "cached") if round_ % 2 == 0 else ("cached", "plain")
            for name in order:
                for kind in ("write", "read"):
                    iops = planes.fio_iops(name, f"rand{kind}", seconds, size)
                    results[name][kind].append(iops)
    return _summary(results, {})


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return
    from storvisor.units import parse_size

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--size", default="256M")
    parser.add_argument("--nbd", action="store_true", help="through NBD data planes and fio")
    parser.add_argument("--nbd-only", action="store_true", help="--nbd without the engine part")
    args = parser.parse_args()
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="cache-bench-", dir="/var/tmp"))
    try:
        result = {}
        if not args.nbd_only:
            result["engine"] = engine(work / "engine", size, args.seconds, args.repeat)
        if args.nbd or args.nbd_only:
            (work / "nbd").mkdir()
            result["nbd"] = nbd(work / "nbd", size, args.seconds, args.repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
