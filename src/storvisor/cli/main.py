"""The ``storvisor`` command line.

When a daemon serves the HOME (its ``api.sock`` answers), every command goes through the API;
otherwise the command opens the HOME itself, under the HOME lock, so a pool is never opened
by two processes at once. Export commands run without the daemon record the export, which
the daemon starts at its next start.

A daemon that is starting (it holds the HOME lock, its API does not answer yet) is waited
for, and a daemon that starts while a command holds HOME waits for that command: up to
``--wait`` seconds either way (engine/home.py describes the lock).

With ``--api URL --token-file F`` (or ``$STORVISOR_API``, ``$STORVISOR_TOKEN_FILE``) a
command drives a daemon's API on TCP instead, over TLS (``--ca-file`` or ``--fingerprint``
say which certificate to trust) with a bearer token. ``token`` commands always work on the
local HOME's ``tokens.json``.

Exit status: 0 on success, 1 when an operation fails (a missing pool, a duplicate name, an
fsck that finds problems), 2 for a usage error. Errors are one line on stderr,
``storvisor: error: ...``; a traceback is printed only with ``--debug``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shlex
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from storvisor import __version__
from storvisor.api.client import Client, DaemonUnavailable
from storvisor.api.export_defs import ExportInfo, ExportState, TcpAddress, parse_tcp_address
from storvisor.api.jobs import JobInfo, JobState
from storvisor.api.qos import QosKey
from storvisor.api.status import POOL_WAIT, default_home
from storvisor.api.tls import TlsFiles
from storvisor.api.tokens import TokenStore
from storvisor.cli import output
from storvisor.cli.progress import wait_for_job
from storvisor.engine.s3 import S3Spec
from storvisor.engine.types import BackingSpec, CacheMode, PoolState
from storvisor.errors import InvalidArgument, NotFound, StateError, StorvisorError
from storvisor.integrations.libvirt import scsi
from storvisor.units import parse_size

if TYPE_CHECKING:  # the engine is loaded only when no daemon answers (_connect)
    from storvisor.api.service import Management

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")

EXIT_FAILURE = 1
EXIT_USAGE = 2

DEFAULT_WAIT = 30.0
"""Seconds a command waits for a starting daemon, and ``serve`` for a command holding HOME."""
_POLL = 0.1


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line: ``storvisor: error: ...``."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"storvisor: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


# -- argument types -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VolumeRef:
    pool: str
    volume: str
    snapshot: str | None = None

    def __str__(self) -> str:
        ref = f"{self.pool}/{self.volume}"
        return f"{ref}@{self.snapshot}" if self.snapshot else ref


def _name(text: str, what: str) -> str:
    if not _NAME_RE.match(text):
        raise argparse.ArgumentTypeError(
            f"invalid {what} name {text!r}: use letters, digits, '.', '_' and '-' "
            "(up to 63, starting with a letter or digit)"
        )
    return text


def _ref(text: str, snapshot: bool | None) -> VolumeRef:
    """``POOL/VOL`` (``snapshot`` False), ``POOL/VOL@SNAP`` (True) or either (None)."""
    form = {False: "POOL/VOL", True: "POOL/VOL@SNAP", None: "POOL/VOL[@SNAP]"}[snapshot]
    vol_part, at, snap = text.partition("@")
    pool, slash, vol = vol_part.partition("/")
    if not slash or (snapshot is True and not at) or (snapshot is False and at):
        raise argparse.ArgumentTypeError(f"invalid reference {text!r}: expected {form}")
    return VolumeRef(
        _name(pool, "pool"), _name(vol, "volume"), _name(snap, "snapshot") if at else None
    )


def pool_name(text: str) -> str:
    return _name(text, "pool")


def volume_ref(text: str) -> VolumeRef:
    return _ref(text, False)


def snapshot_ref(text: str) -> VolumeRef:
    return _ref(text, True)


def volume_or_snapshot_ref(text: str) -> VolumeRef:
    return _ref(text, None)


def size(text: str) -> int:
    try:
        value = parse_size(text)
    except StorvisorError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: must be positive")
    return value


def timeout(text: str) -> float:
    value = seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"invalid timeout {text!r}: must be positive")
    return value


def backing(text: str) -> BackingSpec:
    """``PATH`` (an existing file or block device) or ``PATH:SIZE`` (a sparse file created or
    grown to SIZE). A colon followed by something that is not a size stays in the path."""
    path, colon, tail = text.rpartition(":")
    if colon and path:
        try:
            return BackingSpec(os.path.abspath(path), parse_size(tail))
        except StorvisorError:
            pass
    if not text:
        raise argparse.ArgumentTypeError("empty backing path")
    return BackingSpec(os.path.abspath(text))


def tcp_address(text: str) -> TcpAddress:
    try:
        return parse_tcp_address(text)
    except StorvisorError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def data_planes(text: str) -> int:
    """``serve --data-planes``: a process count (1..1024), or 0 for ``per-export``."""
    if text == "per-export":
        return 0
    if not text.isdigit() or not 1 <= int(text) <= 1024:
        raise argparse.ArgumentTypeError(
            f"invalid data-plane count {text!r}: a number of processes (1-1024) or per-export"
        )
    return int(text)


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"invalid time {text!r}: expected 0 to 3600 seconds")
    return value


def interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"invalid interval {text!r}: expected 0.1 to 3600 seconds")
    return value


def count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: expected a positive integer")
    return int(text)


def queues(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise argparse.ArgumentTypeError(f"invalid queue count {text!r}: expected 1 to 64")
    return int(text)


# -- commands -------------------------------------------------------------------------------

Command = Callable[["Management", argparse.Namespace], int]


def _print(args: argparse.Namespace, value: object, text: str) -> int:
    print(output.to_json(value) if getattr(args, "json", False) else text)
    return 0


def _forced(a: argparse.Namespace) -> list[BackingSpec]:
    """The ``--backing`` specs, marked to be overwritten with ``--force``."""
    return [BackingSpec(spec.path, spec.size, a.force) for spec in a.backing]


def pool_create(m: Management, a: argparse.Namespace) -> int:
    if a.s3 is not None:
        if a.backing:
            raise InvalidArgument("give either --backing or --s3, not both")
        info = m.create_s3_pool(
            a.name,
            _s3_spec(a),
            object_size=a.object_size,
            size=a.size,
            cluster_size=a.cluster_size,
        )
    elif not a.backing:
        raise InvalidArgument("a pool needs --backing PATH[:SIZE] (or --s3 BUCKET)")
    else:
        for option in ("endpoint", "region", "object_size", "size"):
            if getattr(a, option):
                flag = "--" + option.replace("_", "-")
                raise InvalidArgument(f"{flag} belongs to an S3 pool (--s3 BUCKET)")
        info = m.create_pool(a.name, _forced(a), a.cluster_size)
    return _print(a, info, output.pool_details(info))


def pool_add_endpoint(m: Management, a: argparse.Namespace) -> int:
    info = m.add_endpoint(a.name, a.url)
    return _print(a, info, output.pool_details(info))


def pool_remove_endpoint(m: Management, a: argparse.Namespace) -> int:
    info = m.remove_endpoint(a.name, a.url)
    return _print(a, info, output.pool_details(info))


def pool_set_cache(m: Management, a: argparse.Namespace) -> int:
    info = m.set_cache(a.name, a.device, CacheMode.parse(a.mode))
    return _print(a, info, output.pool_details(info))


def pool_flush_cache(m: Management, a: argparse.Namespace) -> int:
    info = m.flush_cache(a.name)
    return _print(a, info, output.pool_details(info))


def pool_import(m: Management, a: argparse.Namespace) -> int:
    info = m.import_s3_pool(a.name, _s3_spec(a), force=a.force)
    return _print(a, info, output.pool_details(info))


def _s3_spec(a: argparse.Namespace) -> S3Spec:
    if not a.endpoint:
        raise InvalidArgument("an S3 pool needs at least one --endpoint URL")
    return S3Spec(a.s3, tuple(a.endpoint), a.region, a.endpoint_timeout, a.down_timeout)


def pool_list(m: Management, a: argparse.Namespace) -> int:
    pools = m.pools()
    return _print(a, pools, output.pools_table(pools))


def pool_show(m: Management, a: argparse.Namespace) -> int:
    info = m.pool_info(a.name)
    return _print(a, info, output.pool_details(info))


def pool_reopen(m: Management, a: argparse.Namespace) -> int:
    info = m.reopen_pool(a.name)
    return _print(a, info, output.pool_details(info))


def pool_set_timeout(m: Management, a: argparse.Namespace) -> int:
    if a.io is None and a.data is None:
        raise InvalidArgument("nothing to set: give --io SECONDS and/or --data SECONDS")
    t = m.set_timeouts(a.name, io=a.io, data=a.data)
    data = "none" if not t.data else f"{t.data:g} s"
    return _print(a, t, f"pool {a.name}: sync timeout {t.io:g} s, read/write timeout {data}")


def pool_delete(m: Management, a: argparse.Namespace) -> int:
    m.delete_pool(a.name, force=a.force)
    print(f"deleted pool {a.name}")
    return 0


def pool_add_backing(m: Management, a: argparse.Namespace) -> int:
    info: object = None
    for spec in _forced(a):
        info = m.add_backing(a.name, spec)
    return _print(a, info, output.pool_details(m.pool_info(a.name)))


def volume_create(m: Management, a: argparse.Namespace) -> int:
    info = m.create_volume(a.ref.pool, a.ref.volume, a.size)
    return _print(a, info, output.volume_details(info))


def volume_list(m: Management, a: argparse.Namespace) -> int:
    vols = m.volumes(a.pool)
    if a.pool is None:
        for p in m.pools():
            if p.state is PoolState.OFFLINE:
                sys.stderr.write(
                    f"storvisor: warning: pool {p.name} is offline ({p.reason}); "
                    "its volumes are not listed\n"
                )
            elif p.state is PoolState.OPENING:
                sys.stderr.write(
                    f"storvisor: warning: pool {p.name} is being opened; "
                    "its volumes are not listed\n"
                )
    return _print(a, vols, output.volumes_table(vols))


def volume_show(m: Management, a: argparse.Namespace) -> int:
    info = m.volume_info(a.ref.pool, a.ref.volume)
    return _print(a, info, output.volume_details(info))


def volume_delete(m: Management, a: argparse.Namespace) -> int:
    m.delete_volume(a.ref.pool, a.ref.volume)
    print(f"deleted volume {a.ref}")
    return 0


def volume_extend(m: Management, a: argparse.Namespace) -> int:
    info = m.extend_volume(a.ref.pool, a.ref.volume, a.size)
    return _print(a, info, output.volume_details(info))


def volume_clone(m: Management, a: argparse.Namespace) -> int:
    src: VolumeRef = a.source
    new: VolumeRef = a.new
    if new.pool != src.pool:
        raise _usage(f"a clone lives in the pool of its snapshot ({src.pool}), not {new.pool}")
    assert src.snapshot is not None
    info = m.clone(src.pool, src.volume, src.snapshot, new.volume)
    return _print(a, info, output.volume_details(info))


def volume_flatten(m: Management, a: argparse.Namespace) -> int:
    job = m.start_flatten(a.ref.pool, a.ref.volume)
    if a.no_wait:
        return _print(a, job, job.id)
    job = wait_for_job(m, job, bar=not a.json)
    if job.state is not JobState.SUCCEEDED:
        return _job_failed(a, job)
    info = m.volume_info(a.ref.pool, a.ref.volume)
    return _print(a, info, output.volume_details(info))


def snapshot_create(m: Management, a: argparse.Namespace) -> int:
    info = m.create_snapshot(a.ref.pool, a.ref.volume, a.ref.snapshot)
    return _print(a, info, output.snapshot_details(info))


def snapshot_delete(m: Management, a: argparse.Namespace) -> int:
    m.delete_snapshot(a.ref.pool, a.ref.volume, a.ref.snapshot)
    print(f"deleted snapshot {a.ref}")
    return 0


def snapshot_rollback(m: Management, a: argparse.Namespace) -> int:
    info = m.rollback(a.ref.pool, a.ref.volume, a.ref.snapshot)
    return _print(a, info, output.volume_details(info))


def snapshot_list(m: Management, a: argparse.Namespace) -> int:
    snaps = m.snapshots(a.ref.pool, a.ref.volume)
    return _print(a, snaps, output.snapshots_table(snaps))


def fsck(m: Management, a: argparse.Namespace) -> int:
    report = m.fsck(a.pool)
    _print(a, report, output.fsck_report(report))
    return 0 if report.clean else EXIT_FAILURE


def _export_result(a: argparse.Namespace, info: ExportInfo) -> int:
    if getattr(a, "json", False):
        return _print(a, info, "")
    if info.state is ExportState.ACTIVE:
        print(info.uris[0])
        for other in info.uris[1:]:
            print(other)
    else:
        print(output.export_details(info))
    return 0


def export_nbd(m: Management, a: argparse.Namespace) -> int:
    ref: VolumeRef = a.ref
    info = m.export_nbd(ref.pool, ref.volume, ref.snapshot, name=a.name, read_only=a.read_only)
    return _export_result(a, info)


def export_vhost_user_blk(m: Management, a: argparse.Namespace) -> int:
    info = m.export_vhost_user_blk(
        a.ref.pool,
        a.ref.volume,
        os.path.abspath(a.socket),
        queues=a.queues,
        read_only=a.read_only,
        name=a.name,
    )
    return _export_result(a, info)


def export_scsi(m: Management, a: argparse.Namespace) -> int:
    return _export_result(a, m.export_scsi(a.ref.pool, a.ref.volume, name=a.name))


def export_vhost_scsi(m: Management, a: argparse.Namespace) -> int:
    if (a.ref is None) == (a.device is None):
        raise InvalidArgument("give a volume (POOL/VOL) or --device PATH, not both")
    device = os.path.abspath(a.device) if a.device is not None else None
    info = m.export_vhost_scsi(
        a.ref.pool if a.ref else None,
        a.ref.volume if a.ref else None,
        device=device,
        wwpn=a.wwpn,
        lun=a.lun,
        name=a.name,
    )
    if getattr(a, "json", False) or info.state is not ExportState.ACTIVE:
        return _export_result(a, info)
    print(f"{info.spec.wwpn} LUN {info.spec.lun}")
    return 0


def export_list(m: Management, a: argparse.Namespace) -> int:
    exports = m.exports()
    return _print(a, exports, output.exports_table(exports))


def export_show(m: Management, a: argparse.Namespace) -> int:
    info = m.export_info(a.name)
    return _print(a, info, output.export_details(info))


def export_remove(m: Management, a: argparse.Namespace) -> int:
    m.remove_export(a.name)
    print(f"removed export {a.name}")
    return 0


def libvirt_xml(m: Management, a: argparse.Namespace) -> int:
    if a.scsi is None:
        if a.domain_xml is not None or a.boot:
            raise _usage("--domain-xml and --boot go with --scsi lun|vhost")
        print(m.libvirt_xml(a.ref.pool, a.ref.volume), end="")
        return 0
    mode = scsi.ScsiMode(a.scsi)
    if mode is scsi.ScsiMode.VHOST and a.boot:
        raise _usage(scsi.VHOST_BOOT_REFUSED)
    domain_text = None
    if a.domain_xml is not None:
        try:
            domain_text = Path(a.domain_xml).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidArgument(f"cannot read the domain XML {a.domain_xml}: {e}") from None
        scsi.DomainDevices.parse(domain_text, a.domain_xml)  # bad XML before any lookup
    target = _scsi_export_target(m, a.ref.pool, a.ref.volume, mode)
    attachment = scsi.plan(
        mode, target, domain_text, boot=a.boot, source=a.domain_xml or "domain XML"
    )
    what = "LUN" if mode is scsi.ScsiMode.LUN else "vhost-scsi target"
    print(scsi.attachment_text(attachment, f"{a.ref.pool}/{a.ref.volume} as a {what}"), end="")
    return 0


_SCSI_EXPORT_KINDS = {scsi.ScsiMode.LUN: "scsi", scsi.ScsiMode.VHOST: "vhost-scsi"}
"""``libvirt-xml --scsi`` mode -> the export kind it needs (``storvisor export KIND``)."""


def _scsi_export_target(m: Management, pool: str, volume: str, mode: scsi.ScsiMode) -> str:
    """The device path (``lun``) or WWPN (``vhost``) of the volume's SCSI export of that kind,
    as the daemon records it. ``NotFound`` for a missing volume, or one without such an
    export (naming the command that makes it)."""
    kind = _SCSI_EXPORT_KINDS[mode]
    m.volume_info(pool, volume)
    for info in m.exports():
        spec = info.spec
        if (spec.kind.value, spec.pool, spec.volume, spec.snapshot) != (kind, pool, volume, None):
            continue
        target = scsi.export_target(mode, info.uris)
        if target is None:
            why = f" ({info.message})" if info.message else ""
            raise StateError(
                f"the {kind} export {spec.name} is {info.state.value} and names no "
                f"{'device' if mode is scsi.ScsiMode.LUN else 'WWPN'}{why}"
            )
        return target
    raise NotFound(
        f"volume {pool}/{volume} has no {kind} export: run `storvisor export {kind} "
        f"{pool}/{volume}` first"
    )


# -- QoS commands ---------------------------------------------------------------------------


def qos_key(text: str) -> QosKey:
    """``KEY=VALUE`` (the key and value are checked by the service)."""
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise argparse.ArgumentTypeError(f"invalid QoS key {text!r}: expected KEY=VALUE")
    return QosKey(key, value)


def qos_create(m: Management, a: argparse.Namespace) -> int:
    info = m.create_qos_spec(a.name, a.keys)
    return _print(a, info, output.qos_spec_details(info))


def qos_list(m: Management, a: argparse.Namespace) -> int:
    specs = m.qos_specs()
    return _print(a, specs, output.qos_specs_table(specs))


def qos_show(m: Management, a: argparse.Namespace) -> int:
    info = m.qos_spec(a.name)
    return _print(a, info, output.qos_spec_details(info))


def qos_delete(m: Management, a: argparse.Namespace) -> int:
    m.delete_qos_spec(a.name)
    print(f"deleted QoS spec {a.name}")
    return 0


def volume_set_qos(m: Management, a: argparse.Namespace) -> int:
    items: list[str] = a.items
    if a.clear:
        if items:
            raise _usage("--clear takes no QoS spec name or keys")
        info = m.set_volume_qos(a.ref.pool, a.ref.volume)
    elif not items:
        raise _usage("give a QoS spec name, KEY=VALUE pairs, or --clear")
    elif all("=" not in item for item in items):
        if len(items) != 1:
            raise _usage("give one QoS spec name, or KEY=VALUE pairs")
        info = m.set_volume_qos(a.ref.pool, a.ref.volume, spec=items[0])
    elif all("=" in item for item in items):
        keys = []
        for item in items:
            try:
                keys.append(qos_key(item))
            except argparse.ArgumentTypeError as e:
                raise _usage(str(e)) from None
        info = m.set_volume_qos(a.ref.pool, a.ref.volume, keys=keys)
    else:
        raise _usage("give a QoS spec name or KEY=VALUE pairs, not both")
    return _print(a, info, output.volume_qos_details(info))


def _job_outcome(m: Management, a: argparse.Namespace, job: JobInfo, done: str) -> int:
    """``--no-wait``: print the job id; otherwise wait (progress bar) and report the end."""
    if a.no_wait:
        return _print(a, job, job.id)
    job = wait_for_job(m, job, bar=not a.json)
    if job.state is JobState.SUCCEEDED:
        return _print(a, job, f"{done} (job {job.id})")
    return _job_failed(a, job)


def _job_failed(a: argparse.Namespace, job: JobInfo) -> int:
    if a.json:
        print(output.to_json(job))
    else:
        print(f"storvisor: error: job {job.id} {job.state.value}: {job.error}", file=sys.stderr)
    return 1


def volume_import(m: Management, a: argparse.Namespace) -> int:
    path = os.path.abspath(a.file)
    job = m.import_image(a.ref.pool, a.ref.volume, path, a.format)
    return _job_outcome(m, a, job, f"imported {path} into {a.ref}")


def volume_export_image(m: Management, a: argparse.Namespace) -> int:
    path = os.path.abspath(a.file)
    ref = a.ref
    job = m.export_image(ref.pool, ref.volume, ref.snapshot, path, a.format)
    return _job_outcome(m, a, job, f"wrote {ref} to {path} ({a.format})")


def job_list(m: Management, a: argparse.Namespace) -> int:
    jobs = m.jobs()
    return _print(a, jobs, output.jobs_table(jobs))


def job_show(m: Management, a: argparse.Namespace) -> int:
    job = m.job(a.id)
    return _print(a, job, output.job_details(job))


def job_cancel(m: Management, a: argparse.Namespace) -> int:
    job = m.cancel_job(a.id)
    if not a.no_wait:
        job = wait_for_job(m, job, bar=False)
    return _print(a, job, f"job {job.id}: {job.state.value}")


def volume_show_qos(m: Management, a: argparse.Namespace) -> int:
    info = m.volume_qos(a.ref.pool, a.ref.volume)
    return _print(a, info, output.volume_qos_details(info))


def _qos_parsers(
    cmd: Callable[..., _Parser],
    group: Callable[[str, str], argparse._SubParsersAction[_Parser]],
    vol: argparse._SubParsersAction[_Parser],
) -> None:
    qos = group("qos", "manage named QoS specs (Cinder's keys)")
    c = cmd(qos, "create", qos_create, "create a named QoS spec", json=True)
    c.add_argument("name", metavar="NAME")
    c.add_argument("keys", metavar="KEY=VALUE", type=qos_key, nargs="+")
    cmd(qos, "list", qos_list, "list QoS specs", json=True)
    c = cmd(qos, "show", qos_show, "show a QoS spec", json=True)
    c.add_argument("name", metavar="NAME")
    c = cmd(qos, "delete", qos_delete, "delete a QoS spec no volume uses")
    c.add_argument("name", metavar="NAME")
    c = cmd(
        vol,
        "set-qos",
        volume_set_qos,
        "limit a volume with a named QoS spec or one-off KEY=VALUE pairs (online)",
        json=True,
    )
    c.add_argument("ref", metavar="POOL/VOL", type=volume_ref)
    c.add_argument("items", metavar="NAME|KEY=VALUE", nargs="*")
    c.add_argument("--clear", action="store_true", help="remove the volume's limits")
    c = cmd(vol, "show-qos", volume_show_qos, "show a volume's QoS", json=True)
    c.add_argument("ref", metavar="POOL/VOL", type=volume_ref)


# -- token commands (local: they read and write HOME/tokens.json, daemon or not) ------------


def token_create(store: TokenStore, a: argparse.Namespace) -> int:
    info, token = store.create(a.name, read_only=a.read_only)
    print(token)
    kind = "read-only" if info.read_only else "read-write"
    sys.stderr.write(f"created {kind} token {info.name}; it is shown only this once\n")
    return 0


def token_list(store: TokenStore, a: argparse.Namespace) -> int:
    tokens = store.tokens()
    return _print(a, tokens, output.tokens_table(tokens))


def token_revoke(store: TokenStore, a: argparse.Namespace) -> int:
    store.revoke(a.name)
    print(f"revoked token {a.name}")
    return 0


class _UsageError(Exception):
    pass


def top(m: Management, a: argparse.Namespace) -> int:
    from storvisor.cli import top as view

    if not isinstance(m, Client):
        raise StateError("storvisor top shows a running daemon's I/O: start `storvisor serve`")
    if a.json:
        print(view.to_json(a.interval, view.sample(m.metrics, a.interval)))
        return 0
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends the view
        view.live(m.metrics, a.interval, a.count)
    return 0


def _usage(message: str) -> _UsageError:
    return _UsageError(message)


# -- parser ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The full ``storvisor`` argument parser (see docs/cli.md)."""
    p = _Parser(
        prog="storvisor",
        description="storvisor: thin volumes, snapshots and clones served over NBD and "
        "vhost-user-blk.",
    )
    p.add_argument(
        "--home",
        metavar="DIR",
        type=Path,
        help="state directory (default: $STORVISOR_HOME or ~/.local/share/storvisor)",
    )
    p.add_argument("--debug", action="store_true", help="verbose logs and full tracebacks")
    p.add_argument(
        "--wait",
        metavar="SECONDS",
        type=seconds,
        default=DEFAULT_WAIT,
        help="how long a command waits for a starting daemon, and serve for a command "
        f"using the HOME (default: {DEFAULT_WAIT:g})",
    )
    p.add_argument(
        "--api",
        metavar="URL",
        help="drive the daemon at https://HOST:PORT (its --api-tcp) instead of the local HOME "
        "(default: $STORVISOR_API)",
    )
    p.add_argument(
        "--token-file",
        metavar="FILE",
        type=Path,
        help="file holding the bearer token for --api (default: $STORVISOR_TOKEN_FILE)",
    )
    p.add_argument(
        "--ca-file",
        metavar="PEM",
        type=Path,
        help="CA certificates that vouch for the --api server (default: $STORVISOR_CA_FILE, "
        "else the system's)",
    )
    p.add_argument(
        "--fingerprint",
        metavar="SHA256",
        help="trust the --api server whose certificate has this SHA-256 fingerprint, as "
        "'storvisor serve' prints it (default: $STORVISOR_FINGERPRINT)",
    )
    p.add_argument("--version", action="version", version=f"storvisor {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def cmd(
        parent: argparse._SubParsersAction[_Parser],
        name: str,
        func: Command | None,
        help: str,
        *,
        json: bool = False,
    ) -> _Parser:
        sp = parent.add_parser(name, help=help, description=help)
        if func is not None:
            sp.set_defaults(func=func)
        if json:
            sp.add_argument("--json", action="store_true", help="machine-readable output")
        return sp

    def s3_options(c: _Parser, *, required: bool = False) -> None:
        c.add_argument(
            "--s3",
            metavar="BUCKET",
            required=required,
            help="keep the pool in this S3 bucket (credentials: the AWS environment variables "
            "or credentials file, never the command line)",
        )
        c.add_argument(
            "--endpoint",
            metavar="URL",
            action="append",
            help="an S3 endpoint serving the bucket (repeatable: mirrors)",
        )
        c.add_argument("--region", metavar="REGION", help="the bucket's region")
        c.add_argument(
            "--endpoint-timeout",
            metavar="SECONDS",
            type=timeout,
            default=10.0,
            help="an endpoint that takes longer to connect or answer is marked down (default 10)",
        )
        c.add_argument(
            "--down-timeout",
            metavar="SECONDS",
            type=timeout,
            default=30.0,
            help="while every endpoint is down, I/O waits this long, then fails (default 30)",
        )

    def group(name: str, help: str) -> argparse._SubParsersAction[_Parser]:
        gp = cmd(sub, name, None, help)
        return gp.add_subparsers(dest="action", metavar="ACTION", required=True)

    s = cmd(sub, "serve", None, "run the daemon in the foreground")
    s.add_argument("--demo", action="store_true", help="create and export a demo volume")
    s.add_argument(
        "--nbd-tcp",
        metavar="[HOST:]PORT",
        type=tcp_address,
        help="also serve NBD on TCP (HOST defaults to 127.0.0.1)",
    )
    s.add_argument(
        "--api-tcp",
        metavar="[HOST:]PORT",
        type=tcp_address,
        help="also serve the API on TCP, with TLS and bearer tokens (HOST defaults to 127.0.0.1)",
    )
    s.add_argument(
        "--tls-cert",
        metavar="PEM",
        type=Path,
        help="certificate (chain) of the TCP API (default: a self-signed one in HOME/tls)",
    )
    s.add_argument("--tls-key", metavar="PEM", type=Path, help="private key of --tls-cert")
    s.add_argument(
        "--nbd-tls",
        action="store_true",
        help="require TLS on NBD over TCP with the API's certificate (--tls-cert/--tls-key, "
        "else the self-signed one in HOME/tls)",
    )
    s.add_argument(
        "--nbd-tls-cert",
        metavar="FILE",
        help="require TLS on NBD over TCP with this PEM certificate (chain); needs --nbd-tls-key",
    )
    s.add_argument(
        "--nbd-tls-key", metavar="FILE", help="the unencrypted PEM key of --nbd-tls-cert"
    )
    s.add_argument(
        "--data-planes",
        metavar="N|per-export",
        type=data_planes,
        default=None,
        help="data-plane processes serving every NBD connection, vhost-user-blk queue and "
        "TCMU ring (default: one per CPU); per-export: each vhost-user-blk and TCMU export "
        "gets processes of its own",
    )
    s.add_argument(
        "--pool-wait",
        metavar="SECONDS",
        type=seconds,
        default=POOL_WAIT,
        help="how long the start waits for the pools the exports use before the API answers; "
        f"the exports of a pool still being opened start once it opens (default: {POOL_WAIT:g})",
    )
    s.set_defaults(func=None, serve=True)

    tok = group("token", "manage the bearer tokens of the API on TCP (in the local HOME)")
    c = cmd(tok, "create", None, "create a token and print it (shown only this once)")
    c.add_argument("name", metavar="NAME")
    c.add_argument("--read-only", action="store_true", help="a token that cannot change state")
    c.set_defaults(token=token_create)
    c = cmd(tok, "list", None, "list tokens (never the tokens themselves)", json=True)
    c.set_defaults(token=token_list)
    c = cmd(tok, "revoke", None, "revoke a token (at once, also in the running daemon)")
    c.add_argument("name", metavar="NAME")
    c.set_defaults(token=token_revoke)

    pool = group("pool", "manage pools")
    c = cmd(pool, "create", pool_create, "create a pool", json=True)
    c.add_argument("name", metavar="NAME", type=pool_name)
    c.add_argument(
        "--backing",
        metavar="PATH[:SIZE]",
        type=backing,
        action="append",
        help="a file or block device; with :SIZE a sparse file of that size (repeatable)",
    )
    c.add_argument("--cluster-size", metavar="SIZE", type=size)
    c.add_argument(
        "--force",
        action="store_true",
        help="overwrite a device that holds a file system, partition table or other signature",
    )
    s3_options(c)
    c.add_argument("--object-size", metavar="SIZE", type=size, help="S3 object size (default 4M)")
    c.add_argument(
        "--size", metavar="SIZE", type=size, help="byte space of an S3 pool (default 1T, thin)"
    )
    c = cmd(
        pool, "add-endpoint", pool_add_endpoint, "serve an S3 pool through one more endpoint",
        json=True,
    )  # fmt: skip
    c.add_argument("name", metavar="NAME", type=pool_name)
    c.add_argument("url", metavar="URL")
    c = cmd(
        pool, "remove-endpoint", pool_remove_endpoint, "stop using an endpoint of an S3 pool",
        json=True,
    )  # fmt: skip
    c.add_argument("name", metavar="NAME", type=pool_name)
    c.add_argument("url", metavar="URL")
    c = cmd(
        pool, "set-cache", pool_set_cache,
        "put a cache device in front of a pool's devices, change its mode, or detach it "
        "(--mode none: after destaging everything)",
        json=True,
    )  # fmt: skip
    c.add_argument("name", metavar="NAME", type=pool_name)
    c.add_argument(
        "--device",
        metavar="PATH[:SIZE]",
        help="the cache device: a block device, or a file (created with SIZE if missing)",
    )
    c.add_argument(
        "--mode",
        required=True,
        metavar="MODE",
        help="writeback (acknowledged once on the cache), writethrough (once on the "
        "backing device) or none (detach)",
    )
    c = cmd(
        pool, "flush-cache", pool_flush_cache,
        "destage everything a pool's writeback cache holds to its devices", json=True,
    )  # fmt: skip
    c.add_argument("name", metavar="NAME", type=pool_name)
    c = cmd(
        pool,
        "import",
        pool_import,
        "open here an S3 pool another host released (credentials: the AWS environment "
        "variables or credentials file)",
        json=True,
    )
    c.add_argument("name", metavar="NAME", type=pool_name)
    s3_options(c, required=True)
    c.add_argument(
        "--force",
        action="store_true",
        help="take the pool's lease from a host that is gone without releasing it",
    )
    cmd(pool, "list", pool_list, "list pools", json=True)
    c = cmd(pool, "show", pool_show, "show a pool", json=True)
    c.add_argument("name", metavar="NAME", type=pool_name)
    c = cmd(
        pool,
        "reopen",
        pool_reopen,
        "bring an offline pool online (its devices are back)",
        json=True,
    )
    c.add_argument("name", metavar="NAME", type=pool_name)
    c = cmd(
        pool,
        "set-timeout",
        pool_set_timeout,
        "set how long a sync (--io) or a read or write (--data, 0: no limit) may take",
        json=True,
    )
    c.add_argument("name", metavar="NAME", type=pool_name)
    c.add_argument("--io", type=float, metavar="SECONDS", help="a sync (flush); default 30")
    c.add_argument(
        "--data", type=float, metavar="SECONDS", help="a read or write; default 0 (no limit)"
    )
    c = cmd(pool, "delete", pool_delete, "delete a pool")
    c.add_argument("name", metavar="NAME", type=pool_name)
    c.add_argument("--force", action="store_true", help="also delete its volumes")
    c = cmd(pool, "add-backing", pool_add_backing, "add backing devices to a pool", json=True)
    c.add_argument("name", metavar="NAME", type=pool_name)
    c.add_argument("--backing", metavar="PATH[:SIZE]", type=backing, action="append", required=True)
    c.add_argument(
        "--force",
        action="store_true",
        help="overwrite a device that holds a file system, partition table or other signature",
    )

    vol = group("volume", "manage volumes")
    c = cmd(vol, "create", volume_create, "create a thin volume", json=True)
    c.add_argument("ref", metavar="POOL/VOL", type=volume_ref)
    c.add_argument("--size", metavar="SIZE", type=size, required=True)
    c = cmd(vol, "list", volume_list, "list volumes", json=True)
    c.add_argument("pool", metavar="POOL", type=pool_name, nargs="?")
    c = cmd(vol, "show", volume_show, "show a volume", json=True)
    c.add_argument("ref", metavar="POOL/VOL", type=volume_ref)
    c = cmd(vol, "delete", volume_delete, "delete a volume")
    c.add_argument("ref", metavar="POOL/VOL", type=volume_ref)
    c = cmd(vol, "extend", volume_extend, "grow a volume (online)", json=True)
    c.add_argument("ref", metavar="POOL/VOL", type=volume_ref)
    c.add_argument("--size", metavar="SIZE", type=size, required=True)
    c = cmd(vol, "clone", volume_clone, "create a linked clone of a snapshot", json=True)
    c.add_argument("source", metavar="POOL/VOL@SNAP", type=snapshot_ref)
    c.add_argument("new", metavar="POOL/NEW", type=volume_ref)
    c = cmd(vol, "flatten", volume_flatten, "make a clone independent of its origin", json=True)
    c.add_argument("ref", metavar="POOL/VOL", type=volume_ref)
    c.add_argument("--no-wait", action="store_true", help="print the job id and return")

    c = cmd(vol, "import", volume_import, "create a volume from a disk image", json=True)
    c.add_argument("ref", metavar="POOL/VOL", type=volume_ref)
    c.add_argument("file", metavar="FILE", help="a disk image (any format qemu-img reads)")
    c.add_argument("--format", metavar="F", help="the image format (default: probed)")
    c.add_argument("--no-wait", action="store_true", help="print the job id and return")
    c = cmd(vol, "export-image", volume_export_image, "write a volume to a disk image", json=True)
    c.add_argument("ref", metavar="POOL/VOL[@SNAP]", type=volume_or_snapshot_ref)
    c.add_argument("file", metavar="FILE", help="the image to create (must not exist)")
    c.add_argument("--format", metavar="F", required=True, help="raw, qcow2, vmdk, vdi, vhdx...")
    c.add_argument("--no-wait", action="store_true", help="print the job id and return")

    jobs = group("job", "watch and cancel long operations")
    cmd(jobs, "list", job_list, "list running and recent jobs", json=True)
    c = cmd(jobs, "show", job_show, "show a job's progress", json=True)
    c.add_argument("id", metavar="ID")
    c = cmd(jobs, "cancel", job_cancel, "cancel a running job", json=True)
    c.add_argument("id", metavar="ID")
    c.add_argument("--no-wait", action="store_true", help="do not wait for it to stop")

    snap = group("snapshot", "manage snapshots")
    for name, func, help in [
        ("create", snapshot_create, "create a read-only snapshot"),
        ("delete", snapshot_delete, "delete a snapshot"),
        ("rollback", snapshot_rollback, "return a volume to a snapshot's contents"),
    ]:
        c = cmd(snap, name, func, help, json=name != "delete")
        c.add_argument("ref", metavar="POOL/VOL@SNAP", type=snapshot_ref)
    c = cmd(snap, "list", snapshot_list, "list the snapshots of a volume", json=True)
    c.add_argument("ref", metavar="POOL/VOL", type=volume_ref)

    exp = group("export", "manage exports")
    c = cmd(exp, "nbd", export_nbd, "export a volume or snapshot over NBD", json=True)
    c.add_argument("ref", metavar="POOL/VOL[@SNAP]", type=volume_or_snapshot_ref)
    c.add_argument("--name", metavar="NAME", help="export name (default: POOL/VOL[@SNAP])")
    c.add_argument("--read-only", action="store_true")
    c = cmd(
        exp,
        "vhost-user-blk",
        export_vhost_user_blk,
        "serve a volume to QEMU over vhost-user-blk",
        json=True,
    )
    c.add_argument("ref", metavar="POOL/VOL", type=volume_ref)
    c.add_argument("--socket", metavar="PATH", required=True, help="Unix socket to listen on")
    c.add_argument("--queues", metavar="N", type=queues, default=1)
    c.add_argument("--read-only", action="store_true")
    c.add_argument("--name", metavar="NAME", help="export name (default: vhost-user-blk:POOL/VOL)")
    c = cmd(exp, "scsi", export_scsi, "serve a volume as a local SCSI disk (LIO)", json=True)
    c.add_argument("ref", metavar="POOL/VOL", type=volume_ref)
    c.add_argument("--name", metavar="NAME", help="export name (default: scsi/POOL/VOL)")
    c = cmd(
        exp,
        "vhost-scsi",
        export_vhost_scsi,
        "serve a volume or a host block device to QEMU over vhost-scsi (LIO)",
        json=True,
    )
    c.add_argument("ref", metavar="POOL/VOL", type=volume_ref, nargs="?")
    c.add_argument("--device", metavar="PATH", help="a host block device instead of a volume")
    c.add_argument("--wwpn", metavar="naa.X", help="vhost target WWPN (default: a new one)")
    c.add_argument("--lun", metavar="N", type=int, help="LUN number (default: lowest free)")
    c.add_argument("--name", metavar="NAME", help="export name (default: vhost-scsi/POOL/VOL)")
    cmd(exp, "list", export_list, "list exports", json=True)
    c = cmd(exp, "show", export_show, "show an export", json=True)
    c.add_argument("name", metavar="NAME")
    c = cmd(exp, "remove", export_remove, "stop an export and forget it")
    c.add_argument("name", metavar="NAME")

    _qos_parsers(cmd, group, vol)

    c = cmd(sub, "fsck", fsck, "check a pool's consistency", json=True)
    c.add_argument("pool", metavar="POOL", type=pool_name)

    c = cmd(sub, "top", top, "live per-volume IOPS, throughput and latency", json=True)
    c.add_argument(
        "--interval",
        metavar="SECONDS",
        type=interval,
        default=1.0,
        help="seconds between scrapes (default: 1)",
    )
    c.add_argument("--count", metavar="N", type=count, help="stop after N tables")

    c = cmd(
        sub,
        "libvirt-xml",
        libvirt_xml,
        "print the libvirt XML of a volume's vhost-user-blk export, or with --scsi of its "
        "SCSI export",
    )
    c.add_argument("ref", metavar="POOL/VOL", type=volume_ref)
    c.add_argument(
        "--scsi",
        choices=[m.value for m in scsi.ScsiMode],
        help="lun: a <disk device='lun'> on a virtio-scsi controller (from `export scsi`); "
        "vhost: a vhost-scsi <hostdev> (from `export vhost-scsi`)",
    )
    c.add_argument(
        "--domain-xml",
        metavar="FILE",
        help="the domain to attach to (virsh dumpxml): a free controller index, unit and "
        "target name are chosen in it",
    )
    c.add_argument(
        "--boot",
        action="store_true",
        help="boot from the volume (boot order 1; prints the changes the domain needs)",
    )
    return p


