"""Mirror endpoints: two TCP proxies in front of one S3 server serve a pool while a writer
runs; one is stopped, restarted, then stalled (accepting, never answering): no request
fails, and the data read back from the bucket alone is the writer's."""

from __future__ import annotations

import contextlib
import dataclasses
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from s3server import REGION, MotoServer
from tcpproxy import Proxy

from storvisor.api.service import Service
from storvisor.engine import object_pool
from storvisor.engine.home import Home
from storvisor.engine.object_pool import object_backing
from storvisor.engine.pool import Pool
from storvisor.engine.s3 import LEASE_KEY, Bucket, S3Spec
from storvisor.engine.types import BackingSpec, EndpointState, PoolInfo, PoolState
from storvisor.engine.volume import Volume
from storvisor.errors import Conflict, IOFailure, NotFound, StorvisorError
from waiting import Background, wait_until

MiB = 1 << 20
VOLUME = 8 * MiB


def proxies(moto: MotoServer, count: int) -> list[Proxy]:
    target = urlsplit(moto.url)
    return [Proxy((target.hostname or "127.0.0.1", target.port or 80)) for _ in range(count)]


def test_writer_sees_no_error_while_mirrors_fail(aws_env: MotoServer, tmp_path: Path) -> None:
    bucket = aws_env.bucket()
    a, b = proxies(aws_env, 2)
    spec = S3Spec(bucket, (a.url, b.url), REGION, timeout=1.0, down_timeout=15.0)
    home = Home(tmp_path / "home")
    model = bytearray(VOLUME)
    errors: list[BaseException] = []
    stop = threading.Event()
    try:
        home.create_s3_pool("m", spec, size=64 * MiB, object_size=MiB)
        pool = home.pool("m")
        pool.create_volume("v", VOLUME)
        volume = pool.open_volume("v")
        flushes = 0

        def writer() -> None:
            nonlocal flushes
            rng = random.Random(7)
            try:
                while not stop.is_set():
                    for _ in range(8):
                        offset = rng.randrange(VOLUME // 4096) * 4096
                        data = rng.randbytes(4096)
                        volume.write(offset, data)
                        model[offset : offset + 4096] = data
                    volume.flush()
                    flushes += 1
            except BaseException as e:
                errors.append(e)

        def flushed(count: int) -> bool:
            assert not errors, f"the writer saw an error: {errors[0]!r}"
            return flushes >= count

        thread = threading.Thread(target=writer)
        thread.start()
        stats = object_backing(pool).bucket
        try:
            wait_until(lambda: flushed(3), "flushes before any failure", timeout=30)
            a.stop()
            wait_until(
                lambda: stats.endpoints()[0].state is EndpointState.DOWN, "a down", timeout=15
            )
            seen = flushes
            wait_until(lambda: flushed(seen + 3), "flushes while a is stopped", timeout=30)
            a.start()
            wait_until(lambda: stats.endpoints()[0].state is EndpointState.UP, "a back", timeout=15)
            b.stalled.set()
            wait_until(
                lambda: stats.endpoints()[1].state is EndpointState.DOWN, "b down", timeout=15
            )
            seen = flushes
            wait_until(lambda: flushed(seen + 3), "flushes while b stalls", timeout=30)
            b.stalled.clear()
            wait_until(lambda: stats.endpoints()[1].state is EndpointState.UP, "b back", timeout=15)
            seen = flushes
            wait_until(lambda: flushed(seen + 2), "flushes after recovery", timeout=30)
        finally:
            stop.set()
            thread.join(60)
        assert not thread.is_alive(), "the writer stalled"
        assert not errors, f"the writer saw an error: {errors[0]!r}"
        counts = pool.info().endpoints
        assert [e.url for e in counts] == [a.url, b.url]
        assert all(e.state is EndpointState.UP for e in counts), counts
        assert all(e.errors >= 1 and e.requests > e.errors for e in counts), counts
        volume.close()
    finally:
        home.close()
        a.stop()
        b.stop()

    other = Home(tmp_path / "other")  # the bucket alone, through the server itself
    try:
        other.import_s3_pool("m", aws_env.spec(bucket))
        check = other.pool("m").open_volume("v")
        buf = bytearray(VOLUME)
        check.read_into(0, memoryview(buf))
        check.close()
        assert buf == model
    finally:
        other.close()


def test_an_idle_endpoint_is_probed_and_marked_down_when_it_stalls(
    aws_env: MotoServer,
) -> None:
    """The balancing may leave an endpoint without requests (the other one is faster, or
    nothing runs in parallel): its state must still follow what it does, from probes."""
    bucket = aws_env.bucket()
    a, b = proxies(aws_env, 2)
    s3 = Bucket(S3Spec(bucket, (a.url, b.url), REGION, timeout=1.0, down_timeout=5.0))
    try:
        s3.check_bucket()  # one request: the probes start
        b.stalled.set()
        wait_until(lambda: s3.endpoints()[1].state is EndpointState.DOWN, "idle b down", timeout=10)
        assert s3.endpoints()[0].state is EndpointState.UP
        b.stalled.clear()
        wait_until(lambda: s3.endpoints()[1].state is EndpointState.UP, "b back", timeout=10)
        a.stop()
        wait_until(lambda: s3.endpoints()[0].state is EndpointState.DOWN, "idle a down", timeout=10)
        info = s3.endpoints()
        assert info[0].errors == 1 and info[1].errors == 1, info
    finally:
        s3.close()
        a.stop()
        b.stop()


def _reader(s3: Bucket, key: str, into: bool, room: int) -> Callable[[], bytes | None]:
    """A read of ``key``: with ``get``, or with ``get_into`` into a buffer of ``room``
    bytes (the fetches of an import); the object's bytes, None if it does not exist."""
    buf = memoryview(bytearray(room))

    def read() -> bytes | None:
        if not into:
            found = s3.get(key)
            return None if found is None else found[0]
        got = s3.get_into(key, buf)
        return None if got is None else bytes(buf[: got[0]])

    return read


@pytest.mark.parametrize("into", [False, True], ids=["get", "get_into"])
def test_a_body_that_arrives_changed_is_refused(aws_env: MotoServer, into: bool) -> None:
    """A body whose bytes differ from the CRC-32 the store sent with it (a proxy flips a
    byte in each chunk after the first) fails the read, whether botocore reads it (``get``)
    or storvisor straight into the caller's buffer (``get_into``); the same object through
    the proxy made honest again reads whole."""
    bucket = aws_env.bucket()
    (a,) = proxies(aws_env, 1)
    s3 = Bucket(S3Spec(bucket, (a.url,), REGION, timeout=5.0, down_timeout=1.0))
    body = bytes(range(256)) * 4096  # 1 MiB: more than one chunk of the proxy
    key = "data/0000000000000000"
    read = _reader(s3, key, into, len(body))

    try:
        s3.put(key, body)
        a.corrupting.set()
        with pytest.raises(IOFailure, match=r"(?i)checksum|CRC-32"):
            read()
        a.corrupting.clear()
        assert read() == body
    finally:
        s3.close()
        a.stop()


@pytest.mark.parametrize("into", [False, True], ids=["get", "get_into"])
def test_an_answer_cut_short_is_retried_on_another_endpoint(
    aws_env: MotoServer, into: bool
) -> None:
    """A connection that an endpoint closes in the middle of a response (a proxy stopped
    while it answers) is that endpoint failing, not the request: it goes to another. So for
    a body read into the caller's buffer (``get_into``, the fetches of an import)."""
    bucket = aws_env.bucket()
    a, b = proxies(aws_env, 2)
    s3 = Bucket(S3Spec(bucket, (a.url, b.url), REGION, timeout=5.0, down_timeout=2.0))
    body = bytes(range(256)) * 4096  # 1 MiB: more than one chunk of the proxy
    key = "data/0000000000000000"
    read = _reader(s3, key, into, 2 * len(body))

    try:
        s3.put(key, body)
        a.cutting.set()
        b.cutting.set()
        start = time.monotonic()
        with pytest.raises(IOFailure, match="no endpoint answers"):
            read()  # tried on both, and again on each a probe brings back, for 2 s
        assert time.monotonic() - start >= 2.0
        assert all(e.errors >= 2 for e in s3.endpoints()), s3.endpoints()
        b.cutting.clear()
        wait_until(lambda: s3.endpoints()[1].state is EndpointState.UP, "b back", timeout=10)
        for _ in range(4):  # wherever they go first, they succeed
            assert read() == body
    finally:
        s3.close()
        a.stop()
        b.stop()


@contextlib.contextmanager
def _rewritten_behind_a_stopped_endpoint(
    aws_env: MotoServer, tmp_path: Path, down_timeout: float
) -> Iterator[tuple[Proxy, Pool, Volume]]:
    """A pool of one endpoint (a proxy) whose volume's first block was written ("1") and
    flushed, then written again ("2") after the proxy was stopped, unflushed. When the body
    ends, the bucket alone must hold the second write."""
    bucket = aws_env.bucket()
    (a,) = proxies(aws_env, 1)
    spec = S3Spec(bucket, (a.url,), REGION, timeout=1.0, down_timeout=down_timeout)
    home = Home(tmp_path / "home")
    try:
        home.create_s3_pool("m", spec, size=64 * MiB, object_size=MiB)
        pool = home.pool("m")
        pool.create_volume("v", MiB)
        volume = pool.open_volume("v")
        assert isinstance(volume, Volume)
        volume.write(0, b"1" * 4096)
        volume.flush()
        a.stop()
        volume.write(0, b"2" * 4096)
        yield a, pool, volume
        volume.close()
    finally:
        home.close()
        a.stop()
    client = aws_env.client()
    stored = b"".join(
        client.get_object(Bucket=bucket, Key=key)["Body"].read()
        for key in aws_env.keys(bucket)
        if key.startswith("data/")
    )
    assert b"2" * 4096 in stored and b"1" * 4096 not in stored


def test_all_endpoints_down_fails_after_the_timeout_then_recovers(
    aws_env: MotoServer, tmp_path: Path
) -> None:
    with _rewritten_behind_a_stopped_endpoint(aws_env, tmp_path, 2.0) as (a, _, volume):
        start = time.monotonic()
        with pytest.raises(IOFailure, match="no endpoint answers"):
            volume.flush()
        assert 2.0 <= time.monotonic() - start < 15, "the wait is the configured one"
        a.start()
        wait_until(lambda: _flushes(volume), "recovery once the endpoint is back", timeout=20)
        buf = bytearray(4096)
        volume.read_into(0, memoryview(buf))
        assert buf == b"2" * 4096


def test_a_flush_rides_out_a_restart_of_the_only_endpoint(
    aws_env: MotoServer, tmp_path: Path
) -> None:
    """A request that failed on every endpoint (here the only one, restarting) is taken
    again by an endpoint that comes back within the down timeout: no error reaches the
    writer, and the data is in the bucket."""
    with _rewritten_behind_a_stopped_endpoint(aws_env, tmp_path, 10.0) as (a, pool, volume):
        restart = threading.Timer(1.5, a.start)
        restart.start()
        start = time.monotonic()
        volume.flush()  # refused, waits, then goes to the endpoint that came back
        took = time.monotonic() - start
        restart.join()
        assert 1.5 <= took < 10.0, took
        (endpoint,) = pool.info().endpoints
        assert endpoint.state is EndpointState.UP and endpoint.errors >= 1


def test_a_lease_take_whose_answer_was_lost_is_taken(aws_env: MotoServer, tmp_path: Path) -> None:
    """The import's conditional PUT of the lease is done by the store, but its answer is
    lost: the PUT is sent again (the S3 client retries it), its condition then fails, and
    the lease read again is the one the import wrote: the import goes on, one epoch ahead."""
    bucket = aws_env.bucket()
    (a,) = proxies(aws_env, 1)
    spec = S3Spec(bucket, (a.url,), REGION, timeout=1.0, down_timeout=10.0)
    first = Home(tmp_path / "first")
    try:
        first.create_s3_pool("m", spec, size=64 * MiB, object_size=MiB)
        first.pool("m")
    finally:
        first.close()  # releases the lease
    released = Bucket(spec)
    try:
        before = released.lease()
        assert before is not None and not before.held
        a.lose_answer(f"PUT /{bucket}/{LEASE_KEY}".encode())
        second = Home(tmp_path / "second")
        try:
            second.import_s3_pool("m", spec)
            assert a.lost == 1, "the answer to the lease's PUT was not lost"
        finally:
            second.close()
        after = released.lease()
        # taken once by the second HOME (one epoch ahead), then released by its close
        assert after is not None and after.epoch == before.epoch + 1, after
        assert after.owner != before.owner and not after.held
    finally:
        released.close()
        a.stop()


def test_the_client_retries_nothing_by_itself(aws_env: MotoServer) -> None:
    """A request whose answer is lost is a failure of its endpoint that the bucket sees
    (marked down, retried once a probe brings it back), not one the S3 client hides by
    sending it again itself (two timeouts per endpoint before a failover)."""
    bucket = aws_env.bucket()
    (a,) = proxies(aws_env, 1)
    s3 = Bucket(S3Spec(bucket, (a.url,), REGION, timeout=1.0, down_timeout=10.0))
    try:
        s3.check_bucket()
        a.lose_answer(f"PUT /{bucket}/data/0000000000000001".encode())
        s3.put("data/0000000000000001", b"x" * 4096)
        assert a.lost == 1
        (endpoint,) = s3.endpoints()
        assert endpoint.errors == 1, endpoint
        assert s3.get("data/0000000000000001") is not None
    finally:
        s3.close()
        a.stop()


def test_a_server_error_goes_to_another_endpoint(aws_env: MotoServer) -> None:
    """A 5xx answer (SlowDown, InternalError) is the endpoint failing: the request goes to
    the other endpoint at once. A 4xx answer is the request's own error: no retry."""
    from botocore.exceptions import ClientError

    bucket = aws_env.bucket()
    a, b = proxies(aws_env, 2)
    s3 = Bucket(S3Spec(bucket, (a.url, b.url), REGION, timeout=1.0, down_timeout=10.0))
    used: list[object] = []

    def answers(status: int, code: str) -> Callable[[object], str]:
        def op(client: object) -> str:
            used.append(client)
            if len(used) == 1:
                error = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
                raise ClientError(error, "PutObject")  # type: ignore[arg-type]
            return "done"

        return op

    try:
        assert s3._call("a test", answers(503, "SlowDown")) == "done"
        assert len(used) == 2 and used[0] is not used[1]
        assert sorted(e.errors for e in s3.endpoints()) == [0, 1]
        used.clear()
        with pytest.raises(IOFailure, match="InvalidRequest"):
            s3._call("a test", answers(400, "InvalidRequest"))
        assert len(used) == 1
    finally:
        s3.close()
        a.stop()
        b.stop()


def _flushes(volume: object) -> bool:
    try:
        volume.flush()  # type: ignore[attr-defined]
    except StorvisorError:
        return False
    return True


def test_endpoints_are_added_and_removed_online(aws_env: MotoServer, tmp_path: Path) -> None:
    bucket = aws_env.bucket()
    a, b = proxies(aws_env, 2)
    spec = S3Spec(bucket, (a.url,), REGION, timeout=1.0, down_timeout=2.0)
    home = Home(tmp_path / "home")
    try:
        home.create_s3_pool("m", spec, size=64 * MiB, object_size=MiB)
        pool = home.pool("m")
        pool.create_volume("v", MiB)
        volume = pool.open_volume("v")
        info = home.add_endpoint("m", b.url)
        assert [e.url for e in info.endpoints] == [a.url, b.url]
        with pytest.raises(Conflict, match="already listed"):
            home.add_endpoint("m", b.url)
        with pytest.raises(IOFailure):
            home.add_endpoint("m", "http://127.0.0.1:9")  # does not answer: not added
        assert home.remove_endpoint("m", a.url).endpoints[0].url == b.url
        a.stop()  # no longer used: nothing notices
        volume.write(0, b"b" * 4096)
        volume.flush()
        (only,) = pool.info().endpoints
        assert only.url == b.url and only.errors == 0
        with pytest.raises(Conflict, match="only endpoint"):
            home.remove_endpoint("m", b.url)
        with pytest.raises(NotFound):
            home.remove_endpoint("m", a.url)
        volume.close()
    finally:
        home.close()
    again = Home(tmp_path / "home")  # the change was recorded
    try:
        assert [e.url for e in again.pool_info("m").endpoints] == [b.url]
    finally:
        again.close()
        a.stop()
        b.stop()


def _answer_meanwhile(service: Service, pools: list[str]) -> None:
    """The service's other calls answer within 2 s: the pool list is ``pools``, a volume is
    made on the local pool "q", the metrics are sampled."""
    done: list[bool] = []

    def calls() -> None:
        assert [p.name for p in service.pools()] == pools
        service.create_volume("q", f"v{len(service.volumes('q'))}", MiB)
        service.metrics_sample()
        done.append(True)

    others = threading.Thread(target=calls, daemon=True)
    others.start()
    others.join(2)
    assert done, "the other calls waited for the endpoint"


def test_calls_that_wait_on_an_endpoint_hold_up_nothing_else(
    aws_env: MotoServer, tmp_path: Path
) -> None:
    """Adding an endpoint that accepts and never answers, or importing a pool through one,
    waits up to the pool's timeout and fails. Meanwhile the service's other calls answer;
    the name being imported is neither listed nor opened, and a second import of it is
    refused. Afterwards nothing is left of the import, and the name can be used: an import
    through a slow endpoint, whose pool stays unlisted until it is open."""
    silent, slow = proxies(aws_env, 2)
    silent.stalled.set()
    service = Service(Home(tmp_path / "home"))
    try:
        service.create_pool("q", [BackingSpec(str(tmp_path / "q.img"), 64 * MiB)])
        timeout = 3.0
        spec = dataclasses.replace(aws_env.spec(aws_env.bucket()), timeout=timeout)
        service.create_s3_pool("m", spec, size=64 * MiB, object_size=MiB)
        started = time.monotonic()
        adding = Background(lambda: service.add_endpoint("m", silent.url))
        wait_until(lambda: silent.accepted > 0, "the new endpoint's check under way")
        _answer_meanwhile(service, ["m", "q"])
        assert service.pool_info("m").endpoints[0].url == aws_env.url
        adding.join(3 * timeout)
        assert isinstance(adding.outcome, IOFailure), adding.outcome
        assert time.monotonic() - started >= timeout - 0.5
        assert [e.url for e in service.pool_info("m").endpoints] == [aws_env.url]

        other = aws_env.bucket()  # a pool another HOME made and released
        elsewhere = Home(tmp_path / "elsewhere")
        elsewhere.create_s3_pool("i", aws_env.spec(other), size=64 * MiB, object_size=MiB)
        elsewhere.close()
        through_silent = S3Spec(other, (silent.url,), REGION, timeout=timeout)
        connected = silent.accepted
        importing = Background(lambda: service.import_s3_pool("i", through_silent))
        wait_until(lambda: silent.accepted > connected, "the import's first request")
        _answer_meanwhile(service, ["m", "q"])
        with pytest.raises(NotFound, match="being created"):
            service.pool_info("i")
        with pytest.raises(Conflict, match="being created"):
            service.import_s3_pool("i", aws_env.spec(other))
        importing.join(3 * timeout)
        assert isinstance(importing.outcome, IOFailure), importing.outcome
        assert not (tmp_path / "home/pools/i").exists()

        # through a slow endpoint: the import's catalog is on disk seconds before the pool
        # opens (its first object, 1 MiB, comes at 128 KiB/s); it is not listed meanwhile
        slow.rate = 128 << 10
        through_slow = S3Spec(other, (slow.url,), REGION, timeout=timeout)
        importing = Background(lambda: service.import_s3_pool("i", through_slow))
        catalog = tmp_path / "home/pools/i/catalog.db"
        wait_until(catalog.exists, "the imported catalog on disk")
        _answer_meanwhile(service, ["m", "q"])
        with pytest.raises(NotFound, match="being created"):
            service.pool_info("i")
        assert importing.is_alive()
        importing.join(30)
        assert isinstance(importing.outcome, PoolInfo), importing.outcome
        assert [p.name for p in service.pools()] == ["i", "m", "q"]
    finally:
        service.close()
        silent.stop()
        slow.stop()


def test_deleting_a_pool_through_a_slow_endpoint_holds_up_nothing_else(
    aws_env: MotoServer, tmp_path: Path
) -> None:
    """Deleting an S3 pool erases its objects, one request each: through an endpoint that
    answers at 1 KiB/s that takes seconds, and the service's other calls answer meanwhile;
    the pool is neither listed nor opened, and its name is not taken until the bucket is
    empty."""
    (slow,) = proxies(aws_env, 1)
    bucket = aws_env.bucket()
    service = Service(Home(tmp_path / "home"))
    try:
        service.create_pool("q", [BackingSpec(str(tmp_path / "q.img"), 64 * MiB)])
        spec = S3Spec(bucket, (slow.url,), REGION, timeout=10.0)
        service.create_s3_pool("d", spec, size=64 * MiB, object_size=MiB)
        service.create_volume("d", "v", 16 * MiB)
        volume = service.home.pool("d").open_volume("v")
        volume.write(0, random.Random(3).randbytes(16 * MiB))
        volume.flush()
        volume.close()
        assert len(aws_env.keys(bucket)) > 16
        slow.rate = 1024
        deleting = Background(lambda: service.delete_pool("d", force=True))
        wait_until(lambda: len(aws_env.keys(bucket)) < 16, "the erasure under way", timeout=30)
        _answer_meanwhile(service, ["q"])
        with pytest.raises(NotFound, match="being deleted"):
            service.pool_info("d")
        with pytest.raises(Conflict, match="being deleted"):
            service.create_s3_pool("d", aws_env.spec(aws_env.bucket()), size=64 * MiB)
        assert deleting.is_alive(), "the erasure ended early: the test ran late"
        deleting.join(60)
        assert deleting.outcome is None, deleting.outcome
        assert aws_env.keys(bucket) == {}
        assert not (tmp_path / "home/pools/d").exists()
        assert [p.name for p in service.pools()] == ["q"]
    finally:
        service.close()
        slow.stop()


def _cut_deletion(aws_env: MotoServer, home: Path) -> tuple[Proxy, S3Spec, dict[str, str]]:
    """Pool "d" of an S3 bucket reached through a proxy, written, then deleted while the
    proxy is stopped in the middle of the erasure: the proxy (stopped), the pool's spec and
    the keys left in the bucket."""
    (proxy,) = proxies(aws_env, 1)
    spec = S3Spec(aws_env.bucket(), (proxy.url,), REGION, timeout=10.0, down_timeout=1.0)
    service = Service(Home(home))
    try:
        service.create_s3_pool("d", spec, size=64 * MiB, object_size=MiB)
        service.create_volume("d", "v", 16 * MiB)
        volume = service.home.pool("d").open_volume("v")
        volume.write(0, random.Random(5).randbytes(16 * MiB))
        volume.close()
        service.home.pool("d").flush()
        proxy.rate = 1024
        deleting = Background(lambda: service.delete_pool("d", force=True))
        wait_until(lambda: len(aws_env.keys(spec.bucket)) < 12, "the erasure under way", timeout=30)
        proxy.stop()
        deleting.join(60)
        assert isinstance(deleting.outcome, IOFailure), deleting.outcome
        left = aws_env.keys(spec.bucket)
        assert 0 < len(left) < 12
        return proxy, spec, left
    finally:
        service.close()


def test_a_deletion_cut_short_is_finished_by_deleting_again(
    aws_env: MotoServer, tmp_path: Path
) -> None:
    """The endpoint goes away while a deletion erases the bucket: the call fails, and the
    pool stays, offline, saying its deletion did not finish (after a restart too), with
    the rest of its objects in the bucket. Deleting it again once the endpoint is back
    empties the bucket and frees the name."""
    proxy, spec, left = _cut_deletion(aws_env, tmp_path / "home")
    service = Service(Home(tmp_path / "home"))  # a restart in between
    try:
        (info,) = service.pools()
        assert info.state is PoolState.OFFLINE
        assert "deletion did not finish" in (info.reason or "")
        with pytest.raises(StorvisorError, match="deletion did not finish"):
            service.home.pool("d")
        assert aws_env.keys(spec.bucket) == left
        proxy.rate = 0
        proxy.start()
        service.delete_pool("d")
        assert aws_env.keys(spec.bucket) == {}
        assert not (tmp_path / "home/pools/d").exists()
        assert service.pools() == []
        service.create_s3_pool("d", spec, size=64 * MiB, object_size=MiB)  # the name is free
    finally:
        service.close()
        proxy.stop()


_DELETE = """
import sys
from storvisor.api.service import Service
from storvisor.engine.home import Home
Service(Home(sys.argv[1])).delete_pool("d", force=True)
"""


@pytest.mark.parametrize(
    "moment",
    [
        "at once",  # the process still starting or opening the pool: nothing recorded yet
        "recorded",  # right after the deletion was recorded, before any object went
        "erasing",  # objects of the bucket deleted, others not yet
    ],
)
def test_a_deletion_killed_midway_leaves_the_pool_whole_or_marked(
    aws_env: MotoServer, tmp_path: Path, moment: str
) -> None:
    """kill -9 of a process deleting an S3 pool, whose erasure is slowed down: the pool is
    then either whole (killed before the deletion was recorded), every byte of its volume
    intact, or offline saying its deletion did not finish, with the objects not erased yet
    still in the bucket; deleting it again empties the bucket and frees the name. Never an
    online pool with objects gone."""
    (proxy,) = proxies(aws_env, 1)
    spec = S3Spec(aws_env.bucket(), (proxy.url,), REGION, timeout=10.0, down_timeout=1.0)
    home = tmp_path / "home"
    data = random.Random(moment).randbytes(16 * MiB)
    service = Service(Home(home))
    try:
        service.create_s3_pool("d", spec, size=64 * MiB, object_size=MiB)
        service.create_volume("d", "v", 16 * MiB)
        volume = service.home.pool("d").open_volume("v")
        volume.write(0, data)
        volume.close()
        service.home.pool("d").flush()
    finally:
        service.close()
    written = len(aws_env.keys(spec.bucket))
    mark = home / "pools" / "d" / object_pool.ERASING_NAME
    proxy.rate = 2048
    deleting = subprocess.Popen([sys.executable, "-c", _DELETE, str(home)])
    try:
        if moment == "recorded":
            wait_until(mark.exists, "the deletion recorded", timeout=60)
        elif moment == "erasing":
            wait_until(
                lambda: len(aws_env.keys(spec.bucket)) < written - 2, "objects erased", timeout=60
            )
        assert deleting.poll() is None, "the deletion ended before the kill"
    finally:
        deleting.kill()
        deleting.wait()
    proxy.rate = 0
    left = aws_env.keys(spec.bucket)
    service = Service(Home(home))
    try:
        (info,) = service.pools()
        if moment != "at once":
            assert info.state is PoolState.OFFLINE
        if info.state is PoolState.ONLINE:  # killed before the deletion was recorded
            assert len(left) == written
            volume = service.home.pool("d").open_volume("v")
            try:
                back = bytearray(16 * MiB)
                volume.read_into(0, memoryview(back))
            finally:
                volume.close()
            assert back == data
        else:
            assert "deletion did not finish" in (info.reason or ""), info
            assert aws_env.keys(spec.bucket) == left  # opening the HOME erased nothing
        service.delete_pool("d", force=True)
        assert aws_env.keys(spec.bucket) == {}
        assert not (home / "pools/d").exists()
        service.create_s3_pool("d", spec, size=64 * MiB, object_size=MiB)  # the name is free
    finally:
        service.close()
        proxy.stop()


def test_deleting_a_pool_another_host_took_lets_go_of_it_here_only(
    aws_env: MotoServer, tmp_path: Path
) -> None:
    """Another host takes (imports with force) an S3 pool this HOME still has open.
    Deleting it here is refused when the erasure finds the lease taken, and deletes nothing
    of the bucket; the pool stays, offline, saying its deletion did not finish. With force
    the deletion removes this HOME's copy only, and the other host's pool is whole."""
    spec = aws_env.spec(aws_env.bucket())
    service = Service(Home(tmp_path / "home"))
    other = Home(tmp_path / "other")
    try:
        service.create_s3_pool("d", spec, size=64 * MiB, object_size=MiB)
        other.import_s3_pool("d", spec, force=True)
        other.pool("d").create_volume("v", MiB)
        other.pool("d").flush()
        keys = aws_env.keys(spec.bucket)
        with pytest.raises(Conflict):
            service.delete_pool("d")
        assert aws_env.keys(spec.bucket) == keys
        (info,) = service.pools()
        assert "deletion did not finish" in (info.reason or "")
        service.delete_pool("d", force=True)
        assert not (tmp_path / "home/pools/d").exists()
        assert service.pools() == []
        assert aws_env.keys(spec.bucket) == keys
        assert [v.name for v in other.pool("d").volumes()] == ["v"]
    finally:
        service.close()
        other.close()
