"""The one exception root of storvisor, split by what the caller must do next.

::

    StorvisorError
     ├── ProtocolError          the peer broke the protocol: close that connection only
     ├── IOFailure              one request failed; carries an errno for the wire
     │    └── NoSpace           the pool ran out of clusters (ENOSPC)
     ├── NotFound               a named pool, volume, snapshot or export does not exist
     ├── Conflict               the name exists, the object is in use, or the state forbids it
     ├── InvalidArgument        a malformed size, name or option from a user or API call
     └── CorruptMetadata        on-disk state is inconsistent; stop using the pool

The engine raises only these (never HTTP codes or wire errors). Exports translate
``IOFailure.errno`` to their protocol's error; the API and CLI map ``NotFound``, ``Conflict``
and ``InvalidArgument`` to their own errors. Foreign exceptions (``OSError``,
``sqlite3.Error``) are translated at the boundary where they arise, with ``raise ... from``.
"""

from __future__ import annotations

import errno as _errno


class StorvisorError(Exception):
    """Root of every error storvisor raises on purpose. ``str(e)`` is one line for a user."""


class ProtocolError(StorvisorError):
    """The remote peer violated the protocol; the connection must be closed.

    Protocol codecs raise only this (or a subclass) on bad input, whatever the bytes.
    """


class IOFailure(StorvisorError):
    """One I/O request failed; other requests and the connection carry on.

    ``errno`` is what goes on the wire (NBD error, virtio-blk IOERR/UNSUPP choice).
    """

    def __init__(self, message: str, errno: int = _errno.EIO) -> None:
        super().__init__(message)
        self.errno = errno


class NoSpace(IOFailure):
    """The pool has no free cluster for an allocating write."""

    def __init__(self, message: str = "pool is out of space") -> None:
        super().__init__(message, _errno.ENOSPC)


class NotFound(StorvisorError):
    """A named object (pool, volume, snapshot, export) does not exist."""


class Conflict(StorvisorError):
    """The request clashes with current state: duplicate name, object busy or depended on."""


class InvalidArgument(StorvisorError):
    """A malformed or out-of-range argument from a user or API call."""


class CorruptMetadata(StorvisorError):
    """Metadata on disk is inconsistent; the pool must not be written until fsck clears it."""
