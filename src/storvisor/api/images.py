"""Disk images in and out of volumes with the real ``qemu-img``.

A volume is reached through a temporary NBD export of the daemon (``HOME/nbd.sock``), so
``qemu-img`` sees what any NBD client sees: zeros it need not write on import (the new thin
volume reads as zeros: ``--target-is-zero``), and holes from the ``base:allocation`` block
status on export, so holes stay holes on both sides. Progress comes from ``qemu-img -p``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from storvisor.api.jobs import JobProgress
from storvisor.errors import InvalidArgument, LocalFailure

QEMU_IMG = "qemu-img"
FORMATS = ("raw", "qcow2", "vmdk", "vdi", "vhdx", "qed", "vpc")
"""Formats an image may be written in (any format ``qemu-img`` reads can be imported)."""

_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


def _qemu_img() -> str:
    """``$STORVISOR_QEMU_IMG`` (a declared seam: tests hold a job in flight with a wrapper that
    stops itself before running qemu-img), else qemu-img from ``PATH``."""
    path = os.environ.get("STORVISOR_QEMU_IMG") or shutil.which(QEMU_IMG)
    if path is None:
        raise LocalFailure("qemu-img is not installed (Debian package qemu-utils)")
    return path


def _last_line(text: bytes) -> str:
    lines = [line.strip() for line in text.decode(errors="replace").splitlines() if line.strip()]
    return lines[-1].removeprefix("qemu-img: ") if lines else "no message"


def image_info(path: str, fmt: str | None = None) -> tuple[str, int]:
    """Return ``(format, virtual size)`` of the image at ``path`` (``fmt`` forces the format
    instead of probing it). ``InvalidArgument`` if it is not a readable image."""
    if not Path(path).is_absolute():
        raise InvalidArgument(f"image path must be absolute: {path!r}")
    if not Path(path).exists():
        raise InvalidArgument(f"no such image file: {path}")
    command = [_qemu_img(), "info", "--output=json"]
    if fmt is not None:
        command += ["-f", fmt]
    done = subprocess.run([*command, path], capture_output=True, timeout=60, check=False)
    if done.returncode != 0:
        raise InvalidArgument(f"cannot read image {path}: {_last_line(done.stderr)}")
    info = json.loads(done.stdout)
    return str(info["format"]), int(info["virtual-size"])


def check_output_image(path: str, fmt: str) -> None:
    """Refuse an output path that is relative, exists, or sits in a missing directory, and
    a format ``qemu-img`` cannot write."""
    if fmt not in FORMATS:
        raise InvalidArgument(f"unknown image format {fmt!r}: expected one of {', '.join(FORMATS)}")
    target = Path(path)
    if not target.is_absolute():
        raise InvalidArgument(f"image path must be absolute: {path!r}")
    if target.exists() or target.is_symlink():
        raise InvalidArgument(f"{path} already exists")
    if not target.parent.is_dir():
        raise InvalidArgument(f"directory {target.parent} does not exist")


def convert(arguments: list[str], total: int, progress: JobProgress) -> None:
    """Run ``qemu-img convert -p ARGUMENTS``, reporting its progress as bytes of ``total``;
    a cancelled job terminates it. ``LocalFailure`` with qemu-img's message if it fails."""
    progress.update(0, total)
    proc = subprocess.Popen(
        [_qemu_img(), "convert", "-p", *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    progress.on_cancel(proc.kill)  # also ends a stopped process; its output is dropped
    try:
        assert proc.stdout is not None and proc.stderr is not None
        pending = b""
        while chunk := os.read(proc.stdout.fileno(), 4096):
            pending += chunk
            marks = _PROGRESS.findall(pending)
            if marks:
                progress.update(min(total, int(float(marks[-1]) / 100 * total)))
            pending = pending[-32:]  # enough for a mark cut in two
        errors = proc.stderr.read()
        code = proc.wait()
    finally:
        progress.on_cancel(None)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    progress.check()
    if code != 0:
        raise LocalFailure(f"qemu-img convert failed: {_last_line(errors)}")
    progress.update(total)
