"""Disk images in and out of volumes as jobs, with the real qemu-img: data and holes kept
both ways, progress and job records, cancellation and a daemon crash undo a half-done import,
bad input changes nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_harness import CLI, Daemon

from prereq import require

MiB = 1 << 20
STALL = 60.0


def qemu_img(*args: str) -> str:
    done = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=True)
    return done.stdout


def source_image(path: Path) -> Path:
    """A 64 MiB qcow2 image holding data at [1 MiB, 3 MiB) and [40 MiB, 40.5 MiB) only."""
    qemu_img("create", "-q", "-f", "qcow2", str(path), "64M")
    subprocess.run(
        [
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            "write -P 0xab 1M 2M",
            "-c",
            "write -P 0xcd 40M 512K",
            str(path),
        ],
        check=True,
        capture_output=True,
    )
    return path


def data_extents(path: Path, fmt: str) -> list[tuple[int, int]]:
    """The ranges ``qemu-img map`` reports as data (not holes or zeros)."""
    extents = json.loads(qemu_img("map", "--output=json", "-f", fmt, str(path)))
    return [(e["start"], e["length"]) for e in extents if e["data"] and not e.get("zero")]


def _setup(cli: CLI, tmp_path: Path) -> None:
    for tool in ("qemu-img", "qemu-io"):
        require(shutil.which(tool) is not None, f"{tool} is not installed (qemu-utils)")
    cli("pool", "create", "p", "--backing", f"{tmp_path}/disk.img:1G")


def test_import_and_export_keep_data_and_holes(cli: CLI, daemon: Daemon, tmp_path: Path) -> None:
    _setup(cli, tmp_path)
    src = source_image(tmp_path / "src.qcow2")
    out = cli("volume", "import", "p/v", str(src))
    assert out.out.strip().startswith(f"imported {src} into p/v (job ")
    vol = cli("volume", "show", "p/v", "--json").json()
    assert vol["size"] == 64 * MiB  # type: ignore[index]
    assert vol["allocated"] <= 4 * MiB  # type: ignore[index]  # zeros were not written

    cli("snapshot", "create", "p/v@s")
    for fmt in ("qcow2", "raw", "vmdk"):
        image = tmp_path / f"out.{fmt}"
        done = cli("volume", "export-image", "p/v@s", str(image), "--format", fmt)
        assert done.out.strip().startswith(f"wrote p/v@s to {image} ({fmt})")
        subprocess.run(["qemu-img", "compare", "-q", str(src), str(image)], check=True)
        data = data_extents(image, fmt)
        assert sum(length for _, length in data) <= 4 * MiB, data  # holes stayed holes
        covered = {o // MiB for start, length in data for o in range(start, start + length, 4096)}
        assert {1, 2, 40} <= covered, data

    jobs = cli("job", "list", "--json").json()
    assert [(j["kind"], j["state"]) for j in jobs] == (  # type: ignore[index,union-attr]
        [("import", "succeeded")] + [("export-image", "succeeded")] * 3
    )
    last = jobs[-1]  # type: ignore[index]
    assert last["done"] == last["total"] == 64 * MiB  # type: ignore[index]
    shown = cli("job", "show", last["id"]).out  # type: ignore[index]
    assert "state     succeeded" in shown or "succeeded" in shown.split()
    # the temporary exports are gone
    assert [e["spec"]["name"] for e in cli("export", "list", "--json").json()] == []  # type: ignore[index,union-attr]


def test_bad_input_changes_nothing(cli: CLI, daemon: Daemon, tmp_path: Path) -> None:
    _setup(cli, tmp_path)
    src = source_image(tmp_path / "src.qcow2")
    assert "no such image file" in cli.fails("volume", "import", "p/v", str(tmp_path / "nope"))
    junk = tmp_path / "junk.qcow2"
    junk.write_bytes(b"not an image" * 100)
    assert "cannot read image" in cli.fails(
        "volume", "import", "p/v", str(junk), "--format", "qcow2"
    )
    assert "no pool" in cli.fails("volume", "import", "q/v", str(src)).lower()
    assert cli("volume", "list", "p", "--json").json() == []
    cli("volume", "import", "p/v", str(src))
    assert "already exists" in cli.fails("volume", "import", "p/v", str(src))
    exists = tmp_path / "exists.raw"
    exists.write_bytes(b"keep me")
    assert "already exists" in cli.fails(
        "volume", "export-image", "p/v", str(exists), "--format", "raw"
    )
    assert exists.read_bytes() == b"keep me"
    assert "unknown image format" in cli.fails(
        "volume", "export-image", "p/v", str(tmp_path / "x"), "--format", "bogus"
    )
    assert "no job" in cli.fails("job", "show", "0123456789ab")
    assert "invalid job id" in cli.fails("job", "show", "a_b")
    assert "not allowed in a path" in cli.fails("job", "show", "..")
    assert [j["kind"] for j in cli("job", "list", "--json").json()] == ["import"]  # type: ignore[index,union-attr]
    assert "clean" in cli("fsck", "p").out


HELD_CONVERT = """#!/bin/sh
# qemu-img, except that a conversion first stops itself (SIGSTOP) until killed or continued
[ "$1" = convert ] && kill -STOP $$
exec qemu-img "$@"
"""


@pytest.fixture
def held_daemon(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemon]:
    """A daemon whose conversions stop before they start: a job stays running for sure."""
    wrapper = tmp_path / "held-qemu-img"
    wrapper.write_text(HELD_CONVERT)
    wrapper.chmod(0o755)
    monkeypatch.setenv("STORVISOR_QEMU_IMG", str(wrapper))
    d = Daemon(home).start()
    try:
        yield d
    finally:
        d.kill()


def _stopped_converter(daemon: Daemon) -> int:
    """The pid of the daemon's stopped conversion (waits for it to stop)."""
    assert daemon.proc is not None
    deadline = time.monotonic() + STALL
    while time.monotonic() < deadline:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
            if int(ppid) == daemon.proc.pid and state == "T":
                return int(entry)
        time.sleep(0.01)
    raise AssertionError("the daemon's conversion never started")


def _held_import(cli: CLI, daemon: Daemon, tmp_path: Path) -> tuple[str, int]:
    src = source_image(tmp_path / "src.qcow2")
    job_id = cli("volume", "import", "p/v", str(src), "--no-wait").out.strip()
    pid = _stopped_converter(daemon)
    job = cli("job", "show", job_id, "--json").json()
    assert job["state"] == "running", job  # type: ignore[index]
    return job_id, pid


def test_cancel_removes_the_partial_volume(cli: CLI, held_daemon: Daemon, tmp_path: Path) -> None:
    _setup(cli, tmp_path)
    job_id, _ = _held_import(cli, held_daemon, tmp_path)
    assert cli("volume", "list", "p", "--json").json() != []
    assert cli("job", "cancel", job_id).out.strip() == f"job {job_id}: cancelled"
    assert cli("volume", "list", "p", "--json").json() == []
    assert cli("export", "list", "--json").json() == []
    assert "already ended" in cli.fails("job", "cancel", job_id)
    assert "clean" in cli("fsck", "p").out


def test_an_import_cut_by_a_crash_is_undone(
    cli: CLI, held_daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _setup(cli, tmp_path)
    job_id, pid = _held_import(cli, held_daemon, tmp_path)
    held_daemon.kill()
    os.kill(pid, signal.SIGKILL)
    monkeypatch.delenv("STORVISOR_QEMU_IMG")
    held_daemon.start()
    job = cli("job", "show", job_id, "--json").json()
    assert job["state"] == "failed", job  # type: ignore[index]
    assert "interrupted by a daemon restart" in job["error"]  # type: ignore[index]
    assert cli("volume", "list", "p", "--json").json() == []
    assert cli("export", "list", "--json").json() == []
    assert "clean" in cli("fsck", "p").out
    # and the same import then works
    cli("volume", "import", "p/v", str(tmp_path / "src.qcow2"))


def test_flatten_runs_as_a_job(cli: CLI, daemon: Daemon, tmp_path: Path) -> None:
    _setup(cli, tmp_path)
    cli("volume", "import", "p/v", str(source_image(tmp_path / "src.qcow2")))
    cli("snapshot", "create", "p/v@s")
    cli("volume", "clone", "p/v@s", "p/c")
    job_id = cli("volume", "flatten", "p/c", "--no-wait").out.strip()
    deadline = time.monotonic() + STALL
    while (job := cli("job", "show", job_id, "--json").json())["state"] == "running":  # type: ignore[index]
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    assert job["kind"] == "flatten" and job["state"] == "succeeded", job  # type: ignore[index]
    assert job["done"] == job["total"] > 0  # type: ignore[index]
    assert cli("volume", "show", "p/c", "--json").json()["origin"] is None  # type: ignore[index]
    cli("snapshot", "delete", "p/v@s")
    image = tmp_path / "c.qcow2"
    cli("volume", "export-image", "p/c", str(image), "--format", "qcow2")
    subprocess.run(
        ["qemu-img", "compare", "-q", str(tmp_path / "src.qcow2"), str(image)], check=True
    )
    assert "clean" in cli("fsck", "p").out