# -- entry point ----------------------------------------------------------------------------


def _home(args: argparse.Namespace) -> Path:
    home: Path = args.home if args.home is not None else default_home()
    return home.expanduser().absolute()


def _connect(home: Path, wait: float) -> Management:
    """The daemon's API if it answers, else the HOME opened by this process. A daemon that
    holds HOME without answering yet (it is starting) is waited for, up to ``wait`` seconds;
    one that is stopping lets go of HOME, which this process then opens."""
    deadline = time.monotonic() + wait
    while True:
        client = Client.for_home(home)
        if client is not None:
            return client
        from storvisor.api.service import Service  # only now: a client needs no engine
        from storvisor.engine.home import HomeInUse, HomeUser

        try:
            return Service.open(home)
        except HomeInUse as e:
            if e.holder is None or e.holder.user is not HomeUser.DAEMON:
                raise
            if time.monotonic() >= deadline:
                raise DaemonUnavailable(
                    f"{e}, whose API did not answer within {wait:g} s (see --wait)"
                ) from e
        time.sleep(_POLL)


def _remote(args: argparse.Namespace) -> Client | None:
    """The client of ``--api`` (or ``$STORVISOR_API``), or ``None`` for the local HOME."""
    url = args.api or os.environ.get("STORVISOR_API")
    if not url:
        for option in ("token_file", "ca_file", "fingerprint"):
            if getattr(args, option) is not None:
                raise _usage(f"--{option.replace('_', '-')} needs --api")
        return None
    token_file = args.token_file or os.environ.get("STORVISOR_TOKEN_FILE")
    if not token_file:
        raise _usage("--api needs --token-file (or STORVISOR_TOKEN_FILE)")
    ca_file = args.ca_file or os.environ.get("STORVISOR_CA_FILE")
    fingerprint = args.fingerprint or os.environ.get("STORVISOR_FINGERPRINT")
    if ca_file and fingerprint:
        raise _usage("give --ca-file or --fingerprint, not both")
    try:
        token = Path(token_file).expanduser().read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"cannot read the token file {token_file}: {e}") from e
    return Client.remote(
        url,
        token,
        ca_file=Path(ca_file).expanduser() if ca_file else None,
        fingerprint=fingerprint or None,
    )


