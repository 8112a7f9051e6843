"""The in-memory cluster allocator of a pool.

It is rebuilt at open from the committed refcount table, so a cluster allocated but never
committed is simply free again after a crash. A released cluster stays in use, as far as the
allocator knows, until the commit that records its release calls ``recycle``; only then can
``allocate`` hand it out again, so a crash can never leave one cluster mapped twice.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from storvisor.engine.backing import phys_number, split_phys
from storvisor.errors import NoSpace


@dataclass
class _Device:
    clusters: int
    high: int = 0  # clusters [0, high) have been handed out at some time
    free: list[int] = field(default_factory=list)  # free clusters below ``high``

    @property
    def available(self) -> int:
        return self.clusters - self.high + len(self.free)


class Allocator:
    """Hands out physical clusters, filling devices in index order. Not thread-safe."""

    def __init__(self, devices: dict[int, int], used: Iterable[int]) -> None:
        self._devices = {index: _Device(clusters) for index, clusters in devices.items()}
        taken: dict[int, set[int]] = {index: set() for index in devices}
        for phys in used:
            index, local = split_phys(phys)
            if index in taken and local < devices[index]:
                taken[index].add(local)
        for index, locals_ in taken.items():
            dev = self._devices[index]
            dev.high = max(locals_, default=-1) + 1
            dev.free = sorted(set(range(dev.high)) - locals_, reverse=True)
        self.used = sum(len(t) for t in taken.values())

    @property
    def capacity(self) -> int:
        """Clusters in all devices."""
        return sum(d.clusters for d in self._devices.values())

    def allocate(self) -> int:
        """A free physical cluster number; raises ``NoSpace`` when there is none."""
        for index, dev in self._devices.items():
            if dev.free:
                local = dev.free.pop()
            elif dev.high < dev.clusters:
                local = dev.high
                dev.high += 1
            else:
                continue
            self.used += 1
            return phys_number(index, local)
        raise NoSpace()

    def unallocate(self, phys: int) -> None:
        """Return a cluster that was allocated but never published in any map."""
        self.recycle([phys])

    def recycle(self, released: Iterable[int]) -> None:
        """Make clusters whose release has been committed available again."""
        for phys in released:
            index, local = split_phys(phys)
            dev = self._devices.get(index)
            if dev is not None and local < dev.high:
                dev.free.append(local)
                self.used -= 1

    def set_device(self, index: int, clusters: int) -> None:
        """Add a device or record that it grew."""
        dev = self._devices.setdefault(index, _Device(clusters))
        dev.clusters = max(dev.clusters, clusters)
