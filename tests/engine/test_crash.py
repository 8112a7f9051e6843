"""Crash tests: SIGKILL whatever writes to a pool at random moments, then check what survived.

Each round of ``test_crash_rounds`` starts ``python -m storvisor.testing.crashkit`` on the
same Home, lets it log a random number of operations, kills it (at a random moment, or
right after a management operation returned), reopens the Home in this process, requires
``fsck`` clean and checks every volume, snapshot and clone against the worker's log
(``crashkit.History``): what was flushed, or completed before a management operation that
returned, reads back; a snapshot is the point its volume continues from; what was never
written reads as zeros. What survived becomes the next round's known content, so later
rounds also catch damage to data that was already verified.

``test_daemon_crash_rounds`` (NBD) and ``test_daemon_crash_rounds_over_vhost_user`` do the
same with ``storvisor serve`` as the victim, the workload running here over its data planes
and the API; ``test_daemon_kill9_torture`` (slow) runs an NBD and a vhost-user-blk workload
at once with every management operation and reads everything back through the restarted
daemon too. A round that stalls fails, naming the operations in flight.

``test_management_killed_at_each_step`` holds each internal step of each management
operation open and kills the process there: the operation happened whole or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from storvisor.api.client import Client
from storvisor.engine.cache import CacheSpec
from storvisor.engine.home import Home
from storvisor.engine.types import BackingSpec, CacheMode, VolumeInfo
from storvisor.testing import crashkit, procs
from storvisor.testing.crashkit import History

ROUNDS = 10
VOLUME = 1 << 20
POOL_BYTES = 64 << 20


class Fixed:
    """A ``crashkit.Reader`` over given contents."""

    def __init__(self, contents: dict[str, bytes]) -> None:
        self.contents = contents

    def read(self, target: str) -> bytes | None:
        return self.contents.get(target)


@pytest.mark.parametrize(
    ("cluster_size", "devices"),
    [(4096, 1), (65536, 2)],  # with two small devices, allocations spill onto the second
)
def test_crash_rounds(tmp_path: Path, cluster_size: int, devices: int) -> None:
    from crashrounds import kill9_round, seeded, worker_args  # this file runs as a program too

    seed, rng = seeded()
    home_dir = tmp_path / "home"
    home = Home(home_dir)
    size = POOL_BYTES if devices == 1 else 12 << 20
    backings = [BackingSpec(str(tmp_path / f"b{i}.img"), size=size) for i in range(devices)]
    home.create_pool("p", backings, cluster_size=cluster_size)
    home.pool("p").create_volume("v", VOLUME)
    home.close()

    known: dict[str, bytes] = {"v": bytes(VOLUME)}
    flushed_rounds = 0
    for round_ in range(ROUNDS):
        where = f"seed {seed} (STORVISOR_CRASH_SEED), round {round_}"
        after_management = round_ % 4 == 3  # a round with management operations
        worker = worker_args(
            rng,
            round_,
            ops=2000,
            flush_rates=(0.1, 0.02, 0.005),
            discards=round_ % 3 != 0,
            snapshots=round_ % 2 == 1,
            volume_deletes=True,
            kill_after_committed=rng.randrange(1, 8) if after_management else None,
        )
        when: dict[str, Any]
        if after_management:  # right after a management operation returned
            when = {"committed": True}
        elif round_ % 5 == 4:  # while it opens the Home (and recovers from the last crash)
            when = {"opening": rng.uniform(0.0, 0.4)}
        else:  # after a random number of operations, then at a random moment
            when = {"logged": rng.randrange(10, 3000), "jitter": 0.02}
        records = kill9_round(home_dir, where, rng, worker, ready_timeout=30, **when)
        history = History(known, records)
        if history.durable:
            flushed_rounds += 1
        known = crashkit.check_home(home_dir, history, where)
    # a round may end before its first flush, but enough must get further to test anything
    assert flushed_rounds >= ROUNDS // 4, f"seed {seed}: too few rounds reached a flush"


def test_checker_catches_lost_and_stray_writes() -> None:
    """The checker itself: a flushed write that is missing, or data nobody wrote, fails."""
    records: list[dict[str, object]] = [
        {"t": "op", "seq": 1, "kind": "write", "target": "v", "off": 100, "len": 700, "seed": 7},
        {"t": "done", "seq": 1},
        {"t": "flush", "seq": 2},
        {"t": "durable", "seq": 2},
        {"t": "op", "seq": 3, "kind": "write", "target": "v", "off": 600, "len": 50, "seed": 8},
        {"t": "fork", "seq": 4, "kind": "snapshot", "source": "v", "name": "v@s"},
        {"t": "op", "seq": 5, "kind": "discard", "target": "v", "off": 0, "len": 4096},
        {"t": "done", "seq": 5},
    ]
    history = History({"v": bytes(4096)}, records)
    first = crashkit.payload(7, 700)
    second = crashkit.payload(8, 50)

    flushed = bytearray(4096)
    flushed[100:800] = first
    with_second = bytearray(flushed)
    with_second[600:650] = second
    # every legal outcome passes: the unflushed write, snapshot and discard may each be lost
    assert not history.verify(Fixed({"v": bytes(flushed)}))
    assert not history.verify(Fixed({"v": bytes(with_second), "v@s": bytes(with_second)}))
    assert not history.verify(Fixed({"v": bytes(4096), "v@s": bytes(flushed)}))
    # tears are legal only between pieces (sectors split at operation boundaries)
    torn = bytearray(flushed)
    torn[600:612] = second[:12]
    assert history.verify(Fixed({"v": bytes(torn)})), "a tear inside one piece must fail"
    # losing the flushed write fails, so does data that was never written
    assert history.verify(Fixed({"v": bytes(4096), "v@s": bytes(4096)}))
    stray = bytearray(flushed)
    stray[3000] = 1
    assert history.verify(Fixed({"v": bytes(stray)}))
    # once the snapshot's creation is flushed it must exist
    records += [{"t": "done", "seq": 3}, {"t": "done", "seq": 4}]
    records.append({"t": "flush", "seq": 6})
    records.append({"t": "durable", "seq": 6})
    history = History({"v": bytes(4096)}, records)
    assert history.verify(Fixed({"v": bytes(4096)}))
    assert not history.verify(Fixed({"v": bytes(4096), "v@s": bytes(with_second)}))


def test_checker_fua_and_committed_snapshots() -> None:
    """A completed FUA write is durable without a flush; a committed snapshot makes every
    write completed before it durable, in the snapshot and in the volume."""
    records: list[dict[str, object]] = [
        {"t": "op", "seq": 1, "kind": "write", "target": "v", "off": 0, "len": 512, "seed": 1},
        {"t": "done", "seq": 1},
        {"t": "op", "seq": 2, "kind": "write", "target": "v", "off": 512, "len": 512, "seed": 2,
         "fua": True},
        {"t": "done", "seq": 2},
        {"t": "fork", "seq": 3, "kind": "snapshot", "source": "v", "name": "v@s"},
        {"t": "committed", "seq": 3},
        {"t": "delete", "seq": 4, "name": "v@old"},
    ]  # fmt: skip
    history = History({"v": bytes(2048), "v@old": bytes(2048)}, records)
    fua_only = bytearray(2048)
    fua_only[512:1024] = crashkit.payload(2, 512)
    both = bytearray(fua_only)
    both[0:512] = crashkit.payload(1, 512)
    contents = {"v": bytes(both), "v@s": bytes(both)}
    assert not history.verify(Fixed(contents))
    assert not history.verify(Fixed({**contents, "v@old": bytes(2048)}))
    # the write completed before the committed snapshot may not be lost: not from the volume,
    # not from the snapshot, not from both
    lost = bytes(fua_only)
    assert history.verify(Fixed({"v": lost, "v@s": lost})), "write before a snapshot lost"
    assert history.verify(Fixed({"v": bytes(both), "v@s": lost})), "snapshot lost a write"
    assert history.verify(Fixed({"v": lost, "v@s": bytes(both)})), "volume lost a write"
    assert history.verify(Fixed({"v": bytes(both)})), "a committed snapshot went missing"
    assert history.verify(Fixed({"v": bytes(2048), "v@s": bytes(2048)})), "FUA write lost"
    # the deletion was not committed: the old snapshot may stay, but must keep its data
    assert history.verify(Fixed({**contents, "v@old": bytes(both)}))


def test_checker_holds_targets_to_each_other() -> None:
    """A snapshot that exists is where its volume continues from, even when its creation was
    not committed: on every piece written by nobody since, the volume, the snapshot and a
    clone of it read the same; an unflushed write after it may or may not be there."""
    records: list[dict[str, object]] = [
        {"t": "op", "seq": 1, "kind": "write", "target": "v", "off": 0, "len": 1024, "seed": 1},
        {"t": "done", "seq": 1},
        {"t": "fork", "seq": 2, "kind": "snapshot", "source": "v", "name": "v@s"},
        {"t": "committed", "seq": 2},
        {"t": "fork", "seq": 3, "kind": "clone", "source": "v@s", "name": "c"},
        {"t": "op", "seq": 4, "kind": "write", "target": "v", "off": 0, "len": 1024, "seed": 4},
        {"t": "done", "seq": 4},
        {"t": "fork", "seq": 5, "kind": "snapshot", "source": "v", "name": "v@t"},
        {"t": "op", "seq": 6, "kind": "write", "target": "v", "off": 512, "len": 512, "seed": 6},
    ]
    history = History({"v": bytes(2048)}, records)
    first = crashkit.payload(1, 1024) + bytes(1024)
    second = crashkit.payload(4, 1024) + bytes(1024)
    third = second[:512] + crashkit.payload(6, 512) + bytes(1024)
    assert not history.verify(Fixed({"v": second, "v@s": first, "c": first, "v@t": second}))
    assert not history.verify(Fixed({"v": third, "v@s": first, "c": first, "v@t": second}))
    assert not history.verify(Fixed({"v": first, "v@s": first, "c": first}))  # no v@t: seq 4 lost
    assert not history.verify(Fixed({"v": second, "v@s": first}))  # the clone did not happen
    # each alone could fit its own history, not together
    assert history.verify(Fixed({"v": second, "v@s": first, "v@t": first})), "v@t is not v"
    assert history.verify(Fixed({"v": first, "v@s": first, "v@t": second})), "v is not v@t"
    assert history.verify(Fixed({"v": second, "v@s": first, "c": bytes(2048)})), "c is not v@s"
    # once v@t is committed, seq 4 is durable: it may not be lost with v@t
    records.append({"t": "committed", "seq": 5})
    history = History({"v": bytes(2048)}, records)
    assert history.verify(Fixed({"v": first, "v@s": first, "c": first})), "v@t went missing"


def test_checker_management_points_cover_every_target() -> None:
    """A committed management operation makes durable every operation completed before it
    was issued, on any target and from any stream; a flush only those of its own stream."""
    records: list[dict[str, object]] = [
        {"t": "op", "seq": 1, "kind": "write", "target": "a", "off": 0, "len": 512, "seed": 1,
         "stream": "x"},
        {"t": "op", "seq": 2, "kind": "write", "target": "b", "off": 0, "len": 512, "seed": 2,
         "stream": "y"},
        {"t": "done", "seq": 2, "stream": "y"},
        {"t": "flush", "seq": 3, "stream": "x"},
        {"t": "done", "seq": 1, "stream": "x"},  # completed after the flush was issued
        {"t": "durable", "seq": 3, "stream": "x"},
    ]  # fmt: skip
    zeros = bytes(1024)
    a = crashkit.payload(1, 512) + bytes(512)
    b = crashkit.payload(2, 512) + bytes(512)
    history = History({"a": zeros, "b": zeros}, records)
    assert not history.verify(Fixed({"a": zeros, "b": zeros}))  # neither flushed by seq 3
    records += [
        {"t": "extend", "seq": 4, "target": "a", "size": 1024, "stream": "x"},
        {"t": "committed", "seq": 4, "stream": "x"},
    ]
    history = History({"a": zeros, "b": zeros}, records)
    assert not history.verify(Fixed({"a": a, "b": b}))
    assert history.verify(Fixed({"a": zeros, "b": b})), "lost a write done before an extend"
    assert history.verify(Fixed({"a": a, "b": zeros})), "lost a write of another stream"


def test_checker_streams_concurrent_with_a_snapshot() -> None:
    """A write of another stream that completed before a committed snapshot was issued is
    in it; one still running when it was issued, or issued before it completed, may be in
    it or not, but the volume has it once it is durable."""
    records: list[dict[str, object]] = [
        {"t": "op", "seq": 1, "kind": "write", "target": "v", "off": 0, "len": 512, "seed": 1,
         "stream": "b"},
        {"t": "done", "seq": 1, "stream": "b"},
        {"t": "op", "seq": 2, "kind": "write", "target": "v", "off": 512, "len": 512, "seed": 2,
         "stream": "b"},
        {"t": "fork", "seq": 3, "kind": "snapshot", "source": "v", "name": "v@s", "stream": "a"},
        {"t": "done", "seq": 2, "stream": "b"},
        {"t": "op", "seq": 4, "kind": "write", "target": "v", "off": 1024, "len": 512,
         "seed": 4, "stream": "b"},
        {"t": "done", "seq": 4, "stream": "b"},
        {"t": "committed", "seq": 3, "stream": "a"},
        {"t": "flush", "seq": 5, "stream": "b"},
        {"t": "durable", "seq": 5, "stream": "b"},
    ]  # fmt: skip
    history = History({"v": bytes(2048)}, records)
    one, two, four = (crashkit.payload(seed, 512) for seed in (1, 2, 4))
    volume = one + two + four + bytes(512)
    for snapshot in (one + bytes(1536), one + two + bytes(1024), volume):
        assert not history.verify(Fixed({"v": volume, "v@s": snapshot})), snapshot[:1024]
    assert history.verify(Fixed({"v": volume, "v@s": bytes(2048)})), "seq 1 not in v@s"
    assert history.verify(Fixed({"v": one + bytes(1536), "v@s": one + bytes(1536)})), "v lost"


DAEMON_ROUNDS = 5
TORTURE_ROUNDS = 5
ROUND_TIMEOUT = 40.0
"""Seconds a daemon round may take before its kill; past that the round fails as a stall."""


def _need_nbd() -> Any:
    """The libnbd module; missing, it skips the test, or fails it in CI."""
    from prereq import require_module  # here: this file also runs as a program

    return require_module("nbd")


class DaemonRound:
    """``storvisor serve`` on the Home, NBD connections and vhost-user front-ends to its
    exports, and the means to SIGKILL it: ``kill`` now, ``kill_after`` a delay, and
    ``watchdog``, which kills it when a round stalls and says what was in flight."""

    def __init__(self, home: Path, log_dir: Path) -> None:
        self.home = home
        storvisor = str(Path(sys.executable).with_name("storvisor"))
        self.stderr = open(log_dir / "daemon.err", "ab")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [storvisor, "--home", str(home), "serve"],
            stdout=subprocess.DEVNULL,
            stderr=self.stderr,
        )
        self.killed = threading.Event()
        self.stalled: str | None = None
        self._kill_lock = threading.Lock()
        self.handles: list[Any] = []
        self.frontends: list[Any] = []
        self.planes: list[int] = []
        deadline = time.monotonic() + 30
        client = None
        while client is None:
            assert self.proc.poll() is None, "the daemon exited at start"
            assert time.monotonic() < deadline, "the daemon did not start in 30 s"
            time.sleep(0.05)
            client = Client.for_home(home)
        self.api = client

    def connect(self, volume: str) -> Any:
        nbd = _need_nbd()
        exports = {e.spec.name: e for e in self.api.exports()}
        info = exports.get(volume) or self.api.export_nbd("p", volume, name=volume)
        handle = nbd.NBD()
        handle.connect_uri(info.uris[0])
        self.handles.append(handle)
        return handle

    def disconnect(self, volume: str, handle: Any) -> None:
        """Close ``handle`` and remove the volume's NBD export."""
        if handle is not None:
            handle.shutdown()
        if any(e.spec.name == volume for e in self.api.exports()):
            self.api.remove_export(volume)

    def read_back(self, target: str) -> bytes:
        """The whole content of ``target`` (``VOL`` or ``VOL@SNAP``) read over NBD through
        a temporary export (its data planes)."""
        nbd = _need_nbd()
        volume, _, snapshot = target.partition("@")
        name = f"check-{target}"
        info = self.api.export_nbd("p", volume, snapshot or None, name=name, read_only=True)
        try:
            handle = nbd.NBD()
            handle.connect_uri(info.uris[0])
            size = handle.get_size()
            data = b"".join(
                handle.pread(min(1 << 20, size - pos), pos) for pos in range(0, size, 1 << 20)
            )
            handle.shutdown()
        finally:
            self.api.remove_export(name)
        return data

    def connect_vhost(self, volume: str) -> Any:
        from storvisor.testing.vhost_frontend import VhostUserFrontend

        exports = {e.spec.name: e for e in self.api.exports()}
        name = f"vhost-user-blk:p/{volume}"
        if name in exports:
            sock = exports[name].uris[0]
        else:
            sock = str(self.home.parent / f"{volume}.sock")
            self.api.export_vhost_user_blk("p", volume, sock, queues=2)
        fe = VhostUserFrontend(sock, timeout=3)
        fe.setup()
        self.frontends.append(fe)
        return fe.blk

    def disconnect_vhost(self, volume: str, blk: Any) -> None:
        """Close the front-end whose driver ``connect_vhost`` returned as ``blk`` and remove
        the volume's vhost-user-blk export."""
        if blk is not None:
            fe = next(fe for fe in self.frontends if fe.blk is blk)
            fe.close()
            self.frontends.remove(fe)
        name = f"vhost-user-blk:p/{volume}"
        if any(e.spec.name == name for e in self.api.exports()):
            self.api.remove_export(name)

    def kill(self) -> None:
        """SIGKILL the daemon now (stopped first, so that its data planes can be listed
        without delaying the moment); ``killed`` is set before it happens."""
        with self._kill_lock:
            if self.killed.is_set():
                return
            self.killed.set()
            self.proc.send_signal(signal.SIGSTOP)
            self.planes = [c.pid for c in procs.children(self.proc.pid)]  # to follow them
            self.proc.send_signal(signal.SIGKILL)

    def kill_after(self, delay: float) -> threading.Timer:
        timer = threading.Timer(delay, self.kill)
        timer.start()
        return timer

    def watchdog(self, timeout: float, log: crashkit.ListLog) -> threading.Timer:
        """A timer that, unless cancelled within ``timeout`` s, records in ``stalled`` what
        was in flight and kills the daemon (so that the round ends, and fails)."""

        def stall() -> None:
            if not self.killed.is_set():
                self.stalled = (
                    f"the round stalled: no kill within {timeout} s; "
                    f"in flight: {log.in_flight() or 'nothing'}"
                )
                self.kill()

        timer = threading.Timer(timeout, stall)
        timer.start()
        return timer

    def stderr_tail(self) -> str:
        if not self.stderr.closed:
            self.stderr.flush()
        with open(self.stderr.name, "rb") as f:
            return "daemon stderr:\n" + f.read()[-4000:].decode(errors="replace")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)
        for fe in self.frontends:
            with contextlib.suppress(Exception):
                fe.close()
        self.handles.clear()  # a libnbd handle closes when dropped
        self.stderr.close()


