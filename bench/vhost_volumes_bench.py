"""Several vhost-user-blk volumes or queues at once: do they use more than one core?

``--exports`` exports (default 2) with ``--queues`` queues each (default 1) are driven at the
same time by one ``vhost-blk-bench`` client per export (same workload, the depth is per
queue), and the sum of their IOPS is reported with the CPU the back-end used (all its
processes, 100% = one core), for three back-ends:

* ``storvisor``: the daemon (``storvisor serve``) exporting thin volumes of one pool; the
  exports' queues run in its data-plane processes (one per CPU, each queue on the least
  loaded one);
* ``one-process``: the same volumes served by ``VhostUserBlkServer`` s inside one Python
  process, a thread per queue (how every export ran before data planes);
* ``qsd``: qemu-storage-daemon exporting raw files, each export on an iothread of its own
  (its multi-core configuration; its queues share their export's iothread).

All images are prefilled and in the page cache. Usage::

    .venv/bin/python bench/vhost_volumes_bench.py [--seconds 5] [--size 512M]
    .venv/bin/python bench/vhost_volumes_bench.py --exports 1 --queues 2   # queues, one volume

Exit status 0 when every run completed without I/O errors, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from proc_stats import cpu_seconds, family  # noqa: E402
from vhost_bench import build_tool, prefill, run_client  # noqa: E402

STORVISOR = str(Path(sys.executable).with_name("storvisor"))
WORKLOADS = [
    ("4k randread qd32", "randread", "4k", 32),
    ("4k randwrite qd32", "randwrite", "4k", 32),
    ("1M read qd8", "read", "1M", 8),
    ("1M write qd8", "write", "1M", 8),
]
ONE_PROCESS = textwrap.dedent(
    """
    import signal, sys
    from storvisor.engine.home import Home
    from storvisor.exports.vhost_user_blk import VhostUserBlkServer
    home_dir, queues, socks = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    home = Home(home_dir)
    pool = home.pool("p")
    servers = []
    for i, sock in enumerate(socks):
        server = VhostUserBlkServer(pool.open_volume(f"v{i}"), sock, num_queues=queues)
        server.start()
        servers.append(server)
    print("READY", flush=True)
    signal.sigwait({signal.SIGTERM})
    for server in servers:
        server.close()
    home.close()
    """
)


def wait_for(path: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear")
        time.sleep(0.05)


def run_pair(
    tool: Path,
    socks: list[str],
    workload: tuple[str, str, str, int],
    args: argparse.Namespace,
    pids: list[int],
) -> tuple[float, float, bool]:
    """Both clients at once; (total IOPS, back-end CPU %, all ok)."""
    _, rw, bs, depth = workload
    cmd_args = [
        "--rw", rw, "--bs", bs, "--iodepth", str(depth), "--queues", str(args.queues),
        "--seconds", str(args.seconds), "--ramp", str(args.ramp),
        "--size-limit", str(args.size_bytes),
    ]  # fmt: skip
    procs = [
        subprocess.Popen(
            [str(tool), "--socket", sock, "--json", "--seed", str(i + 1), *cmd_args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, sock in enumerate(socks)
    ]
    time.sleep(args.ramp)
    cpu0, t0 = cpu_seconds(pids), time.monotonic()
    outs = [p.communicate() for p in procs]
    cpu1, t1 = cpu_seconds(pids), time.monotonic()
    total, ok = 0.0, True
    import json

    for p, (out, err) in zip(procs, outs, strict=True):
        lines = out.strip().splitlines()
        if p.returncode != 0 or not lines:
            ok = False
            print(err, file=sys.stderr)
            continue
        result = json.loads(lines[-1])
        total += float(result["iops"])
        ok = ok and not result.get("errors")
    return total, 100 * (cpu1 - cpu0) / (t1 - t0), ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--ramp", type=float, default=1.0)
    parser.add_argument("--size", default="512M", help="size of each volume (M or G suffix)")
    parser.add_argument("--queues", type=int, default=1, help="queues per export")
    parser.add_argument("--exports", type=int, default=2, help="volumes served at once")
    parser.add_argument("--backends", default="qsd,one-process,storvisor")
    args = parser.parse_args()
    args.size_bytes = int(args.size[:-1]) << {"M": 20, "G": 30}[args.size[-1].upper()]
    backends = args.backends.split(",")
    workdir = Path(tempfile.mkdtemp(prefix="sv-vvbench-"))
    tool = build_tool(Path(tempfile.gettempdir()) / "storvisor-vhost-blk-bench")
    home = workdir / "home"
    env = dict(os.environ, STORVISOR_HOME=str(home))
    results: dict[tuple[str, str], tuple[float, float, bool]] = {}
    started = time.monotonic()

    def sv(*argv: str) -> None:
        subprocess.run([STORVISOR, "--home", str(home), *argv], check=True, env=env,
                       stdout=subprocess.DEVNULL)  # fmt: skip

    try:
        images = [workdir / f"disk{i}.raw" for i in range(args.exports)]
        if "qsd" in backends:
            for i, image in enumerate(images):
                prefill(tool, image, args.size_bytes, str(workdir / f"prefill{i}.sock"))
        sv(
            "pool",
            "create",
            "p",
            "--backing",
            f"{workdir}/pool.img:{args.exports * args.size_bytes + (256 << 20)}",
        )
        for i in range(args.exports):
            sv("volume", "create", f"p/v{i}", "--size", str(args.size_bytes))
        # allocate every cluster of both volumes (the runs then overwrite in place)
        proc = subprocess.Popen(
            [STORVISOR, "--home", str(home), "serve"], env=env, stdout=subprocess.DEVNULL
        )
        try:
            wait_for(str(home / "api.sock"))
            time.sleep(0.5)
            for i in range(args.exports):
                sock = str(workdir / f"fill{i}.sock")
                sv("export", "vhost-user-blk", f"p/v{i}", "--socket", sock)
                result = run_client(tool, sock, ["--verify", "--bs", "1M", "--iodepth", "8",
                                                 "--size-limit", str(args.size_bytes)])  # fmt: skip
                if result.get("exit_code") != 0:
                    raise RuntimeError(f"prefill failed: {result}")
                sv("export", "remove", f"vhost-user-blk:p/v{i}")
        finally:
            proc.terminate()
            proc.wait(30)
        for backend in backends:
            socks = [str(workdir / f"{backend}{i}.sock") for i in range(args.exports)]
            if backend == "qsd":
                cmd = ["qemu-storage-daemon"]
                for i, image in enumerate(images):
                    cmd += [
                        "--object", f"iothread,id=t{i}",
                        "--blockdev", f"driver=file,node-name=f{i},filename={image},"
                        "cache.direct=off,aio=threads",
                        "--blockdev", f"driver=raw,node-name=d{i},file=f{i}",
                        "--export", f"type=vhost-user-blk,id=e{i},node-name=d{i},"
                        f"addr.type=unix,addr.path={socks[i]},writable=on,"
                        f"num-queues={args.queues},iothread=t{i}",
                    ]  # fmt: skip
                proc = subprocess.Popen(cmd)
            elif backend == "one-process":
                proc = subprocess.Popen(
                    [sys.executable, "-c", ONE_PROCESS, str(home), str(args.queues), *socks],
                    stdout=subprocess.DEVNULL,
                )
            else:
                proc = subprocess.Popen(
                    [STORVISOR, "--home", str(home), "serve"], env=env, stdout=subprocess.DEVNULL
                )
                wait_for(str(home / "api.sock"))
                time.sleep(0.5)
                for i, sock in enumerate(socks):
                    sv("export", "vhost-user-blk", f"p/v{i}", "--socket", sock,
                       "--queues", str(args.queues))  # fmt: skip
            try:
                for sock in socks:
                    wait_for(sock)
                pids = family(proc.pid)
                for workload in WORKLOADS:
                    result = run_pair(tool, socks, workload, args, pids)
                    results[(backend, workload[0])] = result
                    print(f"  {backend:12} {workload[0]:18} {result[0]:>10,.0f} IOPS "
                          f"cpu {result[1]:.0f}%", file=sys.stderr)  # fmt: skip
            finally:
                proc.terminate()
                proc.wait(30)
                if backend == "storvisor":
                    for i in range(args.exports):
                        name = f"vhost-user-blk:p/v{i}"
                        subprocess.run([STORVISOR, "--home", str(home), "export", "remove", name],
                                       env=env, capture_output=True)  # fmt: skip
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    header = [f"workload ({args.exports} export(s) x {args.queues} queue(s) at once)"]
    for b in backends:
        header += [f"{b} IOPS", f"{b} CPU%"]
    if {"storvisor", "one-process"} <= set(backends):
        header.append("storvisor / one-process")
    if {"storvisor", "qsd"} <= set(backends):
        header.append("storvisor / qsd")
    print("| " + " | ".join(header) + " |")
    print("|---|" + "---:|" * (len(header) - 1))
    ok = True
    for name, *_ in WORKLOADS:
        row = [name]
        for b in backends:
            iops, cpu, good = results.get((b, name), (0.0, 0.0, False))
            ok = ok and good
            row += [f"{iops:,.0f}", f"{cpu:.0f}%"]
        for a, b in (("storvisor", "one-process"), ("storvisor", "qsd")):
            if {a, b} <= set(backends):
                den = results.get((b, name), (0.0,))[0]
                row.append(f"{results.get((a, name), (0.0,))[0] / den:.2f}x" if den else "-")
        print("| " + " | ".join(row) + " |")
    print(f"\n{time.monotonic() - started:.0f} s, {os.cpu_count()} CPUs, volumes of {args.size}, "
          f"{args.queues} queue(s) each, {args.seconds:g} s per run")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
