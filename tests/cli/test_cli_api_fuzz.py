"""schemathesis against the live daemon, on the Unix socket and on TCP with TLS and a token:
requests generated from the published OpenAPI document, valid and invalid, get no 5xx and no
answer that violates the document; the pool is fsck-clean afterwards.

The operations that name host paths (``create_pool``, ``add_backing``, ``create_export``
with its vhost-user socket, ``import_image`` and ``export_image``) are left out: generated
paths would make the daemon create or overwrite files anywhere on this machine."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
import urllib3
from cli_harness import CLI, Daemon
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from storvisor.api.openapi import document

_UNSAFE = ["create_pool", "add_backing", "create_export", "import_image", "export_image"]
_EXAMPLES = 150
_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


class _UnixConnection(urllib3.connection.HTTPConnection):
    def __init__(self, path: str, **kwargs: Any) -> None:
        super().__init__("localhost", **kwargs)
        self._path = path

    def _new_conn(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(30)
        sock.connect(self._path)
        return sock


class _UnixPool(urllib3.HTTPConnectionPool):
    def __init__(self, path: str) -> None:
        super().__init__("localhost")
        self._path = path

    def _new_conn(self) -> _UnixConnection:
        return _UnixConnection(self._path)


class _UnixAdapter(requests.adapters.HTTPAdapter):
    """``requests`` over the daemon's Unix socket (for ``http://api.sock/...``)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._path = str(path)

    def get_connection_with_tls_context(self, *args: Any, **kwargs: Any) -> _UnixPool:
        return _UnixPool(self._path)


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[CLI, Daemon, str]]:
    """A daemon on the Unix socket and TCP, with a pool, a volume, a snapshot, an export, a
    QoS spec and a token (each test changes them: one daemon each)."""
    tmp = tmp_path
    cli = CLI(tmp / "home")
    cli("pool", "create", "p", "--backing", f"{tmp}/d.img:1G")
    cli("volume", "create", "p/v", "--size", "64M")
    cli("snapshot", "create", "p/v@s")
    cli("export", "nbd", "p/v", "--name", "e")
    cli("qos", "create", "e", "total_iops_sec=1000")
    token = cli("token", "create", "fuzz").out.strip()
    d = Daemon(tmp / "home", "--api-tcp", "127.0.0.1:0").start()
    try:
        yield cli, d, token
    finally:
        rc, err = d.stop()
        assert rc == 0 and "Traceback" not in err, err


def _fuzz(call: Callable[[Any], Any], *, unix: bool = False) -> None:
    """Run ``call`` (send a case and validate the answer) on generated cases, valid and
    invalid, and check that they reached most operations, with successes and refusals."""
    seen: dict[str, set[int]] = {}
    doc = document()
    if unix:
        doc["security"] = []  # the Unix socket's mode 0600 is its access control: no token
    schema = schemathesis.openapi.from_dict(doc).exclude(operation_id=_UNSAFE)
    # Random names rarely name anything: a second round aims the same operations at the pool,
    # volume, snapshot, export and QoS spec that exist, so writes succeed and change state.
    real = {"pool": "p", "volume": "v", "snapshot": "s", "name": "e"}
    for mode, params in [
        (GenerationMode.POSITIVE, None),
        (GenerationMode.NEGATIVE, None),
        (GenerationMode.POSITIVE, real),
        (GenerationMode.NEGATIVE, real),
    ]:

        @settings(
            max_examples=_EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=schema.as_strategy(generation_mode=mode, path_parameters=params))
        def run(case: Any) -> None:
            response = call(case)
            seen.setdefault(case.operation.label, set()).add(response.status_code)

        run()
    statuses = set().union(*seen.values())
    assert len(seen) >= 20, sorted(seen)
    assert {200, 204, 400, 404} <= statuses, statuses
    writes = [op for op, codes in seen.items() if not op.startswith("GET") and codes & {200, 204}]
    assert len(writes) >= 5, sorted(seen)


def _fsck_clean(cli: CLI) -> None:
    for pool in cli("pool", "list", "--json").json():
        report = cli("fsck", pool["name"], "--json").json()
        problems = ("leaked", "doubly_owned", "dangling", "errors")
        assert not any(report[k] for k in problems), report


def test_schemathesis_on_the_unix_socket(live) -> None:
    cli, d, _ = live
    session = requests.Session()
    session.mount("http://api.sock", _UnixAdapter(d.home / "api.sock"))
    _fuzz(
        lambda case: case.call_and_validate(
            base_url="http://api.sock", session=session, checks=_CHECKS
        ),
        unix=True,
    )
    _fsck_clean(cli)


def test_schemathesis_on_tcp_with_tls_and_a_token(live) -> None:
    cli, d, token = live
    port = int(d.banner.split("https://127.0.0.1:")[1].split(" ")[0])
    session = requests.Session()
    _fuzz(
        lambda case: case.call_and_validate(
            base_url=f"https://127.0.0.1:{port}",
            session=session,
            headers={"Authorization": f"Bearer {token}"},
            verify=str(d.home / "tls" / "cert.pem"),
            checks=[*_CHECKS, ignored_auth],
        )
    )
    _fsck_clean(cli)
