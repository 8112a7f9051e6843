"""Crash tests: SIGKILL whatever writes to a pool at random moments, then check what survived.

Each round of ``test_crash_rounds`` starts ``python -m storvisor.testing.crashkit`` on the
same Home, lets it log a random number of operations, kills it, reopens the Home in this
process, requires ``fsck`` clean and checks every volume, snapshot and clone against the
worker's log (``crashkit.History``): what was flushed reads back, what was never written reads
as zeros. What survived becomes the next round's known content, so later rounds also catch
damage to data that was already verified. ``test_daemon_crash_rounds`` does the same with
``storvisor serve`` as the victim, the workload running here over NBD and the API."""

from __future__ import annotations

import contextlib
import functools
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from storvisor.api.client import Client
from storvisor.engine.home import Home
from storvisor.engine.types import BackingSpec, VolumeInfo
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
    seed = int(os.environ.get("STORVISOR_CRASH_SEED", random.randrange(1 << 32)))
    rng = random.Random(seed)
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
        worker = crashkit.WorkerProcess(
            home_dir,
            seed=rng.randrange(1 << 32),
            round_=round_,
            ops=2000,
            flush_rate=rng.choice([0.1, 0.02, 0.005]),
            discards=round_ % 3 != 0,
            snapshots=round_ % 2 == 1,
        )
        if round_ % 5 == 4:  # while it opens the Home (and recovers from the last crash)
            time.sleep(rng.uniform(0.0, 0.4))
        else:  # after a random number of operations, then at a random moment
            assert worker.ready.wait(30), f"{where}: worker never became ready"
            count = rng.randrange(10, 3000)
            worker.wait_for(functools.partial(worker.logged, count), timeout=20)
            time.sleep(rng.uniform(0.0, 0.02))
        records = worker.kill()
        assert worker.proc.returncode == -signal.SIGKILL, f"worker died early: {worker.stderr}"
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


DAEMON_ROUNDS = 5


class DaemonRound:
    """``storvisor serve`` on the Home, NBD connections to its exports, and a timer that
    SIGKILLs the daemon."""

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
        self.handles: list[Any] = []
        self.frontends: list[Any] = []
        self.planes: list[int] = []
        deadline = time.monotonic() + 30
        client = None
        while client is None:
            assert self.proc.poll() is None, "the daemon exited at start"
            assert time.monotonic() < deadline, "the daemon did not start"
            time.sleep(0.05)
            client = Client.for_home(home)
        self.api = client

    def connect(self, volume: str) -> Any:
        nbd = pytest.importorskip("nbd")
        exports = {e.spec.name: e for e in self.api.exports()}
        info = exports.get(volume) or self.api.export_nbd("p", volume, name=volume)
        handle = nbd.NBD()
        handle.connect_uri(info.uris[0])
        self.handles.append(handle)
        return handle

    def connect_vhost(self, volume: str) -> Any:
        from storvisor.testing.vhost_frontend import VhostUserFrontend

        exports = {e.spec.name: e for e in self.api.exports()}
        name = f"vhost-user-blk:p/{volume}"
        if name not in exports:
            sock = str(self.home.parent / f"{volume}.sock")
            self.api.export_vhost_user_blk("p", volume, sock, queues=2)
        fe = VhostUserFrontend(exports[name].uris[0] if name in exports else sock, timeout=3)
        fe.setup()
        self.frontends.append(fe)
        return fe

    def kill_after(self, delay: float) -> threading.Timer:
        def kill() -> None:
            self.killed.set()
            self.planes = [c.pid for c in procs.children(self.proc.pid)]  # to follow it
            self.proc.send_signal(signal.SIGKILL)

        timer = threading.Timer(delay, kill)
        timer.start()
        return timer

    def stderr_tail(self) -> str:
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


class KillingLog(crashkit.ListLog):
    """A ``ListLog`` that calls ``kill`` (which starts a timer) once it holds ``count``
    records."""

    def __init__(self, count: int, kill: Callable[[], threading.Timer]) -> None:
        super().__init__()
        self.count = count
        self.kill = kill
        self.timer: threading.Timer | None = None

    def append(self, record: Mapping[str, object]) -> None:
        super().append(record)
        if len(self.records) == self.count:
            self.timer = self.kill()


