"""Volumes served through the daemon's NBD data planes in a child process, measured with
fio's ``nbd`` engine: what the benchmarks that compare two pools through the planes share.

The benchmark script runs itself as the child (``script --serve ARGS... SOCKET``), which
builds its HOME, calls ``serve`` with the pools to export (each pool's volume ``v`` under
the pool's name) and waits; ``Planes`` starts that child and stops it, and ``fio_iops``
runs one fio job against one export.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

BLOCK = 4096
QD = 32


def serve(home: Any, pools: Sequence[str], sock: str) -> None:
    """In the child: export volume ``v`` of each of ``pools`` of ``home`` (a ``Home``) under
    the pool's name through NBD data planes on the Unix socket ``sock``, say ``ready``, and
    serve until a line comes on stdin."""
    from storvisor.engine.iostats import StatsSet
    from storvisor.exports.nbd import NBDExport, NBDServer
    from storvisor.exports.nbd_worker import DataPlanes

    def opener(name: str):  # type: ignore[no-untyped-def]
        return lambda: home.pool(name).open_volume("v")

    planes = DataPlanes()
    planes.start()
    server = NBDServer(handoff=planes.hand_over)
    for name in pools:
        server.add_export(NBDExport(name, opener(name)))
        planes.add_export(name, opener(name), name, False, StatsSet(name))
    server.listen_unix(sock)
    server.start()
    print("ready", flush=True)
    sys.stdin.readline()
    server.close()
    planes.close()
    home.close()


class Planes:
    """The child serving the exports: ``Planes(script, args, work)`` runs ``script --serve
    *args SOCKET`` and waits for it to serve."""

    def __init__(self, script: str, args: Sequence[str], work: Path) -> None:
        self.sock = str(work / "nbd.sock")
        self._child = subprocess.Popen(
            [sys.executable, script, "--serve", *args, self.sock],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._child.stdout is not None
        if self._child.stdout.readline().strip() != "ready":
            self._child.kill()
            raise SystemExit("the serving process did not start")

    def __enter__(self) -> Planes:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._child.stdin is not None
        self._child.stdin.write("\n")
        self._child.stdin.flush()
        self._child.wait(timeout=120)

    def fio_iops(self, name: str, rw: str, seconds: float, size: int) -> float:
        """IOPS of fio's ``rw`` (``randread``, ``randwrite``) in 4 KiB requests at queue
        depth ``QD`` for ``seconds`` on export ``name`` (``size`` bytes of it)."""
        fio = shutil.which("fio")
        if fio is None:
            raise SystemExit("this part needs fio (Debian package fio)")
        uri = f"nbd+unix:///{name}?socket={self.sock}"
        args = [fio, "--name=b", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}",
                f"--bs={BLOCK}", f"--iodepth={QD}", f"--runtime={seconds:g}", "--time_based",
                "--output-format=json", f"--size={size}"]  # fmt: skip
        out = subprocess.run(args, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"fio on {name} failed: {out.stdout}{out.stderr}")
        job = json.loads(out.stdout[out.stdout.index("{") :])["jobs"][0]
        return float(job[rw.removeprefix("rand")]["iops"])
