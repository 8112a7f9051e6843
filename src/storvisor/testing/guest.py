"""Boot a throw-away Linux guest under QEMU (TCG) and run a shell script inside it.

Theory of operation
-------------------
The guest is the host's own Debian kernel (``/boot/vmlinuz-VERSION``) with an initramfs built
here: a static busybox, the kernel modules a test needs (virtio, virtio_blk, virtio_scsi, 9p by
default, with their dependencies resolved through ``modules.dep`` and loaded with ``insmod`` in
dependency order) and an ``/init`` that mounts ``/proc``, ``/sys`` and ``/dev``, runs the test's
script in a subshell, prints one marker line with the script's exit status and powers the
machine off. The base archive is cached per kernel version and module list (see
``cache_dir``); each run appends a second, tiny cpio archive holding the script and a random
nonce (the kernel unpacks concatenated archives in order), so a script cannot fake the marker
by accident.

The guest always gets its RAM from a shared ``memory-backend-memfd`` (vhost-user back-ends
must map it) and its serial console on QEMU's stdout, which a reader thread collects line by
line, so a test can wait for a line the script prints (``Guest.wait_for_line``) and act on the
host while the guest keeps running, e.g. kill and restart a back-end during guest I/O.

Inside the script, ``/bin`` holds every busybox applet, the working directory is a tmpfs-like
``/tmp`` in the initramfs, and the shell function ``wait_for_block DEV [SECONDS]`` waits until a
block device node appears.

Host-root guests (``host_root_guest``) run this machine's own userspace instead: the host's
``/`` is shared read-only over 9p, a tmpfs overlay on top makes it writable, and the command
runs chrooted there after the host's ``modprobe`` has loaded LIO, TCMU, tcm_loop, vhost-scsi,
NBD and brd and configfs is mounted (the host kernel may have none of them; the guest, booting
the host's kernel image, has them all). ``run_pytest_in_guest`` runs pytest that way and reads
its JUnit report back through a writable 9p share; ``tests/lio/conftest.py`` maps it onto host
test items, one guest per module. Measured: the root is ready about 4 s after the kernel
starts, a pytest run of a small module takes 40-50 s in all under TCG.

Errors: ``GuestError`` when QEMU cannot start, dies, or the guest stops without reporting a
status; ``GuestTimeout`` (a ``GuestError``) when the deadline passes, after QEMU was killed. A
non-zero script status is not an error: ``GuestResult.check`` turns it into ``GuestFailed``.
"""

from __future__ import annotations

import glob
import hashlib
import lzma
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO
from xml.etree import ElementTree

from storvisor.errors import StorvisorError

DEFAULT_MODULES: tuple[str, ...] = (
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "sd_mod",
    "9pnet_virtio",
    "9p",
)
"""Modules loaded by default: virtio-blk and virtio-scsi disks, 9p host directory shares."""

BUSYBOX = "/bin/busybox"
QEMU = "qemu-system-x86_64"
_MARKER = "STORVISOR-GUEST-EXIT"
CONSOLE_LOG_ENV = "STORVISOR_GUEST_CONSOLE"
"""If set, every guest's console is also appended, line by line, to the file it names."""
_TAIL_LINES = 40

_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /lib/modules/load-order); do
    insmod "/lib/modules/$m.ko" || echo "storvisor-guest: insmod $m failed"
done
wait_for_block() {
    _n=0
    while [ ! -b "$1" ]; do
        _n=$((_n + 1))
        [ "$_n" -gt $((${2:-10} * 20)) ] && { echo "storvisor-guest: no $1"; return 1; }
        usleep 50000
    done
}
read nonce < /storvisor/nonce
(cd /tmp && . /storvisor/script.sh)
rc=$?
sync
echo "STORVISOR-GUEST-EXIT $nonce $rc"
usleep 200000
poweroff -f
"""


class GuestError(StorvisorError):
    """The guest could not be run to completion; ``str(e)`` includes the console's tail and
    ``console`` holds everything the console printed."""

    def __init__(self, message: str, console: str = "") -> None:
        super().__init__(message)
        self.console = console


class GuestTimeout(GuestError):
    """The guest did not finish (or print an awaited line) in time; QEMU has been killed."""


class GuestFailed(GuestError):
    """The guest's script exited with a non-zero status (raised by ``GuestResult.check``)."""


