"""Signatures a device already carries, found by util-linux's low-level probe.

Before a device or an existing file joins a pool, ``find_signature`` asks ``blkid -p`` (the
libblkid low-level probe: it reads the device itself, never the blkid cache) what it holds:
a file system, a partition table, swap, an LVM physical volume, a RAID member, an encrypted
volume. Anything found stops the caller unless it was told to overwrite (``force``); then
``wipe_signatures`` erases every signature with ``wipefs --all`` so that none survives
elsewhere on the device (a GPT backup at its end, an MD superblock near its end).

``blkid -p`` exits 0 when it found something, 2 when it found nothing, and 8 when the
result is ambivalent (several signatures): storvisor treats that as "found".
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

from storvisor.errors import IOFailure, LocalFailure

BLKID = "blkid"
WIPEFS = "wipefs"
_TIMEOUT = 60.0

_USAGES = {
    "filesystem": "file system",
    "raid": "RAID member",
    "crypto": "encrypted volume",
}
_TYPES = {
    "swap": "a swap area",
    "LVM2_member": "an LVM physical volume",
    "LVM1_member": "an LVM physical volume",
    "linux_raid_member": "a Linux RAID (md) member",
    "zfs_member": "a ZFS pool member",
    "crypto_LUKS": "a LUKS encrypted volume",
}


class ProbeUnavailable(LocalFailure):
    """The probe tool (util-linux's ``blkid`` or ``wipefs``) is not installed or failed."""


@dataclass(frozen=True, slots=True)
class Signature:
    """What the probe found: ``type`` (``TYPE``, e.g. ``ext4``), ``pttype`` (``PTTYPE``, a
    partition table, e.g. ``gpt``) and ``usage`` (``USAGE``, e.g. ``filesystem``); empty
    strings for the keys it did not report."""

    type: str = ""
    pttype: str = ""
    usage: str = ""

    def describe(self) -> str:
        """``an ext4 file system``, ``a gpt partition table``, ``a swap area``..."""
        if self.type in _TYPES:
            return _TYPES[self.type]
        if self.type:
            kind = _USAGES.get(self.usage, "signature")
            return f"{_article(self.type)} {self.type} {kind}"
        if self.pttype:
            return f"{_article(self.pttype)} {self.pttype} partition table"
        return "an unidentified signature"


def parse_export(text: str) -> Signature:
    """The ``Signature`` in ``blkid -o export`` output (``KEY=value`` lines)."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, eq, value = line.partition("=")
        if eq:
            values[key.strip()] = value.strip()
    return Signature(values.get("TYPE", ""), values.get("PTTYPE", ""), values.get("USAGE", ""))


def find_signature(path: str) -> Signature | None:
    """The signature ``path`` carries, or None if the probe finds none.

    Raises ``ProbeUnavailable`` if ``blkid`` is missing or fails in an unexpected way, and
    ``IOFailure`` if it cannot read the device."""
    result = _run([BLKID, "-p", "-o", "export", path])
    if result.returncode == 2:
        return None
    if result.returncode == 8:  # ambivalent: several signatures
        found = parse_export(result.stdout)
        return found if found != Signature() else Signature(usage="ambivalent")
    if result.returncode != 0:
        message = result.stderr.strip() or f"exit status {result.returncode}"
        raise IOFailure(f"cannot probe {path} for signatures: {message}")
    return parse_export(result.stdout)


def wipe_signatures(path: str) -> None:
    """Erase every signature ``wipefs`` knows on ``path``. Raises ``ProbeUnavailable`` if
    ``wipefs`` is missing, ``IOFailure`` if it fails."""
    result = _run([WIPEFS, "--all", "--quiet", path])
    if result.returncode != 0:
        message = result.stderr.strip() or f"exit status {result.returncode}"
        raise IOFailure(f"cannot erase the signatures of {path}: {message}")


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    tool = shutil.which(argv[0]) or shutil.which(argv[0], path="/usr/sbin:/sbin")
    if tool is None:
        raise ProbeUnavailable(
            f"{argv[0]} (from util-linux) is not installed: it is needed to check that a "
            "device holds no data before storvisor writes on it"
        )
    try:
        return subprocess.run(
            [tool, *argv[1:]],
            capture_output=True,
            text=True,
            timeout=_TIMEOUT,
            check=False,
            env={"LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ProbeUnavailable(f"{argv[0]} failed: {e}") from e


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"
