"""A FUSE file system that models a disk with a volatile write cache, for power-cut tests.

Theory of operation
-------------------
``PowercutFS`` mirrors a *backing* directory, which stands for what is on stable storage.
The content of every regular file (its bytes and its size) is volatile: writes, truncates and
extending writes are kept in memory in a per-file ``FileCache``, and reads see that cache over
the backing file. ``fsync`` or ``fdatasync`` of a file writes its cache through to the backing
file, which then holds exactly what the file showed at that moment. A cache outlives the
handles of its file: closing a file does not make its data durable.

Namespace operations (create, mkdir, unlink, rmdir, rename, symlink, chmod, utimens) are
applied to the backing directory before they return, as on a file system mounted with
``dirsync``: a name is durable at once, only a file's content is not.

A file whose name ends in ``-shm`` (SQLite's WAL index, which SQLite maps into memory and
rebuilds from the WAL when it opens a database no other process has open) is no durable state;
it is passed straight through, so shared mappings of it behave as on a local file system.

A *power cut* is a SIGKILL of the file-system process. The kernel then fails every request
not yet answered (``ENOTCONN``), so an ``fsync`` is acknowledged only once its data is in the
backing directory, and every cache vanishes with the process: the backing directory holds, for
each file, its content at its last sync. ``fusermount3 -u`` removes the dead mount. The cut
comes from outside (the test kills the process at a moment of its choosing) or, with
``cut_at_sync`` set to N, from the file system itself: it kills itself when the N-th sync of a
file arrives, before carrying it out. Ordering bugs (metadata made durable before the data it
points to) live between two syncs, where a cut at a random moment rarely lands.

With ``writeback`` set, the disk is harsher: after a write, with that probability, one dirty
512-byte sector of the file (its newest content) is written to the backing file early, as a
real cache may do at any time and in any order. A power cut then also leaves such sectors of
unsynced writes behind, never a size change.

The program::

    python -m storvisor.testing.powercut BACKING MOUNTPOINT [--writeback P] [--seed N] \\
        [--cut-at-sync N]

mounts the file system (single-threaded, in the foreground) and serves it until it is killed
or unmounted.
"""

from __future__ import annotations

import argparse
import errno
import os
import random
import signal
import stat
import sys
from collections.abc import Sequence

from storvisor.testing.passthrough import PassthroughFS, move_under

PAGE = 4096
"""Granularity of the cache."""
SECTOR = 512
"""Granularity of an early write-back."""