def _serve(args: argparse.Namespace, home: Path) -> int:
    from storvisor.api.daemon import serve

    # How to run this CLI again from another terminal, as the banner suggests.
    prog = "storvisor" if shutil.which("storvisor") else shlex.quote(sys.argv[0])
    if home != default_home().expanduser().absolute():
        prog += f" --home {shlex.quote(str(home))}"
    if (args.tls_cert is None) != (args.tls_key is None):
        raise _usage("--tls-cert and --tls-key go together")
    if args.tls_cert is not None and args.api_tcp is None and not args.nbd_tls:
        raise _usage("--tls-cert and --tls-key need --api-tcp or --nbd-tls")
    tls = None
    if args.tls_cert is not None:
        tls = TlsFiles(args.tls_cert.expanduser().absolute(), args.tls_key.expanduser().absolute())
    if (args.nbd_tls_cert is None) != (args.nbd_tls_key is None):
        raise _usage("--nbd-tls-cert and --nbd-tls-key go together")
    if args.nbd_tls_cert is not None and args.nbd_tcp is None:
        raise _usage("--nbd-tls-cert needs --nbd-tcp (the Unix socket stays plain)")
    if args.nbd_tls and args.nbd_tcp is None:
        raise _usage("--nbd-tls needs --nbd-tcp (the Unix socket stays plain)")
    if args.nbd_tls and args.nbd_tls_cert is not None:
        raise _usage("give --nbd-tls (the API's certificate) or --nbd-tls-cert, not both")
    serve(
        home,
        demo=args.demo,
        nbd_tcp=args.nbd_tcp,
        nbd_tls=(args.nbd_tls_cert, args.nbd_tls_key) if args.nbd_tls_cert else None,
        nbd_tls_shared=args.nbd_tls,
        say=_say,
        cli=prog,
        lock_wait=args.wait,
        api_tcp=args.api_tcp,
        tls=tls,
        data_planes=args.data_planes,
        pool_wait=args.pool_wait,
    )
    return 0


