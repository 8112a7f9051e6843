"""``engine/bounded.py``: requests run on I/O threads within a timeout, are abandoned past
it, and an abandoned request that had not started never runs."""

from __future__ import annotations

import threading
import time

import pytest

from storvisor.engine import bounded
from storvisor.engine.bounded import IoThreads
from storvisor.errors import IOFailure


def test_a_request_in_time_returns_its_outcome_on_another_thread() -> None:
    threads = IoThreads("t")
    try:
        ran: list[object] = []
        assert threads.run(lambda: ran.append(bounded.current()), 5) is None
        assert len(ran) == 1 and ran[0] is not None  # it ran as a request, elsewhere
        assert bounded.current() is None

        def fail() -> None:
            raise IOFailure("device failed", 5)

        with pytest.raises(IOFailure, match="device failed"):
            threads.run(fail, 5)
    finally:
        threads.close()


def test_a_stalled_request_is_abandoned_and_the_one_behind_it_never_runs() -> None:
    threads = IoThreads("t", limit=1)
    release = threading.Event()
    ran: list[str] = []

    def stall() -> None:
        release.wait(10)
        ran.append("stalled")

    try:
        start = time.monotonic()
        first = threads.run(stall, 0.2)
        assert first is not None and first.started and first.abandoned
        assert 0.2 <= time.monotonic() - start < 5
        assert threads.stalled() == 1
        second = threads.run(lambda: ran.append("queued"), 0.2)  # the only thread is held
        assert second is not None and not second.started
        release.set()
        deadline = time.monotonic() + 5
        while threads.stalled():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert threads.run(lambda: ran.append("next"), 5) is None
        assert ran == ["stalled", "next"]  # the abandoned, unstarted one never ran
    finally:
        release.set()
        threads.close()
