"""Shared pytest set-up.

Debian's ``python3-libnbd`` lives in the system dist-packages; it is made importable for the
test process only (appended, so nothing else is shadowed).
"""

from __future__ import annotations

import sys

_DEBIAN_DIST = "/usr/lib/python3/dist-packages"
if _DEBIAN_DIST not in sys.path:
    sys.path.append(_DEBIAN_DIST)
