"""``SharedMap`` (the owner's side) against ``MapReader.lookup`` (a data plane's side), through
a real memfd mapped twice, as in two processes."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from storvisor.engine.backing import phys_number
from storvisor.engine.sharedmap import MapReader, SharedMap

CS = 64 << 10


@pytest.fixture
def maps() -> Iterator[tuple[SharedMap, MapReader]]:
    owner = SharedMap("test", 100 * CS, CS)
    reader = MapReader(os.dup(owner.fd))
    yield owner, reader
    reader.close()
    os.close(reader.fd)
    owner.close()


@pytest.mark.parametrize(
    ("device", "local"), [(0, 0), (0, 12345), (3, 7), (1, (1 << 40) - 1), (1023, 1)]
)
def test_lookup_gives_device_offset_and_ownership(
    maps: tuple[SharedMap, MapReader], device: int, local: int
) -> None:
    owner, reader = maps
    phys = phys_number(device, local)
    assert reader.lookup(5) is None
    owner.set(5, phys)
    assert reader.lookup(5) == (device, (local + 1) * CS, True)  # cluster 0 is the header
    owner.set_shared(5, phys)
    assert reader.lookup(5) == (device, (local + 1) * CS, False)
    owner.set(5, None)
    assert reader.lookup(5) is None


def test_a_snapshot_shares_every_cluster_even_when_the_epoch_wraps(
    maps: tuple[SharedMap, MapReader],
) -> None:
    owner, reader = maps
    local = {99: 77777}  # vc -> local cluster number on device 0; 99 is written only once
    owner.set(99, phys_number(0, 77777))
    for round_ in range(5000):  # the 12-bit epoch wraps once in between
        vc = round_ % 50
        local[vc] = round_
        owner.set(vc, phys_number(0, round_))
        assert reader.lookup(vc) == (0, (round_ + 1) * CS, True)
        owner.share_all((v, phys_number(0, n), True) for v, n in local.items())
        found = {v: reader.lookup(v) for v in range(100)}
        expect = {v: (0, (local[v] + 1) * CS, False) if v in local else None for v in range(100)}
        assert found == expect, f"round {round_}"


def test_beyond_the_mapping_until_remapped(maps: tuple[SharedMap, MapReader]) -> None:
    owner, reader = maps
    assert reader.size == 100 * CS
    first = reader.clusters
    assert first >= 100
    owner.resize(100 * first * CS)
    owner.set(100 * first - 1, phys_number(2, 9))
    assert reader.size == 100 * first * CS  # the header word is shared at once...
    with pytest.raises(IndexError):
        reader.lookup(100 * first - 1)  # ...the new clusters once remapped
    reader.remap()
    assert reader.clusters >= 100 * first
    assert reader.lookup(100 * first - 1) == (2, 10 * CS, True)
