"""The driver's side of a split virtqueue in guest memory."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

_FENCE = threading.Lock()

Segment = tuple[int, int]
"""``(guest-physical address, length)`` of one buffer."""


@dataclass
class _Queue:
    index: int
    size: int
    desc_gpa: int
    avail_gpa: int
    used_gpa: int
    kick: int
    call: int
    avail_idx: int = 0
    last_used: int = 0
    free: list[int] = field(default_factory=list)
    chains: dict[int, list[int]] = field(default_factory=dict)
    completions: dict[int, int] = field(default_factory=dict)
    kicks: int = 0
    notified_idx: int = 0
