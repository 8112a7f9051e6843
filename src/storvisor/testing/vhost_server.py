"""``python -m storvisor.testing.vhost_server``: one vhost-user-blk export in its own process.

A small entry point for tests and benchmarks that need storvisor's back-end as a separate
process they can SIGKILL and restart (``storvisor.testing.vhost_backend.StorvisorVhostBackend``
drives it). It serves a raw file (``--file``) or a thin volume of a pool home (``--home DIR
--volume POOL/VOL``; served as the daemon serves it, from a data-plane process, unless
``--in-process``), prints ``READY`` once the socket listens, and on SIGTERM or SIGINT stops
serving, flushes and closes the device, and exits 0. Bad arguments print one line and exit 2.

A raw file with several queues is served as the daemon serves a volume: queue ``i`` in
process ``i % P`` (``P`` = min(queues, CPUs); ``--in-process`` keeps them all here), which
start with this one and end when it ends. Online extend (below) then only reaches slot 0.

Online extend: on SIGUSR1 it reads a size in bytes from the ``--grow-file``, grows the file or
volume to it, tells the front-end (``notify_config_change``) and prints ``GROWN <size>``; a
failure prints ``GROW FAILED: <reason>`` and the export carries on.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from storvisor.engine.device import BlockDevice, FileDevice
from storvisor.engine.home import Home
from storvisor.engine.pool import Pool
from storvisor.engine.volume import Volume
from storvisor.errors import StorvisorError
from storvisor.exports.vhost_user_blk import VhostUserBlkServer
from storvisor.exports.vhost_worker import VhostDataPlane
from storvisor.testing.vhost_backend import GROWN, READY


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; see the module docstring. Returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m storvisor.testing.vhost_server")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--file", help="raw file to serve")
    what.add_argument("--volume", help="POOL/VOL in the pool home given by --home")
    parser.add_argument("--home", help="pool home directory (with --volume)")
    parser.add_argument("--socket", required=True, help="Unix socket to listen on")
    parser.add_argument("--queues", type=int, default=1)
    parser.add_argument("--read-only", action="store_true")
    parser.add_argument("--serial", default=None, help="GET_ID serial (default: the volume's)")
    parser.add_argument("--grow-file", default=None, help="size to grow to on SIGUSR1")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="serve a volume from this process instead of a data-plane process (as the "
        "daemon does)",
    )
    parser.add_argument("--peer-fd", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--slot", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--slots", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.volume and (not args.home or "/" not in args.volume):
        parser.error("--volume POOL/VOL needs --home DIR")
    if args.peer_fd >= 0:  # a queue process of a raw file's export
        raw = FileDevice(args.file, read_only=args.read_only)
        VhostUserBlkServer(
            raw,
            args.socket,
            num_queues=args.queues,
            read_only=args.read_only,
            serial=args.serial or "",
            slot=args.slot,
            slots=args.slots,
        ).serve_peer(socket.socket(fileno=args.peer_fd))
        raw.close()
        return 0

    # Block the stop signals before any thread starts, so that only sigwait() sees them.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, {*stop_signals, signal.SIGUSR1})
    home: Home | None = None
    pool: Pool | None = None
    device: BlockDevice
    serial = args.serial or ""
    try:
        if args.file:
            device = FileDevice(args.file, read_only=args.read_only)
        else:
            pool_name, volume_name = args.volume.split("/", 1)
            home = Home(args.home)
            pool = home.pool(pool_name)
            volume = pool.open_volume(volume_name)
            serial = volume.serial if args.serial is None else args.serial
            device = volume
        server: VhostUserBlkServer | VhostDataPlane
        if isinstance(device, Volume) and not args.in_process:
            server = VhostDataPlane(
                device, args.socket, num_queues=args.queues, read_only=args.read_only, serial=serial
            )
        else:
            links = _queue_processes(args) if args.file and not args.in_process else []
            server = VhostUserBlkServer(
                device,
                args.socket,
                num_queues=args.queues,
                read_only=args.read_only,
                serial=serial,
                peers=links,
            )
        server.start()
    except (StorvisorError, OSError, ValueError) as e:
        print(f"vhost_server: {e}", file=sys.stderr)
        if home is not None:
            home.close()
        return 1
    print(READY, flush=True)
    while signal.sigwait({*stop_signals, signal.SIGUSR1}) == signal.SIGUSR1:
        try:
            size = int(Path(args.grow_file).read_text()) if args.grow_file else 0
            if pool is not None:
                pool.extend_volume(args.volume.split("/", 1)[1], size)
            elif isinstance(device, FileDevice) and size >= device.size:
                device.resize(size)
            else:
                raise StorvisorError(f"cannot grow to {size} bytes")
            server.notify_config_change()
        except (StorvisorError, OSError, ValueError) as e:
            print(f"GROW FAILED: {e}", flush=True)
        else:
            print(f"{GROWN} {size}", flush=True)
    server.close()
    if not device.read_only:
        device.flush()
    device.close()
    if home is not None:
        home.close()
    return 0


def _queue_processes(args: argparse.Namespace) -> list[socket.socket]:
    """Start the queue processes of a raw file's export, as the daemon does for a volume:
    ``min(queues, CPUs)`` slots, slot 0 being this process. Each opens the file itself (a
    flush anywhere syncs it for all) and ends when its link to this process closes."""
    slots = max(1, min(args.queues, os.cpu_count() or 1))
    links = []
    for slot in range(1, slots):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv = [sys.executable, "-m", "storvisor.testing.vhost_server", "--file", args.file]
        argv += ["--socket", args.socket, "--queues", str(args.queues)]
        argv += ["--peer-fd", str(theirs.fileno()), "--slot", str(slot), "--slots", str(slots)]
        if args.read_only:
            argv.append("--read-only")
        if args.serial:
            argv += ["--serial", args.serial]
        subprocess.Popen(argv, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()
        links.append(ours)
    return links


if __name__ == "__main__":
    sys.exit(main())
