"""The layering contracts of ``make lint`` (pyproject.toml's ``[tool.importlinter]``, run by
``lint-imports``) catch what they promise to catch.

Each case copies the package and its configuration into a temporary tree, adds one bad line
to one module, and runs ``lint-imports`` there: the copy as it is passes, and each bad line
breaks exactly the contract that forbids it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tree = tmp_path_factory.mktemp("layers") / "pristine"
    shutil.copytree(ROOT / "src" / "storvisor", tree / "src" / "storvisor")
    shutil.copytree(ROOT / "scripts", tree / "scripts")
    shutil.copy(ROOT / "pyproject.toml", tree)
    return tree


def lint(tree: Path, *contracts: str) -> subprocess.CompletedProcess[str]:
    args = [str(LINT_IMPORTS), "--no-cache", "--no-logo"]
    for contract in contracts:
        args += ["--contract", contract]
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    return subprocess.run(args, cwd=tree, env=env, capture_output=True, text=True, timeout=120)


def test_the_tree_keeps_every_contract(pristine: Path) -> None:
    result = lint(pristine)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@dataclass(frozen=True)
class Bad:
    name: str
    module: str  # under src/storvisor
    line: str
    contract: str
    report: str  # what the report must say


BAD = [
    Bad("engine imports an export", "engine/types.py",
        "import storvisor.exports.nbd", "layers", "storvisor.engine.types"),
    Bad("engine imports the test kit", "engine/device.py",
        "from storvisor.testing import memory", "layers", "storvisor.testing.memory"),
    Bad("protocol imports the API", "protocols/nbd/server.py",
        "from storvisor.api import codec", "layers", "storvisor.api.codec"),
    Bad("export imports the CLI", "exports/nbd.py",
        "import storvisor.cli.output", "layers", "storvisor.cli.output"),
    Bad("CLI imports the test kit", "cli/output.py",
        "import storvisor.testing.procs", "layers", "storvisor.testing.procs"),
    Bad("integration imports the API", "integrations/libvirt/vhostuser.py",
        "import storvisor.api.client", "layers", "storvisor.api.client"),
    Bad("protocol imports socket", "protocols/virtio/ring.py",
        "import socket", "sans-io", "socket"),
    Bad("protocol imports threading", "protocols/nbd/events.py",
        "from threading import Lock", "sans-io", "threading"),
    Bad("protocol imports asyncio", "protocols/vhost_user/messages.py",
        "import asyncio.streams", "sans-io", "asyncio"),
    Bad("export imports the catalog", "exports/dataplane.py",
        "from storvisor.engine.catalog import ZERO", "engine-public", "storvisor.engine.catalog"),
    Bad("API imports the device layout", "api/service.py",
        "from storvisor.engine import backing", "engine-public", "storvisor.engine.backing"),
    Bad("export reads a volume's state", "exports/dataplane.py",
        "def _pool_of(v: object) -> object: return v._state.pool", "private-names",
        "uses _state, private to storvisor.engine"),
    Bad("export replaces a volume's state", "exports/vhost_worker.py",
        "def _swap(v: object, s: object) -> None: v._state = s", "private-names",
        "uses _state"),
    Bad("export decodes map words", "exports/nbd_worker.py",
        "from storvisor.engine.sharedmap import _EPOCH_SHIFT", "private-names",
        "imports _EPOCH_SHIFT, private to storvisor.engine"),
    Bad("volume imports the pool for typing", "engine/volume.py",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
        "    from storvisor.engine.pool import Pool", "engine-acyclic", ".volume -> .pool"),
]  # fmt: skip


@pytest.mark.parametrize("bad", BAD, ids=lambda b: b.name)
def test_a_violation_breaks_its_contract(pristine: Path, tmp_path: Path, bad: Bad) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(pristine, tree)
    module = tree / "src" / "storvisor" / bad.module
    module.write_text(module.read_text() + "\n" + bad.line + "\n")
    result = lint(tree)
    out = " ".join(result.stdout.split())  # the report wraps long lines
    assert result.returncode == 1, out + result.stderr
    assert "Contracts: 4 kept, 1 broken." in out, out
    broken = out.split("Broken contracts", 1)[1]
    assert bad.report in broken, out
    names = {
        "layers": "layers:",
        "sans-io": "protocols are sans-I/O",
        "engine-public": "above the engine",
        "private-names": "private names stay inside",
        "engine-acyclic": "without cycles",
    }
    assert names[bad.contract] in broken
    others = [n for c, n in names.items() if c != bad.contract]
    assert not any(n in broken for n in others), out