class FileCache:
    """The volatile state of one regular file over its backing file descriptor ``fd``.

    ``size`` is the size the file shows; backing bytes at or beyond ``zero_from`` (the lowest
    size since the last sync) read as zeros; ``pages`` holds the whole content of every page
    written since the last sync (zeros past ``size``).
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = os.fstat(fd).st_size
        self.zero_from = self.size
        self.pages: dict[int, bytearray] = {}

    def _base(self, offset: int, length: int) -> bytes:
        """The backing content of a range as the file shows it where no page is cached."""
        data = b""
        if offset < self.zero_from:
            data = os.pread(self.fd, min(length, self.zero_from - offset), offset)
        return data + bytes(length - len(data))

    def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (short at the end of the file)."""
        end = min(offset + length, self.size)
        parts: list[bytes] = []
        run = pos = offset
        while pos < end:
            index = pos // PAGE
            stop = min((index + 1) * PAGE, end)
            page = self.pages.get(index)
            if page is not None:
                if run < pos:
                    parts.append(self._base(run, pos - run))
                parts.append(bytes(page[pos - index * PAGE : stop - index * PAGE]))
                run = stop
            pos = stop
        if run < end:
            parts.append(self._base(run, end - run))
        return b"".join(parts)

    def write(self, offset: int, data: bytes) -> None:
        """Cache ``data`` at ``offset``, extending the file if it ends past ``size``."""
        pos, end = offset, offset + len(data)
        while pos < end:
            index = pos // PAGE
            start = index * PAGE
            stop = min(start + PAGE, end)
            page = self.pages.get(index)
            if page is None:
                page = bytearray(self._base(start, PAGE))
                if self.size < start + PAGE:  # bytes past the end read as zeros
                    page[max(self.size - start, 0) :] = bytes(start + PAGE - max(self.size, start))
                self.pages[index] = page
            page[pos - start : stop - start] = data[pos - offset : stop - offset]
            pos = stop
        self.size = max(self.size, end)

    def truncate(self, size: int) -> None:
        """Set the size; bytes between the old and a larger new size read as zeros."""
        if size < self.size:
            self.zero_from = min(self.zero_from, size)
            for index in [i for i in self.pages if i * PAGE >= size]:
                del self.pages[index]
            page = self.pages.get(size // PAGE)
            if page is not None:
                cut = size % PAGE
                page[cut:] = bytes(PAGE - cut)
        self.size = size

    def sync(self) -> None:
        """Write the cache through: the backing file then holds what the file shows."""
        if self.zero_from < os.fstat(self.fd).st_size:
            os.ftruncate(self.fd, self.zero_from)
        for index in sorted(self.pages):
            start = index * PAGE
            os.pwrite(self.fd, self.pages[index][: self.size - start], start)
        os.ftruncate(self.fd, self.size)
        self.pages.clear()
        self.zero_from = self.size

    def write_back_one(self, rng: random.Random) -> None:
        """Write one cached sector inside the backing file's size through early."""
        backing_size = os.fstat(self.fd).st_size
        candidates = [i for i in self.pages if i * PAGE < backing_size]
        if not candidates:
            return
        index = rng.choice(candidates)
        sector = rng.randrange(PAGE // SECTOR)
        offset = index * PAGE + sector * SECTOR
        if offset + SECTOR <= backing_size:
            data = self.pages[index][sector * SECTOR : (sector + 1) * SECTOR]
            os.pwrite(self.fd, data, offset)


class PowercutFS(PassthroughFS):
    """The file-system operations, in the form ``mfusepy.FUSE`` calls them: those of
    ``PassthroughFS``, with the content of volatile files in their ``FileCache``."""

    def __init__(
        self,
        backing: str,
        *,
        writeback: float = 0.0,
        seed: int = 0,
        cut_at_sync: int | None = None,
    ) -> None:
        super().__init__(backing)
        self.writeback = writeback
        self.cut_at_sync = cut_at_sync
        self.syncs = 0
        self.rng = random.Random(seed)
        self.caches: dict[str, FileCache] = {}

    def _cache(self, path: str | None) -> FileCache | None:
        """The cache of a volatile regular file (opened on first use); None for a
        pass-through file."""
        if path is None:
            raise OSError(errno.EBADF, "no path")
        cache = self.caches.get(path)
        if cache is None and not path.endswith("-shm"):
            cache = FileCache(os.open(self._real(path), os.O_RDWR | os.O_CLOEXEC))
            self.caches[path] = cache
        return cache

    def _forget(self, path: str) -> None:
        """Drop the state of ``path`` and of everything under it."""
        for key in [k for k in self.caches if k == path or k.startswith(path + "/")]:
            os.close(self.caches.pop(key).fd)
        super()._forget(path)

    def _moved(self, old: str, new: str) -> None:
        super()._moved(old, new)
        move_under(self.caches, old, new)

    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, int]:
        attrs = super().getattr(path, fh)
        assert path is not None
        cache = self.caches.get(path)
        if cache is not None:
            attrs["st_size"] = cache.size
        return attrs

    # -- namespace operations: durable when they return (PassthroughFS), new files volatile

    def create(self, path: str, mode: int, flags: int = 0) -> int:
        super().create(path, mode, flags)
        self._cache(path)
        return 0

    # -- file content

    def open(self, path: str, flags: int) -> int:
        if stat.S_ISREG(os.stat(self._real(path)).st_mode):
            self._cache(path)
        return 0

    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        cache = self._cache(path)
        if cache is None:
            return super().read(path, size, offset, fh)
        return cache.read(offset, size)

    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        cache = self._cache(path)
        if cache is None:
            return super().write(path, data, offset, fh)
        cache.write(offset, data)
        if self.writeback and self.rng.random() < self.writeback:
            cache.write_back_one(self.rng)
        return len(data)

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        cache = self._cache(path)
        if cache is None:
            return super().truncate(path, length, fh)
        cache.truncate(length)
        return 0

    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        """Write the file's cache through (a pass-through file is not synced). The
        ``cut_at_sync``-th sync of a volatile file cuts the power instead (the process kills
        itself)."""
        cache = self._cache(path)
        if cache is not None:
            self.syncs += 1
            if self.syncs == self.cut_at_sync:
                os.kill(os.getpid(), signal.SIGKILL)
            cache.sync()
        return 0

    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
        return 0  # names are durable already

    def destroy(self, path: str | None) -> None:
        """On unmount (never after a power cut): let go of the backing files. What was not
        synced is dropped, as a power cut would."""
        for cache in self.caches.values():
            os.close(cache.fd)
        self.caches.clear()
        super().destroy(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Mount ``PowercutFS`` and serve it until unmounted or killed."""
    parser = argparse.ArgumentParser(prog="python -m storvisor.testing.powercut")
    parser.add_argument("backing", help="directory that holds the durable state")
    parser.add_argument("mountpoint")
    parser.add_argument(
        "--writeback", type=float, default=0.0, help="chance that a write writes a sector back"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the early write-backs")
    parser.add_argument(
        "--cut-at-sync", type=int, default=None, help="cut the power at the N-th sync of a file"
    )
    args = parser.parse_args(argv)
    try:
        import mfusepy
    except ImportError as e:
        print(f"powercut: mfusepy is needed: {e}", file=sys.stderr)
        return 2
    fs = PowercutFS(
        args.backing, writeback=args.writeback, seed=args.seed, cut_at_sync=args.cut_at_sync
    )
    try:
        mfusepy.FUSE(fs, args.mountpoint, foreground=True, nothreads=True, fsname="powercut")
    except RuntimeError as e:
        print(f"powercut: cannot serve {args.mountpoint}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
