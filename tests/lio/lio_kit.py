"""What the guest modules that serve volumes through a daemon share: a pool of volumes
made in this process, and the module's daemon, after which LIO is cleared of what a
failed test left."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))
from cli_harness import CLI, Daemon

from storvisor.engine.home import Home
from storvisor.engine.types import BackingSpec

VOLUME_SIZE = 64 << 20


def pool_of_volumes(home: Path, volumes: int) -> CLI:
    """Pool "p" on a sparse 1 GiB file beside ``home``, with volumes v0, v1, ... of 64 MiB,
    made in this process: CLI processes cost about 10 s each under TCG (the CLI's own
    commands are tested on the host). The CLI of ``home``."""
    made = Home(home)
    try:
        made.create_pool("p", [BackingSpec(str(home.parent / "pool.img"), 1 << 30)])
        for n in range(volumes):
            made.pool("p").create_volume(f"v{n}", VOLUME_SIZE)
    finally:
        made.close()
    return CLI(home)


@contextlib.contextmanager
def serving(home: Path) -> Iterator[Daemon]:
    """A daemon of ``home`` for a whole module (a start costs about 10 s under TCG). At the
    end it is killed and every LUN left in LIO is removed: tests remove their own exports
    while the daemon runs, since LIO takes about 90 s under TCG to remove a TCMU backstore
    whose daemon is gone."""
    daemon = Daemon(home).start(timeout=120)
    try:
        yield daemon
    finally:
        daemon.kill()
        from storvisor.exports.lio import Lio

        lio = Lio()
        for lun in lio.luns():
            lio.remove(lun.backstore)
