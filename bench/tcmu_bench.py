"""storvisor's TCMU backstore against LIO's fileio backstore and tcmu-runner, in a TCG guest.

LIO exists only in a guest here (the host kernel has none), so this boots a host-root guest
(``storvisor.testing.guest``: this machine's kernel and userspace, the host root read-only
over 9p under a tmpfs overlay) and runs itself inside it with ``--inside``. There:

* a storvisor daemon (``storvisor serve``) with a pool on a sparse file and a thin volume of
  ``--size``, exported as a tcm_loop LUN (``storvisor export scsi``): backstore (a), TCMU;
* a LIO fileio backstore (rtslib, write-back, as targetcli creates it) on a file of the same
  size on the same file system (the guest's ``/dev/shm``), also on a tcm_loop LUN: (b);
* tcmu-runner (Debian's ``tcmu-runner``) serving a LIO ``user`` backstore of its ``qcow``
  handler over a raw file of the same size on the same file system (a raw image is read and
  written with ``preadv``/``pwritev`` by one I/O thread): the same kernel interface as
  storvisor's, a handler written in C, also on a tcm_loop LUN: (c);
* the disks written in full first (1 MiB sequential), so that reads find data everywhere
  and later writes overwrite, on the thin volume as on the file;
* fio (libaio, O_DIRECT) on the three ``/dev/sdX``: 4k random read and write at qd32, 1 MiB
  sequential read and write at qd8, ``--seconds`` each after a one-second ramp, ``--rounds``
  times; each round visits the workloads in turn and runs each on every disk one right
  after the other, the order rotated every round, so that load from outside the guest (other
  work on the host's cores) hits them alike.

The guest is TCG (no KVM), so only the ratios mean anything. For each run it records IOPS,
MiB/s, the guest's CPU busy fraction and the CPU per request of the daemon and its data-plane
processes, one of which serves the ring (TCMU runs only; that process's own share in
parentheses), and of tcmu-runner. The host prints
medians, the ratio storvisor/fileio against the goal of each workload (0.5x for 4k, 0.8x for
1 MiB), and what tcmu-runner reaches on the same interface (tcmu-runner/fileio,
storvisor/tcmu-runner). Usage::

    .venv/bin/python bench/tcmu_bench.py [--seconds 10] [--rounds 3] [--size 256M]
        [--cpus 2] [--json results.json] [--profile 'randwrite qd32']

``--profile WORKLOAD`` records the process serving the ring (a data-plane process) with
py-spy (the ``bench`` extra: ``pip install -e '.[bench]'``) during the TCMU runs of that
workload and writes its collapsed stacks (``profile-RW-ROUND.txt``, py-spy's raw format)
next to the ``--json`` file (or to /tmp). Exit status 0 when every run completed without an
I/O error, 1 otherwise.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from storvisor.testing import procs  # noqa: E402
from storvisor.testing.guest import (  # noqa: E402
    HOST_ROOT_MODULES,
    HOST_ROOT_OUTBOX,
    Guest,
    host_root_args,
    host_root_script,
)

MiB = 1 << 20
STORVISOR = str(Path(sys.executable).with_name("storvisor"))
PYSPY = str(Path(sys.executable).with_name("py-spy"))
BACKSTORES = ("tcmu", "fileio", "runner")
"""storvisor's TCMU backstore, LIO's fileio, tcmu-runner's (its qcow handler on a raw file)."""
LIO_CONTROL = "hw_block_size=512,max_data_area_mb=32"
"""The controls storvisor gives its TCMU backstores (``exports/lio.py``), given to
tcmu-runner's too."""
GOALS = {"4k": 0.5, "1M": 0.8}


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str
    bs: str
    iodepth: int

    @property
    def goal(self) -> float:
        return GOALS[self.bs]


WORKLOADS = [
    Workload("4k randread qd32", "randread", "4k", 32),
    Workload("4k randwrite qd32", "randwrite", "4k", 32),
    Workload("1M read qd8", "read", "1M", 8),
    Workload("1M write qd8", "write", "1M", 8),
]


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text[-1:].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


