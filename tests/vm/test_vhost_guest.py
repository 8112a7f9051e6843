"""End to end: a QEMU guest (TCG) whose virtio disk is served over vhost-user-blk.

The guest writes a pattern with dd, reads it back, discards a range, and the host then checks
the same bytes on the back-end's side. qemu-storage-daemon runs the same script as the
reference; storvisor must behave identically, also when it is SIGKILLed and restarted during
guest I/O.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from storvisor.testing.guest import Guest, run_guest
from storvisor.testing.vhost_backend import QsdVhostBackend

pytestmark = [
    pytest.mark.slow,
    pytest.mark.vm,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU"),
]

MiB = 1 << 20
DISK_SIZE = 64 * MiB
PATTERN_SIZE = 4 * MiB
WRITE_AT = 1 * MiB
DISCARD_AT = 2 * MiB
DISCARD_LEN = 1 * MiB


def pattern(size: int) -> bytes:
    """What ``seq -w 0 999999 | head -c SIZE`` prints inside the guest."""
    lines = "".join(f"{i:06d}\n" for i in range(size // 7 + 1))
    return lines.encode()[:size]


def vhost_disk_args(socket_path: str, queues: int, *, reconnect: bool = False) -> list[str]:
    chardev = f"socket,id=vub0,path={socket_path}"
    if reconnect:
        chardev += ",reconnect=1"
    return [
        "-chardev",
        chardev,
        "-device",
        f"vhost-user-blk-pci,chardev=vub0,num-queues={queues}",
    ]


ROUNDTRIP_SCRIPT = f"""
wait_for_block /dev/vda || exit 10
echo "size-sectors $(cat /sys/block/vda/size)"
echo "serial [$(cat /sys/block/vda/serial 2>/dev/null)]"
echo "queues $(ls /sys/block/vda/mq | wc -l)"
seq -w 0 999999 | head -c {PATTERN_SIZE} > pattern
dd if=pattern of=/dev/vda bs=1M seek={WRITE_AT // MiB} oflag=direct conv=fsync || exit 11
dd if=/dev/vda of=back bs=1M skip={WRITE_AT // MiB} count={PATTERN_SIZE // MiB} \\
    iflag=direct || exit 12
cmp pattern back || exit 13
blkdiscard -o {DISCARD_AT} -l {DISCARD_LEN} /dev/vda || exit 14
nonzero=$(dd if=/dev/vda bs=1M skip={DISCARD_AT // MiB} count={DISCARD_LEN // MiB} \\
    iflag=direct | tr -d '\\000' | wc -c)
echo "nonzero-after-discard $nonzero"
[ "$nonzero" -eq 0 ] || exit 15
echo roundtrip-ok
"""


@pytest.fixture
def sockdir() -> Iterator[str]:
    # Unix socket paths are limited to 107 bytes: keep them short, under /tmp.
    path = f"/tmp/sv-vm-{os.getpid()}-{os.urandom(3).hex()}"
    os.mkdir(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def disk_file(tmp_path: Path) -> str:
    path = tmp_path / "disk.raw"
    with path.open("wb") as f:
        f.truncate(DISK_SIZE)
    return str(path)


def expected_after_roundtrip() -> bytes:
    data = pattern(PATTERN_SIZE)
    start, end = DISCARD_AT - WRITE_AT, DISCARD_AT - WRITE_AT + DISCARD_LEN
    return data[:start] + bytes(DISCARD_LEN) + data[end:]


def read_file_range(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def test_pattern_discard_roundtrip_qsd_reference(disk_file: str, sockdir: str) -> None:
    """The script and the host-side checks hold for qemu-storage-daemon's export."""
    sock = f"{sockdir}/qsd.sock"
    with QsdVhostBackend(disk_file, sock, num_queues=1):
        result = run_guest(ROUNDTRIP_SCRIPT, qemu_args=vhost_disk_args(sock, 1), timeout=90)
    result.check()
    assert "roundtrip-ok" in result.console
    assert f"size-sectors {DISK_SIZE // 512}" in result.console
    assert read_file_range(disk_file, WRITE_AT, PATTERN_SIZE) == expected_after_roundtrip()
    assert read_file_range(disk_file, 0, WRITE_AT) == bytes(WRITE_AT)


def test_guest_script_failure_is_reported(sockdir: str) -> None:
    """A failing dd (no disk attached) surfaces as a non-zero status, not a pass."""
    with Guest("wait_for_block /dev/vda 1 || exit 10\n", timeout=60) as guest:
        result = guest.wait()
    assert result.status == 10
    assert "no /dev/vda" in result.console
