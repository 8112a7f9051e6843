"""In a host-root guest: storvisor volumes as LIO TCMU backstores, through the CLI and a
running daemon. ``export scsi`` gives a ``/dev/sdX`` that sg3-utils, fio, blkdiscard and
sd see as storvisor emulates it; ``export vhost-scsi`` gives a vhost target the fake guest
drives, whose writes NBD then reads back."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))
from cli_harness import CLI, Daemon
from lio_kit import pool_of_volumes, serving

from storvisor.api.client import Client
from storvisor.testing import procs
from storvisor.testing.direct_io import read_direct, write_direct
from storvisor.testing.vhost_scsi_frontend import VhostScsiFrontend

MiB = 1 << 20
WWPN = "naa.5001405beef00001"


VOLUMES = 9
"""Volumes made up front: one for each test, which exports and removes its own."""


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tcmu") / "home"


@pytest.fixture(scope="module")
def cli(home: Path) -> CLI:
    return pool_of_volumes(home, VOLUMES)


@pytest.fixture(scope="module")
def daemon(cli: CLI, home: Path) -> Iterator[Daemon]:
    """The kill -9 test, the last, restarts it."""
    with serving(home) as d:
        yield d


_handed_out = iter(range(VOLUMES))


@pytest.fixture
def ref() -> str:
    """A volume of the pool that no other test used."""
    return f"p/v{next(_handed_out)}"


def run(*args: str, check: bool = True) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    if check:
        assert proc.returncode == 0, f"{' '.join(args)}: {proc.stdout}{proc.stderr}"
    return proc.stdout


def export_scsi(cli: CLI, ref: str) -> tuple[str, str]:
    lines = cli("export", "scsi", ref).out.split()
    assert len(lines) == 2, lines
    device, by_id = lines
    assert re.fullmatch(r"/dev/sd[a-z]+", device), device
    return device, by_id


def ring_holders() -> list[int]:
    """The pids that hold a uio device (a TCMU ring) open."""
    return [info.pid for info in procs.processes() if procs.open_files(info.pid, "/dev/uio")]


def describe(pid: int) -> str:
    """A process's pid, parent, command line and uio fds, for an assertion's message."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        parent = next(line for line in status.splitlines() if line.startswith("PPid:"))
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError as e:
        return f"{pid}: {e}"
    return f"{pid} ({parent}) {command} {procs.open_files(pid, '/dev/uio')}"


def data_planes(daemon: Daemon) -> list[int]:
    assert daemon.proc is not None
    return procs.data_planes(daemon.proc.pid)


def the_ring_holder(daemon: Daemon) -> int:
    """The one process serving the rings: a data-plane process, not the daemon."""
    deadline = time.monotonic() + 30
    while len(holders := ring_holders()) != 1:
        assert time.monotonic() < deadline, [describe(pid) for pid in holders]
        time.sleep(0.1)
    assert holders[0] in data_planes(daemon), (holders, data_planes(daemon))
    return holders[0]


def export_counts(cli: CLI, ref: str) -> dict[str, float]:
    """The bytes the daemon's metrics count for the SCSI export of ``ref``, by operation."""
    from prometheus_client.parser import text_string_to_metric_families

    pool, volume = ref.split("/")
    labels = {"export": f"scsi/{ref}", "kind": "scsi", "pool": pool, "volume": volume}
    found = {}
    text = Client(cli.home / "api.sock", timeout=60).metrics()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            rest = {k: v for k, v in sample.labels.items() if k != "op"}
            if sample.name == "storvisor_export_bytes_total" and rest == labels:
                found[sample.labels["op"]] = sample.value
    return found


def allocated(cli: CLI, ref: str) -> int:
    info = cli("volume", "show", ref, "--json").json()
    assert isinstance(info, dict)
    return int(info["allocated"])


