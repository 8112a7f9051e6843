"""The options of one storvisor back-end and the management client they open.

``BackendOptions`` holds what a deployment configures (``docs/openstack.md``): where the
daemon's API is (``unix:///PATH`` for the local socket, ``https://HOST:PORT`` for the remote
API with a bearer token read from ``token_file`` and a server certificate checked against
``ca_file`` or pinned by its SHA-256 ``fingerprint``), the pool volumes are made in, and the
export kind attachments get. ``open_client`` turns them into a ``Management`` client.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from storvisor.api.client import Client
from storvisor.api.service import Management
from storvisor.errors import InvalidArgument


class ExportKind(enum.StrEnum):
    """How an attached volume is served: NBD (a URI), vhost-user-blk (a Unix socket), or a
    local SCSI LUN (a host block device, ``storvisor export scsi``: the daemon must run on
    the compute host)."""

    NBD = "nbd"
    VHOST_USER_BLK = "vhost-user-blk"
    SCSI = "scsi"


@dataclass(frozen=True, slots=True)
class BackendOptions:
    """One back-end's configuration. ``timeout`` bounds each API request (seconds)."""

    api_url: str
    pool: str
    export_kind: ExportKind = ExportKind.NBD
    token_file: str | None = None
    ca_file: str | None = None
    fingerprint: str | None = None
    vhost_socket_dir: str = "/run/storvisor"
    timeout: float | None = 600.0

    @property
    def local(self) -> bool:
        """Whether the API (and so the NBD socket it names) is on this host."""
        return self.api_url.startswith("unix://")


def unix_socket_path(url: str) -> str:
    """The path of a ``unix:///PATH`` URL; ``InvalidArgument`` if it is not one."""
    parts = urlsplit(url)
    if parts.scheme != "unix" or parts.netloc or not parts.path.startswith("/"):
        raise InvalidArgument(
            f"invalid API URL {url!r}: expected unix:///PATH or https://HOST:PORT"
        )
    return parts.path


def read_token(path: str) -> str:
    """The token in ``path`` (surrounding whitespace dropped); ``InvalidArgument`` if the file
    cannot be read or is empty."""
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise InvalidArgument(f"cannot read the API token file {path}: {e.strerror}") from None
    if not token:
        raise InvalidArgument(f"the API token file {path} is empty")
    return token


def open_client(options: BackendOptions) -> Management:
    """A client of the daemon ``options`` name. Raises ``InvalidArgument`` for a malformed URL,
    a missing token file, or a remote URL where this storvisor has no remote API client."""
    if options.local:
        return Client(unix_socket_path(options.api_url), timeout=options.timeout)
    scheme = urlsplit(options.api_url).scheme
    if scheme != "https":
        raise InvalidArgument(
            f"invalid API URL {options.api_url!r}: expected unix:///PATH or https://HOST:PORT"
        )
    if options.token_file is None:
        raise InvalidArgument("a remote API URL needs a token file (storvisor_token_file)")
    if options.ca_file is not None and options.fingerprint is not None:
        raise InvalidArgument("give a CA file or a certificate fingerprint, not both")
    token = read_token(options.token_file)
    return Client.remote(
        options.api_url,
        token,
        ca_file=Path(options.ca_file) if options.ca_file is not None else None,
        fingerprint=options.fingerprint,
        timeout=options.timeout,
    )