@dataclass(frozen=True, slots=True)
class Kernel:
    """A bootable kernel image and the directory holding its modules."""

    version: str
    image: Path
    modules_dir: Path

    @classmethod
    def find(cls, version: str | None = None) -> Kernel:
        """The given kernel version, or the newest ``/boot/vmlinuz-*`` that has modules.

        Raises ``GuestError`` if there is none (install ``linux-image-amd64``).
        """
        candidates = (
            [f"/boot/vmlinuz-{version}"]
            if version
            else sorted(glob.glob("/boot/vmlinuz-*"), key=_version_key)
        )
        for image in reversed(candidates):
            ver = image.removeprefix("/boot/vmlinuz-")
            modules = Path("/lib/modules") / ver
            if os.access(image, os.R_OK) and (modules / "modules.dep").is_file():
                return cls(ver, Path(image), modules)
        raise GuestError(
            f"no readable kernel with modules ({version or '/boot/vmlinuz-*'}); "
            "install linux-image-amd64"
        )


@dataclass(frozen=True, slots=True)
class GuestResult:
    """What a finished guest reported."""

    status: int
    """Exit status of the script (0 = success)."""
    console: str
    """Everything the serial console printed, ``\\r`` removed."""
    seconds: float
    """Wall time from QEMU start to QEMU exit."""

    def check(self) -> GuestResult:
        """Return ``self`` if the script succeeded; raise ``GuestFailed`` otherwise."""
        if self.status != 0:
            raise GuestFailed(
                f"guest script exited with status {self.status}\n{_tail(self.console)}",
                self.console,
            )
        return self


def cache_dir() -> Path:
    """Where built initramfs archives are cached: ``$STORVISOR_GUEST_CACHE`` or a temp dir."""
    env = os.environ.get("STORVISOR_GUEST_CACHE")
    if env:
        return Path(env)
    return Path(tempfile.gettempdir()) / f"storvisor-guest-cache-{os.getuid()}"


def module_load_order(kernel: Kernel, modules: Sequence[str]) -> list[tuple[str, Path]]:
    """``(name, path)`` of ``modules`` and everything they depend on, dependencies first.

    Read from the kernel's ``modules.dep``; modules built into the kernel are skipped. Raises
    ``GuestError`` for a module the kernel has neither built in nor as a file.
    """
    deps: dict[str, tuple[Path, list[str]]] = {}
    for line in (kernel.modules_dir / "modules.dep").read_text().splitlines():
        target, _, rest = line.partition(":")
        deps[_module_name(target)] = (
            kernel.modules_dir / target,
            [_module_name(d) for d in rest.split()],
        )
    builtin_file = kernel.modules_dir / "modules.builtin"
    builtin = (
        {_module_name(line) for line in builtin_file.read_text().split()}
        if builtin_file.is_file()
        else set()
    )
    order: list[tuple[str, Path]] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in seen or name in builtin:
            return
        if name in chain:
            raise GuestError(f"module dependency loop: {' -> '.join((*chain, name))}")
        if name not in deps:
            raise GuestError(f"kernel {kernel.version} has no module {name}")
        path, needs = deps[name]
        for dep in needs:
            visit(dep, (*chain, name))
        seen.add(name)
        order.append((name, path))

    for module in modules:
        visit(module.replace("-", "_"), ())
    return order


def _module_name(path: str) -> str:
    """``kernel/fs/9p/9p.ko.xz`` -> ``9p``; dashes become underscores, as the kernel does."""
    return Path(path).name.split(".ko")[0].replace("-", "_")


