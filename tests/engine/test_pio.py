"""``engine.pio``: the one positioned-I/O loop, on real files.

Two kinds of cases, each a table:

* real system calls on real files, pipes and directories (end of file, more buffers than
  the kernel takes in one call, errno translation, zero-length requests);
* the declared seam (``syscall=``) filled by ``Capped``: the real ``os.preadv``/``os.pwritev``
  on a real file, moving at most a scripted number of bytes per call, as a pipe-backed or
  FUSE file would. It also records every call, so the tests see how many calls a request
  took, that no call got more than ``IOV_MAX`` buffers and that every buffer handed to the
  kernel is a slice of the caller's memory (zero-copy).
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from storvisor.engine.pio import IOV_MAX, VectorCall, preadv_full, pwritev_full
from storvisor.errors import IOFailure

CONTENT = bytes(range(256)) * 64  # 16 KiB, every byte position recognisable


class Stalled(Exception):
    """Not an ``OSError``: nothing under test may translate it."""


@pytest.fixture(autouse=True)
def deadline() -> Iterator[None]:
    """A request that never ends (a loop that makes no progress) fails its test within
    10 s instead of stalling the run."""

    def expire(signum: int, frame: object) -> None:
        raise Stalled("the request did not end within 10 s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, 10)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def split(buf: bytearray, sizes: list[int]) -> list[memoryview]:
    """``buf`` cut into consecutive views of ``sizes`` (which may include zeros)."""
    whole = memoryview(buf)
    views, pos = [], 0
    for size in sizes:
        views.append(whole[pos : pos + size])
        pos += size
    assert pos == len(buf)
    return views


def many(total: int, count: int) -> list[int]:
    """``count`` sizes (some empty) adding up to ``total``."""
    sizes = [(i * 7) % 5 for i in range(count - 1)]
    sizes.append(total - sum(sizes))
    assert sizes[-1] >= 0
    return sizes


@pytest.fixture
def data_file(tmp_path: Path) -> Iterator[int]:
    path = tmp_path / "data"
    path.write_bytes(CONTENT)
    fd = os.open(path, os.O_RDWR)
    yield fd
    os.close(fd)


def file_bytes(fd: int) -> bytes:
    return os.pread(fd, 1 << 20, 0)


@dataclass
class Capped:
    """A real ``os.preadv``/``os.pwritev`` moving at most ``steps[i]`` bytes in call ``i``
    (the last step repeats; 0 means the call moves nothing)."""

    call: VectorCall
    steps: list[int]
    owner: object
    calls: list[int] = field(default_factory=list)  # buffers handed to each call

    def __call__(self, fd: int, views: list[memoryview], offset: int) -> int:
        assert len(views) <= IOV_MAX, f"{len(views)} buffers in one call"
        assert all(v.obj is self.owner for v in views), "a buffer is not the caller's memory"
        self.calls.append(len(views))
        assert len(self.calls) < 100_000, "the request never ends"
        cap = self.steps[min(len(self.calls), len(self.steps)) - 1]
        trimmed: list[memoryview] = []
        for view in views:
            if cap <= 0:
                break
            trimmed.append(view[:cap])
            cap -= len(trimmed[-1])
        return self.call(fd, trimmed, offset) if trimmed else 0


# --------------------------------------------------------------- real calls, real files


@dataclass(frozen=True)
class ReadCase:
    name: str
    offset: int
    sizes: list[int]
    zeros_at_eof: bool
    expect: bytes | int  # the bytes read, or the errno of the IOFailure


READS = [
    ReadCase("one buffer", 100, [4096], False, CONTENT[100:4196]),
    ReadCase("to the last byte", 0, [len(CONTENT)], False, CONTENT),
    ReadCase("empty buffers between", 5, [0, 10, 0, 0, 5, 0], False, CONTENT[5:20]),
    ReadCase("more buffers than IOV_MAX", 1, many(9000, 3 * IOV_MAX + 5), False, CONTENT[1:9001]),
    ReadCase("past the end", len(CONTENT) - 10, [20], False, errno.EIO),
    ReadCase("past the end, many", 4096, many(len(CONTENT), 2000), False, errno.EIO),
    ReadCase("wholly past the end", len(CONTENT) + 4096, [512], False, errno.EIO),
    ReadCase("past the end as zeros", len(CONTENT) - 10, [4, 16], True, CONTENT[-10:] + bytes(10)),
    ReadCase(
        "past the end as zeros, many",
        4096,
        many(len(CONTENT), 2000),
        True,
        CONTENT[4096:] + bytes(4096),
    ),
    ReadCase("wholly past the end as zeros", len(CONTENT) + 1, [3, 0, 5], True, bytes(8)),
]


@pytest.mark.parametrize("case", READS, ids=lambda c: c.name)
def test_read_real_file(data_file: int, case: ReadCase) -> None:
    buf = bytearray(b"\xee" * sum(case.sizes))
    views = split(buf, case.sizes)
    if isinstance(case.expect, int):
        with pytest.raises(IOFailure) as raised:
            preadv_full(data_file, views, case.offset, zeros_at_eof=case.zeros_at_eof)
        assert raised.value.errno == case.expect
    else:
        preadv_full(data_file, views, case.offset, zeros_at_eof=case.zeros_at_eof)
        assert bytes(buf) == case.expect


@pytest.mark.parametrize(
    ("offset", "sizes"),
    [(0, [4096]), (len(CONTENT) - 3, [2, 0, 9]), (50, many(7000, 2 * IOV_MAX + 1))],
    ids=["one buffer", "growing the file", "more buffers than IOV_MAX"],
)
def test_write_real_file(data_file: int, offset: int, sizes: list[int]) -> None:
    data = bytearray(os.urandom(sum(sizes)))
    pwritev_full(data_file, split(data, sizes), offset)
    expect = bytearray(CONTENT)
    expect[offset : offset + len(data)] = data
    assert file_bytes(data_file) == bytes(expect)


def _closed(tmp_path: Path) -> int:
    fd = os.open(tmp_path / "gone", os.O_RDWR | os.O_CREAT)
    os.close(fd)
    return fd


def _opened(flags: int) -> Callable[[Path], int]:
    def open_(tmp_path: Path) -> int:
        path = tmp_path / "f"
        path.write_bytes(CONTENT)
        return os.open(path, flags)

    return open_


def _pipe(tmp_path: Path) -> int:
    r, w = os.pipe()
    os.write(w, CONTENT[:100])
    os.close(w)
    return r


def _directory(tmp_path: Path) -> int:
    return os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)


@pytest.mark.parametrize(
    ("opener", "reading", "expect"),
    [
        (_closed, True, errno.EBADF),
        (_closed, False, errno.EBADF),
        (_opened(os.O_WRONLY), True, errno.EBADF),
        (_opened(os.O_RDONLY), False, errno.EBADF),
        (_pipe, True, errno.ESPIPE),
        (_directory, True, errno.EISDIR),
    ],
    ids=[
        "read closed fd",
        "write closed fd",
        "read write-only",
        "write read-only",
        "read pipe",
        "read directory",
    ],
)
def test_system_call_errors_carry_their_errno(
    tmp_path: Path, opener: Callable[[Path], int], reading: bool, expect: int
) -> None:
    fd = opener(tmp_path)
    buf = bytearray(8192)
    try:
        for views in ([memoryview(buf)], split(buf, many(len(buf), 3 * IOV_MAX))):
            with pytest.raises(IOFailure) as raised:
                if reading:
                    preadv_full(fd, views, 0)
                else:
                    pwritev_full(fd, views, 0)
            assert raised.value.errno == expect
    finally:
        if opener is not _closed:
            os.close(fd)


@pytest.mark.parametrize("views", [[], [memoryview(b"")], [memoryview(b"")] * (IOV_MAX + 3)])
def test_zero_length_requests_succeed_without_a_system_call(views: list[memoryview]) -> None:
    nothing = Capped(os.preadv, [1 << 20], None)
    for zeros in (False, True):
        preadv_full(-1, list(views), 0, zeros_at_eof=zeros, syscall=nothing)
        preadv_full(-1, list(views), 0, zeros_at_eof=zeros)  # a bad fd is not even looked at
    pwritev_full(-1, list(views), 0, syscall=Capped(os.pwritev, [1 << 20], None))
    pwritev_full(-1, list(views), 0)
    assert nothing.calls == []


# -------------------------------------------------------------- short transfers (the seam)


@dataclass(frozen=True)
class ShortCase:
    name: str
    sizes: list[int]
    steps: list[int]
    calls: int | None  # expected number of calls (None: not checked)
    expect_errno: int = 0  # 0: the request completes


SHORT = [
    ShortCase("one buffer, one call", [4096], [1 << 20], 1),
    ShortCase("one buffer, a byte a call", [37], [1], 37),
    ShortCase("one buffer, halves", [4096], [2048], 2),
    ShortCase("short inside a buffer", [100, 100, 100], [150], 2),
    ShortCase("short at a buffer's edge", [100, 100, 100], [100], 3),
    ShortCase("uneven steps", many(5000, 40), [1, 4095, 3, 700, 1], None),
    ShortCase("more buffers than IOV_MAX", many(6000, 2500), [1 << 20], 3),
    ShortCase("IOV_MAX and short", many(6000, 2500), [999], 7),
    ShortCase("no progress at once", [4096], [0], 1, errno.EIO),
    ShortCase("no progress after some", [10, 4086], [100, 0], 2, errno.EIO),
    ShortCase("no progress, many buffers", many(6000, 2500), [2000, 0], 2, errno.EIO),
]


@pytest.mark.parametrize("case", SHORT, ids=lambda c: c.name)
def test_short_writes(data_file: int, case: ShortCase) -> None:
    data = bytearray(os.urandom(sum(case.sizes)))
    capped = Capped(os.pwritev, case.steps, data)
    offset = 33
    if case.expect_errno:
        with pytest.raises(IOFailure) as raised:
            pwritev_full(data_file, split(data, case.sizes), offset, syscall=capped)
        assert raised.value.errno == case.expect_errno
        done = sum(case.steps[:-1])  # the calls before the one that wrote nothing
        assert file_bytes(data_file)[offset : offset + done] == data[:done]
    else:
        pwritev_full(data_file, split(data, case.sizes), offset, syscall=capped)
        expect = bytearray(CONTENT)
        expect[offset : offset + len(data)] = data
        assert file_bytes(data_file) == bytes(expect)
    if case.calls is not None:
        assert len(capped.calls) == case.calls


@pytest.mark.parametrize("case", SHORT, ids=lambda c: c.name)
def test_short_reads(data_file: int, case: ShortCase) -> None:
    total = sum(case.sizes)
    offset = len(CONTENT) - total - 5  # all inside the file
    assert offset >= 0
    buf = bytearray(total)
    capped = Capped(os.preadv, case.steps, buf)
    if case.expect_errno:  # a read that moves nothing is the end of the file...
        with pytest.raises(IOFailure) as raised:
            preadv_full(data_file, split(buf, case.sizes), offset, syscall=capped)
        assert raised.value.errno == case.expect_errno
        buf2 = bytearray(b"\xee" * total)  # ...or, when asked, zeros from there on
        capped = Capped(os.preadv, case.steps, buf2)
        preadv_full(data_file, split(buf2, case.sizes), offset, zeros_at_eof=True, syscall=capped)
        done = sum(case.steps[:-1])
        assert bytes(buf2) == CONTENT[offset : offset + done] + bytes(total - done)
    else:
        preadv_full(data_file, split(buf, case.sizes), offset, syscall=capped)
        assert bytes(buf) == CONTENT[offset : offset + total]
    if case.calls is not None:
        assert len(capped.calls) == case.calls


def test_a_failure_after_progress_keeps_the_errno(data_file: int) -> None:
    data = bytearray(os.urandom(8192))
    calls = 0

    def full_after_first(fd: int, views: list[memoryview], offset: int) -> int:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.pwritev(fd, [views[0][:1000]], offset)

    with pytest.raises(IOFailure) as raised:
        pwritev_full(data_file, [memoryview(data)], 0, syscall=full_after_first)
    assert raised.value.errno == errno.ENOSPC and calls == 2
    assert file_bytes(data_file)[:1000] == data[:1000]
