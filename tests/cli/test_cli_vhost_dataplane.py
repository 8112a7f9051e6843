"""vhost-user-blk exports of the daemon run in its data-plane processes (one per CPU, shared
by every export): one killed is restarted, the front-ends whose queues it served reconnect
(their data intact) and the others carry on; the processes are gone when the daemon dies."""

from __future__ import annotations

import os
import select
import signal
import time

from cli_harness import Daemon

from prereq import require
from storvisor.protocols.virtio.blk import Status
from storvisor.testing import procs
from storvisor.testing.vhost_frontend import VhostUserFrontend

MiB = 1 << 20


def _dropped(fe: VhostUserFrontend, wait: float) -> bool:
    """Whether the back-end end of ``fe``'s connection has gone (within ``wait`` s)."""
    assert fe.sock is not None
    poller = select.poll()
    poller.register(fe.sock, select.POLLIN | select.POLLHUP)
    return bool(poller.poll(wait * 1000))


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


def test_exports_share_the_data_planes_and_a_killed_one_restarts(cli, daemon, tmp_path):
    require((os.cpu_count() or 1) >= 2, "one CPU: one data-plane process")
    cli("pool", "create", "p", "--backing", f"{tmp_path}/disk.img:1G")
    socks = {}
    for name in ("a", "b", "c", "d"):
        cli("volume", "create", f"p/{name}", "--size", "64M")
        socks[name] = str(tmp_path / f"{name}.sock")
        cli("export", "vhost-user-blk", f"p/{name}", "--socket", socks[name])
    cpus = os.cpu_count() or 1
    planes = _wait(lambda: len(p := procs.data_planes(daemon.proc.pid)) == cpus and p)
    assert daemon.proc.pid not in planes  # four exports, one process per CPU, none the daemon

    fes = {
        name: VhostUserFrontend(socks[name], queue_size=16, inflight=True) for name in ("a", "b")
    }
    try:
        for name, fe in fes.items():
            fe.setup()
            assert fe.blk.write(0, name.encode() * 65536) == Status.OK  # allocates in the daemon
            assert fe.blk.write(4096, b"\xa5" * 4096) == Status.OK  # in place
            assert fe.blk.flush() == Status.OK

        # a and b, the first two exports, went to two processes (the least loaded): kill the
        # one serving a
        victim = planes[0]
        os.kill(victim, signal.SIGKILL)
        again = _wait(
            lambda: len(p := procs.data_planes(daemon.proc.pid)) == cpus and victim not in p and p
        )
        assert set(again) - {victim} >= set(planes) - {victim}  # the others never restarted
        hit = [name for name, fe in fes.items() if _dropped(fe, 10 if name == "a" else 0)]
        assert len(hit) == 1, hit  # exactly one export lost its queue; the other carries on
        (kept,) = set(fes) - set(hit)
        assert fes[kept].blk.write(8192, b"\x77" * 4096) == Status.OK
        assert _read(fes[kept], 0, 12288) == kept.encode() * 4096 + b"\xa5" * 4096 + b"\x77" * 4096

        fe = fes[hit[0]]
        fe.reconnect()
        assert _read(fe, 0, 8192) == hit[0].encode() * 4096 + b"\xa5" * 4096
        assert fe.blk.write(8192, b"\x77" * 4096) == Status.OK
        assert fe.blk.flush() == Status.OK
        # one request in many buffers over owned, never written and zeroed clusters
        assert fe.blk.write_zeroes([(65536 >> 9, 65536 >> 9, 0)]) == Status.OK
        status, data = fe.blk.read(0, 3 * 65536, segments=24, indirect=True)
        assert status == Status.OK
        expect = hit[0].encode() * 4096 + b"\xa5" * 4096 + b"\x77" * 4096
        assert data == expect + hit[0].encode() * (65536 - 12288) + bytes(2 * 65536)
    finally:
        for fe in fes.values():
            fe.close()

    uri = cli("export", "nbd", "p/a").out.strip()
    assert uri
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    for pid in again:  # the data planes follow their daemon
        _wait(lambda pid=pid: procs.gone(pid))


def test_data_planes_count_and_per_export(cli, home, tmp_path):
    assert cli.fails("serve", "--data-planes", "0", rc=2) == (
        "storvisor: error: argument --data-planes: invalid data-plane count '0': "
        "a number of processes (1-1024) or per-export"
    )
    assert "invalid data-plane count 'many'" in cli.fails("serve", "--data-planes", "many", rc=2)
    cli("pool", "create", "p", "--backing", f"{tmp_path}/disk.img:1G")
    for name in ("a", "b", "c"):
        cli("volume", "create", f"p/{name}", "--size", "64M")
        cli("export", "vhost-user-blk", f"p/{name}", "--socket", str(tmp_path / f"{name}.sock"))
    # one process for everything; or a process of its own for each export plus the NBD
    # connections' set (one per CPU)
    cases = [
        (("--data-planes", "1"), 1),
        (("--data-planes", "per-export"), 3 + (os.cpu_count() or 1)),
    ]
    for args, expect in cases:
        d = Daemon(home, *args).start()
        try:
            assert d.proc is not None
            found = _wait(lambda d=d, n=expect: len(p := procs.data_planes(d.proc.pid)) == n and p)
            for name in ("a", "b", "c"):
                with VhostUserFrontend(str(tmp_path / f"{name}.sock"), queue_size=16) as fe:
                    fe.setup()
                    assert fe.blk.write(0, name.encode() * 4096) == Status.OK
                    assert _read(fe, 0, 4096) == name.encode() * 4096
            assert len(procs.data_planes(d.proc.pid)) == len(found)
        finally:
            rc, err = d.stop()
            assert rc == 0, err
