"""A FUSE file system that injects disk faults, for tests of failing backing devices.

Theory of operation
-------------------
``FaultFS`` mirrors a *backing* directory: every operation goes straight to the backing file
(``pread``, ``pwrite``, ``fdatasync``), so the mount behaves like a plain local file system
until a fault is switched on. It is mounted with ``direct_io``: the kernel keeps no page
cache for its files, so every read and write of a client reaches the file system (and its
faults) and ``fsync``/``fdatasync`` arrive as ``FUSE_FSYNC``.

Faults are *rules*, switched at run time through the control file ``/.faults`` at the root
of the mount (it is not in the backing directory). Writing it replaces every rule with the
lines written, one rule a line::

    OP ACTION START END [SECONDS]

* ``OP``: ``read``, ``write`` or ``sync`` (an ``fsync`` or ``fdatasync`` of a file);
* ``ACTION``: ``eio`` or ``enospc`` (the operation fails with that errno and does nothing),
  ``stall`` (the operation waits ``SECONDS``, or until the rules change, then is carried
  out), or, for ``read`` only, ``short`` (the read returns the bytes before ``START`` and
  nothing after: a file system that died mid-read gives back the pages before the failing
  one, a short read and no error);
* ``START`` and ``END``: the byte range ``[START, END)`` of a file the rule covers (``-`` for
  END: up to any offset). A read or write that overlaps the range is affected; a sync is
  affected by any rule for ``sync`` whatever its range.

A sync that a rule fails loses data, as Linux does: the kernel drops the dirty pages it
could not write back and marks them clean, so the device keeps its old content and the next
``fsync`` succeeds ("fsyncgate"). The file system remembers, per file, the content every
page written since the file's last successful sync had at that sync; a failed sync writes
those pages back to the backing file, so reads see the old data from then on, and forgets
them. A stalled sync that then completes loses nothing.

Writing nothing (truncating the file) clears every rule and releases every stalled
operation. Reading ``/.faults`` returns a JSON object: ``rules`` (as written) and ``hits``,
the number of operations each ``OP`` had faulted (failed or stalled) since the mount.

The file system is multi-threaded, so that the control file answers while operations stall.
The kernel still serialises some of them: FUSE holds a file's inode lock during a direct
write and during an ``fsync``, so a stalled sync holds up the writes to that file, and a
stalled write holds up its syncs (reads go on).

The program::

    python -m storvisor.testing.faultfs BACKING MOUNTPOINT

mounts the file system in the foreground and serves it until it is unmounted or killed.
``FaultMount`` runs it in a subprocess and switches its faults.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from storvisor.testing.passthrough import PassthroughFS

PAGE = 4096
"""Granularity at which a failed sync loses unsynced writes."""
CONTROL = "/.faults"
"""The control file, at the root of the mount."""

OPS = ("read", "write", "sync")
ACTIONS = {"eio": errno.EIO, "enospc": errno.ENOSPC, "stall": 0, "short": 0}


@dataclass(frozen=True, slots=True)
class Fault:
    """One rule: ``op`` (read, write, sync) over ``[start, end)`` (``end`` None: no end)
    fails with ``action``'s errno (eio, enospc) or stalls ``seconds`` (stall)."""

    op: str
    action: str
    start: int = 0
    end: int | None = None
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.op not in OPS or self.action not in ACTIONS:
            raise ValueError(f"bad fault {self.op!r} {self.action!r}")
        if self.action == "short" and self.op != "read":
            raise ValueError(f"only a read can be cut short, not a {self.op}")

    def line(self) -> str:
        end = "-" if self.end is None else str(self.end)
        return f"{self.op} {self.action} {self.start} {end} {self.seconds}"

    @classmethod
    def parse(cls, line: str) -> Fault:
        """Raises ``ValueError`` for a malformed line."""
        fields = line.split()
        if len(fields) not in (4, 5):
            raise ValueError(f"bad fault line {line!r}")
        op, action, start, end = fields[:4]
        seconds = float(fields[4]) if len(fields) == 5 else 0.0
        return cls(op, action, int(start), None if end == "-" else int(end), seconds)

    def covers(self, op: str, offset: int, length: int) -> bool:
        if op != self.op:
            return False
        if op == "sync":
            return True
        return offset + length > self.start and (self.end is None or offset < self.end)


