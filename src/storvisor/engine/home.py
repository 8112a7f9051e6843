"""The state directory (``$STORVISOR_HOME``) and the pools it holds.

Layout::

    HOME/lock                      flock()ed by the one process using HOME; holds "PID USER"
    HOME/pools/NAME/catalog.db     a pool's SQLite catalog (plus its -wal and -shm files)

Backing devices live wherever their paths say; a pool's catalog records them.

The lock
--------
One process at a time uses HOME: the daemon for its whole life, or one command (a CLI run
while no daemon serves) for its own. The holder takes ``flock(LOCK_EX)`` on ``HOME/lock`` and
then writes its record, ``PID USER`` and a newline (``USER`` is ``daemon`` or ``command``),
over the previous one; it empties the file before it lets go. A process that finds the lock
taken reads the record to say who holds it. The record is trusted only when it is a whole
line naming a live process: a holder that has just taken the lock may not have written it
yet (the file is then empty, or still holds the record of a holder killed earlier), so the
reader reads again for up to ``RECORD_WAIT`` seconds before it settles for "pid unknown".

A daemon waits (up to the ``wait`` it is given) for a command to finish, since commands are
short; it never waits for another daemon. A command never waits here: it learns from
``HomeInUse.holder`` whether a daemon holds HOME (then the caller talks to that daemon, once
its API answers).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import logging
import os
import shutil
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from storvisor.engine import object_pool
from storvisor.engine.cache import CacheSpec
from storvisor.engine.object_backing import is_object_pool
from storvisor.engine.pool import Pool, check_name
from storvisor.engine.s3 import S3Spec
from storvisor.engine.types import (
    BackingInfo,
    BackingKind,
    BackingSpec,
    CacheMode,
    PoolInfo,
    PoolState,
    PoolStats,
)
from storvisor.errors import (
    Conflict,
    CorruptMetadata,
    IOFailure,
    NotFound,
    StateError,
    StorvisorError,
)

__all__ = ["RECORD_WAIT", "Home", "HomeInUse", "HomeUser", "LockHolder", "Pool", "PoolOffline"]

log = logging.getLogger(__name__)

RECORD_WAIT = 1.0
"""Seconds a reader waits for a new holder of the lock to write its record."""

_POLL = 0.02


class HomeUser(enum.Enum):
    """Who holds the HOME lock."""

    DAEMON = "daemon"  # ``storvisor serve``, for its whole life
    COMMAND = "command"  # one command run without a daemon, for its own


@dataclass(frozen=True, slots=True)
class LockHolder:
    """The record a holder of the HOME lock wrote: its pid and what it is (``None``: a
    record without a user, as written by an older storvisor)."""

    pid: int
    user: HomeUser | None


class HomeInUse(Conflict):
    """Another process holds the HOME lock. ``holder`` is its record, ``None`` if it wrote
    none in time (then its pid is not known)."""

    def __init__(self, path: Path, holder: LockHolder | None) -> None:
        if holder is None:
            who = "another process (it has not written its pid)"
        elif holder.user is HomeUser.DAEMON:
            who = f"pid {holder.pid} (the storvisor daemon)"
        elif holder.user is HomeUser.COMMAND:
            who = f"pid {holder.pid} (a storvisor command)"
        else:
            who = f"pid {holder.pid}"
        super().__init__(f"{path} is in use by {who}")
        self.holder = holder


class PoolOffline(CorruptMetadata):
    """The pool could not be opened (``reason``: a backing device missing, unreadable,
    shorter than recorded or foreign); ``Home.reopen_pool`` tries again."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"pool {name!r} is offline: {reason}")
        self.reason = reason


