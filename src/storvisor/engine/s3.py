"""An S3 bucket as the home of a pool: objects, the pool marker and the exclusive lease.

Theory of operation
-------------------
A pool owns a whole bucket. Its keys::

    storvisor/pool.json      marker: pool uuid, name, object size, device bytes (written last
                             at create, so a half-created pool is recognisable as one)
    storvisor/lease.json     the exclusive lease: {"epoch", "owner", "state": held|released}
    storvisor/catalog.db     the pool's SQLite catalog as of its last commit
    data/%016x               object ``i`` of the pool's byte space (missing: zeros)

*Lease.* One host at a time writes a pool. A host takes the lease with a conditional PUT
(``If-None-Match: *`` when there is none, ``If-Match: <etag>`` over a released one, or its
own after a crash) that raises the fencing *epoch* by one; two hosts racing for it cannot
both succeed. Before every upload batch the holder reads the lease again (``check``): once
another owner or epoch is there, it has lost the lease and fails every later upload
(``LeaseLost``), so it stops writing to the bucket. A host that died holding the lease is
replaced only by an explicit ``force`` (``storvisor pool import --force``), which takes the
lease over whatever its state; the check-before-upload leaves a window of one batch in which
a host that has not yet noticed may still write, which is why takeover is never automatic.
Closing a pool releases the lease (same epoch, state ``released``).

*Endpoints.* Every endpoint serves the same bucket. Requests go to the current endpoint; a
connection failure or timeout moves to the next one and retries there at once, so a request
fails only when every endpoint failed it.

Credentials come from boto3's standard chain (``AWS_ACCESS_KEY_ID`` and friends, the shared
credentials file, ``AWS_PROFILE``); they are never taken as arguments. Errors of the S3
client are translated here, at the boundary: a missing bucket is ``NotFound``, refused
credentials ``InvalidArgument``, an unreachable endpoint or a failed transfer ``IOFailure``.
"""

from __future__ import annotations

import functools
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from storvisor.errors import Conflict, InvalidArgument, IOFailure, NotFound

PREFIX = "storvisor/"
MARKER_KEY = PREFIX + "pool.json"
LEASE_KEY = PREFIX + "lease.json"
CATALOG_KEY = PREFIX + "catalog.db"
DATA_PREFIX = "data/"
DEFAULT_OBJECT_SIZE = 4 << 20

_CREDENTIAL_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "403"}
)
T = TypeVar("T")


class LeaseLost(IOFailure):
    """Another host holds the pool's lease now: this host must not write to the bucket."""


@dataclass(frozen=True, slots=True)
class S3Spec:
    """Where a pool's bucket is: its name, one or more endpoints serving it, a region."""

    bucket: str
    endpoints: tuple[str, ...]
    region: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"bucket": self.bucket, "endpoints": list(self.endpoints), "region": self.region}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> S3Spec:
        return cls(str(raw["bucket"]), tuple(str(e) for e in raw["endpoints"]), raw.get("region"))


@dataclass(frozen=True, slots=True)
class Lease:
    epoch: int
    owner: str
    held: bool
    etag: str

    def describe(self) -> str:
        state = "held" if self.held else "released"
        return f"lease epoch {self.epoch} {state} by {self.owner}"


def data_key(index: int) -> str:
    return f"{DATA_PREFIX}{index:016x}"


