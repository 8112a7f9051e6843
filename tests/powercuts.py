"""Power cuts for tests: the ``storvisor.testing.powercut`` file system mounted in a
subprocess, and loop devices over files on it.

``Mount`` serves a backing directory (the stable storage) at a mount point; ``Mount.cut``
SIGKILLs the file system, which drops every write not yet synced. ``Loop`` attaches a file
(on the mount, for a block device whose write cache is the mount's) to a loop device.
Files that record device paths (the catalog) are reached through a symbolic link, ``point``ed
at the mount during the test and at the backing directory afterwards.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from prereq import require


def _missing_fuse() -> str | None:
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not usable"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (Debian package fuse3)"
    if importlib.util.find_spec("mfusepy") is None:
        return "mfusepy is not installed"
    try:
        import mfusepy  # noqa: F401  (it loads libfuse3 on import)
    except (ImportError, OSError) as e:
        return f"mfusepy cannot load libfuse: {e}"
    return None


def require_fuse() -> None:
    """Skip the test unless a FUSE file system can be mounted here; fail it in CI."""
    missing = _missing_fuse()
    require(missing is None, f"power cuts need FUSE: {missing}")


def require_loop() -> None:
    """Skip the test unless loop devices can be attached here; fail it in CI."""
    require(shutil.which("losetup") is not None, "losetup is not installed (util-linux)")
    found = subprocess.run(["losetup", "--find"], capture_output=True, text=True, check=False)
    require(found.returncode == 0, f"no loop device available: {found.stderr.strip()}")


def mounted(path: Path) -> bool:
    """Whether ``path`` is a mount point, dead FUSE mounts included (``os.path.ismount``
    cannot see those: it stats the mount point, which then fails)."""
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


class Mount:
    """``python -m storvisor.testing.powercut BACKING MOUNTPOINT`` and its mount."""

    def __init__(
        self,
        backing: Path,
        mountpoint: Path,
        *,
        writeback: float = 0.0,
        seed: int = 0,
        cut_at_sync: int | None = None,
    ) -> None:
        self.mountpoint = mountpoint
        args = [
            sys.executable,
            "-m",
            "storvisor.testing.powercut",
            str(backing),
            str(mountpoint),
            f"--writeback={writeback}",
            f"--seed={seed}",
        ]
        if cut_at_sync is not None:
            args.append(f"--cut-at-sync={cut_at_sync}")
        self.stderr = ""
        self.proc = subprocess.Popen(args, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while not mounted(mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise AssertionError(f"the powercut file system did not mount: {self.stderr}")
            time.sleep(0.01)

    def has_cut(self) -> bool:
        """Whether the file system has ended (it cut the power itself)."""
        return self.proc.poll() is not None

    def cut(self) -> None:
        """Cut the power: SIGKILL the file system (unless it cut itself); its unsynced data
        is gone."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def close(self) -> None:
        """Kill the file system if it still runs and remove the mount."""
        if self.proc.poll() is None:
            self.proc.kill()
        _, err = self.proc.communicate(timeout=30)
        self.stderr = err.decode(errors="replace")
        if mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], check=True)


class Loop:
    """A loop device over ``image`` (``losetup --find --show``); ``detach`` lets it go."""

    def __init__(self, image: Path) -> None:
        out = subprocess.run(
            ["losetup", "--find", "--show", str(image)],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            raise AssertionError(f"losetup {image} failed: {out.stderr.strip()}")
        self.device = out.stdout.strip()

    def detach(self) -> None:
        if self.device:
            subprocess.run(["losetup", "-d", self.device], check=False, capture_output=True)
            self.device = ""


def point(link: Path, target: Path) -> None:
    """Make the symbolic link ``link`` point at ``target`` (atomically)."""
    tmp = link.with_name(link.name + ".new")
    tmp.symlink_to(target)
    tmp.replace(link)
