"""CPU per request of the TCMU handler, on the host, with the kernel stand-in.

``TcmuHandler`` serves a thin volume (64 MiB, written in full, on ``/dev/shm``) through
``storvisor.testing.tcmu_kernel.TcmuKernel``, which submits random reads or writes of
``--bs`` bytes (4k by default, aligned to their size) in batches of ``--depth`` (one signal
each) and waits for them; with ``--fragment`` each command's data lies in one iovec per 4 KiB
block of the data area (as the kernel lays it out when the area is fragmented), else in one
iovec per contiguous run. It prints requests per second
and the process's CPU time per request: the stand-in's share is included and is the same
for every version of the handler, so compare versions, not absolute figures. Pin it to one
core (``taskset -c 1``) to see what the handler costs where threads cannot hide it.

With ``--plane`` the handler runs where the daemon runs it, in a data-plane process
(``TcmuDataPlane`` of a ``DataPlanes`` of one process, the volume's QoS block unlimited and a
block of I/O counters, as the daemon gives them); the CPU of that process per request is
printed apart from this process's (the stand-in's). Usage::

    taskset -c 1 .venv/bin/python bench/tcmu_handler_cpu.py [--batches 300] [--depth 32]
        [--plane] [--bs 4096] [--fragment]
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
from storvisor.engine.iostats import StatsSet  # noqa: E402
from storvisor.engine.qos import QosBlock  # noqa: E402
from storvisor.engine.types import BackingSpec  # noqa: E402
from storvisor.exports.nbd_worker import DataPlanes  # noqa: E402
from storvisor.exports.tcmu import TcmuHandler  # noqa: E402
from storvisor.exports.tcmu_plane import TcmuDataPlane  # noqa: E402
from storvisor.protocols.scsi import LunIdentity  # noqa: E402
from storvisor.testing import procs  # noqa: E402
from storvisor.testing.tcmu_kernel import TcmuKernel  # noqa: E402

SIZE = 64 << 20


def rw10(op: int, lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", op, 0, lba, 0, blocks, 0)


def run(
    kernel: TcmuKernel, write: bool, args: argparse.Namespace, plane: int
) -> tuple[float, float, float]:
    """(requests per second, CPU microseconds per request of this process and of the
    process ``plane`` (0: none)) over ``args.batches`` batches."""
    bs, depth, fragment = args.bs, args.depth, args.fragment
    data = os.urandom(bs)

    def batch() -> None:
        ids = []
        for _ in range(depth):
            lba = random.randrange(SIZE // bs) * (bs // 512)
            if write:
                cdb = rw10(0x2A, lba, bs // 512)
                ids.append(kernel.submit(cdb, data, fragment=fragment))
            else:
                cdb = rw10(0x28, lba, bs // 512)
                ids.append(kernel.submit(cdb, data_in=bs, fragment=fragment))
        kernel.signal()
        for done in kernel.wait(ids):
            assert done.status == 0, done

    for _ in range(10):
        batch()
    t0, c0, p0 = time.monotonic(), time.process_time(), _seconds(plane)
    for _ in range(args.batches):
        batch()
    t1, c1, p1 = time.monotonic(), time.process_time(), _seconds(plane)
    n = args.batches * depth
    return n / (t1 - t0), 1e6 * (c1 - c0) / n, 1e6 * (p1 - p0) / n


def _seconds(pid: int) -> float:
    info = procs.process(pid) if pid else None
    return info.cpu_ticks / os.sysconf("SC_CLK_TCK") if info is not None else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--plane", action="store_true", help="serve from a data-plane process")
    parser.add_argument("--bs", type=int, default=4096, help="bytes per request")
    parser.add_argument("--fragment", action="store_true", help="one iovec per 4 KiB block")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sv-tcmu-cpu-", dir="/dev/shm"))
    try:
        home = Home(tmp / "home")
        home.create_pool("p", [BackingSpec(str(tmp / "d0.img"), 256 << 20)], 64 << 10)
        pool = home.pool("p")
        pool.create_volume("v", SIZE)
        volume = pool.open_volume("v")
        volume.write(0, os.urandom(SIZE))
        data_size = max(8 << 20, 2 * args.depth * args.bs)
        kernel = TcmuKernel(tmp, "storvisor/bench", ring_size=1 << 20, data_size=data_size)
        handler: TcmuHandler | TcmuDataPlane
        planes = qos = None
        pid = 0
        if args.plane:
            planes = DataPlanes(processes=1)
            planes.start()
            qos = QosBlock()
            handler = TcmuDataPlane(
                volume,
                "storvisor/bench",
                block_size=512,
                serial="bench",
                qos=qos,
                stats=StatsSet("bench"),
                planes=planes,
                sysfs_root=kernel.sysfs_root,
                dev_root=kernel.dev_root,
                opener=kernel.open,
            )
        else:
            handler = TcmuHandler(
                volume,
                "storvisor/bench",
                identity=LunIdentity.for_volume("bench"),
                sysfs_root=kernel.sysfs_root,
                dev_root=kernel.dev_root,
                opener=kernel.open,
            )
        handler.start()
        if isinstance(handler, TcmuDataPlane):
            (pid,) = handler.pids
        try:
            size = f"{args.bs // 1024}k" + (" fragmented" if args.fragment else "")
            for name, write in ((f"{size} randread", False), (f"{size} randwrite", True)):
                rate, cpu, plane = run(kernel, write, args, pid)
                line = f"{name} qd{args.depth}: {rate:8,.0f} req/s, {cpu:5.1f} µs CPU/req"
                if pid:
                    line += f" here, {plane:5.1f} µs in the data plane"
                print(line)
        finally:
            handler.close()
            volume.close()
            kernel.close()
            if planes is not None:
                planes.close()
            if qos is not None:
                qos.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
