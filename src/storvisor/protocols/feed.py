"""The receiving side that the NBD codec and the frame decoder share: their receive buffer
(``make_room``), and feeding whole byte strings to a codec that receives through
``get_buffer`` / ``buffer_updated`` (the zero-copy interface)."""

from __future__ import annotations

from collections.abc import Callable

Buffer = bytes | bytearray | memoryview


def feed(
    data: Buffer,
    get_buffer: Callable[[int], memoryview],
    buffer_updated: Callable[[int], object],
) -> None:
    """Copy non-empty ``data`` into the codec's receive buffers, as ``recv_into`` would,
    in as many pieces as the codec asks for."""
    source = memoryview(data).cast("B")
    while source:
        with get_buffer(len(source)) as view:
            n = min(len(view), len(source))
            view[:n] = source[:n]
        buffer_updated(n)
        source = source[n:]


def make_room(buf: bytearray, start: int, end: int, need: int) -> tuple[bytearray, int, int]:
    """Make ``need`` bytes free after ``buf[start:end]``, the bytes received but not yet
    consumed: as they are if there is room, else moved to the front, or copied into a buffer
    at least twice as large when they do not fit. Returns the new ``(buf, start, end)``."""
    if len(buf) - end >= need:
        return buf, start, end
    used = end - start
    if used + need > len(buf):
        fresh = bytearray(max(len(buf) * 2, used + need))
        fresh[:used] = buf[start:end]
        return fresh, 0, used
    buf[:used] = buf[start:end]
    return buf, 0, used
