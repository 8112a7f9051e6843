"""QoS benchmark: accuracy of the limits, bursts, neighbour isolation, cost when unlimited.

A child process serves two thin volumes (``a`` and ``b``, written once) the way the daemon
does: every NBD connection handed to a data-plane process (``exports/nbd_worker.py``), each
volume wrapped in a ``ThrottledDevice`` whose ``QosBlock`` the data planes share, and every
connection counted for the metrics (a ``StatsSet`` per export). A third export, ``plain``,
serves volume ``a`` without any QoS code (counted too: what the exports served before QoS).
The parent drives them with fio's ``nbd`` engine (libnbd) and changes the limits online
through the child's stdin, as ``volume set-qos`` does through the daemon.

* accuracy: ``total_iops_sec`` of 200, 2,000 and 20,000 (4k random reads, queue depth 32),
  and ``total_bytes_sec`` of 10 and 200 MB/s (64k random reads, queue depth 16); the table
  gives the measured rate and its error against the limit;
* burst: ``total_iops_sec=500``, ``_max=2000``, ``_max_length=2``; fio logs IOPS every
  500 ms: 2,000 for the first 2 s, then 500;
* neighbours: ``b`` (unlimited) alone, while ``a`` runs limited to 200 IOPS, and while a
  client held to 200 IOPS by fio itself reads ``plain`` (what the neighbour's client costs);
* unlimited cost: 4k random read and write at queue depth 32 on ``a`` with no limit (the
  ``QosBlock`` is inactive: one shared-memory read per request) against ``plain``; rounds
  alternate the two (in both orders, so each visits every data-plane process equally) and
  the figure is the median, with the server's CPU time per request.

Usage::

    .venv/bin/python bench/qos_bench.py [--seconds 4] [--repeat 5] [--only accuracy,burst,...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from proc_stats import family_cpu

SIZE = 256 << 20


def serve(work: str, sock: str) -> None:
    """Child process: serve ``a``, ``b`` and ``plain``; read limit changes on stdin
    (``VOLUME [KEY=VALUE ...]``, answered ``ok`` or ``error: ...``)."""
    from storvisor.engine.home import Home
    from storvisor.engine.iostats import StatsSet
    from storvisor.engine.qos import QosBlock, QosSpec, ThrottledDevice
    from storvisor.engine.types import BackingSpec
    from storvisor.errors import StorvisorError
    from storvisor.exports.nbd import NBDExport, NBDServer
    from storvisor.exports.nbd_worker import DataPlanes

    home = Home(work)
    home.create_pool("p", [BackingSpec(os.path.join(work, "backing"), size=3 * SIZE)])
    pool = home.pool("p")
    chunk = os.urandom(4 << 20)
    blocks = {}
    for name in ("a", "b"):
        pool.create_volume(name, SIZE)
        volume = pool.open_volume(name)
        for offset in range(0, SIZE, len(chunk)):
            volume.write(offset, chunk)
        volume.flush()
        volume.close()
        blocks[name] = QosBlock(name=name)

    def opener(name: str, throttled: bool):  # type: ignore[no-untyped-def]
        def open_device():  # type: ignore[no-untyped-def]
            device = pool.open_volume(name)
            return ThrottledDevice(device, blocks[name]) if throttled else device

        return open_device

    planes = DataPlanes()
    planes.start()
    server = NBDServer(handoff=planes.hand_over)
    for export, name, throttled in (("a", "a", True), ("b", "b", True), ("plain", "a", False)):
        server.add_export(NBDExport(export, opener(name, throttled)))
        # counted, as the daemon's exports are (its metrics)
        planes.add_export(export, opener(name, throttled), export, False, StatsSet(export))
    server.listen_unix(sock)
    server.start()
    print("ready", flush=True)
    for line in sys.stdin:
        name, *items = line.split()
        try:
            keys = dict(item.split("=", 1) for item in items)
            blocks[name].set_limits(QosSpec.parse(keys).limits(SIZE))
            print("ok", flush=True)
        except (StorvisorError, KeyError, ValueError) as e:
            print(f"error: {e}", flush=True)
    server.close()
    planes.close()
    home.close()


class Child:
    def __init__(self, work: Path) -> None:
        self.sock = str(work / "nbd.sock")
        (work / "home").mkdir()
        argv = [sys.executable, __file__, "--serve", str(work / "home"), "--socket", self.sock]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.sock}"

    def limit(self, volume: str, *keys: str) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(" ".join([volume, *keys]) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        assert answer == "ok", answer

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


def fio(
    uri: str,
    bs: int,
    depth: int,
    seconds: float,
    *,
    write: bool = False,
    log: str | None = None,
    rate_iops: int = 0,
) -> dict[str, Any]:
    """fio's nbd engine, random I/O of ``bs`` at ``depth`` for ``seconds``; the read or
    write statistics of its JSON report."""
    rw = "randwrite" if write else "randread"
    argv = ["fio", "--name=q", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}"]
    argv += [f"--iodepth={depth}", f"--size={SIZE}", f"--runtime={seconds:g}", "--time_based"]
    argv += ["--output-format=json"]
    if rate_iops:
        argv += [f"--rate_iops={rate_iops}"]
    if log is not None:
        argv += [f"--write_iops_log={log}", "--log_avg_msec=500"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    job: dict[str, Any] = json.loads(out[out.index("{") :])["jobs"][0]
    stats: dict[str, Any] = job["write" if write else "read"]
    return stats


def accuracy(child: Child, seconds: float) -> None:
    print(f"accuracy ({seconds:g} s each, fio nbd, random reads)")
    print(f"{'limit':>24} {'measured':>14} {'error':>8}")
    for iops in (200, 2000, 20000):
        child.limit("a", f"total_iops_sec={iops}")
        got = float(fio(child.uri("a"), 4096, 32, seconds)["iops"])
        print(f"{f'total_iops_sec={iops}':>24} {got:>10.0f} IOPS {100 * (got / iops - 1):>+7.1f}%")
    for mbps in (10, 200):
        child.limit("a", f"total_bytes_sec={mbps * 10**6}")
        got = float(fio(child.uri("a"), 65536, 16, seconds)["bw_bytes"]) / 1e6
        print(
            f"{f'total_bytes_sec={mbps}e6':>24} {got:>10.1f} MB/s {100 * (got / mbps - 1):>+7.1f}%"
        )
    child.limit("a")


def burst(child: Child, work: Path) -> None:
    print("burst: total_iops_sec=500 total_iops_sec_max=2000 total_iops_sec_max_length=2")
    child.limit("a", "total_iops_sec=500", "total_iops_sec_max=2000", "total_iops_sec_max_length=2")
    log = str(work / "burst")
    fio(child.uri("a"), 4096, 32, 5, log=log)
    rows = []
    with open(f"{log}_iops.1.log") as f:
        for line in f:
            msec, value = (int(x) for x in line.split(",")[:2])
            rows.append((msec, value))
    print("  " + "  ".join(f"{msec / 1000:.1f}s:{value}" for msec, value in rows))
    child.limit("a")


def neighbours(child: Child, seconds: float, repeat: int) -> None:
    """``b`` at 4k qd32 alone, next to ``a`` limited to 200 IOPS by QoS, and next to
    ``plain`` (volume ``a``, no QoS) held to 200 IOPS by fio itself (``--rate_iops``): the
    last is what the neighbour's client alone costs ``b`` on this machine."""

    def beside(export: str, rate_iops: int) -> tuple[float, float]:
        argv = [sys.executable, __file__, "--fio-json", child.uri(export), str(seconds)]
        other = subprocess.Popen([*argv, str(rate_iops)], stdout=subprocess.PIPE, text=True)
        got = float(fio(child.uri("b"), 4096, 32, seconds)["iops"])
        return got, float(json.loads(other.communicate()[0])["iops"])

    rounds: dict[str, list[float]] = {"alone": [], "qos": [], "client": []}
    child.limit("a", "total_iops_sec=200")
    for _ in range(repeat):
        rounds["alone"].append(float(fio(child.uri("b"), 4096, 32, seconds)["iops"]))
        b_iops, a_iops = beside("a", 0)
        rounds["qos"].append(b_iops)
        b_iops, plain_iops = beside("plain", 200)
        rounds["client"].append(b_iops)
    child.limit("a")
    alone, qos, client = (statistics.median(rounds[k]) for k in ("alone", "qos", "client"))
    print(f"neighbours: b (unlimited, 4k randread qd32), median of {repeat} rounds")
    print(f"  alone:                                 {alone:.0f} IOPS")
    print(
        f"  next to a limited to 200 IOPS by QoS:  {qos:.0f} IOPS ({100 * (qos / alone - 1):+.1f}%)"
        f" (a got {a_iops:.0f})"
    )
    print(
        f"  next to a client held to 200 by fio:   {client:.0f} IOPS "
        f"({100 * (client / alone - 1):+.1f}%) (it got {plain_iops:.0f})"
    )


