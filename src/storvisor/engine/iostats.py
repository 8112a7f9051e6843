"""I/O counters of a served device, kept in shared memory and summed when read.

Theory of operation
-------------------
Each opened export device (one NBD connection, or one vhost-user-blk data-plane process,
in whichever process serves it) counts its requests with plain integer additions to a
Python list of its own (a ``CountedDevice``): no lock, no system call, about 0.3 us per
request. A thread of the serving process copies every such list into the device's
``IoStats`` block every ``PUBLISH_INTERVAL`` seconds, and once more when the device closes:
the block is shared memory (a memfd of native doubles, one page per *slot*, like the QoS
block of ``qos.py``) that the daemon maps too and reads when metrics are asked for. So a
scrape sees counts at most ``PUBLISH_INTERVAL`` old, and exact ones for a closed device.
Each list has one writer (a connection executes its requests in one thread; a
``ThreadCountedDevice`` gives each thread a list and a slot of its own), so no update is
lost. Doubles count exactly up to 2**53.

For each operation (``IoOp``) a block holds: requests started, bytes moved, failed
requests, the sum of the latencies in nanoseconds, and a latency histogram whose bucket
``i`` counts the requests that took less than ``2**(i + FIRST_BUCKET_BITS)`` ns (the last
one: any longer). A request is counted as started before it runs and in the histogram once
it has finished, so requests in flight = started - histogram total. The histogram is
updated last: once a request shows there, all its counts are published. The latency includes
the time a request waited for QoS tokens.

Counting a throttled device: when the counted device is a ``ThrottledDevice`` (qos.py), the
counting wrapper makes its QoS check itself (one read of the QoS block's flag word) and calls
the throttled device's ``inner`` directly. An unlimited volume (the flag is 0) then pays no
Python call of its own per request; a limit set later is seen by the next request.
"""

from __future__ import annotations

import array
import contextlib
import enum
import itertools
import mmap
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from storvisor.engine.device import BlockDevice, Buffer, DeviceWrapper
from storvisor.engine.qos import IoKind, ThrottledDevice, VectorIO
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
    """One block of counters: ``slots`` pages, each written by one list of counts (slot 0
    also holds the block's magic word), summed by ``totals``. ``IoStats(slots=N)`` creates
    one (zeroed); ``IoStats(fd=...)`` maps an existing one (the fd then belongs to the block,
    closed by ``close``).

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


PUBLISH_INTERVAL = 0.1
"""Seconds between two copies of a process's counters into their shared blocks."""

_COUNT_WORDS = len(IoOp) * _SLOT


def _publish(counters: list[int], words: memoryview[float]) -> None:
    words[_HEADER : _HEADER + _COUNT_WORDS] = array.array("d", counters)


