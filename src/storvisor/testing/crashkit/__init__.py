"""Crash-consistency kit: a random workload, a durability log and a checker.

Theory of operation
-------------------
A workload (``run_workload``, module ``workload``) issues writes, FUA writes, discards,
write-zeroes, flushes and management operations (snapshot, clone, flatten, rollback, extend,
snapshot and volume deletion, export removal) through a ``Writer`` (module ``writers``). It
appends a record of each operation to a ``Log`` (module ``log``) *before* issuing it, and
one after it completed: ``done``, ``durable`` for a flush, ``committed`` for a management
operation that is durable on return. Data is never logged: ``payload(seed, length)``
regenerates a write's bytes.

Whatever issues the operations is then killed at a random moment, or right after a
management operation returned. ``History`` (module ``history``) replays the log and checks
every volume, snapshot and clone read back after the restart against the contract of a disk
with a volatile write cache, where a returned management operation is a durability point
for everything completed before it and a snapshot is the exact point its volume continues
from (see that module for the rule).

``EngineWriter`` drives a pool in this process (the worker program, module ``worker``, run
as ``python -m storvisor.testing.crashkit``, in a child process that ``WorkerProcess``
kills); ``NbdWriter`` and ``VhostWriter`` drive a daemon over NBD or vhost-user-blk and its
management API (the workload then runs in the checking process with a ``ListLog``, and the
daemon is what gets killed).
"""

from storvisor.testing.crashkit.history import History, Op, Problem, Target, check_home
from storvisor.testing.crashkit.log import (
    SECTOR,
    FdLog,
    ListLog,
    Log,
    in_flight,
    parse_log,
    payload,
)
from storvisor.testing.crashkit.worker import WorkerProcess, main
from storvisor.testing.crashkit.workload import Sequencer, Workload, run_workload
from storvisor.testing.crashkit.writers import (
    NBD_CMD_FLAG_FUA,
    NBD_CMD_FLAG_NO_HOLE,
    EngineReader,
    EngineWriter,
    Management,
    NbdHandle,
    NbdWriter,
    PoolLike,
    Reader,
    VhostHandle,
    VhostWriter,
    Writer,
)

__all__ = [
    "NBD_CMD_FLAG_FUA",
    "NBD_CMD_FLAG_NO_HOLE",
    "SECTOR",
    "EngineReader",
    "EngineWriter",
    "FdLog",
    "History",
    "ListLog",
    "Log",
    "Management",
    "NbdHandle",
    "NbdWriter",
    "Op",
    "PoolLike",
    "Problem",
    "Reader",
    "Sequencer",
    "Target",
    "VhostHandle",
    "VhostWriter",
    "WorkerProcess",
    "Workload",
    "Writer",
    "check_home",
    "in_flight",
    "main",
    "parse_log",
    "payload",
    "run_workload",
]
