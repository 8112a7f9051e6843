"""The Nova libvirt volume driver for ``driver_volume_type`` 'storvisor', and its registration.

Nova has no plugin hook for volume drivers: ``register()`` adds 'storvisor' to
``nova.virt.libvirt.driver.VOLUME_DRIVERS`` (and registers the os-brick connector, which the
driver uses on the compute host). Call it in nova-compute's process before it attaches
(``docs/openstack.md``).

``get_config`` writes the disk Nova's own config objects cannot:

- NBD: ``<disk type='network'><source protocol='nbd' name=EXPORT>`` with ``<host
  transport='unix' socket=...>`` when the export's Unix socket is on this host, else the TCP
  host and port of its ``nbd://`` URI;
- vhost-user-blk: ``<disk type='vhostuser'>`` with ``<source type='unix' path=...>`` and
  ``<reconnect enabled='yes'>``, without what libvirt refuses on such a disk (cache, discard,
  serial, iotune, readonly, blockio...). QoS is enforced by storvisor. The guest needs shared
  memory, which Nova gives with the flavor's ``hw:mem_page_size`` or ``[libvirt]
  file_backed_memory``.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import parse_qs, urlsplit

from lxml import etree
from nova.virt.libvirt import config as vconfig
from nova.virt.libvirt import driver as libvirt_driver
from nova.virt.libvirt.volume import volume as libvirt_volume
from os_brick.initiator import connector as brick_connector

from storvisor.errors import InvalidArgument
from storvisor.integrations.openstack import brick
from storvisor.integrations.openstack.backend import ExportKind
from storvisor.integrations.openstack.connection import DRIVER_VOLUME_TYPE, ConnectionData

CLASS_PATH = f"{__name__}.LibvirtStorvisorVolumeDriver"
RECONNECT_SECONDS = 10

_VHOST_USER_REFUSED = ("serial", "wwn", "iotune", "readonly", "shareable", "blockio", "address")
"""Children of ``<disk>`` libvirt refuses on a vhost-user disk (besides ``source``)."""


def register() -> None:
    """Make Nova's libvirt driver use ``LibvirtStorvisorVolumeDriver`` for 'storvisor'
    connections, and os-brick build the storvisor connector. Idempotent."""
    brick.register()
    libvirt_driver.VOLUME_DRIVERS[DRIVER_VOLUME_TYPE] = CLASS_PATH


def nbd_source(uris: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    """The export name and the ``<host>`` attributes of the NBD URI to use from this host:
    the Unix socket if it exists here, else the first TCP URI. ``InvalidArgument`` if none
    is usable."""
    for uri in uris:
        parts = urlsplit(uri)
        if parts.scheme == "nbd+unix":
            socket = parse_qs(parts.query).get("socket", [""])[0]
            if socket and os.path.exists(socket):
                return parts.path.lstrip("/"), {"transport": "unix", "socket": socket}
    for uri in uris:
        parts = urlsplit(uri)
        if parts.scheme == "nbd" and parts.hostname:
            host = {"name": parts.hostname, "port": str(parts.port or 10809)}
            return parts.path.lstrip("/"), host
    raise InvalidArgument(f"no NBD URI reachable from this host among {list(uris)}")


class LibvirtConfigGuestStorvisorDisk(vconfig.LibvirtConfigGuestDisk):  # type: ignore[misc]
    """Nova's disk config with the storvisor source: see the module docstring."""

    def __init__(self, base: Any, data: ConnectionData) -> None:
        super().__init__()
        self.__dict__.update(base.__dict__)
        self.storvisor = data

    def format_dom(self) -> Any:
        data = self.storvisor
        if data.kind is ExportKind.NBD:
            name, host = nbd_source(data.uris)
            self.source_type, self.source_protocol, self.source_name = "network", "nbd", name
            self.source_hosts: list[str] = []
            self.source_ports: list[str | None] = []
            dev = super().format_dom()
            source = dev.find("source")
            source.append(etree.Element("host", **host))
            return dev
        self.source_type = "vhostuser"  # Nova writes no <source> for a type it does not know
        dev = super().format_dom()
        for tag in ("source", *_VHOST_USER_REFUSED):
            for child in dev.findall(tag):
                dev.remove(child)
        driver = dev.find("driver")
        if driver is not None:
            for attribute in list(driver.attrib):
                if attribute not in ("name", "type", "queues"):
                    del driver.attrib[attribute]
        source = etree.Element("source", type="unix", path=data.uris[0])
        source.append(etree.Element("reconnect", enabled="yes", timeout=str(RECONNECT_SECONDS)))
        dev.insert(1 if driver is not None else 0, source)
        return dev


class LibvirtStorvisorVolumeDriver(libvirt_volume.LibvirtBaseVolumeDriver):  # type: ignore[misc]
    """Attaches storvisor volumes to libvirt guests through the storvisor connector."""

    def __init__(self, host: Any) -> None:
        super().__init__(host, is_block_dev=False)
        brick.register()
        self.connector = brick_connector.InitiatorConnector.factory(brick.PROTOCOL, None)

    def get_config(self, connection_info: dict[str, Any], disk_info: dict[str, Any]) -> Any:
        base = super().get_config(connection_info, disk_info)
        data = ConnectionData.from_dict(connection_info["data"])
        return LibvirtConfigGuestStorvisorDisk(base, data)

    def connect_volume(self, connection_info: dict[str, Any], instance: Any) -> None:
        """Check the export is served here; record its path as ``device_path``."""
        device = self.connector.connect_volume(connection_info["data"])
        connection_info["data"]["device_path"] = device["path"]

    def disconnect_volume(
        self, connection_info: dict[str, Any], instance: Any, force: bool = False
    ) -> None:
        self.connector.disconnect_volume(connection_info["data"], None, force=force)

    def extend_volume(
        self, connection_info: dict[str, Any], instance: Any, requested_size: int
    ) -> int:
        """The volume's new size in bytes (storvisor has grown it already)."""
        size: int = self.connector.extend_volume(connection_info["data"])
        return size
