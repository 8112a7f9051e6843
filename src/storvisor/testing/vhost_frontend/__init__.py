"""A vhost-user front-end in Python (the role QEMU plays), to drive a vhost-user-blk back-end.

It shares memfd "guest memory" (one or several regions, any guest-physical base and
``mmap_offset``), negotiates features, lays out split rings and submits virtio-blk requests
of every type: data split over several descriptors, indirect tables, buffers that straddle
two regions. It also sends deliberately broken things (raw messages, bad descriptors),
can reconnect to a restarted back-end with the inflight buffer it kept, as QEMU does, and
can turn on dirty-page logging and read the bitmap back (``start_logging``,
``dirty_pages``). :class:`FrontendBlockDevice` wraps a front-end as a ``BlockDevice`` so the
conformance suite runs through an export.

Typical use::

    with VhostUserFrontend(sock) as fe:
        fe.setup()
        assert fe.blk.write(0, b"x" * 4096) == Status.OK
        status, data = fe.blk.read(0, 4096)

Addresses: descriptor buffers are guest-physical; ring addresses sent with SET_VRING_ADDR are
"user addresses" of the front-end, here a fake address space (``USER_BASE`` + region offset)
deliberately different from guest-physical so a back-end that mixes them up fails.
All waits are bounded (``timeout``) and raise ``TimeoutError``.
"""

from storvisor.testing.vhost_frontend.blk_driver import BlkDriver
from storvisor.testing.vhost_frontend.block_device import FrontendBlockDevice
from storvisor.testing.vhost_frontend.driver_ring import DriverQueue, Segment
from storvisor.testing.vhost_frontend.frontend import VhostUserFrontend
from storvisor.testing.vhost_frontend.guest_memory import USER_BASE, GuestRam, RegionSpec

__all__ = [
    "USER_BASE",
    "BlkDriver",
    "DriverQueue",
    "FrontendBlockDevice",
    "GuestRam",
    "RegionSpec",
    "Segment",
    "VhostUserFrontend",
]
