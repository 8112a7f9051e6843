"""A failing backing device under the daemon: the affected NBD and vhost-user-blk requests
fail with the device's errno, whether the daemon or a data-plane process did the I/O; the
pool shows ``degraded`` with the reason in ``pool list`` and ``pool show``; the daemon and
the other pool keep serving; a failed sync fails every flush until ``pool reopen``; with
``pool set-timeout --data``, a stalled read or write fails within it (and a write latches as
a failed sync does); once
the fault clears the data matches a model and ``storvisor fsck`` is clean.

Pool ``f``'s backing file lives on ``storvisor.testing.faultfs``; pool ``g``'s does not.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_harness import CLI, Daemon

from powercuts import require_fuse
from prereq import require_module
from storvisor.api.client import Client
from storvisor.engine.home import Home
from storvisor.protocols.virtio.blk import Status
from storvisor.testing.faultfs import Fault, FaultMount
from storvisor.testing.vhost_frontend import VhostUserFrontend

nbd = require_module("nbd", "python3-libnbd is not installed")

CS = 64 << 10
DATA = CS  # every data cluster of the backing file (the header is cluster 0)
A = bytes(range(256)) * 256  # 64 KiB
B = bytes(reversed(range(256))) * 256


@pytest.fixture
def mount() -> Iterator[FaultMount]:
    require_fuse()
    top = Path(tempfile.mkdtemp(prefix="faildisk-cli-", dir="/tmp"))
    (top / "backing").mkdir()
    (top / "mnt").mkdir()
    m = FaultMount(top / "backing", top / "mnt")
    try:
        yield m
    finally:
        m.clear()
        m.close()
        shutil.rmtree(top, ignore_errors=True)


def _pool(cli: CLI, name: str) -> dict[str, object]:
    found = {p["name"]: p for p in cli("pool", "list", "--json").json()}  # type: ignore[attr-defined]
    return found[name]  # type: ignore[no-any-return]


def _io_errors(home: Path, pool: str) -> dict[str, int]:
    """The pool's ``storvisor_pool_io_errors_total`` counters from ``/metrics``, by op."""
    found: dict[str, int] = {}
    for line in Client(home / "api.sock").metrics().splitlines():
        m = re.fullmatch(r"storvisor_pool_io_errors_total\{(.*)\} (\S+)", line)
        if m is None:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels["pool"] == pool:
            found[labels["op"]] = int(float(m.group(2)))
    assert set(found) == {"read", "write", "sync", "timeout"}, found
    return found


def _wait_degraded(cli: CLI, what: str) -> dict[str, object]:
    deadline = time.monotonic() + 10
    while True:
        f = _pool(cli, "f")
        if f["state"] == "degraded" and what in str(f["reason"]):
            return f
        assert time.monotonic() < deadline, f
        time.sleep(0.05)


def _nbd_errno(call) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(nbd.Error) as e:
        call()
    return str(e.value.errno)


