"""The Cinder volume driver: Cinder volumes as storvisor thin volumes.

cinder-volume loads it by dotted path (``volume_driver =
storvisor.integrations.openstack.cinder.StorvisorDriver`` in a back-end section, with the
``storvisor_*`` options of ``STORVISOR_OPTS``) and calls it with Cinder's versioned objects.

Theory of operation
-------------------
A Cinder volume is the storvisor volume ``POOL/<volume.name>`` (``volume-<id>``), a Cinder
snapshot the storvisor snapshot ``<snapshot.name>`` of it. Volumes made from a snapshot or
from another volume are linked clones flattened at once, so a Cinder snapshot or volume never
depends on another one: a deleted volume's clusters are freed and a new volume reads zeros
where nothing was written. Back-end QoS specs of the volume type (consumer ``back-end`` or
``both``) become the volume's storvisor QoS keys, which storvisor enforces itself.

An attachment is an export of the volume named ``<volume.name>``: NBD, vhost-user-blk or a
local SCSI LUN (``storvisor_export_kind``); ``initialize_connection`` returns
``driver_volume_type 'storvisor'`` with ``ConnectionData`` and ``terminate_connection``
removes the export (every export of the volume when ``connector`` is None, a force-detach).
A SCSI LUN goes to a compute host whose connector does not report storvisor's connector
(``storvisor_export_kinds``: an unregistered, unmodified Nova) as ``driver_volume_type
'local'`` with its ``/dev/disk/by-id/`` path, which Nova's own volume driver attaches. Image
copies go through a temporary NBD export of the volume and ``qemu-img``.

Capacity: volumes are thin. A size beyond what the pool can ever hold (its capacity times
``max_over_subscription_ratio``) or beyond storvisor's 1 EiB limit is refused before anything
is made; Cinder's scheduler applies the same ratio to the stats. Multiattach is not
supported (an export belongs to one attachment: detaching removes it, and a vhost-user-blk
socket serves one guest): the stats say ``multiattach`` False and a multiattach volume is
refused at creation and at attachment.

Errors: storvisor's ``Conflict`` on a delete is ``VolumeIsBusy`` / ``SnapshotIsBusy``; a
volume or snapshot already gone is a successful delete; anything else the daemon refuses
(and an unreachable daemon or a refused token) is ``VolumeBackendAPIException`` with the
daemon's one-line message. An operation that fails half-way removes what it made.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any, NoReturn

from cinder import exception, interface
from cinder.volume import driver
from oslo_config import cfg
from oslo_log import log as logging

from storvisor.api.export_defs import ExportInfo
from storvisor.api.qos import QosKey
from storvisor.api.service import Management
from storvisor.engine.types import PoolState
from storvisor.errors import Conflict, InvalidArgument, NotFound, StorvisorError
from storvisor.integrations.openstack.backend import BackendOptions, ExportKind, open_client
from storvisor.integrations.openstack.connection import (
    DRIVER_VOLUME_TYPE,
    ConnectionData,
    local_connection,
)

LOG = logging.getLogger(__name__)

GIB = 1 << 30
MULTIATTACH_REFUSED = "storvisor does not support multiattach (one attachment per volume)"

STORVISOR_OPTS = [
    cfg.StrOpt(
        "storvisor_api_url",
        default="unix:///var/lib/storvisor/api.sock",
        help="The storvisor daemon's management API: unix:///PATH for the local socket "
        "(HOME/api.sock), or https://HOST:PORT for the remote API.",
    ),
    cfg.StrOpt(
        "storvisor_token_file",
        help="File holding the bearer token for the remote API (https:// URLs).",
    ),
    cfg.StrOpt(
        "storvisor_ca_file",
        help="CA bundle the remote API's certificate must be signed by (default: the system's).",
    ),
    cfg.StrOpt(
        "storvisor_tls_fingerprint",
        help="SHA-256 fingerprint the remote API's certificate must have (instead of a CA).",
    ),
    cfg.StrOpt("storvisor_pool", default="default", help="The storvisor pool of the volumes."),
    cfg.StrOpt(
        "storvisor_export_kind",
        default=ExportKind.NBD.value,
        choices=[k.value for k in ExportKind],
        help="How attached volumes are served: nbd, vhost-user-blk, or scsi (a local SCSI "
        "LUN: storvisor and the guests on the same host).",
    ),
    cfg.StrOpt(
        "storvisor_vhost_socket_dir",
        default="/run/storvisor",
        help="Directory of the vhost-user-blk sockets (on the storvisor host).",
    ),
    cfg.FloatOpt(
        "storvisor_api_timeout",
        default=600.0,
        min=1.0,
        help="Seconds one API request may take.",
    ),
]

cfg.CONF.register_opts(STORVISOR_OPTS, group="backend_defaults")

_IMAGE_FORMATS = frozenset({"raw", "qcow2", "vmdk", "vdi", "vhdx", "vpc"})
"""Image formats ``copy_image_to_volume`` accepts (``qemu-img info``'s names)."""
_DISK_FORMATS = {"raw": "raw", "qcow2": "qcow2", "vmdk": "vmdk", "vdi": "vdi", "vhd": "vpc"}
"""Glance ``disk_format`` -> ``qemu-img`` output format, for ``copy_volume_to_image``."""


def _backend_error(e: StorvisorError | OSError | str) -> NoReturn:
    raise exception.VolumeBackendAPIException(data=str(e)) from (
        e if isinstance(e, BaseException) else None
    )


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """Every storvisor error as ``VolumeBackendAPIException`` (its message kept)."""
    try:
        yield
    except StorvisorError as e:
        _backend_error(e)


@interface.volumedriver
class StorvisorDriver(driver.VolumeDriver):  # type: ignore[misc]  # Cinder is untyped
    """Cinder volumes on a storvisor pool. See the module docstring."""

    VERSION = "1.0.0"
    CI_WIKI_NAME = "storvisor_CI"
    SUPPORTS_ACTIVE_ACTIVE = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.configuration.append_config_values(STORVISOR_OPTS)
        self._options: BackendOptions | None = None
        self._client_: Management | None = None

    @staticmethod
    def get_driver_options() -> list[cfg.Opt]:
        return STORVISOR_OPTS

    # -- set-up ---------------------------------------------------------------------------

    def do_setup(self, context: Any) -> None:
        """Read the options and open the client. ``InvalidConfigurationValue`` for a bad
        URL, token file or CA/fingerprint pair."""
        conf = self.configuration
        options = BackendOptions(
            api_url=conf.storvisor_api_url,
            pool=conf.storvisor_pool,
            export_kind=ExportKind(conf.storvisor_export_kind),
            token_file=conf.storvisor_token_file,
            ca_file=conf.storvisor_ca_file,
            fingerprint=conf.storvisor_tls_fingerprint,
            vhost_socket_dir=conf.storvisor_vhost_socket_dir,
            timeout=conf.storvisor_api_timeout,
        )
        try:
            self._client_ = open_client(options)
        except StorvisorError as e:
            raise exception.InvalidConfigurationValue(
                message=f"storvisor back-end {conf.config_group}: {e}"
            ) from e
        self._options = options

    def check_for_setup_error(self) -> None:
        """The daemon answers (with the token) and the pool exists and serves."""
        with _translated():
            info = self._client.pool_info(self._opts.pool)
        if info.state is PoolState.OFFLINE:
            _backend_error(f"storvisor pool {info.name} is offline: {info.reason}")

    @property
    def _client(self) -> Management:
        if self._client_ is None:
            _backend_error("the storvisor driver is not set up (do_setup was not called)")
        return self._client_

    @property
    def _opts(self) -> BackendOptions:
        if self._options is None:
            _backend_error("the storvisor driver is not set up (do_setup was not called)")
        return self._options

    # -- stats ----------------------------------------------------------------------------

    def _update_volume_stats(self) -> None:
        pool = self._opts.pool
        with _translated():
            info = self._client.pool_info(pool)
            volumes = self._client.volumes(pool)
        backend = self.configuration.safe_get("volume_backend_name") or "storvisor"
        self._stats = {
            "volume_backend_name": backend,
            "vendor_name": "storvisor",
            "driver_version": self.VERSION,
            "storage_protocol": DRIVER_VOLUME_TYPE,
            "pools": [
                {
                    "pool_name": pool,
                    "total_capacity_gb": round(info.stats.capacity / GIB, 2),
                    "free_capacity_gb": round(info.stats.free / GIB, 2),
                    "allocated_capacity_gb": round(info.stats.allocated / GIB, 2),
                    "provisioned_capacity_gb": round(info.stats.provisioned / GIB, 2),
                    "total_volumes": len(volumes),
                    "reserved_percentage": self.configuration.safe_get("reserved_percentage") or 0,
                    "max_over_subscription_ratio": self.configuration.safe_get(
                        "max_over_subscription_ratio"
                    )
                    or 20.0,
                    "thin_provisioning_support": True,
                    "thick_provisioning_support": False,
                    "QoS_support": True,
                    "online_extend_support": True,
                    "multiattach": False,
                    "sparse_copy_volume": True,
                    "location_info": f"storvisor:{self._opts.api_url}:{pool}",
                }
            ],
        }

    # -- volumes --------------------------------------------------------------------------

    def create_volume(self, volume: Any) -> None:
        """Create the thin volume and apply the volume type's back-end QoS."""
        pool = self._opts.pool
        self._check_new_volume(volume)
        with _translated():
            self._client.create_volume(pool, volume.name, volume.size * GIB)
        with self._undo_volume_on_error(volume):
            self._apply_qos(volume)

    def delete_volume(self, volume: Any) -> None:
        """Delete the volume and its exports; success if it is already gone.
        ``VolumeIsBusy`` if it is in use (attached elsewhere, or with snapshots of clones)."""
        pool = self._opts.pool
        try:
            self._client.delete_volume(pool, volume.name)
        except NotFound:
            with _translated():
                self._client.pool_info(pool)  # a missing pool is an error, not "gone"
            LOG.info("storvisor volume %s/%s was already gone", pool, volume.name)
        except Conflict as e:
            raise exception.VolumeIsBusy(message=str(e), volume_name=volume.name) from e
        except StorvisorError as e:
            _backend_error(e)

    def extend_volume(self, volume: Any, new_size: int) -> None:
        """Grow the volume to ``new_size`` GiB, online (attached users see the new size)."""
        self._check_size(new_size)
        with _translated():
            self._client.extend_volume(self._opts.pool, volume.name, new_size * GIB)

    def create_snapshot(self, snapshot: Any) -> None:
        with _translated():
            self._client.create_snapshot(self._opts.pool, snapshot.volume_name, snapshot.name)

    def delete_snapshot(self, snapshot: Any) -> None:
        """Delete the snapshot; success if it (or its volume) is already gone.
        ``SnapshotIsBusy`` if it is in use."""
        try:
            self._client.delete_snapshot(self._opts.pool, snapshot.volume_name, snapshot.name)
        except NotFound:
            LOG.info(
                "storvisor snapshot %s@%s was already gone", snapshot.volume_name, snapshot.name
            )
        except Conflict as e:
            raise exception.SnapshotIsBusy(message=str(e), snapshot_name=snapshot.name) from e
        except StorvisorError as e:
            _backend_error(e)

    def create_volume_from_snapshot(self, volume: Any, snapshot: Any) -> None:
        """A flattened clone of the snapshot, grown to ``volume.size`` if that is larger."""
        pool = self._opts.pool
        self._check_new_volume(volume)
        with _translated():
            self._client.clone(pool, snapshot.volume_name, snapshot.name, volume.name)
        with self._undo_volume_on_error(volume):
            self._finish_clone(volume)

    def create_cloned_volume(self, volume: Any, src_vref: Any) -> None:
        """A flattened clone of ``src_vref`` through a temporary snapshot, grown to
        ``volume.size`` if that is larger."""
        pool = self._opts.pool
        temporary = f"clone-{volume.id}"
        self._check_new_volume(volume)
        with _translated():
            self._client.create_snapshot(pool, src_vref.name, temporary)
        try:
            with _translated():
                self._client.clone(pool, src_vref.name, temporary, volume.name)
            with self._undo_volume_on_error(volume):
                self._finish_clone(volume)
        finally:
            with contextlib.suppress(StorvisorError):
                self._client.delete_snapshot(pool, src_vref.name, temporary)

    def _finish_clone(self, volume: Any) -> None:
        pool = self._opts.pool
        with _translated():
            info = self._client.flatten(pool, volume.name)
            if volume.size * GIB > info.size:
                self._client.extend_volume(pool, volume.name, volume.size * GIB)
        self._apply_qos(volume)

    def _check_new_volume(self, volume: Any) -> None:
        if _multiattach(volume):
            _backend_error(MULTIATTACH_REFUSED)
        self._check_size(volume.size)

    def _check_size(self, size_gib: int) -> None:
        """``VolumeBackendAPIException`` for a size the pool can never hold."""
        with _translated():
            capacity = self._client.pool_info(self._opts.pool).stats.capacity
        try:
            ratio = float(self.configuration.safe_get("max_over_subscription_ratio") or 20.0)
        except ValueError:
            return  # 'auto': Cinder derives the ratio; only storvisor's own limit applies
        if size_gib * GIB > capacity * max(ratio, 1.0):
            _backend_error(
                f"a {size_gib} GiB volume can never fit storvisor pool {self._opts.pool} "
                f"({capacity / GIB:.2f} GiB, max over-subscription ratio {ratio:g})"
            )

    @contextlib.contextmanager
    def _undo_volume_on_error(self, volume: Any) -> Iterator[None]:
        try:
            yield
        except BaseException:
            with contextlib.suppress(StorvisorError):
                self._client.delete_volume(self._opts.pool, volume.name)
            raise

    # -- QoS ------------------------------------------------------------------------------

    def _apply_qos(self, volume: Any) -> None:
        keys = _backend_qos_keys(volume)
        if not keys:
            return
        try:
            self._client.set_volume_qos(self._opts.pool, volume.name, keys=keys)
        except StorvisorError as e:
            raise exception.InvalidQoSSpecs(reason=str(e)) from e

    # -- exports and attachments ----------------------------------------------------------

    def create_export(self, context: Any, volume: Any, connector: Any) -> None:
        pass

    def ensure_export(self, context: Any, volume: Any) -> None:
        pass

    def remove_export(self, context: Any, volume: Any) -> None:
        pass

    def initialize_connection(
        self, volume: Any, connector: Any, initiator_data: Any = None
    ) -> dict[str, object]:
        """Export the volume (or reuse its export) and say how to reach it: a 'storvisor'
        connection, or for a SCSI LUN and a connector without storvisor's a 'local' one.
        ``VolumeBackendAPIException`` for a multiattach volume (nothing is exported)."""
        if _multiattach(volume):
            _backend_error(MULTIATTACH_REFUSED)
        info = self._export(volume)
        data = ConnectionData(
            volume_id=volume.id,
            pool=self._opts.pool,
            volume=volume.name,
            export=info.spec.name,
            kind=ExportKind(info.spec.kind.value),
            uris=info.uris,
        )
        with self._undo_export_on_error(info), _translated():
            path = data.path
        if data.kind is ExportKind.SCSI and not _knows_storvisor(connector, data.kind):
            return local_connection(path)
        return {"driver_volume_type": DRIVER_VOLUME_TYPE, "data": data.to_dict()}

    @contextlib.contextmanager
    def _undo_export_on_error(self, info: ExportInfo) -> Iterator[None]:
        try:
            yield
        except BaseException:
            with contextlib.suppress(StorvisorError):
                self._client.remove_export(info.spec.name)
            raise

    def terminate_connection(self, volume: Any, connector: Any, **kwargs: Any) -> None:
        """Remove the volume's export; with ``connector=None`` (force-detach) every export of
        the volume. An export already gone is not an error."""
        pool = self._opts.pool
        with _translated():
            if connector is None:
                names = [
                    e.spec.name
                    for e in self._client.exports()
                    if (e.spec.pool, e.spec.volume) == (pool, volume.name)
                ]
            else:
                names = [volume.name]
            for name in names:
                with contextlib.suppress(NotFound):
                    self._client.remove_export(name)

    def _export(self, volume: Any) -> ExportInfo:
        opts = self._opts
        name = volume.name
        with _translated():
            try:
                if opts.export_kind is ExportKind.VHOST_USER_BLK:
                    socket = os.path.join(opts.vhost_socket_dir, f"{name}.sock")
                    return self._client.export_vhost_user_blk(
                        opts.pool, volume.name, socket, name=name
                    )
                if opts.export_kind is ExportKind.SCSI:
                    return _export_scsi(self._client, opts.pool, volume.name, name)
                return self._client.export_nbd(opts.pool, volume.name, name=name)
            except Conflict as conflict:
                # attached already (another attachment of the volume): the same export
                try:
                    info = self._client.export_info(name)
                except NotFound:
                    raise conflict from None
                if (info.spec.pool, info.spec.volume) != (opts.pool, volume.name):
                    raise
                return info

    # -- images ---------------------------------------------------------------------------

    def copy_image_to_volume(
        self,
        context: Any,
        volume: Any,
        image_service: Any,
        image_id: str,
        disable_sparse: bool = False,
    ) -> None:
        """Download the image and write it onto the volume (zeros stay unallocated unless
        ``disable_sparse``). ``ImageUnacceptable`` for an unknown format, a backing file, or
        an image larger than the volume."""
        with tempfile.TemporaryDirectory(prefix="storvisor-image-") as tmp:
            path = os.path.join(tmp, "image")
            with open(path, "wb") as f:
                image_service.download(context, image_id, data=f)
            fmt, size = _inspect_image(image_id, path)
            if size > volume.size * GIB:
                raise exception.ImageUnacceptable(
                    image_id=image_id,
                    reason=f"its virtual size {size} bytes exceeds the {volume.size} GiB volume",
                )
            with self._image_export(volume, read_only=False) as uri:
                args = ["convert", "-n", "-f", fmt, "-O", "raw"]
                if disable_sparse:
                    args.append("-S0")
                _qemu_img([*args, path, uri])

    def copy_volume_to_image(
        self, context: Any, volume: Any, image_service: Any, image_meta: Any
    ) -> None:
        """Write the volume as an image in the image's ``disk_format`` and upload it."""
        disk_format = image_meta.get("disk_format") or "raw"
        fmt = _DISK_FORMATS.get(disk_format)
        if fmt is None:
            raise exception.ImageUnacceptable(
                image_id=image_meta["id"], reason=f"unsupported disk format {disk_format!r}"
            )
        with tempfile.TemporaryDirectory(prefix="storvisor-image-") as tmp:
            path = os.path.join(tmp, "image")
            with self._image_export(volume, read_only=True) as uri:
                _qemu_img(["convert", "-f", "raw", "-O", fmt, uri, path])
            with open(path, "rb") as f:
                image_service.update(context, image_meta["id"], {}, f)

    @contextlib.contextmanager
    def _image_export(self, volume: Any, *, read_only: bool) -> Iterator[str]:
        """A temporary NBD export of the volume, by the URI this host reaches it at."""
        opts = self._opts
        name = f"image-{volume.name}-{os.urandom(4).hex()}"
        with _translated():
            info = self._client.export_nbd(opts.pool, volume.name, name=name, read_only=read_only)
        try:
            tcp = [u for u in info.uris if not u.startswith("nbd+unix:")]
            if opts.local:
                uri = info.uris[0]
            elif tcp:
                uri = tcp[0]
            else:
                _backend_error("the storvisor daemon serves NBD on no TCP address")
            yield uri
        finally:
            with contextlib.suppress(StorvisorError):
                self._client.remove_export(name)


def _multiattach(volume: Any) -> bool:
    """Whether the volume is to be attached several times (unset counts as no)."""
    return bool(volume.obj_attr_is_set("multiattach") and volume.multiattach)


def _knows_storvisor(connector: Any, kind: ExportKind) -> bool:
    """Whether the compute host's connector properties say it attaches storvisor's ``kind``
    (os-brick reports ``storvisor_export_kinds`` once the storvisor connector is
    registered there)."""
    kinds = connector.get("storvisor_export_kinds") if isinstance(connector, dict) else None
    return isinstance(kinds, list | tuple) and kind.value in kinds


def _export_scsi(client: Management, pool: str, volume: str, name: str) -> ExportInfo:
    """The volume's local SCSI LUN export (``storvisor export scsi``). ``InvalidArgument``
    when the daemon's API has no SCSI export."""
    export = getattr(client, "export_scsi", None)
    if export is None:
        raise InvalidArgument(
            "this storvisor has no SCSI export (storvisor export scsi): "
            "use storvisor_export_kind nbd or vhost-user-blk"
        )
    info: ExportInfo = export(pool, volume, name=name)
    return info


def _backend_qos_keys(volume: Any) -> tuple[QosKey, ...]:
    """The QoS keys of the volume type's spec when storvisor (the back-end) enforces it."""
    if not volume.volume_type_id:
        return ()
    vtype = volume.volume_type
    if vtype is None or not vtype.qos_specs_id:
        return ()
    qos = vtype.qos_specs
    if qos is None or qos.consumer not in ("back-end", "both"):
        return ()
    return tuple(QosKey(k, str(v)) for k, v in sorted(qos.specs.items()))


def _qemu_img(args: list[str]) -> str:
    try:
        proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)
    except OSError as e:
        _backend_error(f"cannot run qemu-img: {e.strerror}")
    if proc.returncode != 0:
        message = proc.stderr.strip().splitlines()
        _backend_error(f"qemu-img {args[0]} failed: {message[-1] if message else proc.returncode}")
    return proc.stdout


def _inspect_image(image_id: str, path: str) -> tuple[str, int]:
    """The format and virtual size of a downloaded image; ``ImageUnacceptable`` if it has a
    backing file or a format not in ``_IMAGE_FORMATS``."""
    info = json.loads(_qemu_img(["info", "--output=json", path]))
    fmt = info.get("format")
    if fmt not in _IMAGE_FORMATS:
        raise exception.ImageUnacceptable(image_id=image_id, reason=f"unsupported format {fmt}")
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise exception.ImageUnacceptable(image_id=image_id, reason="it has a backing file")
    return str(fmt), int(info["virtual-size"])
