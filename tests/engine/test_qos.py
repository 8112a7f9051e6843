"""QoS specs and the shared token buckets, on a fake clock."""

from __future__ import annotations

import math
import os

import pytest

from storvisor.engine.qos import (
    GIB,
    SLACK,
    Bucket,
    IoKind,
    QosBlock,
    QosSpec,
    ThrottledDevice,
)
from storvisor.errors import InvalidArgument
from storvisor.testing.clock import FakeClock
from storvisor.testing.conformance import check_block_device
from storvisor.testing.memory import MemoryDevice


def block(clock: FakeClock, size: int = GIB, **keys: object) -> QosBlock:
    qos = QosBlock(clock=clock)
    qos.set_limits(QosSpec.parse(keys).limits(size))
    return qos


def starts(qos: QosBlock, clock: FakeClock, kind: IoKind, nbytes: int, count: int) -> list[float]:
    """Issue ``count`` I/Os one after another (each waits its turn); their start times."""
    out = []
    for _ in range(count):
        qos.throttle(kind, nbytes)
        out.append(clock.now())
    return out


def rate(times: list[float]) -> float:
    """The steady rate: over the second half (the first may use the ``SLACK`` credit)."""
    times = times[len(times) // 2 :]
    return (len(times) - 1) / (times[-1] - times[0])


def due(delays: list[float]) -> list[float]:
    """Scheduled delays as ``reserve`` returns them: ``SLACK`` of lateness is allowed."""
    return [max(d - SLACK, 0.0) for d in delays]


# -- specs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"total_iops": 1}, "unknown QoS key 'total_iops'"),
        ({"read_iops_sec": -1}, "read_iops_sec: -1 is negative"),
        ({"read_iops_sec": "fast"}, "read_iops_sec: 'fast' is not a number"),
        ({"read_iops_sec": True}, "read_iops_sec: True is not a number"),
        ({"read_iops_sec": "nan"}, "read_iops_sec: 'nan' is not a finite number"),
        ({"read_iops_sec": 10**12}, "read_iops_sec: 1000000000000 is absurd"),
        ({"write_bytes_sec": 2**60}, "write_bytes_sec: 1152921504606846976 is absurd"),
        ({"total_iops_sec": 10, "read_iops_sec": 5}, "total_iops_sec and read_iops_sec cannot"),
        ({"total_bytes_sec_max": 10, "write_bytes_sec": 5}, "total_bytes_sec and write_bytes_sec"),
        ({"total_iops_sec_per_gb": 1, "write_iops_sec": 5}, "total_iops_sec and write_iops_sec"),
        ({"read_iops_sec_max": 10}, "read_iops_sec_max needs read_iops_sec"),
        ({"read_iops_sec": 10, "read_iops_sec_max": 5}, "read_iops_sec_max is below"),
        (
            {"read_iops_sec": 10, "read_iops_sec_max_length": 5},
            "read_iops_sec_max_length needs read_iops_sec_max",
        ),
        (
            {"read_iops_sec": 1, "read_iops_sec_max": 5, "read_iops_sec_max_length": 0},
            "read_iops_sec_max_length: 0 is out of range",
        ),
        ({"read_iops_sec_per_gb_min": 10}, "read_iops_sec_per_gb_min needs read_iops_sec_per_gb"),
        (
            {"read_iops_sec": 1, "read_iops_sec_per_gb": 1},
            "read_iops_sec and read_iops_sec_per_gb cannot be combined",
        ),
    ],
)
def test_bad_specs_name_the_key(keys: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgument, match="^" + ".*".join(map(_re, message.split("*")))):
        QosSpec.parse(keys)


def _re(text: str) -> str:
    import re

    return ".*" + re.escape(text)


def test_spec_parses_numbers_and_numeric_strings() -> None:
    spec = QosSpec.parse({"read_iops_sec": "100", "write_bytes_sec": 1e6, "size_iops_sec": "4096"})
    assert spec.as_dict() == {
        "read_iops_sec": 100.0,
        "size_iops_sec": 4096.0,
        "write_bytes_sec": 1e6,
    }
    limits = spec.limits(GIB)
    assert limits.buckets[Bucket.READ_IOPS].rate == 100
    assert limits.buckets[Bucket.WRITE_BYTES].rate == 1e6
    assert limits.buckets[Bucket.TOTAL_IOPS].rate == 0
    assert limits.size_iops == 4096
    assert QosSpec.parse({}).limits(GIB).unlimited


