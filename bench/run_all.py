"""Run every storvisor benchmark in turn (``make bench``), each printing its own table.

Each benchmark runs storvisor and its peer in the same run on the same file and prints
ratios; docs/benchmarks.md records the latest figures and the command behind each.
Pass benchmark names to run a subset: ``python bench/run_all.py nbd_bench vhost_bench``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHES = (
    "engine_hot_path",
    "cluster_size",
    "allocation",
    "nbd_bench",
    "nbd_cpu",
    "nbd_clients_bench",
    "vhost_bench",
    "vhost_volumes_bench",
)


def main(argv: list[str]) -> int:
    here = Path(__file__).resolve().parent
    chosen = argv or list(BENCHES)
    unknown = [name for name in chosen if name not in BENCHES]
    if unknown:
        print(f"run_all: unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHES)}")
        return 2
    failed = []
    for name in chosen:
        print(f"\n=== {name} ===", flush=True)
        if subprocess.run([sys.executable, str(here / f"{name}.py")]).returncode != 0:
            failed.append(name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