class FaultFS(PassthroughFS):
    """The file-system operations, in the form ``mfusepy.FUSE`` calls them: those of
    ``PassthroughFS``, with the control file and the faults. Thread-safe."""

    def __init__(self, backing: str) -> None:
        super().__init__(backing)
        self._cond = threading.Condition()
        self._rules: tuple[Fault, ...] = ()
        self._generation = 0  # bumped whenever the rules change: releases stalls
        self._hits = dict.fromkeys(OPS, 0)
        self._control = b""
        self._unsynced: dict[str, dict[int, bytes]] = {}
        """Path -> page index -> that page's content at the file's last successful sync."""
        self._unsynced_lock = threading.Lock()

    # -- faults

    def set_rules(self, text: str) -> None:
        """Replace the rules with the lines of ``text``. Raises ``OSError(EINVAL)``."""
        try:
            rules = tuple(Fault.parse(line) for line in text.splitlines() if line.strip())
        except ValueError as e:
            raise OSError(errno.EINVAL, str(e)) from e
        with self._cond:
            self._rules = rules
            self._generation += 1
            self._cond.notify_all()

    def _fault(
        self, op: str, offset: int = 0, length: int = 0, path: str | None = None
    ) -> int | None:
        """Apply the first rule covering the operation: raise its errno (a sync of ``path``
        loses its unsynced pages first), or stall; for ``short``, the offset at which the
        read must end (None: the whole read)."""
        with self._cond:
            rule = next((r for r in self._rules if r.covers(op, offset, length)), None)
            if rule is None:
                return None
            self._hits[op] += 1
            if rule.action == "short":
                return rule.start
            if rule.action != "stall":
                if op == "sync" and path is not None:
                    self._lose_unsynced(path)
                raise OSError(ACTIONS[rule.action], os.strerror(ACTIONS[rule.action]))
            generation = self._generation
            deadline = time.monotonic() + rule.seconds
            while self._generation == generation:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
        return None

    def _remember(self, path: str, fd: int, offset: int, length: int) -> None:
        """Keep the synced content of the pages a write of ``[offset, offset + length)`` is
        about to change."""
        with self._unsynced_lock:
            pages = self._unsynced.setdefault(path, {})
            for index in range(offset // PAGE, (offset + length + PAGE - 1) // PAGE):
                if index not in pages:
                    pages[index] = os.pread(fd, PAGE, index * PAGE)

    def _lose_unsynced(self, path: str) -> None:
        """A failed sync: the pages written since the last sync go back to their content
        then."""
        fd = self._fd(path)
        with self._unsynced_lock:
            pages = self._unsynced.pop(path, {})
            for index, content in pages.items():
                os.pwrite(fd, content, index * PAGE)

    def _report(self) -> bytes:
        with self._cond:
            rules = [r.line() for r in self._rules]
            return json.dumps({"rules": rules, "hits": self._hits}).encode()

    # -- attributes (the control file's own), the rest passed through

    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, int]:
        if path == CONTROL:
            now = time.time_ns()
            size = len(self._report())
            return {
                "st_mode": stat.S_IFREG | 0o600,
                "st_nlink": 1,
                "st_uid": os.getuid(),
                "st_gid": os.getgid(),
                "st_size": size,
                "st_atime": now,
                "st_mtime": now,
                "st_ctime": now,
            }
        return super().getattr(path, fh)

    def access(self, path: str, amode: int) -> int:
        if path == CONTROL:
            return 0
        return super().access(path, amode)

    def utimens(self, path: str | None, times: tuple[int, int] | None = None) -> int:
        if path == CONTROL:
            return 0
        return super().utimens(path, times)

    def unlink(self, path: str) -> int:
        super().unlink(path)
        with self._unsynced_lock:
            self._unsynced.pop(path, None)
        return 0

    # -- file content: the control file, the faults

    def open(self, path: str, flags: int) -> int:
        if path != CONTROL:
            return super().open(path, flags)
        if flags & os.O_TRUNC:  # libfuse passes O_TRUNC here (atomic_o_trunc)
            self.truncate(path, 0)
        return 0

    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        if path == CONTROL:
            return self._report()[offset : offset + size]
        end = self._fault("read", offset, size)
        if end is not None:
            size = max(0, end - offset)
        return super().read(path, size, offset, fh)

    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        if path == CONTROL:
            self._control = self._control[:offset] + data
            self.set_rules(self._control.decode(errors="replace"))
            return len(data)
        self._fault("write", offset, len(data))
        assert path is not None
        self._remember(path, self._fd(path), offset, len(data))
        return super().write(path, data, offset, fh)

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        if path != CONTROL:
            return super().truncate(path, length, fh)
        self._control = self._control[:length]
        self.set_rules(self._control.decode(errors="replace"))
        return 0

    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        if path == CONTROL:
            return 0
        assert path is not None
        self._fault("sync", path=path)
        with self._unsynced_lock:
            self._unsynced.pop(path, None)
        return super().fsync(path, datasync, fh)


