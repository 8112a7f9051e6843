"""Rewrite docs/openapi.json from the route table (``make openapi``); ``--check`` only
compares and exits 1 when the file is stale."""

from __future__ import annotations

import sys
from pathlib import Path

from storvisor.api.openapi import render

DOC = Path(__file__).resolve().parent.parent / "docs" / "openapi.json"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not DOC.exists() or DOC.read_text() != text:
            sys.stderr.write(f"{DOC} is stale: run 'make openapi'\n")
            return 1
        return 0
    DOC.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