class Killer:
    """Decides when a round's daemon dies; called with every record the workload logs.

    Either ``delay`` seconds after the log holds ``count`` records (a random moment), or
    ``delay`` after the ``managed``-th management operation returned (its ``committed``
    record: the workload logs it the moment the call returns)."""

    def __init__(
        self,
        daemon: DaemonRound,
        delay: float,
        *,
        count: int | None = None,
        managed: int | None = None,
    ) -> None:
        self.daemon = daemon
        self.delay = delay
        self.count = count
        self.managed = managed
        self.seen = 0
        self.managed_seen = 0
        self.moment: dict[str, object] | None = None
        self.timer: threading.Timer | None = None
        self._lock = threading.Lock()

    def __call__(self, record: Mapping[str, object]) -> None:
        with self._lock:
            if self.timer is not None:
                return
            self.seen += 1
            self.managed_seen += record["t"] == "committed"
            if (self.count is not None and self.seen >= self.count) or (
                self.managed is not None and self.managed_seen >= self.managed
            ):
                self.moment = dict(record)
                self.timer = self.daemon.kill_after(self.delay)

    def __str__(self) -> str:
        what = (
            f"after {self.count} records"
            if self.managed is None
            else (f"after management operation #{self.managed} returned")
        )
        return f"killed {self.delay * 1000:.1f} ms {what} (at {self.moment})"


