"""The daemon's metrics: a typed sample (``MetricsSample``, gathered by
``Service.metrics_sample``) and its rendering in the Prometheus text format.

What is measured, and where:

* per export (NBD, and vhost-user-blk and TCMU backstores served by data-plane processes;
  labels ``export``, ``kind``, ``pool``, ``volume``, and ``op`` one of read, write, flush,
  trim, zero): requests, bytes, failed requests and a latency histogram, from
  the export's ``StatsSet`` (``engine/iostats.py``), which sums the shared-memory counter
  blocks of every connection (NBD) or data-plane process (vhost-user-blk, TCMU); requests
  in flight; open connections (NBD) or data-plane processes (vhost-user-blk, TCMU);
* per volume (``pool``, ``volume``): seconds requests waited for QoS tokens, from the
  volume's QoS block (every process adds its waits there);
* per pool (``pool``): capacity, allocated and provisioned bytes, clusters (``state``
  total, allocated, free), metadata commit latency histogram, and whether it is online;
  with a cache tier: cache lookups (``result`` hit, miss), dirty bytes, bytes destaged and
  the destage rate;
* per S3 endpoint of a pool (``pool``, ``endpoint``): up or down, requests, errors and the
  moving average of its latency; per imported S3 pool, the objects not fetched yet;
* per data plane (``kind``, ``export``): processes restarted after one ended.

Rendering uses the ``prometheus_client`` library (the ``metrics`` extra). Without it the
core works as before and ``render`` raises ``MetricsUnavailable``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from storvisor.engine.iostats import BOUNDS_NS, IoOp, IoTotals
from storvisor.engine.types import IoErrorCounts, PoolInfo
from storvisor.errors import LocalFailure

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

OP_NAMES = {op: op.name.lower() for op in IoOp}


class MetricsUnavailable(LocalFailure):
    """The ``prometheus_client`` library is not installed."""


@dataclass(frozen=True, slots=True)
class ExportSample:
    name: str
    kind: str
    pool: str
    volume: str
    totals: IoTotals
    in_flight: tuple[int, ...]  # per IoOp
    connections: int


@dataclass(frozen=True, slots=True)
class PoolSample:
    info: PoolInfo
    commit_buckets: tuple[int, ...]  # per BOUNDS_NS bucket, +Inf last; empty when offline
    commit_ns: int
    io_errors: IoErrorCounts = field(default_factory=IoErrorCounts)  # since the pool opened


@dataclass(frozen=True, slots=True)
class QosWait:
    pool: str
    volume: str
    seconds: float


@dataclass(frozen=True, slots=True)
class Restarts:
    kind: str
    export: str
    count: int


@dataclass(frozen=True, slots=True)
class MetricsSample:
    exports: tuple[ExportSample, ...]
    pools: tuple[PoolSample, ...]
    qos_waits: tuple[QosWait, ...]
    restarts: tuple[Restarts, ...]


def _histogram_buckets(counts: tuple[int, ...]) -> list[tuple[str, float]]:
    """Cumulative ``(le, count)`` pairs for ``counts`` (per ``BOUNDS_NS`` bucket, +Inf last)."""
    out: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip(BOUNDS_NS, counts, strict=False):
        running += count
        out.append((repr(bound / 1e9), float(running)))
    out.append(("+Inf", float(running + counts[-1])))
    return out


def _cache_families(pools: tuple[PoolSample, ...]) -> Iterator[Any]:
    """A pool's cache tier (pools without one have no sample)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    labels = ["pool"]
    lookups = CounterMetricFamily(
        "storvisor_pool_cache_lookups",
        "Cache lines looked up by reads and writes since the pool opened, by result.",
        labels=["pool", "result"],
    )
    dirty = GaugeMetricFamily(
        "storvisor_pool_cache_dirty_bytes", "Bytes written to the cache, not destaged yet.",
        labels=labels,
    )  # fmt: skip
    destaged = CounterMetricFamily(
        "storvisor_pool_cache_destaged_bytes", "Bytes destaged since the pool opened.",
        labels=labels,
    )  # fmt: skip
    rate = GaugeMetricFamily(
        "storvisor_pool_cache_destage_rate_bytes",
        "Bytes per second destaged over the last ten seconds.",
        labels=labels,
    )
    for p in pools:
        cache = p.info.cache
        if cache is None:
            continue
        name = p.info.name
        lookups.add_metric([name, "hit"], float(cache.hits))
        lookups.add_metric([name, "miss"], float(cache.misses))
        dirty.add_metric([name], float(cache.dirty))
        destaged.add_metric([name], float(cache.destaged))
        rate.add_metric([name], cache.destage_rate)
    yield from (lookups, dirty, destaged, rate)