class CpioWriter:
    """Writes an uncompressed ``newc`` cpio archive, the format the kernel unpacks."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755, b"")

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, 0o020000 | mode, b"", rdev=(major, minor))

    def getvalue(self) -> bytes:
        """The archive, trailer included."""
        trailer = self._header("TRAILER!!!", 0, 0, 0, (0, 0))
        return b"".join([*self._parts, trailer])

    def _entry(self, name: str, mode: int, data: bytes, rdev: tuple[int, int] = (0, 0)) -> None:
        self._ino += 1
        self._parts.append(self._header(name, self._ino, mode, len(data), rdev))
        self._parts.append(data + bytes(-len(data) % 4))

    @staticmethod
    def _header(name: str, ino: int, mode: int, size: int, rdev: tuple[int, int]) -> bytes:
        raw_name = name.encode() + b"\0"
        nlink = 2 if mode & 0o040000 else 1
        fields = (ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev[0], rdev[1], len(raw_name), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields) + raw_name
        return header + bytes(-len(header) % 4)


def build_initramfs(
    kernel: Kernel, modules: Sequence[str] = DEFAULT_MODULES, *, cache: Path | None = None
) -> Path:
    """Build (or reuse from the cache) the base initramfs for ``kernel`` and ``modules``.

    The result is keyed by kernel version, module list, busybox binary and ``/init`` text, and
    written atomically, so concurrent builders are safe. Raises ``GuestError`` if busybox or a
    module is missing.
    """
    if not os.access(BUSYBOX, os.X_OK):
        raise GuestError(f"{BUSYBOX} missing; install busybox-static")
    busybox = Path(BUSYBOX).read_bytes()
    key = hashlib.sha256(
        "\0".join([kernel.version, *modules, _INIT]).encode() + hashlib.sha256(busybox).digest()
    ).hexdigest()[:16]
    directory = cache or cache_dir()
    target = directory / f"initramfs-{kernel.version}-{key}.cpio"
    if target.is_file():
        return target
    order = module_load_order(kernel, modules)
    archive = CpioWriter()
    for d in ("bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules", "storvisor"):
        archive.directory(d)
    archive.char_device("dev/console", 5, 1)
    archive.char_device("dev/null", 1, 3, 0o666)
    archive.file("bin/busybox", busybox, 0o755)
    archive.symlink("bin/sh", "busybox")
    archive.file("init", _INIT.encode(), 0o755)
    for name, path in order:
        archive.file(f"lib/modules/{name}.ko", _module_bytes(path))
    archive.file("lib/modules/load-order", "".join(f"{n}\n" for n, _ in order).encode())
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".initramfs-")
    with os.fdopen(fd, "wb") as f:
        f.write(archive.getvalue())
    os.replace(tmp, target)
    return target


def _module_bytes(path: Path) -> bytes:
    """A module's ELF image; ``.ko.xz`` files are decompressed (insmod cannot)."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko"):
        return data
    raise GuestError(f"cannot load compressed module {path} (only .ko and .ko.xz)")