@dataclass(frozen=True)
class Stream:
    """One workload thread of a daemon round: the volumes whose names start with ``name``
    (all of them when None), through the writer ``make_writer`` makes."""

    name: str | None
    make_writer: Callable[[DaemonRound], crashkit.Writer]
    aligned: bool

    def owns(self, volume: str) -> bool:
        return self.name is None or volume.partition("@")[0].startswith(self.name)


def _nbd_stream(name: str | None) -> Stream:
    return Stream(
        name,
        lambda d: crashkit.NbdWriter(d.connect, d.api, "p", disconnect=d.disconnect),
        aligned=False,
    )


def _vhost_stream(name: str | None) -> Stream:
    return Stream(
        name,
        lambda d: crashkit.VhostWriter(d.connect_vhost, d.api, "p", disconnect=d.disconnect_vhost),
        aligned=True,
    )


def test_daemon_crash_rounds(tmp_path: Path) -> None:
    """The same check with the daemon as the victim: writes over NBD (served by the daemon's
    data-plane processes), snapshots and clones through the API, SIGKILL of
    ``storvisor serve`` at a random moment or right after a management operation returned."""
    _need_nbd()
    _daemon_rounds(tmp_path, "daemon", [_nbd_stream(None)], DAEMON_ROUNDS, max_logged=2500)


