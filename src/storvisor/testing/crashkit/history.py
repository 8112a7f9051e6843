"""The checker: what a log says may be on the storage after a crash, and whether it is.

Theory of operation
-------------------
``History`` replays a log (see ``log``): each *target* (a volume ``VOL``, a snapshot
``VOL@SNAP`` or a clone) gets the ordered list of operations that may have reached it,
starting from a *base*: the exact content it had before the log started (zeros for a new
volume, or what an earlier round verified). ``verify(reader)`` reads every target once and
checks it against the contract of a disk with a volatile write cache, at 512-byte sector
granularity (split further at operation boundaries).

*Durability points.* An operation is durable once it completed before a durability point
was issued. The points are a flush that returned (for the operations of its own stream:
the writer that flushed) and a management operation that returned durable (``committed``:
a snapshot, clone, delete, rollback, extend, flatten or export removal), which makes every
operation completed before it was issued durable, whatever its stream or target (the
engine flushes the pool). A FUA write is durable once it completed.

*Content.* The newest operation covering a piece that is durable sets a floor: the piece
must read as that operation's data, or as the data of an operation logged after it (those
may or may not have landed); a piece no durable operation covers may also read as the
history's start.

*Concurrent streams.* An operation another stream issued on a volume while a snapshot of
it was being taken (after the snapshot's record, before its completion) may be in the
snapshot or not.

*Targets against each other.* A snapshot that exists is the point its volume continues
from: from that snapshot's creation on, the volume's history starts from the snapshot's
actual content (as read back), not from an older one. So every piece of the volume that no
operation after the snapshot covers must read exactly as the snapshot; the same holds for
a clone and its snapshot, and for a volume rolled back to a snapshot. A snapshot has no
operations of its own: its content must equal its base, round after round.

*Existence.* A snapshot or clone whose creation is durable (committed, or completed before
a later durability point) must exist, one whose creation is not may be missing; a target
whose deletion is durable must be gone (a volume's deletion deletes its snapshots). A
rollback or extend that is not known durable leaves two histories (with and without it):
the content (and size) must fit one of them.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from storvisor.testing.crashkit.log import SECTOR, payload
from storvisor.testing.crashkit.writers import EngineReader, Reader


@dataclass(frozen=True, slots=True)
class Op:
    """An operation on one target: a write (``seed`` set), a discard or write-zeroes
    (``seed`` None), a rollback to the snapshot ``rollback_to``, or an extend to
    ``extend_to`` bytes. ``stream`` is the workload that issued it."""

    seq: int
    offset: int
    length: int
    seed: int | None
    fua: bool
    rollback_to: str | None = None
    extend_to: int | None = None
    stream: str | None = None
    maybe: bool = False
    """Issued while the snapshot whose history this is was being taken (from another
    stream): it may be in the snapshot or not, whatever its durability."""

    def data(self) -> bytes:
        return bytes(self.length) if self.seed is None else payload(self.seed, self.length)


@dataclass(slots=True)
class Target:
    """A volume, snapshot or clone: ``base`` content (None: forked at ``fork_seq`` from
    ``parent``: a snapshot from its volume, a clone from its snapshot), then ``ops``.
    ``snapshots`` are the ``(fork seq, name)`` of the snapshots taken of it in the log."""

    name: str
    base: bytes | None = None
    parent: str | None = None
    fork_seq: int = 0
    deleted_seq: int | None = None
    ops: list[Op] = field(default_factory=list)
    snapshots: list[tuple[int, str]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Problem:
    target: str
    message: str

    def __str__(self) -> str:
        return f"{self.target}: {self.message}"


@dataclass(frozen=True, slots=True)
class _Lineage:
    """One possible history: where it starts (``start``, described by ``origin``) and the
    data operations that may have reached it since."""

    start: bytes
    origin: str
    ops: tuple[Op, ...] = ()


class History:
    """What a log says may be on the storage; see the module docstring for the rule."""

    def __init__(self, base: Mapping[str, bytes], records: Sequence[Mapping[str, object]]):
        """``base`` maps every target that exists before the log starts to its exact
        content."""
        self.targets: dict[str, Target] = {n: Target(n, base=b) for n, b in base.items()}
        self.durable = 0
        """The seq of the newest flush that returned (0: none)."""
        self.committed: set[int] = set()
        self.records = len(records)
        self.killed_at = 0
        self._issued: dict[int, tuple[int, str | None]] = {}  # seq -> (index, stream)
        self._completed: dict[int, int] = {}  # seq -> index of its completion record
        self._flush_points: dict[str | None, int] = {}  # stream -> newest flush's issue index
        self._management_point = -1  # issue index of the newest committed management op
        for index, record in enumerate(records):
            self._apply(index, record)
        for seq in self.committed:
            self._management_point = max(self._management_point, self._issued[seq][0])

    def _apply(self, index: int, r: Mapping[str, object]) -> None:
        kind = r["t"]
        seq = _int(r.get("seq", 0))
        stream = r.get("stream")
        if stream is not None and not isinstance(stream, str):
            raise ValueError(f"bad stream in log record {r!r}")
        self.killed_at = max(self.killed_at, seq)
        if kind in ("op", "extend", "rollback", "fork", "delete", "flush", "flatten", "detach"):
            self._issued[seq] = (index, stream)
        if kind == "op":
            target = self.targets[_str(r["target"])]
            seed = None if r["kind"] != "write" else _int(r["seed"])
            fua = bool(r.get("fua", False))
            target.ops.append(Op(seq, _int(r["off"]), _int(r["len"]), seed, fua, stream=stream))
        elif kind == "extend":
            target = self.targets[_str(r["target"])]
            target.ops.append(Op(seq, 0, 0, None, False, extend_to=_int(r["size"])))
        elif kind == "rollback":
            target = self.targets[_str(r["target"])]
            target.ops.append(Op(seq, 0, 0, None, False, rollback_to=_str(r["source"])))
        elif kind == "fork":
            name, source = _str(r["name"]), _str(r["source"])
            self.targets[name] = Target(name, parent=source, fork_seq=seq)
            if r.get("kind") == "snapshot":
                self.targets[source].snapshots.append((seq, name))
        elif kind == "delete":
            name = _str(r["name"])
            gone = {name}
            if "@" not in name:  # a volume: its snapshots go with it
                gone |= {t for t in self.targets if t.startswith(name + "@")}
            for each in gone:
                if self.targets[each].deleted_seq is None:
                    self.targets[each].deleted_seq = seq
        elif kind == "durable":
            self.durable = max(self.durable, seq)
            self._completed[seq] = index
            issued, _ = self._issued[seq]
            self._flush_points[stream] = max(self._flush_points.get(stream, -1), issued)
        elif kind == "committed":
            self.committed.add(seq)
            self._completed[seq] = index
        elif kind == "done":
            self._completed[seq] = index
        elif kind not in ("flush", "flatten", "detach", "ready", "idle"):
            raise ValueError(f"unknown log record {r!r}")

    def _point(self, stream: str | None) -> int:
        """The issue index of the newest durability point for operations of ``stream``."""
        return max(self._flush_points.get(stream, -1), self._management_point)

    def is_durable(self, op: Op) -> bool:
        """Whether ``op`` completed before a durability point (or is a completed FUA)."""
        done = self._completed.get(op.seq)
        if done is None or op.maybe:
            return False
        return op.fua or done < self._point(op.stream)

    def is_committed(self, seq: int) -> bool:
        """Whether the management operation logged as ``seq`` is durable."""
        if seq in self.committed:
            return True
        done = self._completed.get(seq)
        return done is not None and done < self._point(self._issued[seq][1])

    def _start(self, name: str, contents: Mapping[str, bytes | None]) -> list[_Lineage]:
        """Where a history that continues from the snapshot ``name`` starts: its actual
        content when it exists, else its own possible histories."""
        content = contents.get(name)
        if content is not None:
            return [_Lineage(content, name)]
        return self._lineages(name, contents)

    def _settled(self, op: Op, fork: int) -> bool:
        """Whether ``op`` completed before the fork logged as ``fork`` was issued (it is then
        on the older side of it; otherwise it ran concurrently and may be on either). A
        stream issues one operation at a time: its own earlier ones always did."""
        if op.stream == self._issued[fork][1]:
            return op.seq < fork
        done = self._completed.get(op.seq)
        return done is not None and done < self._issued[fork][0]

    def _concurrent(self, op: Op, fork: int) -> bool:
        """Whether ``op``, logged after the fork ``fork``, was issued before it completed
        (by another stream)."""
        if op.stream == self._issued[fork][1]:
            return False
        return self._issued[op.seq][0] < self._completed.get(fork, self.records)

    def _lineages(
        self, name: str, contents: Mapping[str, bytes | None], before: int | None = None
    ) -> list[_Lineage]:
        """The possible histories of ``name``, or (``before``: the seq of a snapshot of it)
        of that snapshot: only operations logged before it, those that had not completed
        when it was issued as maybes. There is one, unless a rollback or extend may or may
        not have happened."""
        target = self.targets[name]
        if target.parent is None:
            assert target.base is not None
            alternatives = [_Lineage(target.base, "its known content")]
        elif "@" in target.parent:  # a clone of a snapshot
            alternatives = self._start(target.parent, contents)
        else:  # a snapshot of a volume, and what was written concurrently
            fork = target.fork_seq
            alternatives = self._lineages(target.parent, contents, fork)
            during = tuple(
                replace(op, maybe=True)
                for op in self.targets[target.parent].ops
                if op.seq > fork and _is_data(op) and self._concurrent(op, fork)
            )
            alternatives = [_Lineage(x.start, x.origin, (*x.ops, *during)) for x in alternatives]
        forks = {seq: snap for seq, snap in target.snapshots}
        events = sorted([(op.seq, op) for op in target.ops] + [(s, None) for s in forks])
        for seq, event in events:
            if before is not None and seq >= before:
                break
            if event is None:  # a snapshot of this target: where it continues from
                if contents.get(forks[seq]) is not None:
                    # with what ran concurrently with it: it may have landed on either side
                    pending = {
                        op.seq: op
                        for x in alternatives
                        for op in x.ops
                        if not op.maybe and not self._settled(op, seq)
                    }
                    alternatives = [
                        _Lineage(
                            x.start, x.origin, (*x.ops, *(pending[k] for k in sorted(pending)))
                        )
                        for x in self._start(forks[seq], contents)
                    ]
                continue
            op = event
            if op.extend_to is not None:
                size = op.extend_to
                after = [
                    _Lineage(x.start + bytes(size - len(x.start)), x.origin, x.ops)
                    for x in alternatives
                ]
            elif op.rollback_to is not None:
                after = self._start(op.rollback_to, contents)
            else:
                alternatives = [_Lineage(x.start, x.origin, (*x.ops, op)) for x in alternatives]
                continue
            alternatives = after if self.is_committed(op.seq) else alternatives + after
        if before is not None:  # not settled when the snapshot was issued: maybe in it
            alternatives = [
                _Lineage(
                    x.start,
                    x.origin,
                    tuple(
                        op if self._settled(op, before) else replace(op, maybe=True) for op in x.ops
                    ),
                )
                for x in alternatives
            ]
        return alternatives

    def verify(self, reader: Reader) -> list[Problem]:
        """Check every target through ``reader``; returns the problems found (empty: good)."""
        contents = {name: reader.read(name) for name in sorted(self.targets)}
        problems: list[Problem] = []
        for name in sorted(self.targets):
            target = self.targets[name]
            content = contents[name]
            if target.deleted_seq is not None:
                if content is not None and self.is_committed(target.deleted_seq):
                    problems.append(Problem(name, "deletion is durable but it still exists"))
                if content is None or self.is_committed(target.deleted_seq):
                    continue
            if content is None:
                if target.parent is None or self.is_committed(target.fork_seq):
                    problems.append(Problem(name, "missing although its creation is durable"))
                continue
            problems.extend(self._verify_content(name, content, contents))
        return problems

    def _verify_content(
        self, name: str, content: bytes, contents: Mapping[str, bytes | None]
    ) -> list[Problem]:
        """Problems of the history ``content`` fits best (none if it fits one)."""
        best: list[Problem] | None = None
        for lineage in self._lineages(name, contents):
            problems = self._verify_history(name, content, lineage)
            if best is None or len(problems) < len(best):
                best = problems
            if not best:
                break
        assert best is not None
        return best

    def _verify_history(self, name: str, content: bytes, lineage: _Lineage) -> list[Problem]:
        base = lineage.start
        if len(content) != len(base):
            return [Problem(name, f"size {len(content)}, expected {len(base)}")]
        size = len(base)
        ops = [op for op in lineage.ops if op.offset < size]  # beyond an extend that did not happen
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
                allowed.append(f"seq {op.seq}" + (" (durable)" if self.is_durable(op) else ""))
                if self.is_durable(op):
                    floor_reached = True
                    break
            if not matched and not floor_reached:
                matched = got == base[start:end]
                allowed.append(lineage.origin)
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


def _is_data(op: Op) -> bool:
    return op.extend_to is None and op.rollback_to is None


def _int(value: object) -> int:
    if not isinstance(value, int):
        raise ValueError(f"expected an integer in the log, got {value!r}")
    return value


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string in the log, got {value!r}")
    return value
