"""The HOME lock: the record its holder writes, how another process reads it (never a guess
such as "pid ?"), and who waits for whom."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from storvisor.engine.home import RECORD_WAIT, Home, HomeInUse, HomeUser, LockHolder
from storvisor.errors import Conflict, StateError


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def raw_lock(path: Path) -> Iterator[int]:
    """The lock taken as a new holder takes it, before it writes its record."""
    path.mkdir()
    fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        yield fd
    finally:
        os.close(fd)


def _dead_pid() -> int:
    """The pid of a process that has exited (what a holder killed earlier leaves behind)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_record_names_the_holder_and_goes_with_it(path: Path) -> None:
    home = Home(path, user=HomeUser.DAEMON)
    assert (path / "lock").read_text() == f"{os.getpid()} daemon\n"
    home.close()
    assert (path / "lock").read_text() == ""
    with pytest.raises(StateError, match="closed"):
        home.pools()
    with Home(path) as again:
        assert (path / "lock").read_text() == f"{os.getpid()} command\n"
        assert again.pools() == []


@pytest.mark.parametrize(
    ("user", "who"),
    [(HomeUser.DAEMON, "the storvisor daemon"), (HomeUser.COMMAND, "a storvisor command")],
)
def test_a_second_holder_learns_who_holds_home(path: Path, user: HomeUser, who: str) -> None:
    with Home(path, user=user), pytest.raises(HomeInUse) as e:
        Home(path)
    assert e.value.holder == LockHolder(os.getpid(), user)
    assert str(e.value) == f"{path} is in use by pid {os.getpid()} ({who})"
    assert isinstance(e.value, Conflict)


def test_a_record_written_late_is_waited_for(path: Path, raw_lock: int) -> None:
    os.write(raw_lock, f"{_dead_pid()} command\n".encode())  # left by a killed holder

    def write_record() -> None:
        time.sleep(RECORD_WAIT / 4)
        os.pwrite(raw_lock, f"{os.getpid()} command\n".encode(), 0)

    writer = threading.Thread(target=write_record)
    writer.start()
    try:
        with pytest.raises(HomeInUse) as e:
            Home(path)
    finally:
        writer.join()
    assert e.value.holder == LockHolder(os.getpid(), HomeUser.COMMAND)
    assert "?" not in str(e.value)


@pytest.mark.parametrize("content", [b"", b"12", b"garbage\n", None])
def test_a_holder_without_a_record_is_reported_as_unknown(
    path: Path, raw_lock: int, content: bytes | None
) -> None:
    os.write(raw_lock, f"{_dead_pid()} daemon\n".encode() if content is None else content)
    started = time.monotonic()
    with pytest.raises(HomeInUse) as e:
        Home(path, user=HomeUser.DAEMON, wait=0)
    assert time.monotonic() - started >= RECORD_WAIT
    assert e.value.holder is None
    assert str(e.value) == f"{path} is in use by another process (it has not written its pid)"


def test_a_record_without_a_user_still_names_the_pid(path: Path, raw_lock: int) -> None:
    os.write(raw_lock, f"{os.getpid()}\n".encode())
    with pytest.raises(HomeInUse) as e:
        Home(path)
    assert e.value.holder == LockHolder(os.getpid(), None)
    assert str(e.value) == f"{path} is in use by pid {os.getpid()}"


def test_a_daemon_waits_for_a_command(path: Path) -> None:
    command = Home(path)
    released = threading.Event()

    def finish_command() -> None:
        time.sleep(0.3)
        released.set()
        command.close()

    finisher = threading.Thread(target=finish_command)
    finisher.start()
    try:
        daemon = Home(path, user=HomeUser.DAEMON, wait=30)
    finally:
        finisher.join()
    assert released.is_set()
    assert (path / "lock").read_text() == f"{os.getpid()} daemon\n"
    daemon.close()


def test_a_daemon_never_waits_for_a_daemon_and_a_command_never_waits(path: Path) -> None:
    for holder, user, wait in [
        (HomeUser.DAEMON, HomeUser.DAEMON, 30.0),
        (HomeUser.COMMAND, HomeUser.COMMAND, 30.0),
        (HomeUser.DAEMON, HomeUser.COMMAND, 30.0),
    ]:
        with Home(path, user=holder):
            started = time.monotonic()
            with pytest.raises(HomeInUse):
                Home(path, user=user, wait=wait)
            assert time.monotonic() - started < 5, (holder, user)


def test_a_daemon_gives_up_after_its_wait(path: Path) -> None:
    with Home(path):
        started = time.monotonic()
        with pytest.raises(HomeInUse) as e:
            Home(path, user=HomeUser.DAEMON, wait=0.3)
        assert time.monotonic() - started >= 0.3
    assert e.value.holder == LockHolder(os.getpid(), HomeUser.COMMAND)
