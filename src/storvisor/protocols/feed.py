"""Feeding whole byte strings to a codec that receives through ``get_buffer`` /
``buffer_updated`` (the zero-copy interface the NBD codec and the frame decoder share)."""

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
