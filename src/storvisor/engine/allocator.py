"""The in-memory cluster allocator of a pool, with placement in aligned groups.

Theory of operation
-------------------
Every backing device is cut into aligned *groups* of ``group`` device clusters, device
cluster ``d`` being data cluster ``d - 1`` (cluster 0 holds the header), so a group starts at
a byte offset that is a multiple of ``group * cluster_size`` on the device. A volume's
virtual clusters are grouped the same way (``vc // group``). Placement keeps a virtual group
in one physical group, at the same relative positions, so a large request over it is one
contiguous run on the device (one ``preadv``/``pwritev``) however the clusters were first
written (sequentially, randomly, by copy-on-write after a snapshot):

1. the caller gives the *anchor* of the virtual group, the physical number its position 0
   has in the group the same layer already uses (``p - pos(p)`` for a cluster ``p`` it
   owns there); the cluster at ``anchor + pos`` is taken when it is free;
2. otherwise a completely free group is taken, lowest first, and the cluster at ``pos`` in
   it;
3. only when no device has a free group left, any free cluster, lowest group first.

So this is placement, not reservation: the clusters of a group one layer started are
handed to anyone once no free group remains, and no space is ever lost.

State per device: a bitmap with one bit per device cluster (set: in use, or not a data
cluster: the header and the tail of a last, partial group), a used count per group and a
state byte per group (``_EMPTY``, ``_PARTIAL``, ``_FULL``) that ``bytearray.find`` searches
from a cursor below which no group of that state exists. With 64 KiB clusters that is 1/4
byte per cluster, 4 MiB per TiB of devices, whatever is allocated.

The allocator is rebuilt at open from the committed refcount table, so a cluster allocated
but never committed is simply free again after a crash. A released cluster stays in use,
as far as the allocator knows, until the commit that records its release calls
``recycle``; only then can ``allocate`` hand it out again, so a crash can never leave one
cluster mapped twice.
"""

from __future__ import annotations

from collections.abc import Iterable

from storvisor.engine.backing import LOCAL_MASK, PHYS_SHIFT
from storvisor.errors import NoSpace

GROUP_BYTES = 1 << 20
"""The size placement keeps contiguous: the largest request the exports commonly see."""
MAX_GROUP = 64
"""At most this many clusters per group (see ``group_clusters``)."""

_EMPTY, _PARTIAL, _FULL = 0, 1, 2


