"""CPU per request of the TCMU handler, on the host, with the kernel stand-in.

``TcmuHandler`` serves a thin volume (64 MiB, written in full, on ``/dev/shm``) through
``storvisor.testing.tcmu_kernel.TcmuKernel``, which submits 4k random reads or writes in
batches of ``--depth`` (one signal each) and waits for them. It prints requests per second
and the process's CPU time per request: the stand-in's share is included and is the same
for every version of the handler, so compare versions, not absolute figures. Pin it to one
core (``taskset -c 1``) to see what the handler costs where threads cannot hide it. Usage::

    taskset -c 1 .venv/bin/python bench/tcmu_handler_cpu.py [--batches 300] [--depth 32]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from storvisor.engine.home import Home  # noqa: E402
from storvisor.engine.types import BackingSpec  # noqa: E402
from storvisor.exports.tcmu import TcmuHandler  # noqa: E402
from storvisor.protocols.scsi import LunIdentity  # noqa: E402
from storvisor.testing.tcmu_kernel import TcmuKernel  # noqa: E402

SIZE = 64 << 20


def rw10(op: int, lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", op, 0, lba, 0, blocks, 0)


def run(kernel: TcmuKernel, write: bool, batches: int, depth: int) -> tuple[float, float]:
    """(requests per second, CPU microseconds per request) over ``batches`` batches."""
    data = os.urandom(4096)

    def batch() -> None:
        ids = []
        for _ in range(depth):
            lba = random.randrange(SIZE // 4096) * 8
            if write:
                ids.append(kernel.submit(rw10(0x2A, lba, 8), data))
            else:
                ids.append(kernel.submit(rw10(0x28, lba, 8), data_in=4096))
        kernel.signal()
        for done in kernel.wait(ids):
            assert done.status == 0, done

    for _ in range(10):
        batch()
    t0, c0 = time.monotonic(), time.process_time()
    for _ in range(batches):
        batch()
    t1, c1 = time.monotonic(), time.process_time()
    n = batches * depth
    return n / (t1 - t0), 1e6 * (c1 - c0) / n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--depth", type=int, default=32)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sv-tcmu-cpu-", dir="/dev/shm"))
    try:
        home = Home(tmp / "home")
        home.create_pool("p", [BackingSpec(str(tmp / "d0.img"), 256 << 20)], 64 << 10)
        pool = home.pool("p")
        pool.create_volume("v", SIZE)
        volume = pool.open_volume("v")
        volume.write(0, os.urandom(SIZE))
        kernel = TcmuKernel(tmp, "storvisor/bench", ring_size=1 << 20, data_size=8 << 20)
        handler = TcmuHandler(
            volume,
            "storvisor/bench",
            identity=LunIdentity.for_volume("bench"),
            sysfs_root=kernel.sysfs_root,
            dev_root=kernel.dev_root,
            opener=kernel.open,
        )
        handler.start()
        try:
            for name, write in (("4k randread", False), ("4k randwrite", True)):
                rate, cpu = run(kernel, write, args.batches, args.depth)
                print(f"{name} qd{args.depth}: {rate:8,.0f} req/s, {cpu:5.1f} µs CPU/req")
        finally:
            handler.close()
            volume.close()
            kernel.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
