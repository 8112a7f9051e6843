"""The I/O counter blocks: what a ``CountedDevice`` counts, what another process mapping the
block sees, and how a ``StatsSet`` keeps the counts of closed devices."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time

import pytest

from storvisor.engine.iostats import (
    BOUNDS_NS,
    BUCKETS,
    PUBLISH_INTERVAL,
    CountedDevice,
    IoOp,
    IoStats,
    LatencyHistogram,
    StatsSet,
    ThreadCountedDevice,
)
from storvisor.engine.qos import QosBlock, QosSpec, ThrottledDevice
from storvisor.errors import InvalidArgument, IOFailure
from storvisor.testing.clock import FakeClock
from storvisor.testing.conformance import check_block_device
from storvisor.testing.memory import MemoryDevice


def test_counts_each_operation_with_its_bytes_and_latency() -> None:
    stats = IoStats()
    device = CountedDevice(MemoryDevice(1 << 20), stats)
    device.write(0, b"a" * 4096)
    device.write(8192, memoryview(bytearray(512)), fua=True)
    buf = memoryview(bytearray(1024))
    device.read_into(0, buf)
    assert bytes(buf) == b"a" * 1024
    device.flush()
    device.discard(0, 65536)
    device.write_zeroes(4096, 12288, may_unmap=False)
    device.block_status(0, 4096)  # not counted
    assert stats.totals()[IoOp.WRITE].started == 0  # not published yet
    device.publish()
    totals = stats.totals()
    expected = {
        IoOp.READ: (1, 1024),
        IoOp.WRITE: (2, 4608),
        IoOp.FLUSH: (1, 0),
        IoOp.TRIM: (1, 65536),
        IoOp.ZERO: (1, 12288),
    }
    for op, (count, nbytes) in expected.items():
        t = totals[op]
        assert (t.started, t.completed, t.bytes, t.errors) == (count, count, nbytes, 0), op
        assert t.latency_ns > 0 and t.in_flight == 0
        assert len(t.buckets) == BUCKETS
    device.close()
    stats.close()


def test_a_failed_request_counts_as_an_error_and_moves_no_bytes() -> None:
    stats = IoStats()
    device = CountedDevice(MemoryDevice(4096), stats)
    with pytest.raises(IOFailure) as e:
        device.write(4096, b"x" * 512)  # beyond the end
    assert e.value.errno == errno.ENOSPC
    with pytest.raises(IOFailure):
        device.read_into(4096, memoryview(bytearray(512)))
    device.publish()
    write, read = stats.totals()[IoOp.WRITE], stats.totals()[IoOp.READ]
    assert (write.started, write.completed, write.errors, write.bytes) == (1, 1, 1, 0)
    assert (read.started, read.completed, read.errors, read.bytes) == (1, 1, 1, 0)
    stats.close()


class _Slow(MemoryDevice):
    """Reads wait for ``release``: a request in flight."""

    def __init__(self) -> None:
        super().__init__(1 << 20)
        self.entered = threading.Event()
        self.release = threading.Event()

    def read_into(self, offset: int, buf: memoryview) -> None:
        self.entered.set()
        assert self.release.wait(30)
        super().read_into(offset, buf)


def test_requests_in_flight_and_latency_buckets() -> None:
    inner = _Slow()
    stats = IoStats()
    device = CountedDevice(inner, stats)
    reader = threading.Thread(target=device.read_into, args=(0, memoryview(bytearray(512))))
    reader.start()
    assert inner.entered.wait(30)
    device.publish()
    assert stats.totals()[IoOp.READ].in_flight == 1
    threading.Event().wait(0.05)
    inner.release.set()
    reader.join(30)
    device.publish()
    read = stats.totals()[IoOp.READ]
    assert read.in_flight == 0 and read.completed == 1
    # 50 ms or more: the bucket is the first whose bound is above the latency
    (index,) = [i for i, n in enumerate(read.buckets) if n]
    assert read.latency_ns >= 50_000_000
    assert BOUNDS_NS[index] > read.latency_ns >= BOUNDS_NS[index - 1]
    stats.close()


def test_another_process_sees_the_counts_of_a_mapped_block() -> None:
    """A data plane maps the daemon's block by fd and counts in it; the daemon reads it."""
    stats = IoStats()
    code = (
        "import sys\n"
        "from storvisor.engine.iostats import CountedDevice, IoStats\n"
        "from storvisor.testing.memory import MemoryDevice\n"
        "d = CountedDevice(MemoryDevice(1 << 20), IoStats(fd=int(sys.argv[1])), owns_stats=True)\n"
        "for i in range(100):\n"
        "    d.write(i * 4096, b'x' * 4096)\n"
        "d.close()\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(stats.fd)], pass_fds=[stats.fd], check=True, timeout=60
    )
    write = stats.totals()[IoOp.WRITE]
    assert (write.completed, write.bytes) == (100, 409600)
    stats.close()


def test_a_block_that_is_not_one_is_refused() -> None:
    fd = os.memfd_create("not-stats")
    os.ftruncate(fd, 4096)
    with pytest.raises(InvalidArgument, match="not an I/O statistics block"):
        IoStats(fd=fd)  # closes fd


