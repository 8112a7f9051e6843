"""How a workload reaches the storage (``Writer``) and how the checker reads it back
(``Reader``): over an engine pool in this process, or over a daemon's NBD or vhost-user-blk
exports and its management API."""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from storvisor.engine.device import BlockDevice
from storvisor.errors import IOFailure, NotFound


class Writer(Protocol):
    """How a workload reaches the storage. Targets are volume names; a snapshot is
    ``VOL@SNAP``. Every method returns once the operation has completed.

    ``management_durable`` says whether the management operations (``snapshot``, ``clone``,
    ``delete_snapshot``, ``delete_volume``, ``flatten``, ``rollback``, ``extend``) are durable
    when they return, together with every operation completed before they were issued;
    otherwise they are durable after the next ``flush``.
    """

    @property
    def management_durable(self) -> bool: ...

    def write(self, target: str, offset: int, data: bytes, *, fua: bool) -> None: ...

    def discard(self, target: str, offset: int, length: int) -> None: ...

    def write_zeroes(self, target: str, offset: int, length: int, *, may_unmap: bool) -> None: ...

    def flush(self) -> None:
        """Make every operation completed before this call durable, on every target."""

    def snapshot(self, volume: str, snapshot: str) -> None: ...

    def clone(self, volume: str, snapshot: str, new: str) -> None: ...

    def delete_snapshot(self, volume: str, snapshot: str) -> None: ...

    def delete_volume(self, volume: str) -> None:
        """Delete ``volume`` and its snapshots; the workload ``detach``es it first."""

    def flatten(self, volume: str) -> None: ...

    def rollback(self, volume: str, snapshot: str) -> None:
        """Roll ``volume`` back; the workload ``detach``es it first."""

    def extend(self, volume: str, size: int) -> None: ...

    def detach(self, target: str) -> bool:
        """Let go of ``target`` (close its handle, remove its export); the next operation on
        it attaches again. Returns whether this was a management operation, durable on
        return with everything completed before it (removing an export is; closing a
        handle of an engine in this process is not)."""


class Reader(Protocol):
    """How the checker reads what survived."""

    def read(self, target: str) -> bytes | None:
        """The whole content of ``target`` (``VOL`` or ``VOL@SNAP``), or None if missing."""


class PoolLike(Protocol):
    """The part of ``storvisor.engine.pool.Pool`` the engine writer and reader use."""

    def open_volume(self, volume: str, snapshot: str | None = None) -> BlockDevice: ...

    def create_snapshot(self, volume: str, snapshot: str) -> object: ...

    def clone(self, volume: str, snapshot: str, new: str) -> object: ...

    def delete_snapshot(self, volume: str, snapshot: str) -> None: ...

    def delete_volume(self, name: str) -> None: ...

    def flatten(self, volume: str) -> object: ...

    def rollback(self, volume: str, snapshot: str) -> object: ...

    def extend_volume(self, name: str, size: int) -> object: ...

    def flush(self) -> None: ...


class EngineWriter:
    """A ``Writer`` over an engine pool in this process. Handles stay open; ``flush`` flushes
    every handle written since the last flush, and the pool when its catalog changed."""

    def __init__(self, pool: PoolLike) -> None:
        self.pool = pool
        self.handles: dict[str, BlockDevice] = {}
        self.dirty: set[str] = set()
        self.catalog_changed = False

    @property
    def management_durable(self) -> bool:
        """The engine commits every management operation before returning."""
        return True

    def _handle(self, target: str) -> BlockDevice:
        if target not in self.handles:
            self.handles[target] = self.pool.open_volume(target)
        self.dirty.add(target)
        return self.handles[target]

    def write(self, target: str, offset: int, data: bytes, *, fua: bool) -> None:
        self._handle(target).write(offset, data, fua=fua)

    def discard(self, target: str, offset: int, length: int) -> None:
        self._handle(target).discard(offset, length)

    def write_zeroes(self, target: str, offset: int, length: int, *, may_unmap: bool) -> None:
        self._handle(target).write_zeroes(offset, length, may_unmap=may_unmap)

    def flush(self) -> None:
        for target in sorted(self.dirty):
            self.handles[target].flush()
        self.dirty.clear()
        if self.catalog_changed:
            self.pool.flush()
            self.catalog_changed = False

    def snapshot(self, volume: str, snapshot: str) -> None:
        self.pool.create_snapshot(volume, snapshot)
        self.catalog_changed = True

    def clone(self, volume: str, snapshot: str, new: str) -> None:
        self.pool.clone(volume, snapshot, new)
        self.catalog_changed = True

    def delete_snapshot(self, volume: str, snapshot: str) -> None:
        self.pool.delete_snapshot(volume, snapshot)
        self.catalog_changed = True

    def delete_volume(self, volume: str) -> None:
        self.detach(volume)
        self.pool.delete_volume(volume)
        self.catalog_changed = True

    def flatten(self, volume: str) -> None:
        self.pool.flatten(volume)
        self.catalog_changed = True

    def rollback(self, volume: str, snapshot: str) -> None:
        """Close this writer's handle on ``volume`` (a rollback needs it closed), then roll
        back; the handle is reopened by the next write."""
        self.detach(volume)
        self.pool.rollback(volume, snapshot)
        self.catalog_changed = True

    def extend(self, volume: str, size: int) -> None:
        self.pool.extend_volume(volume, size)
        self.catalog_changed = True

    def detach(self, target: str) -> bool:
        """Close the handle on ``target``: no management operation (returns False)."""
        handle = self.handles.pop(target, None)
        if handle is not None:
            handle.close()
        self.dirty.discard(target)
        return False

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()
        self.handles.clear()


