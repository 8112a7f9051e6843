"""The threads that serve virtqueues: one per running queue, and the I/O pool they share
for large requests (see the package docstring)."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import queue
import select
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from storvisor.errors import QueueBroken
from storvisor.protocols.vhost_user.backend import QueueSetup
from storvisor.protocols.virtio import blk
from storvisor.protocols.virtio.ring import Chain, SplitQueue

if TYPE_CHECKING:
    from storvisor.exports.vhost_user_blk.device import _Device

log = logging.getLogger(__name__)


_FENCE_LOCK = threading.Lock()


def _full_fence() -> None:
    """A full memory barrier: an uncontended lock uses a locked instruction on x86-64."""
    with _FENCE_LOCK:
        pass


OFFLOAD_BYTES = 128 << 10
"""Requests carrying at least this much data run on the server's I/O pool, so several large
copies proceed on several cores while the queue thread keeps popping."""


class _IOPool:
    """Threads running large requests for every queue of one server.

    A pool thread runs the request and completes it itself (:meth:`_QueueWorker.finish`):
    no hand-off back to the queue thread stands between the data copy and the call eventfd.
    """

    def __init__(self, threads: int) -> None:
        self.size = threads
        self._jobs: queue.SimpleQueue[tuple[_QueueWorker, Chain] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._run, name=f"vhost-blk-io{i}", daemon=True)
            for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, worker: _QueueWorker, chain: Chain) -> None:
        self._jobs.put((worker, chain))

    def shutdown(self) -> None:
        """Stop the threads once the requests already submitted are done."""
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()

    def _run(self) -> None:
        get = self._jobs.get
        while True:
            job = get()
            if job is None:
                return
            job[0].finish(job[1])
            job = None  # no guest-memory view kept while idle


class _QueueWorker:
    """One thread serving one virtqueue until :meth:`stop`.

    Small requests run inline on this thread. Large ones go to the I/O pool, whose thread
    runs them and publishes them in the used ring; ``_ring_lock`` serialises every write to
    the used ring (and the notification decision) between this thread and the pool, and
    every pop while the ring may be parked (see the module docstring).
    ``stop`` returns only once every request it popped has been completed.
    """

    def __init__(self, owner: _Device, setup: QueueSetup, queue: SplitQueue) -> None:
        self.owner = owner
        self.index = setup.index
        self.queue: SplitQueue | None = queue
        self.resubmit: list[int] = []
        self._stop = False
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._ring_lock = threading.Lock()
        self._pool = owner.server.io_pool()
        self._offloaded = 0  # under _ring_lock
        self._parked = False  # under _ring_lock: the pool pops this ring, kicks are off
        self._draining = False  # under _ring_lock: wake this thread when _offloaded drops
        self._failed = False
        self._thread = threading.Thread(
            target=self._run, name=f"vhost-blk-q{setup.index}", daemon=True
        )

    @property
    def ring_lock(self) -> threading.Lock:
        """Held while a completion is published (see ``_Device.set_features``)."""
        return self._ring_lock

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        os.eventfd_write(self._wake, 1)

    def stop(self) -> int:
        """Stop after the batch in progress and its offloaded requests; return the next
        avail index."""
        self._stop = True
        self.wake()
        self._thread.join()
        os.close(self._wake)
        assert self.queue is not None
        last_avail = self.queue.last_avail
        self.queue = None  # drop the ring views before memory is unmapped
        return last_avail

    def _run(self) -> None:
        owner = self.owner
        poller = select.poll()
        poller.register(self._wake, select.POLLIN)
        kick = owner.kick_fds[self.index]
        if kick is not None:
            poller.register(kick, select.POLLIN)
        try:
            try:
                self._resubmit()
                self._drain()
                owner.signal(self.index)  # once after (re)start, whatever happened before
                while not self._stop:
                    events = poller.poll(None if kick is not None else 1)
                    if self._stop:
                        break
                    for fd, _ in events:
                        _eventfd_clear(fd)
                    current = owner.kick_fds[self.index]
                    if current != kick:
                        if kick is not None:
                            poller.unregister(kick)
                        kick = current
                        if kick is not None:
                            poller.register(kick, select.POLLIN)
                    self._drain()
            finally:
                self._finish_offloaded()
                self._unpark()
        except QueueBroken as e:
            log.error("vhost-user-blk queue %d is broken: %s", self.index, e)
            owner.queue_broken(self.index)
        except Exception:  # a bug must not take the server down: fail the queue only
            log.exception("vhost-user-blk queue %d failed", self.index)
            owner.queue_broken(self.index)

    def _unpark(self) -> None:
        """Leave the driver kicking, whoever serves the ring next."""
        queue = self.queue
        assert queue is not None
        with self._ring_lock:
            self._parked = False
            queue.enable_notification()

    def _execute(self, chain: Chain) -> int:
        owner = self.owner
        return blk.execute(
            owner.block,
            chain,
            serial=owner.serial,
            writethrough=owner.writethrough,
            read_only=owner.read_only,
            vectored=owner.vectored,
        )

    def _complete(self, chain: Chain, used_len: int) -> None:
        """Publish ``chain`` (the caller holds ``_ring_lock`` when the pool may run)."""
        queue = self.queue
        assert queue is not None
        if self.owner.logging:
            if not chain.written:  # popped before logging began: its pages are still unknown
                recording, queue.record_writes = queue.record_writes, True
                try:
                    chain.written = queue.walk(chain.head).written
                finally:
                    queue.record_writes = recording
            # marked before the entry is published: a front-end that sees the completion
            # finds the pages in the log
            self.owner.log_completion(self.index, chain, queue.used_idx % queue.num)
            queue.push(chain.head, used_len)
        else:
            queue.push(chain.head, used_len)

    def _resubmit(self) -> None:
        queue = self.queue
        assert queue is not None
        queue.record_writes = self.owner.logging
        for head in self.resubmit:
            chain = queue.walk(head)
            self._complete(chain, self._execute(chain))
        self.resubmit = []

    def finish(self, chain: Chain) -> None:
        """Run an offloaded request and publish it; runs on a pool thread.

        While the ring is parked, also pop the next chain and hand it to the pool.
        """
        try:
            used_len: int | None = self._execute(chain)
        except Exception:
            log.exception("vhost-user-blk queue %d: offloaded request failed", self.index)
            used_len = None
        notify = False
        following: Chain | None = None
        with self._ring_lock:
            self._offloaded -= 1
            if used_len is None:
                self._failed = True
            else:
                self._complete(chain, used_len)
                queue = self.queue
                assert queue is not None
                notify = queue.should_notify()
                if self._parked and not (self._stop or self._draining or self._failed):
                    try:
                        following = self._pop_parked(queue)
                    except QueueBroken as e:
                        log.error("vhost-user-blk queue %d: %s", self.index, e)
                        self._failed = True
            wake = self._draining or self._failed
        if notify:
            self.owner.signal(self.index)
        if following is not None:
            assert self._pool is not None
            self._pool.submit(self, following)
        if wake:
            os.eventfd_write(self._wake, 1)  # open: this thread waits for the pool

    def _pop_parked(self, queue: SplitQueue) -> Chain | None:
        """Pop the next chain of a parked ring (under ``_ring_lock``); unpark it when empty.

        Counts the chain as offloaded. Raises ``RingError`` for a bad chain.
        """
        queue.record_writes = self.owner.logging
        chain = queue.pop()
        if chain is None and queue.enable_notification():  # arrived meanwhile
            queue.disable_notification()
            chain = queue.pop()
        if chain is None:
            self._parked = False  # kicks are on again; the queue thread takes over
        else:
            self._offloaded += 1
        return chain

    def _finish_offloaded(self) -> None:
        """Wait until the pool has completed every offloaded request (also after an error)."""
        poller = select.poll()
        poller.register(self._wake, select.POLLIN)
        while True:
            with self._ring_lock:
                self._draining = True
                if not self._offloaded:
                    return
            poller.poll(1000)
            _eventfd_clear(self._wake)

    def _drain(self) -> None:
        queue = self.queue
        assert queue is not None
        owner = self.owner
        execute = blk.execute
        device = owner.block
        serial = owner.serial
        read_only = owner.read_only
        vectored = owner.vectored
        pool = self._pool
        cap = pool.size if pool is not None else 0
        lock = self._ring_lock
        while True:
            if self._failed:
                raise QueueBroken("a request failed unexpectedly")
            served = 0
            writethrough = owner.writethrough
            queue.record_writes = owner.logging
            parked = False
            while not self._stop:  # a stop request ends the batch (GET_VRING_BASE waits)
                # Only this thread parks the ring, and pool threads pop it only while it is
                # parked: seen unparked here, the ring is this thread's alone (no lock).
                if self._parked:
                    parked = True
                    break
                chain = queue.pop()
                if chain is None:
                    break
                size = 0
                for view in chain.writable:
                    size += len(view)
                for view in chain.readable:
                    size += len(view)
                if size >= OFFLOAD_BYTES and pool is not None:
                    with lock:
                        self._offloaded += 1
                        if self._offloaded >= cap:
                            # every pool thread has work of this ring: they pop the
                            # next chains themselves as they finish, so kicks (and
                            # waking this thread) are not needed until the ring is empty
                            self._parked = parked = True
                            queue.disable_notification()
                    pool.submit(self, chain)
                    if parked:
                        break
                    continue
                used_len = execute(
                    device,
                    chain,
                    serial=serial,
                    writethrough=writethrough,
                    read_only=read_only,
                    vectored=vectored,
                )
                with lock:  # logging may have begun while the request ran
                    if owner.logging:
                        self._complete(chain, used_len)
                    else:
                        queue.push(chain.head, used_len)
                served += 1
            chain = None  # no guest-memory view outlives the batch
            if served:
                with lock:
                    notify = queue.should_notify()
                if notify:
                    owner.signal(self.index)
            if self._stop or parked or not queue.enable_notification():
                return


def _load_eventfd_write() -> Callable[[int, int], int] | None:
    try:
        func = ctypes.PyDLL(None, use_errno=True).eventfd_write
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_uint64]
    func.restype = ctypes.c_int
    return cast("Callable[[int, int], int]", func)


_EVENTFD_WRITE_KEEPING_GIL = _load_eventfd_write()


def _signal_eventfd(fd: int) -> None:
    """Add 1 to an eventfd without releasing the GIL (raises ``OSError``).

    The write takes a microsecond, while giving the GIL up and taking it back costs a
    wake-up of a competing thread each time, so the completing thread keeps it (libc's
    ``eventfd_write`` called through ``ctypes.PyDLL``; ``os.eventfd_write`` where that is
    missing). Call eventfds are non-blocking (QEMU's are); a blocking one would only block
    when its counter is about to overflow.
    """
    write = _EVENTFD_WRITE_KEEPING_GIL
    if write is None:
        os.eventfd_write(fd, 1)
    elif write(fd, 1) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _eventfd_clear(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass
    except OSError as e:
        if e.errno != errno.EAGAIN:
            raise
