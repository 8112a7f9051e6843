"""The open of an S3 pool waits on the network (its lease, its catalog) without the HOME's
lock or the service's: while its only endpoint holds its answers (a proxy that forwards
nothing until released), calls for other pools, the pool listing and the daemon's API go
on, the pool is reported ``opening``, and a call for that pool waits for the open under
way, then gets the same pool. Closing HOME meanwhile waits for the open and releases the
pool's lease."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from mirror_kit import STORVISOR, serving, storvisor
from s3server import REGION, MotoServer
from tcpproxy import Proxy

from storvisor.api.client import Client
from storvisor.engine.home import Home
from storvisor.engine.pool import Pool
from storvisor.engine.s3 import S3Spec
from storvisor.engine.types import BackingSpec, PoolState
from storvisor.errors import StorvisorError
from waiting import Background, wait_until

MiB = 1 << 20
HOLD = 60.0
"""The endpoint timeout: longer than the tests hold the answers and than any call they wait
for, so a call that waits for the held endpoint fails them instead of returning late."""


@pytest.fixture
def proxy(aws_env: MotoServer) -> Iterator[Proxy]:
    target = urlsplit(aws_env.url)
    p = Proxy((target.hostname or "127.0.0.1", target.port or 80))
    try:
        yield p
    finally:
        p.held.clear()
        p.stop()


def _two_pools(path: Path, bucket: str, proxy: Proxy) -> bytes:
    """HOME ``path`` with the S3 pool ``s`` (its only endpoint ``proxy``) and the local pool
    ``loc``, each with a volume ``v``; the data written to ``s/v`` (flushed), HOME closed."""
    spec = S3Spec(bucket, (proxy.url,), REGION, timeout=HOLD)
    data = bytes(range(256)) * (MiB // 256)
    with Home(path) as home:
        home.create_s3_pool("s", spec, size=16 * MiB, object_size=MiB)
        home.create_pool("loc", [BackingSpec(str(path.parent / "loc.img"), 64 * MiB)])
        for name in ("s", "loc"):
            home.pool(name).create_volume("v", MiB)
        volume = home.pool("s").open_volume("v")
        volume.write(0, data)
        volume.flush()
        volume.close()
    return data


def _volume_data(pool: Pool) -> bytes:
    buf = bytearray(MiB)
    volume = pool.open_volume("v")
    try:
        volume.read_into(0, memoryview(buf))
    finally:
        volume.close()
    return bytes(buf)


def _opening(proxy: Proxy, before: int) -> None:
    """Wait until the open has sent a request to the held proxy."""
    wait_until(lambda: proxy.accepted > before, "the open's request to the held endpoint")
    time.sleep(0.3)  # the request itself reaches the proxy, which holds it


def _online(client: Client) -> dict[str, float]:
    """``storvisor_pool_online`` of each pool, from the daemon's metrics."""
    found = re.findall(r'^storvisor_pool_online\{pool="([^"]*)"\} (\S+)$', client.metrics(), re.M)
    return {pool: float(value) for pool, value in found}


def _finished(call: Background, timeout: float, what: str) -> object:
    call.join(timeout)
    assert not call.is_alive(), f"{what} waited for the held endpoint"
    if isinstance(call.outcome, BaseException):
        raise call.outcome
    return call.outcome


def test_other_pools_and_the_listing_go_on_while_an_s3_pool_opens(
    aws_env: MotoServer, proxy: Proxy, tmp_path: Path
) -> None:
    data = _two_pools(tmp_path / "home", aws_env.bucket(), proxy)
    home = Home(tmp_path / "home")
    try:
        before = proxy.accepted
        proxy.held.set()
        first = Background(lambda: home.pool("s"))
        _opening(proxy, before)
        second = Background(lambda: home.pool("s"))  # waits for the open under way

        listed = _finished(Background(home.pools), 10, "the listing")
        assert isinstance(listed, list)
        states = {p.name: (p.state, p.reason) for p in listed}
        assert states == {"loc": (PoolState.ONLINE, ""), "s": (PoolState.OPENING, "being opened")}
        info = _finished(Background(lambda: home.pool_info("s")), 10, "pool_info")
        assert getattr(info, "state", None) is PoolState.OPENING
        created = Background(lambda: home.pool("loc").create_volume("w", MiB))
        _finished(created, 10, "a volume created in another pool")
        assert first.is_alive() and second.is_alive(), "the open did not wait for the endpoint"

        proxy.held.clear()
        opened = _finished(first, 2 * HOLD, "the open")
        assert isinstance(opened, Pool)
        assert _finished(second, 10, "the second call") is opened
        assert home.pool_info("s").state is PoolState.ONLINE
        assert _volume_data(opened) == data
    finally:
        proxy.held.clear()
        home.close()