def _s3_families(pools: tuple[PoolSample, ...]) -> Iterator[Any]:
    """An S3 pool's endpoints and the objects an import has not fetched yet."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    labels = ["pool", "endpoint"]
    up = GaugeMetricFamily(
        "storvisor_pool_endpoint_up", "1 if the S3 endpoint serves, 0 if marked down.",
        labels=labels,
    )  # fmt: skip
    requests = CounterMetricFamily(
        "storvisor_pool_endpoint_requests", "Requests sent to the S3 endpoint.", labels=labels
    )
    errors = CounterMetricFamily(
        "storvisor_pool_endpoint_errors",
        "Requests to the S3 endpoint that failed or timed out (retried on another).",
        labels=labels,
    )
    latency = GaugeMetricFamily(
        "storvisor_pool_endpoint_latency_seconds",
        "Moving average of the latency of the S3 endpoint's successful requests.",
        labels=labels,
    )
    missing = GaugeMetricFamily(
        "storvisor_pool_objects_to_fetch",
        "Data objects of an imported S3 pool not in its local image yet.",
        labels=["pool"],
    )
    for p in pools:
        name = p.info.name
        for e in p.info.endpoints:
            values = [name, e.url]
            up.add_metric(values, 1.0 if e.state.value == "up" else 0.0)
            requests.add_metric(values, float(e.requests))
            errors.add_metric(values, float(e.errors))
            latency.add_metric(values, e.latency_ms / 1000)
        if p.info.fetching is not None:
            missing.add_metric([name], float(p.info.fetching.left))
    yield from (up, requests, errors, latency, missing)


def render(sample: MetricsSample) -> bytes:
    """``sample`` in the Prometheus text format (version 0.0.4).

    Raises ``MetricsUnavailable`` when ``prometheus_client`` is not installed."""
    try:
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            Metric,
        )
    except ImportError as e:
        raise MetricsUnavailable(
            "metrics need the prometheus_client library: pip install 'storvisor[metrics]'"
        ) from e

    export_labels = ["export", "kind", "pool", "volume"]
    op_labels = [*export_labels, "op"]

    def families() -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "storvisor_export_requests", "Requests completed, by operation.", labels=op_labels
        )
        data = CounterMetricFamily(
            "storvisor_export_bytes",
            "Bytes read, written, trimmed or zeroed, by operation.",
            labels=op_labels,
        )
        errors = CounterMetricFamily(
            "storvisor_export_errors", "Requests that failed, by operation.", labels=op_labels
        )
        latency = HistogramMetricFamily(
            "storvisor_export_request_duration_seconds",
            "Request latency, QoS waits included, by operation.",
            labels=op_labels,
        )
        in_flight = GaugeMetricFamily(
            "storvisor_export_requests_in_flight",
            "Requests started and not yet completed.",
            labels=export_labels,
        )
        connections = GaugeMetricFamily(
            "storvisor_export_connections",
            "Open NBD connections; for vhost-user-blk, running data-plane processes.",
            labels=export_labels,
        )
        for e in sample.exports:
            base = [e.name, e.kind, e.pool, e.volume]
            for op in IoOp:
                t = e.totals[op]
                values = [*base, OP_NAMES[op]]
                requests.add_metric(values, float(t.completed))
                data.add_metric(values, float(t.bytes))
                errors.add_metric(values, float(t.errors))
                latency.add_metric(
                    values, _histogram_buckets(t.buckets), sum_value=t.latency_ns / 1e9
                )
            in_flight.add_metric(base, float(sum(e.in_flight)))
            connections.add_metric(base, float(e.connections))
        yield from (requests, data, errors, latency, in_flight, connections)

        waits = CounterMetricFamily(
            "storvisor_volume_qos_wait_seconds",
            "Seconds requests waited for QoS tokens, in every process serving the volume.",
            labels=["pool", "volume"],
        )
        for w in sample.qos_waits:
            waits.add_metric([w.pool, w.volume], w.seconds)
        yield waits

        pool_labels = ["pool"]
        capacity = GaugeMetricFamily(
            "storvisor_pool_capacity_bytes", "Bytes the pool's devices hold.", labels=pool_labels
        )
        allocated = GaugeMetricFamily(
            "storvisor_pool_allocated_bytes", "Bytes of allocated clusters.", labels=pool_labels
        )
        provisioned = GaugeMetricFamily(
            "storvisor_pool_provisioned_bytes",
            "Sum of the pool's volume sizes (thin provisioning may exceed capacity).",
            labels=pool_labels,
        )
        clusters = GaugeMetricFamily(
            "storvisor_pool_clusters", "Clusters, by state.", labels=["pool", "state"]
        )
        online = GaugeMetricFamily(
            "storvisor_pool_online", "1 if the pool serves (online or degraded), else 0.",
            labels=pool_labels,
        )  # fmt: skip
        commits = HistogramMetricFamily(
            "storvisor_pool_commit_duration_seconds",
            "Metadata commits: syncing the data they point at, then the catalog transaction.",
            labels=pool_labels,
        )
        io_errors = CounterMetricFamily(
            "storvisor_pool_io_errors",
            "Backing-device operations that failed (read, write, sync) or did not complete "
            "within the pool's timeout (timeout, also counted under its operation).",
            labels=["pool", "op"],
        )
        for p in sample.pools:
            info = p.info
            stats = info.stats
            for kind, count in asdict(p.io_errors).items():  # read, write, sync, timeout
                io_errors.add_metric([info.name, kind], float(count))
            capacity.add_metric([info.name], float(stats.capacity))
            allocated.add_metric([info.name], float(stats.allocated))
            provisioned.add_metric([info.name], float(stats.provisioned))
            cs = max(info.cluster_size, 1)  # an offline pool may not know it
            clusters.add_metric([info.name, "total"], float(stats.capacity // cs))
            clusters.add_metric([info.name, "allocated"], float(stats.allocated // cs))
            clusters.add_metric([info.name, "free"], float(stats.free // cs))
            online.add_metric([info.name], 1.0 if info.state.serves else 0.0)
            if p.commit_buckets:
                commits.add_metric(
                    [info.name], _histogram_buckets(p.commit_buckets), sum_value=p.commit_ns / 1e9
                )
        yield from (capacity, allocated, provisioned, clusters, online, commits, io_errors)
        yield from _cache_families(sample.pools)
        yield from _s3_families(sample.pools)

        restarts = CounterMetricFamily(
            "storvisor_dataplane_restarts",
            "Data-plane processes started again after one ended (export empty: the NBD "
            "workers shared by every NBD export).",
            labels=["kind", "export"],
        )
        for r in sample.restarts:
            restarts.add_metric([r.kind, r.export], float(r.count))
        yield restarts

    class _Collector:
        def collect(self) -> Iterator[Metric]:
            return families()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())
    return bytes(generate_latest(registry))
