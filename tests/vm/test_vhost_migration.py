"""Live migration of a QEMU guest whose disk is served by storvisor over vhost-user-blk.

A source QEMU (TCG, shared memfd RAM) and a destination QEMU started with ``-incoming`` each
attach a vhost-user-blk disk served by a ``VhostUserBlkServer`` in this process; both servers
serve the same ``FileDevice``. The guest keeps dropping its page cache and re-reading a known
pattern from the disk while the source migrates to the destination, so the back-end writes
guest RAM during migration. A 1 ms downtime limit and, past the first pass, a 2 MiB/s
bandwidth limit hold the switchover back while the guest keeps pages dirty (two readers, so
that the back-end is writing guest RAM while either runs its tools); after the first pass
over RAM the host changes the pattern and sets a mark on the disk, the guest reads the disk
once more into its page cache, and only then may migration complete. Unless the back-end's
writes reach QEMU's dirty log, migration converges too early (the guest looks idle) or the
destination holds stale page-cache pages. The destination starts paused: its whole RAM must
equal the stopped source's, page for page. Then it runs, the guest prints the md5 of its
copy, of the cached read and of a direct read, writes a second pattern, and the host checks
those bytes in the file.

The guest's RAM is 8 KiB more than a multiple of 256 KiB. QEMU before 9.0 loses TCG stores
during migration when a RAM block is a multiple of 64 pages (its fast dirty-bitmap sync does
not reset the TCG TLB's dirty tracking; fixed upstream by "physmem: Fix migration dirty bitmap
coherency with TCG memory access"): the destination then differs from the source in a few
pages the guest CPU wrote, whatever the disk's back-end, and its kernel crashes or hangs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from storvisor.engine.device import FileDevice
from storvisor.exports.vhost_user_blk import VhostUserBlkServer
from storvisor.testing.guest import Guest, vhost_user_blk_args

pytestmark = [
    pytest.mark.slow,
    pytest.mark.vm,
    pytest.mark.requires(shutil.which("qemu-system-x86_64") is not None, "needs QEMU"),
]

MiB = 1 << 20
DISK_SIZE = 64 * MiB
READ_LEN = 16 * MiB
MARK_AT = 40 * MiB
# With pages zeroed by the CPU on allocation, QEMU itself would see every fresh page cache page
# dirty and resend it, hiding a back-end that forgets to log its writes.
GUEST_APPEND = "init_on_alloc=0 init_on_free=0"
WRITE_AT = 48 * MiB
WRITE_LEN = 1 * MiB
MEMORY_MIB = 256
RAM_TAIL_KIB = 8  # see the module docstring
PAGE = 4096

SCRIPT = f"""
wait_for_block /dev/vda || exit 10
mark() {{
    dd if=/dev/vda bs=4096 skip={MARK_AT // 4096} count=1 iflag=direct 2>/dev/null \\
        | head -c 2 | tr -d '\\000'
}}
read_disk() {{
    echo 3 > /proc/sys/vm/drop_caches
    dd if=/dev/vda of="$1" bs=4k count={READ_LEN // 4096} 2>/dev/null || exit 11
}}
# a second reader keeps the back-end writing guest RAM while the first one runs its tools
(while :; do read_disk /dev/null; done) &
other=$!
n=0
while [ "$(mark)" != ST ]; do
    read_disk /dev/null
    n=$((n + 1))
    [ "$n" -eq 1 ] && echo reader-started
    [ "$n" -gt 100000 ] && exit 12
done
read_disk snap
echo "final-read-done after $n"
kill $other
wait $other 2>/dev/null
while [ "$(mark)" != GO ]; do usleep 20000; done
echo "md5-snap $(md5sum < snap | cut -d' ' -f1)"
echo "md5-cached $(dd if=/dev/vda bs=1M count={READ_LEN // MiB} 2>/dev/null | md5sum \\
    | cut -d' ' -f1)"
echo "md5-direct $(dd if=/dev/vda bs=1M count={READ_LEN // MiB} iflag=direct 2>/dev/null \\
    | md5sum | cut -d' ' -f1)"
