"""The random workload: data and management operations through a ``Writer``, each logged
(see ``log``) before it is issued and after it completes."""

from __future__ import annotations

import itertools
import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from storvisor.testing.crashkit.log import SECTOR, Log, payload
from storvisor.testing.crashkit.writers import Writer


@dataclass(frozen=True, slots=True)
class Workload:
    """What a round does.

    ``volumes`` maps the writable volumes to their sizes, ``snapshots`` the existing
    ``VOL@SNAP`` targets to theirs; ``clones`` maps each existing linked clone (not yet
    flattened) to the snapshot it depends on.

    Each operation is a flush with probability ``flush_rate``. Any other operation draws
    one number: below 0.15 it is a discard or write-zeroes (only when ``discards`` is set);
    in the next ``management_rate`` (from 0.15 with ``discards``, from 0 without) it is a
    management operation (only when ``snapshot_ops`` is set); otherwise a write, one in five
    with FUA. So with the defaults and ``discards`` set, 15% of the non-flush operations
    are discards or write-zeroes, 5% management operations and 80% writes.

    A management operation extends a volume up to ``max_size`` (if ``extends`` is set),
    rolls a volume back to one of its snapshots (if ``rollbacks`` is set; the volume is
    ``detach``ed first), flattens a clone, detaches a volume (if ``detaches`` is set),
    deletes a volume that has no cloned snapshot (if ``volume_deletes`` is set and another
    volume remains), or creates a snapshot (and sometimes a clone of it) up to
    ``max_snapshots`` and ``max_volumes``, and past that limit deletes a snapshot instead.
    """

    volumes: Mapping[str, int]
    snapshots: Mapping[str, int] = field(default_factory=dict)
    clones: Mapping[str, str] = field(default_factory=dict)
    ops: int = 400
    discards: bool = False
    snapshot_ops: bool = False
    rollbacks: bool = False
    extends: bool = False
    detaches: bool = False
    volume_deletes: bool = False
    management_rate: float = 0.05
    max_size: int = 2 << 20
    name_prefix: str = "r0"
    flush_rate: float = 0.1
    max_snapshots: int = 4
    max_volumes: int = 3
    max_io: int = 64 * 1024
    aligned: bool = False
    """Only whole 512-byte sectors (for writers over virtio-blk)."""
    span: tuple[int, int] | None = None
    """Data operations only inside ``[start, end)`` of each volume (so that workloads on the
    same volumes at once never overlap: the checker orders a target's operations by their
    issue)."""


class Sequencer:
    """Unique, increasing sequence numbers for the records of one log, shared by the
    workloads that append to it from several threads."""

    def __init__(self) -> None:
        self._next = itertools.count(1)
        self._lock = threading.Lock()

    def __call__(self) -> int:
        with self._lock:
            return next(self._next)


