"""NBD export benchmark: storvisor against nbdkit's file plugin and qemu-storage-daemon.

Every server serves a 1 GiB image (written, not sparse) on a Unix socket; the same clients
drive each in turn. ``qemu-img bench`` (O_DIRECT off the client side, ``-t none -n``):

* 4k "random" read and write at queue depth 1 and 32: qemu-img bench steps through the image
  by a large prime number of 4 KiB blocks (``-S``), wrapping around, which scatters requests;
* 1 MiB sequential read and write at queue depth 8.

Then fio's ``nbd`` engine (libnbd), the "fio" rows: 4k random read and write at queue depth
32 and 1 MiB sequential read and write at queue depth 8, each for a fixed time. At queue
depth 32 qemu-img bench is the bottleneck itself (its own CPU time per request is about
that of the servers, and it has one core); fio's client costs less, so it shows more of the
servers.

A "first" row is one run per server (no repeats): the first 4k writes after the image was
prepared, which on the snapshotted thin volume pay copy-on-write of every 64 KiB cluster they
touch, and the first 1 MiB writes, which there allocate the clusters the 4k writes left
untouched. The rows without "first" overwrite blocks written before (steady state), so
comparing the snapshotted volume with the fresh one there measures the cost of the chain
itself, and the "first" rows measure the cost of writing after a snapshot.

storvisor is measured serving a raw file (``FileDevice``), a thin volume, and a thin volume
with ten snapshots in its chain, all from the server's own process, and a thin volume as the
daemon serves it: each connection handed to a data-plane process (``exports/nbd_worker.py``).
The table gives requests per second and the ratio of each storvisor configuration to each
peer; a second table gives each server's CPU time per request (user + system, from
``/proc``), which a busy machine disturbs less. All servers run at once and each workload
visits them in turn ``--repeat`` times (a "first" row once); the figure is the median. Usage::

    .venv/bin/python bench/nbd_bench.py [--scale 0.5] [--repeat 3] [--only raw,thin]

``--scale`` multiplies the request counts (0.1 for a quick look). ``--only "never written"``
adds a thin volume that was never written (first writes zero-fill instead of copying), left
out otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proc_stats import family_cpu

IMAGE_SIZE = 1 << 30
STEP_4K = 4096 * 104729  # a prime number of blocks: scattered offsets


@dataclass(frozen=True)
class Workload:
    name: str
    size: int
    step: int
    depth: int
    write: bool
    count: int
    once: bool = False
    """Run once per server: the row measures writes to blocks never written since the set-up."""
    client: str = "qemu-img"
    """``qemu-img`` (``qemu-img bench``, ``count`` requests) or ``fio`` (its ``nbd`` engine,
    libnbd, random or sequential for ``FIO_SECONDS`` times the scale)."""


WORKLOADS = [
    Workload("4k randread qd1", 4096, STEP_4K, 1, False, 20000),
    Workload("4k randread qd32", 4096, STEP_4K, 32, False, 100000),
    Workload("4k randwrite qd32 first", 4096, STEP_4K, 32, True, 100000, once=True),
    Workload("4k randwrite qd1", 4096, STEP_4K, 1, True, 20000),
    Workload("4k randwrite qd32", 4096, STEP_4K, 32, True, 100000),
    Workload("1M seqread qd8", 1 << 20, 1 << 20, 8, False, 3000),
    Workload("1M seqwrite qd8 first", 1 << 20, 1 << 20, 8, True, 3000, once=True),
    Workload("1M seqwrite qd8", 1 << 20, 1 << 20, 8, True, 3000),
    Workload("fio 4k randread qd32", 4096, 0, 32, False, 0, client="fio"),
    Workload("fio 4k randwrite qd32", 4096, 0, 32, True, 0, client="fio"),
    Workload("fio 1M seqread qd8", 1 << 20, 0, 8, False, 0, client="fio"),
    Workload("fio 1M seqwrite qd8", 1 << 20, 0, 8, True, 0, client="fio"),
]
FIO_SECONDS = 6


def _wait_for(path: str, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(600):
        if os.path.exists(path):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early: {proc.args!r}")
        time.sleep(0.05)
    raise RuntimeError(f"server did not listen on {path}")


def bench(uri: str, w: Workload, scale: float, pid: int) -> tuple[float, float]:
    """Requests per second of one client run, and the server's CPU microseconds per request
    (a figure a busy machine disturbs less)."""
    if w.client == "fio":
        return bench_fio(uri, w, scale, pid)
    count = max(int(w.count * scale), 100)
    argv = ["qemu-img", "bench", "-f", "raw", "-t", "none", "-n", "-d", str(w.depth)]
    argv += ["-s", str(w.size), "-S", str(w.step), "-c", str(count)]
    if w.write:
        argv += ["-w", "--pattern=0x5a"]
    cpu = family_cpu(pid)
    out = subprocess.run([*argv, uri], capture_output=True, text=True, check=True).stdout
    cpu = family_cpu(pid) - cpu
    match = re.search(r"Run completed in ([0-9.]+) seconds", out)
    assert match, out
    return count / float(match.group(1)), cpu * 1e6 / count


def bench_fio(uri: str, w: Workload, scale: float, pid: int) -> tuple[float, float]:
    """One time-based run of fio's nbd engine (one connection, ``w.depth`` requests in
    flight, random offsets for 4k and sequential for larger blocks)."""
    cpu = family_cpu(pid)
    job = fio(uri, w.size, w.depth, w.write, max(1.0, FIO_SECONDS * scale))
    cpu = family_cpu(pid) - cpu
    return float(job["iops"]), cpu * 1e6 / max(int(job["total_ios"]), 1)


def fio(
    uri: str, size: int, depth: int, write: bool, seconds: float, jobs: int = 1
) -> dict[str, Any]:
    """Run fio's nbd engine for ``seconds`` with ``jobs`` jobs, each its own connection over
    its own part of the image (random offsets for requests of 4k or less, sequential for
    larger ones); returns the summed read or write statistics of fio's JSON report."""
    pattern = ("rand" if size <= 4096 else "") + ("write" if write else "read")
    argv = ["fio", "--name=nbd", "--ioengine=nbd", f"--uri={uri}", f"--rw={pattern}"]
    argv += [f"--bs={size}", f"--iodepth={depth}", f"--numjobs={jobs}", "--group_reporting"]
    argv += [f"--size={IMAGE_SIZE // jobs}", f"--offset_increment={IMAGE_SIZE // jobs}"]
    argv += [f"--runtime={seconds:g}", "--time_based", "--output-format=json"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    job: dict[str, Any] = json.loads(out[out.index("{") :])["jobs"][0]
    stats: dict[str, Any] = job["write" if write else "read"]
    return stats


def storvisor_server(kind: str, image: Path, sock: str, work: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, __file__, "--serve", kind, "--image", str(image), "--socket", sock]
    return subprocess.Popen([*argv, "--work", str(work)])


def start_server(
    how: list[str] | str, image: Path, work: Path, n: int
) -> tuple[subprocess.Popen[bytes], str]:
    """Start server number ``n``: a storvisor ``serve`` kind, or a peer's argv with
    ``{sock}`` for its socket; returns it, listening, and its NBD URI."""
    sock = str(work / f"{n}.sock")
    if isinstance(how, str):
        sub = work / f"home{n}"
        sub.mkdir()
        proc = storvisor_server(how, image, sock, sub)
    else:
        proc = subprocess.Popen([a.replace("{sock}", sock) for a in how])
    _wait_for(sock, proc)
    return proc, f"nbd+unix:///disk?socket={sock}"


def serve(kind: str, image: str, sock: str, work: str) -> None:
    """Child process: serve ``image`` (raw) or a thin copy of it until SIGTERM. ``kind``:
    raw, thin, chain (ten snapshots taken during the copy), plane (thin, through data-plane
    processes) or empty (a thin volume of the image's size, never written)."""
    from storvisor.engine.device import FileDevice
    from storvisor.exports.nbd import NBDExport, NBDServer

    home = None
    if kind == "raw":
        export = NBDExport("disk", lambda: FileDevice(image))
    else:
        from storvisor.engine.home import Home
        from storvisor.engine.types import BackingSpec

        size = os.path.getsize(image)
        home = Home(work)
        home.create_pool("p", [BackingSpec(os.path.join(work, "backing"), size=3 * size)])
        pool = home.pool("p")
        pool.create_volume("v", size)
        volume = pool.open_volume("v")
        source = FileDevice(image, read_only=True)
        buf = memoryview(bytearray(4 << 20))
        snapshots = 10 if kind == "chain" else 0
        taken = 0
        # "empty": a volume never written, to compare first writes with ("--serve" only)
        for offset in range(0, size if kind != "empty" else 0, len(buf)):
            # spread the snapshots through the fill: each of the ten layers under the (empty)
            # top owns a tenth of the data
            if taken < snapshots - 1 and offset >= (taken + 1) * size // snapshots:
                taken += 1
                pool.create_snapshot("v", f"s{taken}")
            chunk = buf[: min(len(buf), size - offset)]
            source.read_into(offset, chunk)
            volume.write(offset, chunk)
        if snapshots:
            pool.create_snapshot("v", f"s{snapshots}")
        volume.flush()
        volume.close()
        source.close()
        export = NBDExport("disk", lambda: pool.open_volume("v"))
    planes = None
    if kind in ("plane", "counted"):  # as the daemon serves: connections handed to data planes
        from storvisor.engine.iostats import StatsSet
        from storvisor.exports.nbd_worker import DataPlanes

        planes = DataPlanes()
        planes.start()
        stats = StatsSet("disk") if kind == "counted" else None  # the metrics' counters
        planes.add_export("disk", export.open, "disk", False, stats)
    server = NBDServer(handoff=planes.hand_over if planes is not None else None)
    server.add_export(export)
    server.listen_unix(sock)
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    server.start()
    while not stop:
        time.sleep(0.1)
    server.close()
    if planes is not None:
        planes.close()
    if home is not None:
        home.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=0.5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", default="")
    parser.add_argument("--each", action="store_true", help="print every visit's figures")
    parser.add_argument("--serve")
    parser.add_argument("--image")
    parser.add_argument("--socket")
    parser.add_argument("--work")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.image, args.socket, args.work)
        return

    work = Path(tempfile.mkdtemp(prefix="nbdbench", dir="/tmp"))
    image = work / "image.raw"
    subprocess.run(
        [
            "dd",
            "if=/dev/urandom",
            f"of={image}",
            "bs=4M",
            f"count={IMAGE_SIZE >> 22}",
            "status=none",
        ],
        check=True,
    )
    servers: dict[str, list[str] | str] = {
        "nbdkit file": ["nbdkit", "-f", "-U", "{sock}", "file", str(image)],
        "qemu-storage-daemon": [
            "qemu-storage-daemon",
            "--blockdev",
            f"driver=file,node-name=f0,filename={image},aio=io_uring,cache.direct=off",
            "--nbd-server",
            "addr.type=unix,addr.path={sock}",
            "--export",
            "type=nbd,id=e0,node-name=f0,name=disk,writable=on",
        ],
        "storvisor raw": "raw",
        "storvisor thin": "thin",
        "storvisor thin+10 snaps": "chain",
        "storvisor thin, data plane": "plane",
        "storvisor thin, data plane, counted": "counted",
    }
    # only when --only names it: a thin volume never written, whose "first" rows are the
    # zero-fill counterpart of the snapshotted volume's copy-on-write
    on_request: dict[str, list[str] | str] = {"storvisor thin, never written": "empty"}
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    chosen = {k: v for k, v in servers.items() if not only or any(o in k for o in only)}
    chosen |= {k: v for k, v in on_request.items() if any(o in k for o in only)}
    procs: list[subprocess.Popen[bytes]] = []
    uris: dict[str, str] = {}
    runs: dict[str, dict[str, list[float]]] = {label: {} for label in chosen}
    cpus: dict[str, dict[str, list[float]]] = {label: {} for label in chosen}
    pids: dict[str, int] = {}
    try:
        # every server runs for the whole benchmark; each workload then visits them in turn,
        # repeatedly, so that a disturbance of the (shared) machine hits all of them alike
        for n, (label, how) in enumerate(chosen.items()):
            proc, uris[label] = start_server(how, image, work, n)
            procs.append(proc)
            pids[label] = proc.pid
        subprocess.run(["sync"], check=True)  # no writeback of the set-up under the runs
        for w in WORKLOADS:
            for _ in range(1 if w.once else args.repeat):
                for label, uri in uris.items():
                    # every run starts with a clean page cache: no writeback left over from the
                    # run before (another server's, or a copy-on-write pass, which leaves
                    # sixteen times the dirty data of an overwrite) lands under this one
                    subprocess.run(["sync"], check=True)
                    rate, cpu = bench(uri, w, args.scale, pids[label])
                    if args.each:
                        print(f"  {w.name:24} {label:28} {rate:10,.0f} req/s {cpu:8.1f} us/req")
                    runs[label].setdefault(w.name, []).append(rate)
                    cpus[label].setdefault(w.name, []).append(cpu)
            line = "  ".join(
                f"{label}: {statistics.median(runs[label][w.name]):,.0f}" for label in uris
            )
            print(f"{w.name:24} {line}", flush=True)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    results = {
        label: {name: statistics.median(values) for name, values in per.items()}
        for label, per in runs.items()
    }
    print_table(results)
    print("\nserver CPU per request (us, median):")
    print_table(
        {
            label: {name: statistics.median(values) for name, values in per.items()}
            for label, per in cpus.items()
        },
        "us/req",
    )


def print_table(results: dict[str, dict[str, float]], unit: str = "req/s") -> None:
    peers = [p for p in ("nbdkit file", "qemu-storage-daemon") if p in results]
    ours = [s for s in results if s.startswith("storvisor")]
    pairs: list[tuple[str, str]] = [(o, p) for o in ours for p in peers]
    if "storvisor thin" in results and "storvisor thin+10 snaps" in results:
        pairs.append(("storvisor thin+10 snaps", "storvisor thin"))
    print()
    short = {"nbdkit file": "nbdkit", "qemu-storage-daemon": "qsd"}
    names = [
        *results,
        *(
            f"{o.removeprefix('storvisor ')} / {short.get(p, p.removeprefix('storvisor '))}"
            for o, p in pairs
        ),
    ]
    print(f"| workload ({unit}) | " + " | ".join(names) + " |")
    print("|" + " --- |" * (1 + len(names)))
    for w in WORKLOADS:
        row = [f"{results[s][w.name]:,.{0 if unit == 'req/s' else 1}f}" for s in results]
        row += [f"{results[o][w.name] / results[p][w.name]:.2f}x" for o, p in pairs]
        print(f"| {w.name} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
