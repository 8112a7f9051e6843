"""Every CLI command, run as a real subprocess, both offline (the CLI opens HOME itself) and
through a running daemon (the CLI talks to ``api.sock``): the same commands, the same output
shapes, the same errors."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from cli_harness import Daemon

from prereq import available

GiB = 1 << 30
MiB = 1 << 20


@pytest.fixture(params=["offline", "daemon"])
def mode(request, home):
    if request.param == "offline":
        yield "offline"
        return
    d = Daemon(home).start()
    try:
        yield "daemon"
    finally:
        rc, err = d.stop()
        assert rc == 0, err
        assert "Traceback" not in err


def test_every_command(cli, home, tmp_path, mode):
    backing = tmp_path / "disk.img"
    out = cli("pool", "create", "p1", "--backing", f"{backing}:4G", "--cluster-size", "64K")
    assert "p1" in out.out
    assert backing.stat().st_size == 4 * GiB

    pools = cli("pool", "list", "--json").json()
    assert [p["name"] for p in pools] == ["p1"]
    assert pools[0]["cluster_size"] == 64 << 10
    assert pools[0]["stats"]["capacity"] > 0
    table = cli("pool", "list").out.splitlines()
    assert table[0].split()[0] == "NAME" and table[1].split()[0] == "p1"
    shown = cli("pool", "show", "p1", "--json").json()
    assert shown["backings"][0]["path"] == str(backing)

    second = tmp_path / "disk2.img"
    grown = cli("pool", "add-backing", "p1", "--backing", f"{second}:1G", "--json").json()
    assert len(grown["backings"]) == 2

    vol = cli("volume", "create", "p1/v1", "--size", "1G", "--json").json()
    assert (vol["pool"], vol["name"], vol["size"], vol["origin"]) == ("p1", "v1", GiB, None)
    cli("volume", "create", "p1/v2", "--size", "512M")
    vols = cli("volume", "list", "--json").json()
    assert [(v["name"], v["size"]) for v in vols] == [("v1", GiB), ("v2", 512 * MiB)]
    assert cli("volume", "list", "p1", "--json").json() == vols
    assert "p1/v1" in cli("volume", "show", "p1/v1").out
    assert cli("volume", "extend", "p1/v1", "--size", "2G", "--json").json()["size"] == 2 * GiB

    snap = cli("snapshot", "create", "p1/v1@s1", "--json").json()
    assert (snap["volume"], snap["name"], snap["size"]) == ("v1", "s1", 2 * GiB)
    assert [s["name"] for s in cli("snapshot", "list", "p1/v1", "--json").json()] == ["s1"]
    clone = cli("volume", "clone", "p1/v1@s1", "p1/c1", "--json").json()
    assert clone["origin"] == "v1@s1"
    assert cli("snapshot", "list", "p1/v1", "--json").json()[0]["clones"] == ["c1"]
    assert cli("volume", "flatten", "p1/c1", "--json").json()["origin"] is None
    assert cli("snapshot", "rollback", "p1/v1@s1", "--json").json()["size"] == 2 * GiB
    cli("snapshot", "create", "p1/v1@s2")
    cli("snapshot", "delete", "p1/v1@s2")
    assert [s["name"] for s in cli("snapshot", "list", "p1/v1", "--json").json()] == ["s1"]

    report = cli("fsck", "p1", "--json").json()
    assert report["pool"] == "p1"
    assert (report["leaked"], report["doubly_owned"], report["dangling"]) == ([], [], [])
    assert "clean" in cli("fsck", "p1").out

    # Exports: live with the daemon, recorded for the next start without it.
    exp = cli("export", "nbd", "p1/v1", "--name", "vol1", "--json").json()
    assert exp["spec"]["name"] == "vol1"
    assert exp["state"] == ("active" if mode == "daemon" else "inactive")
    assert exp["uris"][0] == f"nbd+unix:///vol1?socket={home}/nbd.sock"
    printed = cli("export", "nbd", "p1/v1@s1").out
    if mode == "daemon":
        assert printed.strip() == f"nbd+unix:///p1%2Fv1%40s1?socket={home}/nbd.sock"
    else:
        assert "inactive" in printed and "storvisor serve" in printed
    sock = tmp_path / "vhost.sock"
    vh = cli("export", "vhost-user-blk", "p1/v2", "--socket", str(sock), "--queues", "2", "--json")
    assert vh.json()["spec"]["queues"] == 2
    assert sock.exists() == (mode == "daemon")
    listed = cli("export", "list", "--json").json()
    assert [(e["spec"]["name"], e["spec"]["read_only"]) for e in listed] == [
        ("p1/v1@s1", True),
        ("vhost-user-blk:p1/v2", False),
        ("vol1", False),
    ]
    assert cli("export", "show", "vol1", "--json").json()["spec"]["volume"] == "v1"
    xml = cli("libvirt-xml", "p1/v2").out
    assert "<disk" in xml and str(sock) in xml and "<memoryBacking>" in xml
    if available(
        shutil.which("virt-xml-validate") and shutil.which("xmllint"),
        "virt-xml-validate or xmllint is not installed (libvirt-clients, libxml2-utils)",
    ):
        disk = xml[: xml.index("</disk>") + len("</disk>")]
        domain = tmp_path / "domain.xml"
        domain.write_text(
            "<domain type='kvm'><name>t</name><memory unit='MiB'>256</memory>"
            "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>"
            "<os><type arch='x86_64'>hvm</type></os>"
            f"<devices>{disk}</devices></domain>"
        )
        subprocess.run(["virt-xml-validate", str(domain), "domain"], check=True)

    # In use: exported volumes and snapshots cannot be deleted, and nothing is lost.
    assert "exported" in cli.fails("volume", "delete", "p1/v1")
    assert "exported" in cli.fails("snapshot", "delete", "p1/v1@s1")
    assert "exported" in cli.fails("pool", "delete", "p1", "--force")
    assert len(cli("volume", "list", "--json").json()) == 3

    cli("export", "remove", "vol1")
    cli("export", "remove", "p1/v1@s1")
    cli("export", "remove", "vhost-user-blk:p1/v2")
    assert not sock.exists()
    assert cli("export", "list", "--json").json() == []
    cli("volume", "delete", "p1/c1")
    cli("snapshot", "delete", "p1/v1@s1")
    cli("volume", "delete", "p1/v1")
    assert [v["name"] for v in cli("volume", "list", "--json").json()] == ["v2"]
    assert "volumes" in cli.fails("pool", "delete", "p1")
    cli("pool", "delete", "p1", "--force")
    assert cli("pool", "list", "--json").json() == []


BAD_INPUT = [
    # (arguments, exit status, words the one-line error must contain)
    (["volume", "create", "p1/x", "--size", "12Q"], 2, "invalid size"),
    (["volume", "create", "p1/x", "--size", "0"], 2, "positive"),
    (["volume", "create", "p1/-bad", "--size", "1G"], 2, "invalid volume name"),
    (["volume", "create", "p1", "--size", "1G"], 2, "POOL/VOL"),
    (["volume", "create", "p1/v1", "--size", "1G"], 1, "exists"),
    (["volume", "create", "nopool/v9", "--size", "1G"], 1, "nopool"),
    (["volume", "show", "p1/missing"], 1, "missing"),
    (["volume", "extend", "p1/v1", "--size", "1M"], 1, ""),
    (["snapshot", "create", "p1/v1"], 2, "POOL/VOL@SNAP"),
    (["snapshot", "rollback", "p1/v1@nosnap"], 1, "nosnap"),
    (["volume", "clone", "p1/v1@s1", "other/c"], 2, "pool"),
    (["pool", "create", "p1", "--backing", "/tmp/x.img:1G"], 1, "p1"),
    (["pool", "create", "p2", "--backing", "/nonexistent/dev"], 1, ""),
    (["pool", "create", "bad/name", "--backing", "/tmp/x.img:1G"], 2, "invalid pool name"),
    (["pool", "show", "nopool"], 1, "nopool"),
    (["export", "remove", "noexport"], 1, "noexport"),
    (["export", "vhost-user-blk", "p1/v1", "--socket", "/tmp/s", "--queues", "0"], 2, "queue"),
    (["libvirt-xml", "p1/v1"], 1, "vhost-user-blk"),
    (["fsck", "nopool"], 1, "nopool"),
    (["frobnicate"], 2, "invalid choice"),
    (["volume"], 2, "required"),
    ([], 2, "required"),
]


def test_bad_input_one_line_and_nothing_lost(cli, tmp_path, mode):
    cli("pool", "create", "p1", "--backing", f"{tmp_path}/disk.img:1G")
    cli("volume", "create", "p1/v1", "--size", "64M")
    cli("snapshot", "create", "p1/v1@s1")
    before = (cli("pool", "list", "--json").out, cli("volume", "list", "--json").out)
    for args, rc, words in BAD_INPUT:
        line = cli.fails(*args, rc=rc)
        assert words in line, (args, line)
    after = (cli("pool", "list", "--json").out, cli("volume", "list", "--json").out)
    assert after == before
    assert [s["name"] for s in cli("snapshot", "list", "p1/v1", "--json").json()] == ["s1"]
