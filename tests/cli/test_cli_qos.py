"""QoS from the command line: named specs, volume QoS, bad input, persistence, and limits
enforced on a running daemon's NBD exports (one limit per volume across its connections and
data-plane processes, changed online)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from cli_harness import CLI, Daemon

from prereq import require_module


def _setup(cli: CLI, tmp_path: Path) -> None:
    cli("pool", "create", "p", "--backing", f"{tmp_path}/disk.img:1G")
    cli("volume", "create", "p/v", "--size", "2G")


def test_named_specs_and_volume_qos(cli: CLI, tmp_path: Path, home: Path) -> None:
    _setup(cli, tmp_path)
    spec = cli("qos", "create", "gold", "read_iops_sec=1000", "write_bytes_sec=1e8", "--json")
    assert spec.json() == {
        "name": "gold",
        "keys": [
            {"key": "read_iops_sec", "value": "1000"},
            {"key": "write_bytes_sec", "value": "100000000"},
        ],
    }
    cli("qos", "create", "pergb", "total_iops_sec_per_gb=10", "total_iops_sec_per_gb_min=5")
    listed = cli("qos", "list").out.splitlines()
    assert listed[0].split() == ["NAME", "KEYS"]
    assert listed[1].split() == ["gold", "read_iops_sec=1000", "write_bytes_sec=100000000"]
    assert cli("qos", "show", "gold").out.splitlines()[0].split() == ["qos", "spec:", "gold"]

    q = cli("volume", "set-qos", "p/v", "gold", "--json").json()
    assert q["spec"] == "gold" and len(q["keys"]) == 2  # type: ignore[index]
    assert cli.fails("qos", "delete", "gold") == (
        "storvisor: error: QoS spec 'gold' is used by p/v; "
        "set another QoS on them first (volume set-qos)"
    )
    one_off = cli("volume", "set-qos", "p/v", "total_iops_sec=300", "size_iops_sec=8192", "--json")
    assert one_off.json() == {
        "pool": "p",
        "volume": "v",
        "spec": None,
        "keys": [
            {"key": "size_iops_sec", "value": "8192"},
            {"key": "total_iops_sec", "value": "300"},
        ],
    }
    cli("qos", "delete", "gold")
    assert cli("volume", "show-qos", "p/v", "--json").json() == one_off.json()
    cli("volume", "set-qos", "p/v", "--clear")
    assert cli("volume", "show-qos", "p/v", "--json").json()["keys"] == []  # type: ignore[index]
    assert "limits: none" in " ".join(cli("volume", "show-qos", "p/v").out.split())
    stored = json.loads((home / "qos.json").read_text())
    assert [s["name"] for s in stored["specs"]] == ["pergb"]
    assert stored["volumes"] == []


def test_bad_input_is_one_line_and_changes_nothing(cli: CLI, tmp_path: Path, home: Path) -> None:
    _setup(cli, tmp_path)
    cli("qos", "create", "gold", "total_iops_sec=100")
    cli("volume", "set-qos", "p/v", "gold")
    before = (home / "qos.json").read_bytes()
    cases = [
        (("qos", "create", "x", "total_iop_sec=1"), "unknown QoS key 'total_iop_sec'"),
        (("qos", "create", "x", "read_iops_sec=-5"), "QoS key read_iops_sec: '-5' is negative"),
        (("qos", "create", "x", "read_iops_sec=lots"), "read_iops_sec: 'lots' is not a number"),
        (("qos", "create", "x", "read_iops_sec=1e30"), "read_iops_sec: '1e30' is absurd"),
        (
            ("qos", "create", "x", "total_iops_sec=10", "read_iops_sec=5"),
            "QoS keys total_iops_sec and read_iops_sec cannot be combined",
        ),
        (("qos", "create", "x", "read_iops_sec=1", "read_iops_sec=2"), "given twice"),
        (("qos", "create", "gold", "read_iops_sec=1"), "QoS spec 'gold' already exists"),
        (("qos", "create", "../x", "read_iops_sec=1"), "invalid QoS spec name '../x'"),
        (("qos", "show", "silver"), "no QoS spec named 'silver'"),
        (("qos", "delete", "silver"), "no QoS spec named 'silver'"),
        (("volume", "set-qos", "p/v", "silver"), "no QoS spec named 'silver'"),
        (("volume", "set-qos", "p/nope", "gold"), "nope"),
        (("volume", "set-qos", "p/v", "write_iops_sec=0x10"), "'0x10' is not a number"),
    ]
    for args, message in cases:
        line = cli.fails(*args)
        assert message in line, (args, line)
    usage = [
        (("volume", "set-qos", "p/v"), "give a QoS spec name, KEY=VALUE pairs, or --clear"),
        (("volume", "set-qos", "p/v", "gold", "--clear"), "--clear takes no"),
        (("volume", "set-qos", "p/v", "gold", "read_iops_sec=1"), "not both"),
        (("volume", "set-qos", "p/v", "gold", "silver"), "give one QoS spec name"),
        (("volume", "set-qos", "p/v", "read_iops_sec="), "expected KEY=VALUE"),
        (("qos", "create", "x", "read_iops_sec"), "expected KEY=VALUE"),
    ]
    for args, message in usage:
        line = cli.fails(*args, rc=2)
        assert message in line, (args, line)
    assert (home / "qos.json").read_bytes() == before


def _rate(handles: list, seconds: float) -> float:  # type: ignore[type-arg]
    """Reads per second achieved by one thread per handle, each reading 4 KiB in turn."""
    counts = [0] * len(handles)
    errors: list[BaseException] = []
    stop = time.monotonic() + seconds

    def run(i: int) -> None:
        try:
            while time.monotonic() < stop:
                handles[i].pread(4096, (i * 4096) % (1 << 20))
                counts[i] += 1
        except BaseException as e:  # a throttled request must never fail
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(handles))]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    assert not errors, errors
    return sum(counts) / (time.monotonic() - start)


def test_limits_apply_across_connections_and_change_online(
    cli: CLI, daemon: Daemon, tmp_path: Path
) -> None:
    nbd = require_module("nbd", "python3-libnbd is not installed")
    _setup(cli, tmp_path)
    uri = cli("export", "nbd", "p/v").out.strip()
    handles = []
    for _ in range(4):  # spread over the daemon's NBD data-plane processes
        h = nbd.NBD()
        h.connect_uri(uri)
        handles.append(h)
    unlimited = _rate(handles, 0.3)
    assert unlimited > 1000, unlimited  # far above the limits below

    cli("volume", "set-qos", "p/v", "total_iops_sec=200")
    time.sleep(0.2)
    shared = _rate(handles, 1.5)  # four connections, one limit
    assert 180 <= shared <= 220, shared

    cli("qos", "create", "fast", "read_iops_sec=500")
    cli("volume", "set-qos", "p/v", "fast")  # online
    time.sleep(0.2)
    faster = _rate(handles, 1.0)
    assert 450 <= faster <= 550, faster

    # per GB: the 2 GiB volume gets 2 * 150 = 300, and an extend raises it
    cli("volume", "set-qos", "p/v", "read_iops_sec_per_gb=150")
    time.sleep(0.2)
    assert 270 <= _rate(handles, 1.0) <= 330
    cli("volume", "extend", "p/v", "--size", "4G")
    time.sleep(0.2)
    assert 540 <= _rate(handles, 1.0) <= 660
    for h in handles:
        h.shutdown()


def test_qos_survives_a_restart(cli: CLI, tmp_path: Path, home: Path) -> None:
    nbd = require_module("nbd", "python3-libnbd is not installed")
    _setup(cli, tmp_path)
    cli("export", "nbd", "p/v")
    cli("qos", "create", "slow", "read_iops_sec=100")
    cli("volume", "set-qos", "p/v", "slow")  # offline: recorded for the daemon
    d = Daemon(home).start()
    try:
        assert cli("volume", "show-qos", "p/v", "--json").json()["spec"] == "slow"  # type: ignore[index]
        h = nbd.NBD()
        h.connect_uri(cli("export", "show", "p/v", "--json").json()["uris"][0])  # type: ignore[index]
        assert 85 <= _rate([h], 1.5) <= 115
        h.shutdown()
    finally:
        d.kill()


def test_vhost_user_blk_queues_in_two_processes_share_one_limit(
    cli: CLI, daemon: Daemon, tmp_path: Path
) -> None:
    from storvisor.protocols.virtio.blk import Status
    from storvisor.testing.vhost_frontend import VhostUserFrontend

    _setup(cli, tmp_path)
    sock = str(tmp_path / "v.sock")
    cli("export", "vhost-user-blk", "p/v", "--socket", sock, "--queues", "2")

    def elapsed(count: int) -> float:
        start = time.monotonic()
        for i in range(count):  # alternating queues (two processes on two CPUs or more)
            status, _ = fe.blk.read(i * 4096, 4096, queue=i % 2)
            assert status == Status.OK
        return time.monotonic() - start

    with VhostUserFrontend(sock, queue_size=16, num_queues=2) as fe:
        fe.setup()
        assert elapsed(100) < 0.5  # unlimited
        cli("volume", "set-qos", "p/v", "total_iops_sec=100")
        time.sleep(0.2)
        # 101 reads: 100 intervals of 10 ms, whichever queue and process serves them
        assert 0.95 <= elapsed(101) <= 1.25
        cli("volume", "set-qos", "p/v", "--clear")
        time.sleep(0.2)
        assert elapsed(100) < 0.5
