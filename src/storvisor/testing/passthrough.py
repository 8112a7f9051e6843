"""The FUSE operations of a file system that mirrors a backing directory, for the test file
systems built on it (``faultfs``: faults on demand; ``powercut``: a volatile write cache).

``PassthroughFS`` carries every operation straight to the backing directory, in the form
``mfusepy.FUSE`` calls them (paths relative to the mount, starting with ``/``; errors raised
as ``OSError`` with an errno; times in nanoseconds). File content goes through one
descriptor per file, opened read-write on first use and kept until the file is unlinked,
replaced by a rename or the file system is unmounted; a rename carries it to the new name.
The table of descriptors is guarded by a lock, so a multi-threaded mount may use it.
Subclasses override what they change and call back here for the rest.
"""

from __future__ import annotations

import errno
import os
import threading
from typing import TypeVar

_V = TypeVar("_V")

_STAT_FIELDS = (
    "st_mode",
    "st_ino",
    "st_nlink",
    "st_uid",
    "st_gid",
    "st_size",
    "st_blocks",
    "st_atime_ns",
    "st_mtime_ns",
    "st_ctime_ns",
)


def move_under(table: dict[str, _V], old: str, new: str) -> None:
    """Rename the keys of ``table`` that are ``old`` or below it to ``new``."""
    for key in [k for k in table if k == old or k.startswith(old + "/")]:
        table[new + key[len(old) :]] = table.pop(key)


class PassthroughFS:
    """Every operation carried to the backing directory ``backing`` (see the module
    docstring)."""

    use_ns = True

    def __init__(self, backing: str) -> None:
        self.backing = os.path.realpath(backing)
        self.fds: dict[str, int] = {}
        """Path -> the backing file's descriptor, opened on first use."""
        self._fd_lock = threading.Lock()

    def _real(self, path: str | None) -> str:
        if path is None:
            raise OSError(errno.EBADF, "no path")
        return self.backing + path

    def _fd(self, path: str | None) -> int:
        """The descriptor of the backing file of ``path``, opened read-write on first use."""
        if path is None:
            raise OSError(errno.EBADF, "no path")
        with self._fd_lock:
            fd = self.fds.get(path)
            if fd is None:
                fd = os.open(self._real(path), os.O_RDWR | os.O_CLOEXEC)
                self.fds[path] = fd
            return fd

    def _forget(self, path: str) -> None:
        """Close the descriptors of ``path`` and of everything under it."""
        with self._fd_lock:
            for key in [k for k in self.fds if k == path or k.startswith(path + "/")]:
                os.close(self.fds.pop(key))

    def _moved(self, old: str, new: str) -> None:
        """``old`` (and what is under it) was renamed to ``new``, which it replaced."""
        self._forget(new)
        with self._fd_lock:
            move_under(self.fds, old, new)

    # -- attributes and directories

    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, int]:
        st = os.lstat(self._real(path))
        return {name.replace("_ns", ""): getattr(st, name) for name in _STAT_FIELDS}

    def access(self, path: str, amode: int) -> int:
        if not os.access(self._real(path), amode):
            raise OSError(errno.EACCES, path)
        return 0

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._real(path))]

    def readlink(self, path: str) -> str:
        return os.readlink(self._real(path))

    def statfs(self, path: str) -> dict[str, int]:
        st = os.statvfs(self._real(path))
        names = ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree")
        return {name: getattr(st, name) for name in (*names, "f_favail", "f_namemax")}

    def chmod(self, path: str | None, mode: int) -> int:
        os.chmod(self._real(path), mode)
        return 0

    def chown(self, path: str | None, uid: int, gid: int) -> int:
        os.lchown(self._real(path), uid, gid)
        return 0

    def utimens(self, path: str | None, times: tuple[int, int] | None = None) -> int:
        if times is None:
            os.utime(self._real(path), follow_symlinks=False)
        else:
            os.utime(self._real(path), ns=times, follow_symlinks=False)
        return 0

    # -- namespace

    def mkdir(self, path: str, mode: int) -> int:
        os.mkdir(self._real(path), mode)
        return 0

    def rmdir(self, path: str) -> int:
        os.rmdir(self._real(path))
        self._forget(path)
        return 0

    def symlink(self, target: str, source: str) -> int:
        os.symlink(source, self._real(target))
        return 0

    def unlink(self, path: str) -> int:
        os.unlink(self._real(path))
        self._forget(path)
        return 0

    def rename(self, old: str, new: str) -> int:
        os.rename(self._real(old), self._real(new))
        self._moved(old, new)
        return 0

    def create(self, path: str, mode: int, flags: int = 0) -> int:
        os.close(os.open(self._real(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode))
        return 0

    # -- file content

    def open(self, path: str, flags: int) -> int:
        self._fd(path)
        return 0

    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        return os.pread(self._fd(path), size, offset)

    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        return os.pwrite(self._fd(path), data, offset)

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        os.truncate(self._real(path), length)
        return 0

    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        os.fdatasync(self._fd(path))
        return 0

    def destroy(self, path: str | None) -> None:
        """On unmount: close every descriptor."""
        with self._fd_lock:
            for fd in self.fds.values():
                os.close(fd)
            self.fds.clear()
