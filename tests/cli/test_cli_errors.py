"""Every class of the exception tree: the HTTP status the API answers with, the class the
client raises again, and the one line (exit status 1) the CLI prints. The reachable classes
are raised for real (a missing pool, a full pool, a pool whose device is gone, a closed HOME)
through a real ``APIServer`` in front of a real ``Service``, and the CLI runs as a real
subprocess against it."""

from __future__ import annotations

import http.client
import json
import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

import pytest
from cli_harness import CLI

from storvisor import errors
from storvisor.api.client import AccessDenied, Client, DaemonUnavailable, UntrustedDaemon
from storvisor.api.server import APIServer, status_for
from storvisor.api.service import Service
from storvisor.engine.home import HomeInUse
from storvisor.engine.types import BackingSpec
from storvisor.protocols.virtio.memory import GuestMemoryError
from storvisor.protocols.virtio.ring import RingError

STATUS = {
    errors.StorvisorError: HTTPStatus.INTERNAL_SERVER_ERROR,
    errors.ProtocolError: HTTPStatus.INTERNAL_SERVER_ERROR,
    errors.QueueBroken: HTTPStatus.INTERNAL_SERVER_ERROR,
    errors.LocalFailure: HTTPStatus.INTERNAL_SERVER_ERROR,
    errors.IOFailure: HTTPStatus.INTERNAL_SERVER_ERROR,
    errors.NoSpace: HTTPStatus.INSUFFICIENT_STORAGE,
    errors.Unavailable: HTTPStatus.INTERNAL_SERVER_ERROR,
    errors.NotFound: HTTPStatus.NOT_FOUND,
    errors.Conflict: HTTPStatus.CONFLICT,
    errors.InvalidArgument: HTTPStatus.BAD_REQUEST,
    errors.StateError: HTTPStatus.INTERNAL_SERVER_ERROR,
    errors.CorruptMetadata: HTTPStatus.INTERNAL_SERVER_ERROR,
    # the subclasses defined next to the code that raises them
    RingError: HTTPStatus.INTERNAL_SERVER_ERROR,
    GuestMemoryError: HTTPStatus.INTERNAL_SERVER_ERROR,
    DaemonUnavailable: HTTPStatus.INTERNAL_SERVER_ERROR,
    UntrustedDaemon: HTTPStatus.INTERNAL_SERVER_ERROR,
    HomeInUse: HTTPStatus.CONFLICT,
    # raised by the client only, from the 401 and 403 the server answers on TCP
    AccessDenied: HTTPStatus.INTERNAL_SERVER_ERROR,
}


def _tree_classes() -> set[type[errors.StorvisorError]]:
    return {
        cls
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.StorvisorError)
    }


def _drawn_tree() -> dict[str, str | None]:
    """Each class drawn in errors.py's docstring, with the class drawn as its parent."""
    parents: dict[str, str | None] = {}
    path: list[str] = []
    for line in (errors.__doc__ or "").splitlines():
        m = re.match(r"^    ([ │├└─]*)([A-Z]\w+)\b", line)
        if m is None:
            continue
        depth = len(m.group(1)) // 5
        del path[depth:]
        parents[m.group(2)] = path[-1] if path else None
        path.append(m.group(2))
    return parents


def test_every_class_is_mapped_and_drawn_where_it_belongs() -> None:
    assert _tree_classes() <= set(STATUS), "a new class needs its status here"
    drawn = _drawn_tree()
    assert set(drawn) == {cls.__name__ for cls in STATUS}
    for cls, status in STATUS.items():
        exc = cls("m") if cls is not HomeInUse else HomeInUse(Path("/h"), None)
        assert status_for(exc) is status, cls.__name__
        parent = cls.__bases__[0].__name__ if cls is not errors.StorvisorError else None
        assert drawn[cls.__name__] == parent, cls.__name__


@pytest.mark.parametrize(
    ("cls", "parent"),
    [
        (RingError, errors.QueueBroken),
        (GuestMemoryError, errors.QueueBroken),
        (DaemonUnavailable, errors.LocalFailure),
        (UntrustedDaemon, errors.LocalFailure),
        (HomeInUse, errors.Conflict),
        (errors.NoSpace, errors.IOFailure),
    ],
)
def test_subclasses_keep_their_consequence(cls: type, parent: type) -> None:
    assert issubclass(cls, parent)
    consequences = (errors.ProtocolError, errors.QueueBroken, errors.LocalFailure)
    assert [c for c in consequences if issubclass(cls, c)] in ([], [parent])


# -- raised for real, through the API and the CLI --------------------------------------------