class EngineReader:
    """A ``Reader`` over an engine pool in this process."""

    def __init__(self, pool: PoolLike) -> None:
        self.pool = pool

    def read(self, target: str) -> bytes | None:
        volume, _, snapshot = target.partition("@")
        try:
            device = self.pool.open_volume(volume, snapshot or None)
        except NotFound:
            return None
        try:
            buf = bytearray(device.size)
            device.read_into(0, memoryview(buf))
            return bytes(buf)
        finally:
            device.close()


NBD_CMD_FLAG_FUA = 1 << 0
"""NBD protocol: force unit access (as libnbd's ``CMD_FLAG_FUA``)."""
NBD_CMD_FLAG_NO_HOLE = 1 << 1
"""NBD protocol: WRITE_ZEROES must not punch a hole (as libnbd's ``CMD_FLAG_NO_HOLE``)."""


class NbdHandle(Protocol):
    """The part of a connected ``libnbd`` handle (``nbd.NBD``) the NBD writer uses."""

    def pwrite(self, buf: bytes, offset: int, flags: int = 0) -> None: ...

    def trim(self, count: int, offset: int, flags: int = 0) -> None: ...

    def zero(self, count: int, offset: int, flags: int = 0) -> None: ...

    def flush(self, flags: int = 0) -> None: ...


class Management(Protocol):
    """The part of the management API (``storvisor.api.client.Client``) the daemon writers
    use."""

    def create_snapshot(self, pool: str, volume: str, snapshot: str) -> object: ...

    def clone(self, pool: str, volume: str, snapshot: str, new: str) -> object: ...

    def delete_snapshot(self, pool: str, volume: str, snapshot: str) -> None: ...

    def delete_volume(self, pool: str, name: str) -> None: ...

    def flatten(self, pool: str, volume: str) -> object: ...

    def rollback(self, pool: str, volume: str, snapshot: str) -> object: ...

    def extend_volume(self, pool: str, name: str, size: int) -> object: ...


H = TypeVar("H")


class _DaemonWriter(Generic[H]):
    """What the writers that drive a daemon share: a data handle per target from
    ``connect`` (which exports the target first if needed; called when the target is first
    written), management over its API, and ``disconnect(target, handle)``, which closes the
    handle and removes the target's export (``detach``)."""

    def __init__(
        self,
        connect: Callable[[str], H],
        api: Management,
        pool: str,
        *,
        disconnect: Callable[[str, H | None], None] | None = None,
        management_durable: bool = True,
    ) -> None:
        self.connect = connect
        self.disconnect = disconnect
        self.api = api
        self.pool = pool
        self._management_durable = management_durable
        self.handles: dict[str, H] = {}
        self.dirty: set[str] = set()

    @property
    def management_durable(self) -> bool:
        """What the API promises for its management operations."""
        return self._management_durable

    def _handle(self, target: str) -> H:
        if target not in self.handles:
            self.handles[target] = self.connect(target)
        self.dirty.add(target)
        return self.handles[target]

    def snapshot(self, volume: str, snapshot: str) -> None:
        self.api.create_snapshot(self.pool, volume, snapshot)

    def clone(self, volume: str, snapshot: str, new: str) -> None:
        self.api.clone(self.pool, volume, snapshot, new)

    def delete_snapshot(self, volume: str, snapshot: str) -> None:
        self.api.delete_snapshot(self.pool, volume, snapshot)

    def delete_volume(self, volume: str) -> None:
        self.api.delete_volume(self.pool, volume)

    def flatten(self, volume: str) -> None:
        self.api.flatten(self.pool, volume)

    def rollback(self, volume: str, snapshot: str) -> None:
        """Roll back through the API; the volume must have no export holding it open."""
        self.api.rollback(self.pool, volume, snapshot)

    def detach(self, target: str) -> bool:
        """Close the handle on ``target`` and remove its export through ``disconnect``; the
        removal is a management operation (returns ``management_durable``)."""
        if self.disconnect is None:
            raise IOFailure("this writer cannot remove exports", errno.ENOTSUP)
        self._forget(target)
        self.disconnect(target, self.handles.pop(target, None))
        self.dirty.discard(target)
        return self._management_durable

    def _forget(self, target: str) -> None:
        """Drop whatever else refers to ``target``'s export (before it is removed)."""


