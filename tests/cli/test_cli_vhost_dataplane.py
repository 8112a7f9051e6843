"""vhost-user-blk exports of the daemon run in data-plane processes of their own: one per
export, restarted when killed (the front-end reconnects and its data is intact), and gone
when the daemon dies."""

from __future__ import annotations

import json
import os
import signal
import time

from prereq import require
from storvisor.protocols.virtio.blk import Status
from storvisor.testing import procs
from storvisor.testing.vhost_frontend import VhostUserFrontend

MiB = 1 << 20


def _planes(daemon_pid: int) -> dict[str, list[int]]:
    """socket path -> pids of the daemon's data-plane processes for it, by slot."""
    found: dict[str, list[int]] = {}
    for child in procs.children(daemon_pid):
        cmdline = child.cmdline
        if b"storvisor.exports.vhost_worker" in cmdline:
            config = json.loads(cmdline[cmdline.index(b"storvisor.exports.vhost_worker") + 1])
            slots = found.setdefault(config["socket_path"], [0] * config["slots"])
            slots[config["slot"]] = child.pid
    return found


def _wait(predicate, timeout: float = 15.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


def _read(fe: VhostUserFrontend, offset: int, length: int) -> bytes:
    status, data = fe.blk.read(offset, length)
    assert status == Status.OK
    return data


def test_each_export_has_its_own_process_restarted_after_a_kill(cli, daemon, tmp_path):
    require((os.cpu_count() or 1) >= 2, "one CPU: one process per export, no queue process")
    cli("pool", "create", "p", "--backing", f"{tmp_path}/disk.img:1G")
    socks = {}
    for name in ("a", "b"):
        cli("volume", "create", f"p/{name}", "--size", "64M")
        socks[name] = str(tmp_path / f"{name}.sock")
        cli("export", "vhost-user-blk", f"p/{name}", "--socket", socks[name], "--queues", "2")
    planes = _wait(
        lambda: (p := _planes(daemon.proc.pid)) and len(p) == 2 and all(map(all, p.values())) and p
    )
    assert set(planes) == set(socks.values())
    # two queues on two CPUs or more: two processes per export, none of them the daemon
    assert all(len(pids) == 2 for pids in planes.values())
    assert daemon.proc.pid not in [pid for pids in planes.values() for pid in pids]

    with VhostUserFrontend(socks["a"], queue_size=16, num_queues=2, inflight=True) as fe:
        fe.setup()
        assert fe.blk.write(0, b"\x5a" * 65536) == Status.OK  # allocates in the daemon
        assert fe.blk.write(4096, b"\xa5" * 4096, queue=1) == Status.OK  # in place, queue 1
        assert fe.blk.flush() == Status.OK

        os.kill(planes[socks["a"]][-1], signal.SIGKILL)  # the process of queue 1
        again = _wait(
            lambda: (
                (p := _planes(daemon.proc.pid))
                and all(map(all, p.values()))
                and set(p.get(socks["a"], [])).isdisjoint(planes[socks["a"]])
                and p
            )
        )
        assert again[socks["b"]] == planes[socks["b"]]  # the other export never noticed
        fe.reconnect()
        assert _read(fe, 0, 8192) == b"\x5a" * 4096 + b"\xa5" * 4096
        assert fe.blk.write(8192, b"\x77" * 4096) == Status.OK
        assert fe.blk.flush() == Status.OK
        # one request in many buffers over owned, never written and zeroed clusters
        assert fe.blk.write_zeroes([(65536 >> 9, 65536 >> 9, 0)]) == Status.OK
        status, data = fe.blk.read(0, 3 * 65536, segments=24, indirect=True)
        assert status == Status.OK
        expect = b"\x5a" * 4096 + b"\xa5" * 4096 + b"\x77" * 4096 + b"\x5a" * (65536 - 12288)
        assert data == expect + bytes(2 * 65536)

    uri = cli("export", "nbd", "p/a").out.strip()
    assert uri
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    for pid in [p for pids in again.values() for p in pids]:  # the data planes follow their daemon
        _wait(lambda pid=pid: procs.gone(pid))
