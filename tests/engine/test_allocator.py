"""The cluster allocator on its own: groups, anchors, fallback, recycle, rebuild, growth."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storvisor.engine.allocator import Allocator, group_clusters
from storvisor.engine.backing import phys_number, split_phys
from storvisor.errors import NoSpace


def drain(alloc: Allocator) -> list[int]:
    """Allocate until ``NoSpace``; every cluster handed out."""
    got = []
    while True:
        try:
            got.append(alloc.allocate())
        except NoSpace:
            return got


@pytest.mark.parametrize(
    ("cluster_size", "group"),
    [(4 << 10, 64), (16 << 10, 64), (64 << 10, 16), (256 << 10, 4), (1 << 20, 1), (2 << 20, 1)],
)
def test_group_size_per_cluster_size(cluster_size: int, group: int) -> None:
    assert group_clusters(cluster_size) == group


def test_a_virtual_group_lands_in_one_aligned_group() -> None:
    alloc = Allocator({0: 100}, [], 4)
    # device cluster d = local + 1 (0 is the header): group 0 holds locals 0-2, group 1
    # locals 3-6, ... so the first free group is group 1
    first = alloc.allocate(2)
    assert first == 3 + 2
    anchor = first - 2
    assert [alloc.allocate(pos, anchor) for pos in (0, 3, 1)] == [3, 6, 4]
    # another virtual group without an anchor takes the next free group
    assert alloc.allocate(1) == 7 + 1
    # a taken anchor slot sends the cluster to a new group
    assert alloc.allocate(2, anchor) == 11 + 2
    assert alloc.used == 6


def test_anchor_outside_the_devices_is_ignored() -> None:
    alloc = Allocator({0: 20, 1: 20}, [], 4)
    assert alloc.allocate(1, -4) == 3 + 1
    assert alloc.allocate(1, phys_number(5, 0)) == 7 + 1
    assert alloc.allocate(3, phys_number(0, 17)) == 11 + 3  # beyond device 0's end
    assert split_phys(alloc.allocate(0, phys_number(1, 0))) == (1, 0)


def test_fallback_when_no_group_is_free_loses_no_cluster() -> None:
    alloc = Allocator({0: 11}, [], 4)  # header + 3 clusters, then two whole groups
    assert alloc.allocate(1) == 4
    assert alloc.allocate(1) == 8
    rest = drain(alloc)
    assert sorted([4, 8, *rest]) == list(range(11))
    assert rest[:3] == [0, 1, 2]  # the header's group, lowest group first
    assert alloc.used == 11
    with pytest.raises(NoSpace):
        alloc.allocate(0, 0)


def test_fallback_prefers_the_slot_of_the_position() -> None:
    alloc = Allocator({0: 7}, [], 4)  # group 0: locals 0-2, group 1: locals 3-6
    assert alloc.allocate(0) == 3
    assert alloc.allocate(2) == 1  # no free group: position 2 of group 0 is local 1
    assert alloc.allocate(0) == 0  # position 0 is the header: the first free one


def test_released_clusters_come_back_only_through_recycle() -> None:
    alloc = Allocator({0: 8}, [], 4)  # group 0: locals 0-2, group 1: locals 3-6, tail 7
    taken = drain(alloc)
    assert sorted(taken) == list(range(8))
    with pytest.raises(NoSpace):
        alloc.allocate()
    alloc.recycle([3, 4, 5, 6])  # a whole group is free again
    assert alloc.used == 4
    assert alloc.allocate(2) == 5  # and is taken as a free group, at the position
    alloc.unallocate(5)
    alloc.recycle([5, 123])  # a second release, or a cluster never handed out: no effect
    assert alloc.used == 4
    assert sorted(drain(alloc)) == [3, 4, 5, 6]


def test_rebuild_from_the_used_set() -> None:
    used = [0, 1, 5, 9, 10, 11, 12, phys_number(1, 2), phys_number(7, 1), 10_000]
    alloc = Allocator({0: 20, 1: 7}, used, 4)
    assert alloc.used == 8  # unknown devices and clusters beyond the end are ignored
    assert alloc.capacity == 27
    # device 0: group 0 (locals 0-2) partial, group 1 (3-6) partial, group 2 (7-10) partial,
    # group 3 (11-14) partial, group 4 (15-18) free, tail 19; device 1 group 1 (3-6) free
    assert alloc.allocate(0) == 15
    assert alloc.allocate(0) == phys_number(1, 3)
    rest = drain(alloc)
    everything = {phys_number(0, n) for n in range(20)} | {phys_number(1, n) for n in range(7)}
    assert set(rest) == everything - set(used) - {15, phys_number(1, 3)}
    assert len(rest) == len(set(rest))


def test_add_and_grow_devices() -> None:
    alloc = Allocator({0: 5}, [], 4)  # group 0: locals 0-2, group 1: locals 3, 4 + tail
    assert alloc.allocate(1) == 0  # no whole group: first fit
    alloc.set_device(0, 11)  # group 1 is whole now (locals 3-6), group 2: 7-10
    assert alloc.allocate(1) == 4
    assert alloc.allocate(1) == 8
    alloc.set_device(1, 8)
    assert alloc.allocate(3) == phys_number(1, 6)
    alloc.set_device(0, 3)  # never shrinks
    assert alloc.capacity == 19
    rest = drain(alloc)
    assert len(rest) + 4 == 19 == alloc.used


@settings(max_examples=60, deadline=None)
@given(
    group=st.sampled_from([1, 2, 4, 16]),
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    ops=st.lists(
        st.tuples(st.sampled_from(["alloc", "hint", "release", "commit", "grow"]), st.integers()),
        max_size=200,
    ),
)
def test_never_hands_out_a_cluster_twice(
    group: int, sizes: list[int], ops: list[tuple[str, int]]
) -> None:
    devices = dict(enumerate(sizes))
    alloc = Allocator(devices, [], group)
    owned: list[int] = []
    released: list[int] = []
    for op, n in ops:
        if op in ("alloc", "hint"):
            anchor = owned[n % len(owned)] - n % group if op == "hint" and owned else None
            try:
                phys = alloc.allocate(n % group, anchor)
            except NoSpace:
                assert len(owned) + len(released) == sum(devices.values())
                continue
            index, local = split_phys(phys)
            assert local < devices[index]
            assert phys not in owned and phys not in released
            owned.append(phys)
        elif op == "release" and owned:
            released.append(owned.pop(n % len(owned)))
        elif op == "commit":
            alloc.recycle(released)
            released.clear()
        elif op == "grow":
            index = n % (len(devices) + 1)
            devices[index] = devices.get(index, 0) + n % 7
            alloc.set_device(index, devices[index])
        assert alloc.used == len(owned) + len(released)
    assert alloc.capacity == sum(devices.values())
    rebuilt = Allocator(devices, owned + released, group)
    assert rebuilt.used == alloc.used
    assert set(drain(rebuilt)).isdisjoint(owned + released)
    assert rebuilt.used == alloc.capacity
