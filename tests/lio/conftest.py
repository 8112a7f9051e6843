"""Tests that run inside a TCG guest with this machine's userspace and kernel modules.

Each ``guest_*.py`` module here is collected on the host without being imported: one item
per top-level ``test_*`` function. When the first of a module's items runs, one guest boots
(``storvisor.testing.guest.run_pytest_in_guest``: the host root read-only with an overlay,
LIO, TCMU, tcm_loop, vhost-scsi, NBD and brd loaded) and runs pytest on the selected
functions of that module; each host item then reports what its function did inside: a failure
or error inside is a failure here with the inner report, a skip a skip, a function that did not
run (the guest stalled or crashed) a failure with the console's tail. Inside the guest
(``STORVISOR_IN_GUEST=1``) these modules are ordinary test modules.

The guests boot ahead: once collection is done, one background thread runs the selected
modules' guests one after the other while the rest of the session goes on (a TCG guest keeps
one core busy, most other tests wait on processes of their own), and a module's items wait
for its run. ``STORVISOR_GUESTS_AHEAD=0`` boots each guest when its first item runs instead,
as do the workers of ``pytest -n`` (each collects every test; the modules run in parallel
there anyway).
At the end of the session a guest still running is killed.

Every item is marked ``slow`` and ``vm``.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from libvirt_kit import paused_guest, virsh, workdir  # noqa: F401  (guest_libvirt_scsi.py)
from prereq import require
from storvisor.testing.guest import (
    IN_GUEST_ENV,
    Guest,
    GuestError,
    PytestRun,
    run_pytest_in_guest,
)

_ROOT = Path(__file__).resolve().parents[2]
GUEST_TIMEOUT = 1500.0
"""Seconds one module's guest may run (its inner tests have pytest's own timeout)."""
_IN_GUEST = os.environ.get(IN_GUEST_ENV) == "1"
UDEVD = "/lib/systemd/systemd-udevd"
_HAS_GUEST = shutil.which("qemu-system-x86_64") is not None and any(Path("/boot").glob("vmlinuz-*"))


def _guest_module(path: Path) -> bool:
    return not _IN_GUEST and path.name.startswith("guest_") and path.suffix == ".py"


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    # a module named on the command line comes through pytest_pycollect_makemodule instead
    if not _guest_module(file_path) or parent.session.isinitpath(file_path):
        return None
    module: GuestModule = GuestModule.from_parent(parent, path=file_path)
    return module


@pytest.fixture(scope="module")
def udev() -> Iterator[None]:
    """systemd-udevd, which makes the ``/dev/disk/by-id`` links of new disks (the guest boots
    without it). For guest modules here and in ``tests/openstack``."""
    require(os.access(UDEVD, os.X_OK), f"{UDEVD} is missing (apt-get install udev)")
    proc = subprocess.Popen([UDEVD], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not Path("/run/udev/control").exists():
            assert proc.poll() is None, f"systemd-udevd exited with status {proc.returncode}"
            assert time.monotonic() < deadline, "systemd-udevd did not start within 60 s"
            time.sleep(0.1)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=30)


_ahead: dict[Path, Future[PytestRun | GuestError]] = {}
"""Each guest module's run, booted ahead (``pytest_collection_finish``)."""
_running: set[Guest] = set()
_running_lock = threading.Lock()


def pytest_collection_finish(session: pytest.Session) -> None:
    modules = list(dict.fromkeys(i.parent for i in session.items if isinstance(i, GuestItem)))
    if not modules or not _HAS_GUEST or os.environ.get("STORVISOR_GUESTS_AHEAD") == "0":
        return
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker collects all: none boots ahead
        return
    runner = ThreadPoolExecutor(1, thread_name_prefix="guest-ahead")
    for module in modules:
        assert isinstance(module, GuestModule)
        _ahead[module.path] = runner.submit(module.run_guest)
    runner.shutdown(wait=False)


def pytest_sessionfinish(session: pytest.Session) -> None:
    for future in _ahead.values():
        future.cancel()
    with _running_lock:
        guests = list(_running)
    for guest in guests:
        guest.kill()


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector) -> pytest.File | None:
    if not _guest_module(module_path):
        return None
    module: GuestModule = GuestModule.from_parent(parent, path=module_path)
    return module


class GuestModule(pytest.File):
    """A ``guest_*.py`` module seen from the host: its test functions, run in one guest."""

    run: PytestRun | GuestError | None = None

    def collect(self) -> list[pytest.Item]:
        tree = ast.parse(self.path.read_text(), str(self.path))
        items: list[pytest.Item] = []
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                item: GuestItem = GuestItem.from_parent(self, name=node.name)
                item.add_marker(pytest.mark.timeout(GUEST_TIMEOUT + 120))  # the guest's own
                item.add_marker(pytest.mark.slow)
                item.add_marker(pytest.mark.vm)
                item.add_marker(
                    pytest.mark.requires(_HAS_GUEST, "needs qemu-system-x86 and linux-image-amd64")
                )
                items.append(item)
        return items

    def boot(self) -> PytestRun | GuestError:
        """The run of this module's selected functions in one guest: booted ahead, or now."""
        if self.run is None:
            self.run = GuestError("the guest run was interrupted")
            ahead = _ahead.get(self.path)
            self.run = ahead.result() if ahead is not None else self.run_guest()
        return self.run

    def run_guest(self) -> PytestRun | GuestError:
        """Boot one guest that runs the selected functions of this module."""
        selected = [
            i.name for i in self.session.items if isinstance(i, GuestItem) and i.parent is self
        ]
        relative = self.path.relative_to(_ROOT)
        guest: list[Guest] = []

        def started(g: Guest) -> None:
            with _running_lock:
                _running.add(g)
            guest.append(g)

        try:
            return run_pytest_in_guest(
                [f"{relative}::{name}" for name in selected],
                rootdir=str(_ROOT),
                timeout=GUEST_TIMEOUT,
                started=started,
            )
        except GuestError as e:
            return e
        finally:
            with _running_lock:
                _running.difference_update(guest)


class GuestItem(pytest.Item):
    """One test function of a ``guest_*.py`` module, judged by what it did in the guest."""

    def runtest(self) -> None:
        parent = self.parent
        assert isinstance(parent, GuestModule)
        run = parent.boot()
        if isinstance(run, GuestError):
            raise GuestTestFailed(f"the guest run failed: {run}")
        module = ".".join(parent.path.relative_to(_ROOT).with_suffix("").parts)
        mine = [t for t in run.tests if t.module == module and t.function == self.name]
        stray = [t for t in run.tests if t.module != module and t.outcome in ("failed", "error")]
        bad = [t for t in [*mine, *stray] if t.outcome in ("failed", "error")]
        if bad:
            raise GuestTestFailed(
                "\n\n".join(f"--- in the guest: {t.name} {t.outcome}\n{t.text}" for t in bad)
            )
        if not mine:
            tail = "\n".join(run.guest.console.splitlines()[-40:])
            raise GuestTestFailed(
                f"{self.name} did not run in the guest (status {run.guest.status})\n{tail}"
            )
        if all(t.outcome == "skipped" for t in mine):
            pytest.skip("; ".join(t.text.splitlines()[0] if t.text else "" for t in mine))

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, GuestTestFailed):
            return str(excinfo.value)
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, f"{self.name} (in a guest)"


class GuestTestFailed(Exception):
    """What a guest reported for a failed test function."""
