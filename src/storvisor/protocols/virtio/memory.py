"""Guest memory as the back-end sees it: a set of regions, each a writable ``memoryview``.

The I/O shell maps each region's fd and hands this module a view of the mapped bytes that
start at the region's first byte (``map + mmap_offset``). Two address spaces lead into it:

* guest-physical addresses (descriptor buffers, indirect tables, the dirty log):
  ``host = view[gpa - guest_phys_addr]``;
* the front-end's user addresses (``SET_VRING_ADDR``): ``host = view[uva - userspace_addr]``.

A buffer that crosses from one region into the next (GPA-adjacent RAM, e.g. hot-plugged) is
split into one ``memoryview`` per region. Any address outside every region raises
:class:`GuestMemoryError`, a :class:`~storvisor.errors.QueueBroken`: the queue that used the
address is broken, the connection lives on.
"""

from __future__ import annotations

from dataclasses import dataclass

from storvisor.errors import QueueBroken


class GuestMemoryError(QueueBroken):
    """An address or length points outside guest memory; the queue that used it is broken."""


@dataclass(frozen=True, slots=True)
class GuestRegion:
    """One mapped region: ``view`` holds exactly ``size`` bytes starting at ``gpa``/``uva``."""

    gpa: int
    size: int
    uva: int
    view: memoryview


class GuestMemory:
    """An immutable set of non-overlapping regions. Replace it as a whole on a new table."""

    __slots__ = ("_last", "regions")

    def __init__(self, regions: list[GuestRegion]) -> None:
        for r in regions:
            if len(r.view) != r.size:
                raise ValueError("region view does not match its size")
        self.regions = sorted(regions, key=lambda r: r.gpa)
        self._last = self.regions[0] if self.regions else None

    def _find_gpa(self, gpa: int) -> GuestRegion:
        last = self._last
        if last is not None and last.gpa <= gpa < last.gpa + last.size:
            return last
        for r in self.regions:
            if r.gpa <= gpa < r.gpa + r.size:
                self._last = r
                return r
        raise GuestMemoryError(f"guest address {gpa:#x} is outside guest memory")

    def gpa_views(self, gpa: int, length: int, out: list[memoryview]) -> None:
        """Append views covering ``[gpa, gpa+length)``, one per region crossed."""
        if length < 0 or gpa < 0 or gpa + length > 1 << 64:
            raise GuestMemoryError(f"bad guest buffer {gpa:#x}+{length}")
        while length:
            r = self._find_gpa(gpa)
            start = gpa - r.gpa
            n = min(length, r.size - start)
            out.append(r.view[start : start + n])
            gpa += n
            length -= n

    def gpa_view(self, gpa: int, length: int) -> memoryview:
        """A single view of ``[gpa, gpa+length)``; ``GuestMemoryError`` if it is not inside
        one region (used for small structures that must be contiguous)."""
        r = self._find_gpa(gpa)
        start = gpa - r.gpa
        if length < 0 or start + length > r.size:
            raise GuestMemoryError(f"guest range {gpa:#x}+{length} crosses a region end")
        return r.view[start : start + length]

    def read_gpa(self, gpa: int, length: int) -> bytes:
        """Copy ``length`` bytes at ``gpa`` (may cross regions)."""
        views: list[memoryview] = []
        self.gpa_views(gpa, length, views)
        return b"".join(views)

    def uva_view(self, uva: int, length: int) -> memoryview:
        """A view of ``[uva, uva+length)`` in the front-end's address space; it must lie in
        one region (rings do)."""
        for r in self.regions:
            if r.uva <= uva and uva + length <= r.uva + r.size:
                start = uva - r.uva
                return r.view[start : start + length]
        raise GuestMemoryError(f"user address {uva:#x}+{length} is outside guest memory")

    def uva_to_gpa(self, uva: int) -> int:
        """Translate a front-end user address to guest-physical."""
        for r in self.regions:
            if r.uva <= uva < r.uva + r.size:
                return r.gpa + (uva - r.uva)
        raise GuestMemoryError(f"user address {uva:#x} is outside guest memory")