def test_daemon_crash_rounds_over_vhost_user(tmp_path: Path) -> None:
    """The daemon as the victim again, with the data over vhost-user-blk exports: reads and
    in-place writes run in the exports' data-plane processes (two queues: two of them),
    allocations, discards and flushes in the daemon; snapshots, clones, flattens and extends
    through the API while the volumes are exported. SIGKILL of ``storvisor serve`` takes its
    data planes down with it."""
    _daemon_rounds(
        tmp_path, "daemon over vhost-user", [_vhost_stream(None)], DAEMON_ROUNDS, max_logged=1500
    )


@pytest.mark.slow
@pytest.mark.parametrize("exports", [False, True], ids=["snapshots", "exports"])
def test_daemon_kill9_torture(tmp_path: Path, exports: bool) -> None:
    """kill -9 torture: two workloads at once against one daemon, one over NBD (volumes
    ``a*``), one over vhost-user-blk (volumes ``b*``), both through data planes, with
    random writes of up to 256 KiB, trims, write-zeroes, flushes, FUA and management
    operations: snapshot create and delete, clone, extend, flatten; with ``exports`` also
    export removal (and creation, at the next write), and rollback and volume delete, which
    need the export removed first. Every other round kills the daemon a few milliseconds
    after a management operation returned, the others at a random moment. After each kill:
    fsck clean, every block of every volume and snapshot as the model allows, and the same
    read over NBD through the restarted daemon."""
    _need_nbd()
    _daemon_rounds(
        tmp_path,
        f"kill-9 torture ({'with' if exports else 'without'} export removal)",
        [_nbd_stream("a"), _vhost_stream("b")],
        TORTURE_ROUNDS,
        max_logged=3000,
        torture=True,
        exports=exports,
    )