def run_workload(
    writer: Writer,
    log: Log,
    rng: random.Random,
    workload: Workload,
    *,
    seqs: Callable[[], int] | None = None,
    stream: str | None = None,
) -> None:
    """Issue ``workload.ops`` random operations through ``writer``, logging each (see
    ``Workload`` and the ``log`` module). Ends with a flush. ``seqs`` numbers the
    operations (a fresh ``Sequencer`` by default; share one between workloads that share a
    log); ``stream``, when given, is written in every record. Raises whatever ``writer``
    raises."""
    next_seq = seqs or Sequencer()
    tag: dict[str, object] = {} if stream is None else {"stream": stream}
    volumes = dict(workload.volumes)
    snapshots = dict(workload.snapshots)
    origins = dict(workload.clones)  # clone -> snapshot it depends on
    made = 0

    def issue(record: str, /, **fields: object) -> int:
        s = next_seq()
        log.append({"t": record, "seq": s, **fields, **tag})
        return s

    def completed(s: int, record: str = "done") -> None:
        log.append({"t": record, "seq": s, **tag})

    def managed(s: int) -> None:
        completed(s, "committed" if writer.management_durable else "done")

    def detach(target: str) -> None:
        s = issue("detach", target=target)
        completed(s, "committed" if writer.detach(target) else "done")

    def flush() -> None:
        s = issue("flush")
        writer.flush()
        completed(s, "durable")

    def management(target: str, size: int) -> None:
        nonlocal made
        own = sorted(x for x in snapshots if x.partition("@")[0] == target)
        cloned = set(origins.values())
        if workload.extends and size < workload.max_size and rng.random() < 0.2:
            new_size = min(workload.max_size, size + rng.choice([4096, 65536, 262144]))
            s = issue("extend", target=target, size=new_size)
            writer.extend(target, new_size)
            managed(s)
            volumes[target] = new_size
            return
        if workload.rollbacks and own and rng.random() < 0.2:
            snap = rng.choice(own)
            detach(target)
            s = issue("rollback", target=target, source=snap)
            writer.rollback(target, snap.partition("@")[2])
            managed(s)
            volumes[target] = snapshots[snap]  # a rollback restores the size too
            return
        if origins and rng.random() < 0.25:
            clone = rng.choice(sorted(origins))
            s = issue("flatten", name=clone)
            writer.flatten(clone)
            managed(s)
            del origins[clone]
            return
        if workload.detaches and rng.random() < 0.15:
            detach(target)
            return
        if workload.volume_deletes and len(volumes) > 1 and rng.random() < 0.15:
            victim = rng.choice(sorted(volumes))
            if not cloned.intersection(x for x in snapshots if x.partition("@")[0] == victim):
                detach(victim)
                s = issue("delete", name=victim)
                writer.delete_volume(victim)
                managed(s)
                del volumes[victim]
                origins.pop(victim, None)
                for snap in [x for x in snapshots if x.partition("@")[0] == victim]:
                    del snapshots[snap]
                return
        deletable = sorted(set(snapshots) - cloned)
        if len(snapshots) >= workload.max_snapshots and deletable:
            snap = rng.choice(deletable)
            volume, _, name = snap.partition("@")
            s = issue("delete", name=snap)
            writer.delete_snapshot(volume, name)
            managed(s)
            del snapshots[snap]
            return
        if len(snapshots) >= workload.max_snapshots:
            return
        made += 1
        name = f"{workload.name_prefix}s{made}"
        snap = f"{target}@{name}"
        s = issue("fork", kind="snapshot", source=target, name=snap)
        writer.snapshot(target, name)
        managed(s)
        snapshots[snap] = size
        if len(volumes) < workload.max_volumes and rng.random() < 0.5:
            new = f"{workload.name_prefix}c{made}"
            s = issue("fork", kind="clone", source=snap, name=new)
            writer.clone(target, name, new)
            managed(s)
            volumes[new] = size
            origins[new] = snap

    for _ in range(workload.ops):
        target = rng.choice(sorted(volumes))
        size = volumes[target]
        start, end = workload.span or (0, size)
        offset, length = _pick_range(rng, min(end, size) - start, workload.max_io, workload.aligned)
        offset += start
        roll = rng.random()
        managing = roll - 0.15 if workload.discards else roll
        if rng.random() < workload.flush_rate:
            flush()
        elif workload.discards and roll < 0.15:
            kind = "discard" if roll < 0.08 else "zeroes"
            s = issue("op", kind=kind, target=target, off=offset, len=length)
            if kind == "discard":
                writer.discard(target, offset, length)
            else:
                writer.write_zeroes(target, offset, length, may_unmap=rng.random() < 0.5)
            completed(s)
        elif workload.snapshot_ops and 0 <= managing < workload.management_rate:
            management(target, size)
        else:
            wseed = rng.randrange(1 << 62)
            fua = rng.random() < 0.2
            s = issue(
                "op", kind="write", target=target, off=offset, len=length, seed=wseed, fua=fua
            )
            writer.write(target, offset, payload(wseed, length), fua=fua)
            completed(s)
    flush()


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
