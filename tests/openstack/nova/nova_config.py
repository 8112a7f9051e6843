"""Run by the end-to-end test in a process of its own (Nova's global options clash with
Cinder's): reads a ``connection_info`` (JSON) on stdin, has Nova's libvirt volume driver for
it (through ``VOLUME_DRIVERS``) connect the volume, and prints the ``<disk>`` XML."""

from __future__ import annotations

import json
import sys
import types

from nova.virt.libvirt import driver as libvirt_driver

from storvisor.integrations.openstack import nova


class HostWithoutSecrets:
    """The one call volume drivers make on Nova's libvirt ``Host``: no volume has a secret."""

    def find_secret(self, usage_type: str, usage_id: str) -> None:
        return None


def main() -> None:
    connection_info = json.load(sys.stdin)
    nova.register()
    state = types.SimpleNamespace(volume_drivers={}, _host=HostWithoutSecrets())
    driver = libvirt_driver.LibvirtDriver._get_volume_driver(state, connection_info)
    driver.connect_volume(connection_info, None)
    disk_info = {"type": "disk", "dev": "vda", "bus": "virtio"}
    print(driver.get_config(connection_info, disk_info).to_xml())


if __name__ == "__main__":
    main()
