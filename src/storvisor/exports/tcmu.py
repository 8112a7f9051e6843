"""The TCMU export: serves one volume as a LIO ``user`` backstore (``target_core_user``).

Theory of operation
-------------------
The backstore is created in configfs by the LIO integration with ``dev_config`` =
``storvisor/<export>``; the kernel then registers a uio device named
``tcm-user/<hba>/<backstore>/<dev_config>``. ``TcmuHandler.start`` finds it under
``/sys/class/uio`` (``find_uio``), opens ``/dev/uioN`` and maps ``maps/map0/size`` bytes of
it shared: the mailbox, the command ring and the data area that
``storvisor.protocols.tcmu`` decodes.

One thread at a time *owns* the ring: it waits for the kernel (a 4-byte ``read`` of the
uio fd, through ``poll`` so that ``close`` can wake it), fetches every new entry, hands each
CDB to the sans-I/O SCSI emulation (``storvisor.protocols.scsi``) and runs the I/O requests
of the batch itself, in ring order; then it completes the batch, writing every response into
the ring and notifying the kernel once (a 4-byte ``write`` of the uio fd). Running a batch
where it was fetched costs no thread hand-off: in a guest with emulated CPUs, waking a worker
and the owner again for each batch cost more than the request itself. A READ or WRITE moves
its data between the volume and its iovecs in the data area in one vectored call
(``exports.vectors``: a data plane's volume, counted and throttled) however many iovecs the
kernel made of it; a device without one is read and written iovec by iovec.

A request that does not end (a stalled backing device) must not hold up the others. A
*standby* thread wakes every ``TAKEOVER`` seconds and looks at the owner's progress stamp,
renewed before each request: when one request has run for longer, the standby takes the ring
over, completes what the stuck owner finished, runs the rest of its batch and serves on,
and a new standby is started (at most ``threads`` threads in all). The stuck thread, once its
request ends, completes it and stands by or ends. The kernel offers ``CAP_OOOC``, so
requests complete out of ring order.

An ``IOFailure`` of the volume fails only its command, with the sense
``storvisor.protocols.scsi.sense.io_error_sense`` picks (MEDIUM ERROR, DATA PROTECT for a
full pool...), and ``Unavailable`` (a remote store that did not answer) with BUSY, which
initiators retry; an unexpected exception fails its command with HARDWARE ERROR. A uio fd
that fails stops the loop; ``error`` then says why. So does a ring that breaks the layout
(``ProtocolError``), unless the handler was given ``reset_ring`` (the LIO integration gives
one that writes ``1`` to the backstore's ``action/reset_ring``): then the handler drops the
completions still to come, waits until no request runs (the kernel frees their data blocks
at the reset), resets the ring, which makes the kernel answer every command in flight BUSY
(initiators retry them) and start the ring again at 0, and serves on (``resets`` counts it).

The ring outlives the handler: a handler started on a ring that still holds commands (its
predecessor was killed) serves them first, before it waits for the kernel. The capacity is
read from the volume at each batch of commands and by ``notify_resized``, which the owner
calls after an online extend; the LUN then reports CAPACITY DATA HAS CHANGED once.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import gc
import logging
import mmap
import os
import select
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from storvisor.engine.device import BlockDevice, Buffer
from storvisor.engine.pio import slice_views
from storvisor.errors import (
    InvalidArgument,
    IOFailure,
    LocalFailure,
    NotFound,
    ProtocolError,
    StateError,
    StorvisorError,
    Unavailable,
)
from storvisor.exports.vectors import vectors_of
from storvisor.protocols import tcmu
from storvisor.protocols.scsi import (
    BUSY,
    GOOD,
    IoKind,
    IoRequest,
    LunIdentity,
    LunLimits,
    Reply,
    ScsiLun,
    check_condition,
    io_error_reply,
)
from storvisor.protocols.scsi.sense import INTERNAL_TARGET_FAILURE

log = logging.getLogger(__name__)

UioOpener = Callable[[str], tuple[int, int]]
"""Opens the uio device node at a path and returns (event fd, map fd): the fd to ``read``
and ``write`` 4 bytes on and the fd to map. For a real uio device both are the one fd
(``open_uio``); ``storvisor.testing.tcmu_kernel`` stands in for the kernel here."""

MAX_TRANSFER = 512 << 10
"""Largest READ or WRITE the LUN accepts (VPD B0h), tcm_loop's own limit of 1024 sectors;
at most half the data area is used for one command."""
_GATHER = 4  # writes of more iovecs are gathered into one buffer, reads scattered from one
_SAME_CHUNK = 1 << 20
_NOTIFY = bytes(4)
TAKEOVER = 0.1
"""Seconds one request may run before a standby thread takes the ring over."""


def open_uio(path: str) -> tuple[int, int]:
    """Open a uio device node read-write: the one fd serves events and the map."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    return fd, fd


