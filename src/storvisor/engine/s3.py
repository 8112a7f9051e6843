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

*Endpoints.* Every endpoint serves the same bucket (see ``Bucket``): requests are spread
over the healthy ones, an endpoint that fails or times out is marked down and the request
is retried on another at once, and background probes bring it back.

Credentials come from boto3's standard chain (``AWS_ACCESS_KEY_ID`` and friends, the shared
credentials file, ``AWS_PROFILE``); they are never taken as arguments. Errors of the S3
client are translated here, at the boundary: a missing bucket is ``NotFound``, refused
credentials ``InvalidArgument``, an unreachable endpoint or a failed transfer ``IOFailure``.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import http.client
import json
import logging
import re
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from storvisor.engine.types import EndpointInfo, EndpointState
from storvisor.errors import Conflict, InvalidArgument, IOFailure, NotFound, Unavailable

PREFIX = "storvisor/"
MARKER_KEY = PREFIX + "pool.json"
LEASE_KEY = PREFIX + "lease.json"
CATALOG_KEY = PREFIX + "catalog.db"
DATA_PREFIX = "data/"
DEFAULT_OBJECT_SIZE = 4 << 20

_CREDENTIAL_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "403"}
)
_ENDPOINT_FAILED = frozenset({500, 502, 503, 504})
"""HTTP statuses that say the endpoint failed the request, not that the request is wrong
(S3's InternalError, SlowDown, ServiceUnavailable): such a request goes to another
endpoint, or waits for one, as if this one had not answered."""
T = TypeVar("T")
log = logging.getLogger(__name__)


class LeaseLost(IOFailure):
    """Another host holds the pool's lease now: this host must not write to the bucket."""


