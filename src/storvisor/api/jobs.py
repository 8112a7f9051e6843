"""Long operations run as jobs: started by one API call, watched and cancelled by others.

A job runs its work in a thread and reports progress (bytes done of a total) through a
``JobProgress``; ``JobInfo`` adds the rate and an ETA. Every job is recorded in
``HOME/jobs/ID.json`` when it starts and when it ends (not on every progress step). Each
record names the undo of a half-done job (``cleanup``: the exports and volumes it created), so
a job cut by a daemon crash is found still ``running`` at the next start, undone, and reported
``failed``: it never stays half-applied. Finished records are kept, the newest ``KEEP`` of them.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from storvisor.api.codec import decode, encode, save_json
from storvisor.errors import Conflict, InvalidArgument, NotFound, StorvisorError

log = logging.getLogger(__name__)

JOBS_DIR = "jobs"
KEEP = 100


class JobState(enum.Enum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class Cleanup:
    """What undoing a half-done job removes: exports first, then volumes (``POOL/VOL``),
    then files (a partly written image)."""

    exports: tuple[str, ...] = ()
    volumes: tuple[str, ...] = ()
    files: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class JobInfo:
    """A job as the API shows it. ``rate`` is bytes per second since the start; ``eta`` the
    seconds left at that rate (``None`` when unknown)."""

    id: str
    kind: str
    target: str
    state: JobState
    done: int
    total: int
    started: float
    finished: float | None = None
    rate: float = 0.0
    eta: float | None = None
    error: str | None = None
    cleanup: Cleanup = field(default_factory=Cleanup)


class JobCancelled(StorvisorError):
    """Raised inside a job's work when it is cancelled."""


class JobProgress:
    """Handed to a job's work: ``update`` progress, ``check`` for cancellation."""

    def __init__(self, job: _Job) -> None:
        self._job = job

    @property
    def cancelled(self) -> bool:
        return self._job.cancel.is_set()

    def check(self) -> None:
        if self._job.cancel.is_set():
            raise JobCancelled("cancelled")

    def update(self, done: int, total: int | None = None) -> None:
        with self._job.lock:
            self._job.done = done
            if total is not None:
                self._job.total = total

    def on_cancel(self, action: Callable[[], None] | None) -> None:
        """Run ``action`` (e.g. kill a child process) when the job is cancelled."""
        self._job.on_cancel = action
        if action is not None and self._job.cancel.is_set():
            action()


@dataclass
class _Job:
    info: JobInfo
    lock: threading.Lock = field(default_factory=threading.Lock)
    cancel: threading.Event = field(default_factory=threading.Event)
    on_cancel: Callable[[], None] | None = None
    done: int = 0
    total: int = 0
    thread: threading.Thread | None = None


Work = Callable[[JobProgress], None]
Undo = Callable[[Cleanup], None]


