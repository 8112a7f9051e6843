"""The ``data`` of the ``connection_info`` the driver returns, typed.

``initialize_connection`` answers ``{"driver_volume_type": "storvisor", "data": ...}`` where
``data`` is ``ConnectionData.to_dict()``; whoever attaches (a connector on the compute host)
parses it back with ``ConnectionData.from_dict``, which checks every field. Cinder's volume
manager adds keys of its own to ``data`` (``access_mode``, ``qos_specs``, ``discard``...);
they are ignored here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from storvisor.errors import InvalidArgument
from storvisor.integrations.openstack.backend import ExportKind

DRIVER_VOLUME_TYPE = "storvisor"


@dataclass(frozen=True, slots=True)
class ConnectionData:
    """An attachment: the export ``export`` of ``pool/volume`` (Cinder's ``volume_id``),
    reached at ``uris`` (NBD URIs, Unix socket first; or the vhost-user-blk socket path)."""

    volume_id: str
    pool: str
    volume: str
    export: str
    kind: ExportKind
    uris: tuple[str, ...]

    def to_dict(self) -> dict[str, object]:
        return {
            "volume_id": self.volume_id,
            "pool": self.pool,
            "volume": self.volume,
            "export": self.export,
            "export_kind": self.kind.value,
            "uris": list(self.uris),
        }

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
        )
