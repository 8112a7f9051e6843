"""What a client needs to find the service and learn where it lives, without loading the
service itself (the CLI talking to a running daemon imports no engine code)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

API_SOCKET = "api.sock"
POOL_WAIT = 30.0
"""Seconds a daemon's start waits for the pools its exports use (``Service.start_exports``)."""


@dataclass(frozen=True, slots=True)
class ServiceStatus:
    """Where a service lives and whether it serves exports (``daemon``)."""

    home: str
    pid: int
    daemon: bool
    api_socket: str
    nbd_socket: str
    nbd_tcp: str | None  # "HOST:PORT" when NBD also listens on TCP


def default_home() -> Path:
    """``$STORVISOR_HOME``, else ``~/.local/share/storvisor``."""
    env = os.environ.get("STORVISOR_HOME")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".local" / "share" / "storvisor"
