"""Guest RAM of the Python front-end: memfd regions at guest-physical bases, "mapped" at a
fake user address space deliberately different from guest-physical (so a back-end that mixes
the two up fails), and a bump allocator for request buffers."""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

from storvisor.protocols.vhost_user.messages import MemoryRegion

USER_BASE = 0x7F00_0000_0000
"""Start of the fake user address space the regions are "mapped" at."""


@dataclass(frozen=True)
class RegionSpec:
    """One guest RAM region: ``size`` bytes at ``gpa``, ``mmap_offset`` bytes into its memfd."""

    gpa: int
    size: int
    mmap_offset: int = 0


@dataclass
class Region:
    """A region as shared: its memfd, our mapping of it, its fake user address."""

    spec: RegionSpec
    fd: int
    mm: mmap.mmap
    uva: int

    def contains(self, gpa: int, length: int = 1) -> bool:
        return self.spec.gpa <= gpa and gpa + length <= self.spec.gpa + self.spec.size


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


class GuestRam:
    """The guest's memory: one memfd per ``RegionSpec``, read and written by guest-physical
    address. Buffers are carved by a bump allocator from ``reserve``'s start on; ``rewind``
    starts it over (when nothing is in flight)."""

    def __init__(self, specs: list[RegionSpec]) -> None:
        self.regions: list[Region] = []
        uva = USER_BASE
        for spec in specs:
            fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
            os.ftruncate(fd, spec.mmap_offset + spec.size)
            mm = mmap.mmap(fd, spec.mmap_offset + spec.size, mmap.MAP_SHARED)
            self.regions.append(Region(spec, fd, mm, uva))
            uva += (spec.size + (1 << 30)) & ~0xFFF  # leave a gap: user != guest addresses
        self._alloc_start = 0
        self._alloc_next = 0
        self._alloc_region = 0

    def close(self) -> None:
        for r in self.regions:
            r.mm.close()
            os.close(r.fd)
        self.regions = []

    def mem_regions(self) -> list[MemoryRegion]:
        """The regions as a vhost-user memory table describes them."""
        return [
            MemoryRegion(r.spec.gpa, r.spec.size, r.uva, r.spec.mmap_offset) for r in self.regions
        ]

    @property
    def end(self) -> int:
        """The highest guest-physical address + 1."""
        return max(r.spec.gpa + r.spec.size for r in self.regions)

    # -- addressing -----------------------------------------------------------------------

    def region_of(self, gpa: int, length: int = 1) -> Region:
        for r in self.regions:
            if r.contains(gpa, length):
                return r
        raise ValueError(f"{gpa:#x}+{length} is not inside one region")

    def uva(self, gpa: int) -> int:
        r = self.region_of(gpa)
        return r.uva + (gpa - r.spec.gpa)

    def view(self, gpa: int, length: int) -> memoryview:
        r = self.region_of(gpa, length)
        start = r.spec.mmap_offset + gpa - r.spec.gpa
        return memoryview(r.mm)[start : start + length]

    def write(self, gpa: int, data: bytes) -> None:
        """Write guest memory (may cross adjacent regions)."""
        done = 0
        while done < len(data):
            r = self.region_of(gpa + done)
            n = min(len(data) - done, r.spec.gpa + r.spec.size - (gpa + done))
            with self.view(gpa + done, n) as v:
                v[:] = data[done : done + n]
            done += n

    def read(self, gpa: int, length: int) -> bytes:
        out = b""
        while len(out) < length:
            r = self.region_of(gpa + len(out))
            n = min(length - len(out), r.spec.gpa + r.spec.size - (gpa + len(out)))
            with self.view(gpa + len(out), n) as v:
                out += bytes(v)
        return out

    def u16(self, gpa: int) -> int:
        with self.view(gpa, 2) as v:
            value: int = v.cast("H")[0]
        return value

    def set_u16(self, gpa: int, value: int) -> None:
        with self.view(gpa, 2) as v:
            v.cast("H")[0] = value & 0xFFFF

    # -- buffers --------------------------------------------------------------------------

    def reserve(self, start: int) -> None:
        """Carve buffers from ``start`` on (what lies before it, e.g. the rings, is kept)."""
        self._alloc_start = self._alloc_next = start
        self._alloc_region = 0

    def alloc(self, length: int, align: int = 8) -> int:
        """Carve ``length`` bytes of guest memory (within one region)."""
        while True:
            r = self.regions[self._alloc_region]
            start = align_up(max(self._alloc_next, r.spec.gpa), align)
            if r.contains(start, length):
                self._alloc_next = start + length
                return start
            if self._alloc_region + 1 >= len(self.regions):
                raise MemoryError("guest memory exhausted; complete requests first")
            self._alloc_region += 1
            self._alloc_next = self.regions[self._alloc_region].spec.gpa

    def alloc_across(self, length: int) -> int:
        """A buffer straddling the end of one region and the start of the next (which must
        be GPA-adjacent)."""
        for a, b in zip(self.regions, self.regions[1:], strict=False):
            end = a.spec.gpa + a.spec.size
            if b.spec.gpa == end and length >= 2:
                return end - length // 2
        raise ValueError("no two GPA-adjacent regions")

    def rewind(self) -> None:
        """Carve from the start again (every buffer handed out so far is free)."""
        self._alloc_next = self._alloc_start
        self._alloc_region = 0
