"""A real S3 server for the tests: moto's standalone server (fixtures in conftest.py).

The server starts with ``INITIAL_NO_AUTH_ACTION_COUNT`` so that it accepts exactly the three
unauthenticated IAM calls that create a user, its policy and an access key, and checks every
later request's signature against those credentials: wrong credentials are refused as a real
S3 refuses them. Every test gets a fresh bucket, and the credentials in the standard AWS
environment variables (boto3's ordinary chain reads them; the worker processes inherit them).
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prereq import require_module
from storvisor.engine.s3 import S3Spec

boto3 = require_module("boto3", "S3 pools need boto3 (the 's3' extra)")
require_module("moto.server", "S3 tests need moto's server (moto[server], the 'test' extra)")

REGION = "us-east-1"
_POLICY = '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:*","Resource":"*"}]}'
_buckets = itertools.count()


@dataclass(frozen=True)
class MotoServer:
    url: str
    key: str
    secret: str
    proc: subprocess.Popen[bytes]

    def client(self, *, secret: str | None = None) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=self.key,
            aws_secret_access_key=self.secret if secret is None else secret,
        )

    def bucket(self) -> str:
        name = f"pool-bucket-{os.getpid()}-{next(_buckets)}"
        self.client().create_bucket(Bucket=name)
        return name

    def spec(self, bucket: str) -> S3Spec:
        return S3Spec(bucket, (self.url,), REGION)

    def keys(self, bucket: str) -> dict[str, str]:
        """Every key of ``bucket`` with its ETag."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", ())}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(log: Path) -> MotoServer:
    """Start a server on a free port and create its credentials (see the module docstring).
    Raises ``AssertionError`` if it does not come up within 30 s."""
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"moto server did not start: {log.read_text()}") from None
                time.sleep(0.1)
        iam = boto3.client(
            "iam", endpoint_url=url, region_name=REGION,
            aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap",
        )  # fmt: skip
        iam.create_user(UserName="storvisor")
        iam.put_user_policy(UserName="storvisor", PolicyName="s3", PolicyDocument=_POLICY)
        key = iam.create_access_key(UserName="storvisor")["AccessKey"]
    except BaseException:
        stop(proc)
        raise
    return MotoServer(url, key["AccessKeyId"], key["SecretAccessKey"], proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
