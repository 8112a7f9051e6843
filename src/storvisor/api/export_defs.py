"""Export definitions: what is exported, under which name and how, and their persistence in
``HOME/exports.json`` (written to a temporary file, fsynced and renamed over the old one, so a
crash leaves either the old or the new list).

These records are all a client of the API needs; the servers that run the definitions are in
``storvisor.api.exports``.
"""

from __future__ import annotations

import enum
import json
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

from storvisor.api.codec import decode_list, encode, save_text
from storvisor.errors import CorruptMetadata, InvalidArgument, ProtocolError

EXPORTS_FILE = "exports.json"

_EXPORT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@/:+-]{0,127}$")


class ExportKind(enum.StrEnum):
    NBD = "nbd"
    VHOST_USER_BLK = "vhost-user-blk"
    SCSI = "scsi"  # a tcm_loop LUN: /dev/sdX on this host
    VHOST_SCSI = "vhost-scsi"  # a LUN of a LIO vhost target


SCSI_KINDS = (ExportKind.SCSI, ExportKind.VHOST_SCSI)
"""The kinds exported through LIO."""


class ExportState(enum.StrEnum):
    ACTIVE = "active"  # served by the running daemon
    INACTIVE = "inactive"  # recorded; the daemon is not running and starts it next time
    BROKEN = "broken"  # the daemon could not start it (see ExportInfo.message)


@dataclass(frozen=True, slots=True)
class ExportSpec:
    """A persisted export definition.

    ``socket`` is the vhost-user socket path (absolute) and ``queues`` its queue count; both
    are unused for NBD. A snapshot (``snapshot`` set) is always exported read-only.
    ``wwpn`` and ``lun`` place a vhost-scsi export; ``device`` is the host block device of a
    vhost-scsi export of no volume (``pool`` and ``volume`` are then empty).
    """

    name: str
    kind: ExportKind
    pool: str
    volume: str
    snapshot: str | None = None
    read_only: bool = False
    socket: str | None = None
    queues: int = 1
    wwpn: str | None = None
    lun: int | None = None
    device: str | None = None

    @property
    def target(self) -> str:
        """``POOL/VOL``, ``POOL/VOL@SNAP`` or the host block device."""
        if self.device is not None:
            return self.device
        ref = f"{self.pool}/{self.volume}"
        return f"{ref}@{self.snapshot}" if self.snapshot else ref


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """An export definition with its current state and how to connect to it.

    ``uris`` lists the NBD URIs (Unix socket first, then TCP when listening) or, for
    vhost-user-blk, the socket path; for scsi, the ``/dev/sdX`` and ``/dev/disk/by-id``
    paths while it is active; for vhost-scsi, the WWPN. ``message`` explains an
    ``inactive`` or ``broken`` state.
    """

    spec: ExportSpec
    state: ExportState
    uris: tuple[str, ...]
    message: str = ""


def check_export_name(name: str) -> str:
    """Return ``name`` if it is a valid export name, else raise ``InvalidArgument``."""
    if not _EXPORT_NAME_RE.match(name):
        raise InvalidArgument(
            f"invalid export name {name!r}: use letters, digits and . _ @ / : + - "
            "(up to 128, starting with a letter or digit)"
        )
    return name


class ExportStore:
    """The export definitions of one HOME, in ``HOME/exports.json``.

    Not thread-safe: the service serialises calls. ``save`` is atomic and durable. Each
    definition is rendered once (``save`` runs at every export change, over all of them).
    """

    def __init__(self, home: Path) -> None:
        self._path = home / EXPORTS_FILE
        self._rendered: dict[ExportSpec, str] = {}

    def load(self) -> list[ExportSpec]:
        """Read the definitions; none when the file does not exist.

        Raises ``CorruptMetadata`` if the file cannot be parsed.
        """
        try:
            text = self._path.read_text()
        except FileNotFoundError:
            return []
        try:
            doc = json.loads(text)
            return decode_list(ExportSpec, doc["exports"])
        except (ValueError, KeyError, TypeError, ProtocolError) as e:
            raise CorruptMetadata(f"{self._path}: unreadable export definitions: {e}") from e

    def save(self, specs: list[ExportSpec]) -> None:
        """Replace the definitions atomically (temporary file, fsync, rename, fsync of HOME).
        The file is ``{"version": 1, "exports": [...]}``, indented as ``save_json`` does."""
        rendered = {spec: self._rendered.get(spec) or _render(spec) for spec in specs}
        items = ",\n".join(rendered[spec] for spec in specs)
        body = f"[\n{items}\n  ]" if specs else "[]"
        save_text(self._path, f'{{\n  "version": 1,\n  "exports": {body}\n}}\n')
        self._rendered = rendered


def _render(spec: ExportSpec) -> str:
    """One definition as an item of the indented ``exports`` list."""
    return textwrap.indent(json.dumps(encode(spec), indent=2), "    ")


@dataclass(frozen=True, slots=True)
class TcpAddress:
    host: str
    port: int


def parse_tcp_address(text: str) -> TcpAddress:
    """Parse ``[HOST:]PORT`` (``HOST`` defaults to 127.0.0.1; ``[::1]:PORT`` for IPv6)."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host = "127.0.0.1"
    host = host.strip("[]") or "127.0.0.1"
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise InvalidArgument(f"invalid TCP address {text!r}: expected [HOST:]PORT")
    return TcpAddress(host, int(port_text))