def test_scsi_disk_shows_the_emulation_to_sg3_utils(cli: CLI, daemon: Daemon, ref: str) -> None:
    device, by_id = export_scsi(cli, ref)
    the_ring_holder(daemon)
    disk = os.path.basename(device)
    wwid = Path(f"/sys/block/{disk}/device/wwid").read_text().strip()
    assert wwid.startswith("naa.6") and by_id == f"/dev/disk/by-id/wwn-0x{wwid[4:]}"
    inq = run("sg_inq", device)
    assert "STORVISR" in inq and "storvisor volume" in inq, inq
    assert re.search(r"Unit serial number: \S+", run("sg_inq", "-p", "0x80", device))
    limits = run("sg_vpd", "-p", "bl", device)
    assert "Maximum unmap LBA count" in limits, limits
    assert re.search(r"Maximum unmap LBA count: [1-9]", limits), limits
    cap = run("sg_readcap", "-l", device)
    assert "lbpme=1" in cap and "lbprz=1" in cap, cap
    assert re.search(r"Last LBA=131071 \(0x1ffff\), Number of logical blocks=131072", cap), cap
    assert "Logical block length=512 bytes" in cap
    listed = cli("export", "list", "--json").json()
    assert isinstance(listed, list)
    assert listed[0]["state"] == "active" and listed[0]["uris"] == [device, by_id]
    assert Path(f"/sys/block/{disk}/queue/discard_max_bytes").read_text().strip() != "0"
    cli("export", "remove", f"scsi/{ref}")
    assert not Path(f"/sys/block/{disk}").exists()
    assert not list(Path("/sys/kernel/config/target/loopback").glob("naa.*"))
    assert not list(Path("/sys/kernel/config/target/core").glob("user_*/storvisor-*"))


def test_fio_verify_on_the_scsi_disk(cli: CLI, daemon: Daemon, ref: str) -> None:
    device, _ = export_scsi(cli, ref)
    out = run(
        "fio", "--name=verify", f"--filename={device}", "--rw=randwrite", "--bs=4k",
        "--size=16M", "--ioengine=libaio", "--direct=1", "--iodepth=16",
        "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--output-format=json",
    )  # fmt: skip
    job = json.loads(out[out.index("{") :])["jobs"][0]
    assert job["error"] == 0 and job["write"]["io_bytes"] == 16 * MiB
    assert job["read"]["io_bytes"] == 16 * MiB  # the verify pass read everything back
    counted = export_counts(cli, ref)  # by the data-plane process, in the daemon's metrics
    assert counted["write"] == 16 * MiB and counted["read"] >= 16 * MiB, counted
    cli("export", "remove", f"scsi/{ref}")


def test_blkdiscard_reads_zeros_and_frees_clusters(cli: CLI, daemon: Daemon, ref: str) -> None:
    device, _ = export_scsi(cli, ref)
    write_direct(device, 0, os.urandom(8 * MiB))
    full = allocated(cli, ref)
    assert full >= 8 * MiB
    run("blkdiscard", "-o", "0", "-l", str(8 * MiB), device)
    assert read_direct(device, 0, 8 * MiB) == bytes(8 * MiB)
    assert allocated(cli, ref) <= full - 7 * MiB
    cli("export", "remove", f"scsi/{ref}")


def test_persistent_reservations_work(cli: CLI, daemon: Daemon, ref: str) -> None:
    device, _ = export_scsi(cli, ref)
    run("sg_persist", "--out", "--register", "--param-sark=0x1234abcd", device)
    run("sg_persist", "--out", "--reserve", "--param-rk=0x1234abcd", "--prout-type=1", device)
    keys = run("sg_persist", "--in", "--read-keys", device)
    assert "0x1234abcd" in keys, keys
    reservation = run("sg_persist", "--in", "--read-reservation", device)
    assert "Key=0x1234abcd" in reservation and "Write Exclusive" in reservation, reservation
    write_direct(device, 0, b"r" * 4096)  # the holder may still write
    run("sg_persist", "--out", "--release", "--param-rk=0x1234abcd", "--prout-type=1", device)
    run("sg_persist", "--out", "--register", "--param-rk=0x1234abcd", "--param-sark=0", device)
    assert "no registered reservation keys" in run("sg_persist", "--in", "-k", device).lower()
    cli("export", "remove", f"scsi/{ref}")


def test_online_extend_reaches_sd(cli: CLI, daemon: Daemon, ref: str) -> None:
    device, _ = export_scsi(cli, ref)
    disk = os.path.basename(device)
    assert int(Path(f"/sys/block/{disk}/size").read_text()) == 64 * MiB // 512
    (dev_size,) = Path("/sys/kernel/config/target/core").glob("user_*/storvisor-*/attrib/dev_size")
    assert int(dev_size.read_text()) == 64 * MiB
    cli("volume", "extend", ref, "--size", "96M")  # no rescan by hand, no udev
    deadline = time.monotonic() + 10
    while int(Path(f"/sys/block/{disk}/size").read_text()) != 96 * MiB // 512:
        assert time.monotonic() < deadline, Path(f"/sys/block/{disk}/size").read_text()
        time.sleep(0.2)
    assert int(dev_size.read_text()) == 96 * MiB  # LIO's own idea of the size follows
    write_direct(device, 95 * MiB, b"e" * 4096)  # the new end is usable
    assert read_direct(device, 95 * MiB, 4096) == b"e" * 4096
    cli("export", "remove", f"scsi/{ref}")


