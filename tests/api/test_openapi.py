"""The contract written once: the route table drives the server, the client and the OpenAPI
document; the document in docs/ is the generated one, and real answers fit its schemas."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from openapi_spec_validator import validate
from test_api_server import api, client, raw  # noqa: F401 (fixtures)

from storvisor.api import routes
from storvisor.api.client import Client
from storvisor.api.openapi import document, render
from storvisor.api.qos import QosKey
from storvisor.api.server import APIServer
from storvisor.engine.types import BackingSpec

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "openapi.json"


def test_docs_copy_is_current() -> None:
    assert DOC.read_text() == render(), "docs/openapi.json is stale: run 'make openapi'"


def test_regenerate_script_detects_a_stale_copy(tmp_path: Path) -> None:
    script = [sys.executable, str(ROOT / "scripts" / "gen_openapi.py")]
    env = {"PYTHONPATH": str(ROOT / "src")}
    assert subprocess.run([*script, "--check"], env=env).returncode == 0  # docs/openapi.json
    copy = tmp_path / "openapi.json"
    copy.write_text(DOC.read_text().replace('"3.1.0"', '"3.0.0"'))
    stale = subprocess.run([*script, "--check", str(copy)], env=env, capture_output=True, text=True)
    assert stale.returncode == 1 and "make openapi" in stale.stderr
    subprocess.run([*script, str(copy)], env=env, check=True)
    assert copy.read_text() == DOC.read_text()
    assert subprocess.run([*script, "--check", str(copy)], env=env).returncode == 0


def test_document_is_valid_openapi_31() -> None:
    doc = document()
    assert doc["openapi"] == "3.1.0"
    validate(doc)


def test_every_route_is_in_the_document_once() -> None:
    doc = document()
    ops = {
        (method.upper(), path): op
        for path, item in doc["paths"].items()
        for method, op in item.items()
    }
    assert len(ops) == len(routes.ROUTES)
    for route in routes.ROUTES:
        op = ops[route.method, "/v1" + route.path]
        assert op["operationId"] == route.name
        assert op["x-storvisor-access"] == route.access.value
        assert ("requestBody" in op) == (route.request is not None)
    assert len({r.name for r in routes.ROUTES}) == len(routes.ROUTES)
    assert len({(r.method, r.path) for r in routes.ROUTES}) == len(routes.ROUTES)


def test_served_document_is_the_generated_one(api: APIServer, client: Client) -> None:  # noqa: F811
    assert client.openapi() == json.loads(render())
    status, doc = raw(api, "GET", "/v1/openapi.json")
    assert status == 200 and doc == document()


def test_route_urls_encode_each_parameter() -> None:
    assert routes.EXPORT_INFO.url("p/v@s") == "/v1/exports/p%2Fv%40s"
    assert routes.DELETE_POOL.url("p", force=True) == "/v1/pools/p?force=1"
    assert routes.DELETE_POOL.url("p", force=False) == "/v1/pools/p"
    m = routes.CLONE.pattern.match(routes.CLONE.url("a", "b", "c"))
    assert m is not None and m.groups() == ("a", "b", "c")
    with pytest.raises(TypeError):
        routes.VOLUME_INFO.url("only-pool")
    with pytest.raises(TypeError):
        routes.POOLS.url(force=True)


def _validator(doc: dict, schema: dict) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator({**schema, "components": doc["components"]})


def test_real_answers_fit_their_schemas(api: APIServer, tmp_path: Path) -> None:  # noqa: F811
    """Each GET route's answer, and each error answer, validates against the document."""
    c = Client(api.path, timeout=30)
    c.create_pool("p", [BackingSpec(str(tmp_path / "d.img"), 1 << 30)])
    c.create_volume("p", "v", 1 << 20)
    c.create_snapshot("p", "v", "s")
    c.export_nbd("p", "v", name="e")
    c.create_qos_spec("e", [QosKey("total_iops_sec", "100")])
    c.set_volume_qos("p", "v", spec="e")
    c.clone("p", "v", "s", "c")
    doc = document()
    status, job = raw(api, "POST", routes.START_FLATTEN.url("p", "c"))
    assert status == 202, job  # a job started: Route.accepted
    schema = doc["paths"]["/v1" + routes.START_FLATTEN.path]["post"]["responses"]["202"]
    _validator(doc, schema["content"]["application/json"]["schema"]).validate(job)
    args = {"pool": "p", "volume": "v", "snapshot": "s", "name": "e", "id": job["id"]}
    checked = 0
    for route in routes.ROUTES:
        if route.method != "GET" or route.name == "libvirt_xml":
            continue
        status, body = raw(api, "GET", route.url(*(args[p] for p in route.params)))
        assert status == 200, (route.name, body)
        schema = doc["paths"]["/v1" + route.path]["get"]["responses"]["200"]["content"]
        _validator(doc, schema["application/json"]["schema"]).validate(body)
        checked += 1
    assert checked >= 10
    status, body = raw(api, "GET", "/v1/pools/nope")
    assert status == 404
    error = doc["components"]["responses"]["Error"]["content"]["application/json"]["schema"]
    _validator(doc, error).validate(body)
    # The validator is strict: an extra field in an answer would fail.
    with pytest.raises(jsonschema.ValidationError):
        _validator(doc, error).validate({"error": {"type": "X", "message": "m", "extra": 1}})
