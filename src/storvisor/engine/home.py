"""The state directory (``$STORVISOR_HOME``) and the pools it holds.

Layout::

    HOME/lock                      flock()ed by the one process using HOME; holds its pid
    HOME/pools/NAME/catalog.db     a pool's SQLite catalog (plus its -wal and -shm files)

Backing devices live wherever their paths say; a pool's catalog records them.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path

from storvisor.engine.pool import Pool, check_name
from storvisor.engine.types import BackingSpec, PoolInfo
from storvisor.errors import Conflict, CorruptMetadata, IOFailure

__all__ = ["Home", "Pool"]


class Home:
    """The state directory. Opening it takes an exclusive lock (``fcntl.flock`` on
    ``HOME/lock``); a second process gets ``Conflict("... in use by pid N")``.

    Thread-safe. Pools are opened on first use and cached until ``close``.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).absolute()
        try:
            (self.path / "pools").mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise IOFailure(f"cannot use {self.path}: {e.strerror}", e.errno or errno.EIO) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise Conflict(f"{self.path} is in use by pid {holder}") from e
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        self._lock = threading.RLock()
        self._pools: dict[str, Pool] = {}

    def create_pool(
        self, name: str, backings: Sequence[BackingSpec], cluster_size: int | None = None
    ) -> PoolInfo:
        """Create a pool over ``backings`` (see ``BackingSpec``); ``cluster_size`` defaults to
        64 KiB. Raises ``Conflict`` (name taken, device of another pool), ``InvalidArgument``,
        ``NotFound`` (missing device without a size). Leaves nothing behind on failure."""
        check_name(name, "pool")
        with self._lock:
            self._check_open()
            directory = self._dir(name)
            if directory.exists():
                raise Conflict(f"pool {name!r} already exists")
            pool = Pool.create(directory, name, backings, cluster_size)
            self._pools[name] = pool
            return pool.info()

    def pools(self) -> list[PoolInfo]:
        """Every pool, by name (opening each one)."""
        with self._lock:
            self._check_open()
            names = sorted(
                p.name for p in (self.path / "pools").iterdir() if (p / "catalog.db").exists()
            )
            return [self.pool(name).info() for name in names]

    def pool(self, name: str) -> Pool:
        """The open pool ``name``. Raises ``NotFound``, ``CorruptMetadata``."""
        check_name(name, "pool")
        with self._lock:
            self._check_open()
            pool = self._pools.get(name)
            if pool is None:
                pool = Pool.open(self._dir(name), name)
                self._pools[name] = pool
            return pool

    def delete_pool(self, name: str, *, force: bool = False) -> None:
        """Delete a pool: its catalog, the headers on its devices, and the files created for
        it. Raises ``NotFound``; ``Conflict`` if it has volumes and not ``force``, or if a
        volume is open. A pool that cannot be opened (``CorruptMetadata``: a device is missing
        or foreign) is deleted with ``force`` by removing its catalog only."""
        with self._lock:
            try:
                pool = self.pool(name)
            except CorruptMetadata:
                if not force:
                    raise
                shutil.rmtree(self._dir(name))
                return
            if pool.volumes() and not force:
                raise Conflict(f"pool {name!r} has volumes (use force to delete them too)")
            if pool.has_open_volumes():
                raise Conflict(f"pool {name!r} has open volumes")
            pool.destroy()
            del self._pools[name]
            shutil.rmtree(self._dir(name))

    def close(self) -> None:
        """Flush and close every pool and drop the lock. Idempotent."""
        with self._lock:
            if self._lock_fd < 0:
                return
            try:
                for pool in self._pools.values():
                    pool.close()
            finally:
                self._pools.clear()
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
                self._lock_fd = -1

    def __enter__(self) -> Home:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _dir(self, name: str) -> Path:
        return self.path / "pools" / name

    def _check_open(self) -> None:
        if self._lock_fd < 0:
            raise Conflict(f"{self.path} is closed")

    def __repr__(self) -> str:
        return f"<Home {self.path}>"