def test_daemon_crash_rounds_with_a_writeback_cache(tmp_path: Path) -> None:
    """kill -9 of the daemon serving a pool behind a writeback cache (``engine/cache.py``)
    over NBD and vhost-user-blk at once (their data planes read cached lines and write
    open-epoch lines in the cache device themselves, and send the rest to the daemon,
    where the cache is), with snapshots, clones, flattens and extends: every
    flushed write survives, fsck is clean, and the restarted daemon reads the same."""
    _need_nbd()
    _daemon_rounds(
        tmp_path,
        "daemon with a writeback cache",
        [_nbd_stream("a"), _vhost_stream("b")],
        DAEMON_ROUNDS,
        max_logged=1500,
        torture=True,
        cache=True,
    )


def test_daemon_export_removal_is_durable(tmp_path: Path) -> None:
    """Removing an export is a management operation: when it returns, every write
    acknowledged before it was issued survives a SIGKILL of the daemon, on any volume."""
    _need_nbd()
    home_dir = tmp_path / "home"
    home = Home(home_dir)
    home.create_pool("p", [BackingSpec(str(tmp_path / "b0.img"), size=POOL_BYTES)], 16384)
    for name in ("x", "y"):
        home.pool("p").create_volume(name, VOLUME)
    home.close()
    daemon = DaemonRound(home_dir, tmp_path)
    try:
        x, y = daemon.connect("x"), daemon.connect("y")
        x.pwrite(crashkit.payload(1, 65536), 0)
        y.pwrite(crashkit.payload(2, 4096), 8192)
        daemon.disconnect("y", y)
        daemon.kill()
    finally:
        daemon.close()
    records: list[dict[str, object]] = [
        {"t": "op", "seq": 1, "kind": "write", "target": "x", "off": 0, "len": 65536, "seed": 1},
        {"t": "done", "seq": 1},
        {"t": "op", "seq": 2, "kind": "write", "target": "y", "off": 8192, "len": 4096, "seed": 2},
        {"t": "done", "seq": 2},
        {"t": "detach", "seq": 3, "target": "y"},
        {"t": "committed", "seq": 3},
    ]
    history = History({"x": bytes(VOLUME), "y": bytes(VOLUME)}, records)
    crashkit.check_home(home_dir, history, "killed right after an export removal returned")


