"""The one exception root of storvisor, split by what the caller must do next.

::

    StorvisorError
     ├── ProtocolError          the remote peer broke its protocol: close that connection only
     ├── QueueBroken            one virtqueue is unusable: stop serving it, signal its error
     │    │                     fd; the connection and the other queues carry on
     │    ├── RingError         (protocols.virtio.ring) a chain broke a split-ring rule
     │    └── GuestMemoryError  (protocols.virtio.memory) an address outside guest memory
     ├── LocalFailure           storvisor's own side failed (a link between its processes, a
     │    │                     local resource): stop what it carried; no peer is to blame
     │    ├── DaemonUnavailable (api.client) the daemon's API socket does not answer
     │    └── UntrustedDaemon   (api.client) the daemon's TLS certificate is not trusted
     ├── IOFailure              one request failed; carries an errno for the wire
     │    ├── NoSpace           the pool ran out of clusters (ENOSPC)
     │    └── Unavailable       a remote store (S3) did not answer: nothing was lost, and the
     │                          same operation can be retried as is
     ├── NotFound               a named pool, volume, snapshot or export does not exist
     ├── Conflict               the name exists, or the object is in use or depended on
     │    └── HomeInUse         (engine.home) another process holds the HOME lock
     ├── InvalidArgument        a malformed size, name or option from a user or API call
     ├── StateError             a call made in the wrong state (closed, started twice, out of
     │                          order): a bug of the caller; nothing was changed
     ├── CorruptMetadata        on-disk state is inconsistent; stop using the pool
     └── AccessDenied           (api.client) the API on TCP refused the token (401, 403)

The engine raises only these (never HTTP codes or wire errors). Exports translate
``IOFailure.errno`` to their protocol's error. The API answers ``NotFound`` 404, ``Conflict``
409, ``InvalidArgument`` 400, ``NoSpace`` 507 and everything else 500 (on TCP also 401 and
403 for tokens, which the client raises as ``AccessDenied``), always with the class
name (``storvisor.api.server``); the CLI prints one line for each and exits with status 1.
Foreign exceptions (``OSError``, ``sqlite3.Error``) are translated at the boundary where they
arise, with ``raise ... from``.
"""

from __future__ import annotations

import errno as _errno


class StorvisorError(Exception):
    """Root of every error storvisor raises on purpose. ``str(e)`` is one line for a user."""


class ProtocolError(StorvisorError):
    """The remote peer (an NBD client, a vhost-user front-end, an API client) violated the
    protocol; the caller closes that connection and nothing else.

    Protocol codecs raise only this (or a subclass) on bad input, whatever the bytes. A
    failure of storvisor's own side (a local socket, a link to one of its processes) is never
    a ``ProtocolError``: see ``LocalFailure``.
    """


class QueueBroken(StorvisorError):
    """One virtqueue cannot be served any more (the driver broke a ring rule, or a request
    failed in a way the queue cannot report). The caller stops serving that queue and
    signals its error eventfd; the connection and the other queues carry on, and the
    front-end may reset the queue (GET_VRING_BASE, then start it again)."""


class LocalFailure(StorvisorError):
    """storvisor's own side failed: a link between its processes (a data-plane channel, a
    queue process, the daemon's API socket) broke or carried a malformed frame, or a local
    resource (a memfd) could not be had. The caller stops what that link or resource carried
    (a data plane exits, a front-end connection ends, a command fails) and logs it as a fault
    of this host; there is no remote peer to blame and no errno for a request."""


class IOFailure(StorvisorError):
    """One I/O request failed; other requests and the connection carry on.

    ``errno`` is what goes on the wire (NBD error, virtio-blk IOERR/UNSUPP choice).
    """

    def __init__(self, message: str, errno: int = _errno.EIO) -> None:
        super().__init__(message)
        self.errno = errno


class Unavailable(IOFailure):
    """A remote store did not answer in time (every S3 endpoint of a pool was down): nothing
    was lost and the same operation can be retried as is, unlike a failed sync of a local
    device, whose page cache may have dropped what it could not write."""


class NoSpace(IOFailure):
    """The pool has no free cluster for an allocating write (the request fails with
    ENOSPC; freeing or adding space lets the next one succeed)."""

    def __init__(self, message: str = "pool is out of space") -> None:
        super().__init__(message, _errno.ENOSPC)


class NotFound(StorvisorError):
    """A named object (pool, volume, snapshot, export) does not exist; nothing was changed."""


class Conflict(StorvisorError):
    """The request clashes with what exists: a duplicate name, an object in use or depended
    on (open, exported, with clones), a device that belongs to a pool. Nothing was changed;
    the same call may succeed once the other user is gone."""


class InvalidArgument(StorvisorError):
    """A malformed or out-of-range argument from a user or API call; nothing was changed."""


class StateError(StorvisorError):
    """The object cannot take this call in its current state: it is closed, already
    started, or the call came out of order. This is a bug of the caller, never of the user's
    input; nothing was changed and retrying the same call cannot succeed.

    I/O on a closed volume handle is the exception: it is an ``IOFailure`` (EBADF), so the
    requests still in flight while an export stops fail one by one on the wire."""


class CorruptMetadata(StorvisorError):
    """Metadata on disk is inconsistent; the pool must not be written until fsck clears it."""
