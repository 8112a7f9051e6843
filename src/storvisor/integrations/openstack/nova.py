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
  file_backed_memory``;
- a local SCSI LUN: ``<disk type='block' device='lun'>`` on the LUN's ``/dev/disk/by-id/``
  path, on the scsi bus, so the guest sends SCSI commands through.

Placing a LUN on a running guest (``connect_volume``) reads the guest's domain and places the
disk as ``storvisor libvirt-xml --scsi lun`` does (``integrations.libvirt.scsi``): on the
lowest virtio-scsi controller with a free unit, or on a new virtio-scsi controller at the
lowest free index, which ``connect_volume`` attaches to the guest (live and persistent) before
Nova attaches the disk. The address is kept in the connection data (``storvisor_scsi_address``)
for ``get_config``; a LUN already in the domain keeps its address (a hard reboot reconnects
every volume). With no guest yet (boot from volume, where Nova builds the domain), the disk
takes the unit Nova gives it on Nova's controller 0, which is virtio-scsi when the image (for
boot from volume, the volume's image metadata) has ``hw_scsi_model=virtio-scsi``; the boot
order is Nova's.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import parse_qs, urlsplit

from lxml import etree
from nova import exception as nova_exception
from nova.virt.libvirt import config as vconfig
from nova.virt.libvirt import driver as libvirt_driver
from nova.virt.libvirt.volume import volume as libvirt_volume
from os_brick.initiator import connector as brick_connector

from storvisor.errors import InvalidArgument, StorvisorError
from storvisor.integrations.libvirt.scsi import VIRTIO_SCSI, DomainDevices, plan_lun
from storvisor.integrations.openstack import brick
from storvisor.integrations.openstack.backend import ExportKind
from storvisor.integrations.openstack.connection import (
    ADDRESS_KEY,
    DRIVER_VOLUME_TYPE,
    ConnectionData,
    address_dict,
)

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
        if data.kind is ExportKind.SCSI:
            dev = super().format_dom()
            dev.set("sgio", "filtered")  # libvirt no longer accepts unfiltered
            dev.set("rawio", "no")
            return dev
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
        if data.kind is ExportKind.SCSI:
            base.source_type, base.source_device = "block", "lun"
            base.source_path = data.path
            base.target_bus = "scsi"
            if data.address is not None:
                address = vconfig.LibvirtConfigGuestDeviceAddressDrive()
                address.controller, address.bus = data.address.controller, data.address.bus
                address.target, address.unit = data.address.target, data.address.unit
                base.device_addr = address
        return LibvirtConfigGuestStorvisorDisk(base, data)

    def connect_volume(self, connection_info: dict[str, Any], instance: Any) -> None:
        """Check the export is served here; record its path as ``device_path``. For a SCSI
        LUN and a guest that exists, place the disk on a virtio-scsi controller, attaching a
        new one to the guest when none has a free unit (see the module docstring)."""
        device = self.connector.connect_volume(connection_info["data"])
        connection_info["data"]["device_path"] = device["path"]
        if ConnectionData.from_dict(connection_info["data"]).kind is ExportKind.SCSI:
            self._place_lun(connection_info, instance, device["path"])

    def _place_lun(self, connection_info: dict[str, Any], instance: Any, path: str) -> None:
        try:
            guest = self.host.get_guest(instance)
        except nova_exception.InstanceNotFound:
            return  # Nova is building the domain: its controller 0 and unit
        try:
            domain = DomainDevices.parse(guest.get_xml_desc(), f"the domain of {instance.uuid}")
            present = domain.sources.get(path)
            if present is not None:
                connection_info["data"][ADDRESS_KEY] = address_dict(present)
                return
            attachment = plan_lun(path, domain)
        except StorvisorError as e:
            raise nova_exception.VolumeAttachFailed(
                volume_id=connection_info.get("serial"), reason=str(e)
            ) from e
        if attachment.new_controller is not None:
            controller = vconfig.LibvirtConfigGuestController()
            controller.type, controller.model = "scsi", VIRTIO_SCSI
            controller.index = attachment.new_controller
            guest.attach_device(controller, persistent=True, live=guest.is_active())
        assert attachment.address is not None  # a LUN plan always has one
        connection_info["data"][ADDRESS_KEY] = address_dict(attachment.address)

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