class Home:
    """The state directory. Opening it takes an exclusive lock (``fcntl.flock`` on
    ``HOME/lock``; see the module docstring) as ``user``.

    If another process holds the lock, a ``DAEMON`` waits up to ``wait`` seconds for a
    command to let go (never for another daemon); then, and in every other case, this raises
    ``HomeInUse`` (a ``Conflict``) naming the holder. ``IOFailure`` if HOME cannot be
    created or opened.

    Thread-safe. Pools are opened on first use (or all at once in the background:
    ``open_all``) and cached until ``close``. A pool that fails to open is *offline*:
    ``pool`` raises ``PoolOffline`` with the reason, ``pools`` and ``pool_info`` report it
    (``PoolState.OFFLINE``), until ``reopen_pool`` opens it.

    What waits on the network runs without the HOME's lock, so that a slow or silent S3
    endpoint holds up only its own call: the open of a pool (an S3 pool's takes its lease
    and reads its catalog; a call for that pool waits for it, ``pools`` and ``pool_info``
    report it ``PoolState.OPENING``, calls for other pools go on), the creation, the import
    and the deletion of an S3 pool (its name is *reserved* meanwhile: another creation of it
    is refused, ``pool`` says what is under way, ``pools`` leaves it out) and the check of
    an endpoint being added. ``close`` waits for the opens under way.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        user: HomeUser = HomeUser.COMMAND,
        wait: float = 0.0,
    ) -> None:
        self.path = Path(path).absolute()
        try:
            (self.path / "pools").mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise IOFailure(f"cannot use {self.path}: {e.strerror}", e.errno or errno.EIO) from e
        try:
            self._take_lock(fd, wait if user is HomeUser.DAEMON else 0.0)
            record = f"{os.getpid()} {user.value}\n".encode()
            os.pwrite(fd, record, 0)  # over the old record: never an empty file while held
            os.ftruncate(fd, len(record))
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd
        self._lock = threading.RLock()
        self._pools: dict[str, Pool] = {}
        self._offline: dict[str, str] = {}
        self._reserved: dict[str, str] = {}
        """Names of S3 pools being created, imported or deleted without the lock: what."""
        self._opening: set[str] = set()
        """Pools being opened without the lock (``pool``)."""
        self._opened = threading.Condition(self._lock)
        """Notified when an open without the lock ends."""
        self._closing = False

    def _take_lock(self, fd: int, wait: float) -> None:
        """flock ``fd``, waiting up to ``wait`` seconds for a holder that is not a daemon."""
        deadline = time.monotonic() + wait
        record_deadline: float | None = None
        told: LockHolder | None = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            except OSError as e:
                raise IOFailure(
                    f"cannot lock {self.path}: {e.strerror}", e.errno or errno.EIO
                ) from e
            holder = _read_record(fd)
            now = time.monotonic()
            if holder is None:
                # Just taken, record not written yet: read again (the holder may also be gone).
                if record_deadline is None:
                    record_deadline = now + RECORD_WAIT
                if now >= max(record_deadline, deadline):
                    raise HomeInUse(self.path, None)
            else:
                record_deadline = None
                if holder.user is HomeUser.DAEMON or now >= deadline:
                    raise HomeInUse(self.path, holder)
                if holder != told:
                    told = holder
                    log.info("%s; waiting up to %g s", HomeInUse(self.path, holder), wait)
            time.sleep(_POLL)

    def create_pool(
        self, name: str, backings: Sequence[BackingSpec], cluster_size: int | None = None
    ) -> PoolInfo:
        """Create a pool over ``backings`` (see ``BackingSpec``); ``cluster_size`` defaults to
        64 KiB. Raises ``Conflict`` (name taken, device of another pool), ``InvalidArgument``,
        ``NotFound`` (missing device without a size). Leaves nothing behind on failure."""
        with self._lock:
            directory = self._free_directory(name)
            pool = Pool.create(directory, name, backings, cluster_size)
            self._pools[name] = pool
            return pool.info()

    def create_s3_pool(
        self,
        name: str,
        spec: S3Spec,
        *,
        size: int | None = None,
        object_size: int | None = None,
        cluster_size: int | None = None,
    ) -> PoolInfo:
        """Create a pool whose data and metadata live in an S3 bucket (``engine/object_pool``).
        Raises ``Conflict`` (name taken, bucket not empty), ``NotFound`` (no bucket),
        ``InvalidArgument`` (credentials refused, bad sizes), ``IOFailure`` (no endpoint
        answers). Leaves nothing behind on failure."""
        with self._reserving(name) as directory:
            pool = object_pool.create(
                directory,
                name,
                spec,
                size=size,
                object_size=object_size,
                cluster_size=cluster_size,
            )
            return self._publish(name, pool)

    def import_s3_pool(self, name: str, spec: S3Spec, *, force: bool = False) -> PoolInfo:
        """Open here the S3 pool another HOME released (``force``: whose holder is gone).
        Raises ``Conflict`` (name taken here, lease held elsewhere), ``NotFound``,
        ``InvalidArgument``, ``IOFailure``."""
        with self._reserving(name) as directory:
            pool = object_pool.import_(directory, name, spec, force=force)
            return self._publish(name, pool)

    @contextlib.contextmanager
    def _reserving(self, name: str) -> Iterator[Path]:
        """Reserve ``name`` for a pool made without the lock (its directory); ``Conflict``
        if the name is taken or reserved."""
        with self._lock:
            directory = self._free_directory(name)
            self._reserved[name] = "created"
        try:
            yield directory
        finally:
            with self._lock:
                self._reserved.pop(name, None)

    def _free_directory(self, name: str) -> Path:
        """The directory for a new pool ``name`` (with the lock held); ``Conflict`` if a
        pool has the name or a call without the lock is making or deleting one."""
        check_name(name, "pool")
        self._check_open()
        if name in self._reserved:
            raise Conflict(f"pool {name!r} is being {self._reserved[name]}")
        directory = self._dir(name)
        if directory.exists():
            raise Conflict(f"pool {name!r} already exists")
        return directory

    def _publish(self, name: str, pool: Pool) -> PoolInfo:
        """Add a pool made under a reservation; closed again if HOME closed meanwhile."""
        with self._lock:
            if self._lock_fd < 0:
                pool.close()
                raise StateError(f"{self.path} was closed while pool {name!r} was made")
            self._pools[name] = pool
            return pool.info()

    def add_endpoint(self, name: str, url: str) -> PoolInfo:
        """Add an endpoint to an S3 pool, online (``object_pool.add_endpoint``); the check
        that it serves the bucket (up to the pool's timeout) holds no lock of the HOME's.
        ``StateError`` if the pool closed meanwhile."""
        pool = self.pool(name)
        object_pool.add_endpoint(pool, url)
        with self._lock:
            if self._pools.get(name) is not pool:
                raise StateError(f"pool {name!r} was closed meanwhile")
            return pool.info()

    def set_cache(self, name: str, device: str | None, mode: CacheMode) -> PoolInfo:
        """Attach a cache tier to pool ``name`` on ``device`` (``PATH[:SIZE]``), change its
        mode, or detach it (``CacheMode.NONE``): ``Pool.set_cache``. A device that another
        pool of this HOME uses (as a cache or a backing device) is refused (``Conflict``).
        What can take long (an S3 import's objects fetched before a cache attaches, the
        destage before a detach) is waited for first, without the HOME's lock
        (``Pool.ready_cache``)."""
        spec = None if device is None else CacheSpec.parse(device)
        pool = self.pool(name)
        pool.ready_cache(mode)  # the long waits, holding no lock of the HOME's
        with self._lock:  # the check of the device and the switch: one at a time
            if self._pools.get(name) is not pool:
                raise StateError(f"pool {name!r} was closed meanwhile")
            return pool.set_cache(spec, mode, in_use=lambda path: self._device_user(path, name))

    def flush_cache(self, name: str) -> PoolInfo:
        """Destage everything pool ``name``'s cache holds (``Pool.flush_cache``). The flush
        and the wait for the destage, which take as long as the backing devices need, hold
        no lock of the HOME's: the pool's state (its dirty bytes going down) and the other
        pools stay available meanwhile. Raises ``StateError`` if the pool closes first."""
        pool = self.pool(name)
        pool.flush_cache()
        return self.pool_info(name)

    def _device_user(self, path: str, skip: str) -> str | None:
        real = os.path.realpath(path)
        for other, pool in self._pools.items():
            if other == skip:
                continue
            if pool.cache is not None and os.path.realpath(pool.cache.path) == real:
                return f"pool {other!r} (its cache)"
            for backing in pool.info().backings:
                if os.path.realpath(backing.path) == real:
                    return f"pool {other!r} (a backing device)"
        return None

    def remove_endpoint(self, name: str, url: str) -> PoolInfo:
        """Remove an endpoint of an S3 pool, online (``object_pool.remove_endpoint``)."""
        pool = self.pool(name)
        with self._lock:
            if self._pools.get(name) is not pool:
                raise StateError(f"pool {name!r} was closed meanwhile")
            object_pool.remove_endpoint(pool, url)
            return pool.info()

    def pools(self) -> list[PoolInfo]:
        """Every pool, by name (opening each one that nobody opens yet); an offline pool is
        reported, never raised, and so is a pool another call is opening (``OPENING``)."""
        with self._lock:
            names = self._names()
        found = []
        for name in names:  # without the lock: each may wait for its open
            with contextlib.suppress(NotFound):  # deleted meanwhile
                found.append(self.pool_info(name))
        return found

    def pool_info(self, name: str) -> PoolInfo:
        """The pool's record, with its state; opened here if nobody opens it yet. Raises
        ``NotFound`` only."""
        with self._lock:
            if name in self._opening:
                return _pool_info(self._dir(name), name, PoolState.OPENING, "being opened")
        try:
            pool = self.pool(name)
        except PoolOffline as e:
            return _pool_info(self._dir(name), name, PoolState.OFFLINE, e.reason)
        with self._lock:
            return pool.info()

    def open_all(self) -> list[str]:
        """Open every pool that is not open yet, each in a thread of its own; the names
        are claimed before this returns (``pool`` and ``wait_opened`` wait for those opens),
        and returned. A daemon starts them all at once, and its calls for a pool wait for
        that pool only. What fails leaves the pool offline (``pool``)."""
        with self._lock:
            claimed = [
                (name, self._claim(name))
                for name in self._names()
                if name not in self._pools
                and name not in self._opening
                and name not in self._offline
            ]
        for name, directory in claimed:
            threading.Thread(
                target=self._open_quietly, args=(name, directory), name=f"open-{name}", daemon=True
            ).start()
        return [name for name, _ in claimed]

    def _names(self) -> list[str]:
        """The pools of HOME, by name (with the lock held): their directories with a catalog,
        but for those being created, imported or deleted (reserved)."""
        self._check_open()
        return sorted(
            p.name
            for p in (self.path / "pools").iterdir()
            if (p / "catalog.db").exists() and p.name not in self._reserved
        )

    def wait_opened(self, name: str, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the open of pool ``name`` under way (if any)
        to end; whether none is under way now."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while name in self._opening:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._opened.wait(left)
            return True

    def _open_quietly(self, name: str, directory: Path) -> None:
        try:
            self._open_claimed(name, directory)
        except StorvisorError as e:  # offline (logged), or HOME closed meanwhile
            log.debug("pool %s not opened: %s", name, e)

    def pool(self, name: str) -> Pool:
        """The open pool ``name``, opened on first use: without the HOME's lock, so that calls
        for other pools go on meanwhile; a call for this pool waits for the open under way.
        Raises ``NotFound``, ``PoolOffline`` (a ``CorruptMetadata``) if it could not be
        opened, now or before (see ``reopen_pool``), ``StateError`` if HOME closes meanwhile.
        """
        check_name(name, "pool")
        with self._lock:
            while True:
                self._check_open()
                pool = self._pools.get(name)
                if pool is not None:
                    return pool
                if name not in self._opening:
                    break
                self._opened.wait()  # the whole lock let go meanwhile, even a caller's
            directory = self._claim(name)
        return self._open_claimed(name, directory)

    def _claim(self, name: str) -> Path:
        """Claim the open of pool ``name`` (with the lock held): its directory. Raises
        ``NotFound``, ``PoolOffline``."""
        if name in self._reserved:
            raise NotFound(f"pool {name!r} is being {self._reserved[name]}")
        if name in self._offline:
            raise PoolOffline(name, self._offline[name])
        directory = self._dir(name)
        if not (directory / "catalog.db").exists():
            raise NotFound(f"no pool named {name!r}")
        self._opening.add(name)
        return directory

    def _open_claimed(self, name: str, directory: Path) -> Pool:
        """Open the pool whose open this thread claimed, without the lock; publish it, or
        record it offline, and wake the calls waiting for it."""
        opened: Pool | None = None
        reason: str | None = None
        try:
            if is_object_pool(directory):
                opened = object_pool.open_(directory, name)
            else:
                opened = Pool.open(directory, name)
        except NotFound as e:
            raise NotFound(f"no pool named {name!r}") from e
        except StorvisorError as e:
            reason = str(e).removeprefix(f"pool {name!r}: ")
            log.info("pool %s is offline: %s", name, reason)
            raise PoolOffline(name, reason) from e
        finally:
            with self._lock:
                self._opening.discard(name)
                self._opened.notify_all()
                if reason is not None:
                    self._offline[name] = reason
                elif opened is not None:
                    self._pools[name] = opened  # ``close`` waits for this, then closes it
        return opened

    def reopen_pool(self, name: str) -> PoolInfo:
        """Open an offline pool again (its device is back), or bring a degraded pool back
        online (``Pool.recover``: every device syncs again; after a failed sync the pool
        returns to its last commit); an online pool is flushed.
        Raises ``NotFound``, ``PoolOffline`` with the reason it is still offline,
        ``IOFailure`` with the reason it is still degraded."""
        with self._lock:
            self._check_open()
            self._offline.pop(name, None)
        pool = self.pool(name)
        with self._lock:
            pool.recover()
            return pool.info()

    def delete_pool(self, name: str, *, force: bool = False) -> None:
        """Delete a pool: its catalog, the headers on its devices, and the files created for
        it; an S3 pool's objects too. Raises ``NotFound``; ``Conflict`` if it has volumes and
        not ``force``, or if a volume is open. A pool that cannot be opened
        (``CorruptMetadata``: a device is missing or foreign, or another host took an S3
        pool) is deleted with ``force`` by removing its local catalog only."""
        self.remove_pool(name, force=force)()

    def remove_pool(self, name: str, *, force: bool = False) -> Callable[[], None]:
        """``delete_pool`` in two steps: this one takes the pool out of HOME (what a caller
        checks before it must not change meanwhile), and returns the rest, to run without
        any lock: an S3 pool's objects erased from the bucket (as long as the bucket's
        endpoints take), then its directory. Meanwhile the name is reserved: the pool is not
        listed or opened, and no other pool takes the name. If the erasure fails, it raises,
        and the bucket keeps the objects not deleted yet. Such a pool stays, offline, until a
        deletion of it again finishes the erasure (``force``: or, when another host has
        taken its bucket since, removes the local directory only)."""
        with self._lock:
            directory = self._dir(name)
            if name not in self._pools and object_pool.erasing(directory):
                self._check_open()
                if name in self._reserved:
                    raise Conflict(f"pool {name!r} is being {self._reserved[name]}")
                self._offline.pop(name, None)
            else:
                try:
                    pool = self.pool(name)
                except CorruptMetadata:
                    if not force:
                        raise
                    shutil.rmtree(directory)
                    self._offline.pop(name, None)
                    return lambda: None
                if pool.volumes() and not force:
                    raise Conflict(f"pool {name!r} has volumes (use force to delete them too)")
                if pool.has_open_volumes():
                    raise Conflict(f"pool {name!r} has open volumes")
                if not is_object_pool(directory):
                    pool.destroy()
                    del self._pools[name]
                    shutil.rmtree(directory)
                    return lambda: None
                object_pool.begin_erasure(directory)  # before the image goes: see erase
                del self._pools[name]
                pool.destroy()
            self._reserved[name] = "deleted"

        def erase() -> None:
            try:
                try:
                    object_pool.erase(directory)
                except Conflict:
                    if not force:
                        raise
                    log.info("pool %s: another host holds its bucket; deleted here only", name)
                shutil.rmtree(directory)
            finally:
                with self._lock:
                    self._reserved.pop(name, None)

        return erase

    def close(self) -> None:
        """Flush and close every pool and drop the lock. Idempotent."""
        with self._lock:
            if self._lock_fd < 0:
                return
            self._closing = True  # no open starts now; those under way end first
            while self._opening:
                self._opened.wait()
            try:
                for pool in self._pools.values():
                    pool.close()
            finally:
                self._pools.clear()
                with contextlib.suppress(OSError):
                    os.ftruncate(self._lock_fd, 0)  # no record outlives its holder's lock
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
        if self._lock_fd < 0 or self._closing:
            raise StateError(f"{self.path} is closed")

    def __repr__(self) -> str:
        return f"<Home {self.path}>"


def _pool_info(directory: Path, name: str, state: PoolState, reason: str) -> PoolInfo:
    """What the catalog of a pool that is not open says (read-only; nothing when
    unreadable): an offline pool, or one being opened."""
    cluster_size = 0
    backings: list[BackingInfo] = []
    try:
        uri = f"file:{directory / 'catalog.db'}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
            for (value,) in db.execute("SELECT value FROM meta WHERE key = 'cluster_size'"):
                cluster_size = int(value)
            for (path,) in db.execute("SELECT path FROM devices ORDER BY idx"):
                backings.append(BackingInfo(str(path), _kind_of(str(path)), 0))
    except (sqlite3.Error, ValueError):
        pass
    stats = PoolStats(0, 0, 0, 0)
    return PoolInfo(name, cluster_size, tuple(backings), stats, state, reason)


def _kind_of(path: str) -> BackingKind:
    try:
        return BackingKind.BLOCK if stat.S_ISBLK(os.stat(path).st_mode) else BackingKind.FILE
    except OSError:
        return BackingKind.FILE


def _read_record(fd: int) -> LockHolder | None:
    """The lock holder's record if it is one whole line naming a live process."""
    line, newline, _ = os.pread(fd, 64, 0).decode("ascii", errors="replace").partition("\n")
    fields = line.split()
    if not newline or not fields or not fields[0].isdigit():
        return None
    pid = int(fields[0])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None  # a holder killed earlier; the new one has not written yet
    except PermissionError:
        pass  # alive, another user's
    users = {u.value: u for u in HomeUser}
    return LockHolder(pid, users.get(fields[1]) if len(fields) > 1 else None)