def group_clusters(cluster_size: int) -> int:
    """Clusters per placement group for ``cluster_size``: 1 MiB worth (16 at 64 KiB, 4 at
    256 KiB, 1 from 1 MiB up), but at most ``MAX_GROUP`` (256 KiB groups at 4 KiB)."""
    return max(1, min(MAX_GROUP, GROUP_BYTES // cluster_size))


class _Device:
    __slots__ = ("bits", "clusters", "counts", "next_empty", "next_partial", "state")

    def __init__(self) -> None:
        self.clusters = 0  # data clusters
        self.bits = bytearray()
        self.counts = bytearray()
        self.state = bytearray()
        self.next_empty = 0  # no _EMPTY group below
        self.next_partial = 0  # no _PARTIAL group below


class Allocator:
    """Hands out physical clusters of several devices, filling devices in index order and
    placing clusters by group (see the module docstring). Not thread-safe."""

    def __init__(self, devices: dict[int, int], used: Iterable[int], group: int = 1) -> None:
        """``devices``: data clusters per device index; ``used``: the committed in-use
        physical clusters (those outside every device are ignored); ``group``: clusters per
        group, a power of two up to 128."""
        if not 1 <= group <= 128 or group & (group - 1):
            raise ValueError(f"group must be a power of two up to 128, not {group}")
        self.group = group
        self._shift = group.bit_length() - 1
        self._devices: dict[int, _Device] = {}
        self.used = 0
        """Data clusters in use (allocated, or released but not yet recycled)."""
        for index in sorted(devices):
            self.set_device(index, devices[index])
        shift = self._shift
        for phys in used:  # the inner loop of ``_mark``, states set afterwards
            dev = self._devices.get(phys >> PHYS_SHIFT)
            if dev is None:
                continue
            d = (phys & LOCAL_MASK) + 1
            bits = dev.bits
            if d <= dev.clusters and not bits[d >> 3] >> (d & 7) & 1:
                bits[d >> 3] |= 1 << (d & 7)
                dev.counts[d >> shift] += 1
                self.used += 1
        states = bytes(_EMPTY if n == 0 else _FULL if n == group else _PARTIAL for n in range(256))
        for dev in self._devices.values():
            dev.state = dev.counts.translate(states)

    @property
    def capacity(self) -> int:
        """Clusters in all devices."""
        return sum(d.clusters for d in self._devices.values())

    def allocate(self, pos: int = 0, anchor: int | None = None) -> int:
        """A free physical cluster number; raises ``NoSpace`` when there is none.

        ``pos`` is the position of the virtual cluster in its group (``vc % group``);
        ``anchor`` the physical number position 0 of that virtual group has where the same
        layer already placed part of it (``p - pos(p)``), or None. See the module docstring
        for the order in which clusters are tried.
        """
        # the first two cases are ``_mark`` inlined: they run on every first write
        if anchor is not None:
            phys = anchor + pos
            dev = self._devices.get(phys >> PHYS_SHIFT)
            if dev is not None:
                d = (phys & LOCAL_MASK) + 1
                bits = dev.bits
                if d <= dev.clusters and not bits[d >> 3] >> (d & 7) & 1:
                    bits[d >> 3] |= 1 << (d & 7)
                    g = d >> self._shift
                    count = dev.counts[g] + 1
                    dev.counts[g] = count
                    dev.state[g] = _FULL if count == self.group else _PARTIAL
                    self.used += 1
                    return phys
        pos &= self.group - 1
        for index, dev in self._devices.items():
            g = dev.state.find(_EMPTY, dev.next_empty)
            if g < 0:
                dev.next_empty = len(dev.state)
                continue
            dev.next_empty = g + 1
            d = (g << self._shift) + pos
            dev.bits[d >> 3] |= 1 << (d & 7)
            dev.counts[g] = 1
            dev.state[g] = _FULL if self.group == 1 else _PARTIAL
            self.used += 1
            return index << PHYS_SHIFT | (d - 1)
        for index, dev in self._devices.items():
            g = dev.state.find(_PARTIAL, dev.next_partial)
            if g < 0:
                dev.next_partial = len(dev.state)
                continue
            dev.next_partial = g
            d = self._free_in(dev, g, pos)
            self._mark(dev, d)
            self.used += 1
            return index << PHYS_SHIFT | (d - 1)
        raise NoSpace()

    def unallocate(self, phys: int) -> None:
        """Return a cluster that was allocated but never published in any map."""
        self.recycle([phys])

    def recycle(self, released: Iterable[int]) -> None:
        """Make clusters whose release has been committed available again."""
        for phys in released:
            dev = self._devices.get(phys >> PHYS_SHIFT)
            if dev is None:
                continue
            d = (phys & LOCAL_MASK) + 1
            if d <= dev.clusters and dev.bits[d >> 3] >> (d & 7) & 1:
                self._unmark(dev, d)
                self.used -= 1

    def set_device(self, index: int, clusters: int) -> None:
        """Add a device or record that it grew (a device never shrinks)."""
        dev = self._devices.get(index)
        if dev is None:
            dev = self._devices[index] = _Device()
            self._extend(dev, clusters)
            self._mark(dev, 0)  # the header
            self._devices = dict(sorted(self._devices.items()))
        elif clusters > dev.clusters:
            self._extend(dev, clusters)

    # ------------------------------------------------------------------------ internals

    def _extend(self, dev: _Device, clusters: int) -> None:
        """Grow ``dev`` to ``clusters`` data clusters: new groups, and the former tail's
        clusters become free."""
        group, shift = self.group, self._shift
        old_slots = len(dev.state) << shift
        slots = clusters + 1
        groups = -(-slots // group)
        more = groups - len(dev.state)
        dev.bits.extend(bytes(((groups << shift) + 7 >> 3) - len(dev.bits)))
        dev.counts.extend(bytes(more))
        dev.state.extend(bytes(more))  # _EMPTY
        for d in range(dev.clusters + 1, min(old_slots, slots)):  # the former tail
            self._unmark(dev, d)
        for d in range(max(old_slots, slots), groups << shift):  # the new tail
            self._mark(dev, d)
        dev.clusters = clusters

    def _mark(self, dev: _Device, d: int) -> None:
        dev.bits[d >> 3] |= 1 << (d & 7)
        g = d >> self._shift
        count = dev.counts[g] + 1
        dev.counts[g] = count
        dev.state[g] = _FULL if count == self.group else _PARTIAL

    def _unmark(self, dev: _Device, d: int) -> None:
        dev.bits[d >> 3] &= ~(1 << (d & 7))
        g = d >> self._shift
        count = dev.counts[g] - 1
        dev.counts[g] = count
        if count:
            dev.state[g] = _PARTIAL
            dev.next_partial = min(dev.next_partial, g)
        else:
            dev.state[g] = _EMPTY
            dev.next_empty = min(dev.next_empty, g)

    def _free_in(self, dev: _Device, g: int, pos: int) -> int:
        """A free device cluster of the partial group ``g``: the one at ``pos`` if free."""
        bits = dev.bits
        start = g << self._shift
        d = start + pos
        if not bits[d >> 3] >> (d & 7) & 1:
            return d
        if self.group < 8:
            for d in range(start, start + self.group):
                if not bits[d >> 3] >> (d & 7) & 1:
                    return d
        else:
            for i in range(start >> 3, (start + self.group) >> 3):
                byte = bits[i]
                if byte != 0xFF:
                    return i << 3 | ((~byte & (byte + 1)).bit_length() - 1)
        raise AssertionError(f"group {g} is not partial")
