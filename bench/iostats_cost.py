"""What counting a request for the metrics costs: a ``CountedDevice`` (and the per-thread
``ThreadCountedDevice`` of vhost-user-blk data planes) over a device that does nothing,
against that device alone, in nanoseconds per call (the best of several runs). The
``+qos`` rows count a ``ThrottledDevice`` with no limit set, as every export of the daemon
is served: what an unlimited volume pays for QoS is their difference to the row above.

    .venv/bin/python bench/iostats_cost.py [--calls 300000]
"""

from __future__ import annotations

import argparse
import timeit

from storvisor.engine.device import Buffer
from storvisor.engine.iostats import CountedDevice, IoStats, ThreadCountedDevice
from storvisor.engine.qos import QosBlock, ThrottledDevice


class NullDevice:
    size = 1 << 30
    read_only = False
    block_size = 512

    def read_into(self, offset: int, buf: memoryview) -> None:
        pass

    def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=300_000)
    args = parser.parse_args()
    n = args.calls
    buf = memoryview(bytearray(4096))
    null = NullDevice()
    unlimited = ThrottledDevice(null, QosBlock())  # type: ignore[arg-type]
    devices = {
        "bare": null,
        "throttled": unlimited,
        "counted": CountedDevice(null, IoStats()),  # type: ignore[arg-type]
        "counted+qos": CountedDevice(unlimited, IoStats()),
        "thread-counted": ThreadCountedDevice(null, IoStats(slots=4)),  # type: ignore[arg-type]
        "thread-counted+qos": ThreadCountedDevice(unlimited, IoStats(slots=4)),
    }
    print(f"{'device':18} {'read ns':>8} {'write ns':>9}")
    for name, device in devices.items():
        read = min(timeit.repeat(lambda d=device: d.read_into(0, buf), number=n, repeat=7))
        write = min(timeit.repeat(lambda d=device: d.write(0, buf), number=n, repeat=7))
        print(f"{name:18} {read / n * 1e9:8.0f} {write / n * 1e9:9.0f}")


if __name__ == "__main__":
    main()
