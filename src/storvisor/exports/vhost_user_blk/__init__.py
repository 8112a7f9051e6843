"""vhost-user-blk export: serves a ``BlockDevice`` to QEMU (or any vhost-user front-end).

Theory of operation
-------------------
:class:`VhostUserBlkServer` listens on a Unix socket and serves one front-end at a time
(others wait in the listen backlog). One control thread reads vhost-user messages, feeds them
to the sans-I/O :class:`~storvisor.protocols.vhost_user.backend.VhostUserBackend` and sends its
replies; it implements that state machine's ``BackendDevice`` interface here: guest memory is
``mmap``-ed from the fds the front-end passes, eventfds are kept per queue, the inflight buffer
is a memfd.

Each running queue has its own worker thread. On a kick it drains the whole avail ring:
pops a chain, runs it with :func:`storvisor.protocols.virtio.blk.execute` (the guest's buffers
are ``memoryview`` s of the mapping, passed straight to ``read_into``/``write``, so data is
never copied in Python), pushes the used entry; then it signals the call eventfd once for the
batch if the driver wants it, and re-arms notifications. Requests of at least
``OFFLOAD_BYTES`` run on a small thread pool shared by the server's queues instead, so large
copies proceed on several cores at once (the data calls release the GIL). The pool thread
that ran a request also completes it: it pushes the used entry and signals the call eventfd
itself, under a per-queue lock that serialises every write to the used ring, so no thread
hand-off lies between the copy and the guest's interrupt; completions may be out of order.
Small requests stay on the queue thread: handing them over costs more than they do.

Parking: once a queue has as many requests on the pool as the pool has threads, the queue
thread stops popping and *parks* the ring: it tells the driver that kicks are not needed
(``VRING_USED_F_NO_NOTIFY``, or ``avail_event`` left behind with EVENT_IDX) and goes back to
sleep. Each pool thread that completes a request of a parked ring pops the next chain (small or
large) and queues it on the pool itself; the one that finds the ring empty re-enables kicks,
re-checks the ring and hands popping back to the queue thread. Under a deep queue of large
requests the queue thread then sleeps and no kick or thread wake-up is spent per request; the
price is that a small request arriving meanwhile waits for a pool thread. ``_ring_lock`` also
serialises pops and the notification state while a pool thread may pop.

Failure model: a malformed message or a hostile memory table drops the connection (the queues
are stopped and memory unmapped; a reconnecting front-end starts afresh). A bad descriptor
chain marks that queue broken (it stops processing, the error eventfd is signalled) while the
connection stays up, as a virtio device in NEEDS_RESET would. Device I/O errors fail one
request with status IOERR. Nothing a front-end sends stops the server or touches other exports.

Reconnect: with INFLIGHT_SHMFD the front-end keeps the inflight buffer across back-end
restarts; a queue started over a used buffer resubmits the requests found in flight.

Live migration: LOG_SHMFD and ``VHOST_F_LOG_ALL`` are offered. While the front-end has
``VHOST_F_LOG_ALL`` set, every completed request marks the guest pages it may have written
(its writable buffers, and the used-ring entry and index when the queue asked for it) in the
shared bitmap, under one lock shared by the queue threads.

Modules: ``server`` (the socket and the control thread), ``device`` (the ``BackendDevice`` of
one connection), ``queues`` (queue threads and the I/O pool), ``peers`` (the links to the
queue processes); a request's buffers move through the device's vectored I/O when it has one
(``exports.vectors``).
"""

from storvisor.exports.vhost_user_blk.device import PROTOCOL_FEATURES, VIRTIO_FEATURES
from storvisor.exports.vhost_user_blk.queues import OFFLOAD_BYTES
from storvisor.exports.vhost_user_blk.server import MAX_QUEUES, VhostUserBlkServer, listen_unix

__all__ = [
    "MAX_QUEUES",
    "OFFLOAD_BYTES",
    "PROTOCOL_FEATURES",
    "VIRTIO_FEATURES",
    "VhostUserBlkServer",
    "listen_unix",
]
