"""Data planes that scale with cores, not with exports: what ``storvisor serve`` costs with
many exports, and what its shared data-plane processes deliver.

Four parts, each against a real daemon (``storvisor serve``, started and stopped by this
script in temporary HOMEs):

1. *Scale*: ``--exports`` vhost-user-blk exports (1 queue each, 1 GiB thin volumes) plus
   ``--nbd`` idle NBD connections: the daemon's processes (itself and its descendants) and
   their total PSS (``/proc/PID/smaps_rollup``); the latency of creating an export through the
   API (each of them, over the API's Unix socket); then a daemon restart: SIGTERM until it
   exited, and a new daemon's start until every export answers ``GET_FEATURES``.
2. *IOPS*: 8 exports driven at once by ``vhost-blk-bench`` (4k randread, qd32 each, over a
   prefilled range), served by the shared data planes (default count), by processes of each
   export's own (``--data-planes per-export``), and by qemu-storage-daemon with one iothread
   per core serving 8 raw files prefilled the same way. The three run side by side and are
   driven in turn, ``--rounds`` times (medians): compare the ratios (the machine may be
   shared). With each figure the back-end's CPU per request (all its processes, from /proc,
   over the run and its 1 s ramp), which other load on the machine disturbs less.
3. *Stall*: two exports in one data-plane process (``--data-planes 1``), one on a pool whose
   backing file lives on ``storvisor.testing.faultfs``: the other export's IOPS alone, then
   with every read of the first stalled and its client's requests held, in turn,
   ``--rounds`` times (medians).

Usage::

    PYTHONPATH=src .venv/bin/python bench/planes_bench.py [--quick] [--json out.jsonl]

``--quick`` shrinks every part (40 exports, 10 NBD connections, 2 s runs, one round) for a
smoke run.
The client, ``vhost-blk-bench``, is compiled from ``../shared/tools/vhost-blk-bench`` (or
``--tool-src``) into a temporary directory. The stall part needs FUSE (``/dev/fuse``) and is
skipped without it. Exit status 0 when every part ran and no request failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from proc_stats import cpu_seconds  # noqa: E402
from storvisor.api.client import Client  # noqa: E402
from storvisor.engine.types import BackingSpec  # noqa: E402
from storvisor.errors import StorvisorError  # noqa: E402
from storvisor.testing.procs import family  # noqa: E402

DAEMON_SRC = REPO / "src"
"""The tree the daemons run (``--src``: another checkout's, for a before/after of the scale
part)."""
GiB = 1 << 30
MiB = 1 << 20
_GET_FEATURES = struct.Struct("<III").pack(1, 1, 0)


# ----------------------------------------------------------------------------- helpers


def find_tool_source(given: str | None) -> Path:
    candidates = [Path(given)] if given else []
    for up in (REPO.parent, REPO.parent.parent):
        candidates.append(up / "shared" / "tools" / "vhost-blk-bench")
    for candidate in candidates:
        if (candidate / "vhost-blk-bench.c").is_file():
            return candidate
    raise SystemExit(f"vhost-blk-bench sources not found in {[str(c) for c in candidates]}")


def build_tool(source: Path, out: Path) -> Path:
    binary = out / "vhost-blk-bench"
    c_file = source / "vhost-blk-bench.c"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(c_file), "-lm"], check=True)
    return binary


class Daemon:
    """``storvisor serve`` in a subprocess of this script."""

    def __init__(self, home: Path, *args: str) -> None:
        self.home = home
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = open(home.parent / f"{home.name}-daemon.log", "ab")  # noqa: SIM115

    def start(self, wait_api: bool = True) -> float:
        """Start; return the seconds until the API answered (or 0 without waiting)."""
        env = dict(os.environ, PYTHONPATH=str(DAEMON_SRC))
        argv = [sys.executable, "-c", "from storvisor.cli.main import main; main()"]
        argv += ["--home", str(self.home), "serve", *self.args]
        started = time.monotonic()
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=self.log, stdin=subprocess.DEVNULL, env=env
        )
        if not wait_api:
            return 0.0
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"the daemon exited; see {self.log.name}")
            client = Client(self.home / "api.sock", timeout=5)
            try:
                client.status()
                return time.monotonic() - started
            except (OSError, StorvisorError):
                pass
            finally:
                client.close()
            time.sleep(0.02)

    def client(self) -> contextlib.closing[Client]:
        return contextlib.closing(Client(self.home / "api.sock", timeout=60))

    def pids(self) -> list[int]:
        assert self.proc is not None
        return family(self.proc.pid)

    def stop(self) -> float:
        if self.proc is None:
            return 0.0
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        return time.monotonic() - started


def pss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
    return total / 1024


def answers(path: str) -> bool:
    """Whether a vhost-user back-end on ``path`` answers GET_FEATURES."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(path)
            sock.sendall(_GET_FEATURES)
            reply = b""
            while len(reply) < 20:
                more = sock.recv(20 - len(reply))
                if not more:
                    return False
                reply += more
            return int(struct.unpack_from("<I", reply)[0]) == 1
    except OSError:
        return False