class Bucket:
    """A pool's bucket through its endpoints. Thread-safe (boto3 clients are)."""

    def __init__(self, spec: S3Spec, *, timeout: float = 10.0, attempts: int = 2) -> None:
        if not spec.bucket:
            raise InvalidArgument("an S3 pool needs a bucket name")
        if not spec.endpoints:
            raise InvalidArgument("an S3 pool needs at least one endpoint")
        try:
            import boto3
            from botocore.config import Config
        except ImportError as e:
            raise InvalidArgument(
                "S3 pools need boto3: install storvisor with the 's3' extra"
            ) from e
        self.spec = spec
        config = Config(
            connect_timeout=timeout,
            read_timeout=timeout,
            retries={"max_attempts": attempts, "mode": "standard"},
            max_pool_connections=32,
        )
        session = boto3.session.Session()
        self._clients = [
            session.client("s3", endpoint_url=url, region_name=spec.region, config=config)
            for url in spec.endpoints
        ]
        self._current = 0
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------- requests

    def _call(self, what: str, op: Callable[[Any], T]) -> T:
        """Run ``op(client)`` on the current endpoint, moving on to the next one when an
        endpoint cannot be reached; translate the client's errors."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            ReadTimeoutError,
        )

        unreachable = (
            EndpointConnectionError,
            ConnectTimeoutError,
            ReadTimeoutError,
            ConnectionClosedError,
        )
        with self._lock:
            first = self._current
        last: Exception | None = None
        for step in range(len(self._clients)):
            index = (first + step) % len(self._clients)
            try:
                result = op(self._clients[index])
            except unreachable as e:
                last = e
                continue
            except NoCredentialsError as e:
                raise InvalidArgument(
                    "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or "
                    "a credentials file"
                ) from e
            except ClientError as e:
                raise self._translate(what, e) from e
            except BotoCoreError as e:
                raise IOFailure(f"S3 {what} in bucket {self.spec.bucket!r}: {e}") from e
            if index != first:
                with self._lock:
                    self._current = index
            return result
        endpoints = ", ".join(self.spec.endpoints)
        raise IOFailure(f"S3 {what}: no endpoint answers ({endpoints}): {last}")

    def _translate(self, what: str, e: Any) -> Exception:
        error = e.response.get("Error", {})
        code = str(error.get("Code", ""))
        message = error.get("Message") or code
        if code in ("NoSuchBucket", "404") and what == "bucket check":
            return NotFound(f"S3 bucket {self.spec.bucket!r} does not exist")
        if code == "NoSuchBucket":
            return NotFound(f"S3 bucket {self.spec.bucket!r} does not exist")
        if code in _CREDENTIAL_CODES:
            return InvalidArgument(
                f"S3 refused the credentials for bucket {self.spec.bucket!r}: {message}"
            )
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
            return Conflict(f"S3 {what}: the object changed meanwhile")
        return IOFailure(f"S3 {what} in bucket {self.spec.bucket!r}: {message}")

    def check_bucket(self) -> None:
        """Raise ``NotFound`` if the bucket is missing, ``InvalidArgument`` if the
        credentials are refused, ``IOFailure`` if no endpoint answers."""
        self._call("bucket check", lambda c: c.head_bucket(Bucket=self.spec.bucket))

    def keys(self, prefix: str = "") -> Iterator[tuple[str, str]]:
        """Every key under ``prefix`` with its ETag (quotes removed)."""
        token: str | None = None
        while True:
            args: dict[str, Any] = {"Bucket": self.spec.bucket, "Prefix": prefix}
            if token is not None:
                args["ContinuationToken"] = token
            page: dict[str, Any] = self._call("listing", functools.partial(_list, args))
            for item in page.get("Contents", ()):
                yield str(item["Key"]), str(item["ETag"]).strip('"')
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    def is_empty(self) -> bool:
        page = self._call(
            "listing", lambda c: c.list_objects_v2(Bucket=self.spec.bucket, MaxKeys=1)
        )
        return not page.get("Contents")

    def get(self, key: str) -> tuple[bytes, str] | None:
        """The object's bytes and ETag, or None if it does not exist."""
        from botocore.exceptions import ClientError

        def op(c: Any) -> tuple[bytes, str] | None:
            try:
                r = c.get_object(Bucket=self.spec.bucket, Key=key)
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise
            return r["Body"].read(), str(r["ETag"]).strip('"')

        return self._call(f"read of {key}", op)

    def put(
        self,
        key: str,
        data: bytes | memoryview,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        """Store ``data`` under ``key``; returns the new ETag. With ``if_match`` or
        ``if_none_match`` the write is conditional and raises ``Conflict`` when the object
        changed (or exists)."""
        args: dict[str, Any] = {"Bucket": self.spec.bucket, "Key": key, "Body": bytes(data)}
        if if_match is not None:
            args["IfMatch"] = f'"{if_match}"'
        if if_none_match:
            args["IfNoneMatch"] = "*"
        r = self._call(f"write of {key}", lambda c: c.put_object(**args))
        return str(r["ETag"]).strip('"')

    def delete(self, key: str) -> None:
        self._call(f"delete of {key}", lambda c: c.delete_object(Bucket=self.spec.bucket, Key=key))

    # ---------------------------------------------------------------------------- lease

    def lease(self) -> Lease | None:
        found = self.get(LEASE_KEY)
        if found is None:
            return None
        raw, etag = found
        try:
            doc = json.loads(raw)
            return Lease(int(doc["epoch"]), str(doc["owner"]), doc["state"] == "held", etag)
        except (ValueError, KeyError, TypeError) as e:
            raise Conflict(f"bucket {self.spec.bucket!r} holds a malformed lease") from e

    def take_lease(self, owner: str, previous: Lease | None) -> Lease:
        """Take the lease over ``previous`` (None: there is none) with a conditional PUT.
        Raises ``Conflict`` if it changed since ``previous`` was read."""
        epoch = 1 if previous is None else previous.epoch + 1
        body = json.dumps({"epoch": epoch, "owner": owner, "state": "held"}).encode()
        if previous is None:
            etag = self.put(LEASE_KEY, body, if_none_match=True)
        else:
            etag = self.put(LEASE_KEY, body, if_match=previous.etag)
        return Lease(epoch, owner, True, etag)

    def release_lease(self, held: Lease) -> None:
        """Mark the lease released, if this host still holds it."""
        body = json.dumps({"epoch": held.epoch, "owner": held.owner, "state": "released"})
        self.put(LEASE_KEY, body.encode(), if_match=held.etag)

    def check_lease(self, held: Lease) -> None:
        """Raise ``LeaseLost`` unless the lease in the bucket is still ``held``."""
        now = self.lease()
        if now is None or (now.epoch, now.owner, now.held) != (held.epoch, held.owner, True):
            what = "none" if now is None else now.describe()
            raise LeaseLost(
                f"bucket {self.spec.bucket!r}: this host lost the pool's lease "
                f"(epoch {held.epoch}; the bucket now has {what})"
            )


def _list(args: dict[str, Any], client: Any) -> dict[str, Any]:
    result: dict[str, Any] = client.list_objects_v2(**args)
    return result


def new_owner() -> str:
    """A fresh owner identity for the lease (one per HOME holding the pool)."""
    return str(uuid.uuid4())