def _daemon_rounds(
    tmp_path: Path,
    what: str,
    streams: list[Stream],
    rounds: int,
    *,
    max_logged: int,
    torture: bool = False,
    exports: bool = False,
    cache: bool = False,
) -> None:
    """Rounds of one workload per stream against ``storvisor serve``, killed at a random
    moment or right after a management operation; after each, fsck is clean and the
    history verifies. A round that stalls, or a workload that fails before the kill, fails
    the test naming what was in flight."""
    seed = int(os.environ.get("STORVISOR_CRASH_SEED", random.randrange(1 << 32)))
    rng = random.Random(seed)
    home_dir = tmp_path / "home"
    home = Home(home_dir)
    home.create_pool("p", [BackingSpec(str(tmp_path / "b0.img"), size=POOL_BYTES)], 16384)
    if cache:  # small: lines are evicted, copied and destaged all the time
        spec = CacheSpec(str(tmp_path / "cache.img"), 4 << 20)
        home.pool("p").set_cache(spec, CacheMode.WRITEBACK)
    size = 2 * VOLUME if torture else VOLUME
    known: dict[str, bytes] = {}
    for stream in streams:
        name = stream.name or "v"
        home.pool("p").create_volume(name, size)
        known[name] = bytes(size)
    home.close()

    flushed_rounds = 0
    for round_ in range(rounds):
        where = f"{what}, seed {seed} (STORVISOR_CRASH_SEED), round {round_}"
        snapshot_ops = torture or round_ % 2 == 1
        after_management = snapshot_ops and (round_ % 2 == 1 if torture else round_ % 4 == 3)
        clones = {v.name: v.origin for v in _volume_infos(home_dir) if v.origin is not None}
        flush_rate = rng.choice([0.1, 0.02, 0.005] if torture else [0.1, 0.02])
        workloads = [
            crashkit.Workload(
                volumes={n: len(d) for n, d in known.items() if "@" not in n and s.owns(n)},
                snapshots={n: len(d) for n, d in known.items() if "@" in n and s.owns(n)},
                clones={n: o for n, o in clones.items() if s.owns(n)},
                ops=100_000,
                discards=True,
                snapshot_ops=snapshot_ops,
                extends=True,
                rollbacks=exports,
                detaches=exports,
                volume_deletes=exports,
                management_rate=0.05 if torture else 0.02,
                flush_rate=flush_rate,
                max_size=4 * VOLUME if torture else 2 * VOLUME,
                max_io=256 * 1024 if torture else 64 * 1024,
                name_prefix=f"{s.name or ''}r{round_}",
                aligned=s.aligned,
            )
            for s in streams
        ]
        daemon = DaemonRound(home_dir, tmp_path)
        if torture:  # what the restarted daemon serves is what the engine read
            try:
                for name in sorted(known):
                    data = daemon.read_back(name)
                    at = _first_difference(data, known[name])
                    assert at is None, (
                        f"{where}: {name} read over NBD from the restarted daemon differs "
                        f"from its content in the engine at byte {at} (sizes {len(data)}, "
                        f"{len(known[name])})"
                    )
            except BaseException:
                daemon.close()
                raise
        if after_management:
            killer = Killer(daemon, rng.uniform(0, 0.003), managed=rng.randrange(1, 6))
        else:
            killer = Killer(daemon, rng.uniform(0, 0.02), count=rng.randrange(10, max_logged))
        log = crashkit.ListLog(on_append=killer)
        seqs = crashkit.Sequencer()
        failures: list[str] = []

        threads = [
            threading.Thread(
                target=_run_stream,
                args=(daemon, s, w, log, seqs, rng.randrange(1 << 32), failures),
                name=s.name or "v",
            )
            for s, w in zip(streams, workloads, strict=True)
        ]
        watchdog = daemon.watchdog(ROUND_TIMEOUT, log)
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(ROUND_TIMEOUT + 20)
            hung = [t.name for t in threads if t.is_alive()]
        finally:
            watchdog.cancel()
            if killer.timer is not None:
                killer.timer.join()
            daemon.close()
        tail = daemon.stderr_tail()
        assert not failures, f"{where}: {'; '.join(failures)}\n{tail}"
        assert daemon.stalled is None, f"{where}: {daemon.stalled}\n{tail}"
        assert not hung, f"{where}: workload {hung} hung after the kill; in flight: " + str(
            log.in_flight()
        )
        assert daemon.killed.is_set(), f"{where}: the round ended without a kill"
        try:  # no data plane may write after the check began
            procs.wait_gone(daemon.planes)
        except TimeoutError as e:
            raise AssertionError(f"{where}: a data plane outlived its daemon: {e}") from e
        history = History(known, log.records)
        if history.durable:
            flushed_rounds += 1
        saved = (
            tmp_path / f"round{round_}.log"
        )  # for a post-mortem: the log and what it starts from
        saved.write_text("\n".join(json.dumps(r) for r in log.records) + "\n")
        (tmp_path / f"round{round_}.known").mkdir()
        for name, data in known.items():
            (tmp_path / f"round{round_}.known" / name).write_bytes(data)
        known = crashkit.check_home(home_dir, history, f"{where}, {killer}; log in {saved}")
    assert flushed_rounds >= 1, f"seed {seed}: no round reached a flush"


def _run_stream(
    daemon: DaemonRound,
    stream: Stream,
    workload: crashkit.Workload,
    log: crashkit.ListLog,
    seqs: crashkit.Sequencer,
    seed: int,
    failures: list[str],
) -> None:
    """Run ``stream``'s workload against ``daemon`` until the kill ends it; anything else
    (an error before the kill, the end of the workload) goes into ``failures``."""
    label = stream.name or "workload"
    try:
        writer = stream.make_writer(daemon)
        crashkit.run_workload(
            writer, log, random.Random(seed), workload, seqs=seqs, stream=stream.name
        )
    except Exception as e:
        if not daemon.killed.is_set():
            failures.append(f"{label} failed before the kill: {e!r}")
            daemon.kill()  # ends the other streams too
        return
    failures.append(f"{label} ended before the kill")
    daemon.kill()


