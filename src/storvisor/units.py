"""Sizes as users write them: ``512``, ``64K``, ``1.5G``, ``2T`` (binary multiples)."""

from __future__ import annotations

import re

from storvisor.errors import InvalidArgument

_SUFFIXES: dict[str, int] = {
    "": 1,
    "B": 1,
    "K": 1 << 10,
    "M": 1 << 20,
    "G": 1 << 30,
    "T": 1 << 40,
    "P": 1 << 50,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Parse a size with an optional K/M/G/T/P suffix (powers of 1024) into bytes.

    Accepts ``4096``, ``64K``, ``64k``, ``64KiB``, ``1.5G``. Raises ``InvalidArgument`` for
    anything else, including a fractional number of bytes.
    """
    match = _SIZE_RE.match(text)
    if match is None:
        raise InvalidArgument(f"invalid size {text!r}: expected a number with K, M, G or T")
    number: str = match.group(1)
    suffix: str = match.group(2)
    multiplier = _SUFFIXES[suffix.upper()]
    if "." in number:
        whole, frac = number.split(".")
        numerator = int(whole + frac) * multiplier
        denominator: int = 10 ** len(frac)
        if numerator % denominator:
            raise InvalidArgument(f"invalid size {text!r}: not a whole number of bytes")
        return numerator // denominator
    return int(number) * multiplier


def format_size(size: int) -> str:
    """Render bytes compactly and exactly when possible: ``1G``, ``1536M``, ``1000``."""
    for suffix in ("P", "T", "G", "M", "K"):
        unit = _SUFFIXES[suffix]
        if size >= unit and size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)