def nbd_connect(path: str, name: str) -> socket.socket:
    """An NBD connection to export ``name`` on the Unix socket ``path``, through the
    handshake (fixed newstyle, ``NBD_OPT_GO``) into transmission, left idle."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(path)

    def take(n: int) -> bytes:
        data = b""
        while len(data) < n:
            more = sock.recv(n - len(data))
            if not more:
                raise OSError("NBD server closed the connection")
            data += more
        return data

    take(18)  # NBDMAGIC, IHAVEOPT, handshake flags
    sock.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    raw = name.encode()
    data = struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0)
    sock.sendall(struct.pack(">QII", 0x49484156454F5054, 7, len(data)) + data)  # GO
    while True:
        _, _, kind, length = struct.unpack(">QIII", take(20))
        take(length)
        if kind == 1:  # ACK
            return sock
        if kind & 0x80000000:
            raise OSError(f"NBD_OPT_GO failed: reply type {kind:#x}")


def run_bench(tool: Path, sock: str, *args: str, seconds: float = 0) -> subprocess.Popen[bytes]:
    argv = [str(tool), "--socket", sock, "--json", "--backend-pid", "-1", *args]
    if seconds:
        argv += ["--seconds", str(seconds)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def result(proc: subprocess.Popen[bytes], timeout: float = 600) -> dict[str, float]:
    out, err = proc.communicate(timeout=timeout)
    lines = out.decode().strip().splitlines()
    if proc.returncode != 0 or not lines or not lines[-1].startswith("{"):
        raise SystemExit(f"vhost-blk-bench failed ({proc.returncode}): {err.decode()[-2000:]}")
    found: dict[str, float] = json.loads(lines[-1])
    return found


def prefill(tool: Path, sock: str, size: int) -> None:
    result(
        run_bench(tool, sock, "--verify", "--bs", "1M", "--iodepth", "8", "--size-limit", str(size))
    )


def drive(tool: Path, socks: list[str], size: int, seconds: float) -> list[float]:
    """4k randread qd32 on every socket at once; the IOPS of each."""
    procs = [
        run_bench(
            tool,
            sock,
            "--rw",
            "randread",
            "--bs",
            "4k",
            "--iodepth",
            "32",
            "--size-limit",
            str(size),
            "--ramp",
            "1",
            seconds=seconds,
        )
        for sock in socks
    ]
    return [result(p)["iops"] for p in procs]


@contextlib.contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------- the parts


def part_scale(exports: int, nbd_conns: int) -> dict[str, object]:
    with scratch("pb-scale-") as top:
        home = top / "home"
        home.mkdir()
        socks = top / "s"
        socks.mkdir()
        daemon = Daemon(home)
        daemon.start()
        handles: list[socket.socket] = []
        try:
            with daemon.client() as client:
                client.create_pool("p", [BackingSpec(str(top / "disk.img"), 4 * GiB)])
                for i in range(exports):
                    client.create_volume("p", f"v{i}", GiB)
                client.create_volume("p", "n", GiB)
                latencies = []
                for i in range(exports):
                    started = time.perf_counter()
                    client.export_vhost_user_blk("p", f"v{i}", str(socks / f"{i}.sock"))
                    latencies.append(time.perf_counter() - started)
                nbd_name = client.export_nbd("p", "n").spec.name
            for _ in range(nbd_conns):
                handles.append(nbd_connect(str(home / "nbd.sock"), nbd_name))
            paths = [str(socks / f"{i}.sock") for i in range(exports)]
            assert all(answers(p) for p in paths), "an export does not answer"
            time.sleep(2)  # idle
            pids = daemon.pids()
            idle = {"processes": len(pids), "pss_mib": round(pss_mib(pids), 1)}
            for h in handles:
                h.close()
            handles.clear()
            stop = daemon.stop()
            started = time.monotonic()
            daemon.start(wait_api=False)
            waiting = list(paths)
            while waiting:
                waiting = [p for p in waiting if not answers(p)]
                if waiting:
                    time.sleep(0.01)
                assert daemon.proc is not None and daemon.proc.poll() is None
            restart = time.monotonic() - started
            after = daemon.pids()
        finally:
            for h in handles:
                h.close()
            daemon.stop()
    lat = sorted(latencies)
    return {
        "part": "scale",
        "src": str(DAEMON_SRC),
        "exports": exports,
        "nbd_connections": nbd_conns,
        "cores": os.cpu_count(),
        **idle,
        "processes_after_restart": len(after),
        "create_export_ms_median": round(statistics.median(lat) * 1000, 2),
        "create_export_ms_p90": round(lat[int(len(lat) * 0.9)] * 1000, 2),
        "create_export_ms_max": round(lat[-1] * 1000, 2),
        "stop_s": round(stop, 2),
        "restart_until_all_answer_s": round(restart, 2),
    }


def _storvisor_exports(
    mode: str, top: Path, size: int, stack: contextlib.ExitStack
) -> tuple[list[str], int]:
    """A daemon (``mode``: shared planes or ``per-export``) serving 8 exports: their sockets
    and the daemon's pid."""
    home = top / f"home-{mode}"
    home.mkdir()
    daemon = Daemon(home, *(["--data-planes", mode] if mode != "shared" else []))
    daemon.start()
    stack.callback(daemon.stop)
    socks = [str(top / f"{mode}-{i}.sock") for i in range(8)]
    with daemon.client() as client:
        client.create_pool("p", [BackingSpec(str(top / f"{mode}.img"), 8 * size + GiB)])
        for i, sock in enumerate(socks):
            client.create_volume("p", f"v{i}", GiB)
            client.export_vhost_user_blk("p", f"v{i}", sock)
    assert daemon.proc is not None
    return socks, daemon.proc.pid