def _first_difference(a: bytes, b: bytes) -> int | None:
    """The first offset where ``a`` and ``b`` differ (None if they are equal)."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))


def _volume_infos(home_dir: Path) -> list[VolumeInfo]:
    home = Home(home_dir)
    try:
        return home.pool("p").volumes()
    finally:
        home.close()


def test_checker_rollback() -> None:
    """After a committed rollback the volume reads as the snapshot (plus later writes); an
    uncommitted one may or may not have happened, but not half of it."""
    records: list[dict[str, object]] = [
        {"t": "op", "seq": 1, "kind": "write", "target": "v", "off": 0, "len": 1024, "seed": 1},
        {"t": "done", "seq": 1},
        {"t": "fork", "seq": 2, "kind": "snapshot", "source": "v", "name": "v@s"},
        {"t": "committed", "seq": 2},
        {"t": "op", "seq": 3, "kind": "write", "target": "v", "off": 0, "len": 1024, "seed": 3},
        {"t": "done", "seq": 3},
        {"t": "flush", "seq": 4},
        {"t": "durable", "seq": 4},
        {"t": "rollback", "seq": 5, "target": "v", "source": "v@s"},
    ]
    old = crashkit.payload(1, 1024) + bytes(1024)
    new = crashkit.payload(3, 1024) + bytes(1024)
    history = History({"v": bytes(2048)}, records)
    assert not history.verify(Fixed({"v": new, "v@s": old}))  # rollback lost
    assert not history.verify(Fixed({"v": old, "v@s": old}))  # rollback done
    half = old[:512] + new[512:]
    assert history.verify(Fixed({"v": half, "v@s": old})), "half a rollback must fail"
    records.append({"t": "committed", "seq": 5})
    history = History({"v": bytes(2048)}, records)
    assert history.verify(Fixed({"v": new, "v@s": old})), "a committed rollback went missing"
    assert not history.verify(Fixed({"v": old, "v@s": old}))


def test_checker_extend() -> None:
    """An extend adds zeros; one that may not have happened allows either size."""
    records: list[dict[str, object]] = [
        {"t": "extend", "seq": 1, "target": "v", "size": 2048},
        {"t": "op", "seq": 2, "kind": "write", "target": "v", "off": 1000, "len": 1000, "seed": 2},
    ]
    written = bytearray(2048)
    written[1000:2000] = crashkit.payload(2, 1000)
    history = History({"v": bytes(1024)}, records)
    assert not history.verify(Fixed({"v": bytes(1024)}))
    assert not history.verify(Fixed({"v": bytes(2048)}))
    assert not history.verify(Fixed({"v": bytes(written)}))
    # the extend lost, the part of the write inside the old size kept: legal
    assert not history.verify(Fixed({"v": bytes(written[:1024])}))
    junk = bytearray(2048)
    junk[1500] = 1
    assert history.verify(Fixed({"v": bytes(junk)})), "data nobody wrote in the new space"
    assert history.verify(Fixed({"v": bytes(4096)})), "a size nobody asked for"
    records.append({"t": "committed", "seq": 1})
    history = History({"v": bytes(1024)}, records)
    assert history.verify(Fixed({"v": bytes(1024)})), "a committed extend went missing"


# -- management operations killed at each internal step -----------------------------------
#
# A program (this file run as a script, ``_step_program``) opens the pool, logs a flushed
# write and a series of completed but unflushed ones (allocating, copy-on-write and in
# place), then holds one step of the engine open, starts a management operation, waits until
# the operation's thread is stopped right at that step and SIGKILLs itself. The steps, in
# the order an operation meets them:
#
#   pool-lock   the pool's lock is held: the operation has not started
#   freeze      an in-place write holds the volume's gate: a snapshot waits to change owners
#   commit      the commit lock is held: metadata changed in memory, nothing synced
#   catalog     another connection holds the catalog's write lock: data synced, the
#               transaction not begun
#   recycle     an in-place write holds a gate the commit must freeze before freed clusters
#               are reused: the catalog is committed, the operation has not returned
#
# A step is recognised by the innermost engine function the operation's thread is in (the
# engine has no hook there). After the kill: fsck clean, and the history must verify either
# without the operation (every step before the catalog commit) or with it, committed,
# together with every write completed before it (the step after).

STEPS: dict[str, tuple[str, ...]] = {
    "snapshot": ("pool-lock", "freeze", "commit", "catalog"),
    "clone": ("pool-lock", "commit", "catalog"),
    "delete_snapshot": ("pool-lock", "commit", "catalog", "recycle"),
    "rollback": ("pool-lock", "commit", "catalog", "recycle"),
    "extend": ("pool-lock", "commit", "catalog"),
    "flatten": ("pool-lock", "commit", "catalog"),
    "delete_volume": ("pool-lock", "commit", "catalog", "recycle"),
}
STEP_FRAMES = {
    "pool-lock": ("open_volume", "create_snapshot", "_volume_frozen", "clone",
                  "delete_snapshot", "rollback", "extend_volume", "delete_volume"),
    "freeze": ("freeze",),
    "commit": ("_commit",),
    "catalog": ("_transaction",),
    "recycle": ("freeze",),
}  # fmt: skip
COMMITTED_STEPS = {"recycle"}
STEP_VOLUME = 256 << 10
STEP_CLUSTER = 16384


def _step_setup(home_dir: Path, tmp_path: Path) -> dict[str, bytes]:
    """A pool with ``v`` (written), its snapshots ``s0`` (cloned as ``c``) and ``s1``, and
    a volume ``d`` with a snapshot; returns every target's content."""
    home = Home(home_dir)
    try:
        home.create_pool("p", [BackingSpec(str(tmp_path / "b.img"), 32 << 20)], STEP_CLUSTER)
        pool = home.pool("p")
        for name in ("v", "d"):
            pool.create_volume(name, STEP_VOLUME)
        v, d = pool.open_volume("v"), pool.open_volume("d")
        v.write(0, crashkit.payload(1, STEP_VOLUME))
        d.write(0, crashkit.payload(2, STEP_VOLUME // 2))
        pool.create_snapshot("v", "s0")
        pool.create_snapshot("d", "s")
        v.write(STEP_CLUSTER, crashkit.payload(3, 3 * STEP_CLUSTER))
        d.write(0, crashkit.payload(4, STEP_CLUSTER))
        pool.create_snapshot("v", "s1")
        v.write(0, crashkit.payload(5, 4 * STEP_CLUSTER))  # shadows s1's clusters
        v.close()
        d.close()
        pool.clone("v", "s0", "c")
        pool.flush()
        reader = crashkit.EngineReader(pool)
        targets = ["v", "v@s0", "v@s1", "c", "d", "d@s"]
        return {t: content for t in targets if (content := reader.read(t)) is not None}
    finally:
        home.close()


@pytest.mark.parametrize(
    ("op", "step"), [(op, step) for op, steps in STEPS.items() for step in steps]
)
def test_management_killed_at_each_step(tmp_path: Path, op: str, step: str) -> None:
    """A management operation killed while held at one internal step either did not happen
    or happened whole, with every write completed before it; fsck stays clean."""
    home_dir = tmp_path / "home"
    known = _step_setup(home_dir, tmp_path)
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, __file__, str(home_dir), op, step, str(write_fd)],
        pass_fds=[write_fd],
        stderr=subprocess.PIPE,
    )
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        lines = pipe.readlines()
    _, stderr = proc.communicate(timeout=60)
    where = f"{op} killed at {step}"
    assert proc.returncode == -signal.SIGKILL, (
        f"{where}: the program ended with {proc.returncode}: {stderr.decode(errors='replace')}"
    )
    records = crashkit.parse_log(lines)
    issued = records[-1]
    assert issued["t"] in ("fork", "delete", "rollback", "extend", "flatten"), records[-1]
    happened = step in COMMITTED_STEPS
    if happened:  # committed: then also with every write completed before it
        records.append({"t": "committed", "seq": issued["seq"]})
    crashkit.check_home(home_dir, History(known, records), where)
    home = Home(home_dir)
    try:
        visible = _op_visible(home.pool("p"), op, known)
    finally:
        home.close()
    assert visible == happened, (
        f"{where}: the operation {'did not happen' if happened else 'happened'} "
        f"although its catalog commit {'was' if happened else 'was not'} reached"
    )


