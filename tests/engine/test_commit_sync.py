"""What the background commit makes durable: the clusters its metadata points at, and no more.

The page cache's own counters (``cachestat(2)``, Linux 6.5) show which pages of the backing
file are still dirty after a commit, so these tests see the difference between syncing the
newly allocated clusters, syncing the whole device, and syncing nothing.
"""

from __future__ import annotations

import ctypes
import os
import time
from contextlib import closing
from pathlib import Path

import pytest

from prereq import require
from storvisor.engine.backing import runs
from storvisor.engine.device import LIBC
from storvisor.engine.pool import Pool

SYS_CACHESTAT = 451  # x86_64 and aarch64 alike
CLUSTER = 64 << 10


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("cache", "dirty", "writeback", "evicted", "recently_evicted")
    ]


def dirty_pages(fd: int, offset: int, length: int) -> int:
    """Pages of ``[offset, offset + length)`` that are dirty or under writeback."""
    st = _Stat()
    rng = _Range(offset, length)
    if LIBC.syscall(SYS_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(st), 0) != 0:
        err = ctypes.get_errno()
        require(False, f"cachestat (Linux 6.5) is not available here: {os.strerror(err)}")
    return int(st.dirty + st.writeback)


@pytest.mark.parametrize(
    ("clusters", "expected"),
    [
        ([], []),
        ([7], [(7, 1)]),
        ([3, 1, 2], [(1, 3)]),
        ([5, 9, 6, 9, 10, 20], [(5, 2), (9, 2), (20, 1)]),
    ],
)
def test_runs(clusters: list[int], expected: list[tuple[int, int]]) -> None:
    assert list(runs(clusters)) == expected


def _wait_commit(pool: Pool, before: int) -> None:
    deadline = time.monotonic() + 5
    while pool.metadata_writes == before:
        assert time.monotonic() < deadline, "no background commit within 5 seconds"
        time.sleep(0.05)


def test_background_commit_syncs_new_clusters_and_leaves_overwrites_cached(
    pool: Pool, tmp_path: Path
) -> None:
    backing = pool._backings[0]
    require(backing.ranged, f"{tmp_path} is on a file system without ranged sync (ext4 or XFS)")
    pool.create_volume("v", 64 << 20)
    with closing(pool.open_volume("v")) as vol:
        vol.write(0, os.urandom(CLUSTER))
        vol.flush()
        (fd, old, _) = vol._state.view[0]
        vol.write(0, os.urandom(CLUSTER))  # in place: cached until a flush asks for it
        assert dirty_pages(fd, old, CLUSTER) > 0
        before = pool.metadata_writes
        vol.write(10 * CLUSTER, os.urandom(CLUSTER))  # allocates: metadata to commit
        (fd, new, _) = vol._state.view[10]
        _wait_commit(pool, before)
        assert dirty_pages(fd, new, CLUSTER) == 0, "the new cluster was committed unsynced"
        assert dirty_pages(fd, old, CLUSTER) > 0, "the background commit synced an overwrite"
        vol.flush()
        assert dirty_pages(fd, old, CLUSTER) == 0, "flush left an overwrite unsynced"


def test_background_commit_syncs_everything_without_ranged_sync(pool: Pool) -> None:
    backing = pool._backings[0]
    backing.ranged = False  # as on a file system the ranged sync is not known to be sound on
    pool.create_volume("v", 64 << 20)
    with closing(pool.open_volume("v")) as vol:
        vol.write(0, os.urandom(CLUSTER))
        vol.flush()
        (fd, old, _) = vol._state.view[0]
        vol.write(0, os.urandom(CLUSTER))
        before = pool.metadata_writes
        vol.write(10 * CLUSTER, os.urandom(CLUSTER))
        _wait_commit(pool, before)
        assert dirty_pages(fd, old, 2 << 20) == 0