def test_vhost_scsi_endpoint_of_a_volume_read_back_over_nbd(
    cli: CLI, daemon: Daemon, ref: str, tmp_path: Path
) -> None:
    out = cli("export", "vhost-scsi", ref, "--wwpn", WWPN).out
    assert out == f"{WWPN} LUN 0\n"
    pattern = b"".join(bytes([i]) * 512 for i in range(256)) * 2  # 256 KiB
    with VhostScsiFrontend(WWPN) as fe:
        assert fe.ready(0).ok
        inquiry = fe.inquiry(0)
        assert inquiry.ok and inquiry.data[8:16] == b"STORVISR"
        blocks, block_size, result = fe.read_capacity16(0)
        assert result.ok and blocks * block_size == 64 * MiB
        assert fe.write16(2048, pattern).ok
        assert fe.write16(8192, b"\xee" * 65536).ok
        assert fe.synchronize_cache().ok
        assert fe.unmap(8192, 128).ok
        assert fe.read16(8192, 128).data == bytes(65536)
    cli("export", "nbd", ref, "--name", "check")
    image = tmp_path / "copy.raw"
    uri = f"nbd+unix:///check?socket={cli.home / 'nbd.sock'}"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(image))
    data = image.read_bytes()
    assert data[2048 * 512 : 2048 * 512 + len(pattern)] == pattern
    assert data[8192 * 512 : 8192 * 512 + 65536] == bytes(65536)
    cli("export", "remove", "check")
    cli("export", "remove", f"vhost-scsi/{ref}")
    assert not Path(f"/sys/kernel/config/target/vhost/{WWPN}").exists()


def write_while(device: str, kill: Callable[[threading.Event], None]) -> None:
    """Write 32 MiB of a random pattern to ``device``, a 256 KiB write with O_DIRECT and an
    fsync at a time, with ``kill`` run on a thread of its own from the 9th write on (it sets
    the event once its signal is sent; the writes go on meanwhile). The writes complete and
    the data is intact, and the kernel logged no I/O error."""
    chunk = 256 * 1024
    count = 128
    source = os.urandom(chunk * count)
    sent = threading.Event()
    killer = threading.Thread(target=kill, args=(sent,))
    for n in range(count):
        if n == 8:
            killer.start()
        if n == 16:
            assert sent.wait(60), "the kill was not sent"
        write_direct(device, n * chunk, source[n * chunk : (n + 1) * chunk])
    killer.join(300)
    assert not killer.is_alive()
    assert read_direct(device, 0, chunk * count) == source
    dmesg = run("dmesg")
    assert "I/O error" not in dmesg and "timing out command" not in dmesg, dmesg[-3000:]


def test_kill_9_of_the_data_plane_under_io_loses_nothing(
    cli: CLI, daemon: Daemon, ref: str
) -> None:
    device, _ = export_scsi(cli, ref)
    holder = the_ring_holder(daemon)

    def kill_plane(sent: threading.Event) -> None:
        os.kill(holder, signal.SIGKILL)
        sent.set()

    write_while(device, kill_plane)
    assert the_ring_holder(daemon) != holder  # a new process took the ring over
    cli("export", "remove", f"scsi/{ref}")


def test_kill_9_of_the_daemon_under_io_loses_nothing(cli: CLI, daemon: Daemon, ref: str) -> None:
    device, _ = export_scsi(cli, ref)
    restart = 0.0

    def kill_daemon(sent: threading.Event) -> None:
        nonlocal restart
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGKILL)
        sent.set()
        daemon.proc.wait()
        daemon.proc = None
        started = time.monotonic()
        daemon.start(timeout=120)
        restart = time.monotonic() - started

    write_while(device, kill_daemon)
    the_ring_holder(daemon)
    print(f"daemon restart took {restart:.1f} s")
    cli("export", "remove", f"scsi/{ref}")
