"""libvirt domain XML for storvisor volumes.

``vhost_user_disk_xml`` is what ``storvisor libvirt-xml POOL/VOL`` prints for a vhost-user-blk
export; ``scsi.plan`` and ``scsi.attachment_text`` what it prints with ``--scsi lun|vhost``
(a LUN disk on a virtio-scsi controller, or a vhost-scsi hostdev). The element builders are
there for code that assembles its own domain.
"""

from storvisor.integrations.libvirt.scsi import (
    DomainDevices,
    DriveAddress,
    ScsiAttachment,
    ScsiMode,
    attachment_text,
    plan,
    plan_lun,
    plan_vhost,
)
from storvisor.integrations.libvirt.vhostuser import (
    VhostUserDisk,
    disk_element,
    domain_xml,
    memory_backing_element,
    to_text,
    vhost_user_disk_xml,
)

__all__ = [
    "DomainDevices",
    "DriveAddress",
    "ScsiAttachment",
    "ScsiMode",
    "VhostUserDisk",
    "attachment_text",
    "disk_element",
    "domain_xml",
    "memory_backing_element",
    "plan",
    "plan_lun",
    "plan_vhost",
    "to_text",
    "vhost_user_disk_xml",
]
