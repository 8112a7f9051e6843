"""I/O counters of a served device, kept in shared memory and summed when read.

Theory of operation
-------------------
Each opened export device (one NBD connection, in whichever process serves it) counts its
requests in an ``IoStats`` block: one page of shared memory (a memfd) of native doubles,
like the QoS block of ``qos.py``. The process that serves the requests writes it with plain
additions, no lock and no system call; the daemon maps the same memfd and reads it when
metrics are asked for. A block has one writer at a time (a connection executes its requests
in one thread), so no update is lost. Doubles count exactly up to 2**53.

For each operation (``IoOp``) a block holds: requests started, bytes moved, failed
requests, the sum of the latencies in nanoseconds, and a latency histogram whose bucket
``i`` counts the requests that took less than ``2**(i + FIRST_BUCKET_BITS)`` ns (the last
one: any longer). A request is counted as started before it runs and in the histogram once
it has finished, so requests in flight = started - histogram total. The latency includes
the time a request waited for QoS tokens (the wrapped device throttles).
"""

from __future__ import annotations

import enum
import itertools
import mmap
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from storvisor.engine.device import BlockDevice, Buffer, Extent
from storvisor.engine.qos import VectorIO
from storvisor.errors import InvalidArgument, IOFailure


class IoOp(enum.IntEnum):
    READ = 0
    WRITE = 1
    FLUSH = 2
    TRIM = 3
    ZERO = 4


FIRST_BUCKET_BITS = 14
"""The first bucket holds requests under 2**14 ns (16.4 us); each next one doubles."""
BUCKETS = 22
"""Histogram buckets per operation: 21 bounded ones (up to 2**34 ns, 17 s) and +Inf."""
BOUNDS_NS: tuple[int, ...] = tuple(1 << (FIRST_BUCKET_BITS + i) for i in range(BUCKETS - 1))
"""The upper bound of each bounded bucket, in nanoseconds."""

_BUCKET_OF: tuple[int, ...] = tuple(
    min(max(bits - FIRST_BUCKET_BITS, 0), BUCKETS - 1) for bits in range(65)
)
"""Histogram bucket of a latency by its ``int.bit_length()``."""

_now = time.perf_counter_ns  # a vDSO clock read, no system call
_MAGIC_VALUE = float(0x53545453)  # "STTS"
_HEADER = 8
_STARTED, _BYTES, _ERRORS, _NS = range(4)
_HIST = 4
_SLOT = _HIST + BUCKETS
_WORDS = _HEADER + _SLOT * len(IoOp)
assert _WORDS * 8 <= mmap.PAGESIZE


def _base(op: IoOp) -> int:
    return _HEADER + int(op) * _SLOT


@dataclass(frozen=True, slots=True)
class OpTotals:
    """Counts of one operation; ``buckets`` per ``BOUNDS_NS`` bucket, +Inf last."""

    started: int = 0
    bytes: int = 0
    errors: int = 0
    latency_ns: int = 0
    buckets: tuple[int, ...] = (0,) * BUCKETS

    @property
    def completed(self) -> int:
        return sum(self.buckets)

    @property
    def in_flight(self) -> int:
        return max(self.started - self.completed, 0)

    def __add__(self, other: OpTotals) -> OpTotals:
        return OpTotals(
            self.started + other.started,
            self.bytes + other.bytes,
            self.errors + other.errors,
            self.latency_ns + other.latency_ns,
            tuple(a + b for a, b in zip(self.buckets, other.buckets, strict=True)),
        )


@dataclass(frozen=True, slots=True)
class IoTotals:
    """Counts of every operation, in ``IoOp`` order."""

    ops: tuple[OpTotals, ...] = tuple(OpTotals() for _ in IoOp)

    def __getitem__(self, op: IoOp) -> OpTotals:
        return self.ops[op]

    def __add__(self, other: IoTotals) -> IoTotals:
        return IoTotals(tuple(a + b for a, b in zip(self.ops, other.ops, strict=True)))


ZERO_TOTALS = IoTotals()


_SLOT_WORDS = mmap.PAGESIZE // 8
MAX_SLOTS = 256


