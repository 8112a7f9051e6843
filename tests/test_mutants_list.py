"""``tests/mutants.toml`` stays appliable: every mutant's snippet occurs exactly once in its
file, and the tests it names exist. A refactoring that changes a mutated line must update
its mutant, or ``make mutants`` would report it missing instead of showing the test fail."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from mutants import LIST, load  # noqa: E402


def test_every_mutant_applies_once_and_names_existing_tests() -> None:
    mutants = load(LIST)
    assert mutants
    names = [m.name for m in mutants]
    assert len(names) == len(set(names)), "two mutants share a name"
    stale = []
    for m in mutants:
        found = (ROOT / m.file).read_text().count(m.original)
        if found != 1:
            stale.append(f"{m.name}: its snippet occurs {found} times in {m.file}")
        for selection in m.tests:
            path, _, function = selection.partition("::")
            module = ROOT / path
            if not module.exists():
                stale.append(f"{m.name}: no {path}")
            elif function and f"def {function.split('[')[0]}(" not in module.read_text():
                stale.append(f"{m.name}: no {function} in {path}")
    assert not stale, "\n".join(stale)
