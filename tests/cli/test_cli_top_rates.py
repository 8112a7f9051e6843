"""``storvisor top``'s arithmetic: rates per volume from two scrapes."""

from __future__ import annotations

import pytest

from prereq import require_module
from storvisor.cli.top import parse, rates

require_module("prometheus_client", "prometheus_client is not installed")


def _scrape(**counts: tuple[float, float, float]) -> str:
    """A scrape with ``export_op=(requests, bytes, latency seconds)`` for volume p/v."""
    lines = []
    for key, (n, nbytes, seconds) in counts.items():
        export, op = key.rsplit("_", 1)
        labels = f'export="{export}",kind="nbd",op="{op}",pool="p",volume="v"'
        lines += [
            f"storvisor_export_requests_total{{{labels}}} {n}",
            f"storvisor_export_bytes_total{{{labels}}} {nbytes}",
            f"storvisor_export_request_duration_seconds_sum{{{labels}}} {seconds}",
        ]
    return "\n".join(lines) + "\n"


def test_rates_sum_the_exports_of_a_volume() -> None:
    before = parse(_scrape(a_read=(100, 409600, 0.1), a_write=(10, 40960, 0.05), b_write=(0, 0, 0)))
    after = parse(
        _scrape(
            a_read=(300, 1228800, 0.3),
            a_write=(30, 122880, 0.15),
            b_write=(20, 81920, 0.1),
            b_flush=(4, 0, 0.02),
        )
    )
    (r,) = rates(before, after, 2.0)
    assert (r.pool, r.volume) == ("p", "v")
    assert r.read_iops == 100 and r.write_iops == 20 and r.other_iops == 2
    assert r.read_mbps == pytest.approx(0.4096) and r.write_mbps == pytest.approx(0.08192)
    assert r.read_latency_ms == pytest.approx(1.0)
    assert r.write_latency_ms == pytest.approx(200 / 40)  # 0.2 s over 40 writes


def test_a_counter_that_went_down_counts_from_zero() -> None:
    before = parse(_scrape(a_write=(1000, 4096000, 1.0)))
    after = parse(_scrape(a_write=(10, 40960, 0.01)))  # the export was added again
    (r,) = rates(before, after, 1.0)
    assert r.write_iops == 10 and r.write_mbps == pytest.approx(0.04096)
