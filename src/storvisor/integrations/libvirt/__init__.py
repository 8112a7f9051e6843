"""libvirt domain XML for storvisor volumes.

``vhost_user_disk_xml`` is the one call the CLI needs (``storvisor libvirt-xml POOL/VOL``); the
element builders are there for code that assembles its own domain.
"""

from storvisor.integrations.libvirt.vhostuser import (
    VhostUserDisk,
    disk_element,
    domain_xml,
    memory_backing_element,
    to_text,
    vhost_user_disk_xml,
)

__all__ = [
    "VhostUserDisk",
    "disk_element",
    "domain_xml",
    "memory_backing_element",
    "to_text",
    "vhost_user_disk_xml",
]
