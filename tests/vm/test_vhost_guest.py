"""End to end: a QEMU guest (TCG) whose virtio disk is served over vhost-user-blk.

The guest writes a pattern with dd, reads it back, discards a range, and the host then checks
the same bytes on the back-end's side: in the raw file, or through an NBD export of the thin
volume (with ``qemu-img``). qemu-storage-daemon runs the same script as the reference; storvisor
must behave identically, also when it is SIGKILLed and restarted during guest I/O.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from storvisor.engine.home import Home
from storvisor.engine.types import BackingSpec
from storvisor.exports.nbd import NBDExport, NBDServer, nbd_uri
from storvisor.testing.guest import Guest, run_guest, vhost_user_blk_args
from storvisor.testing.vhost_backend import QsdVhostBackend, StorvisorVhostBackend, VolumeRef

pytestmark = [
    pytest.mark.slow,
    pytest.mark.vm,
    pytest.mark.requires(shutil.which("qemu-system-x86_64") is not None, "needs QEMU"),
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


PARALLEL_AT = (8 * MiB, 12 * MiB)
PARALLEL_SCRIPT = f"""
# One writer per vCPU, so that blk-mq sends them down different virtqueues.
taskset -c 0 dd if=pattern of=/dev/vda bs=64k seek={PARALLEL_AT[0] // 65536} oflag=direct &
taskset -c 1 dd if=pattern of=/dev/vda bs=64k seek={PARALLEL_AT[1] // 65536} oflag=direct &
wait
grep -E 'virtio[0-9]+-req' /proc/interrupts
echo parallel-ok
"""


def queue_interrupts(console: str) -> dict[str, int]:
    """Interrupts per virtqueue (``req.0``, ``req.1``...) from the guest's /proc/interrupts."""
    counts: dict[str, int] = {}
    for line in console.splitlines():
        fields = line.split()
        if fields and fields[-1].startswith("virtio") and "-req." in fields[-1]:
            queue = fields[-1].split("-", 1)[1]
            counts[queue] = sum(int(f) for f in fields[1:] if f.isdigit())
    return counts


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
        result = run_guest(ROUNDTRIP_SCRIPT, qemu_args=vhost_user_blk_args(sock), timeout=90)
    result.check()
    assert "roundtrip-ok" in result.console
    assert f"size-sectors {DISK_SIZE // 512}" in result.console
    assert read_file_range(disk_file, WRITE_AT, PATTERN_SIZE) == expected_after_roundtrip()
    assert read_file_range(disk_file, 0, WRITE_AT) == bytes(WRITE_AT)


def make_volume(home_dir: Path, size: int = DISK_SIZE) -> tuple[VolumeRef, str]:
    """A pool on a sparse file with one thin volume; returns it and its serial."""
    with Home(home_dir) as home:
        home.create_pool("p", [BackingSpec(str(home_dir / "backing.raw"), size=4 * size)])
        info = home.pool("p").create_volume("v", size)
    return VolumeRef(str(home_dir), "p", "v"), info.serial


def volume_through_nbd(ref: VolumeRef, sockdir: str) -> tuple[bytes, list[dict[str, object]]]:
    """The whole volume as ``qemu-img convert`` reads it over storvisor's NBD export, and
    ``qemu-img map``'s view of its allocation."""
    out = Path(sockdir) / "volume.raw"
    nbd_sock = f"{sockdir}/nbd.sock"
    with Home(ref.home) as home:
        pool = home.pool(ref.pool)
        server = NBDServer()
        server.add_export(NBDExport(ref.volume, lambda: pool.open_volume(ref.volume)))
        server.listen_unix(nbd_sock)
        server.start()
        try:
            uri = nbd_uri(ref.volume, unix_path=nbd_sock)
            subprocess.run(
                ["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out)], check=True
            )
            mapped = subprocess.run(
                ["qemu-img", "map", "-f", "raw", "--output=json", uri],
                check=True,
                capture_output=True,
                text=True,
            )
        finally:
            server.close()
    data = out.read_bytes()
    out.unlink()
    extents: list[dict[str, object]] = json.loads(mapped.stdout)
    return data, extents


def test_pattern_discard_roundtrip_storvisor_thin_volume_two_queues(
    tmp_path: Path, sockdir: str
) -> None:
    """Same script on a thin volume served by storvisor with two queues and two vCPUs; the
    host reads the volume back through storvisor's NBD export."""
    ref, serial = make_volume(tmp_path / "home")
    sock = f"{sockdir}/sv.sock"
    backend = StorvisorVhostBackend(ref, sock, num_queues=2)
    with backend:
        script = ROUNDTRIP_SCRIPT + PARALLEL_SCRIPT
        with Guest(script, qemu_args=vhost_user_blk_args(sock, queues=2), cpus=2, timeout=90) as g:
            result = g.wait()
        assert backend.stop() == 0, backend.output
    result.check()
    assert "roundtrip-ok" in result.console
    assert f"size-sectors {DISK_SIZE // 512}" in result.console
    assert f"serial [{serial[:20]}]" in result.console
    assert "queues 2" in result.console
    assert "parallel-ok" in result.console
    interrupts = queue_interrupts(result.console)
    assert interrupts.get("req.0", 0) > 0 and interrupts.get("req.1", 0) > 0, interrupts
    data, extents = volume_through_nbd(ref, sockdir)
    assert len(data) == DISK_SIZE
    assert data[WRITE_AT : WRITE_AT + PATTERN_SIZE] == expected_after_roundtrip()
    assert data[:WRITE_AT] == bytes(WRITE_AT)
    for at in PARALLEL_AT:
        assert data[at : at + PATTERN_SIZE] == pattern(PATTERN_SIZE)
    written_end = PARALLEL_AT[1] + PATTERN_SIZE
    assert data[WRITE_AT + PATTERN_SIZE : PARALLEL_AT[0]] == bytes(
        PARALLEL_AT[0] - WRITE_AT - PATTERN_SIZE
    )
    assert data[written_end:] == bytes(DISK_SIZE - written_end)
    # The discarded range is a hole again, as are the never-written ones.
    holes = [(e["start"], e["length"]) for e in extents if not e["data"]]
    assert any(
        int(str(start)) <= DISCARD_AT
        and int(str(start)) + int(str(length)) >= DISCARD_AT + DISCARD_LEN
        for start, length in holes
    ), extents


RECONNECT_MIB = 24
RECONNECT_SCRIPT = f"""
wait_for_block /dev/vda || exit 10
dd if=/dev/urandom of=data bs=1M count={RECONNECT_MIB} 2>/dev/null || exit 11
echo "data-md5 $(md5sum < data)"
i=0
while [ $i -lt {RECONNECT_MIB} ]; do
    dd if=data of=/dev/vda bs=1M skip=$i seek=$i count=1 oflag=direct conv=fsync 2>/dev/null \
        || {{ echo "write-failed $i"; exit 12; }}
    echo "wrote $i"
    i=$((i + 1))
done
dd if=/dev/vda of=back bs=1M count={RECONNECT_MIB} iflag=direct 2>/dev/null || exit 13
cmp data back || exit 14
echo "errors-in-dmesg $(dmesg | grep -c -i 'error')"
echo reconnect-ok
"""


@pytest.mark.parametrize("preallocated", [True, False], ids=["overwrite", "allocating"])
def test_backend_sigkill_and_restart_during_guest_io(
    tmp_path: Path, sockdir: str, preallocated: bool
) -> None:
    """SIGKILL storvisor while the guest writes, start it again on the same socket: QEMU
    reconnects, the requests in flight are resubmitted, the guest sees no error and every
    byte it wrote is in the volume.

    ``overwrite`` rewrites clusters the volume already owns (one queue); ``allocating`` writes
    to a fresh thin volume, so the kill also lands between cluster allocations and their
    commit (two queues, two vCPUs: both queues are set up again after the restart).
    """
    queues = 1 if preallocated else 2
    ref, _ = make_volume(tmp_path / "home")
    if preallocated:
        with Home(ref.home) as home:
            volume = home.pool(ref.pool).open_volume(ref.volume)
            volume.write(0, b"\xa5" * (RECONNECT_MIB * MiB))
            volume.flush()
            volume.close()
    sock = f"{sockdir}/sv.sock"
    backend = StorvisorVhostBackend(ref, sock, num_queues=queues)
    with backend:
        args = vhost_user_blk_args(sock, queues=queues, reconnect=True)
        with Guest(RECONNECT_SCRIPT, qemu_args=args, cpus=queues, timeout=150) as guest:
            guest.wait_for_line("wrote 3", timeout=90)
            backend.kill()
            time.sleep(0.5)  # the guest's I/O now waits for a back-end
            console_while_down = guest.console
            backend.start()
            result = guest.wait()
        assert backend.stop() == 0, backend.output
    result.check()
    # The kill did land in the middle of the guest's writes: they stalled until the restart.
    assert f"wrote {RECONNECT_MIB - 1}" not in console_while_down
    assert "reconnect-ok" in result.console
    assert "errors-in-dmesg 0" in result.console
    assert "I/O error" not in result.console
    line = next(x for x in result.console.splitlines() if x.startswith("data-md5 "))
    guest_md5 = line.split()[1]
    data, _ = volume_through_nbd(ref, sockdir)
    assert hashlib.md5(data[: RECONNECT_MIB * MiB]).hexdigest() == guest_md5


GROW_SCRIPT = f"""
wait_for_block /dev/vda || exit 10
echo "size-before $(cat /sys/block/vda/size)"
echo grow-now
n=0
while [ "$(cat /sys/block/vda/size)" = "{DISK_SIZE // 512}" ]; do
    n=$((n + 1)); [ $n -gt 300 ] && {{ echo "size never changed"; exit 11; }}
    usleep 50000
done
after=$(cat /sys/block/vda/size)
echo "size-after $after"
printf 'storvisor-tail-marker' | dd of=/dev/vda bs=512 seek=$((after - 1)) count=1 \\
    conv=sync,fsync oflag=direct 2>/dev/null || exit 12
echo grow-ok
"""


def test_online_extend_reaches_the_guest(tmp_path: Path, sockdir: str) -> None:
    """Growing the volume while it is served changes the guest's disk size at once (virtio
    config-change notification), and the guest can write into the new space."""
    ref, _ = make_volume(tmp_path / "home")
    new_size = DISK_SIZE + 32 * MiB
    sock = f"{sockdir}/sv.sock"
    backend = StorvisorVhostBackend(ref, sock)
    with backend:
        with Guest(GROW_SCRIPT, qemu_args=vhost_user_blk_args(sock), timeout=90) as guest:
            guest.wait_for_line("grow-now", timeout=60)
            backend.grow(new_size)
            result = guest.wait()
        assert backend.stop() == 0, backend.output
    result.check()
    assert f"size-before {DISK_SIZE // 512}" in result.console
    assert f"size-after {new_size // 512}" in result.console
    data, _ = volume_through_nbd(ref, sockdir)
    assert len(data) == new_size
    assert data[-512:] == b"storvisor-tail-marker".ljust(512, b"\0")


READ_ONLY_SCRIPT = """
wait_for_block /dev/vda || exit 10
echo "ro-flag $(cat /sys/block/vda/ro)"
echo "serial [$(cat /sys/block/vda/serial)]"
echo "header [$(dd if=/dev/vda bs=512 count=1 2>/dev/null | head -c 16)]"
if dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2>/dev/null; then
    echo "write-accepted"
else
    echo "write-refused"
fi
"""


def test_read_only_export(disk_file: str, sockdir: str) -> None:
    """A read-only export shows up read-only in the guest, refuses writes, serves reads,
    and reports the serial it was given."""
    with open(disk_file, "r+b") as f:
        f.write(b"storvisor-header")
    sock = f"{sockdir}/ro.sock"
    backend = StorvisorVhostBackend(disk_file, sock, read_only=True, serial="sv-ro-0001")
    with backend:
        result = run_guest(READ_ONLY_SCRIPT, qemu_args=vhost_user_blk_args(sock), timeout=90)
    result.check()
    assert "ro-flag 1" in result.console
    assert "serial [sv-ro-0001]" in result.console
    assert "header [storvisor-header]" in result.console
    assert "write-refused" in result.console
    assert read_file_range(disk_file, 0, 4096) == b"storvisor-header".ljust(4096, b"\0")


def test_guest_script_failure_is_reported() -> None:
    """A missing disk surfaces as a non-zero status, not a pass."""
    with Guest("wait_for_block /dev/vda 1 || exit 10\n", timeout=60) as guest:
        result = guest.wait()
    assert result.status == 10
    assert "no /dev/vda" in result.console
