"""S3 pool benchmark: sequential 1 MiB writes made durable in the bucket, and the download
of a pool on another HOME, against boto3 alone with the same parallelism, same moto server.

* ``boto3 put``: ``--mib`` MiB as objects of ``--object-size`` bytes, ``UPLOAD_THREADS``
  threads (the object backing's parallelism), ``put_object`` of bytes already in memory;
* ``storvisor write+flush``: the same MiB written to a volume of an S3 pool in 1 MiB
  requests (``Volume.write``: into the local image), then one ``flush``, which uploads them;
  the time is from the first write to the end of the flush;
* ``boto3 get``: every object back, ``UPLOAD_THREADS`` threads;
* ``storvisor import``: the pool opened on a second HOME (catalog and every object downloaded
  into a new local image), after which the volume reads at page-cache speed.

Usage::

    .venv/bin/python bench/s3_bench.py [--mib 256] [--object-size 4]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3

from storvisor.engine.home import Home
from storvisor.engine.object_backing import UPLOAD_THREADS
from storvisor.engine.s3 import S3Spec

MiB = 1 << 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--object-size", type=int, default=4, help="MiB")
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
        run(url, args.mib, args.object_size * MiB)
    finally:
        server.terminate()
        server.wait()


def run(url: str, mib: int, object_size: int) -> None:
    client = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
    for name in ("raw", "pool"):
        client.create_bucket(Bucket=name)
    data = os.urandom(mib * MiB)
    count = mib * MiB // object_size

    def put(i: int) -> None:
        chunk = data[i * object_size : (i + 1) * object_size]
        client.put_object(Bucket="raw", Key=f"o{i}", Body=chunk)

    def get(i: int) -> None:
        client.get_object(Bucket="raw", Key=f"o{i}")["Body"].read()

    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        start = time.perf_counter()
        list(pool.map(put, range(count)))
        raw_put = time.perf_counter() - start
        start = time.perf_counter()
        list(pool.map(get, range(count)))
        raw_get = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        spec = S3Spec("pool", (url,), "us-east-1")
        home = Home(Path(tmp) / "first")
        home.create_s3_pool("b", spec, size=2 * mib * MiB, object_size=object_size)
        pool = home.pool("b")
        pool.create_volume("v", mib * MiB)
        volume = pool.open_volume("v")
        view = memoryview(data)
        start = time.perf_counter()
        for offset in range(0, mib * MiB, MiB):
            volume.write(offset, view[offset : offset + MiB])
        volume.flush()
        sv_write = time.perf_counter() - start
        volume.close()
        home.close()
        other = Home(Path(tmp) / "second")
        start = time.perf_counter()
        other.import_s3_pool("b", spec)
        sv_import = time.perf_counter() - start
        other.close()

    rate = lambda seconds: mib / seconds  # noqa: E731
    print(f"{mib} MiB, objects of {object_size // MiB} MiB, {UPLOAD_THREADS} threads")
    print(f"{'boto3 put':<24}{rate(raw_put):8.1f} MiB/s")
    print(f"{'storvisor write+flush':<24}{rate(sv_write):8.1f} MiB/s  {raw_put / sv_write:.2f}x")
    print(f"{'boto3 get':<24}{rate(raw_get):8.1f} MiB/s")
    print(f"{'storvisor import':<24}{rate(sv_import):8.1f} MiB/s  {raw_get / sv_import:.2f}x")


if __name__ == "__main__":
    main()
