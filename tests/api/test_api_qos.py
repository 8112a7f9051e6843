"""QoS over the local REST API: the client's records, and raw requests with bad bodies."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path

import pytest

from storvisor.api.client import Client
from storvisor.api.qos import QosKey, QosSpecInfo, VolumeQos
from storvisor.api.server import APIServer
from storvisor.api.service import Service
from storvisor.engine.types import BackingSpec
from storvisor.errors import Conflict, InvalidArgument, NotFound


@pytest.fixture
def api(tmp_path: Path):  # type: ignore[no-untyped-def]
    service = Service.open(tmp_path / "home")
    service.create_pool("p", [BackingSpec(str(tmp_path / "d.img"), 1 << 30)])
    service.create_volume("p", "v", 1 << 30)
    server = APIServer(tmp_path / "home" / "api.sock", service)
    server.start()
    try:
        yield server
    finally:
        server.close()
        service.close()


def _raw(api: APIServer, method: str, path: str, body: bytes) -> tuple[int, object]:
    class Unix(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.connect(str(api.path))

    conn = Unix("localhost", timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_client_round_trip(api: APIServer, tmp_path: Path) -> None:
    c = Client(api.path, timeout=30)
    gold = c.create_qos_spec(
        "gold", [QosKey("total_iops_sec", "100"), QosKey("size_iops_sec", "4096")]
    )
    assert gold == QosSpecInfo(
        "gold", (QosKey("size_iops_sec", "4096"), QosKey("total_iops_sec", "100"))
    )
    assert c.qos_specs() == [gold]
    assert c.qos_spec("gold") == gold
    assert c.set_volume_qos("p", "v", spec="gold") == VolumeQos("p", "v", "gold", gold.keys)
    with pytest.raises(Conflict, match="used by p/v"):
        c.delete_qos_spec("gold")
    one_off = c.set_volume_qos("p", "v", keys=[QosKey("read_bytes_sec", "1.5e6")])
    assert one_off == VolumeQos("p", "v", None, (QosKey("read_bytes_sec", "1500000"),))
    assert c.volume_qos("p", "v") == one_off
    c.delete_qos_spec("gold")
    with pytest.raises(NotFound, match="no QoS spec named 'gold'"):
        c.qos_spec("gold")
    with pytest.raises(NotFound):
        c.volume_qos("p", "nope")
    with pytest.raises(InvalidArgument, match="QoS key write_iops_sec_max needs write_iops_sec"):
        c.set_volume_qos("p", "v", keys=[QosKey("write_iops_sec_max", "10")])
    with pytest.raises(InvalidArgument, match="not both"):
        c.set_volume_qos("p", "v", spec="x", keys=[QosKey("write_iops_sec", "10")])
    assert c.set_volume_qos("p", "v") == VolumeQos("p", "v", None, ())


@pytest.mark.parametrize(
    ("method", "path", "body", "message"),
    [
        ("POST", "/v1/qos-specs", b'{"name": "x", "keys": {"a": 1}}', "malformed request body"),
        ("POST", "/v1/qos-specs", b'{"name": "x", "keys": [{"key": "k"}]}', "missing field"),
        (
            "POST",
            "/v1/qos-specs",
            b'{"name": "x", "keys": [{"key": "iops", "value": "1"}]}',
            "unknown QoS key 'iops'",
        ),
        ("POST", "/v1/pools/p/volumes/v/qos", b'{"spec": 5}', "malformed request body"),
        ("POST", "/v1/pools/p/volumes/v/qos", b"[", "not JSON"),
    ],
)
def test_bad_bodies_are_400(
    api: APIServer, method: str, path: str, body: bytes, message: str
) -> None:
    status, answer = _raw(api, method, path, body)
    assert status == 400
    assert answer["error"]["type"] == "InvalidArgument"  # type: ignore[index]
    assert message in answer["error"]["message"]  # type: ignore[index]
    assert Client(api.path, timeout=30).qos_specs() == []