def test_a_pool_being_imported_is_neither_listed_nor_opened_by_open_all(
    aws_env: MotoServer, proxy: Proxy, tmp_path: Path
) -> None:
    """Through a slow endpoint, the import's catalog is on disk seconds before the pool
    opens (its first object, 1 MiB, comes at 128 KiB/s): the name is reserved meanwhile."""
    bucket = aws_env.bucket()
    data = _two_pools(tmp_path / "first", bucket, proxy)
    home = Home(tmp_path / "second")
    try:
        proxy.rate = 128 << 10
        spec = S3Spec(bucket, (proxy.url,), REGION, timeout=HOLD)
        importing = Background(lambda: home.import_s3_pool("s", spec))
        catalog = tmp_path / "second/pools/s/catalog.db"
        wait_until(catalog.exists, "the imported catalog on disk", timeout=HOLD)
        assert _finished(Background(home.open_all), 10, "open_all") == []
        assert _finished(Background(home.pools), 10, "the listing") == []
        assert importing.is_alive(), "the import ended before the checks"
        proxy.rate = 0.0
        _finished(importing, 2 * HOLD, "the import")
        assert [(p.name, p.state) for p in home.pools()] == [("s", PoolState.ONLINE)]
        assert _volume_data(home.pool("s")) == data
    finally:
        proxy.rate = 0.0
        home.close()


def test_closing_home_waits_for_an_open_and_releases_the_pool(
    aws_env: MotoServer, proxy: Proxy, tmp_path: Path
) -> None:
    data = _two_pools(tmp_path / "home", aws_env.bucket(), proxy)
    home = Home(tmp_path / "home")
    before = proxy.accepted
    proxy.held.set()
    opening = Background(lambda: home.pool("s"))
    _opening(proxy, before)
    closing = Background(home.close)
    time.sleep(1.0)
    assert closing.is_alive(), "HOME closed while a pool of it was being opened"
    proxy.held.clear()
    _finished(opening, 2 * HOLD, "the open")
    _finished(closing, 2 * HOLD, "the close")
    with pytest.raises(StorvisorError, match="is closed"):
        home.pool("loc")

    with Home(tmp_path / "home") as again:  # the lease was released: no force needed
        assert _volume_data(again.pool("s")) == data


def test_the_daemon_serves_its_api_while_an_s3_pool_opens(
    aws_env: MotoServer, proxy: Proxy, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    _two_pools(home, aws_env.bucket(), proxy)
    before = proxy.accepted
    proxy.held.set()
    started = time.monotonic()
    with serving(home, answer_within=20) as (client, _):
        try:
            _opening(proxy, before)  # the daemon opens every pool as it starts
            waiting = subprocess.Popen(  # a call for the pool being opened waits for it
                [STORVISOR, "--home", str(home), "volume", "create", "s/x", "--size", "1M"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            time.sleep(0.5)

            listed = storvisor(home, "pool", "list", "--json")
            assert '"opening"' in listed and '"online"' in listed, listed
            storvisor(home, "volume", "create", "loc/w", "--size", "1M")
            storvisor(home, "export", "nbd", "loc/w")
            proc = subprocess.run(
                [STORVISOR, "--home", str(home), "volume", "list"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            assert proc.returncode == 0, proc.stderr
            assert "pool s is being opened; its volumes are not listed" in proc.stderr
            assert "loc" in proc.stdout and "w" in proc.stdout
            assert time.monotonic() - started < 20, "the API waited for the held endpoint"
            assert client.pool_info("s").state is PoolState.OPENING
            assert _online(client) == {"loc": 1.0, "s": 0.0}
            assert waiting.poll() is None, f"a call for s did not wait: {waiting.communicate()}"
        finally:  # the daemon's close waits for the open
            proxy.held.clear()
        assert waiting.wait(timeout=2 * HOLD) == 0, waiting.communicate()
        wait_until(
            lambda: client.pool_info("s").state is PoolState.ONLINE,
            "the pool online once its endpoint answers",
            timeout=2 * HOLD,
        )
        assert [v.name for v in client.volumes("s")] == ["v", "x"]
        assert _online(client) == {"loc": 1.0, "s": 1.0}