def test_per_gb_follows_the_size_with_a_floor() -> None:
    spec = QosSpec.parse({"total_iops_sec_per_gb": 10, "total_iops_sec_per_gb_min": 50})
    assert spec.limits(GIB).buckets[Bucket.TOTAL_IOPS].rate == 50  # 10 < min
    assert spec.limits(20 * GIB).buckets[Bucket.TOTAL_IOPS].rate == 200  # after an extend
    clock = FakeClock()
    qos = QosBlock(clock=clock)
    qos.set_limits(spec.limits(GIB))
    assert rate(starts(qos, clock, IoKind.READ, 4096, 101)) == pytest.approx(50)
    qos.set_limits(spec.limits(20 * GIB))
    assert rate(starts(qos, clock, IoKind.READ, 4096, 401)) == pytest.approx(200)


# -- bucket math -----------------------------------------------------------------------


@pytest.mark.parametrize("iops", [200, 2000, 20000])
def test_iops_rate(iops: int) -> None:
    clock = FakeClock()
    qos = block(clock, total_iops_sec=iops)
    assert rate(starts(qos, clock, IoKind.WRITE, 4096, 2 * iops)) == pytest.approx(iops)


@pytest.mark.parametrize("mbps", [10, 200])
def test_bytes_rate(mbps: int) -> None:
    clock = FakeClock()
    qos = block(clock, read_bytes_sec=mbps * 10**6)
    times = starts(qos, clock, IoKind.READ, 65536, 4000)[2000:]
    # 1999 gaps of one 64 KiB request each
    assert (len(times) - 1) * 65536 / (times[-1] - times[0]) == pytest.approx(mbps * 10**6)


def test_requests_issued_together_are_spread_at_the_rate() -> None:
    clock = FakeClock()
    qos = block(clock, total_iops_sec=100)
    delays = [qos.reserve(IoKind.READ, 4096) for _ in range(32)]  # qd32, nobody sleeps
    assert delays == pytest.approx([max(i / 100 - SLACK, 0) for i in range(32)])


def test_burst_runs_at_max_for_max_length_then_falls_to_the_rate() -> None:
    clock = FakeClock()
    qos = block(clock, total_iops_sec=100, total_iops_sec_max=1000, total_iops_sec_max_length=2)
    t0 = clock.now()
    times = starts(qos, clock, IoKind.READ, 4096, 3000)
    in_burst = sum(1 for t in times if t < t0 + 2)
    assert in_burst == pytest.approx(2000, abs=3)  # 1000/s for 2 s
    after = [t for t in times if t0 + 2.5 <= t < t0 + 5.5]
    assert len(after) == pytest.approx(300, abs=2)  # then 100/s
    # idle long enough refills the credit: (1000 - 100) * 2 / 100 = 18 s of sustained rate
    clock.advance(18.1)
    t1 = clock.now()
    again = starts(qos, clock, IoKind.READ, 4096, 2500)
    assert sum(1 for t in again if t < t1 + 2) == pytest.approx(2000, abs=3)


def test_burst_default_length_is_one_second() -> None:
    clock = FakeClock()
    qos = block(clock, write_bytes_sec=10**6, write_bytes_sec_max=4 * 10**6)
    t0 = clock.now()
    times = starts(qos, clock, IoKind.WRITE, 10**4, 1000)
    assert sum(1 for t in times if t < t0 + 1) == pytest.approx(400, abs=2)


def test_size_iops_counts_large_ios_as_several() -> None:
    clock = FakeClock()
    qos = block(clock, total_iops_sec=160, size_iops_sec=4096)
    assert rate(starts(qos, clock, IoKind.READ, 65536, 101)) == pytest.approx(10)  # 16 each
    assert rate(starts(qos, clock, IoKind.READ, 4096, 101)) == pytest.approx(160)
    assert rate(starts(qos, clock, IoKind.READ, 4097, 101)) == pytest.approx(80)  # 2 each


