"""Server CPU time per NBD request: storvisor NBD servers driven by ``qemu-img bench``.

Throughput on a shared two-core machine moves with the load; the CPU time the server
process spends per request (user + system from ``/proc/PID/stat``, the client excluded)
moves much less. Each source tree given (``--src``, a directory holding the ``storvisor``
package; the running one by default) gets its own server process, all serving the same
image at once; every workload then visits the servers in turn ``--repeat`` times (in
alternating order) and the medians are printed::

    .venv/bin/python bench/nbd_cpu.py [--device raw|thin] [--only 4k] [--repeat 5] \\
        [--src A=/path/to/src --src B=/other/src]

The image is ``--size`` MiB of random data (256 by default), held in the page cache; the
thin volume holds a copy of it.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nbd_bench import STEP_4K, Workload, serve

_TICK = os.sysconf("SC_CLK_TCK")


WORKLOADS = [
    Workload("4k randread qd32", 4096, STEP_4K, 32, False, 100000),
    Workload("4k randread qd1", 4096, STEP_4K, 1, False, 20000),
    Workload("4k randwrite qd32", 4096, STEP_4K, 32, True, 50000),
    Workload("1M seqread qd8", 1 << 20, 1 << 20, 8, False, 3000),
    Workload("1M seqwrite qd8", 1 << 20, 1 << 20, 8, True, 2000),
]


def _cpu(pid: int) -> tuple[float, float]:
    """User and system seconds of process ``pid`` (its exited threads included)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


def run(uri: str, pid: int, w: Workload) -> tuple[float, float, float]:
    """(requests per second, server CPU microseconds per request, of which in the kernel)
    of one run."""
    argv = ["qemu-img", "bench", "-f", "raw", "-t", "none", "-n", "-d", str(w.depth)]
    argv += ["-s", str(w.size), "-S", str(w.step), "-c", str(w.count)]
    if w.write:
        argv += ["-w", "--pattern=0x5a"]
    before = _cpu(pid)
    out = subprocess.run([*argv, uri], capture_output=True, text=True, check=True).stdout
    after = _cpu(pid)
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
    parser.add_argument("--src", action="append", default=[], help="LABEL=DIR, repeatable")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    parser.add_argument("--socket", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.image, args.socket, args.work)
        return

    trees = dict(s.split("=", 1) for s in args.src) or {
        "storvisor": os.environ.get("PYTHONPATH", "")
    }
    size = args.size << 20
    with tempfile.TemporaryDirectory(prefix="nbdcpu", dir="/tmp") as tmp:
        work = Path(tmp)
        image = work / "image.raw"
        with open(image, "wb") as f:
            for _ in range(size >> 22):
                f.write(os.urandom(4 << 20))
        procs: dict[str, subprocess.Popen[bytes]] = {}
        uris: dict[str, str] = {}
        try:
            for n, (label, src) in enumerate(trees.items()):
                sock = str(work / f"{n}.sock")
                home = work / f"home{n}"
                home.mkdir()
                argv = [sys.executable, __file__, "--serve", args.device, "--image", str(image)]
                argv += ["--socket", sock, "--work", str(home)]
                procs[label] = subprocess.Popen(argv, env={**os.environ, "PYTHONPATH": src})
                uris[label] = f"nbd+unix:///disk?socket={sock}"
            for label, proc in procs.items():
                while not os.path.exists(work / f"{list(procs).index(label)}.sock"):
                    if proc.poll() is not None:
                        raise RuntimeError(f"the server for {label} exited")
                    time.sleep(0.1)
            subprocess.run(["sync"], check=True)
            for w in WORKLOADS:
                if args.only and args.only not in w.name:
                    continue
                results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in procs}
                for i in range(args.repeat):
                    # alternate the order: a run can leave work behind (writeback) for the next
                    for label in list(procs)[:: 1 if i % 2 == 0 else -1]:
                        results[label].append(run(uris[label], procs[label].pid, w))
                for label, rs in results.items():
                    rate = statistics.median(r[0] for r in rs)
                    cpu = statistics.median(r[1] for r in rs)
                    system = statistics.median(r[2] for r in rs)
                    print(
                        f"{w.name:18} {label:10} {rate:9,.0f} req/s {cpu:8.2f} us CPU/req"
                        f" ({system:.2f} in the kernel)",
                        flush=True,
                    )
        finally:
            for proc in procs.values():
                proc.terminate()
            for proc in procs.values():
                proc.wait(30)


if __name__ == "__main__":
    main()
