"""Run by the tests that drive Cinder in a process of their own (Nova's global options clash
with Cinder's): reads a ``connection_info`` (JSON) on stdin, has Nova's libvirt volume driver
for it (through ``VOLUME_DRIVERS``) connect the volume as the root disk of an instance Nova
is building (boot from volume), and prints ``<devices>`` with the ``<disk>`` and, when the
image asks for one, the SCSI controller Nova adds.

Arguments are the instance's image properties, ``NAME=VALUE`` (for boot from volume, the
volume's image metadata: ``hw_disk_bus=scsi hw_scsi_model=virtio-scsi``). Nova's own code
picks the disk's bus and name (``blockinfo.get_info_from_bdm``) and the controller
(``LibvirtDriver._get_scsi_controller``).
"""

from __future__ import annotations

import json
import sys
import types
import uuid
from typing import Any

from lxml import etree
from nova import exception as nova_exception
from nova import objects as nova_objects
from nova.virt.libvirt import blockinfo
from nova.virt.libvirt import driver as libvirt_driver

from storvisor.integrations.openstack import nova


class NewInstanceHost:
    """The calls volume drivers make on Nova's libvirt ``Host`` while Nova builds an
    instance: no volume has a secret, and the guest does not exist yet."""

    def find_secret(self, usage_type: str, usage_id: str) -> None:
        return None

    def get_guest(self, instance: Any) -> Any:
        raise nova_exception.InstanceNotFound(instance_id=instance.uuid)


def main() -> None:
    properties = dict(arg.split("=", 1) for arg in sys.argv[1:])
    connection_info = json.load(sys.stdin)
    nova_objects.register_all()
    nova.register()
    image_meta = nova_objects.ImageMeta.from_dict({"properties": properties})
    instance = nova_objects.Instance(uuid=str(uuid.uuid4()))
    root_volume = {"boot_index": 0, "device_type": "disk", "connection_info": connection_info}
    disk_info = blockinfo.get_info_from_bdm(instance, "kvm", image_meta, root_volume)
    controller = libvirt_driver.LibvirtDriver._get_scsi_controller(image_meta)
    if controller is not None and controller.model == "virtio-scsi":
        disk_info["unit"] = 0  # Nova's unit of the root volume on its virtio-scsi controller
    state = types.SimpleNamespace(volume_drivers={}, _host=NewInstanceHost())
    driver = libvirt_driver.LibvirtDriver._get_volume_driver(state, connection_info)
    driver.connect_volume(connection_info, instance)
    devices = etree.Element("devices")
    devices.append(etree.fromstring(driver.get_config(connection_info, disk_info).to_xml()))
    if controller is not None:
        devices.append(etree.fromstring(controller.to_xml()))
    print(etree.tostring(devices, encoding="unicode"))


if __name__ == "__main__":
    main()
