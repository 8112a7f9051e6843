"""Prerequisites of tests: skipped where they are missing, failed in CI.

A test that cannot run here (no ``/dev/fuse``, no loop device, one CPU, a tool not installed)
skips on a developer's machine. In CI (the environment has ``CI=true``) every prerequisite is
installed on purpose (``make test`` installs them), so a missing one is a broken machine or a
broken install step, and the test fails with the reason instead of passing silently.

``require`` is for a test (or a fixture) that needs something; ``require_module`` imports a
module a test module needs; ``pytest.mark.requires(condition, reason)`` is the marker form
(handled in ``conftest.py``); ``available`` is for a check inside a larger test that is left
out locally when its tool is missing.
"""

from __future__ import annotations

import importlib
import os
import types
import warnings

import pytest


def in_ci() -> bool:
    """Whether the tests run in CI (``CI=true`` in the environment)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require(condition: object, reason: str) -> None:
    """Skip the running test unless ``condition`` holds; in CI, fail it."""
    if condition:
        return
    if in_ci():
        pytest.fail(f"missing prerequisite (CI=true, so this fails): {reason}", pytrace=False)
    pytest.skip(reason)


def require_module(name: str, reason: str | None = None) -> types.ModuleType:
    """Import ``name`` for a test module (call at module level); skip the module if it cannot
    be imported, and in CI fail."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        why = reason or f"module {name!r} cannot be imported: {e}"
        if in_ci():
            pytest.fail(f"missing prerequisite (CI=true, so this fails): {why}", pytrace=False)
        pytest.skip(why, allow_module_level=True)
    raise AssertionError("unreachable")


def available(condition: object, reason: str) -> bool:
    """Whether an optional check inside a test can run: True when ``condition`` holds;
    otherwise a warning locally, and in CI a failure."""
    if condition:
        return True
    if in_ci():
        pytest.fail(f"missing prerequisite (CI=true, so this fails): {reason}", pytrace=False)
    warnings.warn(f"check left out: {reason}", stacklevel=2)
    return False


def cpus() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0))