@dataclass(frozen=True, slots=True)
class S3Spec:
    """Where a pool's bucket is: its name, one or more endpoints serving it, a region."""

    bucket: str
    endpoints: tuple[str, ...]
    region: str | None = None
    timeout: float = 10.0
    """Seconds an endpoint may take to connect or answer before it is marked down."""
    down_timeout: float = 30.0
    """Seconds a request waits for an endpoint to come back while all are down."""

    def to_json(self) -> dict[str, Any]:
        return {
            "bucket": self.bucket,
            "endpoints": list(self.endpoints),
            "region": self.region,
            "timeout": self.timeout,
            "down_timeout": self.down_timeout,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> S3Spec:
        return cls(
            str(raw["bucket"]),
            tuple(str(e) for e in raw["endpoints"]),
            raw.get("region"),
            float(raw.get("timeout", 10.0)),
            float(raw.get("down_timeout", 30.0)),
        )


@dataclass(frozen=True, slots=True)
class Lease:
    epoch: int
    owner: str
    held: bool
    etag: str

    def describe(self) -> str:
        state = "held" if self.held else "released"
        return f"lease epoch {self.epoch} {state} by {self.owner}"


_BUCKET_NAME = re.compile(r"[a-zA-Z0-9._-]{1,255}")
"""What botocore lets a request name as a bucket (stores may refuse more)."""


def data_key(index: int) -> str:
    return f"{DATA_PREFIX}{index:016x}"


class _Endpoint:
    def __init__(self, url: str, client: Any) -> None:
        self.url = url
        self.client = client
        self.up = True
        self.inflight = 0
        self.requests = 0
        self.errors = 0
        self.latency = 0.0
        self.answered = time.monotonic()
        """When it last answered a request or a probe."""
        self.probing = False
        self.returns = 0
        """How many times a probe brought it back after it was marked down."""


class Bucket:
    """A pool's bucket through its endpoints. Thread-safe (boto3 clients are).

    Requests go to the healthy endpoint with the fewest requests in flight (then the
    fastest). An endpoint that cannot be reached, does not answer within ``spec.timeout``
    or answers with a server error (5xx: InternalError, SlowDown...) is marked down and the
    request is retried on another at once; the S3 client itself retries nothing. A
    background thread probes (``HEAD`` of the bucket) every ``PROBE_INTERVAL`` seconds the
    down endpoints, which it brings back when they answer, and the healthy ones that nothing
    was asked of meanwhile, which it marks down when they do not: an endpoint the balancing
    leaves idle (the others were faster) is watched too, and a request never meets a
    failure that a probe could have found first. Each probe runs in a thread of its own, so
    a stalled endpoint delays no other's. While every endpoint is down a request waits up
    to ``spec.down_timeout`` for one to come back, then fails with ``IOFailure`` (EIO);
    an endpoint that comes back within that time takes the request again, even one that
    failed on it before (so a pool of one endpoint rides out an endpoint's restart).
    ``close`` stops the probes.
    """

    PROBE_INTERVAL = 0.5

    def __init__(self, spec: S3Spec) -> None:
        if not spec.bucket:
            raise InvalidArgument("an S3 pool needs a bucket name")
        if not _BUCKET_NAME.fullmatch(spec.bucket):
            raise InvalidArgument(
                f"invalid bucket name {spec.bucket!r}: letters, digits, '.', '-' and '_' "
                "only, at most 255"
            )
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
            connect_timeout=spec.timeout,
            read_timeout=spec.timeout,
            # no retry of the client's own: ``_call`` retries, on another endpoint (botocore's
            # ``max_attempts`` counts retries, ``total_max_attempts`` attempts)
            retries={"total_max_attempts": 1, "mode": "standard"},
            max_pool_connections=32,
        )
        self._config = config
        self._session = boto3.session.Session(botocore_session=_botocore_session())
        self._endpoints = [_Endpoint(url, self._client(url)) for url in spec.endpoints]
        self._cond = threading.Condition()
        self._closed = False
        self._prober: threading.Thread | None = None

    def endpoints(self) -> list[EndpointInfo]:
        with self._cond:
            return [
                EndpointInfo(
                    e.url,
                    EndpointState.UP if e.up else EndpointState.DOWN,
                    e.requests,
                    e.errors,
                    e.latency * 1000,
                )
                for e in self._endpoints
            ]

    def add_endpoint(self, url: str) -> None:
        """Serve the bucket through ``url`` too, once it answers for the bucket. Raises
        ``Conflict`` if it is listed already, and as ``check_bucket`` does."""
        with self._cond:
            if url in self.spec.endpoints:
                raise Conflict(f"endpoint {url} is already listed")
        endpoint = _Endpoint(url, self._client(url))
        self._call_on(endpoint, "bucket check", lambda c: c.head_bucket(Bucket=self.spec.bucket))
        with self._cond:
            self._endpoints.append(endpoint)
            self.spec = dataclasses.replace(self.spec, endpoints=(*self.spec.endpoints, url))
            self._cond.notify_all()

    def _client(self, url: str) -> Any:
        """A client of the endpoint ``url`` in the spec's region. Raises ``InvalidArgument``
        for a URL that is not ``http://`` or ``https://`` with a host, or a region that
        botocore refuses."""
        from botocore.exceptions import BotoCoreError

        try:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("not an http:// or https:// URL with a host")
            parts.port  # noqa: B018  (raises ValueError for a port out of range)
            return self._session.client(
                "s3", endpoint_url=url, region_name=self.spec.region, config=self._config
            )
        except (ValueError, BotoCoreError) as e:
            raise InvalidArgument(f"S3 endpoint {url!r} in region {self.spec.region!r}: {e}") from e

    def remove_endpoint(self, url: str) -> None:
        """Stop using ``url``; requests in flight there finish. Raises ``NotFound`` if it is
        not listed, ``Conflict`` if it is the last one."""
        with self._cond:
            if url not in self.spec.endpoints:
                raise NotFound(f"endpoint {url} is not listed")
            if len(self.spec.endpoints) == 1:
                raise Conflict(f"endpoint {url} is the pool's only endpoint")
            self._endpoints = [e for e in self._endpoints if e.url != url]
            self.spec = dataclasses.replace(
                self.spec, endpoints=tuple(u for u in self.spec.endpoints if u != url)
            )

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._prober is not None:
            self._prober.join()

    # ------------------------------------------------------------------------- requests

    def _pick(self, tried: dict[_Endpoint, int], deadline: float) -> _Endpoint | None:
        """The best healthy endpoint this request has not tried, or has tried before a
        probe last brought it back (``tried``: the endpoint's ``returns`` then) while
        ``deadline`` has not passed; waits until ``deadline`` while none is healthy. None if
        no endpoint can take the request."""
        with self._cond:
            self._start_prober()
            while True:
                again = time.monotonic() < deadline
                up = [e for e in self._endpoints if e.up]
                fresh = [e for e in up if e not in tried or (again and tried[e] != e.returns)]
                if fresh:
                    best = min(fresh, key=lambda e: (e.inflight, e.latency))
                    best.inflight += 1
                    return best
                if up or self._closed or not again:
                    return None
                self._cond.wait(deadline - time.monotonic())

    def _mark(self, e: _Endpoint, ok: bool, seconds: float) -> None:
        with self._cond:
            e.inflight -= 1
            e.requests += 1
            if ok:
                e.answered = time.monotonic()
                e.latency = seconds if e.latency == 0 else 0.8 * e.latency + 0.2 * seconds
                return
            e.errors += 1
            if e.up:
                e.up = False
                log.info("S3 endpoint %s is down", e.url)

    def _start_prober(self) -> None:
        """Start the probe thread (at the first request). Call with ``_cond``."""
        if self._prober is None and not self._closed:
            self._prober = threading.Thread(
                target=self._probe_loop, name="storvisor-s3-probe", daemon=True
            )
            self._prober.start()

    def _probe_loop(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                self._cond.wait(self.PROBE_INTERVAL)
                if self._closed:
                    return
                idle_since = time.monotonic() - self.PROBE_INTERVAL
                due = [
                    e
                    for e in self._endpoints
                    if not e.probing
                    and (not e.up or (e.inflight == 0 and e.answered <= idle_since))
                ]
                for e in due:
                    e.probing = True
            for e in due:
                threading.Thread(
                    target=self._probe, args=(e,), name="storvisor-s3-probe-one", daemon=True
                ).start()

    def _probe(self, e: _Endpoint) -> None:
        """``HEAD`` the bucket through ``e``: bring it back (down) or mark it down (up)."""
        from botocore.exceptions import BotoCoreError, ClientError

        answered = True
        try:
            e.client.head_bucket(Bucket=self.spec.bucket)
        except ClientError:
            pass  # it answers: an error of the request, not of the endpoint
        except BotoCoreError:
            answered = False
        with self._cond:
            e.probing = False
            if answered:
                e.answered = time.monotonic()
                if not e.up:
                    e.up = True
                    e.returns += 1
                    self._cond.notify_all()
                    log.info("S3 endpoint %s is back", e.url)
            elif e.up:
                e.requests += 1
                e.errors += 1
                e.up = False
                log.info("S3 endpoint %s is down (it did not answer a probe)", e.url)

    def _call_on(self, endpoint: _Endpoint, what: str, op: Callable[[Any], T]) -> T:
        """Run ``op`` on ``endpoint`` only, once; translate the client's errors."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return op(endpoint.client)
        except ClientError as e:
            raise self._translate(what, e) from e
        except BotoCoreError as e:
            raise IOFailure(f"S3 {what} through {endpoint.url}: {e}") from e

    def _call(self, what: str, op: Callable[[Any], T], *, wait: bool = True) -> T:
        """Run ``op(client)`` on the best healthy endpoint, on another one at once when it
        cannot be reached, times out or answers with a server error (5xx); translate the
        client's errors. ``wait``: wait for an endpoint to come back when all are down."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            HTTPClientError,
            IncompleteReadError,
            NoCredentialsError,
        )
        from botocore.exceptions import ConnectionError as Unreachable

        # the endpoint failed, not the request: no connection, no answer in time, a
        # connection closed before the whole answer came (headers or body)
        unreachable = (Unreachable, HTTPClientError, IncompleteReadError)
        tried: dict[_Endpoint, int] = {}
        last: Exception | None = None
        deadline = time.monotonic() + (self.spec.down_timeout if wait else 0)
        while True:
            endpoint = self._pick(tried, deadline)
            if endpoint is None:
                break
            tried[endpoint] = endpoint.returns
            start = time.monotonic()
            try:
                result = op(endpoint.client)
            except unreachable as e:
                self._mark(endpoint, False, 0)
                last = e
                continue
            except NoCredentialsError as e:
                self._mark(endpoint, True, time.monotonic() - start)
                raise InvalidArgument(
                    "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or "
                    "a credentials file"
                ) from e
            except ClientError as e:
                if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in _ENDPOINT_FAILED:
                    self._mark(endpoint, False, 0)
                    last = e
                    continue
                self._mark(endpoint, True, time.monotonic() - start)
                raise self._translate(what, e) from e
            except BotoCoreError as e:
                self._mark(endpoint, True, time.monotonic() - start)
                raise IOFailure(f"S3 {what} in bucket {self.spec.bucket!r}: {e}") from e
            self._mark(endpoint, True, time.monotonic() - start)
            return result
        endpoints = ", ".join(self.spec.endpoints)
        raise Unavailable(f"S3 {what}: no endpoint answers ({endpoints}): {last}")

    def _translate(self, what: str, e: Any) -> Exception:
        error = e.response.get("Error", {})
        code = str(error.get("Code", ""))
        message = error.get("Message") or code
        if code == "NoSuchBucket" or (code == "404" and what == "bucket check"):  # HEAD: no body
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
        self._call("bucket check", lambda c: c.head_bucket(Bucket=self.spec.bucket), wait=False)

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

        def op(c: Any) -> tuple[bytes, str] | None:
            r = _get_object(c, self.spec.bucket, key)
            if r is None:
                return None
            return r["Body"].read(), str(r["ETag"]).strip('"')

        return self._call(f"read of {key}", op)

    def get_into(self, key: str, buf: memoryview) -> tuple[int, str] | None:
        """Read the object into ``buf``: its length and ETag, or None if it does not exist.
        Raises ``IOFailure`` if it is longer than ``buf``. The body goes from the socket
        into ``buf`` (``_direct_body``); its CRC-32, when the store sends one, is checked
        here as botocore would. Where the libraries keep the response elsewhere, their
        ``readinto`` serves (urllib3's is a ``read`` and a copy)."""

        def op(c: Any) -> tuple[int, str] | None:
            r = _get_object(c, self.spec.bucket, key)
            if r is None:
                return None
            body = r["Body"]
            length = int(r["ContentLength"])
            if length > len(buf):
                body.close()
                raise IOFailure(
                    f"S3 object {key} in bucket {self.spec.bucket!r} holds {length} bytes, "
                    f"more than the {len(buf)} expected"
                )
            direct = _direct_body(r)
            if direct is None:
                got = 0
                while got < length:
                    n = body.readinto(buf[got:length])  # none at the end: IncompleteRead
                    if not n:
                        raise IOFailure(f"S3 read of {key}: the body ended after {got} bytes")
                    got += n
                body.read()  # the end: checks the length and frees the connection for reuse
            else:
                _read_direct(direct, body, buf[:length], r)
            return length, str(r["ETag"]).strip('"')

        return self._call(f"read of {key}", op)

    def put(
        self,
        key: str,
        data: bytes | bytearray | memoryview,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        """Store ``data`` under ``key``; returns the new ETag. With ``if_match`` or
        ``if_none_match`` the write is conditional and raises ``Conflict`` when the object
        changed (or exists)."""
        body = data if isinstance(data, bytes | bytearray) else bytes(data)  # no copy of those
        args: dict[str, Any] = {"Bucket": self.spec.bucket, "Key": key, "Body": body}
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
        Raises ``Conflict`` if it changed since ``previous`` was read.

        A PUT whose answer was lost (the connection closed before it) is sent again once
        an endpoint takes it (``_call``); if the first one was done, the retry's condition
        fails. So a failed condition reads the lease again: when it is the
        one this take wrote (the same epoch, owner and state; owners are unique), the lease
        is taken."""
        epoch = 1 if previous is None else previous.epoch + 1
        body = json.dumps({"epoch": epoch, "owner": owner, "state": "held"}).encode()
        try:
            if previous is None:
                etag = self.put(LEASE_KEY, body, if_none_match=True)
            else:
                etag = self.put(LEASE_KEY, body, if_match=previous.etag)
        except Conflict:
            now = self.lease()
            if now is None or (now.epoch, now.owner, now.held) != (epoch, owner, True):
                raise
            return now
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


_loader: Any = None
_loader_lock = threading.Lock()


def _botocore_session() -> Any:
    """A new botocore session (credentials are looked up again for each bucket) sharing
    one loader of the service models, so that a client costs about 40 ms instead of 250."""
    global _loader
    import botocore.session
    from botocore.loaders import create_loader

    with _loader_lock:
        if _loader is None:
            _loader = create_loader()
        session = botocore.session.Session()
        session.register_component("data_loader", _loader)
    return session


def _direct_body(response: dict[str, Any]) -> http.client.HTTPResponse | None:
    """The ``http.client`` response under botocore's body and urllib3's response of a
    ``get_object`` answer, if the body can be read from it as it arrives: not encoded, and
    with no checksum but a whole-object CRC-32 (which ``_read_direct`` checks). None
    otherwise, or where the libraries keep it elsewhere (other versions)."""
    raw = getattr(getattr(response["Body"], "_raw_stream", None), "_fp", None)
    if not isinstance(raw, http.client.HTTPResponse) or response.get("ContentEncoding"):
        return None
    headers = response["ResponseMetadata"]["HTTPHeaders"]
    sums = {k for k in headers if k.startswith("x-amz-checksum-")} - {"x-amz-checksum-type"}
    if sums - {_CRC32} or headers.get("x-amz-checksum-type", "FULL_OBJECT") != "FULL_OBJECT":
        return None
    return raw


def _read_direct(
    raw: http.client.HTTPResponse, body: Any, buf: memoryview, response: dict[str, Any]
) -> None:
    """Fill ``buf`` (the whole body) from ``raw``; check the CRC-32 the store sent; give
    the connection back. A connection cut or silent in the middle raises botocore's
    ``IncompleteReadError`` (the endpoint failed: ``Bucket._call`` tries another), a CRC
    that differs its ``FlexibleChecksumError``; the connection is then closed."""
    from botocore.exceptions import FlexibleChecksumError, IncompleteReadError

    got = 0
    cause: Exception | None = None
    try:
        while got < len(buf):
            n = raw.readinto(buf[got:])
            if not n:  # the connection closed early
                break
            got += n
    except (OSError, http.client.HTTPException) as e:  # reset, or silent past the timeout
        cause = e
    if got < len(buf):
        body.close()
        raise IncompleteReadError(actual_bytes=got, expected_bytes=len(buf)) from cause
    sent = response["ResponseMetadata"]["HTTPHeaders"].get(_CRC32)
    if sent is not None:
        crc = base64.b64encode(zlib.crc32(buf).to_bytes(4, "big")).decode()
        if crc != sent:
            body.close()
            raise FlexibleChecksumError(
                error_msg=f"expected CRC-32 {sent}, got {crc} for the body read"
            )
    body._raw_stream.release_conn()


_CRC32 = "x-amz-checksum-crc32"


def _get_object(client: Any, bucket: str, key: str) -> dict[str, Any] | None:
    """``get_object``'s response (the body still to read), or None if the key does not
    exist."""
    from botocore.exceptions import ClientError

    try:
        result: dict[str, Any] = client.get_object(Bucket=bucket, Key=key)
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise
    return result


def _list(args: dict[str, Any], client: Any) -> dict[str, Any]:
    result: dict[str, Any] = client.list_objects_v2(**args)
    return result


def new_owner() -> str:
    """A fresh owner identity for the lease (one per HOME holding the pool)."""
    return str(uuid.uuid4())
