"""One round of a crash test: the crash kit's worker (``crashkit.WorkerProcess``) on a HOME,
ended by SIGKILL (``kill9_round``) or by a power cut of the file system under the HOME
(``powercut_round``). Each returns the worker's records, for ``crashkit.History``; the test
then checks the HOME (``crashkit.check_home``) and carries what survived to the next round.
"""

from __future__ import annotations

import functools
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from powercuts import Mount
from powercuts import point as _point
from storvisor.engine.s3 import S3Spec
from storvisor.testing import crashkit
from storvisor.testing.crashkit.writers import EngineReader

Records = list[dict[str, object]]


def seeded() -> tuple[int, random.Random]:
    """The seed of a crash test (``STORVISOR_CRASH_SEED`` replays one) and its generator."""
    seed = int(os.environ.get("STORVISOR_CRASH_SEED", random.randrange(1 << 32)))
    return seed, random.Random(seed)


def worker_args(
    rng: random.Random,
    round_: int,
    *,
    ops: int = 400,
    flush_rates: tuple[float, ...] = (0.1, 0.02),
    discards: bool = True,
    snapshots: bool = True,
    **more: Any,
) -> dict[str, Any]:
    """The arguments of one round's worker (``crashkit.WorkerProcess``; ``more`` as those)."""
    return {
        "seed": rng.randrange(1 << 32),
        "round_": round_,
        "ops": ops,
        "flush_rate": rng.choice(flush_rates),
        "discards": discards,
        "snapshots": snapshots,
        **more,
    }


def kill9_round(
    home: Path,
    where: str,
    rng: random.Random,
    worker_args: dict[str, Any],
    *,
    logged: int | None = None,
    opening: float | None = None,
    committed: bool = False,
    ready_timeout: float = 60,
    jitter: float = 0.05,
) -> Records:
    """Run ``WorkerProcess(home, **worker_args)`` and SIGKILL it: ``opening`` seconds after
    its start (while it opens the HOME), right after a management operation returned
    (``committed``; ``worker_args`` has ``kill_after_committed``), or once it logged
    ``logged`` operations and up to ``jitter`` seconds more."""
    worker = crashkit.WorkerProcess(home, **worker_args)
    try:
        if opening is not None:
            time.sleep(opening)
        else:
            assert worker.ready.wait(ready_timeout), (
                f"{where}: worker never became ready: {worker.stderr}"
            )
            if committed:
                worker.wait_for(worker.killed_early.is_set, timeout=60)
            else:
                assert logged is not None
                worker.wait_for(functools.partial(worker.logged, logged), timeout=60)
                time.sleep(rng.uniform(0.0, jitter))
    except TimeoutError as e:
        worker.kill()
        raise AssertionError(f"{where}: {e}; worker stderr: {worker.stderr}") from e
    records = worker.kill()
    assert worker.proc.returncode == -signal.SIGKILL, f"{where}: worker died: {worker.stderr}"
    return records


@dataclass(frozen=True)
class CutDisk:
    """Stable storage (``backing``) that the power-cut file system serves at ``mountpoint``
    during a round; a test keeps its HOME under ``link``, which points at ``backing`` between
    rounds (files such as the catalog record paths under it)."""

    backing: Path
    mountpoint: Path
    link: Path

    @classmethod
    def make(cls, tmp_path: Path) -> CutDisk:
        disk = cls(tmp_path / "backing", tmp_path / "mnt", tmp_path / "disk")
        disk.backing.mkdir()
        disk.mountpoint.mkdir()
        _point(disk.link, disk.backing)
        return disk


def cut_schedule(
    rng: random.Random,
    round_: int,
    rounds: int,
    *,
    syncs: int,
    ops: int,
    opening: bool = True,
) -> dict[str, Any]:
    """When ``powercut_round`` cuts in round ``round_`` of ``rounds``: while the worker opens
    the HOME (and recovers from the last cut) in the last round, with ``opening``; else at
    one of the first ``syncs`` syncs (the file system cuts by itself) or after up to ``ops``
    operations, in turn."""
    if opening and round_ == rounds - 1:
        return {"opening": rng.uniform(0.0, 0.5)}
    if round_ % 2 == 0:
        return {"at_sync": rng.randrange(1, syncs)}
    return {"logged": rng.randrange(10, ops)}


def powercut_round(
    disk: CutDisk,
    home: Path,
    where: str,
    rng: random.Random,
    worker_args: dict[str, Any],
    *,
    at_sync: int | None = None,
    opening: float | None = None,
    logged: int | None = None,
    jitter: float = 0.02,
) -> Records:
    """Run ``WorkerProcess(home, **worker_args)`` on the power-cut file system (``home`` is
    under ``disk.link``) and cut the power: at the file system's ``at_sync``-th sync (it cuts
    by itself), ``opening`` seconds after the start, or once the worker logged ``logged``
    operations and up to ``jitter`` seconds more."""
    _point(disk.link, disk.mountpoint)
    mount = Mount(
        disk.backing,
        disk.mountpoint,
        writeback=rng.choice([0.0, 0.1]),
        seed=rng.randrange(1 << 32),
        cut_at_sync=at_sync,
    )
    try:
        worker = crashkit.WorkerProcess(home, **worker_args)
        try:
            if at_sync is not None:
                worker.wait_for(mount.has_cut, timeout=60)
            elif opening is not None:
                time.sleep(opening)
            else:
                assert logged is not None
                assert worker.ready.wait(60), f"{where}: worker never became ready"
                worker.wait_for(functools.partial(worker.logged, logged), timeout=60)
                time.sleep(rng.uniform(0.0, jitter))
        except TimeoutError as e:
            worker.kill()
            raise AssertionError(f"{where}: {e}; worker stderr: {worker.stderr}") from e
        alive = worker.proc.poll() is None
        cut_itself = mount.has_cut()  # the worker then fails, and may end
        mount.cut()
        records = worker.kill()
        assert alive or cut_itself, f"{where}: worker ended before the cut: {worker.stderr}"
    finally:
        mount.close()
    _point(disk.link, disk.backing)
    return records


def check_bucket_alone(
    home: Path, spec: S3Spec, history: crashkit.History, where: str, *, force: bool = False
) -> None:
    """Import the S3 pool ``p`` of ``spec`` into a new HOME (another host: the bucket alone;
    ``force``: the last host died holding it) and require fsck clean and ``history``."""
    from storvisor.engine.home import Home

    other = Home(home)
    try:
        other.import_s3_pool("p", spec, force=force)
        pool = other.pool("p")
        report = pool.fsck()
        assert report.clean, f"{where}: fsck of the bucket's pool: {report}"
        problems = history.verify(EngineReader(pool))
        assert not problems, f"{where}: the bucket differs: " + "; ".join(map(str, problems))
    finally:
        other.close()
