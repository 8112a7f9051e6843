"""Checks that an operation waits for I/O in flight, held open on purpose.

A race that a gate prevents is rarely hit by random concurrency; holding the gate by hand, as
an operation between its lookup and its syscall would, makes the window as wide as the test
needs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from storvisor.engine.sharedmap import Gate


def assert_waits_for_gate(
    gate: Gate, action: Callable[[], object], message: str, wait: float = 0.3
) -> None:
    """Enter ``gate``, run ``action`` in a thread, check it is still waiting after ``wait``
    seconds (``message`` otherwise), then leave the gate and check it finishes."""
    gate.enter()
    worker = threading.Thread(target=action)
    try:
        worker.start()
        worker.join(wait)
        assert worker.is_alive(), message
    finally:
        gate.leave()
    worker.join(10)
    assert not worker.is_alive(), "the operation did not finish once the gate was left"
