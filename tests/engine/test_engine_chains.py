"""Deep snapshot chains under random snapshot, delete, rollback, clone and flatten sequences,
checked against frozen copies and across reopen."""

from __future__ import annotations

import random

import pytest

from storvisor.engine.home import Home
from storvisor.engine.pool import Pool
from storvisor.errors import Conflict

CS = 64 << 10
SIZE = 12 * CS


def read_all(pool: Pool, volume: str, snapshot: str | None = None) -> bytes:
    handle = pool.open_volume(volume, snapshot)
    try:
        buf = bytearray(handle.size)
        handle.read_into(0, memoryview(buf))
        return bytes(buf)
    finally:
        handle.close()


@pytest.mark.parametrize("seed", range(6))
def test_random_chain_operations(home: Home, pool: Pool, seed: int) -> None:
    rng = random.Random(seed)
    volumes: dict[str, bytearray] = {"v": bytearray(SIZE)}
    snaps: dict[tuple[str, str], bytes] = {}
    origins: dict[str, tuple[str, str]] = {}
    pool.create_volume("v", SIZE)
    for counter in range(1, 81):
        name = rng.choice(sorted(volumes))
        roll = rng.random()
        if roll < 0.45:
            handle = pool.open_volume(name)
            for _ in range(rng.randrange(1, 4)):
                offset = rng.randrange(SIZE)
                length = rng.randrange(1, min(SIZE - offset, 2 * CS) + 1)
                if rng.random() < 0.2:
                    handle.discard(offset, length)
                    volumes[name][offset : offset + length] = bytes(length)
                else:
                    data = rng.randbytes(length)
                    handle.write(offset, data)
                    volumes[name][offset : offset + length] = data
            handle.close()
        elif roll < 0.65:
            pool.create_snapshot(name, f"s{counter}")
            snaps[(name, f"s{counter}")] = bytes(volumes[name])
        elif roll < 0.8:
            candidates = [k for k in snaps if k[0] == name and k not in set(origins.values())]
            if candidates:
                key = rng.choice(sorted(candidates))
                pool.delete_snapshot(*key)
                del snaps[key]
        elif roll < 0.88:
            candidates = [k for k in snaps if k[0] == name]
            if candidates:
                key = rng.choice(sorted(candidates))
                pool.rollback(*key)
                volumes[name] = bytearray(snaps[key])
        elif roll < 0.95 and len(volumes) < 5:
            candidates = sorted(snaps)
            if candidates:
                key = rng.choice(candidates)
                new = f"c{counter}"
                pool.clone(*key, new)
                volumes[new] = bytearray(snaps[key])
                origins[new] = key
        elif name in origins:
            pool.flatten(name)
            del origins[name]
    for name, expected in volumes.items():
        assert read_all(pool, name) == expected, f"seed {seed}: {name}"
    for (volume, snap), frozen in snaps.items():
        assert read_all(pool, volume, snap) == frozen, f"seed {seed}: {volume}@{snap}"
    report = pool.fsck()
    assert report.clean, report
    home.close()
    with Home(home.path) as again:
        pool2 = again.pool("p")
        for name, expected in volumes.items():
            assert read_all(pool2, name) == expected, f"seed {seed}: {name} after reopen"
        for (volume, snap), frozen in snaps.items():
            assert read_all(pool2, volume, snap) == frozen
        # deleting everything returns every cluster (clones before their origins)
        remaining = set(volumes)
        for _ in range(len(volumes)):
            for name in sorted(remaining):
                try:
                    pool2.delete_volume(name)
                except Conflict:
                    continue
                remaining.discard(name)
        assert not remaining
        pool2.flush()
        assert pool2.info().stats.allocated == 0
        assert pool2.fsck().clean