class NbdWriter(_DaemonWriter[NbdHandle]):
    """A ``Writer`` that drives a daemon: data over NBD, management over its API.

    ``connect(volume)`` returns a connected handle on an NBD export of ``volume``; it is
    called again after an extend (an NBD export's size is fixed per connection). ``flush``
    flushes every connection written since the last flush.
    """

    def __init__(
        self,
        connect: Callable[[str], NbdHandle],
        api: Management,
        pool: str,
        *,
        disconnect: Callable[[str, NbdHandle | None], None] | None = None,
        management_durable: bool = True,
    ) -> None:
        super().__init__(
            connect, api, pool, disconnect=disconnect, management_durable=management_durable
        )
        self.retired: dict[str, list[NbdHandle]] = {}

    def write(self, target: str, offset: int, data: bytes, *, fua: bool) -> None:
        self._handle(target).pwrite(data, offset, NBD_CMD_FLAG_FUA if fua else 0)

    def discard(self, target: str, offset: int, length: int) -> None:
        self._handle(target).trim(length, offset)

    def write_zeroes(self, target: str, offset: int, length: int, *, may_unmap: bool) -> None:
        self._handle(target).zero(length, offset, 0 if may_unmap else NBD_CMD_FLAG_NO_HOLE)

    def flush(self) -> None:
        for target in sorted(self.retired):
            for handle in self.retired[target]:
                handle.flush()
        self.retired.clear()
        for target in sorted(self.dirty):
            self.handles[target].flush()
        self.dirty.clear()

    def extend(self, volume: str, size: int) -> None:
        """Extend through the API, then reconnect (an NBD export's size is fixed per
        connection); the old connection is flushed with the others at the next flush."""
        self.api.extend_volume(self.pool, volume, size)
        handle = self.handles.pop(volume, None)
        if handle is not None and volume in self.dirty:
            self.retired.setdefault(volume, []).append(handle)
        self.dirty.discard(volume)

    def _forget(self, target: str) -> None:
        self.retired.pop(target, None)


class VhostHandle(Protocol):
    """The part of ``storvisor.testing.vhost_frontend.BlkDriver`` the vhost-user
    writer uses (each returns a virtio-blk status)."""

    def write(self, offset: int, data: bytes) -> int: ...

    def discard(self, ranges: list[tuple[int, int, int]]) -> int: ...

    def write_zeroes(self, ranges: list[tuple[int, int, int]]) -> int: ...

    def flush(self) -> int: ...


class VhostWriter(_DaemonWriter[VhostHandle]):
    """A ``Writer`` that drives a daemon: data over vhost-user-blk exports (virtio-blk
    requests from ``connect(volume)``'s front-end), management over its API. Needs an
    ``aligned`` workload. FUA is a write followed by a flush (virtio-blk has none). A rollback
    needs the export removed first (``detach``)."""

    @staticmethod
    def _ok(status: int, what: str) -> None:
        if status != 0:
            raise IOFailure(f"vhost-user-blk {what} failed with status {status}", errno.EIO)

    def write(self, target: str, offset: int, data: bytes, *, fua: bool) -> None:
        handle = self._handle(target)
        self._ok(handle.write(offset, data), "write")
        if fua:
            self._ok(handle.flush(), "flush")

    def discard(self, target: str, offset: int, length: int) -> None:
        self._ok(self._handle(target).discard([(offset >> 9, length >> 9, 0)]), "discard")

    def write_zeroes(self, target: str, offset: int, length: int, *, may_unmap: bool) -> None:
        ranges = [(offset >> 9, length >> 9, 1 if may_unmap else 0)]
        self._ok(self._handle(target).write_zeroes(ranges), "write-zeroes")

    def flush(self) -> None:
        for target in sorted(self.dirty):
            self._ok(self.handles[target].flush(), "flush")
        self.dirty.clear()

    def extend(self, volume: str, size: int) -> None:
        """Extend through the API; the export follows (the back-end checks against the new
        size at once)."""
        self.api.extend_volume(self.pool, volume, size)
