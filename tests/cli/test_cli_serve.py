"""``storvisor serve``: the demo set-up reached with real NBD clients, clean shutdown, exports
that come back after a restart, and the HOME lock that keeps a second process out."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess

from cli_harness import CLI, Daemon

from storvisor.engine.home import Home


def _nbd(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60).stdout


def test_demo_then_nbdinfo_and_qemu_io(home):
    d = Daemon(home, "--demo").start()
    try:
        uri = f"nbd+unix:///demo?socket={home}/nbd.sock"
        assert uri in d.banner.splitlines()[5]
        # The printed command lines work as pasted.
        commands = [line.strip() for line in d.banner.splitlines() if line.startswith("  ")]
        nbdinfo = next(c for c in commands if c.startswith("nbdinfo "))
        qemu_io = next(c for c in commands if c.startswith("qemu-io "))
        qemu_img = next(c for c in commands if c.startswith("qemu-img "))
        assert "export-size: 1073741824" in _nbd(*shlex.split(nbdinfo))
        out = _nbd(*shlex.split(qemu_io))
        assert "wrote 1048576/1048576" in out and "read 1048576/1048576" in out
        assert "virtual size: 1 GiB" in _nbd(*shlex.split(qemu_img))
        info = json.loads(_nbd("nbdinfo", "--json", uri))
        assert info["exports"][0]["export-size"] == 1 << 30
    finally:
        rc, err = d.stop()
    assert rc == 0, err
    assert "Traceback" not in err
    assert not (home / "api.sock").exists() and not (home / "nbd.sock").exists()

    # Restarting with --demo reuses what exists; the data written before is still there.
    d = Daemon(home, "--demo").start()
    try:
        out = _nbd("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x5a 0 1M", uri)
        assert "read 1048576/1048576" in out
    finally:
        assert d.stop()[0] == 0


def test_nbd_over_tcp(home):
    d = Daemon(home, "--demo", "--nbd-tcp", "127.0.0.1:0").start()
    try:
        match = re.search(r"nbd://127\.0\.0\.1:(\d+)/demo", d.banner)
        assert match, d.banner
        assert "export-size: 1073741824" in _nbd("nbdinfo", match.group(0))
    finally:
        assert d.stop()[0] == 0


def test_exports_survive_restart_and_a_broken_one_is_reported(cli, home, tmp_path):
    cli("pool", "create", "p", "--backing", f"{tmp_path}/disk.img:2G")
    cli("volume", "create", "p/v", "--size", "64M")
    cli("volume", "create", "p/gone", "--size", "64M")
    sock = tmp_path / "v.sock"
    d = Daemon(home).start()
    try:
        uri = cli("export", "nbd", "p/v", "--name", "v").out.strip()
        _nbd("qemu-io", "-f", "raw", "-c", "write -P 0x33 0 64k", uri)
        cli("export", "vhost-user-blk", "p/v", "--socket", str(sock))
        assert sock.exists()
    finally:
        assert d.stop()[0] == 0
    assert not sock.exists()

    # A definition whose volume has gone (e.g. HOME restored from an older copy).
    exports = json.loads((home / "exports.json").read_text())
    ghost = dict(exports["exports"][0], name="ghost", volume="nothere")
    exports["exports"].append(ghost)
    (home / "exports.json").write_text(json.dumps(exports))

    d = Daemon(home).start()
    try:
        states = {e["spec"]["name"]: e for e in cli("export", "list", "--json").json()}
        assert states["v"]["state"] == "active"
        assert states["vhost-user-blk:p/v"]["state"] == "active"
        assert states["ghost"]["state"] == "broken"
        assert "nothere" in states["ghost"]["message"]
        assert sock.exists()
        out = _nbd("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x33 0 64k", uri)
        assert "read 65536/65536" in out
        cli("export", "remove", "ghost")
    finally:
        rc, err = d.stop()
    assert rc == 0
    assert "ghost" in err  # the daemon said why it did not start it


def test_second_process_is_locked_out(cli, home, daemon, tmp_path):
    line = cli.fails("serve")
    assert f"in use by pid {daemon.proc.pid}" in line
    # Commands still work: they go through the daemon's API.
    cli("pool", "create", "p", "--backing", f"{tmp_path}/disk.img:1G")
    assert [p["name"] for p in cli("pool", "list", "--json").json()] == ["p"]


def test_cli_without_daemon_is_locked_out_by_another_holder(cli, home):
    holder = Home(home)
    try:
        line = cli.fails("pool", "list")
        assert "in use by pid" in line
    finally:
        holder.close()
    assert cli("pool", "list", "--json").json() == []


def test_unusable_home_is_one_line(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    line = CLI(not_a_dir).fails("pool", "list")
    assert str(not_a_dir) in line
    long_home = tmp_path / ("d" * 100)
    line = CLI(long_home).fails("serve")
    assert "too deep" in line


def test_debug_shows_the_traceback(cli):
    err = cli("--debug", "pool", "show", "nope", rc=1).err
    assert "Traceback" in err
    assert err.splitlines()[-1].startswith("storvisor: error: ")


def test_after_sigkill_stale_sockets_do_not_matter(cli, home, tmp_path):
    d = Daemon(home, "--demo").start()
    d.stop(signal.SIGKILL)
    assert (home / "api.sock").exists()  # left behind by the killed daemon
    # The CLI notices nobody answers and opens HOME itself; the lock died with the process.
    assert [v["name"] for v in cli("volume", "list", "--json").json()] == ["demo"]
    assert cli("export", "list", "--json").json()[0]["state"] == "inactive"
    d = Daemon(home).start()
    try:
        assert cli("export", "list", "--json").json()[0]["state"] == "active"
    finally:
        assert d.stop()[0] == 0
