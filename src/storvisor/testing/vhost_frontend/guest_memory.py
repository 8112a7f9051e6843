"""Guest RAM of the Python front-end: memfd regions at guest-physical bases, with a fake
user address space deliberately different from guest-physical."""

from __future__ import annotations

import mmap
from dataclasses import dataclass

USER_BASE = 0x7F00_0000_0000
"""Start of the fake user address space the regions are "mapped" at."""


@dataclass(frozen=True)
class RegionSpec:
    """One guest RAM region: ``size`` bytes at ``gpa``, ``mmap_offset`` bytes into its memfd."""

    gpa: int
    size: int
    mmap_offset: int = 0


@dataclass
class _Region:
    spec: RegionSpec
    fd: int
    mm: mmap.mmap
    uva: int

    def contains(self, gpa: int, length: int = 1) -> bool:
        return self.spec.gpa <= gpa and gpa + length <= self.spec.gpa + self.spec.size