def test_nbd_and_vhost_requests_fail_the_daemon_and_the_other_pool_do_not(
    cli: CLI, home: Path, tmp_path: Path, mount: FaultMount
) -> None:
    cli("pool", "create", "f", "--backing", f"{mount.mountpoint}/f.img:64M")
    cli("pool", "create", "g", "--backing", f"{tmp_path}/g.img:64M")
    for pool in ("f", "g"):
        cli("volume", "create", f"{pool}/v", "--size", "4M")
    cli("volume", "create", "f/w", "--size", "4M")
    daemon = Daemon(home).start()
    try:
        uf = cli("export", "nbd", "f/v").out.strip()
        ug = cli("export", "nbd", "g/v").out.strip()
        sock = str(tmp_path / "w.sock")
        cli("export", "vhost-user-blk", "f/w", "--socket", sock)
        hf, hg = nbd.NBD(), nbd.NBD()
        hf.connect_uri(uf)
        hg.connect_uri(ug)
        hf.pwrite(A + A, 0)  # allocating: the daemon writes
        hf.pwrite(B[:4096], 0)  # in place: a data plane writes
        hf.flush()
        model = bytearray(B[:4096] + A[4096:] + A)

        # writes: in place (data plane) and allocating (daemon), EIO then ENOSPC
        for action, code in (("eio", "EIO"), ("enospc", "ENOSPC")):
            mount.set(Fault("write", action, DATA))
            assert _nbd_errno(lambda: hf.pwrite(B[:4096], 8192)) == code
            model[8192 : 8192 + 4096] = B[:4096]  # either old or new: checked below
            assert _nbd_errno(lambda: hf.pwrite(A, 5 * CS)) == code
            hg.pwrite(A, 0)  # the other pool serves
            hg.flush()
            mount.clear()
        f = _wait_degraded(cli, "a write of a backing device failed")
        assert "Input/output error" in str(f["reason"])
        assert _pool(cli, "g")["state"] == "online"
        hf.pwrite(A[:4096], 8192)  # the fault cleared: both kinds work again
        hf.pwrite(B, 5 * CS)
        model[8192 : 8192 + 4096] = A[:4096]
        model += bytes(3 * CS) + B
        hf.flush()

        # reads
        mount.set(Fault("read", "eio", DATA))
        assert _nbd_errno(lambda: hf.pread(4096, 0)) == "EIO"
        assert hg.pread(4096, 0) == A[:4096]
        mount.clear()
        assert hf.pread(len(model), 0) == bytes(model)

        # counted in the metrics, per pool and operation
        errors = _io_errors(home, "f")
        assert errors["write"] >= 4 and errors["read"] >= 1 and errors["sync"] == 0, errors
        assert set(_io_errors(home, "g").values()) == {0}

        # vhost-user-blk on the same pool
        with VhostUserFrontend(sock, queue_size=16) as fe:
            fe.setup()
            assert fe.blk.write(0, A) == Status.OK
            assert fe.blk.flush() == Status.OK
            mount.set(Fault("write", "eio", DATA))
            assert fe.blk.write(0, B[:4096]) == Status.IOERR  # in place
            assert fe.blk.write(3 * CS, B[:4096]) == Status.IOERR  # allocating
            mount.set(Fault("read", "enospc", DATA))
            assert fe.blk.read(0, 4096)[0] == Status.IOERR
            mount.clear()
            assert fe.blk.write(0, A[:4096]) == Status.OK
            assert fe.blk.read(0, len(A)) == (Status.OK, A)

            # a failed sync: every flush fails until the pool is reopened
            mount.set(Fault("sync", "eio"))
            assert _nbd_errno(hf.flush) == "EIO"
            line = cli.fails("pool", "reopen", "f")  # the device still fails its syncs
            assert "f.img: Input/output error" in line, line
            mount.clear()
            assert _nbd_errno(hf.flush) == "EIO"
            assert fe.blk.flush() == Status.IOERR
            hg.flush()  # the other pool flushes
            assert _io_errors(home, "f")["sync"] >= 1
            shown = cli("pool", "show", "f").out
            assert "degraded" in shown and "flushes fail until the pool is reopened" in shown
            table = cli("pool", "list").out
            assert any(line.split()[:2] == ["f", "degraded"] for line in table.splitlines())

            reopened = cli("pool", "reopen", "f", "--json").json()
            assert (reopened["state"], reopened["reason"]) == ("online", "")  # type: ignore[index]
            hf.flush()
            assert fe.blk.flush() == Status.OK
            assert fe.blk.read(0, len(A)) == (Status.OK, A)
        assert hf.pread(len(model), 0) == bytes(model)
        assert mount.hits()["write"] >= 6 and mount.hits()["sync"] == 2
        for h in (hf, hg):
            h.shutdown()
        cli("export", "remove", "f/v")
        cli("export", "remove", "vhost-user-blk:f/w")
        for pool in ("f", "g"):
            report = cli("fsck", pool, "--json").json()
            assert not any(report[k] for k in ("leaked", "doubly_owned", "dangling", "errors"))  # type: ignore[index]
        assert daemon.proc is not None and daemon.proc.poll() is None
        rc, err = daemon.stop()
        assert rc == 0, err
        assert err.count("pool f: a write of a backing device failed") == 1, err  # logged once
        assert err.count("pool f: a sync of a backing device failed") == 1, err
        assert "Traceback" not in err
    finally:
        daemon.kill()