@dataclass
class World:
    home: Path
    service: Service
    api: APIServer
    client: Client
    cli: CLI


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    home = tmp_path / "home"
    service = Service.open(home)
    service.create_pool("p", [BackingSpec(str(tmp_path / "p.img"), 1 << 30)])
    # a pool too small to flatten a clone of a fully written 1 MiB volume
    service.create_pool("small", [BackingSpec(str(tmp_path / "small.img"), 2 << 20)], 64 << 10)
    service.create_volume("small", "v", 1 << 20)
    volume = service.home.pool("small").open_volume("v")
    volume.write(0, b"x" * (1 << 20))
    volume.flush()
    volume.close()
    service.create_snapshot("small", "v", "s")
    service.clone("small", "v", "s", "c")
    # a pool whose device is gone
    service.create_pool("gone", [BackingSpec(str(tmp_path / "gone.img"), 1 << 30)])
    service.home.close()
    (tmp_path / "gone.img").unlink()
    (tmp_path / "file").write_text("")
    service = Service.open(home)
    api = APIServer(home / "api.sock", service)
    api.start()
    try:
        yield World(home, service, api, Client(api.path, timeout=30), CLI(home))
    finally:
        api.close()
        service.close()


def _raw(api: APIServer, method: str, path: str, body: object = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("localhost", timeout=30)
    conn.sock = socket.socket(socket.AF_UNIX)
    conn.sock.connect(str(api.path))
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


@dataclass(frozen=True)
class Case:
    cls: type[errors.StorvisorError]
    method: str
    path: str
    body: object
    call: Callable[[Client, Path], object]
    argv: tuple[str, ...]
    message: str
    before: Callable[[World], None] = lambda w: None


CASES = [
    Case(
        errors.NotFound,
        "GET",
        "/v1/pools/nope",
        None,
        lambda c, t: c.pool_info("nope"),
        ("pool", "show", "nope"),
        "no pool",
    ),
    Case(
        errors.Conflict,
        "POST",
        "/v1/pools/p/volumes",
        {"name": "v", "size": 1 << 20},
        lambda c, t: c.create_volume("p", "v", 1 << 20),
        ("volume", "create", "p/v", "--size", "1M"),
        "already exists",
        lambda w: w.service.create_volume("p", "v", 1 << 20),
    ),
    Case(
        errors.InvalidArgument,
        "POST",
        "/v1/pools/p/volumes",
        {"name": "odd", "size": 1000},
        lambda c, t: c.create_volume("p", "odd", 1000),
        ("volume", "create", "p/odd", "--size", "1000"),
        "512",
    ),
    Case(
        errors.NoSpace,
        "POST",
        "/v1/pools/small/volumes/c/flatten",
        None,
        lambda c, t: c.flatten("small", "c"),
        ("volume", "flatten", "small/c"),
        "out of space",
    ),
    Case(
        errors.IOFailure,
        "POST",
        "/v1/pools",
        {"name": "q", "backings": [{"path": "FILE/x.img", "size": 1 << 30}]},
        lambda c, t: c.create_pool("q", [BackingSpec(str(t / "file" / "x.img"), 1 << 30)]),
        ("pool", "create", "q", "--backing", "FILE/x.img:1G"),
        "Not a directory",
    ),
    Case(
        errors.CorruptMetadata,
        "GET",
        "/v1/pools/gone/volumes",
        None,
        lambda c, t: c.volumes("gone"),
        ("volume", "list", "gone"),
        "gone.img",
    ),
    Case(
        errors.StateError,
        "GET",
        "/v1/pools",
        None,
        lambda c, t: c.pools(),
        ("pool", "list"),
        "is closed",
        lambda w: w.service.home.close(),  # a daemon whose HOME closed under its API
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.cls.__name__ for c in CASES])
def test_error_through_api_client_and_cli(world: World, tmp_path: Path, case: Case) -> None:
    case.before(world)
    body = json.loads(json.dumps(case.body).replace("FILE", str(tmp_path / "file")))
    status, doc = _raw(world.api, case.method, case.path, body)
    assert status == STATUS[case.cls]
    assert doc["error"]["type"] == case.cls.__name__
    assert case.message in doc["error"]["message"]

    with pytest.raises(case.cls) as e:
        case.call(world.client, tmp_path)
    assert type(e.value) is case.cls
    assert case.message in str(e.value)

    argv = [a.replace("FILE", str(tmp_path / "file")) for a in case.argv]
    line = world.cli.fails(*argv)  # exit status 1, one line on stderr, nothing else
    assert case.message in line
