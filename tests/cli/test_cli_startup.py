"""A daemon and commands that meet while the daemon starts: the daemon waits for a command
holding HOME, a command waits for a daemon that holds HOME but does not answer yet, and a
loop of real commands run during a real start-up all succeed."""

from __future__ import annotations

import os
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path

from cli_harness import CLI, STORVISOR, Daemon, _answers

from storvisor.api.server import APIServer
from storvisor.api.service import Service
from storvisor.engine.home import Home, HomeUser
from storvisor.engine.types import BackingSpec


def _launch_daemon(home: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [STORVISOR, "--home", str(home), *args, "serve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_stderr(proc: subprocess.Popen[str], needle: str, timeout: float = 30) -> str:
    """Read the process's stderr until a line holds ``needle``; fail if it exits first."""
    assert proc.stderr is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stderr, selectors.EVENT_READ)
    seen = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sel.select(deadline - time.monotonic()):
                break
            line = proc.stderr.readline()
            if not line:
                raise AssertionError(f"exited before {needle!r}: {''.join(seen)}")
            seen.append(line)
            if needle in line:
                return line
    finally:
        sel.close()
    raise AssertionError(f"no {needle!r} within {timeout} s: {''.join(seen)}")


def _wait_until_serving(proc: subprocess.Popen[str], home: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"daemon exited: {proc.communicate()}"
        if _answers(home / "api.sock"):
            return
        time.sleep(0.05)
    raise AssertionError("daemon did not start")


def _stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.terminate()
    _, err = proc.communicate(timeout=30)
    return proc.returncode, err


def test_commands_run_while_the_daemon_starts_all_succeed(cli: CLI, home: Path, tmp_path):
    cli("pool", "create", "p", "--backing", f"{tmp_path}/disk.img:1G")
    for i in range(4):  # recorded exports make the start-up (lock held, no API) longer
        cli("volume", "create", f"p/v{i}", "--size", "16M")
        cli("export", "nbd", f"p/v{i}")
    for attempt in range(2):
        proc = _launch_daemon(home)
        try:
            calls = after_start = 0
            while after_start < 3:  # commands before, during and after the start-up
                serving = _answers(home / "api.sock")
                result = cli("pool", "list", "--json", rc=None)
                calls += 1
                assert result.rc == 0, f"call {calls} of attempt {attempt}: {result}"
                assert [p["name"] for p in result.json()] == ["p"]
                assert proc.poll() is None, f"daemon exited: {proc.communicate()}"
                after_start += serving
            _wait_until_serving(proc, home)
            states = {e["state"] for e in cli("export", "list", "--json").json()}
            assert states == {"active"}
        finally:
            rc, err = _stop(proc)
        assert rc == 0, err
        assert "pid ?" not in err and "Traceback" not in err


def test_the_daemon_waits_for_a_command_holding_home(cli: CLI, home: Path, tmp_path):
    command = Home(home)  # what a command run without a daemon holds
    command.create_pool("p", [BackingSpec(str(tmp_path / "disk.img"), 1 << 30)])
    proc = _launch_daemon(home)
    try:
        line = _wait_for_stderr(proc, "waiting up to")
        assert f"pid {os.getpid()} (a storvisor command)" in line
        assert not (home / "api.sock").exists()
        command.close()
        _wait_until_serving(proc, home)
        assert [p["name"] for p in cli("pool", "list", "--json").json()] == ["p"]
    finally:
        command.close()
        rc, err = _stop(proc)
    assert rc == 0, err


def test_the_daemon_gives_up_on_a_command_after_wait(cli: CLI, home: Path):
    command = Home(home)
    try:
        started = time.monotonic()
        result = cli("--wait", "0.5", "serve", rc=1)
        assert time.monotonic() - started >= 0.5
        assert "Traceback" not in result.err and result.out == ""
        line = result.err.splitlines()[-1]  # after the daemon's log lines
        assert line.startswith("storvisor: error: ")
        assert f"is in use by pid {os.getpid()} (a storvisor command)" in line
    finally:
        command.close()


def test_a_second_daemon_does_not_wait(cli: CLI, home: Path, daemon: Daemon):
    started = time.monotonic()
    result = cli("--wait", "60", "serve", rc=1)
    assert time.monotonic() - started < 30
    assert "waiting" not in result.err and "Traceback" not in result.err
    line = result.err.splitlines()[-1]
    assert daemon.proc is not None
    assert f"is in use by pid {daemon.proc.pid} (the storvisor daemon)" in line


def test_a_command_waits_for_a_starting_daemon(cli: CLI, home: Path, tmp_path):
    starting = Home(home, user=HomeUser.DAEMON)  # holds HOME, no API yet
    service = Service(starting)
    service.create_pool("p", [BackingSpec(str(tmp_path / "disk.img"), 1 << 30)])
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(home / "api.sock"))
    stale.listen(1)
    stale.settimeout(30)
    proc = subprocess.Popen(
        [STORVISOR, "--home", str(home), "pool", "list", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    api: APIServer | None = None
    try:
        probe, _ = stale.accept()  # the command asked; nobody answers yet
        probe.close()
        stale.close()
        time.sleep(0.3)  # the command found HOME held by a daemon and keeps asking
        assert proc.poll() is None, proc.communicate()
        api = APIServer(home / "api.sock", service)
        api.start()
        out, err = proc.communicate(timeout=30)
    finally:
        stale.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if api is not None:
            api.close()
        service.close()
    assert proc.returncode == 0, err
    assert err == ""
    assert '"name": "p"' in out


def test_a_command_gives_up_on_a_daemon_that_never_answers(cli: CLI, home: Path):
    stuck = Home(home, user=HomeUser.DAEMON)
    try:
        started = time.monotonic()
        line = cli.fails("--wait", "0.5", "pool", "list")
        assert time.monotonic() - started >= 0.5
        assert f"in use by pid {os.getpid()} (the storvisor daemon)" in line
        assert "did not answer within 0.5 s" in line
    finally:
        stuck.close()


def test_wait_must_be_a_number_of_seconds(cli: CLI):
    line = cli.fails("--wait", "soon", "pool", "list", rc=2)
    assert "invalid time 'soon'" in line


def test_a_command_to_the_daemon_loads_no_engine(cli: CLI, home: Path, daemon: Daemon) -> None:
    """A command the running daemon answers imports the API's records and client only: the
    engine (pools, volumes, the cache) is loaded only by a command that opens HOME itself.
    Every CLI call pays for what it imports."""
    probe = (
        "import sys\n"
        "from storvisor.cli.main import run\n"
        f"status = run(['--home', {str(home)!r}, 'pool', 'list'])\n"
        "print(status, ' '.join(sorted(m for m in sys.modules if m.startswith('storvisor'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    status, _, modules = out.strip().rpartition("\n")[2].partition(" ")
    assert status == "0", out
    loaded = set(modules.split())
    assert "storvisor.api.client" in loaded, loaded
    heavy = {"storvisor.api.service", "storvisor.engine.home", "storvisor.engine.pool"}
    assert not heavy & loaded, sorted(heavy & loaded)
    offline = subprocess.run(
        [sys.executable, "-c", probe.replace(str(home), str(home / "elsewhere"))],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "storvisor.engine.pool" in offline.split(), "the offline path was not probed"
