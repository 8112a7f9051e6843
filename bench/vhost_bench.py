"""vhost-user-blk back-ends side by side: storvisor against qemu-storage-daemon.

Both back-ends serve the same prefilled raw file (page cache, no O_DIRECT) and are driven by
the same client, ``vhost-blk-bench`` from ``../shared/tools/vhost-blk-bench`` (compiled into a
temporary directory, the source directory is read-only), in the same run:

* 4k random read and write at queue depth 1 and 32,
* 1 MiB sequential read and write at queue depth 8,

each with 1 and 2 virtqueues (the depth is per queue). For every cell it prints IOPS, MiB/s,
the back-end's CPU use (100% = one core, all its processes, from /proc over the whole run
including the ramp), the ratio
storvisor/qsd and how busy the whole host was (the higher of the two runs: other work on the
machine shows up there). Usage::

    .venv/bin/python bench/vhost_bench.py [--seconds 5] [--size 1G] [--json results.jsonl]

Exit status 0 when every run completed without I/O errors, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOL_DIR = REPO.parent / "shared" / "tools" / "vhost-blk-bench"
sys.path.insert(0, str(REPO / "src"))

from proc_stats import family_cpu  # noqa: E402
from storvisor.testing.vhost_backend import (  # noqa: E402
    QsdVhostBackend,
    StorvisorVhostBackend,
)


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str
    bs: str
    iodepth: int


WORKLOADS = [
    Workload("4k randread qd1", "randread", "4k", 1),
    Workload("4k randread qd32", "randread", "4k", 32),
    Workload("4k randwrite qd1", "randwrite", "4k", 1),
    Workload("4k randwrite qd32", "randwrite", "4k", 32),
    Workload("1M read qd8", "read", "1M", 8),
    Workload("1M write qd8", "write", "1M", 8),
]


def build_tool(out_dir: Path) -> Path:
    """Compile vhost-blk-bench into ``out_dir`` (skipped when it is newer than the source)."""
    source = TOOL_DIR / "vhost-blk-bench.c"
    binary = out_dir / "vhost-blk-bench"
    if binary.exists() and binary.stat().st_mtime >= source.stat().st_mtime:
        return binary
    out_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["gcc", "-O2", "-Wall", "-o", str(binary), str(source), "-lm"],
        check=True,
    )
    return binary


def run_client(tool: Path, socket_path: str, args: list[str]) -> dict[str, object]:
    """Run one vhost-blk-bench and return its JSON summary (its last stdout line)."""
    proc = subprocess.run(
        [str(tool), "--socket", socket_path, "--json", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = proc.stdout.strip().splitlines()
    if not lines or not lines[-1].startswith("{"):
        raise RuntimeError(
            f"vhost-blk-bench {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr}"
        )
    result: dict[str, object] = json.loads(lines[-1])
    if proc.returncode != 0:
        result["stderr"] = proc.stderr.strip()
    return result


def prefill(tool: Path, image: Path, size: int, sock: str) -> None:
    """Write nbdkit's offset pattern over the whole image through qemu-storage-daemon."""
    with open(image, "wb") as f:
        f.truncate(size)
    with QsdVhostBackend(str(image), sock):
        result = run_client(
            tool, sock, ["--verify", "--bs", "1M", "--iodepth", "8", "--size-limit", str(size)]
        )
    if result.get("exit_code") != 0:
        raise RuntimeError(f"prefill failed: {result}")


