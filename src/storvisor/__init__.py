"""storvisor: a storage hypervisor for KVM hosts.

Layers, lowest first (a lower layer never imports a higher one)::

    engine/        pools, backing devices, thin maps, snapshots, clones, fsck
    protocols/     sans-I/O codecs and state machines: nbd, vhost_user, virtio
    exports/       servers binding a protocol to a volume handle
    integrations/  libvirt, openstack, lio
    api/ cli/      management

Library code only logs through ``logging.getLogger(__name__)``; the CLI and the daemon entry
point are the only places that configure handlers.
"""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
