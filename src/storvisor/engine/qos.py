"""Quality of service: per-volume I/O limits shared by every process serving the volume.

Theory of operation
-------------------
A QoS *spec* (``QosSpec``) is a validated set of OpenStack Cinder's QoS keys. Resolved
against a volume's size (``QosSpec.limits``) it gives ``QosLimits``: for each of six buckets
(total, read and write I/Os per second; total, read and write bytes per second) a sustained
rate, an optional burst rate (``_max``) and how long a burst may last (``_max_length``,
1 second when not given), plus ``size_iops_sec``.

A volume is served by several processes at once (NBD workers, vhost-user queue processes),
so its buckets live in a ``QosBlock``: one page of shared memory (a memfd, like the shared
cluster map of ``sharedmap.py``) that the owner (the daemon) writes the limits into and that
every serving process maps and draws from. A request *reserves* its slot: under the block's
lock (a thread lock, then ``fcntl.lockf`` on the memfd, so threads and processes exclude each
other) it finds the earliest time every applicable bucket allows it, moves the buckets past
that time, and then sleeps (outside the lock) until it comes. Throttled requests wait; they
never fail.

Each bucket keeps two theoretical arrival times (a virtual-scheduling rate meter):

* sustained: ``tat_s``; a request may start once ``now >= tat_s - tolerance`` and then moves
  ``tat_s`` to ``max(tat_s, start) + cost / rate``. ``tolerance`` is the burst credit in
  seconds of the sustained rate: ``(max - rate) * max_length / rate``, 0 without a burst;
* peak (only with a burst rate): ``tat_p``, no burst credit, moved by ``cost / max``, so a burst
  runs at ``max``, not faster.

Both meters also allow ``SLACK`` seconds (10 ms) of lateness: a request that finds its
bucket up to that far behind schedule starts at once. It is what lets a server that wakes
late from a sleep catch up (a reservation it slept past is not lost), and what keeps the
long-run rate at the limit at 20,000 IOPS, where a request's slot (50 us) is shorter than a
sleep's wake-up latency. It lets ``SLACK * rate`` extra requests through after an idle time.

From idle, requests at the peak rate push ``tat_s`` ahead of ``now`` by ``max / rate - 1``
seconds per second; the credit is spent after exactly ``max_length`` seconds, and the rate
falls to the sustained one. The long-run rate is the sustained one whatever the concurrency,
because slots are reserved in absolute time (a late wake-up does not lose a slot).

An I/O costs one operation, or ``ceil(size / size_iops_sec)`` when ``size_iops_sec`` is set
and the I/O is larger, and its size in bytes. Reads draw from the total and read buckets,
writes from the total and write buckets. A discard or write-zeroes moves no data: it costs
one write operation and no bytes.

An unlimited volume's block has its *active* word at 0: a request then costs one read of
shared memory, no lock. The owner changes limits online (``QosBlock.set_limits``): the new
rates take effect at the next request of every process; bucket state is reset so the new
limit applies at once.

Time comes from a ``Clock`` (``MONOTONIC``: ``CLOCK_MONOTONIC`` is one clock for every
process of the machine), the one declared seam: tests inject a fake clock
(``storvisor.testing.clock.FakeClock``).
"""

from __future__ import annotations

import enum
import fcntl
import math
import mmap
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from storvisor.engine.device import BlockDevice, Buffer, DeviceWrapper
from storvisor.errors import InvalidArgument

GIB = 1 << 30

BASE_KEYS = (
    "total_iops_sec",
    "read_iops_sec",
    "write_iops_sec",
    "total_bytes_sec",
    "read_bytes_sec",
    "write_bytes_sec",
)
"""The six limits, in bucket order (``Bucket``)."""

SIZE_IOPS_KEY = "size_iops_sec"
_SUFFIXES = ("", "_max", "_max_length", "_per_gb", "_per_gb_min")
KEYS = frozenset(base + suffix for base in BASE_KEYS for suffix in _SUFFIXES) | {SIZE_IOPS_KEY}
"""Every key a spec may hold (Cinder's front-end QoS keys)."""