class _Publisher:
    """Copies the counters of this process's open counted devices into their blocks every
    ``PUBLISH_INTERVAL`` seconds, in a thread that runs while there are any."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pairs: dict[int, tuple[list[int], memoryview[float]]] = {}
        self._keys = itertools.count()
        self._running = False

    def add(self, counters: list[int], words: memoryview[float]) -> int:
        with self._lock:
            key = next(self._keys)
            self._pairs[key] = (counters, words)
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name="iostats-publish", daemon=True).start()
            return key

    def publish(self, key: int) -> None:
        with self._lock:
            pair = self._pairs.get(key)
            if pair is not None:
                _publish(*pair)

    def remove(self, key: int) -> None:
        """Publish the counters of ``key`` a last time and forget them."""
        with self._lock:
            pair = self._pairs.pop(key, None)
            if pair is not None:
                with contextlib.suppress(ValueError):  # its block is closed already
                    _publish(*pair)

    def _run(self) -> None:
        while True:
            time.sleep(PUBLISH_INTERVAL)
            with self._lock:
                if not self._pairs:
                    self._running = False
                    return
                for key, (counters, words) in list(self._pairs.items()):
                    try:
                        _publish(counters, words)
                    except ValueError:  # its block was closed under a device still open
                        del self._pairs[key]


_PUBLISHER = _Publisher()

_NEVER_LIMITED = array.array("d", [0.0])
"""The QoS flag of a device that is not throttled (its word stays 0)."""


def _never_throttled(kind: IoKind, nbytes: int) -> None:
    raise AssertionError("an unthrottled device has no QoS block")


class _CountedVectors:
    """``VectoredIO`` counted like the device's own reads and writes."""

    def __init__(self, inner: VectorIO, counted: CountedDevice) -> None:
        self._read: Callable[..., None] = inner.read_into
        self._write = inner.write
        self._c = counted
        self._flag = counted._qos_flag
        self._throttle = counted._throttle

    def read_into(self, offset: int, views: list[memoryview]) -> None:
        c = self._c._counters()  # IoOp.READ's words come first
        c[_STARTED] += 1
        n = sum(map(len, views))  # once, and no generator: this runs for every request
        t = _now()
        try:
            if self._flag[0]:
                self._throttle(IoKind.READ, n)
            self._read(offset, views)
        except IOFailure:
            c[_ERRORS] += 1
            raise
        else:
            c[_BYTES] += n
        finally:
            dt = _now() - t
            c[_NS] += dt
            c[_HIST + _BUCKET_OF[dt.bit_length()]] += 1

    def write(self, offset: int, views: list[memoryview], *, fua: bool) -> None:
        c = self._c._counters()
        b = _SLOT  # IoOp.WRITE
        c[b + _STARTED] += 1
        n = sum(map(len, views))
        t = _now()
        try:
            if self._flag[0]:
                self._throttle(IoKind.WRITE, n)
            self._write(offset, views, fua=fua)
        except IOFailure:
            c[b + _ERRORS] += 1
            raise
        else:
            c[b + _BYTES] += n
        finally:
            dt = _now() - t
            c[b + _NS] += dt
            c[b + _HIST + _BUCKET_OF[dt.bit_length()]] += 1