def _qsd_exports(top: Path, stack: contextlib.ExitStack) -> tuple[list[str], int]:
    """qemu-storage-daemon serving 8 raw files, one iothread per core: their sockets and its
    pid."""
    cores = os.cpu_count() or 1
    argv = ["qemu-storage-daemon"]
    argv += [f"--object=iothread,id=iot{k}" for k in range(cores)]
    socks = []
    for i in range(8):
        image = top / f"qsd-{i}.img"
        with open(image, "wb") as f:
            f.truncate(GiB)
        sock = str(top / f"qsd-{i}.sock")
        socks.append(sock)
        argv += [
            "--blockdev",
            f"driver=file,node-name=f{i},filename={image},cache.direct=off",
            "--blockdev",
            f"driver=raw,node-name=d{i},file=f{i}",
            "--export",
            f"type=vhost-user-blk,id=e{i},node-name=d{i},addr.type=unix,addr.path={sock},"
            f"writable=on,num-queues=1,iothread=iot{i % cores}",
        ]
    qsd = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop() -> None:
        qsd.terminate()
        qsd.wait()

    stack.callback(stop)
    deadline = time.monotonic() + 30
    while not all(os.path.exists(s) for s in socks):
        if qsd.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"qemu-storage-daemon did not start: {qsd.communicate()[1]!r}")
        time.sleep(0.05)
    return socks, qsd.pid


def part_iops(tool: Path, size: int, secs: float, rounds: int) -> dict[str, object]:
    """The three back-ends up at once, prefilled, then driven in turn, ``rounds`` times."""
    runs: dict[str, list[float]] = {"shared": [], "per_export": [], "qsd": []}
    cpu: dict[str, list[float]] = {name: [] for name in runs}  # back-end CPU us per request
    with scratch("pb-iops-") as top, contextlib.ExitStack() as stack:
        backends = {
            "shared": _storvisor_exports("shared", top, size, stack),
            "per_export": _storvisor_exports("per-export", top, size, stack),
            "qsd": _qsd_exports(top, stack),
        }
        for socks, _ in backends.values():
            for sock in socks:
                prefill(tool, sock, size)
        names = list(backends)
        for turn in range(rounds):  # each round in another order: none always goes first
            for name in names[turn % 3 :] + names[: turn % 3]:
                socks, pid = backends[name]
                before = cpu_seconds(family(pid))
                iops = sum(drive(tool, socks, size, secs))
                used = cpu_seconds(family(pid)) - before
                runs[name].append(iops)
                cpu[name].append(used / (iops * (secs + 1)) * 1e6)  # the ramp at that rate too
    med = {name: statistics.median(found) for name, found in runs.items()}
    return {
        "part": "iops",
        "exports": 8,
        "workload": "4k randread qd32 each",
        "seconds": secs,
        "rounds": rounds,
        "range_mib": size // MiB,
        **{f"iops_{k}": round(v) for k, v in med.items()},
        **{f"runs_{k}": [round(v) for v in found] for k, found in runs.items()},
        **{f"cpu_us_per_io_{k}": round(statistics.median(v), 2) for k, v in cpu.items()},
        "shared_vs_qsd": round(med["shared"] / med["qsd"], 3),
        "shared_vs_per_export": round(med["shared"] / med["per_export"], 3),
        "per_export_vs_qsd": round(med["per_export"] / med["qsd"], 3),
    }