def test_a_stats_set_keeps_the_counts_of_closed_devices() -> None:
    stats = StatsSet("e")
    open_counted = stats.counted(lambda: MemoryDevice(1 << 20))
    first, second = open_counted(), open_counted()
    first.write(0, b"1" * 4096)
    second.write(0, b"2" * 8192)
    assert stats.connections == 2
    first.close()  # publishes its counts, then retires its block
    assert stats.connections == 1
    second.write(0, b"2" * 512)
    deadline = time.monotonic() + 10 * PUBLISH_INTERVAL + 5  # the publishing thread's turn
    while stats.totals()[IoOp.WRITE].completed < 3:
        assert time.monotonic() < deadline, "the counts were not published"
        time.sleep(PUBLISH_INTERVAL / 10)
    total = stats.totals()[IoOp.WRITE]
    assert (total.completed, total.bytes) == (3, 4096 + 8192 + 512)
    second.close()
    assert stats.connections == 0
    total = stats.totals()[IoOp.WRITE]
    assert (total.completed, total.bytes) == (3, 4096 + 8192 + 512)
    assert stats.in_flight() == (0,) * len(IoOp)


def test_latency_histogram() -> None:
    h = LatencyHistogram()
    for ns in (1, BOUNDS_NS[0], BOUNDS_NS[3] - 1, 1 << 40):
        h.observe(ns)
    buckets, total = h.snapshot()
    assert total == 1 + BOUNDS_NS[0] + BOUNDS_NS[3] - 1 + (1 << 40)
    assert buckets[0] == 1 and buckets[1] == 1 and buckets[3] == 1 and buckets[-1] == 1


def test_a_counted_device_is_a_block_device() -> None:
    stats = IoStats()
    check_block_device(lambda size: CountedDevice(MemoryDevice(size), stats))
    assert stats.totals()[IoOp.WRITE].completed > 0  # published by each close
    stats.close()


class _Vectors:
    """Vectored reads and writes of a ``MemoryDevice``, counted."""

    def __init__(self, device: MemoryDevice) -> None:
        self.device = device
        self.calls = 0

    def read_into(self, offset: int, views: list[memoryview]) -> None:
        self.calls += 1
        for view in views:
            self.device.read_into(offset, view)
            offset += len(view)

    def write(self, offset: int, views: list[memoryview], *, fua: bool) -> None:
        self.calls += 1
        for view in views:
            self.device.write(offset, view, fua=fua)
            offset += len(view)


@pytest.mark.parametrize("counted", [CountedDevice, ThreadCountedDevice])
def test_counting_a_throttled_device_keeps_its_limits_set_at_any_time(
    counted: type[CountedDevice],
) -> None:
    """The counting wrapper makes the throttled device's QoS check itself: every kind of
    request, on the device and on its vectors, waits for tokens once a limit is set, also a
    limit set after the device was opened; while unlimited nothing waits."""
    clock = FakeClock()
    qos = QosBlock(clock=clock)
    memory = MemoryDevice(1 << 20)
    vectors = _Vectors(memory)
    memory.vectors = vectors  # type: ignore[attr-defined]
    stats = IoStats()
    device = counted(ThrottledDevice(memory, qos), stats)
    assert device.vectors is not None
    buf = memoryview(bytearray(4096))

    def each_kind() -> None:
        device.read_into(0, buf)
        device.write(4096, b"x" * 4096)
        device.vectors.read_into(0, [buf])
        device.vectors.write(8192, [memoryview(b"y" * 4096)], fua=False)
        device.discard(0, 4096)
        device.write_zeroes(0, 4096)

    for _ in range(20):
        each_kind()
    assert clock.slept == 0.0 and qos.waited == 0.0
    assert vectors.calls == 40  # the vectors of the memory device, not a throttling copy

    qos.set_limits(QosSpec.parse({"total_iops_sec": 10}).limits(1 << 30))
    t0 = clock.now()
    for _ in range(20):
        each_kind()  # 120 requests at 10 a second: about 12 s, less the initial tokens
    assert clock.now() - t0 == pytest.approx(12.0, abs=1.5)
    assert qos.waited > 0

    qos.set_limits(QosSpec.parse({}).limits(1 << 30))
    slept = clock.slept
    for _ in range(20):
        each_kind()
    assert clock.slept == slept
    device.close()
    assert stats.totals()[IoOp.READ].completed == 120
    stats.close()
    qos.close()


def test_each_thread_of_a_thread_counted_device_counts_in_its_own_slot() -> None:
    stats = IoStats(slots=4)
    device = ThreadCountedDevice(MemoryDevice(1 << 20), stats)

    def work(n: int) -> None:
        for i in range(n):
            device.write(i * 512, b"w" * 512)
            device.read_into(i * 512, memoryview(bytearray(512)))

    threads = [threading.Thread(target=work, args=(2000,)) for _ in range(6)]  # > slots
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    device.publish()
    write, read = stats.totals()[IoOp.WRITE], stats.totals()[IoOp.READ]
    # threads 4 to 6 share the last slot: only they may lose a count to a race
    assert 3 * 2000 < write.completed <= 6 * 2000 and 3 * 2000 < read.completed <= 6 * 2000
    assert write.bytes == write.completed * 512
    device.close()
    stats.close()


def test_a_thread_counted_device_loses_no_count_within_its_slots() -> None:
    stats = IoStats(slots=8)
    device = ThreadCountedDevice(MemoryDevice(1 << 20), stats)
    threads = [
        threading.Thread(
            target=lambda: [device.write(0, b"w" * 4096) for _ in range(5000)]  # type: ignore[func-returns-value]
        )
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    device.close()  # publishes
    write = IoStats(fd=os.dup(stats.fd)).totals()[IoOp.WRITE]
    assert (write.completed, write.bytes) == (20000, 20000 * 4096)
    stats.close()
