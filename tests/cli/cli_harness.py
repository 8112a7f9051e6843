"""Test harness for the CLI: the real ``storvisor`` console script run as a subprocess, and a
real daemon (``storvisor serve``) in a temporary HOME."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

STORVISOR = str(Path(sys.executable).with_name("storvisor"))


@dataclass
class Result:
    rc: int
    out: str
    err: str

    def json(self) -> object:
        return json.loads(self.out)


class CLI:
    """Runs ``storvisor --home HOME ...`` and returns what it printed."""

    def __init__(self, home: Path) -> None:
        self.home = home

    def __call__(self, *args: str, rc: int | None = 0, timeout: float = 60) -> Result:
        proc = subprocess.run(
            [STORVISOR, "--home", str(self.home), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "STORVISOR_HOME": "/nonexistent-do-not-use"},
        )
        result = Result(proc.returncode, proc.stdout, proc.stderr)
        if rc is not None:
            assert proc.returncode == rc, f"storvisor {' '.join(args)} -> {result}"
        return result

    def fails(self, *args: str, rc: int = 1) -> str:
        """Run a command that must fail with exactly one line on stderr; return that line."""
        result = self(*args, rc=rc)
        lines = result.err.splitlines()
        assert len(lines) == 1, result.err
        assert lines[0].startswith("storvisor: error: "), result.err
        assert "Traceback" not in result.err
        assert result.out == ""
        return lines[0]


class Daemon:
    """``storvisor serve`` as a subprocess; ``start`` waits until its API answers."""

    def __init__(self, home: Path, *args: str) -> None:
        self.home = home
        self.args = args
        self.proc: subprocess.Popen[str] | None = None
        self.banner = ""

    def start(self, timeout: float = 30) -> Daemon:
        api = self.home / "api.sock"
        self.proc = subprocess.Popen(
            [STORVISOR, "--home", str(self.home), "serve", *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited: {self.proc.communicate()}")
            if api.exists() and _answers(api):
                assert self.proc.stdout is not None
                lines = []
                while True:
                    line = self.proc.stdout.readline()
                    lines.append(line)
                    if not line or line.startswith("Stop with"):
                        break
                self.banner = "".join(lines)
                return self
            time.sleep(0.05)
        self.kill()
        raise AssertionError("daemon did not start")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> tuple[int, str]:
        """Signal the daemon and wait; return its exit status and stderr."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        _, err = self.proc.communicate(timeout=timeout)
        rc = self.proc.returncode
        self.proc = None
        return rc, err

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
        self.proc = None


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
            s.sendall(b"GET /v1/status HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            return data.startswith(b"HTTP/1.0 200")
        except OSError:
            return False
