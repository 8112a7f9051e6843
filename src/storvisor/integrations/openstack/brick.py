"""The os-brick connector for storvisor attachments, and its registration.

os-brick has no plugin hook: ``register()`` adds ``STORVISOR`` to its protocol -> class
tables (``os_brick.initiator.connector``) so that ``InitiatorConnector.factory("storvisor",
...)``, which Nova and Cinder's generic image copy call with the ``driver_volume_type`` of a
connection, builds a ``StorvisorConnector``, and ``get_connector_properties`` reports what it
can attach. Call it once per process before os-brick is asked (``docs/openstack.md``).

``connect_volume`` asks the storvisor daemon of this host (``storvisor_api_url``, default
``$STORVISOR_API_URL`` or ``unix:///var/lib/storvisor/api.sock``) for the export the
connection names and returns its device info: ``{"type": "nbd", "path": NBD URI}``,
``{"type": "vhost-user-blk", "path": socket path}`` or ``{"type": "scsi", "path":
/dev/disk/by-id/...}`` (a local SCSI LUN). The export itself belongs to Cinder's
``initialize_connection`` / ``terminate_connection``: disconnecting leaves it alone.
"""

from __future__ import annotations

import os
from typing import Any

from os_brick import exception
from os_brick.initiator import connector as brick_connector
from os_brick.initiator.connectors import base

from storvisor.api.export_defs import ExportInfo, ExportState
from storvisor.errors import NotFound, StorvisorError
from storvisor.integrations.openstack.backend import BackendOptions, ExportKind, open_client
from storvisor.integrations.openstack.connection import (
    DRIVER_VOLUME_TYPE,
    ConnectionData,
    export_path,
)

PROTOCOL = DRIVER_VOLUME_TYPE.upper()
CLASS_PATH = f"{__name__}.StorvisorConnector"
DEFAULT_API_URL = "unix:///var/lib/storvisor/api.sock"


def register() -> None:
    """Make os-brick build ``StorvisorConnector`` for ``driver_volume_type`` 'storvisor' on
    every architecture, and report its properties. Idempotent."""
    for name in dir(brick_connector):
        table = getattr(brick_connector, name)
        if name.startswith("_connector_mapping") and isinstance(table, dict):
            table[PROTOCOL] = CLASS_PATH
    if CLASS_PATH not in brick_connector.unix_connector_list:
        brick_connector.unix_connector_list.append(CLASS_PATH)


class StorvisorConnector(base.BaseLinuxConnector):  # type: ignore[misc]  # os-brick is untyped
    """Attaches storvisor exports on this host. See the module docstring."""

    def __init__(
        self,
        root_helper: str | None,
        driver: Any = None,
        *args: Any,
        storvisor_api_url: str | None = None,
        storvisor_token_file: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(root_helper, driver, *args, **kwargs)
        self._options = BackendOptions(
            api_url=storvisor_api_url or os.environ.get("STORVISOR_API_URL") or DEFAULT_API_URL,
            pool="",
            token_file=storvisor_token_file,
            timeout=60.0,
        )

    @staticmethod
    def get_connector_properties(
        root_helper: str | None, *args: Any, **kwargs: Any
    ) -> dict[str, Any]:
        """What this host can attach: merged into the ``connector`` Cinder receives."""
        return {"storvisor_export_kinds": [k.value for k in ExportKind]}

    def connect_volume(self, connection_properties: dict[str, Any]) -> dict[str, Any]:
        """The device info of the connection's export: ``{"type": "nbd" | "vhost-user-blk" |
        "scsi", "path": URI, socket or block device}``. ``VolumeDeviceNotFound`` if the
        export is missing or not serving; ``BrickException`` for malformed properties or a
        daemon that does not answer."""
        data = _parse(connection_properties)
        info = self._export(data)
        if info is None or info.state is not ExportState.ACTIVE:
            raise exception.VolumeDeviceNotFound(device=data.export)
        return {"type": data.kind.value, "path": _path(data.kind, info)}

    def disconnect_volume(
        self,
        connection_properties: dict[str, Any],
        device_info: dict[str, Any] | None,
        force: bool = False,
        ignore_errors: bool = False,
    ) -> None:
        """Nothing to undo on this host: the export ends with Cinder's terminate_connection."""
        _parse(connection_properties)

    def get_volume_paths(self, connection_properties: dict[str, Any]) -> list[str]:
        """The export's path, or none while it does not exist."""
        data = _parse(connection_properties)
        info = self._export(data)
        return [_path(data.kind, info)] if info is not None else []

    def get_search_path(self) -> None:
        return None

    def get_all_available_volumes(self, connection_properties: Any = None) -> list[str]:
        return []

    def check_valid_device(self, path: str, run_as_root: bool = True) -> bool:
        """Whether ``path`` is the URI, socket or device of an export this host's daemon
        serves."""
        try:
            exports = open_client(self._options).exports()
        except StorvisorError:
            return False
        return any(path in e.uris and e.state is ExportState.ACTIVE for e in exports)

    def extend_volume(self, connection_properties: dict[str, Any]) -> int:
        """The volume's size in bytes (storvisor grows it online; its clients see it)."""
        data = _parse(connection_properties)
        try:
            return open_client(self._options).volume_info(data.pool, data.volume).size
        except NotFound as e:
            raise exception.VolumeDeviceNotFound(device=data.export) from e
        except StorvisorError as e:
            raise exception.BrickException(message=f"storvisor: {e}") from e

    def _export(self, data: ConnectionData) -> ExportInfo | None:
        try:
            info = open_client(self._options).export_info(data.export)
        except NotFound:
            return None
        except StorvisorError as e:
            raise exception.BrickException(message=f"storvisor: {e}") from e
        if (info.spec.pool, info.spec.volume) != (data.pool, data.volume):
            raise exception.BrickException(
                message=f"storvisor export {data.export} serves {info.spec.pool}/"
                f"{info.spec.volume}, not {data.pool}/{data.volume}"
            )
        return info


def _path(kind: ExportKind, info: ExportInfo) -> str:
    try:
        return export_path(kind, info.uris)
    except StorvisorError as e:
        raise exception.BrickException(message=f"storvisor: {e}") from e


def _parse(connection_properties: dict[str, Any]) -> ConnectionData:
    try:
        return ConnectionData.from_dict(connection_properties)
    except StorvisorError as e:
        raise exception.BrickException(message=str(e)) from e
