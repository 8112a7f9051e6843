"""Reads and writes bounded by a timeout: a pool's I/O threads.

Theory of operation
-------------------
A ``preadv`` or ``pwritev`` that stalls cannot be interrupted, and while it runs it holds
the buffer it was given. A request bounded by a timeout therefore never hands the caller's
buffer to the system call: the volume reads into a private bounce buffer (copied to the
caller's only once the read finished in time) and writes from a private copy of the
caller's data. The work runs on one of the pool's ``IoThreads``; the caller waits for it up
to the timeout. Past it, the caller *abandons* the request (``Request.abandon``) and fails
it; the work goes on in its thread until the system call returns, but touches nothing the
caller owns, and an allocating write that finds its request abandoned maps nothing
(``Request.lock`` is held while it publishes, so abandoning and publishing exclude each
other). A request abandoned before a thread picked it up never runs.

The threads are daemon threads, started on demand up to ``limit``: a stalled request
holds its thread, and the requests behind a full set of stalled threads wait in the queue
(and time out without running). Nothing here runs unless a pool's data timeout is set.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from queue import SimpleQueue

_local = threading.local()


class Request:
    """One bounded read or write: its state, guarded by ``lock``."""

    __slots__ = ("abandoned", "done", "error", "finished", "lock", "started", "work")

    def __init__(self, work: Callable[[], None]) -> None:
        self.work = work
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.started = False
        self.finished = False
        self.abandoned = False
        self.error: BaseException | None = None

    def abandon(self) -> bool:
        """Give up on the request unless it finished meanwhile; True if it was abandoned
        (its outcome is then never looked at)."""
        with self.lock:
            if self.finished:
                return False
            self.abandoned = True
            return True


def current() -> Request | None:
    """The request this thread runs (None outside an I/O thread)."""
    request: Request | None = getattr(_local, "request", None)
    return request


class IoThreads:
    """Up to ``limit`` daemon threads that run bounded requests (see the module docstring)."""

    def __init__(self, name: str, limit: int = 16) -> None:
        self._name = name
        self._limit = limit
        self._queue: SimpleQueue[Request | None] = SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self._running: set[Request] = set()
        self._closed = False

    def run(self, work: Callable[[], None], timeout: float) -> Request | None:
        """Run ``work`` in an I/O thread and wait up to ``timeout`` seconds. Returns None
        when it finished in time (raising what it raised), else the abandoned request
        (``started`` tells whether it ran at all)."""
        request = Request(work)
        with self._lock:
            if not self._idle and self._threads < self._limit and not self._closed:
                self._threads += 1
                threading.Thread(target=self._loop, name=f"{self._name}-io", daemon=True).start()
            else:
                self._idle -= 1 if self._idle else 0
        self._queue.put(request)
        if not request.done.wait(timeout) and request.abandon():
            return request
        if request.error is not None:
            raise request.error
        return None

    def stalled(self) -> int:
        """How many abandoned requests still run."""
        with self._lock:
            return sum(1 for r in self._running if r.abandoned)

    def close(self) -> None:
        """End the idle threads; stalled ones end when their system call returns."""
        with self._lock:
            self._closed = True
            threads = self._threads
        for _ in range(threads):
            self._queue.put(None)

    def _loop(self) -> None:
        while True:
            request = self._queue.get()
            if request is None:
                return
            with request.lock:
                skip = request.abandoned
                request.started = not skip
            if not skip:
                with self._lock:
                    self._running.add(request)
                _local.request = request
                try:
                    request.work()
                except BaseException as e:
                    request.error = e
                finally:
                    _local.request = None
                    with request.lock:
                        request.finished = True
                    with self._lock:
                        self._running.discard(request)
                    request.done.set()
            with self._lock:
                self._idle += 1