def part_stall(tool: Path, size: int, secs: float, rounds: int) -> dict[str, object]:
    """Export b's IOPS alone and beside export a (same process) with a's reads held,
    alternating, ``rounds`` times each."""
    from storvisor.testing.faultfs import Fault, FaultMount

    if not os.path.exists("/dev/fuse") or shutil.which("fusermount") is None:
        return {"part": "stall", "skipped": "FUSE is not available"}
    alone: list[float] = []
    beside: list[float] = []
    held = 0
    small = min(size, 64 * MiB)
    with scratch("pb-stall-") as top:
        (top / "backing").mkdir()
        (top / "mnt").mkdir()
        (top / "home").mkdir()
        mount = FaultMount(top / "backing", top / "mnt")
        daemon = Daemon(top / "home", "--data-planes", "1")
        stalled: subprocess.Popen[bytes] | None = None
        try:
            daemon.start()
            a, b = str(top / "a.sock"), str(top / "b.sock")
            with daemon.client() as client:
                client.create_pool("f", [BackingSpec(str(top / "mnt" / "f.img"), size + GiB)])
                client.create_pool("g", [BackingSpec(str(top / "g.img"), size + GiB)])
                client.create_volume("f", "a", GiB)
                client.create_volume("g", "b", GiB)
                client.export_vhost_user_blk("f", "a", a)
                client.export_vhost_user_blk("g", "b", b)
            prefill(tool, a, small)
            prefill(tool, b, size)
            for _ in range(rounds):
                alone.append(drive(tool, [b], size, secs)[0])
                before = mount.hits().get("read", 0)
                mount.set(Fault("read", "stall", 0, None, 3600.0))
                stalled = run_bench(
                    tool,
                    a,
                    "--rw",
                    "randread",
                    "--bs",
                    "4k",
                    "--iodepth",
                    "32",
                    "--size-limit",
                    str(small),
                    "--timeout",
                    "3600",
                    seconds=3600,
                )
                deadline = time.monotonic() + 30
                while mount.hits().get("read", 0) <= before:
                    assert time.monotonic() < deadline, "the stalled export's reads never came"
                    time.sleep(0.05)
                beside.append(drive(tool, [b], size, secs)[0])
                held += mount.hits().get("read", 0) - before
                mount.clear()
                stalled.kill()
                stalled.communicate()
                stalled = None
        finally:
            mount.clear()
            if stalled is not None:
                stalled.kill()
                stalled.communicate()
            daemon.stop()
            mount.close()
    return {
        "part": "stall",
        "rounds": rounds,
        "iops_alone": round(statistics.median(alone)),
        "iops_beside_a_stalled_export": round(statistics.median(beside)),
        "ratio": round(statistics.median(beside) / statistics.median(alone), 3),
        "runs_alone": [round(v) for v in alone],
        "runs_beside": [round(v) for v in beside],
        "stalled_reads_held": held,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small, short run")
    parser.add_argument("--exports", type=int, default=None)
    parser.add_argument("--nbd", type=int, default=None, help="idle NBD connections")
    parser.add_argument("--seconds", type=float, default=None, help="per IOPS run")
    parser.add_argument("--rounds", type=int, default=None, help="IOPS and stall rounds")
    parser.add_argument("--tool-src", default=None, help="vhost-blk-bench source directory")
    parser.add_argument("--parts", default="scale,iops,stall")
    parser.add_argument("--json", default=None, help="append one JSON line per part here")
    parser.add_argument("--src", default=None, help="run the daemons from this source tree")
    args = parser.parse_args()
    if args.src:
        global DAEMON_SRC
        DAEMON_SRC = Path(args.src).resolve()
    exports = args.exports or (40 if args.quick else 200)
    nbd_conns = args.nbd if args.nbd is not None else (10 if args.quick else 50)
    secs = args.seconds or (2.0 if args.quick else 10.0)
    size = 64 * MiB if args.quick else 256 * MiB
    rounds = args.rounds or (1 if args.quick else 3)
    parts = args.parts.split(",")
    with scratch("pb-tool-") as out:
        tool = build_tool(find_tool_source(args.tool_src), out)
        results = []
        if "scale" in parts:
            results.append(part_scale(exports, nbd_conns))
            print(json.dumps(results[-1]), flush=True)
        if "iops" in parts:
            results.append(part_iops(tool, size, secs, rounds))
            print(json.dumps(results[-1]), flush=True)
        if "stall" in parts:
            results.append(part_stall(tool, size, secs, rounds))
            print(json.dumps(results[-1]), flush=True)
    if args.json:
        with open(args.json, "a") as f:
            for found in results:
                f.write(json.dumps(found) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
