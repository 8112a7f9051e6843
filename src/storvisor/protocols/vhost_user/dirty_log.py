"""The dirty-page log of live migration (LOG_SHMFD + ``VHOST_F_LOG_ALL``).

While ``VHOST_F_LOG_ALL`` is negotiated, the back-end marks every guest page it writes in a
bitmap shared with the front-end (SET_LOG_BASE): one bit per 4 KiB page of guest-physical
memory, ``log[gpa >> 15] |= 1 << ((gpa >> 12) & 7)``. Writes that count: data of IN and GET_ID,
status bytes, and, for queues whose SET_VRING_ADDR has ``VHOST_VRING_F_LOG``, the used-ring
entry and ``used.idx`` (at ``log_guest_addr`` + their offset in the ring).

The front-end collects and clears the bitmap with atomic exchanges; the plain read-modify-write
here can at worst re-mark pages it already collected (harmless). Callers must serialise
:meth:`DirtyLog.mark` across their own threads, or two marks in one byte could lose a bit.
"""

from __future__ import annotations

VHOST_LOG_PAGE = 0x1000
"""Bytes of guest memory per log bit."""


class DirtyLog:
    """A view of the shared bitmap. Pages beyond its end are ignored (as QEMU sizes it to
    cover all guest memory, a larger address is the front-end's problem, not a crash)."""

    __slots__ = ("_view",)

    def __init__(self, view: memoryview) -> None:
        self._view = view

    def mark(self, gpa: int, length: int) -> None:
        """Mark every page overlapping ``[gpa, gpa+length)`` dirty."""
        if length <= 0:
            return
        view = self._view
        limit = len(view)
        for page in range(gpa // VHOST_LOG_PAGE, (gpa + length - 1) // VHOST_LOG_PAGE + 1):
            index = page >> 3
            if index >= limit:
                return
            view[index] |= 1 << (page & 7)

    def release(self) -> None:
        """Drop the view (before the mapping behind it is closed)."""
        self._view.release()


def log_size_for(memory_end: int) -> int:
    """Bytes of bitmap needed to cover guest-physical addresses below ``memory_end``."""
    pages = -(-memory_end // VHOST_LOG_PAGE)
    return -(-pages // 8)
