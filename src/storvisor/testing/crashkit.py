"""Crash-consistency kit: a random workload, a durability log and a checker.

Theory of operation
-------------------
A workload (``run_workload``) issues writes, FUA writes, discards, write-zeroes, flushes and
snapshot, clone, flatten, rollback, extend and snapshot-delete operations through a
``Writer``. *Before* issuing each operation it appends a record of it to a ``Log``; after a
flush completes it appends ``durable`` (every operation logged before that flush is now
durable), after a write completes it appends ``done``, and after a management operation
completes, ``committed`` if the writer makes those durable on return (``done`` otherwise).
Data is never logged: a write is ``(offset, length, seed)`` and ``payload(seed, length)``
regenerates its bytes.

The process issuing the workload is then killed at a random moment. ``History`` replays the
log: each *target* (a volume ``VOL``, a snapshot ``VOL@SNAP`` or a clone) gets the ordered list
of operations that may have reached it, starting from a known *base* content (zeros for a new
volume, or what an earlier round verified). ``History.verify(reader)`` checks every target
against the contract of a disk with a volatile write cache, at 512-byte sector granularity
(split further at operation boundaries):

* the newest operation covering a piece that is known durable (logged before a completed
  flush, or a completed FUA write) sets a floor: the piece must read as that operation's data,
  or as the data of any operation logged after it (those may or may not have landed);
* a piece no durable operation covers may also read as its base content (zeros if never
  written);
* a snapshot or clone whose creation is durable (committed, or followed by a completed flush)
  must exist, one whose creation is not may be missing; a snapshot whose deletion is
  durable must be gone;
* a rollback or extend that is not known durable leaves two histories (with and without
  it): the content (and size) must fit one of them.

The log and the checker know nothing of how operations are issued: ``EngineWriter`` drives a
pool in this process (the worker below), and ``NbdWriter`` drives a daemon over NBD and its
management API (the workload then runs in the checking process with a ``ListLog``, and the
daemon is what gets killed). The worker program::

    python -m storvisor.testing.crashkit --home DIR --pool POOL --seed N --round R \\
        --log-fd FD [--ops N] [--flush-rate F] [--discards] [--exit] \\
        [--snapshots [--rollbacks] [--extends]]

opens the Home, logs ``ready``, runs the workload over every volume of the pool (logging to
file descriptor ``FD``) and then sleeps until it is killed (or exits, with ``--exit``).
"""

from __future__ import annotations

import argparse
import bisect
import errno
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from storvisor.engine.device import BlockDevice
from storvisor.errors import IOFailure, NotFound, StorvisorError

SECTOR = 512
"""Granularity at which a torn, unflushed write may be partly visible."""


def payload(seed: int, length: int) -> bytes:
    """The bytes a logged write of ``length`` bytes with ``seed`` carried."""
    return random.Random(seed).randbytes(length)


# -- the log -------------------------------------------------------------------------------


class Log(Protocol):
    """Where the workload appends records; a record must be out of the process when
    ``append`` returns (so that it survives a SIGKILL right after)."""

    def append(self, record: Mapping[str, object]) -> None: ...


