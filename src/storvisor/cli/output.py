"""How the CLI renders records: aligned plain-text tables and ``key: value`` blocks, or JSON.

JSON output is the records' fields as the API sends them (``storvisor.api.codec``), so a
script reading ``--json`` sees the same shape over the API and offline.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence

from storvisor.api.codec import encode
from storvisor.api.export_defs import ExportInfo
from storvisor.api.jobs import JobInfo
from storvisor.api.qos import QosKey, QosSpecInfo, VolumeQos
from storvisor.api.tokens import TokenInfo
from storvisor.engine.types import FsckReport, PoolInfo, SnapshotInfo, VolumeInfo
from storvisor.units import format_size


def to_json(value: object) -> str:
    """A record or list of records as indented JSON."""
    return json.dumps(encode(value), indent=2)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; the last column is not padded."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = []
    for cells in [headers, *rows]:
        padded = [c.ljust(w) for c, w in zip(cells[:-1], widths[:-1], strict=True)]
        lines.append("  ".join([*padded, cells[-1]]).rstrip())
    return "\n".join(lines)


def fields(pairs: Sequence[tuple[str, str]]) -> str:
    """``key: value`` lines with the values aligned."""
    width = max(len(k) for k, _ in pairs) + 1
    return "\n".join(f"{(k + ':').ljust(width)} {v}" for k, v in pairs)


def human(size: int) -> str:
    """``format_size`` when it is short and exact (``64G``), else one decimal (``63.9G``)."""
    exact = format_size(size)
    if len(exact) <= 5:
        return exact
    for shift, suffix in ((50, "P"), (40, "T"), (30, "G"), (20, "M"), (10, "K")):
        if size >= 1 << shift:
            return f"{size / (1 << shift):.1f}{suffix}"
    return exact


def _time(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def pools_table(pools: Sequence[PoolInfo]) -> str:
    return table(
        [
            "NAME",
            "STATE",
            "CLUSTER",
            "CAPACITY",
            "ALLOCATED",
            "PROVISIONED",
            "FREE",
            "BACKINGS",
            "REASON",
        ],
        [
            [
                p.name,
                str(p.state),
                human(p.cluster_size),
                human(p.stats.capacity),
                human(p.stats.allocated),
                human(p.stats.provisioned),
                human(p.stats.free),
                str(len(p.backings)),
                p.reason or "-",
            ]
            for p in pools
        ],
    )


def pool_details(p: PoolInfo) -> str:
    text = fields(
        [
            ("name", p.name),
            ("state", str(p.state)),
            *([("reason", p.reason)] if p.reason else []),
            ("cluster size", human(p.cluster_size)),
            ("capacity", human(p.stats.capacity)),
            ("allocated", human(p.stats.allocated)),
            ("provisioned", human(p.stats.provisioned)),
            ("free", human(p.stats.free)),
            *(
                [
                    (
                        "fetching",
                        f"{p.fetching.left} of {p.fetching.total} objects still in the bucket",
                    )
                ]
                if p.fetching is not None
                else []
            ),
        ]
    )
    backings = table(
        ["BACKING", "KIND", "SIZE"],
        [[b.path, str(b.kind), human(b.size)] for b in p.backings],
    )
    parts = [text, backings]
    if p.cache is not None:
        c = p.cache
        parts.append(
            fields(
                [
                    ("cache", c.device),
                    ("mode", str(c.mode)),
                    ("cache state", c.state),
                    ("cache size", human(c.size)),
                    ("used", human(c.used)),
                    ("dirty", human(c.dirty)),
                    ("hit ratio", f"{c.hit_ratio:.1%} ({c.hits} hits, {c.misses} misses)"),
                    ("destaged", human(c.destaged)),
                    ("destage rate", f"{human(int(c.destage_rate))}/s"),
                ]
            )
        )
    if not p.endpoints:
        return "\n\n".join(parts)
    endpoints = table(
        ["ENDPOINT", "STATE", "REQUESTS", "ERRORS", "LATENCY"],
        [
            [e.url, str(e.state), str(e.requests), str(e.errors), f"{e.latency_ms:.1f} ms"]
            for e in p.endpoints
        ],
    )
    return "\n\n".join([*parts, endpoints])


def volumes_table(volumes: Sequence[VolumeInfo]) -> str:
    return table(
        ["POOL", "NAME", "SIZE", "ALLOCATED", "ORIGIN"],
        [[v.pool, v.name, human(v.size), human(v.allocated), v.origin or "-"] for v in volumes],
    )


def volume_details(v: VolumeInfo) -> str:
    return fields(
        [
            ("volume", f"{v.pool}/{v.name}"),
            ("size", human(v.size)),
            ("allocated", human(v.allocated)),
            ("origin", v.origin or "-"),
            ("serial", v.serial),
            ("created", _time(v.created)),
        ]
    )


def snapshots_table(snapshots: Sequence[SnapshotInfo]) -> str:
    return table(
        ["NAME", "SIZE", "CREATED", "CLONES"],
        [[s.name, human(s.size), _time(s.created), ",".join(s.clones) or "-"] for s in snapshots],
    )


def snapshot_details(s: SnapshotInfo) -> str:
    return fields(
        [
            ("snapshot", f"{s.pool}/{s.volume}@{s.name}"),
            ("size", human(s.size)),
            ("created", _time(s.created)),
            ("clones", ", ".join(s.clones) or "-"),
        ]
    )


def exports_table(exports: Sequence[ExportInfo]) -> str:
    return table(
        ["NAME", "KIND", "TARGET", "STATE", "ADDRESS"],
        [
            [
                e.spec.name,
                str(e.spec.kind),
                e.spec.target,
                str(e.state),
                _address(e),
            ]
            for e in exports
        ],
    )


def _address(e: ExportInfo) -> str:
    if e.spec.lun is not None:  # vhost-scsi
        return f"{e.spec.wwpn} LUN {e.spec.lun}"
    return e.uris[0] if e.uris else "-"


def export_details(e: ExportInfo) -> str:
    pairs = [
        ("export", e.spec.name),
        ("kind", str(e.spec.kind)),
        ("target", e.spec.target),
        ("read-only", "yes" if e.spec.read_only else "no"),
        ("state", str(e.state)),
    ]
    if e.spec.socket is not None:
        pairs.append(("queues", str(e.spec.queues)))
    if e.spec.wwpn is not None:
        pairs += [("wwpn", e.spec.wwpn), ("lun", str(e.spec.lun))]
    pairs += [("address", u) for u in e.uris]
    if e.message:
        pairs.append(("note", e.message))
    return fields(pairs)


def fsck_report(r: FsckReport) -> str:
    pairs = [
        ("pool", r.pool),
        ("result", "clean" if r.clean else "PROBLEMS FOUND"),
        ("clusters", f"{r.clusters_used} used of {r.clusters_total}"),
        ("leaked", _ids(r.leaked)),
        ("doubly owned", _ids(r.doubly_owned)),
        ("dangling", str(len(r.dangling))),
        ("errors", str(len(r.errors))),
    ]
    lines = [fields(pairs)]
    lines += [f"dangling: {d}" for d in r.dangling]
    lines += [f"error: {e}" for e in r.errors]
    return "\n".join(lines)


def _ids(clusters: Sequence[int]) -> str:
    if not clusters:
        return "0"
    shown = ", ".join(str(c) for c in clusters[:16])
    more = f", ... ({len(clusters)} in all)" if len(clusters) > 16 else ""
    return f"{len(clusters)} ({shown}{more})"


# -- QoS ------------------------------------------------------------------------------------


def _qos_keys(keys: Sequence[QosKey]) -> str:
    return " ".join(f"{k.key}={k.value}" for k in keys) or "(no limit)"


def qos_specs_table(specs: Sequence[QosSpecInfo]) -> str:
    return table(["NAME", "KEYS"], [[s.name, _qos_keys(s.keys)] for s in specs])


def qos_spec_details(s: QosSpecInfo) -> str:
    return fields([("qos spec", s.name), *((k.key, k.value) for k in s.keys)])


def volume_qos_details(q: VolumeQos) -> str:
    pairs = [("volume", f"{q.pool}/{q.volume}"), ("qos spec", q.spec or "-")]
    pairs += [(k.key, k.value) for k in q.keys] or [("limits", "none")]
    return fields(pairs)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def jobs_table(jobs: Sequence[JobInfo]) -> str:
    rows = [
        [
            j.id,
            j.kind,
            j.target,
            j.state.value,
            f"{100 * j.done // j.total if j.total else 0}%",
            _time(j.started),
        ]
        for j in jobs
    ]
    return table(["ID", "KIND", "TARGET", "STATE", "DONE", "STARTED"], rows)


def job_details(j: JobInfo) -> str:
    pairs = [
        ("id", j.id),
        ("kind", j.kind),
        ("target", j.target),
        ("state", j.state.value),
        ("progress", f"{human(j.done)} of {human(j.total)}"),
        ("rate", f"{human(int(j.rate))}/s"),
        ("eta", _duration(j.eta)),
        ("started", _time(j.started)),
    ]
    if j.finished is not None:
        pairs.append(("finished", _time(j.finished)))
    if j.error:
        pairs.append(("error", j.error))
    return fields(pairs)


def tokens_table(tokens: Sequence[TokenInfo]) -> str:
    rows = [
        [t.name, "read-only" if t.read_only else "read-write", _time(t.created)] for t in tokens
    ]
    return table(["NAME", "ACCESS", "CREATED"], rows)