def _op_visible(pool: Any, op: str, known: Mapping[str, bytes]) -> bool:
    """Whether the effect of ``_step_program``'s operation ``op`` is in ``pool``."""
    volumes = {v.name: v for v in pool.volumes()}
    snapshots = {s.name for s in pool.snapshots("v")}
    if op == "snapshot":
        return "new" in snapshots
    if op == "clone":
        return "new" in volumes
    if op == "delete_snapshot":
        return "s1" not in snapshots
    if op == "rollback":
        return bool(crashkit.EngineReader(pool).read("v") == known["v@s0"])
    if op == "extend":
        return bool(volumes["v"].size == 2 * STEP_VOLUME)
    if op == "flatten":
        return volumes["c"].origin is None
    assert op == "delete_volume", op
    return "d" not in volumes


def _step_program(home_dir: str, op: str, step: str, log_fd: int) -> None:
    """The program of ``test_management_killed_at_each_step`` (see above)."""
    import sqlite3

    from storvisor.engine.pool import Pool

    log = crashkit.FdLog(log_fd)
    home = Home(home_dir)
    pool = home.pool("p")
    assert isinstance(pool, Pool)
    writer = crashkit.EngineWriter(pool)
    seq = iter(range(1, 1000))
    for offset, length, fua, flush in (
        (0, 4096, False, True),  # durable
        (STEP_CLUSTER + 100, 5000, False, False),  # in place (v owns it since s1)
        (6 * STEP_CLUSTER, 3 * STEP_CLUSTER, False, False),  # copy-on-write from s1
        (12 * STEP_CLUSTER + 512, 1024, False, False),  # allocating, zero-filled
    ):
        s = next(seq)
        wseed = 100 + s
        log.append({"t": "op", "seq": s, "kind": "write", "target": "v", "off": offset,
                    "len": length, "seed": wseed, "fua": fua})  # fmt: skip
        writer.write("v", offset, crashkit.payload(wseed, length), fua=fua)
        log.append({"t": "done", "seq": s})
        if flush:
            s = next(seq)
            log.append({"t": "flush", "seq": s})
            writer.flush()
            log.append({"t": "durable", "seq": s})
    s = next(seq)
    calls: dict[str, tuple[dict[str, object], Callable[[], object]]] = {
        "snapshot": (
            {"t": "fork", "kind": "snapshot", "source": "v", "name": "v@new"},
            lambda: writer.snapshot("v", "new"),
        ),
        "clone": (
            {"t": "fork", "kind": "clone", "source": "v@s1", "name": "new"},
            lambda: writer.clone("v", "s1", "new"),
        ),
        "delete_snapshot": (
            {"t": "delete", "name": "v@s1"},
            lambda: writer.delete_snapshot("v", "s1"),
        ),
        "rollback": (
            {"t": "rollback", "target": "v", "source": "v@s0"},
            lambda: pool.rollback("v", "s0"),
        ),
        "extend": (
            {"t": "extend", "target": "v", "size": 2 * STEP_VOLUME},
            lambda: writer.extend("v", 2 * STEP_VOLUME),
        ),
        "flatten": ({"t": "flatten", "name": "c"}, lambda: writer.flatten("c")),
        "delete_volume": ({"t": "delete", "name": "d"}, lambda: writer.delete_volume("d")),
    }
    record, call = calls[op]
    if op == "rollback":
        writer.detach("v")  # a rollback needs the volume closed; the writes stay unflushed
    with contextlib.ExitStack() as held:
        if step == "pool-lock":
            held.enter_context(pool.lock)
        elif step == "freeze":
            gate = pool.open_volume("v")._state.gate
            gate.enter()
            held.callback(gate.leave)
        elif step == "commit":
            held.enter_context(pool._commit_lock)
        elif step == "catalog":
            other = sqlite3.connect(str(pool.directory / "catalog.db"), isolation_level=None)
            other.execute("BEGIN IMMEDIATE")
        elif step == "recycle":
            gate = pool.open_volume("c")._state.gate
            gate.enter()
            held.callback(gate.leave)
        log.append({**record, "seq": s})
        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        names = STEP_FRAMES[step]
        deadline = time.monotonic() + 20
        while True:
            frame = sys._current_frames().get(thread.ident or 0)
            if frame is not None and _innermost_engine_function(frame) in names:
                time.sleep(0.05)  # let it settle on the held step
                frame = sys._current_frames().get(thread.ident or 0)
                if frame is not None and _innermost_engine_function(frame) in names:
                    break
            if not thread.is_alive():
                sys.exit(f"{op} returned without stopping at {step}")
            if time.monotonic() > deadline:
                sys.exit(f"{op} never stopped at {step}")
            time.sleep(0.001)
        os.kill(os.getpid(), signal.SIGKILL)


def _innermost_engine_function(frame: Any) -> str | None:
    """The name of the innermost function of ``storvisor.engine`` on ``frame``'s stack."""
    while frame is not None:
        if "/storvisor/engine/" in frame.f_code.co_filename:
            return str(frame.f_code.co_name)
        frame = frame.f_back
    return None


if __name__ == "__main__":
    _step_program(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
