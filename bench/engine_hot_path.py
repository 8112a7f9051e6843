"""The engine's hot path: a 4 KiB read and write of an allocated cluster through a ``Volume``,
against the bare ``os.preadv``/``os.pwritev`` on the backing file it ends in, through a
volume at the end of a 10-deep snapshot chain, and through a data plane's ``RemoteVolume``
(its direct path: a shared-map lookup, then the same system call; a read of an unmapped
cluster is the lookup alone, with no system call).

The difference is the engine's per-request cost (bounds check, one dict lookup). Run:
``.venv/bin/python bench/engine_hot_path.py``; a few seconds.
"""

from __future__ import annotations

import os
import random
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from storvisor.engine.home import Home
from storvisor.engine.types import BackingSpec
from storvisor.exports.dataplane import PlaneHost, RemoteVolume

N = 200_000
SIZE = 64 << 20
CS = 64 << 10


def per_op_ns(func: Callable[[int], None], offsets: list[int], rounds: int = 10) -> float:
    """CPU time per call, the best of ``rounds`` runs over slices of ``offsets`` (the least
    disturbed by other processes on a shared machine)."""
    step = max(1, len(offsets) // rounds)
    best = float("inf")
    for first in range(0, len(offsets), step):
        part = offsets[first : first + step]
        start = time.thread_time_ns()
        for offset in part:
            func(offset)
        best = min(best, (time.thread_time_ns() - start) / len(part))
    return best


def main() -> None:
    rng = random.Random(0)
    offsets = [rng.randrange(SIZE // 4096) * 4096 for _ in range(N)]
    buf = memoryview(bytearray(4096))
    data = memoryview(os.urandom(4096))
    with (
        tempfile.TemporaryDirectory(prefix="storvisor-hot-", dir="/var/tmp") as tmp,
        Home(Path(tmp) / "home") as home,
    ):
        home.create_pool("p", [BackingSpec(str(Path(tmp) / "d.img"), 4 * SIZE)], CS)
        pool = home.pool("p")
        pool.create_volume("flat", SIZE)
        pool.create_volume("deep", SIZE)
        flat = pool.open_volume("flat")
        flat.write(0, bytes(SIZE))  # every cluster allocated
        deep = pool.open_volume("deep")
        for depth in range(10):  # each layer owns a tenth of the clusters
            part = SIZE // 10 // CS * CS
            deep.write(depth * part, os.urandom(part))
            pool.create_snapshot("deep", f"s{depth}")
        deep.write(0, os.urandom(SIZE))  # the top owns everything again...
        pool.create_snapshot("deep", "s10")  # ...and then owns nothing: 11 layers deep
        fd = os.open(Path(tmp) / "d.img", os.O_RDWR)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        host = PlaneHost(flat, ours)
        host.start()
        remote = RemoteVolume(theirs, os.dup(host.map.fd), pool.backing_fds(), CS)
        pool.create_volume("sparse", SIZE)
        sparse = pool.open_volume("sparse")
        ours2, theirs2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        hole_host = PlaneHost(sparse, ours2)
        hole_host.start()
        hole = RemoteVolume(theirs2, os.dup(hole_host.map.fd), pool.backing_fds(), CS)
        rows = [
            ("os.preadv on the backing file", lambda o: os.preadv(fd, [buf], o + CS)),
            ("Volume.read_into", lambda o: flat.read_into(o, buf)),
            ("Volume.read_into, 11-deep chain", lambda o: deep.read_into(o, buf)),
            ("os.pwritev on the backing file", lambda o: os.pwritev(fd, [data], o + CS)),
            ("Volume.write (allocated cluster)", lambda o: flat.write(o, data)),
            ("RemoteVolume.read_into", lambda o: remote.read_into(o, buf)),
            ("RemoteVolume.write (owned cluster)", lambda o: remote.write(o, data)),
            ("RemoteVolume.read_into (unmapped)", lambda o: hole.read_into(o, buf)),
        ]
        print(f"{N} random 4 KiB requests over {SIZE >> 20} MiB (page cache), ns per request")
        for label, func in rows:
            per_op_ns(func, offsets[:1000])  # warm up
            print(f"{label:<36} {per_op_ns(func, offsets):>8.0f}")
        os.close(fd)
        remote.close()
        host.close()
        hole.close()
        hole_host.close()
        sparse.close()
        flat.close()
        deep.close()


if __name__ == "__main__":
    main()
