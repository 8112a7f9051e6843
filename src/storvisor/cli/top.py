"""``storvisor top``: per-volume IOPS, throughput and latency from two scrapes of the
daemon's ``/metrics``.

A sample is the difference of the export counters (``storvisor_export_requests_total``,
``storvisor_export_bytes_total`` and the latency sums of
``storvisor_export_request_duration_seconds``) between two scrapes, summed over the exports
of each volume and divided by the time between the scrapes. A counter that went down (its
export was removed and added again) counts from zero.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TextIO

from storvisor.errors import StorvisorError

_REQUESTS = "storvisor_export_requests_total"
_BYTES = "storvisor_export_bytes_total"
_LATENCY_SUM = "storvisor_export_request_duration_seconds_sum"
_WANTED = {_REQUESTS: 0, _BYTES: 1, _LATENCY_SUM: 2}

Key = tuple[str, str, str, str]  # export, pool, volume, op
Counters = dict[Key, list[float]]  # requests, bytes, latency seconds


def parse(text: str) -> Counters:
    """The export counters of a scrape. Raises ``StorvisorError`` if ``text`` is not the
    Prometheus text format or ``prometheus_client`` is missing."""
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError as e:
        raise StorvisorError(
            "storvisor top needs the prometheus_client library: pip install 'storvisor[metrics]'"
        ) from e
    counters: Counters = {}
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                index = _WANTED.get(s.name)
                if index is None:
                    continue
                labels = s.labels
                key = (labels["export"], labels["pool"], labels["volume"], labels["op"])
                counters.setdefault(key, [0.0, 0.0, 0.0])[index] = float(s.value)
    except (ValueError, KeyError) as e:
        raise StorvisorError(f"the daemon's metrics cannot be read: {e}") from e
    return counters


@dataclass(frozen=True, slots=True)
class VolumeRate:
    """What one volume did between two scrapes: operations and MB (10**6 bytes) per second,
    and the mean latency of its reads and writes in milliseconds (0 without any)."""

    pool: str
    volume: str
    read_iops: float
    write_iops: float
    other_iops: float  # flush, trim, write-zeroes
    read_mbps: float
    write_mbps: float
    read_latency_ms: float
    write_latency_ms: float

    @property
    def iops(self) -> float:
        return self.read_iops + self.write_iops + self.other_iops


def rates(before: Counters, after: Counters, seconds: float) -> list[VolumeRate]:
    """Per-volume rates between two scrapes ``seconds`` apart, busiest first."""
    sums: dict[tuple[str, str], dict[str, list[float]]] = {}
    for key, now in after.items():
        _, pool, volume, op = key
        then = before.get(key, [0.0, 0.0, 0.0])
        if now[0] < then[0]:  # reset: the export was added again
            then = [0.0, 0.0, 0.0]
        delta = [a - b for a, b in zip(now, then, strict=True)]
        per_op = sums.setdefault((pool, volume), {})
        acc = per_op.setdefault(op, [0.0, 0.0, 0.0])
        for i, d in enumerate(delta):
            acc[i] += d
    out = []
    for (pool, volume), ops in sums.items():
        zero = [0.0, 0.0, 0.0]
        read, write = ops.get("read", zero), ops.get("write", zero)
        other = sum(v[0] for op, v in ops.items() if op not in ("read", "write"))
        out.append(
            VolumeRate(
                pool,
                volume,
                read[0] / seconds,
                write[0] / seconds,
                other / seconds,
                read[1] / seconds / 1e6,
                write[1] / seconds / 1e6,
                read[2] / read[0] * 1e3 if read[0] else 0.0,
                write[2] / write[0] * 1e3 if write[0] else 0.0,
            )
        )
    out.sort(key=lambda r: (-r.iops, r.pool, r.volume))
    return out


def sample(scrape: Callable[[], str], interval: float) -> list[VolumeRate]:
    """One sample: two scrapes ``interval`` seconds apart."""
    before, t0 = parse(scrape()), time.monotonic()
    time.sleep(interval)
    after, t1 = parse(scrape()), time.monotonic()
    return rates(before, after, t1 - t0)


def to_json(interval: float, found: list[VolumeRate]) -> str:
    return json.dumps(
        {"interval": interval, "volumes": [asdict(r) for r in found]}, indent=2, sort_keys=True
    )


_HEADER = (
    f"{'VOLUME':<28} {'R IOPS':>9} {'W IOPS':>9} {'O IOPS':>8} {'R MB/s':>8} {'W MB/s':>8} "
    f"{'R LAT ms':>9} {'W LAT ms':>9}"
)


def table(found: list[VolumeRate]) -> str:
    lines = [_HEADER]
    for r in found:
        lines.append(
            f"{r.pool + '/' + r.volume:<28} {r.read_iops:>9.0f} {r.write_iops:>9.0f} "
            f"{r.other_iops:>8.0f} {r.read_mbps:>8.1f} {r.write_mbps:>8.1f} "
            f"{r.read_latency_ms:>9.3f} {r.write_latency_ms:>9.3f}"
        )
    if not found:
        lines.append("(no exported volume)")
    return "\n".join(lines)


def live(
    scrape: Callable[[], str], interval: float, count: int | None, out: TextIO = sys.stdout
) -> None:
    """Print a table every ``interval`` seconds (``count`` times, or until interrupted); the
    screen is cleared between tables when ``out`` is a terminal."""
    clear = "\x1b[H\x1b[2J" if out.isatty() else ""
    before, t0 = parse(scrape()), time.monotonic()
    shown = 0
    while count is None or shown < count:
        time.sleep(interval)
        after, t1 = parse(scrape()), time.monotonic()
        stamp = time.strftime("%H:%M:%S")
        out.write(f"{clear}storvisor top - {stamp} - every {interval:g} s\n")
        out.write(table(rates(before, after, t1 - t0)) + "\n")
        if not clear:
            out.write("\n")
        out.flush()
        before, t0 = after, t1
        shown += 1