def fmt_iops(value: float) -> str:
    return f"{value:,.0f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("--ramp", type=float, default=1.0, help="warm-up seconds per run")
    parser.add_argument("--size", default="1G", help="image size (K/M/G suffix)")
    parser.add_argument("--queues", default="1,2", help="queue counts to run, comma-separated")
    parser.add_argument("--backends", default="qsd,storvisor")
    parser.add_argument("--workdir", default=None, help="where the image goes (default /tmp)")
    parser.add_argument("--json", default=None, help="append every result as a JSON line here")
    args = parser.parse_args()

    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    size = (
        int(args.size[:-1]) * units[args.size[-1].upper()]
        if args.size[-1].isalpha()
        else int(args.size)
    )
    backends = args.backends.split(",")
    queue_counts = [int(q) for q in args.queues.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="sv-vbench-", dir=args.workdir or "/tmp"))
    tool = build_tool(Path(tempfile.gettempdir()) / "storvisor-vhost-blk-bench")
    image = workdir / "disk.raw"
    results: dict[tuple[str, int, str], dict[str, object]] = {}
    failed = False
    started = time.monotonic()
    try:
        prefill(tool, image, size, str(workdir / "prefill.sock"))
        for queues in queue_counts:
            # Both back-ends run side by side (an idle one costs nothing) and every workload
            # runs on one right after the other, so background load hits both alike.
            running: dict[str, QsdVhostBackend | StorvisorVhostBackend] = {}
            try:
                for name in backends:
                    sock = str(workdir / f"{name}.sock")
                    running[name] = (
                        QsdVhostBackend(str(image), sock, num_queues=queues)
                        if name == "qsd"
                        else StorvisorVhostBackend(str(image), sock, num_queues=queues)
                    )
                    running[name].start()
                for w in WORKLOADS:
                    for name, backend in running.items():
                        pid = backend.pid or 0
                        cpu0, t0 = family_cpu(pid), time.monotonic()
                        result = run_client(
                            tool,
                            backend.socket_path,
                            [
                                "--rw", w.rw, "--bs", w.bs, "--iodepth", str(w.iodepth),
                                "--queues", str(queues), "--seconds", str(args.seconds),
                                "--ramp", str(args.ramp), "--backend-pid", str(backend.pid),
                            ],
                        )  # fmt: skip
                        # the client sees one pid; a back-end with queue processes has more
                        cpu_pct = 100 * (family_cpu(pid) - cpu0) / (time.monotonic() - t0)
                        result.update(backend=name, workload=w.name, backend_cpu_pct=cpu_pct)
                        results[(name, queues, w.name)] = result
                        if result.get("exit_code") != 0 or result.get("errors"):
                            failed = True
                        print(
                            f"  {name:9} q{queues} {w.name:18} "
                            f"{fmt_iops(float(str(result['iops']))):>9} IOPS "
                            f"cpu {result.get('backend_cpu_pct')}% "
                            f"host busy {result.get('host_busy_pct')}% "
                            f"exit {result.get('exit_code')}",
                            file=sys.stderr,
                        )
            finally:
                for backend in running.values():
                    backend.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    if args.json:
        with open(args.json, "a") as f:
            for (_, queues, _), result in results.items():
                f.write(json.dumps({"queues_run": queues, **result}) + "\n")

    print_table(results, backends, queue_counts)
    print(f"\n{time.monotonic() - started:.0f} s, {os.cpu_count()} CPUs, size {args.size}, "
          f"{args.seconds:g} s per run after {args.ramp:g} s ramp")  # fmt: skip
    return 1 if failed else 0


def print_table(
    results: dict[tuple[str, int, str], dict[str, object]],
    backends: list[str],
    queue_counts: list[int],
) -> None:
    """Markdown table: per workload and queue count, each back-end's IOPS, MiB/s, CPU%."""
    header = ["workload", "queues"]
    for b in backends:
        header += [f"{b} IOPS", f"{b} MiB/s", f"{b} CPU%"]
    if {"qsd", "storvisor"} <= set(backends):
        header.append("storvisor/qsd")
    header.append("host busy")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|")
    for queues in queue_counts:
        for w in WORKLOADS:
            row = [w.name, str(queues)]
            iops: dict[str, float] = {}
            for b in backends:
                r = results.get((b, queues, w.name))
                if r is None:
                    row += ["-", "-", "-"]
                    continue
                iops[b] = float(str(r["iops"]))
                cpu = r.get("backend_cpu_pct")
                row += [
                    fmt_iops(iops[b]) + ("" if r.get("exit_code") == 0 else " (failed)"),
                    f"{float(str(r['mib_s'])):,.0f}",
                    "-" if cpu is None else f"{float(str(cpu)):.0f}%",
                ]
            if "storvisor/qsd" in header:
                ratio = (
                    iops["storvisor"] / iops["qsd"]
                    if iops.get("qsd") and "storvisor" in iops
                    else None
                )
                row.append("-" if ratio is None else f"{ratio:.2f}x")
            busy = [
                float(str(r["host_busy_pct"]))
                for b in backends
                if (r := results.get((b, queues, w.name))) and r.get("host_busy_pct") is not None
            ]
            row.append(f"{max(busy):.0f}%" if busy else "-")
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    sys.exit(main())
