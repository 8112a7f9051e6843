"""The processes of this machine as /proc shows them, for tests and benchmarks that look
after storvisor's data-plane processes (which of them a daemon started, whether they ended
with it)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    pid: int
    ppid: int
    state: str
    """``R``, ``S``, ``Z`` (ended, not yet reaped) ..."""
    cmdline: tuple[bytes, ...]
    cpu_ticks: int
    """User plus system time so far, in clock ticks."""


def process(pid: int) -> ProcessInfo | None:
    """What /proc says of ``pid``; None when there is no such process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    return ProcessInfo(
        pid, int(fields[1]), fields[0], tuple(cmdline), int(fields[11]) + int(fields[12])
    )


def processes() -> list[ProcessInfo]:
    """Every process there is now."""
    infos = (process(int(entry)) for entry in os.listdir("/proc") if entry.isdigit())
    return [info for info in infos if info is not None]


def children(pid: int) -> list[ProcessInfo]:
    """The live (not ended) children of ``pid``."""
    return [p for p in processes() if p.ppid == pid and p.state != "Z"]


def data_planes(pid: int) -> list[int]:
    """The live data-plane processes (``exports/nbd_worker.py``) that ``pid`` started,
    sorted."""
    return sorted(c.pid for c in children(pid) if b"storvisor.exports.nbd_worker" in c.cmdline)


def open_files(pid: int, prefix: str) -> list[str]:
    """The fds of ``pid`` open on a path that starts with ``prefix``, as ``"FD->PATH"``
    (empty for a process that ended)."""
    found = []
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):  # closed meanwhile
                target = os.readlink(fd)
                if target.startswith(prefix):
                    found.append(f"{fd.name}->{target}")
    except OSError:
        return []  # gone meanwhile
    return found


def family(pid: int) -> list[int]:
    """``pid`` and its live descendants."""
    kids: dict[int, list[int]] = {}
    for p in processes():
        kids.setdefault(p.ppid, []).append(p.pid)
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(kids.get(current, []))
    return out


def gone(pid: int) -> bool:
    """Whether ``pid`` has ended (no such process, or a zombie)."""
    info = process(pid)
    return info is None or info.state == "Z"


def wait_gone(pids: Iterable[int], timeout: float = 10.0) -> None:
    """Return once every process of ``pids`` has ended; ``TimeoutError`` otherwise."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while not gone(pid):
            if time.monotonic() > deadline:
                raise TimeoutError(f"process {pid} is still running")
            time.sleep(0.05)