SLACK = 0.01
MAX_IOPS = 10**9
MAX_BYTES = 1 << 50  # 1 PiB/s
MAX_LENGTH = 86400.0  # a burst of at most a day
DEFAULT_MAX_LENGTH = 1.0


class Bucket(enum.IntEnum):
    TOTAL_IOPS = 0
    READ_IOPS = 1
    WRITE_IOPS = 2
    TOTAL_BYTES = 3
    READ_BYTES = 4
    WRITE_BYTES = 5


class IoKind(enum.IntEnum):
    READ = 0
    WRITE = 1
    OTHER = 2  # discard, write-zeroes: one write operation, no bytes


_BUCKETS_OF = {
    IoKind.READ: ((Bucket.TOTAL_IOPS, Bucket.READ_IOPS), (Bucket.TOTAL_BYTES, Bucket.READ_BYTES)),
    IoKind.WRITE: (
        (Bucket.TOTAL_IOPS, Bucket.WRITE_IOPS),
        (Bucket.TOTAL_BYTES, Bucket.WRITE_BYTES),
    ),
    IoKind.OTHER: ((Bucket.TOTAL_IOPS, Bucket.WRITE_IOPS), ()),
}


def _number(key: str, value: object) -> float:
    if isinstance(value, bool):
        raise InvalidArgument(f"QoS key {key}: {value!r} is not a number")
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise InvalidArgument(f"QoS key {key}: {value!r} is not a number") from None
    else:
        raise InvalidArgument(f"QoS key {key}: {value!r} is not a number")
    if not math.isfinite(number):
        raise InvalidArgument(f"QoS key {key}: {value!r} is not a finite number")
    if number < 0:
        raise InvalidArgument(f"QoS key {key}: {value!r} is negative")
    if key.endswith("_max_length"):
        if number == 0 or number > MAX_LENGTH:
            raise InvalidArgument(
                f"QoS key {key}: {value!r} is out of range (more than 0, at most {MAX_LENGTH:g})"
            )
        return number
    ceiling = MAX_IOPS if "_iops_" in key else MAX_BYTES
    if number > ceiling:
        raise InvalidArgument(f"QoS key {key}: {value!r} is absurd (at most {ceiling})")
    return number


@dataclass(frozen=True, slots=True)
class BucketLimit:
    """One bucket's limits: ``rate`` per second sustained (0: unlimited), ``peak`` per
    second during a burst (0: no burst) for ``max_length`` seconds."""

    rate: float = 0.0
    peak: float = 0.0
    max_length: float = DEFAULT_MAX_LENGTH

    @property
    def tolerance(self) -> float:
        """The burst credit, in seconds of the sustained rate."""
        if not self.rate or self.peak <= self.rate:
            return 0.0
        return (self.peak - self.rate) * self.max_length / self.rate


@dataclass(frozen=True, slots=True)
class QosLimits:
    """Resolved limits of one volume: one ``BucketLimit`` per ``Bucket``."""

    buckets: tuple[BucketLimit, ...] = tuple(BucketLimit() for _ in Bucket)
    size_iops: float = 0.0

    @property
    def unlimited(self) -> bool:
        return not any(b.rate for b in self.buckets)


UNLIMITED = QosLimits()


