"""Several NBD clients at once: do storvisor's NBD exports use more than one core?

``--clients`` (default 2) ``qemu-img bench`` processes drive one export at the same time
(multi-conn: each its own connection, each starting at another offset), and the total
requests per second is reported, with the CPU the server used (all its processes, 100% = one
core), for:

* ``nbdkit file``: nbdkit's file plugin (C, a thread pool);
* ``storvisor thin``: a thin volume served from one Python process (how NBD exports ran
  before data planes);
* ``storvisor thin, data plane``: the same as the daemon serves it, each connection handed
  to one of its data-plane processes (one per CPU).

With ``--client fio`` the clients are the jobs of one fio process with the ``nbd`` engine
(libnbd, a connection per job, each for a fixed time): a client that costs less CPU per
request than ``qemu-img bench``, so more of the two cores is left to the servers.

The image is 1 GiB of random data, the thin volumes hold a copy of it (``bench/nbd_bench.py``
prepares them). Usage::

    .venv/bin/python bench/nbd_clients_bench.py [--clients 2] [--client qemu-img|fio] \
        [--scale 0.5] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nbd_bench import IMAGE_SIZE, STEP_4K, fio, start_server
from proc_stats import cpu_seconds, family

WORKLOADS = [
    # name, request size, step, depth, write, requests per client
    ("4k randread qd32", 4096, STEP_4K, 32, False, 100000),
    ("4k randwrite qd32", 4096, STEP_4K, 32, True, 100000),
    ("1M seqread qd8", 1 << 20, 1 << 20, 8, False, 3000),
]


def run_clients(uri: str, workload: tuple[str, int, int, int, bool, int], clients: int,
                scale: float, server_pid: int) -> tuple[float, float]:  # fmt: skip
    """(total req/s, server CPU %) of ``clients`` concurrent qemu-img bench runs."""
    _, size, step, depth, write, count = workload
    count = max(int(count * scale), 100)
    procs = []
    pids = family(server_pid)
    cpu0, t0 = cpu_seconds(pids), time.monotonic()
    for i in range(clients):
        argv = ["qemu-img", "bench", "-f", "raw", "-t", "none", "-n", "-d", str(depth)]
        argv += ["-s", str(size), "-S", str(step), "-c", str(count)]
        argv += ["-o", str((IMAGE_SIZE // clients) * i // size * size)]
        if write:
            argv += ["-w", "--pattern=0x5a"]
        procs.append(subprocess.Popen([*argv, uri], stdout=subprocess.PIPE, text=True))
    outs = [p.communicate()[0] for p in procs]
    elapsed = time.monotonic() - t0
    cpu = cpu_seconds(pids) - cpu0
    for p, out in zip(procs, outs, strict=True):
        if p.returncode != 0 or not re.search(r"Run completed", out):
            raise RuntimeError(f"qemu-img bench failed: {out}")
    return clients * count / elapsed, 100 * cpu / elapsed


def run_fio(uri: str, workload: tuple[str, int, int, int, bool, int], clients: int,
            scale: float, server_pid: int) -> tuple[float, float]:  # fmt: skip
    """(total req/s, server CPU %) of one fio run with ``clients`` jobs, a connection each."""
    _, size, _, depth, write, _ = workload
    pids = family(server_pid)
    cpu0, t0 = cpu_seconds(pids), time.monotonic()
    job = fio(uri, size, depth, write, max(1.0, 6 * scale), jobs=clients)
    elapsed = time.monotonic() - t0
    cpu = cpu_seconds(pids) - cpu0
    return float(job["iops"]), 100 * cpu / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--client", choices=["qemu-img", "fio"], default="qemu-img")
    parser.add_argument("--scale", type=float, default=0.5)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nbdclients", dir="/tmp"))
    image = work / "image.raw"
    subprocess.run(["dd", "if=/dev/urandom", f"of={image}", "bs=4M",
                    f"count={IMAGE_SIZE >> 22}", "status=none"], check=True)  # fmt: skip
    servers: dict[str, list[str] | str] = {
        "nbdkit file": ["nbdkit", "-f", "-U", "{sock}", "file", str(image)],
        "storvisor thin": "thin",
        "storvisor thin, data plane": "plane",
    }
    procs: dict[str, subprocess.Popen[bytes]] = {}
    uris: dict[str, str] = {}
    runs: dict[tuple[str, str], list[tuple[float, float]]] = {}
    try:
        for n, (label, how) in enumerate(servers.items()):
            procs[label], uris[label] = start_server(how, image, work, n)
        for _ in range(args.repeat):
            for workload in WORKLOADS:
                for label in servers:
                    run = run_fio if args.client == "fio" else run_clients
                    result = run(uris[label], workload, args.clients, args.scale,
                                 procs[label].pid)  # fmt: skip
                    runs.setdefault((label, workload[0]), []).append(result)
                    print(f"  {label:28} {workload[0]:18} {result[0]:>10,.0f} req/s "
                          f"cpu {result[1]:.0f}%", file=sys.stderr)  # fmt: skip
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(60)
        shutil.rmtree(work, ignore_errors=True)

    header = [f"workload ({args.clients} clients at once)"]
    for label in servers:
        header += [f"{label} req/s", f"{label} CPU%"]
    header += ["thin, data plane / nbdkit", "thin, data plane / thin"]
    print("| " + " | ".join(header) + " |")
    print("|---|" + "---:|" * (len(header) - 1))
    for name, *_ in WORKLOADS:
        row = [name]
        med = {}
        for label in servers:
            results = runs[(label, name)]
            med[label] = statistics.median(r[0] for r in results)
            row += [f"{med[label]:,.0f}", f"{statistics.median(r[1] for r in results):.0f}%"]
        plane = med["storvisor thin, data plane"]
        row += [f"{plane / med['nbdkit file']:.2f}x", f"{plane / med['storvisor thin']:.2f}x"]
        print("| " + " | ".join(row) + " |")
    print(f"\n{os.cpu_count()} CPUs, {args.client}, scale {args.scale}, median of {args.repeat}")


if __name__ == "__main__":
    main()
