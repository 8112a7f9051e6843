"""Positioned vectored I/O: the one ``preadv``/``pwritev`` loop of storvisor.

Every data path ends in these two functions (volumes, file devices, data planes,
vhost-user-blk's raw files): they move bytes between a file and a list of buffers in as few
system calls as the kernel allows, with no copy.

Contract, for both functions:

* ``views`` are 1-D byte memoryviews (format ``"B"``); they are filled (read) or written in
  order, as one contiguous range of the file starting at ``offset``. They may be slices of
  guest memory or of receive buffers: nothing is joined or copied.
* A request of zero bytes in total succeeds without a system call.
* More buffers than ``IOV_MAX`` (Linux's ``UIO_MAXIOV``, 1024) go in several calls.
* A short transfer continues from where it stopped, until every byte is done.
* A read that reaches the end of the file before every byte is read raises
  ``IOFailure(EIO)``; with ``zeros_at_eof=True`` the rest of the buffers is zero-filled
  instead (a file read as a device whose size is its own). Bytes read before the end stay.
* A write call that makes no progress raises ``IOFailure(EIO)`` (it is not retried).
* A failed system call raises ``IOFailure`` carrying its errno (EIO if it has none).
  Bytes transferred by earlier calls of the same request stay transferred: a failed
  request leaves the range partly done.

The common case, one buffer moved by one call, costs one call and two comparisons.

``syscall`` is the seam the tests use to make short transfers happen; production code never
passes it.

*Routed fds.* A pool with a cache tier (``engine/cache.py``) registers its backing devices'
fds with ``route``: a read or write of such an fd goes to the cache instead of the file (one
dict test in front of the system call for every other fd). Routes are of this process only:
data planes of a cached pool go through the cache's shared line table
(``engine/cachelines.py``) or to the pool's process, never to these fds.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence
from typing import Protocol

from storvisor.errors import IOFailure

IOV_MAX = 1024
"""Buffers per ``preadv``/``pwritev`` call (Linux's ``UIO_MAXIOV``)."""

VectorCall = Callable[[int, list[memoryview], int], int]
"""``os.preadv`` or ``os.pwritev``: ``(fd, buffers, offset) -> bytes transferred``."""


class Route(Protocol):
    """Where the reads and writes of a routed fd go (see the module docstring)."""

    def read(self, views: list[memoryview], offset: int) -> None: ...

    def write(self, views: list[memoryview], offset: int) -> None: ...


_readers: dict[int, Callable[[list[memoryview], int], None]] = {}
_writers: dict[int, Callable[[list[memoryview], int], None]] = {}


def route(fd: int, target: Route | None) -> None:
    """Send the reads and writes of ``fd`` to ``target`` from now on (None: to the file
    again). Unroute an fd before closing it."""
    if target is None:
        _readers.pop(fd, None)
        _writers.pop(fd, None)
    else:
        _readers[fd] = target.read
        _writers[fd] = target.write


def write_route(fd: int) -> Callable[[list[memoryview], int], None] | None:
    """Where the writes of ``fd`` go now (a ``Route``'s ``write``; None: to the file)."""
    return _writers.get(fd)


def routed() -> bool:
    """Whether any fd of this process is routed."""
    return bool(_readers)


def slice_views(views: Sequence[memoryview], start: int, length: int) -> list[memoryview]:
    """The bytes of ``views`` (concatenated) from ``start`` for ``length`` bytes, as views of
    them (no copy): a buffer wholly inside the range is returned as it is, the ones at its
    ends sliced."""
    out: list[memoryview] = []
    for view in views:
        n = len(view)
        if start >= n:
            start -= n
            continue
        take = min(n - start, length)
        out.append(view[start : start + take] if start or take != n else view)
        length -= take
        start = 0
        if not length:
            break
    return out


def preadv_full(
    fd: int,
    views: list[memoryview],
    offset: int,
    *,
    zeros_at_eof: bool = False,
    syscall: VectorCall = os.preadv,
) -> None:
    """Fill ``views`` with the bytes of ``fd`` from ``offset`` (see the module docstring).

    Raises ``IOFailure``: the errno of a failed ``preadv``, or EIO for a read past the end of
    the file (unless ``zeros_at_eof``).
    """
    if _readers:
        reader = _readers.get(fd)
        if reader is not None:
            reader(views, offset)
            return
    if len(views) != 1:
        _transfer(fd, views, offset, None, syscall, True, zeros_at_eof)
        return
    size = len(views[0])  # the common case: one buffer, one call
    if not size:
        return
    try:
        n = syscall(fd, views, offset)
    except OSError as e:
        raise _failure("read", size, offset, e) from e
    if n != size:
        _transfer(fd, views, offset, n, syscall, True, zeros_at_eof)


def pwritev_full(
    fd: int, views: list[memoryview], offset: int, *, syscall: VectorCall = os.pwritev
) -> None:
    """Write ``views`` to ``fd`` at ``offset`` (see the module docstring).

    Raises ``IOFailure``: the errno of a failed ``pwritev``, or EIO for a call that wrote
    nothing.
    """
    if _writers:
        writer = _writers.get(fd)
        if writer is not None:
            writer(views, offset)
            return
    if len(views) != 1:
        _transfer(fd, views, offset, None, syscall, False, False)
        return
    size = len(views[0])
    if not size:
        return
    try:
        n = syscall(fd, views, offset)
    except OSError as e:
        raise _failure("write", size, offset, e) from e
    if n != size:
        _transfer(fd, views, offset, n, syscall, False, False)


def _transfer(
    fd: int,
    views: list[memoryview],
    offset: int,
    n: int | None,
    syscall: VectorCall,
    reading: bool,
    zeros_at_eof: bool,
) -> None:
    """Move all of ``views``, of which a first call moved ``n`` bytes (None: no call yet)."""
    what = "read" if reading else "write"
    remaining = sum(map(len, views))
    while True:
        if n is not None:
            if n <= 0:
                if reading and zeros_at_eof:
                    for view in views:
                        view[:] = bytes(len(view))
                    return
                reason = "end of file" if reading else "no progress"
                raise IOFailure(f"{what} of {remaining} bytes at {offset}: {reason}", errno.EIO)
            remaining -= n
            offset += n
        if remaining <= 0:
            return
        views = _rest(views, n or 0)
        batch = views if len(views) <= IOV_MAX else views[:IOV_MAX]
        try:
            n = syscall(fd, batch, offset)
        except OSError as e:
            raise _failure(what, remaining, offset, e) from e


def _rest(views: list[memoryview], done: int) -> list[memoryview]:
    """What remains of ``views`` once their first ``done`` bytes are moved, without the
    empty buffers in front (slices, no copies)."""
    for i, view in enumerate(views):
        size = len(view)
        if done < size:
            if done:
                return [view[done:], *views[i + 1 :]]
            return views[i:] if i else views
        done -= size
    return []


def _failure(what: str, length: int, offset: int, e: OSError) -> IOFailure:
    return IOFailure(
        f"{what} of {length} bytes at {offset} failed: {e.strerror}", e.errno or errno.EIO
    )
