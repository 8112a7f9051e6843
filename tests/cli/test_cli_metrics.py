"""``GET /metrics`` and ``storvisor top`` against a running daemon serving real NBD traffic:
``promtool check metrics`` accepts the output, and the counters of the NBD data-plane
processes, aggregated by the daemon, say exactly what the clients did."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_harness import CLI, Daemon

from prereq import require, require_module
from storvisor.api.client import Client
from storvisor.testing import procs

nbd = require_module("nbd", "python3-libnbd is not installed")
parser = require_module("prometheus_client.parser", "prometheus_client is not installed")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(home: Path) -> str:
    return Client(home / "api.sock", timeout=30).metrics()


def samples(text: str) -> Samples:
    out: Samples = {}
    for family in parser.text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


def promtool_accepts(text: str) -> None:
    promtool = shutil.which("promtool")
    require(promtool, "promtool is not installed (Debian package prometheus)")
    assert promtool is not None
    proc = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _until(check, what: str, timeout: float = 15.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


EXPORT = {"export": "p/v", "kind": "nbd", "pool": "p", "volume": "v"}


def settled(home: Path, labels: dict[str, str], **requests: int) -> str:
    """A scrape once the data planes have published (every ``PUBLISH_INTERVAL``) the
    requests counted so far: ``requests`` maps an op to its expected count."""

    def done() -> str | None:
        text = scrape(home)
        found = samples(text)
        for op, count in requests.items():
            if value(found, "storvisor_export_requests_total", **labels, op=op) != count:
                return None
        return text

    return _until(done, f"the counts {requests} (they must be reached, not passed)")  # type: ignore[no-any-return]


def test_metrics_count_every_data_plane_request_exactly(
    cli: CLI, daemon: Daemon, home: Path, tmp_path: Path
) -> None:
    cli("pool", "create", "p", "--backing", f"{tmp_path}/disk.img:1G", "--cluster-size", "64K")
    cli("volume", "create", "p/v", "--size", "64M")
    uri = cli("export", "nbd", "p/v").out.strip()
    empty = scrape(home)
    promtool_accepts(empty)
    assert value(samples(empty), "storvisor_export_requests_total", **EXPORT, op="write") == 0

    # two connections per worker: requests served by several data-plane processes
    handles = []
    for _ in range(2 * len(procs.data_planes(daemon.proc.pid))):  # type: ignore[union-attr]
        h = nbd.NBD()
        h.connect_uri(uri)
        handles.append(h)
    writes = reads = 0
    for i in range(50):
        h = handles[i % len(handles)]
        h.pwrite(bytes([i]) * 12288, i * 65536)  # allocating: done by the daemon
        h.pwrite(bytes([i]) * 4096, i * 65536 + 4096)  # in place: done by the data plane
        writes += 2
        assert h.pread(8192, i * 65536) == bytes([i]) * 8192
        reads += 1
    handles[1].trim(65536, 0)
    handles[1].zero(131072, 65536 * 3)
    handles[0].flush()  # commits the frees too: the pool's space stays put from now on

    text = settled(home, EXPORT, write=writes, read=reads, flush=1, trim=1, zero=1)
    promtool_accepts(text)
    found = samples(text)

    def op(name: str, kind: str) -> float:
        return value(found, name, **EXPORT, op=kind)

    assert op("storvisor_export_requests_total", "write") == writes
    assert op("storvisor_export_bytes_total", "write") == 50 * (12288 + 4096)
    assert op("storvisor_export_requests_total", "read") == reads
    assert op("storvisor_export_bytes_total", "read") == 50 * 8192
    assert op("storvisor_export_requests_total", "flush") == 1
    assert op("storvisor_export_requests_total", "trim") == 1
    assert op("storvisor_export_bytes_total", "trim") == 65536
    assert op("storvisor_export_requests_total", "zero") == 1
    assert op("storvisor_export_bytes_total", "zero") == 131072  # zero(count, offset)
    for kind in ("read", "write", "flush", "trim", "zero"):
        assert op("storvisor_export_errors_total", kind) == 0
        count = op("storvisor_export_requests_total", kind)
        assert op("storvisor_export_request_duration_seconds_count", kind) == count
        inf = value(
            found, "storvisor_export_request_duration_seconds_bucket", **EXPORT, op=kind, le="+Inf"
        )
        assert inf == count
        assert op("storvisor_export_request_duration_seconds_sum", kind) > 0
    assert value(found, "storvisor_export_requests_in_flight", **EXPORT) == 0
    assert value(found, "storvisor_export_connections", **EXPORT) == len(handles)

    pool = cli("pool", "show", "p", "--json").json()
    stats = pool["stats"]  # type: ignore[index]
    assert value(found, "storvisor_pool_capacity_bytes", pool="p") == stats["capacity"]
    assert value(found, "storvisor_pool_allocated_bytes", pool="p") == stats["allocated"]
    assert value(found, "storvisor_pool_provisioned_bytes", pool="p") == 64 << 20
    assert value(found, "storvisor_pool_clusters", pool="p", state="allocated") == (
        stats["allocated"] // 65536
    )
    assert value(found, "storvisor_pool_clusters", pool="p", state="total") == (
        stats["capacity"] // 65536
    )
    assert value(found, "storvisor_pool_online", pool="p") == 1
    assert value(found, "storvisor_pool_commit_duration_seconds_count", pool="p") >= 1
    assert value(found, "storvisor_dataplane_restarts_total", kind="nbd", export="") == 0

    # closed connections keep their counts: the totals only grow
    for h in handles:
        h.shutdown()
    _until(
        lambda: value(samples(scrape(home)), "storvisor_export_connections", **EXPORT) == 0,
        "the connections to close",
    )
    after = samples(scrape(home))  # published by each connection as it closed
    assert value(after, "storvisor_export_requests_total", **EXPORT, op="write") == writes
    assert value(after, "storvisor_export_bytes_total", **EXPORT, op="read") == 50 * 8192


def test_qos_waits_and_data_plane_restarts_are_counted(
    cli: CLI, daemon: Daemon, home: Path, tmp_path: Path
) -> None:
    cli("pool", "create", "p", "--backing", f"{tmp_path}/disk.img:1G")
    cli("volume", "create", "p/v", "--size", "64M")
    cli("volume", "set-qos", "p/v", "write_iops_sec=20")
    uri = cli("export", "nbd", "p/v").out.strip()
    h = nbd.NBD()
    h.connect_uri(uri)
    started = time.monotonic()
    for i in range(10):
        h.pwrite(b"q" * 4096, i * 4096)
    took = time.monotonic() - started
    found = samples(settled(home, EXPORT, write=10))
    waited = value(found, "storvisor_volume_qos_wait_seconds_total", pool="p", volume="v")
    # 10 writes at 20 per second from idle: a slot every 50 ms, so about 0.44 s of waiting
    # (each request served in much less than its slot), all of it spent by the data-plane
    # process serving the connection
    assert 0.2 < waited <= took
    latency = value(found, "storvisor_export_request_duration_seconds_sum", **EXPORT, op="write")
    assert latency >= waited  # the latency includes the wait
    h.shutdown()

    workers = procs.data_planes(daemon.proc.pid)  # type: ignore[union-attr]
    os.kill(workers[0], signal.SIGKILL)
    _until(
        lambda: (
            value(
                samples(scrape(home)), "storvisor_dataplane_restarts_total", kind="nbd", export=""
            )
            == 1
        ),
        "the restart to be counted",
    )
    promtool_accepts(scrape(home))


class _Load:
    """Writes of ``size`` bytes in a loop on one NBD connection, until stopped."""

    def __init__(self, uri: str, size: int) -> None:
        self.handle = nbd.NBD()
        self.handle.connect_uri(uri)
        self.size = size
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        data = b"t" * self.size
        i = 0
        try:
            while not self.stop.is_set():
                self.handle.pwrite(data, (i % 256) * self.size)
                i += 1
        except BaseException as e:  # reported by close
            self.error = e

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), "the load did not stop"
        self.handle.shutdown()
        assert self.error is None, self.error


@pytest.fixture
def loaded(cli: CLI, daemon: Daemon, tmp_path: Path) -> Iterator[_Load]:
    cli("pool", "create", "p", "--backing", f"{tmp_path}/disk.img:1G")
    cli("volume", "create", "p/v", "--size", "64M")
    cli("volume", "create", "p/idle", "--size", "16M")
    uri = cli("export", "nbd", "p/v").out.strip()
    cli("export", "nbd", "p/idle")
    load = _Load(uri, 16384)
    try:
        yield load
    finally:
        load.close()


def test_top_json_gives_one_sample_of_every_exported_volume(cli: CLI, loaded: _Load) -> None:
    out = cli("top", "--json", "--interval", "0.5").json()
    assert out["interval"] == 0.5  # type: ignore[index]
    volumes = {(v["pool"], v["volume"]): v for v in out["volumes"]}  # type: ignore[index]
    assert set(volumes) == {("p", "v"), ("p", "idle")}
    busy, idle = volumes[("p", "v")], volumes[("p", "idle")]
    assert out["volumes"][0] is not None and out["volumes"][0]["volume"] == "v"  # type: ignore[index]
    assert busy["write_iops"] > 10
    assert busy["read_iops"] == 0 and busy["read_mbps"] == 0
    # every write moved 16 KiB: bytes per second / operations per second is that, give or
    # take one write whose bytes were published before its count (iostats' ordering)
    writes = busy["write_iops"] * 0.5
    assert busy["write_mbps"] * 1e6 / busy["write_iops"] == pytest.approx(16384, rel=1.01 / writes)
    assert 0 < busy["write_latency_ms"] < 1000
    assert all(idle[k] == 0 for k in ("read_iops", "write_iops", "other_iops", "write_mbps"))


def test_top_prints_a_table_per_interval(cli: CLI, loaded: _Load) -> None:
    out = cli("top", "--interval", "0.3", "--count", "2").out
    tables = [t for t in out.split("storvisor top - ") if t]
    assert len(tables) == 2, out
    for table in tables:
        lines = table.splitlines()
        assert lines[1].split()[:3] == ["VOLUME", "R", "IOPS"]
        rows = {line.split()[0]: line.split() for line in lines[2:] if line.strip()}
        assert set(rows) == {"p/v", "p/idle"}, table
        assert float(rows["p/v"][2]) > 0  # W IOPS
        assert rows["p/idle"][1:] == ["0", "0", "0", "0.0", "0.0", "0.000", "0.000"]


def test_top_and_metrics_need_what_they_need(cli: CLI, home: Path, tmp_path: Path) -> None:
    cli("pool", "create", "p", "--backing", f"{tmp_path}/disk.img:1G")
    assert cli.fails("top", "--json") == (
        "storvisor: error: storvisor top shows a running daemon's I/O: start `storvisor serve`"
    )
    for bad in ("0", "-1", "x"):
        result = cli("top", "--interval", bad, rc=2)
        assert "invalid interval" in result.err and "Traceback" not in result.err


def test_without_prometheus_client_the_daemon_serves_and_metrics_answer_501(
    cli: CLI, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An installation without the ``metrics`` extra: a ``prometheus_client`` that cannot be
    imported comes first on the daemon's path."""
    blocked = tmp_path / "blocked" / "prometheus_client"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('not installed')\n")
    path = [str(blocked.parent), *filter(None, os.environ.get("PYTHONPATH", "").split(":"))]
    monkeypatch.setenv("PYTHONPATH", ":".join(path))
    daemon = Daemon(home).start()
    try:
        cli("pool", "create", "p", "--backing", f"{tmp_path}/disk.img:1G")
        cli("volume", "create", "p/v", "--size", "16M")
        uri = cli("export", "nbd", "p/v").out.strip()
        h = nbd.NBD()
        h.connect_uri(uri)
        h.pwrite(b"x" * 4096, 0)
        h.shutdown()
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(home / "api.sock"))
            s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            raw = b""
            while chunk := s.recv(65536):
                raw += chunk
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 501"), head
        assert json.loads(body) == {
            "error": {
                "type": "LocalFailure",
                "message": "metrics need the prometheus_client library: "
                "pip install 'storvisor[metrics]'",
            }
        }
        assert cli.fails("top", "--json") == (
            "storvisor: error: metrics need the prometheus_client library: "
            "pip install 'storvisor[metrics]'"
        )
    finally:
        rc, err = daemon.stop()
        assert rc == 0, err