def find_uio(dev_config: str, sysfs_root: str = "/sys") -> str:
    """The name (``uioN``) of the uio device of the TCMU backstore whose ``dev_config`` is
    ``dev_config``; its uio name is ``tcm-user/<hba>/<backstore>/<dev_config>``.

    Raises:
        NotFound: no such device (the backstore is not enabled, or target_core_user is not
            loaded).
    """
    base = os.path.join(sysfs_root, "class", "uio")
    try:
        names = sorted(os.listdir(base))
    except OSError:
        names = []
    for name in names:
        try:
            with open(os.path.join(base, name, "name")) as f:
                parts = f.read().strip().split("/", 3)
        except OSError:
            continue  # removed meanwhile
        if len(parts) == 4 and parts[0] == "tcm-user" and parts[3] == dev_config:
            return name
    raise NotFound(f"no TCMU device with dev_config {dev_config!r} in {base}")


@dataclass(frozen=True)
class UioRing:
    """An opened uio device of a TCMU backstore: its name (``uioN``), the size of its map,
    the fd to ``read`` and ``write`` 4 bytes on and the fd to map (one fd for a real
    device). Whoever holds it owns the fds (``close``), until a ``TcmuHandler`` is given it."""

    uio: str
    size: int
    event_fd: int
    map_fd: int

    def close(self) -> None:
        for fd in {self.event_fd, self.map_fd}:
            with contextlib.suppress(OSError):
                os.close(fd)


OPEN_BUSY_TIMEOUT = 10.0
"""Seconds ``open_ring`` retries a device another process still holds open (a handler's
process that was killed and is still exiting)."""


def open_ring(
    dev_config: str,
    *,
    sysfs_root: str = "/sys",
    dev_root: str = "/dev",
    opener: UioOpener = open_uio,
    busy_timeout: float = OPEN_BUSY_TIMEOUT,
) -> UioRing:
    """Find and open the uio device of the TCMU backstore ``dev_config``. The kernel lets
    one process at a time hold it open: ``EBUSY`` is retried for up to ``busy_timeout``.

    Raises:
        NotFound: no such device (``find_uio``), or its map is gone.
        LocalFailure: the device node cannot be opened.
    """
    uio = find_uio(dev_config, sysfs_root)
    size = map_size(uio, sysfs_root)
    path = os.path.join(dev_root, uio)
    deadline = time.monotonic() + busy_timeout
    while True:
        try:
            event_fd, map_fd = opener(path)
            return UioRing(uio, size, event_fd, map_fd)
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise LocalFailure(f"cannot open {path}: {e.strerror or e}") from e
        time.sleep(0.05)


def map_size(uio: str, sysfs_root: str = "/sys") -> int:
    """The size of map 0 of device ``uio`` (uio prints it in hex, ``0x...``).

    Raises:
        NotFound: the device or its map is gone.
    """
    path = os.path.join(sysfs_root, "class", "uio", uio, "maps", "map0", "size")
    try:
        with open(path) as f:
            return int(f.read().strip(), 16)
    except (OSError, ValueError) as e:
        raise NotFound(f"cannot read the map size of {uio}: {e}") from e