class JobManager:
    """The jobs of one HOME. ``undo`` removes what a ``Cleanup`` names (given by the service);
    ``recover`` undoes the jobs a crash cut and marks them failed."""

    def __init__(self, home: Path, undo: Undo) -> None:
        self._dir = home / JOBS_DIR
        self._undo = undo
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}

    # -- records -------------------------------------------------------------------------

    def _path(self, job_id: str) -> Path:
        return self._dir / f"{job_id}.json"

    def _save(self, info: JobInfo) -> None:
        self._dir.mkdir(mode=0o700, exist_ok=True)
        save_json(self._path(info.id), encode(info))

    def _records(self) -> list[JobInfo]:
        found: list[JobInfo] = []
        if not self._dir.is_dir():
            return found
        for path in self._dir.glob("*.json"):
            try:
                found.append(decode(JobInfo, json.loads(path.read_text())))
            except (OSError, ValueError, StorvisorError) as e:
                log.warning("ignoring unreadable job record %s: %s", path, e)
        return found

    def recover(self) -> list[JobInfo]:
        """Undo every job recorded as running (a crash cut it) and record it failed."""
        undone: list[JobInfo] = []
        for info in self._records():
            if info.state is not JobState.RUNNING or info.id in self._jobs:
                continue
            error = "interrupted by a daemon restart; its partial result was removed"
            try:
                self._undo(info.cleanup)
            except StorvisorError as e:
                error = f"interrupted by a daemon restart; undoing it failed: {e}"
            failed = replace(info, state=JobState.FAILED, finished=time.time(), error=error)
            self._save(failed)
            log.warning("job %s (%s %s): %s", info.id, info.kind, info.target, error)
            undone.append(failed)
        return undone

    def _prune(self) -> None:
        finished = sorted(
            (i for i in self._records() if i.state is not JobState.RUNNING),
            key=lambda i: i.finished or 0.0,
        )
        for info in finished[: max(0, len(finished) - KEEP)]:
            with contextlib.suppress(FileNotFoundError):
                self._path(info.id).unlink()

    # -- running -------------------------------------------------------------------------

    def create(self, kind: str, target: str, cleanup: Cleanup) -> str:
        """Record a job before it changes anything (so that a crash from here on is undone);
        ``run`` starts it, ``abandon`` undoes and forgets it if preparing it failed."""
        with self._lock:
            for job in self._jobs.values():
                if job.info.target == target and job.info.state is JobState.RUNNING:
                    raise Conflict(f"job {job.info.id} ({job.info.kind}) is running on {target}")
            info = JobInfo(
                id=secrets.token_hex(6),
                kind=kind,
                target=target,
                state=JobState.RUNNING,
                done=0,
                total=0,
                started=time.time(),
                cleanup=cleanup,
            )
            self._save(info)
            self._jobs[info.id] = _Job(info)
        return info.id

    def abandon(self, job_id: str) -> None:
        """Undo a created job that never ran and drop its record (it did not happen)."""
        with self._lock:
            job = self._jobs.pop(job_id)
        try:
            self._undo(job.info.cleanup)
        finally:
            with contextlib.suppress(FileNotFoundError):
                self._path(job_id).unlink()

    def run(self, job_id: str, work: Work) -> JobInfo:
        """Run ``work`` in a thread; the job's cleanup is undone if it fails, is cancelled or
        is cut by a crash."""
        with self._lock:
            job = self._jobs[job_id]
        job.thread = threading.Thread(
            target=self._run, args=(job, work), name=f"job-{job_id}", daemon=True
        )
        job.thread.start()
        return self._info(job)

    def _run(self, job: _Job, work: Work) -> None:
        state, error = JobState.SUCCEEDED, None
        try:
            work(JobProgress(job))
            if job.cancel.is_set():
                raise JobCancelled("cancelled")
        except JobCancelled:
            state, error = JobState.CANCELLED, "cancelled"
        except StorvisorError as e:
            state, error = JobState.FAILED, str(e)
        except Exception as e:  # a bug fails the job, not the daemon
            log.exception("job %s failed", job.info.id)
            state, error = JobState.FAILED, f"internal error: {e}"
        if state is not JobState.SUCCEEDED:
            try:
                self._undo(job.info.cleanup)
            except StorvisorError as e:
                error = f"{error}; undoing it failed: {e}"
        elif job.info.cleanup.exports:  # temporary exports go even on success
            with contextlib.suppress(StorvisorError):
                self._undo(Cleanup(exports=job.info.cleanup.exports))
        with job.lock:
            if state is JobState.SUCCEEDED:
                job.done = job.total
            finished = time.time()
            job.info = replace(
                job.info,
                state=state,
                error=error,
                finished=finished,
                done=job.done,
                total=job.total,
            )
        self._save(job.info)
        self._prune()
        if error:
            info = job.info
            what = f"job {info.id} ({info.kind} {info.target})"
            log.warning("%s %s: %s", what, state.value, error)

    def _info(self, job: _Job) -> JobInfo:
        with job.lock:
            info, done, total = job.info, job.done, job.total
        end = info.finished or time.time()
        elapsed = max(end - info.started, 1e-6)
        rate = done / elapsed
        eta = None
        if info.state is JobState.RUNNING and rate > 0 and total >= done:
            eta = (total - done) / rate
        return replace(info, done=done, total=total, rate=rate, eta=eta)

    # -- queries -------------------------------------------------------------------------

    def get(self, job_id: str) -> JobInfo:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is not None:
            return self._info(job)
        if not job_id.isalnum():
            raise InvalidArgument(f"invalid job id {job_id!r}")
        path = self._path(job_id)
        if not path.is_file():
            raise NotFound(f"no job {job_id}")
        try:
            return decode(JobInfo, json.loads(path.read_text()))
        except (OSError, ValueError) as e:
            raise NotFound(f"job {job_id}: unreadable record: {e}") from e

    def list(self) -> list[JobInfo]:
        with self._lock:
            live = {job_id: self._info(job) for job_id, job in self._jobs.items()}
        records = {i.id: i for i in self._records()}
        records.update(live)
        return sorted(records.values(), key=lambda i: i.started)

    def cancel(self, job_id: str) -> JobInfo:
        """Ask a running job to stop; it ends ``cancelled`` with its partial result undone.
        ``Conflict`` if it has already ended."""
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None or job.info.state is not JobState.RUNNING:
            info = self.get(job_id)
            raise Conflict(f"job {job_id} has already ended ({info.state.value})")
        job.cancel.set()
        action = job.on_cancel
        if action is not None:
            action()
        return self._info(job)

    def close(self) -> None:
        """Cancel running jobs and wait for them (they undo what they did)."""
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            if job.info.state is JobState.RUNNING:
                job.cancel.set()
                if job.on_cancel is not None:
                    job.on_cancel()
        for job in jobs:
            if job.thread is not None:
                job.thread.join(60)
