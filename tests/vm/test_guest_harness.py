"""The guest harness itself: initramfs contents, module order, status, timeouts."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from storvisor.testing.guest import (
    CpioWriter,
    Guest,
    GuestError,
    GuestFailed,
    GuestTimeout,
    Kernel,
    build_initramfs,
    module_load_order,
    run_guest,
    share_dir_args,
)

needs_kernel = pytest.mark.requires(any(Path("/boot").glob("vmlinuz-*")), "needs linux-image-amd64")
vm = [pytest.mark.slow, pytest.mark.vm, needs_kernel]


def test_cpio_archive_lists_and_extracts_with_busybox_cpio(tmp_path: Path) -> None:
    archive = CpioWriter()
    archive.directory("d")
    archive.file("d/odd", b"abc", 0o755)
    archive.file("d/aligned", b"wxyz")
    archive.symlink("d/link", "odd")
    archive.char_device("console", 5, 1)
    (tmp_path / "a.cpio").write_bytes(archive.getvalue())
    listing = subprocess.run(
        ["busybox", "cpio", "-t", "-F", str(tmp_path / "a.cpio")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert listing.stdout.split() == ["d", "d/odd", "d/aligned", "d/link", "console"]
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(
        ["busybox", "cpio", "-i", "-d", "-F", str(tmp_path / "a.cpio")],
        cwd=out,
        capture_output=True,
        check=True,
    )
    assert (out / "d/odd").read_bytes() == b"abc"
    assert os.access(out / "d/odd", os.X_OK)
    assert (out / "d/aligned").read_bytes() == b"wxyz"
    assert os.readlink(out / "d/link") == "odd"


@needs_kernel
def test_modules_come_after_their_dependencies() -> None:
    kernel = Kernel.find()
    order = [name for name, _ in module_load_order(kernel, ["virtio_blk", "virtio_pci", "9p"])]
    for before, after in [
        ("virtio_ring", "virtio"),
        ("virtio", "virtio_blk"),
        ("virtio_pci_modern_dev", "virtio_pci"),
        ("9pnet", "9p"),
    ]:
        assert order.index(before) < order.index(after), order
    assert len(order) == len(set(order))


@needs_kernel
def test_unknown_module_is_a_readable_error() -> None:
    with pytest.raises(GuestError, match="no module no_such_module"):
        module_load_order(Kernel.find(), ["no_such_module"])


@needs_kernel
def test_initramfs_is_cached_per_module_list(tmp_path: Path) -> None:
    kernel = Kernel.find()
    first = build_initramfs(kernel, ["virtio_blk"], cache=tmp_path)
    mtime = first.stat().st_mtime_ns
    assert build_initramfs(kernel, ["virtio_blk"], cache=tmp_path) == first
    assert first.stat().st_mtime_ns == mtime
    other = build_initramfs(kernel, ["virtio_blk", "9p"], cache=tmp_path)
    assert other != first
    assert kernel.version in first.name


@pytest.mark.parametrize("status", [0, 7])
@pytest.mark.slow
@pytest.mark.vm
@needs_kernel
def test_script_output_and_status_come_back(status: int) -> None:
    result = run_guest(
        f"echo hello-from-guest\ngrep -c '^virtio_blk ' /proc/modules\nexit {status}\n", timeout=60
    )
    assert result.status == status
    assert "hello-from-guest" in result.console
    assert "\n1\n" in result.console  # virtio_blk was loaded
    if status:
        with pytest.raises(GuestFailed, match=f"status {status}"):
            result.check()
    else:
        assert result.check() is result
    assert result.seconds < 30


@pytest.mark.slow
@pytest.mark.vm
@needs_kernel
def test_timeout_kills_qemu_and_shows_console() -> None:
    guest = Guest("echo started-sleeping\nsleep 600\n", timeout=60)
    with guest:
        guest.wait_for_line("started-sleeping")
        pid = guest.pid
        assert pid is not None
        started = time.monotonic()
        with pytest.raises(GuestTimeout, match="started-sleeping"):
            guest.wait(timeout=1)
        assert time.monotonic() - started < 10
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.slow
@pytest.mark.vm
@needs_kernel
def test_bad_qemu_argument_is_a_guest_error() -> None:
    with pytest.raises(GuestError, match="no-such-device") as info:
        run_guest("exit 0\n", qemu_args=["-device", "no-such-device"], timeout=30)
    assert not isinstance(info.value, GuestTimeout)


@pytest.mark.slow
@pytest.mark.vm
@needs_kernel
def test_host_directory_shared_over_9p(tmp_path: Path) -> None:
    (tmp_path / "hello.txt").write_text("from-the-host\n")
    script = (
        "mkdir -p /mnt && mount -t 9p -o trans=virtio,version=9p2000.L share /mnt || exit 20\n"
        "cat /mnt/hello.txt\n"
        "touch /mnt/new 2>/dev/null && echo writable || echo read-only\n"
    )
    result = run_guest(script, qemu_args=share_dir_args(str(tmp_path), "share"), timeout=60)
    result.check()
    assert "from-the-host" in result.console
    assert "read-only" in result.console
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
@pytest.mark.vm
@needs_kernel
def test_guest_crash_is_a_guest_error_with_the_console() -> None:
    with pytest.raises(GuestError, match="without reporting a status") as info:
        run_guest("echo before-crash\necho c > /proc/sysrq-trigger\nsleep 30\n", timeout=60)
    console = info.value.console
    assert "Kernel panic" in console, console  # the whole console is kept ...
    assert "before-crash" in console
    last_line = console.strip().splitlines()[-1].strip()
    assert last_line in str(info.value)  # ... and its tail is in the message
    assert not isinstance(info.value, GuestTimeout)
