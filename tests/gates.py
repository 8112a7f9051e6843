"""Checks that an operation waits for I/O in flight, held open on purpose.

A race that a gate prevents is rarely hit by random concurrency; holding the gate by hand, as
an operation between its lookup and its syscall would, makes the window as wide as the test
needs. Whether the operation waits for the gate is observed, not guessed from time: the
gate's ``on_wait`` seam tells when a freezer starts waiting for the operations inside.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from storvisor.engine.sharedmap import Gate

STALL = 60.0
"""Seconds after which an operation that neither waits nor finishes counts as hung."""


def assert_waits_for_gate(gate: Gate, action: Callable[[], object], message: str) -> None:
    """Enter ``gate``, run ``action`` in a thread and check that it starts waiting for the
    gate (``message`` if it finishes, or hangs elsewhere, without doing so), then leave the
    gate and check that it finishes without error."""
    waiting = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            action()
        except BaseException as e:
            errors.append(e)

    gate.enter()
    gate.on_wait = waiting.set
    worker = threading.Thread(target=run)
    try:
        worker.start()
        deadline = time.monotonic() + STALL
        while not waiting.wait(0.01):
            assert worker.is_alive(), f"{message} (it finished without waiting: {errors})"
            assert time.monotonic() < deadline, f"{message} (it hung for {STALL} s elsewhere)"
        assert worker.is_alive(), message
    finally:
        gate.on_wait = None
        gate.leave()
    worker.join(STALL)
    assert not worker.is_alive(), f"the operation did not finish {STALL} s after the gate was left"
    assert not errors, errors