# ------------------------------------------------------------------------ in the guest


def log(text: str) -> None:
    print(f"tcmu-bench: {text}", flush=True)


def run(*args: str, timeout: float = 600) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def api_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
            s.sendall(b"GET /v1/status HTTP/1.0\r\n\r\n")
            return s.recv(64).startswith(b"HTTP/1.0 200")
        except OSError:
            return False


def start_daemon(home: Path) -> subprocess.Popen[bytes]:
    daemon = subprocess.Popen(
        [STORVISOR, "--home", str(home), "serve"],
        stdout=subprocess.DEVNULL,
        stderr=open(home / "daemon.log", "wb"),  # noqa: SIM115
    )
    deadline = time.monotonic() + 180
    while not api_answers(home / "api.sock"):
        if daemon.poll() is not None or time.monotonic() > deadline:
            daemon.kill()
            raise RuntimeError(f"the daemon did not start: {(home / 'daemon.log').read_text()}")
        time.sleep(0.1)
    return daemon


def fileio_disk(path: Path, size: int) -> str:
    """A LIO fileio backstore on ``path`` (``size`` bytes) on a tcm_loop LUN: its /dev/sdX."""
    import rtslib_fb as rts

    with open(path, "wb") as f:
        f.truncate(size)
    so = rts.FileIOStorageObject("bench-fileio", str(path), size=size, write_back=True)
    return loop_disk(so)


