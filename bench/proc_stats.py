"""CPU use of benchmark servers from /proc: a process and its descendants (storvisor's
data-plane processes), user plus system time."""

from __future__ import annotations

import os

from storvisor.testing.procs import family, process

__all__ = ["cpu_seconds", "family", "family_cpu"]


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU seconds these processes have used so far."""
    infos = (process(pid) for pid in pids)
    return sum(info.cpu_ticks for info in infos if info is not None) / os.sysconf("SC_CLK_TCK")


def family_cpu(pid: int) -> float:
    """CPU seconds used so far by ``pid`` and its live descendants."""
    return cpu_seconds(family(pid))