def test_daemon_crash_rounds(tmp_path: Path) -> None:
    """The same check with the daemon as the victim: writes over NBD (served by the daemon's
    data-plane processes), snapshots and clones through the API, SIGKILL of
    ``storvisor serve`` at a random moment."""
    pytest.importorskip("nbd")
    _daemon_rounds(
        tmp_path,
        "daemon",
        lambda daemon: crashkit.NbdWriter(daemon.connect, daemon.api, "p"),
        max_logged=2500,
        aligned=False,
    )


def test_daemon_crash_rounds_over_vhost_user(tmp_path: Path) -> None:
    """The daemon as the victim again, with the data over vhost-user-blk exports: reads and
    in-place writes run in the exports' data-plane processes (two queues: two of them),
    allocations, discards and flushes in the daemon; snapshots, clones, flattens and extends
    through the API while the volumes are exported. SIGKILL of ``storvisor serve`` takes its
    data planes down with it."""
    _daemon_rounds(
        tmp_path,
        "daemon over vhost-user",
        lambda daemon: crashkit.VhostWriter(daemon.connect_vhost, daemon.api, "p"),
        max_logged=1500,
        aligned=True,
    )


def _daemon_rounds(
    tmp_path: Path,
    what: str,
    make_writer: Callable[[DaemonRound], crashkit.Writer],
    *,
    max_logged: int,
    aligned: bool,
) -> None:
    """Rounds of a workload through ``make_writer``'s writer against ``storvisor serve``,
    killed at a random moment; after each, fsck is clean and the history verifies."""
    seed = int(os.environ.get("STORVISOR_CRASH_SEED", random.randrange(1 << 32)))
    rng = random.Random(seed)
    home_dir = tmp_path / "home"
    home = Home(home_dir)
    home.create_pool("p", [BackingSpec(str(tmp_path / "b0.img"), size=POOL_BYTES)], 16384)
    home.pool("p").create_volume("v", VOLUME)
    home.close()

    known: dict[str, bytes] = {"v": bytes(VOLUME)}
    flushed_rounds = 0
    for round_ in range(DAEMON_ROUNDS):
        where = f"{what}, seed {seed} (STORVISOR_CRASH_SEED), round {round_}"
        volumes = {name: len(data) for name, data in known.items() if "@" not in name}
        snapshots = {name: len(data) for name, data in known.items() if "@" in name}
        clones = {v.name: v.origin for v in _volume_infos(home_dir) if v.origin is not None}
        workload = crashkit.Workload(
            volumes=volumes,
            snapshots=snapshots,
            clones=clones,
            ops=100_000,
            discards=True,
            snapshot_ops=round_ % 2 == 1,
            extends=True,
            flush_rate=rng.choice([0.1, 0.02]),
            name_prefix=f"r{round_}",
            aligned=aligned,
        )
        daemon = DaemonRound(home_dir, tmp_path)
        kill = functools.partial(daemon.kill_after, rng.uniform(0, 0.02))
        log = KillingLog(rng.randrange(10, max_logged), kill)
        writer = make_writer(daemon)
        timer = daemon.kill_after(60)  # in case the workload stalls
        try:
            try:
                crashkit.run_workload(writer, log, random.Random(rng.randrange(1 << 32)), workload)
            except Exception as e:
                if not daemon.killed.is_set():
                    raise AssertionError(f"{where}: {e}\n{daemon.stderr_tail()}") from e
            assert daemon.killed.is_set(), f"{where}: the workload ended before the kill"
        finally:
            timer.cancel()
            if log.timer is not None:
                log.timer.join()
            daemon.close()
        try:  # no data plane may write after the check began
            procs.wait_gone(daemon.planes)
        except TimeoutError as e:
            raise AssertionError(f"{where}: a data plane outlived its daemon: {e}") from e
        history = History(known, log.records)
        if history.durable:
            flushed_rounds += 1
        known = crashkit.check_home(home_dir, history, where)
    assert flushed_rounds >= 1, f"seed {seed}: no round reached a flush"


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