def _say(text: str) -> None:
    print(text, flush=True)


def run(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the command; return the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG
        if args.debug
        else logging.INFO
        if args.command == "serve"
        else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        home = _home(args)
        if args.command in ("serve", "token") and args.api:
            raise _usage(f"{args.command} works on the local HOME; it takes no --api")
        if args.command == "serve":
            return _serve(args, home)
        if args.command == "token":
            home.mkdir(parents=True, exist_ok=True)
            token_command: Callable[[TokenStore, argparse.Namespace], int] = args.token
            return token_command(TokenStore(home), args)
        management = _remote(args) or _connect(home, args.wait)
        try:
            status: int = args.func(management, args)
        finally:
            management.close()
        return status
    except _UsageError as e:
        sys.stderr.write(f"storvisor: error: {e}\n")
        return EXIT_USAGE
    except StorvisorError as e:
        if args.debug:
            traceback.print_exc()
        sys.stderr.write(f"storvisor: error: {e}\n")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        sys.stderr.write("storvisor: interrupted\n")
        return 130
    except BrokenPipeError:
        return EXIT_FAILURE
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        sys.stderr.write(f"storvisor: error: internal error: {type(e).__name__}: {e}\n")
        return EXIT_FAILURE


def main() -> NoReturn:
    """Console-script entry point."""
    sys.exit(run())
