#!/usr/bin/env python3
"""Run the named mutations of tests/mutants.toml and report which survive.

Each mutation replaces one exact snippet of one source file (it must occur exactly once) and
names the pytest selection that must kill it. Every mutation is applied alone to a fresh copy
of the tree in a temporary directory (the working tree is never touched), and its selection
runs there with ``CI=true`` (a missing prerequisite fails instead of skipping) and a timeout
(a hang counts as killed, and is reported as such). Before the mutants, each distinct
selection runs once on the unmutated copy: a selection that fails there kills nothing.

    python scripts/mutants.py [--only NAME ...] [--timeout SECONDS] [--no-baseline]
                              [--tests SELECTION ...]

Exits 0 when every mutant is killed, 1 when one survives (or a snippet is not found, or a
baseline fails).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIST = ROOT / "tests" / "mutants.toml"
COPIED = ("src", "tests", "pyproject.toml")


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    original: str
    replacement: str
    tests: tuple[str, ...]
    why: str


def load(path: Path) -> list[Mutant]:
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    return [
        Mutant(m["name"], m["file"], m["original"], m["replacement"], tuple(m["tests"]), m["why"])
        for m in raw["mutant"]
    ]


def copy_tree(dest: Path) -> None:
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(
                src, dest / name, ignore=shutil.ignore_patterns("__pycache__", ".*cache")
            )
        else:
            shutil.copy2(src, dest / name)


def run_tests(tree: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, float, str]:
    """Run ``tests`` in ``tree``: ("passed" | "failed" | "timeout" | "error", seconds, tail)."""
    env = dict(os.environ, CI="true", PYTHONPATH=str(tree / "src"), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", *tests]
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=tree,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        return "timeout", time.monotonic() - started, out[-2000:]
    except BaseException:  # interrupted or terminated: the tests must not outlive us
        os.killpg(proc.pid, 9)
        proc.wait()
        raise
    took = time.monotonic() - started
    if proc.returncode == 0:
        return "passed", took, out[-2000:]
    if proc.returncode == 1:
        return "failed", took, out[-2000:]
    return "error", took, out[-2000:]


def failing_test(tail: str) -> str:
    """The first ``FAILED``/``ERROR`` line of pytest's summary, or the last line."""
    for line in tail.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" - ")[0]
    lines = [line for line in tail.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/mutants.py")
    parser.add_argument("--only", nargs="*", default=None, help="names of mutants to run")
    parser.add_argument("--timeout", type=float, default=600.0, help="per selection, seconds")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated runs")
    parser.add_argument("--tests", nargs="+", help="run this selection instead of each one's")
    args = parser.parse_args()
    # a SIGTERM (e.g. from timeout(1)) unwinds like Ctrl-C, so the running tests are killed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    mutants = load(LIST)
    if args.tests:
        mutants = [
            Mutant(m.name, m.file, m.original, m.replacement, tuple(args.tests), m.why)
            for m in mutants
        ]
    if args.only:
        unknown = set(args.only) - {m.name for m in mutants}
        if unknown:
            print(f"mutants: no mutant named {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        mutants = [m for m in mutants if m.name in args.only]
    bad = 0
    with tempfile.TemporaryDirectory(prefix="storvisor-mutants-") as tmp:
        if not args.no_baseline:
            base = Path(tmp) / "base"
            copy_tree(base)
            for tests in dict.fromkeys(m.tests for m in mutants):
                outcome, took, tail = run_tests(base, tests, args.timeout)
                print(f"baseline  {outcome:8} {took:6.1f}s  {' '.join(tests)}", flush=True)
                if outcome != "passed":
                    print(tail)
                    bad += 1
            shutil.rmtree(base)
        for m in mutants:
            tree = Path(tmp) / m.name
            copy_tree(tree)
            target = tree / m.file
            text = target.read_text()
            found = text.count(m.original)
            if found != 1:
                print(f"MISSING   {m.name}: the snippet occurs {found} times in {m.file}")
                bad += 1
                shutil.rmtree(tree)
                continue
            target.write_text(text.replace(m.original, m.replacement))
            outcome, took, tail = run_tests(tree, m.tests, args.timeout)
            shutil.rmtree(tree)
            if outcome == "passed":
                print(f"SURVIVED  {m.name} ({took:.1f}s): {' '.join(m.tests)}", flush=True)
                bad += 1
            elif outcome == "error":
                print(f"ERROR     {m.name} ({took:.1f}s): {failing_test(tail)}", flush=True)
                bad += 1
            else:
                how = "hung, timed out" if outcome == "timeout" else failing_test(tail)
                print(f"killed    {m.name} ({took:.1f}s): {how}", flush=True)
    print(f"mutants: {len(mutants)} run, {bad} problem(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