def test_a_stalled_sync_fails_the_flush_after_the_pools_timeout_and_the_api_answers(
    cli: CLI, home: Path, tmp_path: Path, mount: FaultMount
) -> None:
    cli("pool", "create", "f", "--backing", f"{mount.mountpoint}/f.img:64M")
    cli("pool", "create", "g", "--backing", f"{tmp_path}/g.img:64M")
    for pool in ("f", "g"):
        cli("volume", "create", f"{pool}/v", "--size", "4M")
    with Home(home) as h:
        h.pool("f").set_io_timeout(1.0)
    daemon = Daemon(home).start()
    try:
        hf, hg = nbd.NBD(), nbd.NBD()
        hf.connect_uri(cli("export", "nbd", "f/v").out.strip())
        hg.connect_uri(cli("export", "nbd", "g/v").out.strip())
        hf.pwrite(A, 0)
        hf.flush()
        mount.set(Fault("sync", "stall", seconds=60))
        start = time.monotonic()
        assert _nbd_errno(hf.flush) == "EIO"  # ETIMEDOUT: EIO on the wire
        took = time.monotonic() - start
        assert 1.0 <= took < 5, took
        f = _pool(cli, "f")  # the API answers while the sync is stalled
        assert f["state"] == "degraded"
        assert "did not complete within 1 s" in str(f["reason"])
        hg.pwrite(B, 0)  # the other pool serves and flushes
        hg.flush()
        assert "still stalled" in cli.fails("pool", "reopen", "f")
        mount.clear()  # the stalled sync returns
        deadline = time.monotonic() + 15
        while cli("pool", "reopen", "f", rc=None).rc != 0:
            assert time.monotonic() < deadline, "the released sync never completed"
            time.sleep(0.1)
        assert _pool(cli, "f")["state"] == "online"
        # a write stall shorter than the timeout (a FUSE write holds the file's inode lock,
        # so a background sync waits for it: a longer one would time the sync out)
        mount.set(Fault("write", "stall", DATA, None, 0.6))
        start = time.monotonic()
        hf.pwrite(B, 2 * CS)  # allocating, and in place by a data plane: each write stalls,
        hf.pwrite(A, 2 * CS)  # then completes when the device answers
        assert time.monotonic() - start >= 1.1
        hg.pwrite(A, 0)  # the other pool was never held up
        mount.clear()
        hf.flush()
        assert hf.pread(3 * CS, 0) == A + bytes(CS) + A
        assert hg.pread(CS, 0) == A
        for h in (hf, hg):
            h.shutdown()
        for pool in ("f", "g"):
            report = cli("fsck", pool, "--json").json()
            assert not any(report[k] for k in ("leaked", "doubly_owned", "dangling", "errors"))  # type: ignore[index]
        rc, err = daemon.stop()
        assert rc == 0 and "Traceback" not in err, err
    finally:
        daemon.kill()


def test_a_stalled_read_or_write_fails_within_the_pools_data_timeout(
    cli: CLI, home: Path, tmp_path: Path, mount: FaultMount
) -> None:
    """``pool set-timeout --data``: data planes then send every read and write to the
    daemon, which bounds them; a stalled read fails, a stalled write fails and latches."""
    cli("pool", "create", "f", "--backing", f"{mount.mountpoint}/f.img:64M")
    cli("pool", "create", "g", "--backing", f"{tmp_path}/g.img:64M")
    for pool in ("f", "g"):
        cli("volume", "create", f"{pool}/v", "--size", "4M")
    cli("volume", "create", "f/w", "--size", "4M")
    daemon = Daemon(home).start()
    try:
        assert "invalid data I/O timeout" in cli.fails("pool", "set-timeout", "f", "--data", "-1")
        for bad in ("1e300", "604801", "1e-200", "0.09"):  # refused, nothing kept or degraded
            assert "to 604800 seconds" in cli.fails("pool", "set-timeout", "f", "--io", bad)
            assert "to 604800 seconds" in cli.fails("pool", "set-timeout", "f", "--data", bad)
        assert "nothing to set" in cli.fails("pool", "set-timeout", "f")
        set_ = cli("pool", "set-timeout", "f", "--data", "0.5", "--json").json()
        assert set_ == {"io": 30.0, "data": 0.5}
        out = cli("pool", "set-timeout", "f", "--io", "20").out
        assert out.strip() == "pool f: sync timeout 20 s, read/write timeout 0.5 s"
        hf, hg = nbd.NBD(), nbd.NBD()
        hf.connect_uri(cli("export", "nbd", "f/v").out.strip())
        hg.connect_uri(cli("export", "nbd", "g/v").out.strip())
        sock = str(tmp_path / "w.sock")
        cli("export", "vhost-user-blk", "f/w", "--socket", sock)
        hf.pwrite(A, 0)
        hf.flush()
        with VhostUserFrontend(sock, queue_size=16) as fe:
            fe.setup()
            assert fe.blk.write(0, A) == Status.OK
            assert fe.blk.flush() == Status.OK

            mount.set(Fault("read", "stall", DATA, None, 30))
            for read in (
                lambda: _nbd_errno(lambda: hf.pread(4096, 0)),
                lambda: fe.blk.read(0, 4096)[0],
            ):
                start = time.monotonic()
                assert read() in ("EIO", Status.IOERR)  # ETIMEDOUT: EIO on the wire
                took = time.monotonic() - start
                assert 0.5 <= took < 5, took
            assert hg.pread(4096, 0) == bytes(4096)  # the other pool serves
            f = _wait_degraded(cli, "a read of a backing device did not complete within 0.5 s")
            mount.clear()
            deadline = time.monotonic() + 15
            while cli("pool", "reopen", "f", rc=None).rc != 0:  # once the reads returned
                assert time.monotonic() < deadline, "the released reads never completed"
                time.sleep(0.1)
            assert hf.pread(CS, 0) == A and fe.blk.read(0, CS) == (Status.OK, A)

            mount.set(Fault("write", "stall", DATA, None, 30))
            start = time.monotonic()
            assert _nbd_errno(lambda: hf.pwrite(B[:4096], 0)) == "EIO"
            assert 0.5 <= time.monotonic() - start < 5
            assert fe.blk.write(0, B[:4096]) == Status.IOERR
            f = _wait_degraded(cli, "a write of a backing device timed out")
            assert "flushes fail until the pool is reopened" in str(f["reason"])
            assert _nbd_errno(hf.flush) == "EIO"  # its data may land at any time
            assert fe.blk.flush() == Status.IOERR
            assert "still stalled" in cli.fails("pool", "reopen", "f")
            hg.pwrite(A, 0)  # the other pool serves and flushes
            hg.flush()
            assert _pool(cli, "g")["state"] == "online"
            mount.clear()
            deadline = time.monotonic() + 15
            while cli("pool", "reopen", "f", rc=None).rc != 0:
                assert time.monotonic() < deadline, "the released writes never completed"
                time.sleep(0.1)
            assert _pool(cli, "f")["state"] == "online"
            hf.flush()
            assert fe.blk.flush() == Status.OK
            assert hf.pread(4096, 0) in (A[:4096], B[:4096])  # the timed-out write: either
            assert fe.blk.read(0, 4096)[1] in (A[:4096], B[:4096])
            assert hf.pread(CS - 4096, 4096) == A[4096:]
        for h in (hf, hg):
            h.shutdown()
        for pool in ("f", "g"):
            report = cli("fsck", pool, "--json").json()
            assert not any(report[k] for k in ("leaked", "doubly_owned", "dangling", "errors"))  # type: ignore[index]
        rc, err = daemon.stop()
        assert rc == 0 and "Traceback" not in err, err
    finally:
        daemon.kill()