def test_vhost_user_blk_requests_of_every_queue_process_are_counted(
    cli: CLI, daemon: Daemon, home: Path, tmp_path: Path
) -> None:
    from storvisor.protocols.virtio.blk import Status
    from storvisor.testing.vhost_frontend import VhostUserFrontend

    cli("pool", "create", "p", "--backing", f"{tmp_path}/disk.img:1G")
    cli("volume", "create", "p/v", "--size", "64M")
    sock = str(tmp_path / "v.sock")
    cli("export", "vhost-user-blk", "p/v", "--socket", sock, "--queues", "2")
    labels = {"export": "vhost-user-blk:p/v", "kind": "vhost-user-blk", "pool": "p", "volume": "v"}

    def count(found: Samples, name: str, op: str) -> float:
        return value(found, name, **labels, op=op)

    with VhostUserFrontend(sock, queue_size=16, num_queues=2, inflight=True) as fe:
        fe.setup()
        for i in range(10):  # queue i % 2: with two CPUs, two processes
            assert fe.blk.write(i * 65536, bytes([i + 1]) * 8192, queue=i % 2) == Status.OK
        for i in range(6):
            status, data = fe.blk.read(i * 65536, 4096, queue=i % 2, segments=3)
            assert status == Status.OK and data == bytes([i + 1]) * 4096
        assert fe.blk.flush(queue=1) == Status.OK
        assert fe.blk.discard([(0, 128, 0)]) == Status.OK
        assert fe.blk.write_zeroes([(256, 64, 1)], queue=1) == Status.OK
        text = settled(home, labels, write=10, read=6, flush=1, trim=1, zero=1)
        promtool_accepts(text)
        found = samples(text)
        assert count(found, "storvisor_export_requests_total", "write") == 10
        assert count(found, "storvisor_export_bytes_total", "write") == 10 * 8192
        assert count(found, "storvisor_export_requests_total", "read") == 6
        assert count(found, "storvisor_export_bytes_total", "read") == 6 * 4096
        assert count(found, "storvisor_export_requests_total", "flush") == 1
        assert count(found, "storvisor_export_bytes_total", "trim") == 128 * 512
        assert count(found, "storvisor_export_bytes_total", "zero") == 64 * 512
        assert value(found, "storvisor_export_requests_in_flight", **labels) == 0
        restarts = {"kind": "vhost-user-blk", "export": "vhost-user-blk:p/v"}
        assert value(found, "storvisor_dataplane_restarts_total", **restarts) == 0

        # a killed data plane is restarted and counted; what its processes counted stays
        planes = procs.data_planes(daemon.proc.pid)  # type: ignore[union-attr]
        os.kill(planes[-1], signal.SIGKILL)
        _until(
            lambda: (
                value(samples(scrape(home)), "storvisor_dataplane_restarts_total", **restarts) == 1
            ),
            "the restart to be counted",
        )
        fe.reconnect()
        assert fe.blk.write(0, b"z" * 4096) == Status.OK
        after = samples(settled(home, labels, write=11))
        assert count(after, "storvisor_export_requests_total", "write") == 11
        assert count(after, "storvisor_export_bytes_total", "write") == 10 * 8192 + 4096
        assert count(after, "storvisor_export_requests_total", "read") == 6


def test_an_offline_pool_is_reported_offline(cli: CLI, home: Path, tmp_path: Path) -> None:
    cli("pool", "create", "a", "--backing", f"{tmp_path}/a.img:1G")
    cli("pool", "create", "b", "--backing", f"{tmp_path}/b.img:1G")
    (tmp_path / "b.img").rename(tmp_path / "b.moved")
    daemon = Daemon(home).start()
    try:
        text = scrape(home)
        promtool_accepts(text)
        found = samples(text)
        assert value(found, "storvisor_pool_online", pool="a") == 1
        assert value(found, "storvisor_pool_online", pool="b") == 0
        assert value(found, "storvisor_pool_capacity_bytes", pool="b") == 0
        assert (
            "storvisor_pool_commit_duration_seconds_count",
            frozenset({("pool", "b")}),
        ) not in found
    finally:
        daemon.kill()
