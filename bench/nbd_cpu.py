"""Server CPU time per NBD request: an in-process storvisor NBD server, ``qemu-img bench``
as the client.

Throughput on a shared two-core machine moves with the load; the CPU time the server
process spends per request (user + system, from ``getrusage``, the client excluded) moves
much less. Every workload runs ``--repeat`` times; the medians are printed::

    .venv/bin/python bench/nbd_cpu.py [--device raw|thin] [--only 4k] [--repeat 3]

The image is ``--size`` MiB of random data (256 by default), held in the page cache; the
thin volume holds a copy of it.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Workload:
    name: str
    size: int
    step: int
    depth: int
    write: bool
    count: int


WORKLOADS = [
    Workload("4k randread qd32", 4096, 4096 * 104729, 32, False, 50000),
    Workload("4k randread qd1", 4096, 4096 * 104729, 1, False, 10000),
    Workload("4k randwrite qd32", 4096, 4096 * 104729, 32, True, 50000),
    Workload("1M seqread qd8", 1 << 20, 1 << 20, 8, False, 2000),
    Workload("1M seqwrite qd8", 1 << 20, 1 << 20, 8, True, 2000),
]


def _cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def run(uri: str, w: Workload) -> tuple[float, float, float]:
    """(requests per second, server CPU microseconds per request, of which in the kernel)
    of one run."""
    argv = ["qemu-img", "bench", "-f", "raw", "-t", "none", "-n", "-d", str(w.depth)]
    argv += ["-s", str(w.size), "-S", str(w.step), "-c", str(w.count)]
    if w.write:
        argv += ["-w", "--pattern=0x5a"]
    before = _cpu()
    out = subprocess.run([*argv, uri], capture_output=True, text=True, check=True).stdout
    after = _cpu()
    user, system = after[0] - before[0], after[1] - before[1]
    match = re.search(r"Run completed in ([0-9.]+) seconds", out)
    assert match, out
    return w.count / float(match.group(1)), (user + system) / w.count * 1e6, system / w.count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["raw", "thin"], default="raw")
    parser.add_argument("--size", type=int, default=256, help="image size in MiB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", default="", help="run the workloads whose name has this")
    args = parser.parse_args()

    from storvisor.engine.device import FileDevice
    from storvisor.exports.nbd import NBDExport, NBDServer, nbd_uri

    size = args.size << 20
    with tempfile.TemporaryDirectory(prefix="nbdcpu", dir="/tmp") as tmp:
        work = Path(tmp)
        image = work / "image.raw"
        with open(image, "wb") as f:
            for _ in range(size >> 22):
                f.write(os.urandom(4 << 20))
        home = None
        if args.device == "raw":
            export = NBDExport("disk", lambda: FileDevice(str(image)))
        else:
            from storvisor.engine.home import Home
            from storvisor.engine.types import BackingSpec

            home = Home(str(work / "home"))
            home.create_pool("p", [BackingSpec(str(work / "backing"), size=3 * size)])
            pool = home.pool("p")
            pool.create_volume("v", size)
            volume = pool.open_volume("v")
            with open(image, "rb") as f:
                for offset in range(0, size, 4 << 20):
                    volume.write(offset, f.read(4 << 20))
            volume.flush()
            volume.close()
            export = NBDExport("disk", lambda: pool.open_volume("v"))
        server = NBDServer()
        server.add_export(export)
        sock = str(work / "s.sock")
        server.listen_unix(sock)
        server.start()
        subprocess.run(["sync"], check=True)
        time.sleep(0.5)
        uri = nbd_uri("disk", unix_path=sock)
        try:
            for w in WORKLOADS:
                if args.only and args.only not in w.name:
                    continue
                results = [run(uri, w) for _ in range(args.repeat)]
                rate = statistics.median(r[0] for r in results)
                cpu = statistics.median(r[1] for r in results)
                system = statistics.median(r[2] for r in results)
                print(
                    f"{w.name:20} {rate:10,.0f} req/s {cpu:8.2f} us CPU/req"
                    f" ({system:.2f} in the kernel)",
                    flush=True,
                )
        finally:
            server.close()
            if home is not None:
                home.close()


if __name__ == "__main__":
    main()