@dataclass(frozen=True, slots=True)
class QosSpec:
    """A validated set of QoS keys (``values``: key -> number, sorted by key).

    Build one with ``QosSpec.parse``; it is immutable and compares by value.
    """

    values: tuple[tuple[str, float], ...] = ()

    @classmethod
    def parse(cls, keys: Mapping[str, object]) -> QosSpec:
        """Validate ``keys`` (numbers or numeric strings).

        Raises ``InvalidArgument`` naming the key for: an unknown key, a value that is not a
        finite non-negative number or is absurdly large, a total key combined with its read
        or write key, a ``_max``, ``_max_length`` or ``_per_gb_min`` without what it
        qualifies, a ``_max`` below its sustained rate, a key given both plainly and per GB.
        """
        values: dict[str, float] = {}
        for key, value in keys.items():
            if key not in KEYS:
                raise InvalidArgument(
                    f"unknown QoS key {key!r} (known: {', '.join(BASE_KEYS)}, their _max, "
                    f"_max_length, _per_gb, _per_gb_min forms, and {SIZE_IOPS_KEY})"
                )
            values[key] = _number(key, value)

        def family(base: str) -> bool:
            return any(k.startswith(base) for k in values)

        for unit in ("iops", "bytes"):
            total = f"total_{unit}_sec"
            for side in ("read", "write"):
                other = f"{side}_{unit}_sec"
                if family(total) and family(other):
                    raise InvalidArgument(
                        f"QoS keys {total} and {other} cannot be combined: a total limit "
                        "excludes its read and write limits"
                    )
        for base in BASE_KEYS:
            plain, per_gb = base in values, f"{base}_per_gb" in values
            if plain and per_gb:
                raise InvalidArgument(f"QoS keys {base} and {base}_per_gb cannot be combined")
            if f"{base}_per_gb_min" in values and not per_gb:
                raise InvalidArgument(f"QoS key {base}_per_gb_min needs {base}_per_gb")
            if f"{base}_max" in values:
                if not plain:
                    raise InvalidArgument(f"QoS key {base}_max needs {base}")
                if values[f"{base}_max"] < values[base]:
                    raise InvalidArgument(f"QoS key {base}_max is below {base}")
            if f"{base}_max_length" in values and f"{base}_max" not in values:
                raise InvalidArgument(f"QoS key {base}_max_length needs {base}_max")
        return cls(tuple(sorted(values.items())))

    def as_dict(self) -> dict[str, float]:
        return dict(self.values)

    def limits(self, size: int) -> QosLimits:
        """The limits for a volume of ``size`` bytes: a ``_per_gb`` key gives
        ``max(per_gb * size in GiB, per_gb_min)``."""
        values = self.as_dict()
        buckets = []
        for base in BASE_KEYS:
            rate = values.get(base, 0.0)
            if f"{base}_per_gb" in values:
                rate = max(
                    values[f"{base}_per_gb"] * size / GIB, values.get(f"{base}_per_gb_min", 0)
                )
            buckets.append(
                BucketLimit(
                    rate,
                    values.get(f"{base}_max", 0.0),
                    values.get(f"{base}_max_length", DEFAULT_MAX_LENGTH),
                )
            )
        return QosLimits(tuple(buckets), values.get(SIZE_IOPS_KEY, 0.0))


class Clock(Protocol):
    """Where QoS takes time from (the declared seam for tests)."""

    def now(self) -> float:
        """Seconds on a clock every process of the machine shares."""

    def sleep(self, seconds: float) -> None: ...


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


MONOTONIC = MonotonicClock()

# The block: native doubles. Header, then per bucket _SLOT words.
_MAGIC_VALUE = float(0x51534F53)  # "SOSQ"
_MAGIC, _ACTIVE, _SIZE_IOPS, _WAITED = range(4)
_HEADER = 8
_RATE, _PEAK, _TOLERANCE, _TAT_S, _TAT_P = range(5)
_SLOT = 8
_WORDS = _HEADER + _SLOT * len(Bucket)
_SLOTS_OF = {
    kind: tuple(tuple(_HEADER + int(b) * _SLOT for b in group) for group in groups)
    for kind, groups in _BUCKETS_OF.items()
}
"""Per kind: the word offsets (each a bucket's ``_RATE`` word) of its op and byte buckets."""


