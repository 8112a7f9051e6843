"""The storvisor daemon: one HOME, its exports and the local API, in the foreground.

``serve`` takes the HOME lock (waiting, bounded, for a command that holds it), starts the
NBD listener(s) and every recorded export, starts the API on ``HOME/api.sock`` and runs until
SIGTERM or SIGINT; then it stops accepting API calls, stops every export, flushes and closes
every pool and releases the lock. It installs signal handlers, so it must be called from the
main thread of a program (the CLI's ``serve``).
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from storvisor.api.export_defs import ExportInfo, TcpAddress
from storvisor.api.exports import NBD_SOCKET, ExportRuntime
from storvisor.api.server import APIServer, TcpAPIServer
from storvisor.api.service import Service
from storvisor.api.status import API_SOCKET, POOL_WAIT
from storvisor.api.tls import (
    TlsFiles,
    file_fingerprint,
    format_fingerprint,
    self_signed,
    server_context,
)
from storvisor.api.tokens import TokenStore
from storvisor.engine.home import Home, HomeUser
from storvisor.errors import Conflict, InvalidArgument
from storvisor.exports.tls import server_context as nbd_server_context
from storvisor.units import format_size

log = logging.getLogger(__name__)

_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux

LOCK_WAIT = 30.0
"""Seconds ``serve`` waits by default for a command holding the HOME lock."""


def serve(
    home_path: str | os.PathLike[str],
    *,
    demo: bool = False,
    nbd_tcp: TcpAddress | None = None,
    nbd_tls: tuple[str, str] | None = None,
    nbd_tls_shared: bool = False,
    say: Callable[[str], None] = print,
    cli: str = "storvisor",
    lock_wait: float = LOCK_WAIT,
    api_tcp: TcpAddress | None = None,
    tls: TlsFiles | None = None,
    data_planes: int | None = None,
    pool_wait: float = POOL_WAIT,
) -> None:
    """Run the daemon until SIGTERM/SIGINT.

    ``say`` receives the start-up banner (how to connect); ``cli`` is how the banner spells
    the command-line tool. ``nbd_tls`` (a PEM certificate file and its key file) makes TLS
    required on ``nbd_tcp``; ``nbd_tls_shared`` does so with the API's certificate (``tls``,
    else the self-signed one of HOME). A command holding the HOME lock (one run while no daemon
    answered) is waited for, up to ``lock_wait`` seconds. The exports start before the API
    answers, once their pools are open, or after ``pool_wait`` seconds for those still being
    opened (``Service.start_exports``). Raises ``HomeInUse`` (a
    ``Conflict``) if another daemon holds HOME or the command did not finish in time,
    ``Conflict`` if a listening address is taken, ``InvalidArgument`` if an NBD certificate or
    key cannot be used, or NBD TLS is asked without ``nbd_tcp``; whatever happens, everything
    opened is closed before returning.

    With ``api_tcp`` the API also listens there, with TLS (``tls``, else the self-signed
    certificate of HOME, generated if needed: ``storvisor.api.tls``) and bearer tokens
    (``HOME/tokens.json``); the banner gives the certificate's SHA-256 fingerprint.
    ``InvalidArgument`` if the certificate cannot be loaded or generated.

    ``data_planes`` is the number of data-plane processes serving NBD connections,
    vhost-user-blk queues and TCMU rings (default: one per CPU); 0 gives every vhost-user-blk
    and TCMU export processes of its own (``api/exports.py``)."""
    for name in (API_SOCKET, NBD_SOCKET):
        sock = Path(home_path).absolute() / name
        if len(os.fsencode(sock)) > _SUN_PATH_MAX:
            raise InvalidArgument(
                f"HOME is too deep for a Unix socket path ({_SUN_PATH_MAX} bytes at most): {sock}"
            )
    nbd_context = None
    if (nbd_tls is not None or nbd_tls_shared) and nbd_tcp is None:
        raise InvalidArgument("TLS for NBD needs a TCP listener (the Unix socket stays plain)")
    if nbd_tls is not None and nbd_tls_shared:
        raise InvalidArgument("NBD takes its own certificate or the API's, not both")
    if nbd_tls is not None:
        nbd_context = nbd_server_context(*nbd_tls)
    if nbd_tls_shared and tls is not None:
        nbd_context = nbd_server_context(tls.cert, tls.key)
    home = Home(home_path, user=HomeUser.DAEMON, wait=lock_wait)
    if nbd_tls_shared and tls is None:
        assert nbd_tcp is not None
        try:
            files = self_signed(home.path, nbd_tcp.host)
            nbd_context = nbd_server_context(files.cert, files.key)
        except BaseException:
            home.close()
            raise
    runtime = ExportRuntime(
        home.path,
        nbd_tcp,
        nbd_tls=nbd_context,
        plane_processes=data_planes or None,
        per_export_planes=data_planes == 0,
    )
    service = Service(home, runtime)
    api: APIServer | None = None
    tcp: TcpAPIServer | None = None
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if api_tcp is not None:  # before anything starts: a bad certificate or address fails
            tcp = _listen_tcp(home.path, api_tcp, tls, service)
        runtime.start()
        service.start_exports(pool_wait)
        demo_export = service.ensure_demo() if demo else None
        try:
            api = APIServer(home.path / API_SOCKET, service)
        except OSError as e:
            raise Conflict(f"cannot listen on {home.path / API_SOCKET}: {e.strerror or e}") from e
        api.start()
        remote = ""
        if tcp is not None:
            tcp.start()
            remote = _remote_banner(tcp, cli)
        log.info("serving %s (pid %d)", home.path, os.getpid())
        say(_banner(service, demo_export, cli, remote, tls=nbd_context is not None))
        while not stop.wait(1.0):
            pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if tcp is not None:
            tcp.close()
        if api is not None:
            api.close()
        service.close()
        if api is not None:
            log.info("stopped")


def _listen_tcp(
    home: Path, address: TcpAddress, tls: TlsFiles | None, service: Service
) -> TcpAPIServer:
    files = tls if tls is not None else self_signed(home, address.host)
    context = server_context(files)
    try:
        server = TcpAPIServer(address, service, context, TokenStore(home))
    except OSError as e:
        raise Conflict(f"cannot listen on {address.host}:{address.port}: {e.strerror or e}") from e
    server.fingerprint = format_fingerprint(file_fingerprint(files.cert))
    return server


def _remote_banner(tcp: TcpAPIServer, cli: str) -> str:
    a = tcp.address
    host = f"[{a.host}]" if ":" in a.host else a.host
    return (
        f"  API: https://{host}:{a.port} (bearer tokens: {cli} token create NAME)\n"
        f"  TLS certificate SHA-256 fingerprint: {tcp.fingerprint}"
    )


def _banner(
    service: Service, demo: ExportInfo | None, cli: str, remote: str = "", *, tls: bool
) -> str:
    status = service.status()
    lines = [
        f"storvisor is serving {status.home} (pid {status.pid})",
        f"  API: {status.api_socket}",
        *([remote] if remote else []),
        f"  NBD: {status.nbd_socket}"
        + (f" and tcp {status.nbd_tcp}" if status.nbd_tcp else "")
        + (" (TLS required)" if tls else ""),
    ]
    if demo is not None:
        uri = demo.uris[0]
        q = shlex.quote(uri)
        size = format_size(service.volume_info(demo.spec.pool, demo.spec.volume).size)
        lines += [
            "",
            f"Volume {demo.spec.target} ({size}) is exported over NBD as {demo.spec.name!r}:",
            f"  {uri}",
            *(f"  {other}" for other in demo.uris[1:]),
            "",
            "Try it from another terminal:",
            f"  nbdinfo {q}",
            f"  qemu-io -f raw -c 'write -P 0x5a 0 1M' -c 'read -P 0x5a 0 1M' {q}",
            f"  qemu-img info {q}",
            f"  {cli} volume list",
        ]
    lines += ["", "Stop with Ctrl-C (or SIGTERM)."]
    return "\n".join(lines)