class CountedDevice(DeviceWrapper):
    """A ``BlockDevice`` that counts every request to ``inner`` in ``stats`` (see the module
    docstring). Block status is not counted. ``close`` publishes the counts a last time,
    closes ``inner``, and ``stats`` too when ``owns_stats``, then calls ``on_close``.
    ``vectors`` counts ``inner.vectors`` when ``inner`` has them. Requests must come from
    one thread at a time (``ThreadCountedDevice`` takes them from many). A ``ThrottledDevice``
    ``inner`` is throttled here, its own ``inner`` called directly (see the module docstring).
    """

    def __init__(
        self,
        inner: BlockDevice,
        stats: IoStats,
        *,
        owns_stats: bool = False,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(inner)
        self.stats = stats
        self._owns = owns_stats
        self._on_close = on_close
        self._c = [0] * _COUNT_WORDS
        self._keys = [_PUBLISHER.add(self._c, stats.slot(0))]
        target = inner
        self._qos_flag: memoryview[float] | array.array[float] = _NEVER_LIMITED
        self._throttle: Callable[[IoKind, int], None] = _never_throttled
        if isinstance(inner, ThrottledDevice):  # its check is made here (module docstring)
            target = inner.inner
            self._qos_flag = inner.qos.flag
            self._throttle = inner.qos.throttle
        self._read_into = target.read_into
        self._write = target.write
        vectors: VectorIO | None = getattr(target, "vectors", None)
        self.vectors = _CountedVectors(vectors, self) if vectors is not None else None

    def read_into(self, offset: int, buf: memoryview) -> None:
        c = self._c  # IoOp.READ's words come first
        c[_STARTED] += 1
        t = _now()
        try:
            if self._qos_flag[0]:
                self._throttle(IoKind.READ, len(buf))
            self._read_into(offset, buf)
        except IOFailure:
            c[_ERRORS] += 1
            raise
        else:
            c[_BYTES] += len(buf)
        finally:
            dt = _now() - t
            c[_NS] += dt
            c[_HIST + _BUCKET_OF[dt.bit_length()]] += 1

    def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        c = self._c
        b = _SLOT  # IoOp.WRITE
        c[b + _STARTED] += 1
        t = _now()
        try:
            if self._qos_flag[0]:
                self._throttle(IoKind.WRITE, len(data))
            self._write(offset, data, fua=fua)
        except IOFailure:
            c[b + _ERRORS] += 1
            raise
        else:
            c[b + _BYTES] += len(data)
        finally:
            dt = _now() - t
            c[b + _NS] += dt
            c[b + _HIST + _BUCKET_OF[dt.bit_length()]] += 1

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

    def publish(self) -> None:
        """Copy the counts into ``stats`` now (they are otherwise copied every
        ``PUBLISH_INTERVAL`` seconds, and by ``close``)."""
        for key in list(self._keys):
            _PUBLISHER.publish(key)

    def close(self) -> None:
        # published before ``inner`` closes: closing it tells the daemon the counts are final
        for key in self._keys:
            _PUBLISHER.remove(key)
        try:
            self.inner.close()
        finally:
            if self._owns:
                self.stats.close()
            if self._on_close is not None:
                self._on_close()

    def _counters(self) -> list[int]:
        """The counters of the calling thread."""
        return self._c

    def _count(self, op: IoOp, nbytes: int, call: Callable[..., object], *args: object) -> None:
        c = self._counters()
        b = int(op) * _SLOT
        c[b + _STARTED] += 1
        t = _now()
        try:
            call(*args)
        except IOFailure:
            c[b + _ERRORS] += 1
            raise
        else:
            c[b + _BYTES] += nbytes
        finally:
            dt = _now() - t
            c[b + _NS] += dt
            c[b + _HIST + _BUCKET_OF[dt.bit_length()]] += 1


class ThreadCountedDevice(CountedDevice):
    """A ``CountedDevice`` for a device that several threads use at once (the queues and the
    I/O pool of a vhost-user-blk data plane): each thread counts on its own, published in a
    slot of its own, taken on its first request (threads beyond the block's slots share its
    last one, and may then lose a count to a race)."""

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
        self._lists = [self._c]
        self._lists_lock = threading.Lock()

    def _counters(self) -> list[int]:
        try:
            c: list[int] = self._local.c
        except AttributeError:
            with self._lists_lock:  # once per thread
                if len(self._lists) < self.stats.slots:
                    c = [0] * _COUNT_WORDS
                    self._keys.append(_PUBLISHER.add(c, self.stats.slot(len(self._lists))))
                    self._lists.append(c)
                else:
                    c = self._lists[-1]
            self._local.c = c
        return c

    def read_into(self, offset: int, buf: memoryview) -> None:
        c = self._counters()
        c[_STARTED] += 1
        t = _now()
        try:
            if self._qos_flag[0]:
                self._throttle(IoKind.READ, len(buf))
            self._read_into(offset, buf)
        except IOFailure:
            c[_ERRORS] += 1
            raise
        else:
            c[_BYTES] += len(buf)
        finally:
            dt = _now() - t
            c[_NS] += dt
            c[_HIST + _BUCKET_OF[dt.bit_length()]] += 1

    def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        c = self._counters()
        b = _SLOT  # IoOp.WRITE
        c[b + _STARTED] += 1
        t = _now()
        try:
            if self._qos_flag[0]:
                self._throttle(IoKind.WRITE, len(data))
            self._write(offset, data, fua=fua)
        except IOFailure:
            c[b + _ERRORS] += 1
            raise
        else:
            c[b + _BYTES] += len(data)
        finally:
            dt = _now() - t
            c[b + _NS] += dt
            c[b + _HIST + _BUCKET_OF[dt.bit_length()]] += 1


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