class QosBlock:
    """The shared buckets of one volume.

    ``QosBlock()`` creates a block (the owner, unlimited); ``QosBlock(fd=...)`` maps an
    existing one (a data plane; the fd is then owned by the block and closed by ``close``).
    Thread- and process-safe.
    """

    def __init__(
        self, *, fd: int | None = None, name: str = "volume", clock: Clock = MONOTONIC
    ) -> None:
        self.clock = clock
        if fd is None:
            fd = os.memfd_create(f"storvisor-qos-{name}", os.MFD_CLOEXEC)
            os.ftruncate(fd, mmap.PAGESIZE)
            owner = True
        else:
            owner = False
        self.fd = fd
        self._mm = mmap.mmap(fd, mmap.PAGESIZE)
        self._w: memoryview[float] | None = memoryview(self._mm).cast("d")
        self.flag = self._w[_ACTIVE : _ACTIVE + 1]
        """The *active* word alone: ``flag[0]`` is non-zero iff a limit is set (what the hot
        path checks before anything else)."""
        if owner:
            self._w[_MAGIC] = _MAGIC_VALUE
        elif self._w[_MAGIC] != _MAGIC_VALUE:
            self.close()
            raise InvalidArgument("not a QoS block")
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        """Whether any limit is set."""
        return bool(self._words[_ACTIVE])

    @property
    def waited(self) -> float:
        """Seconds requests have been made to wait, in every process, since creation."""
        return self._words[_WAITED]

    @property
    def _words(self) -> memoryview[float]:
        assert self._w is not None, "QoS block is closed"
        return self._w

    def limits(self) -> QosLimits:
        """The limits in force."""
        w = self._words
        buckets = []
        for b in Bucket:
            base = _HEADER + b * _SLOT
            rate, peak, tolerance = w[base + _RATE], w[base + _PEAK], w[base + _TOLERANCE]
            tolerance -= SLACK
            length = tolerance * rate / (peak - rate) if peak > rate else DEFAULT_MAX_LENGTH
            buckets.append(BucketLimit(rate, peak, length))
        return QosLimits(tuple(buckets), w[_SIZE_IOPS])

    def set_limits(self, limits: QosLimits) -> None:
        """Put ``limits`` in force for every process (resets the buckets' state)."""
        with self._locked():
            w = self._words
            w[_ACTIVE] = 0.0
            for b, limit in zip(Bucket, limits.buckets, strict=True):
                base = _HEADER + b * _SLOT
                w[base + _RATE] = limit.rate
                w[base + _PEAK] = limit.peak if limit.peak > limit.rate else 0.0
                w[base + _TOLERANCE] = limit.tolerance + SLACK
                w[base + _TAT_S] = 0.0
                w[base + _TAT_P] = 0.0
            w[_SIZE_IOPS] = limits.size_iops
            w[_ACTIVE] = 0.0 if limits.unlimited else 1.0

    def reserve(self, kind: IoKind, nbytes: int) -> float:
        """Reserve a slot for one I/O of ``nbytes``; return how long to wait (seconds, 0
        when it may start now). The caller must wait that long before doing the I/O."""
        w = self._words
        if not w[_ACTIVE]:
            return 0.0
        op_slots, byte_slots = _SLOTS_OF[kind]
        lock = self._lock
        fd = self.fd
        with lock:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            try:
                now = self.clock.now()
                ops = 1.0
                size_iops = w[_SIZE_IOPS]
                if size_iops and nbytes > size_iops and byte_slots:
                    ops = float(math.ceil(nbytes / size_iops))
                charges = [(base, ops) for base in op_slots if w[base]]
                charges += [(base, float(nbytes)) for base in byte_slots if w[base]]
                start = now
                for base, _ in charges:
                    tat = w[base + _TAT_S] - w[base + _TOLERANCE]
                    if tat > start:
                        start = tat
                    if w[base + _PEAK] and w[base + _TAT_P] - SLACK > start:
                        start = w[base + _TAT_P] - SLACK
                for base, cost in charges:
                    w[base + _TAT_S] = max(w[base + _TAT_S], start) + cost / w[base]
                    peak = w[base + _PEAK]
                    if peak:
                        w[base + _TAT_P] = max(w[base + _TAT_P], start) + cost / peak
                delay = start - now
                if delay > 0:
                    w[_WAITED] += delay
                return delay
            finally:
                fcntl.lockf(fd, fcntl.LOCK_UN)

    def throttle(self, kind: IoKind, nbytes: int) -> None:
        """Wait until one I/O of ``nbytes`` may run (returns at once when unlimited)."""
        if not self._words[_ACTIVE]:
            return
        delay = self.reserve(kind, nbytes)
        if delay > 0:
            self.clock.sleep(delay)

    def close(self) -> None:
        if self._w is not None:
            self.flag.release()
            self._w.release()
            self._w = None
            self._mm.close()
            os.close(self.fd)

    def _locked(self) -> _BlockLock:
        return _BlockLock(self._lock, self.fd)