class IoStats:
    """One block of counters: ``slots`` pages, each counting on its own (one writer each),
    summed by ``totals``. ``IoStats(slots=N)`` creates one (zeroed); ``IoStats(fd=...)``
    maps an existing one (the fd then belongs to the block, closed by ``close``).

    Raises ``InvalidArgument`` if ``fd`` is not such a block."""

    def __init__(self, *, fd: int | None = None, name: str = "export", slots: int = 1) -> None:
        owner = fd is None
        if fd is None:
            if not 1 <= slots <= MAX_SLOTS:
                raise InvalidArgument(f"an I/O statistics block has 1 to {MAX_SLOTS} slots")
            fd = os.memfd_create(f"storvisor-iostats-{name}", os.MFD_CLOEXEC)
            os.ftruncate(fd, slots * mmap.PAGESIZE)
        else:
            slots = os.fstat(fd).st_size // mmap.PAGESIZE
        self.fd = fd
        self.slots = slots
        self._views: list[memoryview[float]] = []
        if not 1 <= slots <= MAX_SLOTS:
            os.close(fd)
            raise InvalidArgument("not an I/O statistics block")
        self._mm = mmap.mmap(fd, slots * mmap.PAGESIZE)
        self.words: memoryview[float] | None = memoryview(self._mm).cast("d")
        if owner:
            self.words[0] = _MAGIC_VALUE
        elif self.words[0] != _MAGIC_VALUE:
            self.close()
            raise InvalidArgument("not an I/O statistics block")

    def slot(self, index: int) -> memoryview[float]:
        """The words of slot ``index`` (released by ``close``)."""
        assert self.words is not None, "I/O statistics block is closed"
        view = self.words[index * _SLOT_WORDS : (index + 1) * _SLOT_WORDS]
        self._views.append(view)
        return view

    def totals(self) -> IoTotals:
        """A copy of the counts of every slot (each word read once; a request running now
        may be half counted)."""
        w = self.words
        assert w is not None, "I/O statistics block is closed"
        ops = []
        for op in IoOp:
            started = nbytes = errors = ns = 0
            buckets = [0] * BUCKETS
            for slot in range(self.slots):
                b = slot * _SLOT_WORDS + _base(op)
                started += int(w[b + _STARTED])
                nbytes += int(w[b + _BYTES])
                errors += int(w[b + _ERRORS])
                ns += int(w[b + _NS])
                for i, x in enumerate(w[b + _HIST : b + _HIST + BUCKETS]):
                    buckets[i] += int(x)
            ops.append(OpTotals(started, nbytes, errors, ns, tuple(buckets)))
        return IoTotals(tuple(ops))

    def close(self) -> None:
        """Unmap and close the fd; the slots handed out become unusable. Idempotent."""
        if self.words is not None:
            for view in self._views:
                view.release()
            self._views.clear()
            self.words.release()
            self.words = None
            self._mm.close()
            os.close(self.fd)


class _CountedVectors:
    """``VectoredIO`` counted like the device's own reads and writes."""

    def __init__(self, inner: VectorIO, counted: CountedDevice) -> None:
        self._read: Callable[..., None] = inner.read_into
        self._write = inner.write
        self._c = counted

    def read_into(self, offset: int, views: list[memoryview]) -> None:
        self._c._count(IoOp.READ, sum(len(v) for v in views), self._read, offset, views)

    def write(self, offset: int, views: list[memoryview], *, fua: bool) -> None:
        w = self._c._words()
        b = _HEADER + _SLOT  # IoOp.WRITE
        w[b + _STARTED] += 1
        t = _now()
        try:
            self._write(offset, views, fua=fua)
        except IOFailure:
            w[b + _ERRORS] += 1
            raise
        finally:
            dt = _now() - t
            w[b + _NS] += dt
            w[b + _HIST + _BUCKET_OF[dt.bit_length()]] += 1
        w[b + _BYTES] += sum(len(v) for v in views)


