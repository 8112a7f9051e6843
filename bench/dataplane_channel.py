"""The data-plane channel on its own: requests a ``RemoteVolume`` sends to its ``PlaneHost``.

Both ends run in this process over a socket pair (as ``tests/exports/test_dataplane.py``
sets them up), so the rows show the channel's framing plus the owner's work:

* ``alloc 4k write``: 4 KiB writes, each to a cluster nothing maps yet (the write goes over
  the channel; the owner allocates and zero-fills a 64 KiB cluster);
* ``alloc 1M write``: 1 MiB writes over fresh clusters (a payload sent apart from its header);
* ``status 4k``: block status of 4 KiB (a round trip with a small reply payload).

Each row is the best and the median of ``--rounds`` rounds, in microseconds per request: wall
clock, and CPU time of the process (both ends; steadier on a busy machine).
Run: ``PYTHONPATH=src .venv/bin/python bench/dataplane_channel.py``; about twenty seconds.
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from storvisor.engine.home import Home
from storvisor.engine.types import BackingSpec
from storvisor.exports.dataplane import PlaneHost, RemoteVolume

CS = 64 << 10
SIZE = 512 << 20


SMALL = b"x" * 4096
BIG = b"y" * (1 << 20)
HALF = SIZE // 2 // CS


def alloc_small(remote: RemoteVolume) -> int:
    for i in range(HALF):
        remote.write(i * CS, SMALL)
    return HALF


def alloc_big(remote: RemoteVolume) -> int:
    count = SIZE // 2 // len(BIG)
    for i in range(count):
        remote.write(SIZE // 2 + i * len(BIG), BIG)
    return count


def status(remote: RemoteVolume) -> int:
    for i in range(HALF):
        remote.block_status(i * CS, 4096)
    return HALF


ROWS: dict[str, Callable[[RemoteVolume], int]] = {
    "alloc 4k write": alloc_small,
    "alloc 1M write": alloc_big,
    "status 4k": status,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rows: dict[str, list[tuple[float, float]]] = {label: [] for label in ROWS}
    with tempfile.TemporaryDirectory() as tmp:
        home = Home(Path(tmp) / "home")
        try:
            home.create_pool("p", [BackingSpec(str(Path(tmp) / "d0.img"), 8 << 30)], CS)
            pool = home.pool("p")
            for n in range(args.rounds):
                name = f"v{n}"
                pool.create_volume(name, SIZE)
                volume = pool.open_volume(name)
                a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                host = PlaneHost(volume, a)
                host.start()
                remote = RemoteVolume(b, os.dup(host.map.fd), pool.backing_fds(), CS)
                try:
                    for label, func in ROWS.items():
                        start, cpu = time.perf_counter(), time.process_time()
                        count = func(remote)
                        wall = (time.perf_counter() - start) * 1e6 / count
                        rows[label].append((wall, (time.process_time() - cpu) * 1e6 / count))
                finally:
                    remote.close()
                    host.close()
                    volume.close()
                pool.delete_volume(name)
        finally:
            home.close()
    print(f"{'request':<16} {'wall best':>10} {'median':>8} {'CPU best':>10} {'median':>8}")
    for label, values in rows.items():
        walls = sorted(wall for wall, _ in values)
        cpus = sorted(cpu for _, cpu in values)
        mid = len(values) // 2
        wall = f"{walls[0]:>10.1f} {walls[mid]:>8.1f}"
        print(f"{label:<16} {wall} {cpus[0]:>10.1f} {cpus[mid]:>8.1f}")


if __name__ == "__main__":
    main()