def unlimited_cost(child: Child, seconds: float, repeat: int) -> None:
    """IOPS and the server's CPU time per request (its process and data planes, from
    ``/proc``: what a busy machine disturbs less)."""
    print(f"unlimited cost: 4k qd32, fio nbd, median of {repeat} alternating rounds")
    for write in (False, True):
        iops: dict[str, list[float]] = {"plain": [], "a": []}
        cpu: dict[str, list[float]] = {"plain": [], "a": []}
        for i in range(repeat):
            # connections go to the data-plane processes in turn: alternate the order so
            # that each export visits each process as often
            for export in ("plain", "a") if i % 2 == 0 else ("a", "plain"):
                before = family_cpu(child.proc.pid)
                job = fio(child.uri(export), 4096, 32, seconds, write=write)
                used = family_cpu(child.proc.pid) - before
                iops[export].append(float(job["iops"]))
                cpu[export].append(used * 1e6 / max(int(job["total_ios"]), 1))
        p_iops, q_iops = statistics.median(iops["plain"]), statistics.median(iops["a"])
        p_cpu, q_cpu = statistics.median(cpu["plain"]), statistics.median(cpu["a"])
        print(
            f"  {'randwrite' if write else 'randread':>9}: no QoS code {p_iops:.0f} IOPS "
            f"{p_cpu:.1f} us/req; QoS unlimited {q_iops:.0f} IOPS {q_cpu:.1f} us/req "
            f"({100 * (q_iops / p_iops - 1):+.1f}% IOPS, {100 * (q_cpu / p_cpu - 1):+.1f}% CPU)"
        )
        print(f"             rounds (IOPS): plain {[round(x) for x in iops['plain']]}")
        print(f"                            qos   {[round(x) for x in iops['a']]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--serve")
    parser.add_argument("--socket")
    parser.add_argument("--fio-json", nargs=3)
    parser.add_argument("--only", default="accuracy,burst,neighbours,cost")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.socket)
        return
    if args.fio_json:
        uri, seconds, rate_iops = args.fio_json
        print(json.dumps(fio(uri, 4096, 32, float(seconds), rate_iops=int(rate_iops))))
        return
    work = Path(tempfile.mkdtemp(prefix="qosbench", dir="/tmp"))
    child = Child(work)
    try:
        started = time.monotonic()
        only = args.only.split(",")
        if "accuracy" in only:
            accuracy(child, args.seconds)
        if "burst" in only:
            burst(child, work)
        if "neighbours" in only:
            neighbours(child, args.seconds, args.repeat)
        if "cost" in only:
            unlimited_cost(child, args.seconds, args.repeat)
        print(f"({time.monotonic() - started:.0f} s)")
    finally:
        child.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
