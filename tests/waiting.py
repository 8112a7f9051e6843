"""A test's bounded wait for what another thread or process brings about: the condition is
polled, and a timeout is a failure that names what did not happen."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from storvisor.errors import StorvisorError


def wait_until(condition: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        time.sleep(0.01)


class Background(threading.Thread):
    """``call()`` in a thread of its own; ``outcome``: what it returned or the
    ``StorvisorError`` it raised. A daemon thread: one that hangs (the failure a test
    reports) does not hold up pytest's exit."""

    def __init__(self, call: Callable[[], object]) -> None:
        super().__init__(daemon=True)
        self._call = call
        self.outcome: object = None
        self.start()

    def run(self) -> None:
        try:
            self.outcome = self._call()
        except StorvisorError as e:
            self.outcome = e
