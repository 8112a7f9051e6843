"""A device that holds a signature (a file system, swap, a partition table) made by the real
tool is refused by ``pool create`` and ``add_backing`` unless forced; forced, the signature is
gone afterwards; refused, nothing changed (no pool directory, the signature intact)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from prereq import require
from storvisor.engine import probe
from storvisor.engine.home import Home
from storvisor.engine.probe import ProbeUnavailable, Signature, find_signature, parse_export
from storvisor.engine.types import BackingSpec
from storvisor.errors import Conflict

SIZE = 64 << 20


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    require(path, f"{name} is not installed")
    assert path is not None
    return path


def _run(*argv: str, stdin: str | None = None) -> None:
    subprocess.run(argv, input=stdin, capture_output=True, text=True, check=True, timeout=60)


def _ext4(path: Path) -> None:
    _run(_tool("mkfs.ext4"), "-q", "-F", str(path))


def _swap(path: Path) -> None:
    _run(_tool("mkswap"), str(path))


def _gpt(path: Path) -> None:
    _run(_tool("sfdisk"), "-q", str(path), stdin="label: gpt\n,32M\n")


def _dos(path: Path) -> None:
    _run(_tool("sfdisk"), "-q", str(path), stdin="label: dos\n,32M\n")


KINDS: list[tuple[str, Callable[[Path], None], str, Signature]] = [
    ("ext4", _ext4, "holds an ext4 file system", Signature("ext4", "", "filesystem")),
    ("swap", _swap, "holds a swap area", Signature("swap", "", "other")),
    ("gpt", _gpt, "holds a gpt partition table", Signature("", "gpt", "")),
    ("dos", _dos, "holds a dos partition table", Signature("", "dos", "")),
]


def _image(tmp_path: Path, make: Callable[[Path], None]) -> Path:
    path = tmp_path / "lun.img"
    with open(path, "wb") as f:
        f.truncate(SIZE)
    make(path)
    return path


@pytest.mark.parametrize(("kind", "make", "said", "expected"), KINDS, ids=[k[0] for k in KINDS])
def test_create_refuses_a_signature_and_force_overwrites_it(
    tmp_path: Path,
    kind: str,
    make: Callable[[Path], None],
    said: str,
    expected: Signature,
) -> None:
    path = _image(tmp_path, make)
    found = find_signature(str(path))
    assert found is not None
    assert (found.type, found.pttype) == (expected.type, expected.pttype)
    before = path.read_bytes()
    with Home(tmp_path / "home") as home:
        with pytest.raises(Conflict) as e:
            home.create_pool("p", [BackingSpec(str(path))])
        assert str(e.value) == f"{path} {said} (use --force to overwrite it)"
        assert not (tmp_path / "home" / "pools" / "p").exists()
        assert home.pools() == []
        assert path.read_bytes() == before  # not one byte written
        # :SIZE naming an existing file is probed the same way, and the file is not grown
        with pytest.raises(Conflict):
            home.create_pool("p", [BackingSpec(str(path), 2 * SIZE)])
        assert path.stat().st_size == SIZE

        info = home.create_pool("p", [BackingSpec(str(path), force=True)])
        assert info.backings[0].path == str(path)
    assert find_signature(str(path)) is None
    with Home(tmp_path / "home") as home:
        assert [p.name for p in home.pools()] == ["p"]


@pytest.mark.parametrize(("kind", "make", "said", "expected"), KINDS[:2], ids=["ext4", "swap"])
def test_add_backing_refuses_a_signature_and_force_overwrites_it(
    tmp_path: Path,
    kind: str,
    make: Callable[[Path], None],
    said: str,
    expected: Signature,
) -> None:
    path = _image(tmp_path, make)
    with Home(tmp_path / "home") as home:
        home.create_pool("p", [BackingSpec(str(tmp_path / "first.img"), SIZE)])
        with pytest.raises(Conflict, match=f"^{path} {said} "):
            home.pool("p").add_backing(BackingSpec(str(path)))
        assert len(home.pool("p").info().backings) == 1
        assert find_signature(str(path)) is not None
        info = home.pool("p").add_backing(BackingSpec(str(path), force=True))
        assert [b.path for b in info.backings] == [str(tmp_path / "first.img"), str(path)]
    assert find_signature(str(path)) is None
    with Home(tmp_path / "home") as home:
        assert len(home.pool("p").info().backings) == 2


def test_blank_and_created_files_need_no_force(tmp_path: Path) -> None:
    blank = tmp_path / "blank.img"
    with open(blank, "wb") as f:
        f.truncate(SIZE)
    with Home(tmp_path / "home") as home:
        home.create_pool(
            "p", [BackingSpec(str(blank)), BackingSpec(str(tmp_path / "new.img"), SIZE)]
        )


def test_another_pool_is_refused_even_forced(tmp_path: Path) -> None:
    with Home(tmp_path / "home") as home:
        home.create_pool("a", [BackingSpec(str(tmp_path / "a.img"), SIZE)])
        home.pool("a").close()
        with pytest.raises(Conflict, match="belongs to pool 'a'"):
            home.create_pool("b", [BackingSpec(str(tmp_path / "a.img"), force=True)])
        assert not (tmp_path / "home" / "pools" / "b").exists()


def test_a_missing_probe_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ``probe.BLKID`` is the declared seam: the name of the tool run
    monkeypatch.setattr(probe, "BLKID", "blkid-not-installed-here")
    path = tmp_path / "lun.img"
    with open(path, "wb") as f:
        f.truncate(SIZE)
    with Home(tmp_path / "home") as home:
        with pytest.raises(
            ProbeUnavailable, match=r"blkid-not-installed-here .*util-linux.* not installed"
        ):
            home.create_pool("p", [BackingSpec(str(path))])
        assert not (tmp_path / "home" / "pools" / "p").exists()


def test_parse_export() -> None:
    text = "DEVNAME=/x\nUUID=1\nTYPE=LVM2_member\nUSAGE=raid\n"
    assert parse_export(text) == Signature("LVM2_member", "", "raid")
    assert parse_export(text).describe() == "an LVM physical volume"
    assert Signature("xfs", "", "filesystem").describe() == "a xfs file system"
    assert Signature("ext4", "", "filesystem").describe() == "an ext4 file system"
    assert Signature("", "dos", "").describe() == "a dos partition table"
    assert Signature("foo", "", "").describe() == "a foo signature"