def test_read_write_and_total_are_separate() -> None:
    clock = FakeClock()
    qos = block(clock, read_iops_sec=100, write_iops_sec=50)
    reads = [qos.reserve(IoKind.READ, 512) for _ in range(10)]
    writes = [qos.reserve(IoKind.WRITE, 512) for _ in range(10)]
    assert reads == pytest.approx(due([i / 100 for i in range(10)]))
    assert writes == pytest.approx(due([i / 50 for i in range(10)]))  # reads took no write slot
    # discard / write-zeroes: one write operation, no bytes
    assert qos.reserve(IoKind.OTHER, 0) == pytest.approx(10 / 50 - SLACK)
    clock = FakeClock()
    qos = block(clock, total_iops_sec=100, read_bytes_sec=4096 * 10)
    mixed = [qos.reserve(kind, 4096) for kind in [IoKind.READ, IoKind.WRITE] * 5]
    # reads: 10 per second by bytes; a write takes the op slot right after the read's
    assert mixed == pytest.approx([0, 0, 0.09, 0.09, 0.19, 0.19, 0.29, 0.29, 0.39, 0.39])
    assert qos.reserve(IoKind.READ, 4096) == pytest.approx(0.49)  # 6th read, bytes-bound
    assert qos.reserve(IoKind.OTHER, 1 << 30) == pytest.approx(0.49)  # an op slot only


def test_unlimited_costs_no_wait_and_limits_change_online() -> None:
    clock = FakeClock()
    qos = QosBlock(clock=clock)
    assert not qos.active
    assert starts(qos, clock, IoKind.WRITE, 1 << 20, 1000) == [clock.now()] * 1000
    qos.set_limits(QosSpec.parse({"write_iops_sec": 10}).limits(GIB))
    assert qos.active
    assert [qos.reserve(IoKind.WRITE, 1) for _ in range(3)] == pytest.approx(due([0, 0.1, 0.2]))
    qos.set_limits(QosSpec.parse({"write_iops_sec": 100}).limits(GIB))  # reset, faster
    assert [qos.reserve(IoKind.WRITE, 1) for _ in range(3)] == pytest.approx(due([0, 0.01, 0.02]))
    qos.set_limits(QosSpec.parse({}).limits(GIB))
    assert not qos.active and qos.reserve(IoKind.WRITE, 1) == 0
    assert qos.waited == pytest.approx(0.09 + 0.19 + 0.01)


def test_blocks_mapped_from_one_fd_share_the_buckets() -> None:
    clock = FakeClock()
    owner = block(clock, total_iops_sec=100)
    planes = [QosBlock(fd=os.dup(owner.fd), clock=clock) for _ in range(3)]
    try:
        delays = [p.reserve(IoKind.READ, 4096) for _ in range(4) for p in [owner, *planes]]
        assert delays == pytest.approx(due([i / 100 for i in range(16)]))
        owner.set_limits(QosSpec.parse({}).limits(GIB))
        assert not any(p.active for p in planes)
        assert planes[0].limits().unlimited
    finally:
        for p in planes:
            p.close()
        owner.close()


def test_a_plane_refuses_a_foreign_fd() -> None:
    fd = os.memfd_create("x")
    os.ftruncate(fd, 4096)
    with pytest.raises(InvalidArgument, match="not a QoS block"):
        QosBlock(fd=fd)


def test_limits_round_trip_through_the_block() -> None:
    spec = QosSpec.parse(
        {"read_iops_sec": 100, "read_iops_sec_max": 300, "read_iops_sec_max_length": 5}
    )
    qos = QosBlock()
    qos.set_limits(spec.limits(GIB))
    got = qos.limits().buckets[Bucket.READ_IOPS]
    assert (got.rate, got.peak) == (100, 300)
    assert math.isclose(got.max_length, 5)
    qos.close()


def test_throttled_device_passes_the_conformance_suite() -> None:
    clock = FakeClock()
    qos = block(clock, total_iops_sec=1000, total_bytes_sec=10**8)
    check_block_device(lambda size: ThrottledDevice(MemoryDevice(size), qos))
    assert clock.slept > 0  # the suite's I/O was throttled, and nothing failed
    qos.close()


def test_discard_and_write_zeroes_move_no_bytes() -> None:
    clock = FakeClock()
    qos = block(clock, total_bytes_sec=4096)
    assert [qos.reserve(IoKind.OTHER, 1 << 30) for _ in range(100)] == [0.0] * 100
    assert qos.reserve(IoKind.WRITE, 4096) == 0.0
    assert qos.reserve(IoKind.WRITE, 4096) == pytest.approx(1 - SLACK)
