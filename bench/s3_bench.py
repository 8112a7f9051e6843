"""S3 pool benchmark: 1 MiB sequential writes made durable in the bucket, and 1 MiB
sequential reads of a cold S3 volume, against boto3 alone with the same parallelism, same
moto server.

* ``boto3 put``: ``--mib`` MiB as objects of ``--object-size`` MiB, ``UPLOAD_THREADS``
  threads (the object backing's parallelism), ``put_object`` of bytes already in memory;
* ``boto3 put through a file``: the same MiB first written to a new file on the file system
  of storvisor's HOMEs in 1 MiB ``pwrite``s and synced, then each object read back from it
  and put, ``UPLOAD_THREADS`` threads: what a local copy of the data costs on the way to the
  bucket, the floor under the writes of any pool that keeps them on local disk before it
  uploads them;
* ``storvisor write+flush``: the same MiB written to a volume of an S3 pool in 1 MiB
  requests (``Volume.write``: into the local image), then one ``flush``, which syncs the
  image and uploads them; the time is from the first write to the end of the flush;
* ``boto3 get``: every object back, ``UPLOAD_THREADS`` threads, into memory;
* ``boto3 get into a file``: the same, each body then written (``pwrite``) at its place in a
  new file on the file system of storvisor's HOMEs: what keeping a local copy of the objects
  costs by itself, the floor under the cold read of any pool that caches its objects on
  local disk;
* ``storvisor cold read``: the volume read in 1 MiB requests (``Volume.read_into``) on
  another HOME that has none of the pool's data, from the moment ``pool import`` returned
  (the pool is open over an empty local image; its objects are fetched in the background
  and before a read that needs one, ``engine/hydration.py``) to the last read;
* ``import + cold read``: the same, timed from the start of the import (which costs a fixed
  number of requests: lease, catalog, listing), and ``import`` alone, in seconds.

With ``--nbd``, also 4 KiB random writes and reads at queue depth 32 through the daemon's
NBD data planes and fio's ``nbd`` engine, on a volume of an S3 pool against one of a
local-file pool (each of ``--nbd-size``, written once): a plane reads and writes the S3
pool's local image in place, as the local pool's device, and marks the objects it wrote in
the table it shares with the serving process (``Backing.marks``); fio never flushes, and
every fio run starts after an ``os.sync()``. Rounds alternate the pools; medians and the
S3/local ratio.

Each round runs both sides in turn (alternating which goes first), on fresh buckets; the
figures are medians over the rounds, with each round's ratio. The machine's load average is
printed before and after, since the moto server shares the CPUs with both sides.

Usage::

    PYTHONPATH=src .venv/bin/python bench/s3_bench.py [--mib 256] [--object-size 4] [--rounds 3]
        [--nbd [--nbd-size 128M] [--seconds 3]]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

import planes_fio
from storvisor.engine.home import Home
from storvisor.engine.object_backing import UPLOAD_THREADS
from storvisor.engine.s3 import S3Spec
from storvisor.engine.types import BackingSpec

MiB = 1 << 20


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(*sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--object-size", type=int, default=4, help="MiB")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nbd", action="store_true", help="4k random I/O through data planes")
    parser.add_argument("--nbd-size", type=int, default=128, help="MiB")
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("moto did not start") from None
                time.sleep(0.1)
        run(url, args.mib, args.object_size * MiB, args.rounds)
        if args.nbd:
            planes(url, args.nbd_size * MiB, args.object_size * MiB, args.rounds, args.seconds)
    finally:
        server.terminate()
        server.wait()


def boto3_side(client: Any, bucket: str, data: bytes, object_size: int) -> dict[str, float]:
    """Seconds to put ``data`` as objects (``put``), to get them all back (``get``), to get
    them back into a new file (``get_file``), and to put them through a file
    (``put_file``)."""
    count = len(data) // object_size
    view = memoryview(data)
    times: dict[str, float] = {}

    def put(i: int) -> None:
        chunk = view[i * object_size : (i + 1) * object_size]
        client.put_object(Bucket=bucket, Key=f"o{i}", Body=bytes(chunk))

    def get(i: int) -> bytes:
        body: bytes = client.get_object(Bucket=bucket, Key=f"o{i}")["Body"].read()
        return body

    def timed(name: str, work: Callable[[int], object]) -> None:
        start = time.perf_counter()
        list(pool.map(work, range(count)))
        times[name] = time.perf_counter() - start

    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        timed("put", put)
        timed("get", get)
        with tempfile.TemporaryFile() as copy:
            timed("get_file", lambda i: os.pwrite(copy.fileno(), get(i), i * object_size))
        with tempfile.TemporaryFile() as local:
            fd = local.fileno()

            def put_from_file(i: int) -> None:
                body = os.pread(fd, object_size, i * object_size)
                client.put_object(Bucket=bucket, Key=f"f{i}", Body=body)

            start = time.perf_counter()
            for offset in range(0, len(data), MiB):
                os.pwrite(fd, view[offset : offset + MiB], offset)
            os.fdatasync(fd)
            written = time.perf_counter() - start
            timed("put_file", put_from_file)
            times["put_file"] += written
        keys = [f"{prefix}{i}" for prefix in "of" for i in range(count)]
        list(pool.map(lambda key: client.delete_object(Bucket=bucket, Key=key), keys))
    return times


def storvisor_side(url: str, bucket: str, data: bytes, object_size: int) -> tuple[float, ...]:
    """Seconds of write+flush, of the import alone, and of reading the volume after it."""
    size = len(data)
    with tempfile.TemporaryDirectory() as tmp:
        spec = S3Spec(bucket, (url,), "us-east-1")
        home = Home(Path(tmp) / "first")
        home.create_s3_pool("b", spec, size=2 * size, object_size=object_size)
        pool = home.pool("b")
        pool.create_volume("v", size)
        volume = pool.open_volume("v")
        view = memoryview(data)
        start = time.perf_counter()
        for offset in range(0, size, MiB):
            volume.write(offset, view[offset : offset + MiB])
        volume.flush()
        write_s = time.perf_counter() - start
        volume.close()
        home.close()

        other = Home(Path(tmp) / "second")
        buf = memoryview(bytearray(MiB))
        start = time.perf_counter()
        other.import_s3_pool("b", spec)
        imported = time.perf_counter()
        import_s = imported - start
        volume = other.pool("b").open_volume("v")
        for offset in range(0, size, MiB):
            volume.read_into(offset, buf)
        read_s = time.perf_counter() - imported
        if bytes(buf) != data[size - MiB :]:
            raise SystemExit("the cold read returned other data")
        volume.close()
        other.delete_pool("b", force=True)
        other.close()
    return write_s, import_s, read_s


def run(url: str, mib: int, object_size: int, rounds: int) -> None:
    # as many pooled connections as storvisor's client keeps (botocore's default is 10, fewer
    # than the 16 threads: it would open and drop connections beyond them)
    config = Config(max_pool_connections=32)
    client = boto3.client("s3", endpoint_url=url, region_name="us-east-1", config=config)
    data = os.urandom(mib * MiB)
    keys = ("put", "put_file", "get", "get_file", "write", "import", "read")
    times: dict[str, list[float]] = {k: [] for k in keys}
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    for r in range(rounds):
        raw, pool = f"raw{r}", f"pool{r}"
        client.create_bucket(Bucket=raw)
        client.create_bucket(Bucket=pool)

        def ours(pool: str = pool) -> None:
            w, i, rd = storvisor_side(url, pool, data, object_size)
            times["write"].append(w)
            times["import"].append(i)
            times["read"].append(rd)

        def theirs(raw: str = raw) -> None:
            for key, seconds in boto3_side(client, raw, data, object_size).items():
                times[key].append(seconds)

        sides: list[Callable[[], None]] = [theirs, ours] if r % 2 == 0 else [ours, theirs]
        for side in sides:
            side()
        print(
            f"round {r}: put {mib / times['put'][-1]:.0f}, put through a file"
            f" {mib / times['put_file'][-1]:.0f}, write+flush"
            f" {mib / times['write'][-1]:.0f}, get {mib / times['get'][-1]:.0f}, get into a"
            f" file {mib / times['get_file'][-1]:.0f}, cold read"
            f" {mib / times['read'][-1]:.0f} MiB/s",
            flush=True,
        )
    print(f"load average after: {os.getloadavg()[0]:.2f}")

    def rate(key: str) -> float:
        return mib / statistics.median(times[key])

    def ratios(ours: str, theirs: str) -> str:
        each = [t / o for o, t in zip(times[ours], times[theirs], strict=True)]
        return " / ".join(f"{x:.2f}" for x in each)

    print(f"{mib} MiB, objects of {object_size // MiB} MiB, {UPLOAD_THREADS} threads", end="")
    print(f", {rounds} rounds")
    print(f"{'boto3 put':<26}{rate('put'):8.1f} MiB/s")
    print(
        f"{'boto3 put through a file':<26}{rate('put_file'):8.1f} MiB/s  "
        f"{rate('put_file') / rate('put'):.2f}x of boto3 put  (rounds: {ratios('put_file', 'put')})"
    )
    print(
        f"{'storvisor write+flush':<26}{rate('write'):8.1f} MiB/s  "
        f"{rate('write') / rate('put'):.2f}x  (rounds: {ratios('write', 'put')}); "
        f"{rate('write') / rate('put_file'):.2f}x of boto3 put through a file "
        f"(rounds: {ratios('write', 'put_file')})"
    )
    print(f"{'boto3 get':<26}{rate('get'):8.1f} MiB/s")
    print(
        f"{'boto3 get into a file':<26}{rate('get_file'):8.1f} MiB/s  "
        f"{rate('get_file') / rate('get'):.2f}x of boto3 get  (rounds: {ratios('get_file', 'get')})"
    )
    print(
        f"{'storvisor cold read':<26}{rate('read'):8.1f} MiB/s  "
        f"{rate('read') / rate('get'):.2f}x  (rounds: {ratios('read', 'get')}); "
        f"{rate('read') / rate('get_file'):.2f}x of boto3 get into a file "
        f"(rounds: {ratios('read', 'get_file')})"
    )
    both = [i + r for i, r in zip(times["import"], times["read"], strict=True)]
    each = " / ".join(f"{g / b:.2f}" for g, b in zip(times["get"], both, strict=True))
    whole = mib / statistics.median(both)
    print(
        f"{'import + cold read':<26}{whole:8.1f} MiB/s  {whole / rate('get'):.2f}x  "
        f"(rounds: {each}); the import alone {statistics.median(times['import']):.2f} s"
    )


def serve(work: str, url: str, size: str, object_size: str, sock: str) -> None:
    """Child process of ``--nbd``: volume ``v`` of a local-file pool and of an S3 pool,
    written once, exported through NBD data planes."""
    home = Home(Path(work) / "home")
    home.create_pool("local", [BackingSpec(str(Path(work) / "local.img"), 2 * int(size))])
    home.create_s3_pool(
        "s3", S3Spec("nbd-bench", (url,), "us-east-1"), size=2 * int(size),
        object_size=int(object_size),
    )  # fmt: skip
    chunk = os.urandom(MiB)
    for name in ("local", "s3"):
        pool = home.pool(name)
        pool.create_volume("v", int(size))
        volume = pool.open_volume("v")
        for offset in range(0, int(size), MiB):
            volume.write(offset, chunk)
        volume.flush()
        volume.close()
    planes_fio.serve(home, ("local", "s3"), sock)


def planes(url: str, size: int, object_size: int, rounds: int, seconds: float) -> None:
    boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket="nbd-bench")
    figures: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        args = [tmp, url, str(size), str(object_size)]
        with planes_fio.Planes(__file__, args, Path(tmp)) as served:
            for r in range(rounds):
                for name in ("local", "s3") if r % 2 == 0 else ("s3", "local"):
                    for rw in ("randwrite", "randread"):
                        os.sync()  # the last run's dirty image written back, not in this one
                        iops = served.fio_iops(name, rw, seconds, size)
                        figures.setdefault((name, rw), []).append(iops)
    print(f"through NBD data planes, 4 KiB at qd{planes_fio.QD}, {size // MiB} MiB volumes")
    for rw in ("randwrite", "randread"):
        local = statistics.median(figures["local", rw])
        s3 = statistics.median(figures["s3", rw])
        each = " / ".join(
            f"{s / lo:.2f}" for s, lo in zip(figures["s3", rw], figures["local", rw], strict=True)
        )
        print(f"{rw:<10} local {local:8.0f} IOPS  s3 {s3:8.0f} IOPS  {s3 / local:.2f}x  ({each})")


if __name__ == "__main__":
    main()