def main(argv: Sequence[str] | None = None) -> int:
    """Mount ``FaultFS`` and serve it until unmounted or killed."""
    parser = argparse.ArgumentParser(prog="python -m storvisor.testing.faultfs")
    parser.add_argument("backing", help="directory whose files the mount shows")
    parser.add_argument("mountpoint")
    args = parser.parse_args(argv)
    try:
        import mfusepy
    except ImportError as e:
        print(f"faultfs: mfusepy is needed: {e}", file=sys.stderr)
        return 2
    fs = FaultFS(args.backing)
    try:
        mfusepy.FUSE(fs, args.mountpoint, foreground=True, fsname="faultfs", direct_io=True)
    except RuntimeError as e:
        print(f"faultfs: cannot serve {args.mountpoint}: {e}", file=sys.stderr)
        return 1
    return 0


def mounted(path: Path) -> bool:
    """Whether ``path`` is a mount point, dead FUSE mounts included."""
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


class FaultMount:
    """``python -m storvisor.testing.faultfs BACKING MOUNTPOINT`` in a subprocess.

    ``set`` switches faults on (replacing the rules), ``clear`` switches them off and
    releases stalled operations, ``hits`` counts the faulted operations. ``close`` kills
    the file system and removes the mount. Raises ``AssertionError`` if it does not mount
    within 20 s.
    """

    def __init__(self, backing: Path, mountpoint: Path) -> None:
        self.mountpoint = mountpoint
        self.control = mountpoint / CONTROL.lstrip("/")
        args = [sys.executable, "-m", "storvisor.testing.faultfs", str(backing), str(mountpoint)]
        self.proc = subprocess.Popen(args, stderr=subprocess.PIPE)
        self.stderr = ""
        deadline = time.monotonic() + 20
        while not mounted(mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise AssertionError(f"the fault file system did not mount: {self.stderr}")
            time.sleep(0.01)

    def set(self, *faults: Fault) -> None:
        self._write(faults)

    def clear(self) -> None:
        self._write(())

    def hits(self) -> dict[str, int]:
        report = json.loads(self.control.read_bytes())
        return {op: int(n) for op, n in report["hits"].items()}

    def _write(self, faults: Iterable[Fault]) -> None:
        text = "".join(f.line() + "\n" for f in faults)
        fd = os.open(self.control, os.O_WRONLY | os.O_TRUNC)
        try:
            if text:
                os.write(fd, text.encode())
        finally:
            os.close(fd)

    def close(self) -> None:
        """Release stalls, kill the file system and remove the mount."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        _, err = self.proc.communicate(timeout=30)
        self.stderr = err.decode(errors="replace")
        if mounted(self.mountpoint):
            subprocess.run(
                ["fusermount3", "-u", "-z", str(self.mountpoint)], check=False, capture_output=True
            )

    def __enter__(self) -> FaultMount:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    sys.exit(main())