def start_runner(work: Path) -> subprocess.Popen[bytes]:
    """tcmu-runner, logging to ``work``."""
    binary = shutil.which("tcmu-runner")
    if binary is None:
        raise RuntimeError("tcmu-runner is not installed (apt-get install tcmu-runner)")
    return subprocess.Popen(
        [binary, "--tcmu-log-dir", str(work)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def runner_disk(path: Path, size: int, runner: subprocess.Popen[bytes]) -> str:
    """A LIO ``user`` backstore of tcmu-runner's qcow handler over the raw file ``path``
    (``size`` bytes) on a tcm_loop LUN: its /dev/sdX, once ``runner`` serves its ring."""
    import rtslib_fb as rts

    with open(path, "wb") as f:
        f.truncate(size)
    deadline = time.monotonic() + 60
    so = None
    while so is None:  # tcmu-runner answers the kernel's netlink events once it is up
        try:
            so = rts.UserBackedStorageObject(
                "bench-runner", config=f"qcow/{path}", size=size, control=LIO_CONTROL
            )
        except rts.RTSLibError:
            if runner.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    disk = loop_disk(so)
    while not procs.open_files(runner.pid, "/dev/uio"):
        if runner.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("tcmu-runner did not open the backstore's ring")
        time.sleep(0.05)
    return disk


def loop_disk(so: Any) -> str:
    """The storage object ``so`` as LUN 0 of a new tcm_loop target: its /dev/sdX."""
    import rtslib_fb as rts

    target = rts.Target(rts.FabricModule("loopback"))
    tpg = rts.TPG(target, 1)
    rts.LUN(tpg, 0, so)
    address = Path(tpg.path, "address").read_text().strip()
    deadline = time.monotonic() + 60
    while True:
        found = glob.glob(f"/sys/bus/scsi/devices/{address}:0/block/*")
        if found and os.path.exists(f"/dev/{os.path.basename(found[0])}"):
            return f"/dev/{os.path.basename(found[0])}"
        if time.monotonic() > deadline:
            raise RuntimeError(f"no disk for the fileio LUN at {address}")
        time.sleep(0.05)


def clear_lio() -> None:
    """Delete every LIO target and backstore left (the guest's LIO is the bench's own)."""
    import rtslib_fb as rts

    root = rts.RTSRoot()
    for target in list(root.targets):
        target.delete()
    for so in list(root.storage_objects):
        so.delete()


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole guest."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def cpu_seconds(pid: int) -> float:
    """CPU seconds the process ``pid`` and its children (a daemon's data-plane processes)
    used so far."""
    ticks = 0
    for member in procs.family(pid):
        info = procs.process(member)
        ticks += info.cpu_ticks if info is not None else 0
    return ticks / os.sysconf("SC_CLK_TCK")


def process_seconds(pid: int) -> float:
    """CPU seconds the process ``pid`` (alone) used so far; 0 for pid 0 or a process gone."""
    info = procs.process(pid) if pid else None
    return info.cpu_ticks / os.sysconf("SC_CLK_TCK") if info is not None else 0.0


def ring_holder(pid: int) -> int:
    """The process of the daemon ``pid``'s family that serves the TCMU ring (holds the uio
    device open): a data-plane process, or the daemon."""
    for member in procs.family(pid):
        if procs.open_files(member, "/dev/uio"):
            return member
    return pid


def fio(device: str, w: Workload, seconds: float, size: int) -> dict[str, Any]:
    out = run(
        "fio", "--name=bench", f"--filename={device}", f"--rw={w.rw}", f"--bs={w.bs}",
        f"--iodepth={w.iodepth}", "--ioengine=libaio", "--direct=1", f"--size={size}",
        "--time_based", f"--runtime={seconds:g}", "--ramp_time=1", "--norandommap",
        "--randrepeat=0", "--output-format=json",
        timeout=seconds + 300,
    )  # fmt: skip
    job = json.loads(out[out.index("{") :])["jobs"][0]
    side = job["read"] if "read" in w.rw else job["write"]
    return {
        "iops": side["iops"],
        "mib_s": side["bw_bytes"] / MiB,
        "requests": side["total_ios"],
        "lat_us": side["clat_ns"]["mean"] / 1000,
        "error": job["error"],
    }


def inside(args: argparse.Namespace) -> int:
    size = parse_size(args.size)
    work = Path("/dev/shm/tcmu-bench")
    work.mkdir(parents=True)
    home = work / "home"
    outbox = Path(HOST_ROOT_OUTBOX)
    cli = [STORVISOR, "--home", str(home)]
    run(*cli, "pool", "create", "p", "--backing", f"{work / 'pool.img'}:{2 * size}")
    run(*cli, "volume", "create", "p/v", "--size", str(size))
    daemon = start_daemon(home)
    runner = None
    try:
        tcmu = run(*cli, "export", "scsi", "p/v").split()[0]
        fileio = fileio_disk(work / "fileio.img", size)
        runner = start_runner(work)
        disks = {
            "tcmu": tcmu,
            "fileio": fileio,
            "runner": runner_disk(work / "raw.img", size, runner),
        }
        log(f"disks {disks}, {os.cpu_count()} vCPU")
        for name, disk in disks.items():
            started = time.monotonic()
            run(
                "fio", "--name=fill", f"--filename={disk}", "--rw=write", "--bs=1M",
                "--iodepth=8", "--ioengine=libaio", "--direct=1", f"--size={size}",
            )  # fmt: skip
            log(f"filled {name} in {time.monotonic() - started:.1f} s")
        runs: list[dict[str, Any]] = []
        for round_no in range(args.rounds):
            for w in WORKLOADS:
                turn = round_no % len(BACKSTORES)
                order = BACKSTORES[turn:] + BACKSTORES[:turn]
                for name in order:
                    spy = None
                    if name == "tcmu" and args.profile and args.profile in w.name:
                        svg = outbox / f"profile-{w.rw}-{round_no}.txt"
                        spy = subprocess.Popen(
                            [PYSPY, "record", "--pid", str(ring_holder(daemon.pid)), "--threads",
                             "--rate", "50", "--nonblocking", "--format", "raw", "-o", str(svg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                        )  # fmt: skip
                    busy0, total0 = cpu_ticks()
                    server = {"tcmu": daemon.pid, "runner": runner.pid}.get(name)
                    ring = ring_holder(daemon.pid) if name == "tcmu" else 0
                    cpu0 = cpu_seconds(server) if server else 0.0
                    ring0 = process_seconds(ring)
                    result = fio(disks[name], w, args.seconds, size)
                    cpu = cpu_seconds(server) - cpu0 if server else 0.0
                    ring_cpu = process_seconds(ring) - ring0
                    busy1, total1 = cpu_ticks()
                    if spy is not None:
                        spy.send_signal(signal.SIGINT)
                        spy.wait(120)
                    result.update(
                        round=round_no,
                        workload=w.name,
                        backstore=name,
                        guest_busy_pct=100 * (busy1 - busy0) / max(total1 - total0, 1),
                    )
                    if server:
                        result["server_us_per_req"] = 1e6 * cpu / max(result["requests"], 1)
                    if ring:
                        result["ring_us_per_req"] = 1e6 * ring_cpu / max(result["requests"], 1)
                    runs.append(result)
                    log(
                        f"round {round_no} {w.name:18} {name:6} {result['iops']:9,.0f} IOPS "
                        f"{result['mib_s']:7.1f} MiB/s busy {result['guest_busy_pct']:.0f}%"
                    )
        (outbox / "runs.json").write_text(json.dumps(runs))
    finally:
        # the LUNs go first: a disk left without its handler waits for LIO's command
        # timeout at power-off
        subprocess.run([*cli, "export", "remove", "scsi/p/v"], capture_output=True, check=False)
        clear_lio()
        if runner is not None:
            runner.kill()
            runner.wait()
        daemon.kill()
        daemon.wait()
    return 0


# ------------------------------------------------------------------------ on the host


def on_host(args: argparse.Namespace) -> int:
    command = [sys.executable, str(Path(__file__).resolve()), "--inside"]
    command += ["--seconds", f"{args.seconds:g}", "--rounds", str(args.rounds)]
    command += ["--size", args.size]
    if args.profile:
        command += ["--profile", args.profile]
    outbox = tempfile.mkdtemp(prefix="storvisor-tcmu-bench-")
    env = {"PYTHONPATH": str(REPO / "src"), "HOME": "/root", "LANG": "C.UTF-8"}
    script = host_root_script(command, cwd=str(REPO), env=env, outbox=True)
    timeout = 600 + args.rounds * len(WORKLOADS) * len(BACKSTORES) * (args.seconds + 30)
    load = os.getloadavg()[0]
    started = time.monotonic()
    try:
        guest = Guest(
            script,
            qemu_args=host_root_args(outbox),
            memory_mib=args.memory,
            cpus=args.cpus,
            modules=HOST_ROOT_MODULES,
            timeout=timeout,
        )
        with guest:
            done = threading.Event()
            progress = threading.Thread(target=echo_progress, args=(guest, done), daemon=True)
            progress.start()
            try:
                result = guest.wait()
            finally:
                done.set()
                progress.join()
        runs_file = Path(outbox, "runs.json")
        if result.status != 0 or not runs_file.exists():
            print(result.console[-5000:], file=sys.stderr)
            print(f"the guest failed (status {result.status})", file=sys.stderr)
            return 1
        runs = json.loads(runs_file.read_text())
        for svg in Path(outbox).glob("profile-*.txt"):
            dest = Path(args.json).parent if args.json else Path(tempfile.gettempdir())
            shutil.copy(svg, dest / svg.name)
            print(f"profile: {dest / svg.name}", file=sys.stderr)
    finally:
        shutil.rmtree(outbox, ignore_errors=True)
    summary = summarise(runs)
    print_table(summary)
    load_after = os.getloadavg()[0]
    print(
        f"\n{time.monotonic() - started:.0f} s; guest {args.cpus} vCPU (TCG); {args.rounds} "
        f"rounds of {args.seconds:g} s per run; volume and file {args.size}; host load "
        f"average {load:.2f} before, {load_after:.2f} after"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "runs": runs, "summary": summary}, indent=1)
        )
    failed = any(r["error"] for r in runs)
    return 1 if failed else 0


def echo_progress(guest: Guest, done: threading.Event) -> None:
    """Print the guest's progress lines to stderr as they come."""
    seen = 0
    while True:
        finished = done.wait(1.0)
        lines = guest.console.splitlines()
        for line in lines[seen:]:
            if line.startswith("tcmu-bench:"):
                print(line, file=sys.stderr, flush=True)
        seen = len(lines)
        if finished:
            return


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per workload: the medians of each backstore, and the ratios of the medians of
    storvisor (``tcmu``) to fileio, tcmu-runner to fileio and storvisor to tcmu-runner, with
    each round's ratio (``.../..._rounds``)."""
    rows = []
    for w in WORKLOADS:
        row: dict[str, Any] = {"workload": w.name, "goal": w.goal}
        for name in BACKSTORES:
            mine = [r for r in runs if r["workload"] == w.name and r["backstore"] == name]
            for key in ("iops", "mib_s", "guest_busy_pct", "server_us_per_req", "ring_us_per_req"):
                values = [r[key] for r in mine if key in r]
                row[f"{name}_{key}"] = statistics.median(values) if values else None
        for top, bottom in (("tcmu", "fileio"), ("runner", "fileio"), ("tcmu", "runner")):
            row[f"{top}/{bottom}"] = ratio(row[f"{top}_iops"], row[f"{bottom}_iops"])
            per_round = [
                t["iops"] / b["iops"]
                for t in runs
                for b in runs
                if t["workload"] == b["workload"] == w.name
                and t["round"] == b["round"]
                and (t["backstore"], b["backstore"]) == (top, bottom)
                and b["iops"]
            ]
            row[f"{top}/{bottom}_rounds"] = per_round
        rows.append(row)
    return rows


def ratio(top: float | None, bottom: float | None) -> float | None:
    return top / bottom if top is not None and bottom else None


def print_table(summary: list[dict[str, Any]]) -> None:
    header = [
        "workload", "storvisor IOPS", "MiB/s", "fileio IOPS", "MiB/s", "tcmu-runner IOPS",
        "MiB/s", "storvisor/fileio (rounds)", "goal", "tcmu-runner/fileio (rounds)",
        "storvisor/tcmu-runner (rounds)", "µs/req storvisor (ring's process) / tcmu-runner",
        "guest busy storvisor / fileio / tcmu-runner",
    ]  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |")
    for row in summary:
        mine = row["tcmu/fileio"]
        met = "met" if mine is not None and mine >= row["goal"] else "missed"
        cells = [row["workload"]]
        for name in ("tcmu", "fileio", "runner"):
            cells += [f"{row[f'{name}_iops']:,.0f}", f"{row[f'{name}_mib_s']:,.1f}"]
        cells += [
            with_rounds(row, "tcmu/fileio"),
            f"{row['goal']:.1f}x {met}",
            with_rounds(row, "runner/fileio"),
            with_rounds(row, "tcmu/runner"),
            f"{row['tcmu_server_us_per_req']:,.0f} ({row['tcmu_ring_us_per_req']:,.0f}) / "
            f"{row['runner_server_us_per_req']:,.0f}",
            " / ".join(f"{row[f'{name}_guest_busy_pct']:.0f}%" for name in BACKSTORES),
        ]
        print("| " + " | ".join(cells) + " |")


def with_rounds(row: dict[str, Any], key: str) -> str:
    """The ratio ``key`` of ``row``, then each round's: ``0.45x (0.38 / 0.49 / 0.45)``."""
    value = row[key]
    each = " / ".join(f"{x:.2f}" for x in row[f"{key}_rounds"])
    return "-" if value is None else f"{value:.2f}x ({each})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (each runs everything)")
    parser.add_argument("--size", default="256M", help="volume and file size (K/M/G suffix)")
    parser.add_argument("--cpus", type=int, default=2, help="guest vCPUs")
    parser.add_argument("--memory", type=int, default=2048, help="guest MiB")
    parser.add_argument("--json", default=None, help="write every run and the summary here")
    parser.add_argument(
        "--profile", default=None, help="py-spy the ring's process on this workload"
    )
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    return inside(args) if args.inside else on_host(args)


if __name__ == "__main__":
    sys.exit(main())
