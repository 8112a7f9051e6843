"""The durability log: where a workload records what it issued and what completed.

One record is a JSON object with a type ``t`` and, for everything but ``ready`` and
``idle``, the ``seq`` of the operation it is about (unique within a log). Records that issue
an operation are appended *before* it is issued: ``op`` (a write, discard or write-zeroes),
``flush``, ``fork`` (a snapshot or clone), ``delete`` (a snapshot or a volume), ``rollback``,
``extend``, ``flatten`` and ``detach`` (the writer let go of a target: an export removed).
Records that complete one are appended after it returned: ``done``, ``durable`` (a flush
returned) and ``committed`` (a management operation that is durable on return returned).
A record may name the ``stream`` (the workload thread) that appended it. Data is never
logged: a write carries ``(off, len, seed)`` and ``payload(seed, len)`` regenerates it.
"""

from __future__ import annotations

import json
import os
import random
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

SECTOR = 512
"""Granularity at which a torn, unflushed write may be partly visible."""

ISSUES = frozenset({"op", "flush", "fork", "delete", "rollback", "extend", "flatten", "detach"})
"""Record types that issue an operation."""
COMPLETES = frozenset({"done", "durable", "committed"})
"""Record types that complete one."""


def payload(seed: int, length: int) -> bytes:
    """The bytes a logged write of ``length`` bytes with ``seed`` carried."""
    return random.Random(seed).randbytes(length)


class Log(Protocol):
    """Where the workload appends records; a record must be out of the process when
    ``append`` returns (so that it survives a SIGKILL right after). Must be safe to call
    from several threads."""

    def append(self, record: Mapping[str, object]) -> None: ...


class FdLog:
    """A ``Log`` writing one JSON object per line to a file descriptor (a pipe or a file)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._lock = threading.Lock()

    def append(self, record: Mapping[str, object]) -> None:
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        view = memoryview(line)
        with self._lock:
            while view:
                view = view[os.write(self.fd, view) :]


class ListLog:
    """A ``Log`` kept in memory, for a workload that runs in the checking process.

    ``on_append(record)``, when given, is called after each record is stored, in the thread
    that appended it: a killer watching for a moment (``committed``: a management operation
    just returned) acts before the workload issues anything else.
    """

    def __init__(self, on_append: Callable[[Mapping[str, object]], None] | None = None) -> None:
        self.records: list[dict[str, object]] = []
        self.on_append = on_append
        self._lock = threading.Lock()

    def append(self, record: Mapping[str, object]) -> None:
        with self._lock:
            self.records.append(dict(record))
        if self.on_append is not None:
            self.on_append(record)

    def in_flight(self) -> list[dict[str, object]]:
        """The records of operations issued and not (yet) completed, oldest first."""
        with self._lock:
            return in_flight(self.records)


def in_flight(records: Iterable[Mapping[str, object]]) -> list[dict[str, object]]:
    """The issuing records among ``records`` that no completion record follows."""
    issued: dict[object, dict[str, object]] = {}
    for record in records:
        kind = record.get("t")
        if kind in ISSUES:
            issued[record.get("seq")] = dict(record)
        elif kind in COMPLETES:
            issued.pop(record.get("seq"), None)
    return list(issued.values())


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
