"""Waiting for a job in the CLI: a progress bar (rich, when installed and on a terminal) until
the job ends; Ctrl-C cancels the job."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

from storvisor.api.jobs import JobInfo, JobState

if TYPE_CHECKING:
    from storvisor.api.service import Management

POLL = 0.2


def wait_for_job(m: Management, job: JobInfo, *, bar: bool = True) -> JobInfo:
    """Poll ``job`` until it ends and return its last state; cancel it on Ctrl-C (then wait
    for the cancellation to finish, so that what it made is gone on return)."""
    try:
        if bar and sys.stderr.isatty():
            try:
                return _with_bar(m, job)
            except ImportError:
                pass
        return _poll(m, job)
    except KeyboardInterrupt:
        m.cancel_job(job.id)
        return _poll(m, job)


def _poll(m: Management, job: JobInfo) -> JobInfo:
    while job.state is JobState.RUNNING:
        time.sleep(POLL)
        job = m.job(job.id)
    return job


def _with_bar(m: Management, job: JobInfo) -> JobInfo:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task(job.kind, total=job.total or None)
        while job.state is JobState.RUNNING:
            progress.update(task, completed=job.done, total=job.total or None)
            time.sleep(POLL)
            job = m.job(job.id)
    return job