class FdLog:
    """A ``Log`` writing one JSON object per line to a file descriptor (a pipe or a file)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def append(self, record: Mapping[str, object]) -> None:
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        view = memoryview(line)
        while view:
            view = view[os.write(self.fd, view) :]


class ListLog:
    """A ``Log`` kept in memory, for a workload that runs in the checking process."""

    def __init__(self) -> None:
        self.records: list[dict[str, object]] = []

    def append(self, record: Mapping[str, object]) -> None:
        self.records.append(dict(record))


def parse_log(lines: Iterable[bytes | str]) -> list[dict[str, object]]:
    """Decode ``FdLog`` lines; an incomplete last line (cut by the kill) is dropped."""
    records: list[dict[str, object]] = []
    for line in lines:
        text = line.decode() if isinstance(line, bytes) else line
        if not text.endswith("\n"):
            break
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError(f"log line is not an object: {text!r}")
        records.append(value)
    return records


# -- issuing operations --------------------------------------------------------------------


class Writer(Protocol):
    """How a workload reaches the storage. Targets are volume names; a snapshot is
    ``VOL@SNAP``. Every method returns once the operation has completed.

    ``management_durable`` says whether the management operations (``snapshot``, ``clone``,
    ``delete_snapshot``, ``flatten``, ``rollback``, ``extend``) are durable when they return;
    otherwise they are durable after the next ``flush``.
    """

    @property
    def management_durable(self) -> bool: ...

    def write(self, target: str, offset: int, data: bytes, *, fua: bool) -> None: ...

    def discard(self, target: str, offset: int, length: int) -> None: ...

    def write_zeroes(self, target: str, offset: int, length: int, *, may_unmap: bool) -> None: ...

    def flush(self) -> None:
        """Make every operation completed before this call durable, on every target."""

    def snapshot(self, volume: str, snapshot: str) -> None: ...

    def clone(self, volume: str, snapshot: str, new: str) -> None: ...

    def delete_snapshot(self, volume: str, snapshot: str) -> None: ...

    def flatten(self, volume: str) -> None: ...

    def rollback(self, volume: str, snapshot: str) -> None: ...

    def extend(self, volume: str, size: int) -> None: ...


class Reader(Protocol):
    """How the checker reads what survived."""

    def read(self, target: str) -> bytes | None:
        """The whole content of ``target`` (``VOL`` or ``VOL@SNAP``), or None if missing."""


class PoolLike(Protocol):
    """The part of ``storvisor.engine.pool.Pool`` the engine writer and reader use."""

    def open_volume(self, volume: str, snapshot: str | None = None) -> BlockDevice: ...

    def create_snapshot(self, volume: str, snapshot: str) -> object: ...

    def clone(self, volume: str, snapshot: str, new: str) -> object: ...

    def delete_snapshot(self, volume: str, snapshot: str) -> None: ...

    def flatten(self, volume: str) -> object: ...

    def rollback(self, volume: str, snapshot: str) -> object: ...

    def extend_volume(self, name: str, size: int) -> object: ...

    def flush(self) -> None: ...


class EngineWriter:
    """A ``Writer`` over an engine pool in this process. Handles stay open; ``flush`` flushes
    every handle written since the last flush, and the pool when its catalog changed."""

    def __init__(self, pool: PoolLike) -> None:
        self.pool = pool
        self.handles: dict[str, BlockDevice] = {}
        self.dirty: set[str] = set()
        self.catalog_changed = False

    @property
    def management_durable(self) -> bool:
        """The engine commits every management operation before returning."""
        return True

    def _handle(self, target: str) -> BlockDevice:
        if target not in self.handles:
            self.handles[target] = self.pool.open_volume(target)
        self.dirty.add(target)
        return self.handles[target]

    def write(self, target: str, offset: int, data: bytes, *, fua: bool) -> None:
        self._handle(target).write(offset, data, fua=fua)

    def discard(self, target: str, offset: int, length: int) -> None:
        self._handle(target).discard(offset, length)

    def write_zeroes(self, target: str, offset: int, length: int, *, may_unmap: bool) -> None:
        self._handle(target).write_zeroes(offset, length, may_unmap=may_unmap)

    def flush(self) -> None:
        for target in sorted(self.dirty):
            self.handles[target].flush()
        self.dirty.clear()
        if self.catalog_changed:
            self.pool.flush()
            self.catalog_changed = False

    def snapshot(self, volume: str, snapshot: str) -> None:
        self.pool.create_snapshot(volume, snapshot)
        self.catalog_changed = True

    def clone(self, volume: str, snapshot: str, new: str) -> None:
        self.pool.clone(volume, snapshot, new)
        self.catalog_changed = True

    def delete_snapshot(self, volume: str, snapshot: str) -> None:
        self.pool.delete_snapshot(volume, snapshot)
        self.catalog_changed = True

    def flatten(self, volume: str) -> None:
        self.pool.flatten(volume)
        self.catalog_changed = True

    def rollback(self, volume: str, snapshot: str) -> None:
        """Close this writer's handle on ``volume`` (a rollback needs it closed), then roll
        back; the handle is reopened by the next write."""
        handle = self.handles.pop(volume, None)
        if handle is not None:
            handle.close()
        self.dirty.discard(volume)
        self.pool.rollback(volume, snapshot)
        self.catalog_changed = True

    def extend(self, volume: str, size: int) -> None:
        self.pool.extend_volume(volume, size)
        self.catalog_changed = True

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()
        self.handles.clear()


NBD_CMD_FLAG_FUA = 1 << 0
"""NBD protocol: force unit access (as libnbd's ``CMD_FLAG_FUA``)."""
NBD_CMD_FLAG_NO_HOLE = 1 << 1
"""NBD protocol: WRITE_ZEROES must not punch a hole (as libnbd's ``CMD_FLAG_NO_HOLE``)."""


class NbdHandle(Protocol):
    """The part of a connected ``libnbd`` handle (``nbd.NBD``) the NBD writer uses."""

    def pwrite(self, buf: bytes, offset: int, flags: int = 0) -> None: ...

    def trim(self, count: int, offset: int, flags: int = 0) -> None: ...

    def zero(self, count: int, offset: int, flags: int = 0) -> None: ...

    def flush(self, flags: int = 0) -> None: ...


class Management(Protocol):
    """The part of the management API (``storvisor.api.client.Client``) the NBD writer uses."""

    def create_snapshot(self, pool: str, volume: str, snapshot: str) -> object: ...

    def clone(self, pool: str, volume: str, snapshot: str, new: str) -> object: ...

    def delete_snapshot(self, pool: str, volume: str, snapshot: str) -> None: ...

    def flatten(self, pool: str, volume: str) -> object: ...

    def rollback(self, pool: str, volume: str, snapshot: str) -> object: ...

    def extend_volume(self, pool: str, name: str, size: int) -> object: ...


H = TypeVar("H")


class _DaemonWriter(Generic[H]):
    """What the writers that drive a daemon share: a data handle per target from
    ``connect`` (opened when the target is first written), management over its API."""

    def __init__(
        self,
        connect: Callable[[str], H],
        api: Management,
        pool: str,
        *,
        management_durable: bool = True,
    ) -> None:
        self.connect = connect
        self.api = api
        self.pool = pool
        self._management_durable = management_durable
        self.handles: dict[str, H] = {}
        self.dirty: set[str] = set()

    @property
    def management_durable(self) -> bool:
        """What the API promises for its management operations."""
        return self._management_durable

    def _handle(self, target: str) -> H:
        if target not in self.handles:
            self.handles[target] = self.connect(target)
        self.dirty.add(target)
        return self.handles[target]

    def snapshot(self, volume: str, snapshot: str) -> None:
        self.api.create_snapshot(self.pool, volume, snapshot)

    def clone(self, volume: str, snapshot: str, new: str) -> None:
        self.api.clone(self.pool, volume, snapshot, new)

    def delete_snapshot(self, volume: str, snapshot: str) -> None:
        self.api.delete_snapshot(self.pool, volume, snapshot)

    def flatten(self, volume: str) -> None:
        self.api.flatten(self.pool, volume)


class NbdWriter(_DaemonWriter[NbdHandle]):
    """A ``Writer`` that drives a daemon: data over NBD, snapshots and clones over its API.

    ``connect(volume)`` returns a connected handle on an NBD export of ``volume`` (exporting
    it first if needed); it is called when a target is first written, and again after an
    extend. ``flush`` flushes every connection written since the last flush.
    ``management_durable`` is what the API promises for its management operations.
    """

    def __init__(
        self,
        connect: Callable[[str], NbdHandle],
        api: Management,
        pool: str,
        *,
        management_durable: bool = True,
    ) -> None:
        super().__init__(connect, api, pool, management_durable=management_durable)
        self.retired: list[NbdHandle] = []

    def write(self, target: str, offset: int, data: bytes, *, fua: bool) -> None:
        self._handle(target).pwrite(data, offset, NBD_CMD_FLAG_FUA if fua else 0)

    def discard(self, target: str, offset: int, length: int) -> None:
        self._handle(target).trim(length, offset)

    def write_zeroes(self, target: str, offset: int, length: int, *, may_unmap: bool) -> None:
        self._handle(target).zero(length, offset, 0 if may_unmap else NBD_CMD_FLAG_NO_HOLE)

    def flush(self) -> None:
        for handle in self.retired:
            handle.flush()
        self.retired.clear()
        for target in sorted(self.dirty):
            self.handles[target].flush()
        self.dirty.clear()

    def rollback(self, volume: str, snapshot: str) -> None:
        """Roll back through the API; the volume must have no export holding it open."""
        self.api.rollback(self.pool, volume, snapshot)

    def extend(self, volume: str, size: int) -> None:
        """Extend through the API, then reconnect (an NBD export's size is fixed per
        connection); the old connection is flushed with the others at the next flush."""
        self.api.extend_volume(self.pool, volume, size)
        handle = self.handles.pop(volume, None)
        if handle is not None and volume in self.dirty:
            self.retired.append(handle)
        self.dirty.discard(volume)


class VhostHandle(Protocol):
    """The part of ``storvisor.testing.vhost_frontend.VhostUserFrontend`` the vhost-user
    writer uses (each returns a virtio-blk status)."""

    def write(self, offset: int, data: bytes) -> int: ...

    def discard(self, ranges: list[tuple[int, int, int]]) -> int: ...

    def write_zeroes(self, ranges: list[tuple[int, int, int]]) -> int: ...

    def flush(self) -> int: ...


class VhostWriter(_DaemonWriter[VhostHandle]):
    """A ``Writer`` that drives a daemon: data over vhost-user-blk exports (virtio-blk
    requests from ``connect(volume)``'s front-end), management over its API. Needs an
    ``aligned`` workload. FUA is a write followed by a flush (virtio-blk has none)."""

    @staticmethod
    def _ok(status: int, what: str) -> None:
        if status != 0:
            raise IOFailure(f"vhost-user-blk {what} failed with status {status}", errno.EIO)

    def write(self, target: str, offset: int, data: bytes, *, fua: bool) -> None:
        handle = self._handle(target)
        self._ok(handle.write(offset, data), "write")
        if fua:
            self._ok(handle.flush(), "flush")

    def discard(self, target: str, offset: int, length: int) -> None:
        self._ok(self._handle(target).discard([(offset >> 9, length >> 9, 0)]), "discard")

    def write_zeroes(self, target: str, offset: int, length: int, *, may_unmap: bool) -> None:
        ranges = [(offset >> 9, length >> 9, 1 if may_unmap else 0)]
        self._ok(self._handle(target).write_zeroes(ranges), "write-zeroes")

    def flush(self) -> None:
        for target in sorted(self.dirty):
            self._ok(self.handles[target].flush(), "flush")
        self.dirty.clear()

    def rollback(self, volume: str, snapshot: str) -> None:
        raise IOFailure("a volume exported over vhost-user cannot be rolled back", errno.EBUSY)

    def extend(self, volume: str, size: int) -> None:
        """Extend through the API; the export follows (the back-end checks against the new
        size at once)."""
        self.api.extend_volume(self.pool, volume, size)


class EngineReader:
    """A ``Reader`` over an engine pool in this process."""

    def __init__(self, pool: PoolLike) -> None:
        self.pool = pool

    def read(self, target: str) -> bytes | None:
        volume, _, snapshot = target.partition("@")
        try:
            device = self.pool.open_volume(volume, snapshot or None)
        except NotFound:
            return None
        try:
            buf = bytearray(device.size)
            device.read_into(0, memoryview(buf))
            return bytes(buf)
        finally:
            device.close()


def check_home(
    home_dir: str | os.PathLike[str], history: History, where: str, *, pool: str = "p"
) -> dict[str, bytes]:
    """Open the Home at ``home_dir`` after a crash, require ``fsck`` clean and ``history`` to
    verify, and return what survived (the known content for the next round).

    Raises ``AssertionError`` naming ``where`` and what broke. The Home is closed on return.
    """
    from storvisor.engine.home import Home  # only the checking side needs the engine here

    home = Home(home_dir)
    try:
        opened = home.pool(pool)
        report = opened.fsck()
        assert report.clean, f"{where}: fsck after the crash: {report}"
        reader = EngineReader(opened)
        problems = history.verify(reader)
        assert not problems, f"{where}: " + "; ".join(map(str, problems))
        return history.survivors(reader)
    finally:
        home.close()


class WorkerProcess:
    """The worker program below in a child process, its log read from a pipe as it arrives.

    ``lines`` holds the raw log lines so far, ``ready`` is set once the worker has opened the
    Home, ``proc`` is the child. ``kill`` ends it and returns the parsed log; the caller
    decides whether the child was still running (``proc.returncode == -SIGKILL``).
    """

    def __init__(
        self,
        home: str | os.PathLike[str],
        *,
        seed: int,
        round_: int,
        ops: int,
        flush_rate: float,
        discards: bool,
        snapshots: bool,
        pool: str = "p",
    ) -> None:
        read_fd, write_fd = os.pipe()
        args = [
            sys.executable,
            "-m",
            "storvisor.testing.crashkit",
            f"--home={home}",
            f"--pool={pool}",
            f"--seed={seed}",
            f"--round={round_}",
            f"--log-fd={write_fd}",
            f"--ops={ops}",
            f"--flush-rate={flush_rate}",
        ]
        args += ["--discards"] * discards
        args += ["--snapshots", "--rollbacks", "--extends"] * snapshots
        self.proc = subprocess.Popen(args, pass_fds=[write_fd], stderr=subprocess.PIPE)
        os.close(write_fd)
        self.lines: list[bytes] = []
        self.stderr = ""
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._read, args=(read_fd,), daemon=True)
        self._reader.start()

    def _read(self, fd: int) -> None:
        with os.fdopen(fd, "rb") as pipe:
            for line in pipe:
                self.lines.append(line)
                if line.startswith(b'{"t":"ready"'):
                    self.ready.set()

    def logged(self, count: int) -> bool:
        """Whether the worker has logged at least ``count`` records."""
        return len(self.lines) >= count

    def wait_for(self, condition: Callable[[], bool], timeout: float = 30) -> None:
        """Wait until ``condition()`` holds, the worker is idle (its workload done) or has
        ended, or ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        while not condition() and self.proc.poll() is None and time.monotonic() < deadline:
            if self.lines and self.lines[-1].startswith(b'{"t":"idle"'):
                return
            time.sleep(0.002)

    def kill(self) -> list[dict[str, object]]:
        """SIGKILL the worker (a no-op if it has ended), keep its stderr in ``stderr`` and
        return its parsed log."""
        self.proc.kill()
        _, stderr = self.proc.communicate(timeout=30)
        self.stderr = stderr.decode(errors="replace")
        self._reader.join(timeout=30)
        return parse_log(self.lines)


# -- the workload --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Workload:
    """What a round does.

    ``volumes`` maps the writable volumes to their sizes, ``snapshots`` the existing
    ``VOL@SNAP`` targets to theirs; ``clones`` maps each existing linked clone (not yet
    flattened) to the snapshot it depends on. A ``flush_rate`` share of
    the operations are flushes. Of the others, 15% are discards or write-zeroes when
    ``discards`` is set, and 2% are snapshot operations when ``snapshot_ops`` is set: they
    extend a volume up to ``max_size`` (if ``extends`` is set), roll a volume back to one of
    its snapshots (if ``rollbacks`` is set), flatten a clone, or
    create a snapshot (and sometimes a clone of it) up to ``max_snapshots`` and
    ``max_volumes``, and past that limit delete a snapshot instead. The rest are writes, one
    in five with FUA.
    """

    volumes: Mapping[str, int]
    snapshots: Mapping[str, int] = field(default_factory=dict)
    clones: Mapping[str, str] = field(default_factory=dict)
    ops: int = 400
    discards: bool = False
    snapshot_ops: bool = False
    rollbacks: bool = False
    extends: bool = False
    max_size: int = 2 << 20
    name_prefix: str = "r0"
    flush_rate: float = 0.1
    max_snapshots: int = 4
    max_volumes: int = 3
    max_io: int = 64 * 1024
    aligned: bool = False
    """Only whole 512-byte sectors (for writers over virtio-blk)."""


def run_workload(writer: Writer, log: Log, rng: random.Random, workload: Workload) -> None:
    """Issue ``workload.ops`` random operations through ``writer``, logging each (see the
    module docstring). Ends with a flush. Raises whatever ``writer`` raises."""
    volumes = dict(workload.volumes)
    snapshots = dict(workload.snapshots)
    origins = dict(workload.clones)  # clone -> snapshot it depends on
    cloned = set(origins.values())
    seq = 0
    made = 0

    def managed(s: int) -> None:
        log.append({"t": "committed" if writer.management_durable else "done", "seq": s})

    def next_seq() -> int:
        nonlocal seq
        seq += 1
        return seq

    for _ in range(workload.ops):
        target = rng.choice(sorted(volumes))
        size = volumes[target]
        offset, length = _pick_range(rng, size, workload.max_io, workload.aligned)
        roll = rng.random()
        if rng.random() < workload.flush_rate:
            s = next_seq()
            log.append({"t": "flush", "seq": s})
            writer.flush()
            log.append({"t": "durable", "seq": s})
        elif workload.discards and roll < 0.15:
            s = next_seq()
            unmap = rng.random() < 0.5
            kind = "discard" if roll < 0.08 else "zeroes"
            log.append(
                {"t": "op", "seq": s, "kind": kind, "target": target, "off": offset, "len": length}
            )
            if kind == "discard":
                writer.discard(target, offset, length)
            else:
                writer.write_zeroes(target, offset, length, may_unmap=unmap)
        elif workload.snapshot_ops and roll < 0.17:
            if workload.extends and size < workload.max_size and rng.random() < 0.2:
                new_size = min(workload.max_size, size + rng.choice([4096, 65536, 262144]))
                s = next_seq()
                log.append({"t": "extend", "seq": s, "target": target, "size": new_size})
                writer.extend(target, new_size)
                managed(s)
                volumes[target] = new_size
                continue
            own = sorted(x for x in snapshots if x.partition("@")[0] == target)
            if workload.rollbacks and own and rng.random() < 0.2:
                snap = rng.choice(own)
                s = next_seq()
                log.append({"t": "rollback", "seq": s, "target": target, "source": snap})
                writer.rollback(target, snap.partition("@")[2])
                managed(s)
                volumes[target] = snapshots[snap]  # a rollback restores the size too
                continue
            if origins and rng.random() < 0.25:
                clone = rng.choice(sorted(origins))
                s = next_seq()
                log.append({"t": "flatten", "seq": s, "name": clone})
                writer.flatten(clone)
                managed(s)
                snap = origins.pop(clone)
                if snap not in origins.values():
                    cloned.discard(snap)
                continue
            deletable = sorted(set(snapshots) - cloned)
            if len(snapshots) >= workload.max_snapshots and deletable:
                snap = rng.choice(deletable)
                volume, _, name = snap.partition("@")
                s = next_seq()
                log.append({"t": "delete", "seq": s, "name": snap})
                writer.delete_snapshot(volume, name)
                managed(s)
                del snapshots[snap]
                continue
            if len(snapshots) >= workload.max_snapshots:
                continue
            made += 1
            name = f"{workload.name_prefix}s{made}"
            snap = f"{target}@{name}"
            s = next_seq()
            log.append({"t": "fork", "seq": s, "kind": "snapshot", "source": target, "name": snap})
            writer.snapshot(target, name)
            managed(s)
            snapshots[snap] = size
            if len(volumes) < workload.max_volumes and rng.random() < 0.5:
                new = f"{workload.name_prefix}c{made}"
                s = next_seq()
                log.append({"t": "fork", "seq": s, "kind": "clone", "source": snap, "name": new})
                writer.clone(target, name, new)
                managed(s)
                volumes[new] = size
                cloned.add(snap)
                origins[new] = snap
        else:
            s = next_seq()
            wseed = rng.randrange(1 << 62)
            fua = rng.random() < 0.2
            log.append(
                {
                    "t": "op",
                    "seq": s,
                    "kind": "write",
                    "target": target,
                    "off": offset,
                    "len": length,
                    "seed": wseed,
                    "fua": fua,
                }
            )
            writer.write(target, offset, payload(wseed, length), fua=fua)
            log.append({"t": "done", "seq": s})
    s = next_seq()
    log.append({"t": "flush", "seq": s})
    writer.flush()
    log.append({"t": "durable", "seq": s})


def _pick_range(
    rng: random.Random, size: int, max_io: int, aligned: bool = False
) -> tuple[int, int]:
    if aligned or rng.random() < 0.3:  # sector-aligned, as most guests issue
        offset = rng.randrange(size // SECTOR) * SECTOR
        length = rng.randrange(1, min(max_io, size - offset) // SECTOR + 1) * SECTOR
    else:
        offset = rng.randrange(size)
        length = rng.randrange(1, min(max_io, size - offset) + 1)
    return offset, length


# -- the checker ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Op:
    """An operation on one target: a write (``seed`` set), a discard or write-zeroes
    (``seed`` None), a rollback to the snapshot ``rollback_to``, or an extend to
    ``extend_to`` bytes."""

    seq: int
    offset: int
    length: int
    seed: int | None
    fua: bool
    rollback_to: str | None = None
    extend_to: int | None = None

    def data(self) -> bytes:
        return bytes(self.length) if self.seed is None else payload(self.seed, self.length)


@dataclass(slots=True)
class Target:
    """A volume, snapshot or clone: ``base`` content (None: inherit from ``parent`` as it was
    just before ``fork_seq``), then ``ops``."""

    name: str
    base: bytes | None = None
    parent: str | None = None
    fork_seq: int = 0
    deleted_seq: int | None = None
    ops: list[Op] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Problem:
    target: str
    message: str

    def __str__(self) -> str:
        return f"{self.target}: {self.message}"


class History:
    """What a log says may be on the storage; see the module docstring for the rule."""

    def __init__(self, base: Mapping[str, bytes], records: Sequence[Mapping[str, object]]):
        """``base`` maps every target that exists before the log starts to its exact
        content."""
        self.targets: dict[str, Target] = {n: Target(n, base=b) for n, b in base.items()}
        self.durable = 0
        self.completed_fua: set[int] = set()
        self.committed: set[int] = set()
        self.records = len(records)
        self.killed_at = 0
        for record in records:
            self._apply(record)

    def _apply(self, r: Mapping[str, object]) -> None:
        kind = r["t"]
        seq = _int(r.get("seq", 0))
        self.killed_at = max(self.killed_at, seq)
        if kind == "op":
            target = self.targets[_str(r["target"])]
            seed = None if r["kind"] != "write" else _int(r["seed"])
            fua = bool(r.get("fua", False))
            target.ops.append(Op(seq, _int(r["off"]), _int(r["len"]), seed, fua))
        elif kind == "extend":
            target = self.targets[_str(r["target"])]
            target.ops.append(Op(seq, 0, 0, None, False, extend_to=_int(r["size"])))
        elif kind == "rollback":
            target = self.targets[_str(r["target"])]
            target.ops.append(Op(seq, 0, 0, None, False, rollback_to=_str(r["source"])))
        elif kind == "fork":
            name = _str(r["name"])
            self.targets[name] = Target(name, parent=_str(r["source"]), fork_seq=seq)
        elif kind == "delete":
            self.targets[_str(r["name"])].deleted_seq = seq
        elif kind == "durable":
            self.durable = max(self.durable, seq)
        elif kind == "committed":
            self.committed.add(seq)
        elif kind == "done":
            self.completed_fua.add(seq)
        elif kind not in ("flush", "flatten", "ready", "idle"):
            raise ValueError(f"unknown log record {r!r}")

    def is_durable(self, op: Op) -> bool:
        return op.seq < self.durable or (op.fua and op.seq in self.completed_fua)

    def is_committed(self, seq: int) -> bool:
        """Whether a snapshot, clone or delete logged as ``seq`` is durable."""
        return seq < self.durable or seq in self.committed

    def lineages(self, name: str, before: int | None = None) -> list[tuple[bytes, list[Op]]]:
        """The possible histories of ``name`` (counting only operations logged before
        ``before``): each is a base content and the data operations that may have reached it
        since. There is one, unless a rollback may or may not have happened."""
        target = self.targets[name]
        if target.parent is None:
            assert target.base is not None
            alternatives: list[tuple[bytes, list[Op]]] = [(target.base, [])]
        else:
            alternatives = self.lineages(target.parent, target.fork_seq)
        for op in target.ops:
            if before is not None and op.seq >= before:
                break
            if op.extend_to is not None:
                size = op.extend_to
                after = [(b + bytes(size - len(b)), ops) for b, ops in alternatives]
            elif op.rollback_to is not None:
                after = self.lineages(op.rollback_to)
            else:
                alternatives = [(base, [*ops, op]) for base, ops in alternatives]
                continue
            alternatives = after if self.is_committed(op.seq) else alternatives + after
        return alternatives

    def verify(self, reader: Reader) -> list[Problem]:
        """Check every target through ``reader``; returns the problems found (empty: good)."""
        problems: list[Problem] = []
        for name in sorted(self.targets):
            target = self.targets[name]
            content = reader.read(name)
            if target.deleted_seq is not None:
                if content is not None and self.is_committed(target.deleted_seq):
                    problems.append(Problem(name, "deletion was flushed but it still exists"))
                if content is None or self.is_committed(target.deleted_seq):
                    continue
            if content is None:
                if target.parent is None or self.is_committed(target.fork_seq):
                    problems.append(Problem(name, "missing although its creation was flushed"))
                continue
            problems.extend(self._verify_content(name, content))
        return problems

    def _verify_content(self, name: str, content: bytes) -> list[Problem]:
        """Problems of the history ``content`` fits best (none if it fits one)."""
        best: list[Problem] | None = None
        for base, ops in self.lineages(name):
            problems = self._verify_history(name, content, base, ops)
            if best is None or len(problems) < len(best):
                best = problems
            if not best:
                break
        assert best is not None
        return best

    def _verify_history(
        self, name: str, content: bytes, base: bytes, ops: list[Op]
    ) -> list[Problem]:
        if len(content) != len(base):
            return [Problem(name, f"size {len(content)}, expected {len(base)}")]
        size = len(base)
        ops = [op for op in ops if op.offset < size]  # beyond an extend that did not happen
        cuts = set(range(0, size, SECTOR)) | {size}
        for op in ops:
            cuts.add(op.offset)
            cuts.add(min(op.offset + op.length, size))
        bounds = sorted(cuts)
        covering: list[list[int]] = [[] for _ in range(len(bounds) - 1)]
        for index, op in enumerate(ops):
            first = bisect.bisect_left(bounds, op.offset)
            last = bisect.bisect_left(bounds, min(op.offset + op.length, size))
            for piece in range(first, last):
                covering[piece].append(index)
        datas: dict[int, bytes] = {}
        problems: list[Problem] = []
        for piece, indexes in enumerate(covering):
            start, end = bounds[piece], bounds[piece + 1]
            got = content[start:end]
            allowed: list[str] = []
            matched = False
            floor_reached = False
            for index in reversed(indexes):
                op = ops[index]
                if index not in datas:
                    datas[index] = op.data()
                rel = start - op.offset
                if got == datas[index][rel : rel + end - start]:
                    matched = True
                    break
                allowed.append(f"seq {op.seq}")
                if self.is_durable(op):
                    floor_reached = True
                    break
            if not matched and not floor_reached:
                matched = got == base[start:end]
                allowed.append("base")
            if not matched:
                problems.append(
                    Problem(name, f"[{start}, {end}) matches none of {', '.join(allowed)}")
                )
                if len(problems) >= 10:
                    break
        return problems

    def survivors(self, reader: Reader) -> dict[str, bytes]:
        """The exact content of every target that exists now: the base of the next round."""
        result: dict[str, bytes] = {}
        for name in sorted(self.targets):
            content = reader.read(name)
            if content is not None:
                result[name] = content
        return result


def _int(value: object) -> int:
    if not isinstance(value, int):
        raise ValueError(f"expected an integer in the log, got {value!r}")
    return value


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string in the log, got {value!r}")
    return value


# -- the worker program --------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the worker (see the module docstring). Exits 0 only when not killed first."""
    parser = argparse.ArgumentParser(prog="python -m storvisor.testing.crashkit")
    parser.add_argument("--home", required=True)
    parser.add_argument("--pool", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--round", type=int, default=0)
    parser.add_argument("--log-fd", type=int, required=True)
    parser.add_argument("--ops", type=int, default=400)
    parser.add_argument("--flush-rate", type=float, default=0.1)
    parser.add_argument("--discards", action="store_true")
    parser.add_argument("--snapshots", action="store_true")
    parser.add_argument("--rollbacks", action="store_true")
    parser.add_argument("--extends", action="store_true")
    parser.add_argument("--exit", action="store_true", help="exit instead of waiting to be killed")
    args = parser.parse_args(argv)

    from storvisor.engine.home import Home  # the worker is the only part that needs the engine

    log = FdLog(args.log_fd)
    home = Home(args.home)
    try:
        pool = home.pool(args.pool)
        volumes = {v.name: v.size for v in pool.volumes()}
        snapshots = {f"{v}@{s.name}": s.size for v in sorted(volumes) for s in pool.snapshots(v)}
        clones = {v.name: v.origin for v in pool.volumes() if v.origin is not None}
        log.append({"t": "ready", "pid": os.getpid()})
        workload = Workload(
            volumes=volumes,
            snapshots=snapshots,
            clones=clones,
            ops=args.ops,
            discards=args.discards,
            flush_rate=args.flush_rate,
            snapshot_ops=args.snapshots,
            rollbacks=args.rollbacks,
            extends=args.extends,
            name_prefix=f"r{args.round}",
        )
        writer = EngineWriter(pool)
        run_workload(writer, log, random.Random(args.seed), workload)
        log.append({"t": "idle"})
        if not args.exit:
            while True:
                time.sleep(3600)
        writer.close()
    except StorvisorError as e:
        print(f"crashkit worker: {e}", file=sys.stderr)
        return 1
    finally:
        home.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