seq -w 0 999999 | head -c {WRITE_LEN} > pattern
dd if=pattern of=/dev/vda bs=1M seek={WRITE_AT // MiB} oflag=direct conv=fsync || exit 13
echo after-migration-write-ok
"""


def pattern(size: int) -> bytes:
    """What ``seq -w 0 999999 | head -c SIZE`` prints inside the guest."""
    return "".join(f"{i:06d}\n" for i in range(size // 7 + 1)).encode()[:size]


class Qmp:
    """A minimal QMP client over a Unix socket."""

    def __init__(self, path: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._sock.settimeout(timeout)
                self._sock.connect(path)
                break
            except OSError:
                self._sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self._file = self._sock.makefile("rwb")
        self._recv()  # greeting
        self.command("qmp_capabilities")

    def _recv(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise ConnectionError("QMP connection closed")
        message: dict[str, Any] = json.loads(line)
        return message

    def command(self, name: str, **arguments: Any) -> Any:
        request: dict[str, Any] = {"execute": name}
        if arguments:
            request["arguments"] = arguments
        self._file.write(json.dumps(request).encode() + b"\n")
        self._file.flush()
        while True:
            reply = self._recv()
            if "event" in reply:
                continue
            if "error" in reply:
                raise RuntimeError(f"QMP {name}: {reply['error']}")
            return reply["return"]

    def close(self) -> None:
        self._file.close()
        self._sock.close()


@pytest.fixture
def sockdir() -> Iterator[str]:
    path = f"/tmp/sv-mig-{os.getpid()}-{os.urandom(3).hex()}"
    os.mkdir(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def wait_migration(qmp: Qmp, done: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
    """Poll ``query-migrate`` until ``done`` holds; fail if migration fails or stalls."""
    deadline = time.monotonic() + 60
    while True:
        info: dict[str, Any] = qmp.command("query-migrate")
        if done(info):
            return info
        assert info.get("status") in ("setup", "active", "device", "pre-switchover"), info
        assert time.monotonic() < deadline, f"no {what} in time: {info}"
        time.sleep(0.05)


def differing_pages(a: Path, b: Path) -> list[int]:
    """Guest-physical addresses of the 4 KiB pages in which two RAM dumps differ."""
    found: list[int] = []
    with a.open("rb") as fa, b.open("rb") as fb:
        base = 0
        while True:
            x, y = fa.read(MiB), fb.read(MiB)
            if len(x) != len(y):
                raise AssertionError(f"RAM dumps differ in size near {base:#x}")
            if not x:
                return found
            if x != y:
                found.extend(
                    base + i for i in range(0, len(x), PAGE) if x[i : i + PAGE] != y[i : i + PAGE]
                )
            base += len(x)


def set_mark(device: FileDevice, mark: bytes) -> None:
    device.write(MARK_AT, mark.ljust(4096, b"\0"))
    device.flush()


def test_live_migration_keeps_back_end_writes(tmp_path: Path, sockdir: str) -> None:
    """Pages the back-end writes during migration reach the destination, and the destination
    carries on serving the guest from the same device."""
    disk = tmp_path / "disk.raw"
    with disk.open("wb") as f:
        f.write(os.urandom(READ_LEN))
        f.truncate(DISK_SIZE)
    fresh = os.urandom(READ_LEN)

    device = FileDevice(str(disk))
    sock_a, sock_b = f"{sockdir}/a.sock", f"{sockdir}/b.sock"
    qmp_path_a, qmp_path_b = f"{sockdir}/qa", f"{sockdir}/qb"
    mig = f"{sockdir}/mig.sock"
    server_a = VhostUserBlkServer(device, sock_a)
    server_b = VhostUserBlkServer(device, sock_b)
    server_a.start()
    server_b.start()
    qmps: list[Qmp] = []
    try:
        source = Guest(
            SCRIPT,
            qemu_args=[
                *vhost_user_blk_args(sock_a),
                "-qmp",
                f"unix:{qmp_path_a},server=on,wait=off",
            ],
            timeout=90,
            append=GUEST_APPEND,
            memory_mib=MEMORY_MIB,
            ram_tail_kib=RAM_TAIL_KIB,
        )
        dest = Guest(
            SCRIPT,
            qemu_args=[
                *vhost_user_blk_args(sock_b),
                "-qmp",
                f"unix:{qmp_path_b},server=on,wait=off",
                "-incoming",
                f"unix:{mig}",
                "-S",  # stays paused after migration until the RAM check
            ],
            timeout=90,
            append=GUEST_APPEND,
            memory_mib=MEMORY_MIB,
            ram_tail_kib=RAM_TAIL_KIB,
        )
        with source, dest:
            qmp_a = Qmp(qmp_path_a)
            qmps.append(qmp_a)
            qmp_b = Qmp(qmp_path_b)
            qmps.append(qmp_b)
            source.wait_for_line("reader-started")
            # A 1 ms downtime limit keeps the source from switching over while the guest reads.
            qmp_a.command("migrate-set-parameters", **{"downtime-limit": 1})
            qmp_a.command("migrate", uri=f"unix:{mig}")
            # Past the first pass over RAM, the page cache pages the guest reads into next
            # were already sent: only the back-end's dirty log gets them sent again.
            wait_migration(
                qmp_a, lambda i: i.get("ram", {}).get("dirty-sync-count", 0) >= 2, "second pass"
            )
            # Throttled to 2 MiB/s, migration may converge only when a sync finds no dirty page
            # at all (its threshold, bandwidth x downtime limit, is under one page): a guest that
            # the host's load leaves idle for a moment no longer lets it through.
            bandwidth = qmp_a.command("query-migrate-parameters")["max-bandwidth"]
            qmp_a.command("migrate-set-parameters", **{"max-bandwidth": 2 * MiB})
            device.write(0, fresh)
            set_mark(device, b"ST")
            # The last read must run on the source, during migration. Had the back-end's
            # writes gone unlogged, the guest would seem idle and migration would converge now.
            deadline = time.monotonic() + 60
            while "final-read-done" not in source.console:
                info = qmp_a.command("query-migrate")
                assert info["status"] == "active", f"migration converged during reads: {info}"
                assert time.monotonic() < deadline, "the guest did not finish its last read"
                time.sleep(0.05)
            qmp_a.command(
                "migrate-set-parameters", **{"downtime-limit": 300, "max-bandwidth": bandwidth}
            )
            wait_migration(qmp_a, lambda i: i.get("status") == "completed", "completion")
            # Every page the back-end wrote while logging reached the destination, as did
            # everything else: the paused destination's RAM is the stopped source's.
            wait_migration(qmp_b, lambda i: i.get("status") == "completed", "arrival")
            ram = MEMORY_MIB * MiB + RAM_TAIL_KIB * 1024
            dump_a, dump_b = tmp_path / "ram-source", tmp_path / "ram-destination"
            qmp_a.command("pmemsave", val=0, size=ram, filename=str(dump_a))
            qmp_b.command("pmemsave", val=0, size=ram, filename=str(dump_b))
            stale = differing_pages(dump_a, dump_b)
            assert not stale, f"destination RAM differs in pages {[hex(p) for p in stale[:20]]}"
            dump_a.unlink()
            dump_b.unlink()
            qmp_b.command("cont")
            deadline = time.monotonic() + 20
            while qmp_b.command("query-status")["status"] != "running":
                assert time.monotonic() < deadline, "destination did not resume"
                time.sleep(0.05)
            set_mark(device, b"GO")
            dest.wait_for_line("after-migration-write-ok", timeout=60)
            console = dest.console
            # The destination's console starts where the migrated guest was.
            assert "reader-started" not in console, console
            values = {
                line.split()[0]: line.split()[1]
                for line in console.splitlines()
                if line.startswith("md5-")
            }
            expected = hashlib.md5(fresh).hexdigest()
            assert values == {
                "md5-snap": expected,
                "md5-cached": expected,
                "md5-direct": expected,
            }, console
            with disk.open("rb") as f:
                f.seek(WRITE_AT)
                assert f.read(WRITE_LEN) == pattern(WRITE_LEN)
    finally:
        for qmp in qmps:
            qmp.close()
        server_a.close()
        server_b.close()
        device.close()
