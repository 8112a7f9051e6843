"""The ``data`` of the ``connection_info`` the driver returns, typed.

``initialize_connection`` answers ``{"driver_volume_type": "storvisor", "data": ...}`` where
``data`` is ``ConnectionData.to_dict()``; whoever attaches (a connector on the compute host)
parses it back with ``ConnectionData.from_dict``, which checks every field. Cinder's volume
manager adds keys of its own to ``data`` (``access_mode``, ``qos_specs``, ``discard``...);
they are ignored here.

A local SCSI LUN can also be handed to a Nova that knows nothing of storvisor:
``local_connection`` is ``{"driver_volume_type": "local", "data": {"device_path": ...}}``,
which Nova's own ``LibvirtVolumeDriver`` and os-brick's ``LocalConnector`` attach.

The Nova driver records where it placed a LUN on the guest's virtio-scsi controllers in
``data["storvisor_scsi_address"]`` (``ConnectionData.address``), between ``connect_volume``
and ``get_config``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from storvisor.errors import InvalidArgument
from storvisor.integrations.libvirt.scsi import DriveAddress, ScsiMode, export_target
from storvisor.integrations.openstack.backend import ExportKind

DRIVER_VOLUME_TYPE = "storvisor"
LOCAL_VOLUME_TYPE = "local"
ADDRESS_KEY = "storvisor_scsi_address"


def export_path(kind: ExportKind, uris: Sequence[str]) -> str:
    """The one path a compute host attaches: the first NBD URI or the vhost-user socket, or
    for a SCSI export its stable ``/dev/disk/by-id/`` path. ``InvalidArgument`` when the
    export lists none."""
    path = export_target(ScsiMode.LUN, uris) if kind is ExportKind.SCSI else next(iter(uris), None)
    if path is None:
        raise InvalidArgument(f"the {kind.value} export lists no path: {list(uris)}")
    return path


def local_connection(device_path: str) -> dict[str, object]:
    """The ``connection_info`` of a host block device for Nova's own 'local' volume driver."""
    return {"driver_volume_type": LOCAL_VOLUME_TYPE, "data": {"device_path": device_path}}


@dataclass(frozen=True, slots=True)
class ConnectionData:
    """An attachment: the export ``export`` of ``pool/volume`` (Cinder's ``volume_id``),
    reached at ``uris`` (NBD URIs, Unix socket first; the vhost-user-blk socket path; or a
    SCSI LUN's device paths), and for a LUN the drive ``address`` the Nova driver chose."""

    volume_id: str
    pool: str
    volume: str
    export: str
    kind: ExportKind
    uris: tuple[str, ...]
    address: DriveAddress | None = None

    @property
    def path(self) -> str:
        """See ``export_path``."""
        return export_path(self.kind, self.uris)

    def to_dict(self) -> dict[str, object]:
        data: dict[str, object] = {
            "volume_id": self.volume_id,
            "pool": self.pool,
            "volume": self.volume,
            "export": self.export,
            "export_kind": self.kind.value,
            "uris": list(self.uris),
        }
        if self.address is not None:
            data[ADDRESS_KEY] = address_dict(self.address)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> ConnectionData:
        """Parse ``data``; ``InvalidArgument`` naming the first missing or malformed field."""

        def text(key: str) -> str:
            value = data.get(key)
            if not isinstance(value, str) or not value:
                raise InvalidArgument(f"connection data: {key!r} is missing or not a string")
            return value

        uris = data.get("uris")
        if not isinstance(uris, list | tuple) or not all(isinstance(u, str) for u in uris):
            raise InvalidArgument("connection data: 'uris' is missing or not a list of strings")
        try:
            kind = ExportKind(text("export_kind"))
        except ValueError:
            raise InvalidArgument(
                f"connection data: unknown export kind {data.get('export_kind')!r}"
            ) from None
        return cls(
            volume_id=text("volume_id"),
            pool=text("pool"),
            volume=text("volume"),
            export=text("export"),
            kind=kind,
            uris=tuple(uris),
            address=_address(data.get(ADDRESS_KEY)),
        )


def address_dict(address: DriveAddress) -> dict[str, int]:
    return {
        "controller": address.controller,
        "bus": address.bus,
        "target": address.target,
        "unit": address.unit,
    }


def _address(value: object) -> DriveAddress | None:
    if value is None:
        return None
    fields = ("controller", "bus", "target", "unit")
    if not isinstance(value, Mapping) or not all(
        isinstance(value.get(f), int) and not isinstance(value.get(f), bool) and value[f] >= 0
        for f in fields
    ):
        raise InvalidArgument(
            f"connection data: {ADDRESS_KEY!r} must map {', '.join(fields)} to non-negative "
            "integers"
        )
    return DriveAddress(*(int(value[f]) for f in fields))
