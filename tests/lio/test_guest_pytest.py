"""The host-root guest harness: pytest run inside a guest reports each test's outcome back."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from storvisor.testing.guest import (
    HOST_ROOT_OUTBOX,
    GuestTimeout,
    host_root_script,
    parse_junit,
    run_pytest_in_guest,
)

_JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.lio.guest_x" name="test_ok" time="0.5"/>
<testcase classname="tests.lio.guest_x" name="test_bad[1]" time="0.1">
  <failure message="assert 1 == 2">def test_bad(): E assert 1 == 2</failure></testcase>
<testcase classname="tests.lio.guest_x" name="test_skip" time="0">
  <skipped type="pytest.skip" message="no tool">skip body</skipped></testcase>
<testcase classname="" name="tests.lio.guest_y" time="0">
  <error message="collection failure">ImportError</error></testcase>
</testsuite></testsuites>"""

needs_guest = pytest.mark.requires(
    shutil.which("qemu-system-x86_64") is not None and any(Path("/boot").glob("vmlinuz-*")),
    "needs qemu-system-x86 and linux-image-amd64",
)


def test_junit_report_is_parsed_into_test_cases() -> None:
    ok, bad, skip, error = parse_junit(_JUNIT)
    assert (ok.module, ok.name, ok.outcome, ok.text, ok.seconds) == (
        "tests.lio.guest_x",
        "test_ok",
        "passed",
        "",
        0.5,
    )
    assert (bad.function, bad.outcome) == ("test_bad", "failed")
    assert bad.text.startswith("assert 1 == 2\n") and "E assert 1 == 2" in bad.text
    assert (skip.outcome, skip.text.splitlines()[0]) == ("skipped", "no tool")
    assert (error.module, error.outcome, error.text) == (
        "",
        "error",
        "collection failure\nImportError",
    )


def test_host_root_script_mounts_before_chroot_and_quotes_the_command() -> None:
    script = host_root_script(["python3", "-c", "print('a b')"], cwd="/x y", env={"K": "v w"})
    lines = script.splitlines()
    chroot = next(i for i, line in enumerate(lines) if line.startswith("chroot /newroot"))
    assert any("overlay /newroot" in line for line in lines[:chroot])
    assert "'K=v w'" in lines[chroot]
    assert "modprobe -a configfs target_core_mod target_core_user" in script
    assert "exec python3 -c" in script and "cd '\"'\"'/x y'\"'\"'" in script
    assert HOST_ROOT_OUTBOX not in script  # no outbox unless asked
    bare = host_root_script(["true"], modules=None)
    assert "modprobe -a" not in bare and "configfs" not in bare


@pytest.mark.slow
@pytest.mark.vm
@needs_guest
def test_outcomes_inside_the_guest_come_back(tmp_path: Path) -> None:
    (tmp_path / "test_inner.py").write_text(
        "import os, pytest\n"
        "def test_passes():\n"
        "    assert open('/proc/modules').read().count('tcm_loop') >= 1\n"
        "def test_fails():\n"
        "    print('inner-output-marker')\n"
        "    assert os.uname().release == 'not-this-one'\n"
        "def test_skips():\n"
        "    pytest.skip('inner-skip-reason')\n"
    )
    run = run_pytest_in_guest([str(tmp_path / "test_inner.py")], rootdir=str(tmp_path))
    outcomes = {t.name: t.outcome for t in run.tests}
    assert outcomes == {"test_passes": "passed", "test_fails": "failed", "test_skips": "skipped"}
    failed = next(t for t in run.tests if t.name == "test_fails")
    assert "not-this-one" in failed.text
    assert "inner-output-marker" in run.guest.console  # the inner output is on the console
    assert run.guest.status == 1
    print(f"guest with pytest: {run.guest.seconds:.1f} s")


@pytest.mark.slow
@pytest.mark.vm
@needs_guest
def test_a_stalled_guest_run_is_a_timeout(tmp_path: Path) -> None:
    (tmp_path / "test_stall.py").write_text(
        "import time\ndef test_stalls():\n    time.sleep(3600)\n"
    )
    with pytest.raises(GuestTimeout, match="still running"):
        run_pytest_in_guest(
            [str(tmp_path / "test_stall.py")], rootdir=str(tmp_path), timeout=20, modules=None
        )