def lun_identity(serial: str, dev_config: str) -> LunIdentity:
    """The identity of the LUN a TCMU backstore serves: derived from the volume's stable
    ``serial``, or from the backstore's ``dev_config`` when it has none (stable too)."""
    return LunIdentity.for_volume(serial or dev_config)


_Done = tuple[int, int, bytes, int | None]
"""A completion: cmd_id, SCSI status, sense, read_len (``Ring.complete_many``)."""


class TcmuHandler:
    """Serves ``device`` on the TCMU backstore whose ``dev_config`` is ``dev_config``.

    Lifecycle: ``start`` (once), then ``close``; ``notify_resized`` at any time after an
    online extend. At most ``threads`` threads serve the ring: the owner and the standbys
    that take over from an owner stuck in a request (``threads - 1`` stuck at once).
    ``block_size`` (512 or 4096) defaults to 4096 for a device that prefers 4 KiB or more,
    else 512; it must match the backstore's ``hw_block_size``. ``opener`` is the seam where
    a test stands in for the kernel. ``reset_ring`` resets the kernel's ring
    (``action/reset_ring``); with it a broken ring is reset once no request has run for up
    to ``reset_timeout`` seconds, without it the handler stops. Given ``ring`` (a device
    ``open_ring`` opened, maybe in another process that passed its fds on), the handler
    serves it instead of looking the device up, and owns its fds from ``start`` on. The
    device is not closed by the handler.
    """

    def __init__(
        self,
        device: BlockDevice,
        dev_config: str,
        *,
        identity: LunIdentity,
        sysfs_root: str = "/sys",
        dev_root: str = "/dev",
        threads: int = 4,
        block_size: int | None = None,
        opener: UioOpener = open_uio,
        reset_ring: Callable[[], None] | None = None,
        reset_timeout: float = 30.0,
        ring: UioRing | None = None,
    ) -> None:
        self.device = device
        self.vectors = vectors_of(device)
        """The device's vectored I/O: a command's iovecs in one call (``exports.vectors``);
        None: iovec by iovec."""
        self.dev_config = dev_config
        self.identity = identity
        self.sysfs_root = sysfs_root
        self.dev_root = dev_root
        self.block_size = block_size or (4096 if device.block_size >= 4096 else 512)
        if threads < 2:
            raise InvalidArgument("a TCMU handler needs two threads at least: owner, standby")
        self._max_threads = threads
        self._open = opener
        self._given = ring
        self._reset_ring = reset_ring
        self.reset_timeout = reset_timeout
        self.resets = 0
        """How many times the ring was reset after it broke the layout."""
        self._broken: ProtocolError | None = None
        self._resetting = False
        self._busy = 0  # runs of requests under way (a stuck owner's included)
        self._idle = threading.Condition()
        self._turn = threading.Condition()  # who owns the ring; standbys wait on it
        self._owner = 0  # the owning thread's ident
        self._stamp: tuple[int, float] | None = None
        """(owner, when its current request began); None between runs."""
        self._standing = 0  # standby threads waiting
        self._fresh = True  # the next owner serves what a predecessor left in the ring
        self.uio: str | None = None
        self.error: StorvisorError | None = None
        """Why the loop stopped by itself (a broken ring, a failed uio fd), else None."""
        self._lock = threading.Lock()  # the ring
        self._done_lock = threading.Lock()
        self._done: list[_Done] = []
        self._draining = False
        self._pending: collections.deque[tuple[tcmu.Command, IoRequest]] = collections.deque()
        """I/O requests of the batch under way, not started yet (the owner pops them)."""
        self._threads: list[threading.Thread] = []
        self._started = False
        self._stopping = False
        self._event_fd = -1
        self._map_fd = -1
        self._map: mmap.mmap | None = None
        self._area: memoryview | None = None
        self._ring: tcmu.Ring | None = None
        self._lun: ScsiLun | None = None
        self._wake_r, self._wake_w = -1, -1

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Find and map the ring, serve the commands already in it, and start the loop.

        Raises:
            StateError: started before.
            NotFound: no uio device for ``dev_config``.
            LocalFailure: the device node cannot be opened or mapped.
            ProtocolError: the mailbox is not a TCMU version 2 mailbox.
        """
        if self._started:
            raise StateError("the TCMU handler was started before")
        self._started = True
        ring, self._given = self._given, None
        if ring is None:
            ring = open_ring(
                self.dev_config,
                sysfs_root=self.sysfs_root,
                dev_root=self.dev_root,
                opener=self._open,
            )
        self.uio = ring.uio
        self._event_fd, self._map_fd = ring.event_fd, ring.map_fd
        size = ring.size
        try:
            self._map = mmap.mmap(
                self._map_fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
            )
        except (OSError, ValueError) as e:  # ValueError: not a device, a short file
            self._release()
            reason = e.strerror if isinstance(e, OSError) else str(e)
            raise LocalFailure(f"cannot map {ring.uio}: {reason}") from e
        try:
            self._area = memoryview(self._map)
            self._ring = tcmu.Ring(self._area)
        except ProtocolError:
            self._release()
            raise
        data_area = size - (self._ring.cmdr_off + self._ring.cmdr_size)
        bs = self.block_size
        granularity = max(getattr(self.device, "cluster_size", bs) // bs, 1)
        limits = LunLimits(
            max_transfer=max(min(MAX_TRANSFER, data_area // 2) // bs, 1),
            unmap_granularity=granularity,
        )
        self._lun = ScsiLun(
            self.identity,
            block_size=bs,
            size=self.device.size,
            read_only=self.device.read_only,
            limits=limits,
        )
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._spawn(owner=True)
        self._spawn(owner=False)
        log.info("serving TCMU device %s (%s) for %s", self.uio, self.dev_config, self.device)

    def notify_resized(self) -> None:
        """Report the device's new size: the loop rereads it now and the LUN raises the
        unit attention CAPACITY DATA HAS CHANGED."""
        if self._wake_w >= 0:
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_w, b"r")

    def close(self, timeout: float = 60.0) -> None:
        """Stop fetching commands, complete the requests running, unmap the ring and close
        the uio device. Commands fetched and not started yet, and those the kernel queues
        later, stay in the ring for the next handler. Requests still running after
        ``timeout`` seconds (a stalled device) are left uncompleted: they stay in the ring
        too, and the next handler runs them again. Idempotent."""
        if self._stopping:
            return
        self._stopping = True
        if self._wake_w >= 0:
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_w, b"q")
        with self._turn:
            self._turn.notify_all()
        deadline = time.monotonic() + timeout
        for thread in list(self._threads):
            thread.join(max(deadline - time.monotonic(), 0))
        stuck = sum(thread.is_alive() for thread in self._threads)
        if stuck:
            log.warning(
                "TCMU %s closed with %d requests still running; they stay in the ring",
                self.uio,
                stuck,
            )
        self._pending.clear()  # not started: they stay in the ring too
        self._release()

    def _release(self) -> None:
        with self._lock:  # a late completion finds no ring and writes to no closed fd
            self._ring = None
            if self._area is not None:
                self._area.release()
                self._area = None
            if self._map is not None:
                # the kernel lets one process at a time open the device, and the mapping
                # holds it open: unmap now, so that the next handler can start at once
                try:
                    self._map.close()
                except BufferError:  # a view of a command is still referenced somewhere
                    gc.collect()
                    try:
                        self._map.close()
                    except BufferError:
                        log.warning("TCMU map of %s left to the garbage collector", self.uio)
                self._map = None
            for fd in {self._event_fd, self._map_fd, self._wake_r, self._wake_w} - {-1}:
                os.close(fd)
            self._event_fd = self._map_fd = self._wake_r = self._wake_w = -1

    # ------------------------------------------------------------------ the loop

    def _spawn(self, *, owner: bool) -> None:
        """Start a serving thread: the owner (once, at start) or a standby."""
        thread = threading.Thread(
            target=self._thread, args=(owner,), name=f"tcmu-{self.uio}", daemon=True
        )
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        if owner:
            self._owner = -1  # the thread's ident once it runs
        thread.start()

    def _thread(self, owner: bool) -> None:
        """Own the ring, or stand by to take it over; after losing it to a standby (a
        request of this thread's ran too long), stand by or end."""
        try:
            if owner:
                with self._turn:
                    self._owner = threading.get_ident()
            while True:
                if not owner and not self._stand_by():
                    return
                if self._own():
                    return  # closing
                owner = False  # taken over: its request has ended since
                with self._turn:
                    if self._standing:
                        return  # one standby is enough
        except (ProtocolError, LocalFailure) as e:
            traceback.clear_frames(e.__traceback__)
            self._stop_with(e)
            log.error("TCMU device %s stopped: %s", self.uio, e)
        except Exception as e:
            self._stop_with(LocalFailure(f"TCMU loop of {self.uio} failed: {e!r}"))
            log.exception("TCMU device %s stopped", self.uio)
            traceback.clear_frames(e.__traceback__)

    def _stop_with(self, error: StorvisorError) -> None:
        self.error = error
        with self._turn:
            self._turn.notify_all()  # the standbys end

    def _stand_by(self) -> bool:
        """Wait until the owner has run one request for ``TAKEOVER`` seconds, then take the
        ring over (and start the next standby while threads are left); False when the
        handler stops instead."""
        me = threading.get_ident()
        with self._turn:
            self._standing += 1
            try:
                while not self._stopping and self.error is None:
                    self._turn.wait(TAKEOVER)
                    stamp = self._stamp
                    if stamp is None or stamp[0] != self._owner:
                        continue
                    if time.monotonic() - stamp[1] < TAKEOVER:
                        continue
                    log.info(
                        "TCMU %s: a request has run for %.1f s; another thread serves on",
                        self.uio,
                        time.monotonic() - stamp[1],
                    )
                    self._owner, self._stamp = me, None
                    if sum(t.is_alive() for t in self._threads) < self._max_threads:
                        self._spawn(owner=False)
                    return True
                return False
            finally:
                self._standing -= 1

    def _own(self) -> bool:
        """Serve the ring while this thread owns it: True when the handler closes, False
        when a standby took it over. A ring that breaks the layout is reset (``_recover``)
        when the handler can, else this raises ``ProtocolError``."""
        poller = select.poll()
        poller.register(self._event_fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            try:
                return self._serve_owned(poller)
            except ProtocolError as e:
                if self._reset_ring is None or self._stopping:
                    raise
                self._recover(e)
                self._fresh = True

    def _serve_owned(self, poller: select.poll) -> bool:
        # after a takeover: complete what the stuck predecessor ran, run the rest of its
        # batch; then serve what a predecessor (or a reset) left in the ring
        first, self._fresh = self._fresh, False
        self._finish([])
        if not self._run_pending() or not self._serve(first=first):
            return False
        while not self._stopping:
            events = poller.poll()
            for fd, mask in events:
                if fd == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 64)
                elif mask & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                    raise LocalFailure(f"the uio fd of {self.uio} failed (poll {mask:#x})")
                else:
                    self._read_event()
            if self._broken is not None:  # found by a completion
                raise self._broken
            if not self._stopping and not self._serve():
                return False
        return True

    def _recover(self, cause: ProtocolError) -> None:
        """Reset a ring that broke the layout (``action/reset_ring``): wait until no
        request runs (the kernel frees their data blocks at the reset), have the kernel
        answer every command in flight BUSY (initiators retry them) and start again at 0.

        Raises:
            LocalFailure: requests still run after ``reset_timeout``, or the reset failed.
        """
        traceback.clear_frames(cause.__traceback__)
        log.error("TCMU device %s: %s; resetting the ring", self.uio, cause)
        with self._done_lock:
            self._resetting = True  # completions from now on are dropped
            self._done.clear()
        deadline = time.monotonic() + self.reset_timeout
        with self._idle:
            while self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LocalFailure(
                        f"TCMU ring of {self.uio} broke ({cause}) and {self._busy} runs of "
                        f"requests still run after {self.reset_timeout:g} s: not reset"
                    )
                self._idle.wait(left)
        assert self._reset_ring is not None and self._area is not None
        self._pending.clear()  # the kernel answers them BUSY at the reset
        with self._lock:
            try:
                self._reset_ring()
            except (OSError, NotFound) as e:
                reason = e.strerror if isinstance(e, OSError) else str(e)
                raise LocalFailure(f"reset of the ring of {self.uio}: {reason}") from e
            self._ring = tcmu.Ring(self._area)
        with self._done_lock:
            self._done.clear()
            self._resetting = False
        self._broken = None
        self.resets += 1
        log.warning("TCMU device %s: ring reset (%d so far)", self.uio, self.resets)

    def _read_event(self) -> None:
        try:
            os.read(self._event_fd, 4)
        except BlockingIOError:
            pass
        except OSError as e:
            raise LocalFailure(f"read of the uio fd of {self.uio}: {e.strerror}") from e

    def _serve(self, *, first: bool = False) -> bool:
        """Fetch every new entry, answer what needs no I/O, run the rest (``_run_pending``);
        False when a standby took the ring over meanwhile."""
        ring, lun = self._ring, self._lun
        assert ring is not None and lun is not None
        lun.resize(self.device.size)
        with self._lock:
            tail = ring.cmd_tail
            entries = ring.next_entries()
            if ring.cmd_tail != tail or first:
                # PAD/TMR entries passed, or what a predecessor completed and may not have
                # told the kernel: the kernel collects only when notified
                self._notify()
        done: list[_Done] = []
        pending = self._pending
        for entry in entries:
            if isinstance(entry, tcmu.TaskManagement):
                log.info(
                    "TCMU %s: task management %d for commands %s",
                    self.uio,
                    entry.tmr_type,
                    entry.cmd_ids,
                )
                continue
            try:
                result = lun.execute(entry.cdb, entry.iovecs)
            except Exception:
                log.exception("TCMU %s: command %d failed", self.uio, entry.cmd_id)
                result = check_condition(INTERNAL_TARGET_FAILURE)
            if isinstance(result, IoRequest):
                pending.append((entry, result))
            else:
                read_len = _scatter(result.data, entry.iovecs)
                done.append((entry.cmd_id, result.status, result.sense, read_len))
        del entries
        if done:
            self._finish(done)
        return self._run_pending()

    # ------------------------------------------------------------------ I/O

    def _run_pending(self) -> bool:
        """Run the pending requests in ring order, complete them; False when a standby
        took the ring over meanwhile (it runs the rest)."""
        me = threading.get_ident()
        pending = self._pending
        if not pending:
            return self._owner == me
        with self._idle:
            self._busy += 1
        try:
            while not self._stopping and self._owner == me:
                try:
                    command, request = pending.popleft()
                except IndexError:
                    break
                self._stamp = (me, time.monotonic())
                reply, read_len = self._execute(command.iovecs, request)
                done = (command.cmd_id, reply.status, reply.sense, read_len)
                del command, request  # drop the views of the data area first
                with self._done_lock:
                    self._done.append(done)
            with self._turn:
                if self._owner == me:
                    self._stamp = None
            self._finish([])  # before the run ends: a reset drops these, then proceeds
        finally:
            with self._idle:
                self._busy -= 1
                if not self._busy:
                    self._idle.notify_all()
        return self._owner == me

    def _execute(
        self, iovecs: Sequence[memoryview], request: IoRequest
    ) -> tuple[Reply, int | None]:
        device = self.device
        kind = request.kind
        try:
            if kind is IoKind.READ:
                if self.vectors is not None:
                    self.vectors.read_into(request.offset, slice_views(iovecs, 0, request.length))
                else:
                    _read(device, request.offset, request.length, iovecs)
                return GOOD, request.length
            if kind is IoKind.WRITE:
                if self.vectors is not None:
                    data = slice_views(iovecs, 0, request.length)
                    self.vectors.write(request.offset, data, fua=request.fua)
                else:
                    _write(device, request.offset, request.length, iovecs, request.fua)
            elif kind is IoKind.FLUSH:
                device.flush()
            elif kind is IoKind.UNMAP:
                for offset, length in request.ranges:
                    device.discard(offset, length)
            elif kind is IoKind.ZERO:
                device.write_zeroes(
                    request.offset, request.length, may_unmap=request.may_unmap, fua=request.fua
                )
            else:
                _write_same(device, request)
            return GOOD, None
        except Unavailable as e:  # nothing was lost: the initiator retries
            log.debug("TCMU %s: %s not done: %s", self.uio, request.kind.value, e)
            traceback.clear_frames(e.__traceback__)
            return BUSY, None
        except IOFailure as e:
            log.debug("TCMU %s: %s failed: %s", self.uio, request.kind.value, e)
            traceback.clear_frames(e.__traceback__)  # their views of the area must not live on
            return io_error_reply(request, e.errno), None
        except Exception as e:
            log.exception("TCMU %s: %s failed", self.uio, request.kind.value)
            traceback.clear_frames(e.__traceback__)
            return check_condition(INTERNAL_TARGET_FAILURE), None

    def _finish(self, done: list[_Done]) -> None:
        """Complete ``done``: the thread that finds nobody draining completes every
        pending completion, in batches, and notifies the kernel once per batch."""
        with self._done_lock:
            self._done.extend(done)
            if self._draining:
                return
            self._draining = True
        while True:
            with self._done_lock:
                batch, self._done = self._done, []
                if not batch:
                    self._draining = False
                    return
            self._complete(batch)

    def _complete(self, batch: list[_Done]) -> None:
        with self._lock:
            ring = self._ring
            if ring is None or self.error is not None or self._resetting or self._broken:
                return
            try:
                ring.complete_many(batch)
            except ProtocolError as e:
                if self._reset_ring is not None:  # the loop resets the ring
                    self._broken = e
                    with contextlib.suppress(BlockingIOError):
                        os.write(self._wake_w, b"x")
                    return
                self.error = e
                log.error("TCMU device %s stopped: %s", self.uio, e)
                return
            self._notify()

    def _notify(self) -> None:
        """Make the kernel collect the completions before ``cmd_tail`` (under the ring lock)."""
        try:
            os.write(self._event_fd, _NOTIFY)
        except OSError as e:
            if e.errno != errno.EBADF:
                log.error("TCMU %s: notifying the kernel failed: %s", self.uio, e)


def _scatter(data: Buffer, iovecs: Sequence[memoryview]) -> int | None:
    """Copy ``data`` into ``iovecs``; the number of bytes copied (None without data)."""
    if not data:
        return None
    pos = 0
    for iov in iovecs:
        n = min(len(iov), len(data) - pos)
        if n <= 0:
            break
        iov[:n] = data[pos : pos + n]
        pos += n
    return pos


def _read(device: BlockDevice, offset: int, length: int, iovecs: Sequence[memoryview]) -> None:
    if len(iovecs) > _GATHER:
        buf = bytearray(length)
        device.read_into(offset, memoryview(buf))
        _scatter(buf, iovecs)
        return
    pos = 0
    for iov in iovecs:
        n = min(len(iov), length - pos)
        if n <= 0:
            break
        device.read_into(offset + pos, iov[:n])
        pos += n


def _write(
    device: BlockDevice, offset: int, length: int, iovecs: Sequence[memoryview], fua: bool
) -> None:
    if len(iovecs) == 1 or len(iovecs) > _GATHER:
        data = iovecs[0] if len(iovecs) == 1 else memoryview(b"".join(iovecs))
        device.write(offset, data[:length], fua=fua)
        return
    pos = 0
    for iov in iovecs:
        n = min(len(iov), length - pos)
        if n <= 0:
            break
        device.write(offset + pos, iov[:n])
        pos += n
    if fua:
        device.flush()


def _write_same(device: BlockDevice, request: IoRequest) -> None:
    pattern = request.pattern
    chunk = pattern * max(min(_SAME_CHUNK, request.length) // len(pattern), 1)
    pos = 0
    while pos < request.length:
        n = min(len(chunk), request.length - pos)
        device.write(request.offset + pos, memoryview(chunk)[:n])
        pos += n
    if request.fua:
        device.flush()