class _BlockLock:
    __slots__ = ("_fd", "_lock")

    def __init__(self, lock: threading.Lock, fd: int) -> None:
        self._lock = lock
        self._fd = fd

    def __enter__(self) -> None:
        self._lock.acquire()
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._lock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
        finally:
            self._lock.release()


class VectorIO(Protocol):
    """Vectored reads and writes (what ``protocols.virtio.blk.VectoredIO`` asks)."""

    def read_into(self, offset: int, views: list[memoryview]) -> None: ...
    def write(self, offset: int, views: list[memoryview], *, fua: bool) -> None: ...


class _ThrottledVectors:
    def __init__(self, inner: VectorIO, qos: QosBlock) -> None:
        self._inner_read = inner.read_into
        self._inner_write = inner.write
        self._qos = qos
        self._flag = qos.flag

    def read_into(self, offset: int, views: list[memoryview]) -> None:
        if self._flag[0]:
            self._qos.throttle(IoKind.READ, sum(map(len, views)))
        self._inner_read(offset, views)

    def write(self, offset: int, views: list[memoryview], *, fua: bool) -> None:
        if self._flag[0]:
            self._qos.throttle(IoKind.WRITE, sum(map(len, views)))
        self._inner_write(offset, views, fua=fua)


class ThrottledDevice(DeviceWrapper):
    """A ``BlockDevice`` that waits for ``qos`` tokens before each read, write, discard and
    write-zeroes of ``inner`` (flush and block status are free).

    ``close`` closes ``inner``, and ``qos`` too when ``owns_qos``. ``vectors`` throttles
    ``inner.vectors`` when ``inner`` has them (a data plane's ``RemoteVolume``).
    """

    def __init__(self, inner: BlockDevice, qos: QosBlock, *, owns_qos: bool = False) -> None:
        super().__init__(inner)
        self.qos = qos
        self._owns_qos = owns_qos
        self._flag = qos.flag  # the hot path's one check
        self._read_into = inner.read_into
        self._write = inner.write
        vectors: VectorIO | None = getattr(inner, "vectors", None)
        self.vectors = _ThrottledVectors(vectors, qos) if vectors is not None else None

    def read_into(self, offset: int, buf: memoryview) -> None:
        if self._flag[0]:
            self.qos.throttle(IoKind.READ, len(buf))
        self._read_into(offset, buf)

    def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        if self._flag[0]:
            self.qos.throttle(IoKind.WRITE, len(data))
        self._write(offset, data, fua=fua)

    def flush(self) -> None:
        self.inner.flush()

    def discard(self, offset: int, length: int) -> None:
        if self._flag[0]:
            self.qos.throttle(IoKind.OTHER, 0)
        self.inner.discard(offset, length)

    def write_zeroes(
        self, offset: int, length: int, *, may_unmap: bool = True, fua: bool = False
    ) -> None:
        if self._flag[0]:
            self.qos.throttle(IoKind.OTHER, 0)
        self.inner.write_zeroes(offset, length, may_unmap=may_unmap, fua=fua)

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            if self._owns_qos:
                self.qos.close()
