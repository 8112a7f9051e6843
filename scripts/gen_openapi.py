"""Rewrite docs/openapi.json (or PATH) from the route table: ``make openapi``. With
``--check`` only compare, and exit 1 when the file is stale."""

from __future__ import annotations

import sys
from pathlib import Path

from storvisor.api.openapi import render

DOC = Path(__file__).resolve().parent.parent / "docs" / "openapi.json"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    paths = [a for a in argv if a != "--check"]
    path = Path(paths[0]) if paths else DOC
    text = render()
    if check:
        if not path.exists() or path.read_text() != text:
            sys.stderr.write(f"{path} is stale: run 'make openapi'\n")
            return 1
        return 0
    path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