class Guest:
    """One QEMU/TCG guest running ``script``; use as a context manager.

    ``qemu_args`` are appended to the command line (disks, chardevs, netdevs). The guest has
    ``memory_mib`` MiB and ``ram_tail_kib`` KiB of shared memfd RAM and ``cpus`` vCPUs.
    ``timeout`` bounds ``wait`` and ``wait_for_line`` when they are not given their own.
    Leaving the ``with`` block kills QEMU if it still runs and removes the per-run files.
    """

    def __init__(
        self,
        script: str,
        *,
        qemu_args: Sequence[str] = (),
        memory_mib: int = 256,
        ram_tail_kib: int = 0,
        cpus: int = 1,
        modules: Sequence[str] = DEFAULT_MODULES,
        kernel: Kernel | None = None,
        timeout: float = 120.0,
        append: str = "",
    ) -> None:
        self.script = script
        self.qemu_args = list(qemu_args)
        self.memory_mib = memory_mib
        self.ram_tail_kib = ram_tail_kib
        self.cpus = cpus
        self.modules = tuple(modules)
        self.kernel = kernel
        self.timeout = timeout
        self.append = append
        self._nonce = secrets.token_hex(8)
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: str | None = None
        self._lines: list[str] = []
        self._stderr: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self._readers: list[threading.Thread] = []
        self._started = 0.0
        self._command: list[str] = []

    @property
    def pid(self) -> int | None:
        """QEMU's process id once started."""
        return self._proc.pid if self._proc else None

    @property
    def console(self) -> str:
        """What the serial console has printed so far."""
        with self._cond:
            return "".join(f"{line}\n" for line in self._lines)

    def start(self) -> None:
        """Build the initramfs if needed and start QEMU; returns once QEMU is running.

        Raises ``GuestError`` if QEMU cannot be executed.
        """
        if self._proc is not None:
            raise GuestError("guest already started")
        kernel = self.kernel or Kernel.find()
        base = build_initramfs(kernel, self.modules)
        self._workdir = tempfile.mkdtemp(prefix="storvisor-guest-")
        initrd = Path(self._workdir) / "initrd.cpio"
        extra = CpioWriter()
        extra.file("storvisor/script.sh", self.script.encode(), 0o755)
        extra.file("storvisor/nonce", f"{self._nonce}\n".encode())
        with initrd.open("wb") as out, base.open("rb") as src:
            shutil.copyfileobj(src, out)
            out.write(extra.getvalue())
        mem = f"{self.memory_mib * 1024 + self.ram_tail_kib}K"
        self._command = [
            QEMU,
            "-accel", "tcg",
            "-nodefaults",
            "-no-user-config",
            "-display", "none",
            "-no-reboot",
            "-machine", "pc,memory-backend=mem",
            "-m", mem,
            "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
            "-smp", str(self.cpus),
            "-kernel", str(kernel.image),
            "-initrd", str(initrd),
            "-append", f"console=ttyS0 panic=-1 quiet {self.append}".strip(),
            "-serial", "stdio",
            "-monitor", "none",
            *self.qemu_args,
        ]  # fmt: skip
        self._started = time.monotonic()
        try:
            self._proc = subprocess.Popen(
                self._command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as e:
            self._cleanup()
            raise GuestError(f"cannot run {QEMU}: {e.strerror}") from e
        assert self._proc.stdout is not None and self._proc.stderr is not None
        self._readers = [
            threading.Thread(target=self._read, args=(self._proc.stdout, self._lines), daemon=True),
            threading.Thread(
                target=self._read, args=(self._proc.stderr, self._stderr), daemon=True
            ),
        ]
        for reader in self._readers:
            reader.start()

    def wait_for_line(self, text: str, timeout: float | None = None) -> str:
        """Block until a console line contains ``text``; return that line.

        Raises ``GuestTimeout`` (after killing QEMU) if it does not appear in time, and
        ``GuestError`` if the guest stops first.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        seen = 0
        with self._cond:
            while True:
                for line in self._lines[seen:]:
                    if text in line:
                        return line
                seen = len(self._lines)
                if self._eof:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
        if self._eof:
            self._join()
            raise GuestError(
                f"guest stopped before printing {text!r}\n{self._report()}", self.console
            )
        self.kill()
        raise GuestTimeout(f"guest did not print {text!r} in time\n{self._report()}", self.console)

    def wait(self, timeout: float | None = None) -> GuestResult:
        """Wait for the guest to power off and return its result.

        Raises ``GuestTimeout`` (after killing QEMU) if it runs past ``timeout`` (default: the
        constructor's), ``GuestError`` if it stopped without printing its status marker.
        """
        if self._proc is None:
            raise GuestError("guest not started")
        if timeout is None:
            timeout = max(0.0, self._started + self.timeout - time.monotonic())
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            ran = time.monotonic() - self._started
            raise GuestTimeout(
                f"guest still running after {ran:.0f} s; killed\n{self._report()}", self.console
            ) from None
        self._join()
        seconds = time.monotonic() - self._started
        pattern = re.compile(rf"{_MARKER} {self._nonce} (\d+)")
        with self._cond:
            for line in reversed(self._lines):
                match = pattern.search(line)
                if match:
                    return GuestResult(int(match.group(1)), self.console, seconds)
        raise GuestError(
            f"guest stopped without reporting a status (QEMU exit {self._proc.returncode})\n"
            f"{self._report()}",
            self.console,
        )

    def kill(self) -> None:
        """Stop QEMU now (SIGTERM, then SIGKILL after 3 s); a no-op once it has exited."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._join()

    def __enter__(self) -> Guest:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()
        self._cleanup()

    def _read(self, stream: IO[bytes], sink: list[str]) -> None:
        mirror = os.environ.get(CONSOLE_LOG_ENV) if sink is self._lines else None
        log = open(mirror, "a", buffering=1) if mirror else None  # noqa: SIM115
        try:
            self._read_lines(stream, sink, log)
        finally:
            if log is not None:
                log.close()

    def _read_lines(self, stream: IO[bytes], sink: list[str], log: IO[str] | None) -> None:
        while True:
            raw = stream.readline()
            if not raw:
                break
            line = raw.decode(errors="replace").rstrip("\r\n").replace("\r", "")
            if log is not None:
                log.write(line + "\n")
            with self._cond:
                sink.append(line)
                self._cond.notify_all()
        if sink is self._lines:
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    def _join(self) -> None:
        for reader in self._readers:
            reader.join(5)

    def _cleanup(self) -> None:
        if self._proc is not None:
            for stream in (self._proc.stdout, self._proc.stderr):
                if stream is not None:
                    stream.close()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def _report(self) -> str:
        with self._cond:
            stderr = "\n".join(self._stderr[-10:])
        parts = [f"command: {' '.join(self._command)}"]
        if stderr:
            parts.append(f"QEMU stderr:\n{stderr}")
        parts.append(_tail(self.console))
        return "\n".join(parts)


def vhost_user_blk_args(
    socket_path: str, *, queues: int = 1, reconnect: bool = False, index: int = 0
) -> list[str]:
    """QEMU arguments attaching the vhost-user-blk back-end at ``socket_path`` as a virtio
    disk (the ``index``-th one gets ids ``vub<index>``; the guest names disks vda, vdb... in
    PCI order). With ``reconnect``, QEMU reconnects every second after the back-end goes away.
    """
    chardev = f"socket,id=vub{index},path={socket_path}"
    if reconnect:
        chardev += ",reconnect=1"
    return [
        "-chardev",
        chardev,
        "-device",
        f"vhost-user-blk-pci,chardev=vub{index},num-queues={queues}",
    ]


def share_dir_args(host_dir: str, tag: str, *, read_only: bool = True) -> list[str]:
    """QEMU arguments sharing ``host_dir`` over 9p; inside the guest mount it with
    ``mount -t 9p -o trans=virtio,version=9p2000.L TAG /mnt``."""
    spec = f"local,path={host_dir},mount_tag={tag},security_model=none"
    return ["-virtfs", spec + (",readonly=on" if read_only else "")]


HOST_ROOT_MODULES: tuple[str, ...] = (*DEFAULT_MODULES, "overlay")
"""Modules of a host-root guest's initramfs: 9p and overlay for the root, virtio disks."""

LIO_MODULES: tuple[str, ...] = (
    "configfs",
    "target_core_mod",
    "target_core_user",
    "target_core_iblock",
    "target_core_file",
    "tcm_loop",
    "vhost_scsi",
    "nbd",
    "loop",
    "sg",
)
"""Modules a host-root guest loads with the host's ``modprobe`` by default: LIO with its
user (TCMU), iblock and fileio backstores, the loopback and vhost fabrics, NBD and loop
devices. ``brd`` (two 64 MiB ram disks) is loaded as well."""

HOST_ROOT_OUTBOX = "/run/storvisor-outbox"
"""Where a host-root guest sees the writable host directory given as ``outbox``."""

_HOST_ROOT_SETUP = """\
mkdir -p /lower /rw /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288,cache=loose,ro hostroot /lower \\
    || {{ echo "storvisor-guest: cannot mount the host root"; exit 90; }}
mount -t tmpfs -o size={tmpfs_mib}m rw /rw && mkdir -p /rw/upper /rw/wd
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/wd overlay /newroot \\
    || {{ echo "storvisor-guest: cannot mount the overlay root"; exit 91; }}
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs tmpfs /newroot/dev/shm
mount -t tmpfs tmpfs /newroot/run
# the kernel's own file accesses (LIO's dbroot, its modprobe helper) start at this root
mkdir -p /etc /sbin /newroot/etc/target
ln -s /newroot/etc/target /etc/target
printf '#!/bin/sh\\nexec chroot /newroot /sbin/modprobe "$@"\\n' > /sbin/modprobe
chmod 755 /sbin/modprobe
"""

_HOST_ROOT_OUTBOX = """\
mkdir -p /newroot{outbox}
mount -t 9p -o trans=virtio,version=9p2000.L,cache=none outbox /newroot{outbox} \\
    || {{ echo "storvisor-guest: cannot mount the outbox"; exit 92; }}
"""

_HOST_ROOT_INSIDE = """\
mkdir -p /etc/target
modprobe -a {modules} || echo "storvisor-guest: modprobe failed"
modprobe brd rd_nr=2 rd_size=65536 max_part=0 || echo "storvisor-guest: modprobe brd failed"
[ -d /sys/kernel/config ] && ! mountpoint -q /sys/kernel/config \\
    && mount -t configfs configfs /sys/kernel/config
echo "storvisor-guest: host root ready after $(cut -d' ' -f1 /proc/uptime) s"
"""


def host_root_script(
    command: Sequence[str],
    *,
    cwd: str = "/",
    env: dict[str, str] | None = None,
    modules: Sequence[str] | None = LIO_MODULES,
    outbox: bool = False,
    tmpfs_mib: int = 256,
) -> str:
    """The busybox script of a host-root guest: the host's ``/`` read-only over 9p (tag
    ``hostroot``) under a tmpfs overlay, ``/proc``, ``/sys``, ``/dev`` and a tmpfs ``/run``
    mounted in it, then ``command`` run by the host's ``/bin/sh`` chrooted there, in ``cwd``
    with exactly ``env`` (plus a default ``PATH``). Its exit status is the guest's.

    Inside, before ``command``: ``modules`` loaded with the host's ``modprobe`` (``None``:
    none, and no configfs either, to see what a command does without them), configfs
    mounted at ``/sys/kernel/config`` and ``/etc/target`` created. With ``outbox`` the 9p
    tag ``outbox`` is mounted read-write at ``HOST_ROOT_OUTBOX``.
    """
    environment = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    environment.update(env or {})
    inside = _HOST_ROOT_INSIDE.format(modules=" ".join(modules)) if modules is not None else ""
    inside += f"cd {shlex.quote(cwd)} || exit 93\nexec {shlex.join(command)}\n"
    setup = _HOST_ROOT_SETUP.format(tmpfs_mib=tmpfs_mib)
    if outbox:
        setup += _HOST_ROOT_OUTBOX.format(outbox=HOST_ROOT_OUTBOX)
    env_args = shlex.join(f"{k}={v}" for k, v in environment.items())
    return f"{setup}chroot /newroot /usr/bin/env -i {env_args} /bin/sh -c {shlex.quote(inside)}\n"


def host_root_args(outbox: str | None = None) -> list[str]:
    """QEMU arguments sharing the host's ``/`` read-only (tag ``hostroot``) and, when given,
    the host directory ``outbox`` read-write (tag ``outbox``)."""
    spec = "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap"
    args = ["-virtfs", spec]
    if outbox is not None:
        args += share_dir_args(outbox, "outbox", read_only=False)
    return args


def host_root_guest(
    command: Sequence[str],
    *,
    cwd: str = "/",
    env: dict[str, str] | None = None,
    modules: Sequence[str] | None = LIO_MODULES,
    outbox: str | None = None,
    qemu_args: Sequence[str] = (),
    memory_mib: int = 768,
    timeout: float = 600.0,
) -> Guest:
    """A guest that runs ``command`` on this machine's own userspace (``host_root_script``)
    with the host's kernel and modules: LIO, TCMU, tcm_loop, vhost-scsi and NBD, which the
    host kernel may lack, are there. ``outbox`` is a host directory the guest may write to
    (seen inside at ``HOST_ROOT_OUTBOX``). Not started: use it as a context manager."""
    script = host_root_script(command, cwd=cwd, env=env, modules=modules, outbox=outbox is not None)
    return Guest(
        script,
        qemu_args=[*host_root_args(outbox), *qemu_args],
        memory_mib=memory_mib,
        modules=HOST_ROOT_MODULES,
        timeout=timeout,
    )


IN_GUEST_ENV = "STORVISOR_IN_GUEST"
"""Set to ``1`` in the environment of tests run by ``run_pytest_in_guest``."""


@dataclass(frozen=True, slots=True)
class InnerTest:
    """One test case as the pytest run inside a guest reported it (from its JUnit XML)."""

    module: str
    """Dotted module path, e.g. ``tests.lio.guest_iblock``; empty for a collection error."""
    name: str
    """Test name with its parameters, e.g. ``test_read[4096]``."""
    outcome: str
    """``passed``, ``failed``, ``error`` or ``skipped``."""
    text: str
    """The failure, error or skip message with its report (empty when it passed)."""
    seconds: float

    @property
    def function(self) -> str:
        """The test function's name (without parameters)."""
        return self.name.partition("[")[0]


@dataclass(frozen=True, slots=True)
class PytestRun:
    """A pytest run in a host-root guest: the guest's result and every test case."""

    guest: GuestResult
    tests: tuple[InnerTest, ...]


def run_pytest_in_guest(
    paths: Sequence[str],
    *,
    rootdir: str,
    python: str | None = None,
    pytest_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    modules: Sequence[str] | None = LIO_MODULES,
    memory_mib: int = 768,
    timeout: float = 900.0,
    started: Callable[[Guest], object] | None = None,
) -> PytestRun:
    """Boot one host-root guest that runs ``python -m pytest PATHS`` in ``rootdir`` and
    return every test case it reported.

    ``python`` defaults to this interpreter (the guest sees the host's files, so a virtualenv
    works as it is); it must have pytest-timeout, the one plugin loaded (name others in
    ``pytest_args`` with ``-p``). The inner environment is ``env`` plus ``IN_GUEST_ENV=1`` and this
    process's ``PYTHONPATH`` and ``CI``. The report comes back as JUnit XML through a
    writable 9p share, so what a failed test printed is in its ``InnerTest.text``.

    Raises ``GuestTimeout`` when the run does not finish within ``timeout`` (a stalled test
    is a failure), ``GuestError`` when the guest stops without a status or pytest wrote no
    report (its console then tells why). ``started`` is called with the running guest (which
    another thread may ``kill`` to cut the run short: a ``GuestError`` then).
    """
    # Plugins load only when named: every entry-point plugin installed (schemathesis,
    # hypothesis, ...) costs half a minute of start-up under TCG. pytest-timeout is named.
    inner_env = {
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
    }
    for name in ("PYTHONPATH", "CI"):
        if name in os.environ:
            inner_env[name] = os.environ[name]
    inner_env.update(env or {})
    inner_env[IN_GUEST_ENV] = "1"
    report = f"{HOST_ROOT_OUTBOX}/junit.xml"
    command = [
        python or sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-p",
        "pytest_timeout",
        "-rfEs",
        f"--junitxml={report}",
        *pytest_args,
        *paths,
    ]
    outbox = tempfile.mkdtemp(prefix="storvisor-outbox-")
    try:
        guest = host_root_guest(
            command,
            cwd=rootdir,
            env=inner_env,
            modules=modules,
            outbox=outbox,
            memory_mib=memory_mib,
            timeout=timeout,
        )
        with guest:
            if started is not None:
                started(guest)
            result = guest.wait()
        try:
            xml = Path(outbox, "junit.xml").read_text()
        except FileNotFoundError:
            raise GuestError(
                f"pytest in the guest wrote no report (status {result.status})\n"
                f"{_tail(result.console)}",
                result.console,
            ) from None
        return PytestRun(result, parse_junit(xml))
    finally:
        shutil.rmtree(outbox, ignore_errors=True)


def parse_junit(xml: str) -> tuple[InnerTest, ...]:
    """The test cases of a pytest JUnit XML report."""
    tests = []
    for case in ElementTree.fromstring(xml).iter("testcase"):
        outcome, text = "passed", ""
        for tag in ("failure", "error", "skipped"):
            element = case.find(tag)
            if element is not None:
                outcome = "failed" if tag == "failure" else tag
                message = element.get("message", "")
                body = element.text or ""
                text = f"{message}\n{body}".strip()
                break
        tests.append(
            InnerTest(
                case.get("classname", ""),
                case.get("name", ""),
                outcome,
                text,
                float(case.get("time", "0") or 0),
            )
        )
    return tuple(tests)


def run_guest(script: str, *, qemu_args: Sequence[str] = (), timeout: float = 120.0) -> GuestResult:
    """Boot a guest with the default modules, run ``script``, return its result.

    Raises ``GuestTimeout`` or ``GuestError`` as ``Guest.wait`` does.
    """
    with Guest(script, qemu_args=qemu_args, timeout=timeout) as guest:
        return guest.wait()


def _version_key(text: str) -> list[tuple[int, str]]:
    """Sort key putting ``6.1.0-10`` after ``6.1.0-9``."""
    return [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"(\d+)", text)]


def _tail(console: str) -> str:
    lines = console.splitlines()[-_TAIL_LINES:]
    return "console (last lines):\n" + "\n".join(f"  | {line}" for line in lines)
