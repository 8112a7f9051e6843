"""The local REST API: a real ``APIServer`` on a Unix socket in front of a real ``Service``
(engine on sparse files), driven by the real ``Client`` and by raw HTTP requests."""

from __future__ import annotations

import http.client
import json
import socket
import stat
from pathlib import Path

import pytest

from storvisor.api.client import Client
from storvisor.api.codec import decode, encode
from storvisor.api.export_defs import ExportInfo, ExportKind, ExportSpec, ExportState
from storvisor.api.server import APIServer
from storvisor.api.service import Service
from storvisor.engine.types import BackingSpec, PoolInfo, VolumeInfo
from storvisor.errors import Conflict, InvalidArgument, NotFound, StorvisorError


class _Unix(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=30)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(self._path)


@pytest.fixture
def api(tmp_path: Path):
    service = Service.open(tmp_path / "home")
    server = APIServer(tmp_path / "home" / "api.sock", service)
    server.start()
    try:
        yield server
    finally:
        server.close()
        service.close()


@pytest.fixture
def client(api: APIServer) -> Client:
    return Client(api.path, timeout=30)


def raw(api: APIServer, method: str, path: str, body: bytes | None = None):
    conn = _Unix(str(api.path))
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data else None
    finally:
        conn.close()


def test_socket_is_private(api: APIServer) -> None:
    assert stat.S_IMODE(api.path.stat().st_mode) == 0o600


def test_client_round_trip(client: Client, tmp_path: Path) -> None:
    pool = client.create_pool("p", [BackingSpec(str(tmp_path / "d.img"), 1 << 30)])
    assert isinstance(pool, PoolInfo) and pool.name == "p"
    vol = client.create_volume("p", "v", 64 << 20)
    assert isinstance(vol, VolumeInfo) and vol.size == 64 << 20
    assert client.volumes() == client.volumes("p") == [client.volume_info("p", "v")]
    snap = client.create_snapshot("p", "v", "s")
    assert client.snapshots("p", "v") == [snap]
    clone = client.clone("p", "v", "s", "c")
    assert clone.origin == "v@s"
    assert client.flatten("p", "c").origin is None
    assert client.extend_volume("p", "v", 128 << 20).size == 128 << 20
    assert client.rollback("p", "v", "s").name == "v"
    assert client.fsck("p").clean
    exp = client.export_nbd("p", "v", "s")
    assert isinstance(exp, ExportInfo)
    assert exp.spec.kind is ExportKind.NBD and exp.spec.read_only
    assert exp.state is ExportState.INACTIVE  # this service has no export servers
    assert client.exports() == [exp]
    assert client.export_info("p/v@s") == exp  # "/" and "@" survive the URL
    client.remove_export("p/v@s")
    assert client.status().daemon is False
    client.delete_volume("p", "c")
    client.delete_snapshot("p", "v", "s")
    client.delete_pool("p", force=True)
    assert client.pools() == []


def test_errors_keep_their_class(client: Client, tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="nope"):
        client.pool_info("nope")
    client.create_pool("p", [BackingSpec(str(tmp_path / "d.img"), 1 << 30)])
    client.create_volume("p", "v", 1 << 20)
    with pytest.raises(Conflict):
        client.create_volume("p", "v", 1 << 20)
    with pytest.raises(InvalidArgument):
        client.create_volume("p", "bad name!", 1 << 20)
    client.export_nbd("p", "v")
    with pytest.raises(Conflict, match="exported"):
        client.delete_volume("p", "v")
    assert client.volume_info("p", "v").size == 1 << 20


def _s3_pool(bucket: str, endpoint: str) -> bytes:
    s3 = {"bucket": bucket, "endpoints": [endpoint], "region": "us-east-1"}
    return json.dumps({"name": "s", "s3": s3}).encode()


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "kind"),
    [
        ("GET", "/v1/pools/nope", None, 404, "NotFound"),
        ("GET", "/v1/nothing/here", None, 404, "NotFound"),
        ("PUT", "/v1/pools", None, 405, "InvalidArgument"),
        ("BREW", "/v1/pools", None, 501, "InvalidArgument"),
        ("DELETE", "/v1/volumes", None, 405, "InvalidArgument"),
        ("POST", "/v1/pools", b"{not json", 400, "InvalidArgument"),
        ("POST", "/v1/pools", b'{"name": 3}', 400, "InvalidArgument"),
        ("POST", "/v1/pools", b'{"name": "x", "backings": []}', 400, "InvalidArgument"),
        ("POST", "/v1/exports", b'{"kind": "ftp", "pool": "a", "volume": "b"}', 400, None),
        ("POST", "/v1/s3-pools", _s3_pool("b", ""), 400, "InvalidArgument"),
        ("POST", "/v1/s3-pools", _s3_pool("b", "ftp://h"), 400, "InvalidArgument"),
        ("POST", "/v1/s3-pools", _s3_pool("a bucket?", "http://h"), 400, "InvalidArgument"),
    ],
)
def test_raw_http_errors(api: APIServer, method, path, body, status, kind) -> None:
    got, doc = raw(api, method, path, body)
    assert got == status
    if kind is not None:
        assert doc["error"]["type"] == kind
        assert doc["error"]["message"]
        assert "Traceback" not in doc["error"]["message"]


def test_client_without_daemon(tmp_path: Path) -> None:
    assert Client.for_home(tmp_path) is None
    (tmp_path / "api.sock").touch()  # a stale file, nobody listening
    assert Client.for_home(tmp_path) is None
    with pytest.raises(StorvisorError, match="no answer"):
        Client(tmp_path / "api.sock").pools()


def test_codec_round_trip() -> None:
    spec = ExportSpec("n", ExportKind.VHOST_USER_BLK, "p", "v", None, True, "/s.sock", 4)
    info = ExportInfo(spec, ExportState.BROKEN, ("/s.sock",), "why")
    assert decode(ExportInfo, json.loads(json.dumps(encode(info)))) == info
    with pytest.raises(StorvisorError):
        decode(ExportSpec, {"name": "n"})
