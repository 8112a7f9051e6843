"""NBD connections to the daemon are served by its data-plane processes: clients are spread
over them, a killed one is replaced (its clients lose their connection, the others do not
notice), and every write reaches the volume."""

from __future__ import annotations

import os
import signal
import time

from prereq import require, require_module
from storvisor.api.client import Client
from storvisor.testing import procs

nbd = require_module("nbd", "python3-libnbd is not installed")


def _alive(handle) -> bool:  # type: ignore[no-untyped-def]
    try:
        handle.pread(512, 0)
        return True
    except nbd.Error:
        return False


def test_clients_are_served_by_data_plane_processes(cli, daemon, tmp_path):
    require((os.cpu_count() or 1) >= 2, "one CPU: one data-plane process, no spreading to check")
    cli("pool", "create", "p", "--backing", f"{tmp_path}/disk.img:1G")
    cli("volume", "create", "p/v", "--size", "64M")
    uri = cli("export", "nbd", "p/v").out.strip()
    workers = procs.data_planes(daemon.proc.pid)
    assert len(workers) == (os.cpu_count() or 1)

    handles = []
    for i in range(2 * len(workers)):
        h = nbd.NBD()
        h.connect_uri(uri)
        h.pwrite(bytes([i + 1]) * 65536, i * 65536)  # allocating: done by the daemon
        h.pwrite(bytes([i + 0x41]) * 512, i * 65536)  # in place: done by the data plane
        handles.append(h)
    handles[0].flush()

    os.kill(workers[0], signal.SIGKILL)
    deadline = time.monotonic() + 15
    while True:
        now = procs.data_planes(daemon.proc.pid)
        if len(now) == len(workers) and workers[0] not in now:
            break
        assert time.monotonic() < deadline, "the killed data plane was not replaced"
        time.sleep(0.05)
    alive = [_alive(h) for h in handles]
    if len(workers) > 1:
        assert alive.count(False) == len(handles) // len(workers), alive  # its clients only
    assert not all(alive)

    again = nbd.NBD()
    again.connect_uri(uri)
    for i in range(len(handles)):
        data = again.pread(65536, i * 65536)
        assert data == bytes([i + 0x41]) * 512 + bytes([i + 1]) * (65536 - 512), i


def test_removing_an_export_closes_its_connections_before_it_returns(cli, daemon, tmp_path):
    """``export remove`` returns once the data planes' connections to the volume have closed
    their handles: a rollback or a delete right after it finds the volume closed."""
    cli("pool", "create", "p", "--backing", f"{tmp_path}/disk.img:1G")
    for round_ in range(8):
        cli("volume", "create", f"p/v{round_}", "--size", "16M")
        uri = cli("export", "nbd", f"p/v{round_}").out.strip()
        handles = []
        for i in range(3):
            h = nbd.NBD()
            h.connect_uri(uri)
            h.pwrite(bytes([i + 1]) * 65536, i * 65536)
            handles.append(h)
        api = Client.for_home(daemon.home)
        assert api is not None
        api.remove_export(f"p/v{round_}")
        api.delete_volume("p", f"v{round_}")  # Conflict "is open" while a handle lives
        assert not any(_alive(h) for h in handles)
