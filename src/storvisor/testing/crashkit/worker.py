"""The worker program, which runs a workload over an engine pool until it is killed, and
``WorkerProcess``, which runs it in a child process and kills it::

    python -m storvisor.testing.crashkit --home DIR --pool POOL --seed N --round R \\
        --log-fd FD [--ops N] [--flush-rate F] [--discards] [--exit] \\
        [--snapshots [--rollbacks] [--extends] [--volume-deletes] [--management-rate F]]

opens the Home, logs ``ready``, runs the workload over every volume of the pool (logging to
file descriptor ``FD``) and then sleeps until it is killed (or exits, with ``--exit``).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

from storvisor.errors import StorvisorError
from storvisor.testing.crashkit.log import FdLog, in_flight, parse_log
from storvisor.testing.crashkit.workload import Workload, run_workload
from storvisor.testing.crashkit.writers import EngineWriter


def main(argv: Sequence[str] | None = None) -> int:
    """Run the worker (see the module docstring). Exits 0 only when not killed first."""
    parser = argparse.ArgumentParser(prog="python -m storvisor.testing.crashkit")
    parser.add_argument("--home", required=True)
    parser.add_argument("--pool", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--round", type=int, default=0)
    parser.add_argument("--log-fd", type=int, required=True)
    parser.add_argument("--ops", type=int, default=400)
    parser.add_argument("--flush-rate", type=float, default=0.1)
    parser.add_argument("--management-rate", type=float, default=0.05)
    parser.add_argument("--discards", action="store_true")
    parser.add_argument("--snapshots", action="store_true")
    parser.add_argument("--rollbacks", action="store_true")
    parser.add_argument("--extends", action="store_true")
    parser.add_argument("--volume-deletes", action="store_true")
    parser.add_argument("--exit", action="store_true", help="exit instead of waiting to be killed")
    args = parser.parse_args(argv)

    from storvisor.engine.home import Home  # the worker is the only part that needs the engine

    log = FdLog(args.log_fd)
    home = Home(args.home)
    try:
        pool = home.pool(args.pool)
        volumes = {v.name: v.size for v in pool.volumes()}
        snapshots = {f"{v}@{s.name}": s.size for v in sorted(volumes) for s in pool.snapshots(v)}
        clones = {v.name: v.origin for v in pool.volumes() if v.origin is not None}
        log.append({"t": "ready", "pid": os.getpid()})
        workload = Workload(
            volumes=volumes,
            snapshots=snapshots,
            clones=clones,
            ops=args.ops,
            discards=args.discards,
            flush_rate=args.flush_rate,
            management_rate=args.management_rate,
            snapshot_ops=args.snapshots,
            rollbacks=args.rollbacks,
            extends=args.extends,
            volume_deletes=args.volume_deletes,
            name_prefix=f"r{args.round}",
        )
        writer = EngineWriter(pool)
        run_workload(writer, log, random.Random(args.seed), workload)
        log.append({"t": "idle"})
        if not args.exit:
            while True:
                time.sleep(3600)
        writer.close()
    except StorvisorError as e:
        print(f"crashkit worker: {e}", file=sys.stderr)
        return 1
    finally:
        home.close()
    return 0


class WorkerProcess:
    """The worker program in a child process, its log read from a pipe as it arrives.

    ``lines`` holds the raw log lines so far, ``ready`` is set once the worker has opened the
    Home, ``proc`` is the child. ``kill`` ends it and returns the parsed log; the caller
    decides whether the child was still running (``proc.returncode == -SIGKILL``).

    With ``kill_after_committed=N`` the worker is SIGKILLed as soon as its N-th
    ``committed`` record arrives (a management operation has just returned), before it can
    do much else; ``killed_early`` is set then.
    """

    def __init__(
        self,
        home: str | os.PathLike[str],
        *,
        seed: int,
        round_: int,
        ops: int,
        flush_rate: float,
        discards: bool,
        snapshots: bool,
        management_rate: float = 0.05,
        volume_deletes: bool = False,
        kill_after_committed: int | None = None,
        pool: str = "p",
    ) -> None:
        read_fd, write_fd = os.pipe()
        args = [
            sys.executable,
            "-m",
            "storvisor.testing.crashkit",
            f"--home={home}",
            f"--pool={pool}",
            f"--seed={seed}",
            f"--round={round_}",
            f"--log-fd={write_fd}",
            f"--ops={ops}",
            f"--flush-rate={flush_rate}",
            f"--management-rate={management_rate}",
        ]
        args += ["--discards"] * discards
        args += ["--snapshots", "--rollbacks", "--extends"] * snapshots
        args += ["--volume-deletes"] * (snapshots and volume_deletes)
        self.proc = subprocess.Popen(args, pass_fds=[write_fd], stderr=subprocess.PIPE)
        os.close(write_fd)
        self.lines: list[bytes] = []
        self.stderr = ""
        self.ready = threading.Event()
        self.killed_early = threading.Event()
        self._kill_after = kill_after_committed
        self._reader = threading.Thread(target=self._read, args=(read_fd,), daemon=True)
        self._reader.start()

    def _read(self, fd: int) -> None:
        committed = 0
        with os.fdopen(fd, "rb", buffering=0) as pipe:
            pending = b""
            while chunk := pipe.read(65536):
                pending += chunk
                *complete, pending = pending.split(b"\n")
                for line in complete:
                    self.lines.append(line + b"\n")
                    if line.startswith(b'{"t":"ready"'):
                        self.ready.set()
                    elif line.startswith(b'{"t":"committed"'):
                        committed += 1
                        if committed == self._kill_after:
                            self.proc.send_signal(signal.SIGKILL)
                            self.killed_early.set()
            if pending:
                self.lines.append(pending)

    def logged(self, count: int) -> bool:
        """Whether the worker has logged at least ``count`` records."""
        return len(self.lines) >= count

    def idle(self) -> bool:
        """Whether the worker has finished its workload."""
        return bool(self.lines) and self.lines[-1].startswith(b'{"t":"idle"')

    def wait_for(self, condition: Callable[[], bool], timeout: float = 30) -> None:
        """Wait until ``condition()`` holds, the worker is idle (its workload done) or has
        ended. Raises ``TimeoutError`` naming the operations in flight if ``timeout``
        passes first."""
        deadline = time.monotonic() + timeout
        while not condition() and not self.idle() and self.proc.poll() is None:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"the worker did not get there in {timeout} s; in flight: "
                    f"{in_flight(parse_log(list(self.lines)))}"
                )
            time.sleep(0.002)

    def kill(self) -> list[dict[str, object]]:
        """SIGKILL the worker (a no-op if it has ended), keep its stderr in ``stderr`` and
        return its parsed log."""
        self.proc.kill()
        _, stderr = self.proc.communicate(timeout=30)
        self.stderr = stderr.decode(errors="replace")
        self._reader.join(timeout=30)
        return parse_log(self.lines)
