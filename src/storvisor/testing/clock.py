"""A fake clock for the QoS seam (``storvisor.engine.qos.Clock``)."""

from __future__ import annotations

import threading


class FakeClock:
    """Time that moves only when told: ``sleep`` advances it at once (a sleeper never
    blocks), ``advance`` moves it by hand. Thread-safe."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()
        self.slept = 0.0
        """Total seconds ``sleep`` was asked for."""

    def now(self) -> float:
        with self._lock:
            return self._now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self._now += max(seconds, 0.0)
            self.slept += max(seconds, 0.0)

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds
