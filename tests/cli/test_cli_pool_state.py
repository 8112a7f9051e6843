"""A pool whose backing device is missing or shorter than recorded is offline with the
reason: the daemon, the lists and the other pools keep working, its exports are broken, and
``pool reopen`` brings it back once the device is back, without a restart."""

from __future__ import annotations

import os
from pathlib import Path

from cli_harness import CLI, Daemon

from prereq import require_module

nbd = require_module("nbd", "python3-libnbd is not installed")

A = bytes(range(256)) * 256  # 64 KiB
B = bytes(reversed(range(256))) * 256


def _write(uri: str, data: bytes) -> None:
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(data, 0)
    h.flush()
    h.shutdown()


def _read(uri: str) -> bytes:
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        return bytes(h.pread(len(A), 0))
    finally:
        h.shutdown()


def _pools(cli: CLI) -> dict[str, dict[str, object]]:
    return {p["name"]: p for p in cli("pool", "list", "--json").json()}


def _exports(cli: CLI) -> dict[str, dict[str, object]]:
    return {e["spec"]["name"]: e for e in cli("export", "list", "--json").json()}


def _two_pools(cli: CLI, tmp_path: Path) -> tuple[str, str]:
    cli("pool", "create", "a", "--backing", f"{tmp_path}/a.img:256M")
    cli("pool", "create", "b", "--backing", f"{tmp_path}/b.img:256M")
    cli("volume", "create", "a/v", "--size", "16M")
    cli("volume", "create", "b/v", "--size", "16M")
    ua = cli("export", "nbd", "a/v").out.strip()
    ub = cli("export", "nbd", "b/v").out.strip()
    _write(ua, A)
    _write(ub, B)
    return ua, ub


def test_missing_backing_makes_one_pool_offline_and_reopen_brings_it_back(
    cli: CLI, home: Path, tmp_path: Path
) -> None:
    daemon = Daemon(home).start()
    try:
        ua, ub = _two_pools(cli, tmp_path)
        daemon.stop()
        os.rename(tmp_path / "b.img", tmp_path / "b.away")
        daemon.start()

        pools = _pools(cli)
        assert pools["a"]["state"] == "online"
        assert pools["b"]["state"] == "offline"
        assert pools["b"]["reason"] == f"backing device {tmp_path}/b.img is missing"
        assert pools["b"]["backings"][0]["path"] == f"{tmp_path}/b.img"
        table = cli("pool", "list").out.splitlines()
        assert table[0].split()[:2] == ["NAME", "STATE"]
        assert table[2].split()[:2] == ["b", "offline"] and "is missing" in table[2]
        shown = cli("pool", "show", "b").out
        assert "state:" in shown and "offline" in shown and "b.img is missing" in shown

        listed = cli("volume", "list", "--json")
        assert [(v["pool"], v["name"]) for v in listed.json()] == [("a", "v")]
        assert "pool b is offline" in listed.err
        line = cli.fails("volume", "list", "b")
        assert line.endswith(f"pool 'b' is offline: backing device {tmp_path}/b.img is missing")

        exports = _exports(cli)
        assert exports["a/v"]["state"] == "active"
        assert exports["b/v"]["state"] == "broken"
        assert "pool 'b' is offline" in str(exports["b/v"]["message"])
        assert _read(ua) == A  # the other pool serves

        line = cli.fails("pool", "reopen", "b")
        assert "is missing" in line
        os.rename(tmp_path / "b.away", tmp_path / "b.img")
        reopened = cli("pool", "reopen", "b", "--json").json()
        assert (reopened["state"], reopened["reason"]) == ("online", "")
        assert _exports(cli)["b/v"]["state"] == "active"
        assert _read(ub) == B
        assert _read(ua) == A
        assert cli("fsck", "b", "--json").json()["errors"] == []
    finally:
        daemon.kill()


def test_truncated_backing_is_offline_and_never_read(cli: CLI, home: Path, tmp_path: Path) -> None:
    daemon = Daemon(home).start()
    try:
        ua, ub = _two_pools(cli, tmp_path)
        daemon.stop()
        whole = (tmp_path / "b.img").stat().st_size
        os.truncate(tmp_path / "b.img", 64 << 10)  # the header only: the data is gone
        daemon.start()

        b = _pools(cli)["b"]
        assert b["state"] == "offline"
        assert "shorter than recorded" in str(b["reason"])
        assert _exports(cli)["b/v"]["state"] == "broken"
        h = nbd.NBD()
        try:
            h.connect_uri(ub)
        except nbd.Error:
            pass  # the export is not served: nothing can be read from it
        else:
            raise AssertionError("the export of an offline pool was served")
        assert _read(ua) == A

        os.truncate(tmp_path / "b.img", whole)  # the size is back, the data is not
        cli("pool", "reopen", "b")
        assert _read(ub) == bytes(len(B))  # served again: the lost data reads as zeros
    finally:
        daemon.kill()


def test_the_demo_daemon_starts_with_its_pool_offline(cli: CLI, home: Path) -> None:
    daemon = Daemon(home, "--demo").start()
    try:
        daemon.stop()
        os.rename(home / "default-pool.img", home / "away.img")
        daemon.start()
        pools = _pools(cli)
        assert pools["default"]["state"] == "offline"
        assert "default-pool.img is missing" in str(pools["default"]["reason"])
        assert _exports(cli)["demo"]["state"] == "broken"
        os.rename(home / "away.img", home / "default-pool.img")
        cli("pool", "reopen", "default")
        assert _exports(cli)["demo"]["state"] == "active"
        assert _read(_exports(cli)["demo"]["uris"][0]) == bytes(len(A))
    finally:
        daemon.kill()


def test_without_a_daemon_an_offline_pool_is_listed_and_errors_are_one_line(
    cli: CLI, tmp_path: Path
) -> None:
    cli("pool", "create", "b", "--backing", f"{tmp_path}/b.img:64M")
    os.rename(tmp_path / "b.img", tmp_path / "b.away")
    listed = cli("pool", "list")
    assert listed.err == ""
    assert listed.out.splitlines()[1].split()[:2] == ["b", "offline"]
    missing = f"pool 'b' is offline: backing device {tmp_path}/b.img is missing"
    assert cli.fails("pool", "reopen", "b") == f"storvisor: error: {missing}"
    assert cli.fails("pool", "delete", "b") == f"storvisor: error: {missing}"
    os.rename(tmp_path / "b.away", tmp_path / "b.img")
    assert cli("pool", "reopen", "b", "--json").json()["state"] == "online"