class CountedDevice:
    """A ``BlockDevice`` that counts every request to ``inner`` in ``stats`` (see the module
    docstring). Block status is not counted. ``close`` closes ``inner``, and ``stats`` too
    when ``owns_stats``, then calls ``on_close``. ``vectors`` counts ``inner.vectors`` when
    ``inner`` has them."""

    def __init__(
        self,
        inner: BlockDevice,
        stats: IoStats,
        *,
        owns_stats: bool = False,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        assert stats.words is not None, "I/O statistics block is closed"
        self.inner = inner
        self.stats = stats
        self._owns = owns_stats
        self._on_close = on_close
        self._w = stats.slot(0)
        self._read_into = inner.read_into
        self._write = inner.write
        vectors: VectorIO | None = getattr(inner, "vectors", None)
        self.vectors = _CountedVectors(vectors, self) if vectors is not None else None

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def read_only(self) -> bool:
        return self.inner.read_only

    @property
    def block_size(self) -> int:
        return self.inner.block_size

    @property
    def serial(self) -> str:
        return str(getattr(self.inner, "serial", ""))

    def read_into(self, offset: int, buf: memoryview) -> None:
        w = self._w
        w[_HEADER + _STARTED] += 1  # IoOp.READ's slot comes first
        t = _now()
        try:
            self._read_into(offset, buf)
        except IOFailure:
            w[_HEADER + _ERRORS] += 1
            raise
        finally:
            dt = _now() - t
            w[_HEADER + _NS] += dt
            w[_HEADER + _HIST + _BUCKET_OF[dt.bit_length()]] += 1
        w[_HEADER + _BYTES] += len(buf)

    def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        w = self._w
        b = _HEADER + _SLOT  # IoOp.WRITE
        w[b + _STARTED] += 1
        t = _now()
        try:
            self._write(offset, data, fua=fua)
        except IOFailure:
            w[b + _ERRORS] += 1
            raise
        finally:
            dt = _now() - t
            w[b + _NS] += dt
            w[b + _HIST + _BUCKET_OF[dt.bit_length()]] += 1
        w[b + _BYTES] += len(data)

    def flush(self) -> None:
        self._count(IoOp.FLUSH, 0, self.inner.flush)

    def discard(self, offset: int, length: int) -> None:
        self._count(IoOp.TRIM, length, self.inner.discard, offset, length)

    def write_zeroes(
        self, offset: int, length: int, *, may_unmap: bool = True, fua: bool = False
    ) -> None:
        self._count(
            IoOp.ZERO,
            length,
            lambda: self.inner.write_zeroes(offset, length, may_unmap=may_unmap, fua=fua),
        )

    def block_status(self, offset: int, length: int) -> list[Extent]:
        return self.inner.block_status(offset, length)

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            if self._owns:
                self.stats.close()
            if self._on_close is not None:
                self._on_close()

    def _words(self) -> memoryview[float]:
        """The slot the calling thread counts in."""
        return self._w

    def _count(self, op: IoOp, nbytes: int, call: Callable[..., object], *args: object) -> None:
        w = self._words()
        b = _base(op)
        w[b + _STARTED] += 1
        t = _now()
        try:
            call(*args)
        except IOFailure:
            w[b + _ERRORS] += 1
            raise
        finally:
            dt = _now() - t
            w[b + _NS] += dt
            w[b + _HIST + _BUCKET_OF[dt.bit_length()]] += 1
        w[b + _BYTES] += nbytes


class ThreadCountedDevice(CountedDevice):
    """A ``CountedDevice`` for a device that several threads use at once (the queues and the
    I/O pool of a vhost-user-blk data plane): each thread counts in a slot of its own, taken
    on its first request (threads beyond the block's slots share its last one)."""

    def __init__(
        self,
        inner: BlockDevice,
        stats: IoStats,
        *,
        owns_stats: bool = False,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(inner, stats, owns_stats=owns_stats, on_close=on_close)
        self._local = threading.local()
        self._slots = [self._w, *(stats.slot(i) for i in range(1, stats.slots))]
        self._taken = itertools.count()

    def _words(self) -> memoryview[float]:
        try:
            w: memoryview[float] = self._local.w
        except AttributeError:
            index = min(next(self._taken), len(self._slots) - 1)  # atomic under the GIL
            w = self._local.w = self._slots[index]
        return w

    def read_into(self, offset: int, buf: memoryview) -> None:
        self._count(IoOp.READ, len(buf), self._read_into, offset, buf)

    def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        self._count(IoOp.WRITE, len(data), lambda: self._write(offset, data, fua=fua))


class StatsSet:
    """The counters of one export: the blocks of its open devices (connections) and the
    sum of those already closed, so that its totals only grow. Thread-safe."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._live: list[IoStats] = []
        self._retired = ZERO_TOTALS

    def open(self, slots: int = 1) -> IoStats:
        """A new zeroed block, counted until ``retire``."""
        block = IoStats(name=self.name.replace("/", "-"), slots=slots)
        with self._lock:
            self._live.append(block)
        return block

    def retire(self, block: IoStats) -> None:
        """Add ``block``'s final counts to the closed ones and close it (its writer must be
        done with it). Idempotent."""
        with self._lock:
            if block not in self._live:
                return
            self._live.remove(block)
            self._retired = self._retired + block.totals()
        block.close()

    def counted(self, open_device: Callable[[], BlockDevice]) -> Callable[[], BlockDevice]:
        """``open_device`` counted in a block of this set, retired when the device closes."""

        def open_counted() -> BlockDevice:
            device = open_device()
            block = self.open()
            return CountedDevice(device, block, on_close=lambda: self.retire(block))

        return open_counted

    @property
    def connections(self) -> int:
        """Blocks open now."""
        with self._lock:
            return len(self._live)

    def totals(self) -> IoTotals:
        """The counts of every block, open or retired."""
        with self._lock:
            total = self._retired
            for block in self._live:
                total = total + block.totals()
            return total

    def in_flight(self) -> tuple[int, ...]:
        """Requests running now, per ``IoOp``, in the open blocks (a request cut short by
        a process that died is not counted)."""
        with self._lock:
            counts = [0] * len(IoOp)
            for block in self._live:
                for op, totals in zip(IoOp, block.totals().ops, strict=True):
                    counts[op] += totals.in_flight
            return tuple(counts)


class LatencyHistogram:
    """Durations in ``BOUNDS_NS`` buckets, for events rarer than requests (a pool's metadata
    commits). ``observe`` is called by one thread at a time; ``snapshot`` from any."""

    def __init__(self) -> None:
        self._buckets = [0] * BUCKETS
        self._sum_ns = 0

    def observe(self, ns: int) -> None:
        self._buckets[_BUCKET_OF[min(ns.bit_length(), 64)]] += 1
        self._sum_ns += ns

    def snapshot(self) -> tuple[tuple[int, ...], int]:
        """``(buckets, sum of the durations in ns)``."""
        return tuple(self._buckets), self._sum_ns