def _exports(cli: CLI) -> dict[str, dict[str, object]]:
    return {e["spec"]["name"]: e for e in cli("export", "list", "--json").json()}  # type: ignore[attr-defined]


def test_a_pool_stalled_at_start_holds_up_its_own_exports_only(
    cli: CLI, home: Path, tmp_path: Path, mount: FaultMount
) -> None:
    """A device that does not answer while the daemon starts (a LUN gone silent): the API
    answers after ``--pool-wait``, the other pool's exports serve, the stalled pool is
    ``opening`` and its exports ``broken`` (and removable) until its open ends; then they
    serve."""
    cli("pool", "create", "f", "--backing", f"{mount.mountpoint}/f.img:64M")
    cli("pool", "create", "g", "--backing", f"{tmp_path}/g.img:64M")
    for pool in ("f", "g"):
        cli("volume", "create", f"{pool}/v", "--size", "4M")
        cli("export", "nbd", f"{pool}/v")  # recorded: started by the daemon
    cli("export", "nbd", "f/v", "--name", "f2")
    with Home(home) as h:
        volume = h.pool("f").open_volume("v")
        volume.write(0, A)
        volume.close()  # flushed
    mount.set(Fault("read", "stall", 0, None, 120))
    daemon = Daemon(home, "--pool-wait", "1")
    try:
        started = time.monotonic()
        daemon.start(timeout=20)
        assert time.monotonic() - started < 15, "the start waited for the stalled pool"
        exports = _exports(cli)
        assert exports["g/v"]["state"] == "active"
        assert exports["f/v"]["state"] == "broken"
        assert exports["f/v"]["message"] == "pool 'f' is being opened"
        assert (_pool(cli, "f")["state"], _pool(cli, "g")["state"]) == ("opening", "online")
        hg = nbd.NBD()
        hg.connect_uri(str(exports["g/v"]["uris"][0]))  # type: ignore[index]
        hg.pwrite(B, 0)
        hg.flush()
        assert mount.hits().get("read", 0) > 0, "the open never read the stalled device"
        assert _exports(cli)["f2"]["state"] == "broken"
        cli("export", "remove", "f2", timeout=10)  # it never served: no wait for the pool
        assert "f2" not in _exports(cli)

        mount.clear()
        deadline = time.monotonic() + 30
        while _exports(cli)["f/v"]["state"] != "active":
            assert time.monotonic() < deadline, _exports(cli)["f/v"]
            time.sleep(0.1)
        assert _pool(cli, "f")["state"] == "online"
        hf = nbd.NBD()
        hf.connect_uri(str(exports["f/v"]["uris"][0]))  # type: ignore[index]
        assert hf.pread(len(A), 0) == A
        assert hg.pread(len(B), 0) == B
        for handle in (hf, hg):
            handle.shutdown()
        rc, err = daemon.stop()
        assert rc == 0 and "Traceback" not in err, err
    finally:
        daemon.kill()
