"""NBD connections served by data-plane processes (see ``exports/dataplane.py``).

Theory of operation
-------------------
The daemon keeps listening on its NBD sockets, but hands every accepted connection, before
the handshake, to one of ``NbdDataPlanes``' worker processes (one per CPU, in turn). A worker
runs an ``NBDServer`` of its own without listeners; it knows the daemon's exports (the daemon
sends it every export added or removed), negotiates with the client, and when the client
chooses an export asks the daemon to open it: the daemon opens a volume handle, attaches a
``PlaneHost`` to it and passes back the plane's channel, its shared map and the pool's
backing fds, from which the worker builds a ``RemoteVolume``. Reads and in-place writes then
run in the worker, allocations, discards and flushes in the daemon. When the connection ends
the worker closes the ``RemoteVolume``; the daemon sees its channel close and closes the
volume handle. Connections of several clients thus run on several cores; multi-conn stays
safe because a flush, wherever it comes from, syncs the whole pool.

Control frames between the daemon and a worker: a 4-byte little-endian length and a JSON
object; fds travel with a frame as ``SCM_RIGHTS``. Daemon to worker: ``add`` (an export),
``remove``, ``conn`` (a client socket), ``opened`` (the answer to ``open``: an error, or the
fds of a plane). Worker to daemon: ``open`` (an export, with a request id).

A worker that dies loses its clients' connections (NBD clients reconnect); the daemon starts
a new one. A worker whose daemon dies exits at once.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from storvisor.engine.device import BlockDevice
from storvisor.engine.volume import Volume
from storvisor.errors import IOFailure, NotFound, StorvisorError
from storvisor.exports.dataplane import PlaneHost, RemoteVolume

log = logging.getLogger(__name__)

_LEN = struct.Struct("<I")
_MAX_FRAME = 1 << 20
_MAX_FDS = 64


def _send(sock: socket.socket, lock: threading.Lock, obj: object, fds: Sequence[int] = ()) -> None:
    body = json.dumps(obj).encode()
    frame = _LEN.pack(len(body)) + body
    with lock:
        if fds:
            sent = socket.send_fds(sock, [frame], list(fds))
            if sent < len(frame):
                sock.sendall(frame[sent:])
        else:
            sock.sendall(frame)


def _recv(sock: socket.socket) -> tuple[dict[str, object], list[int]] | None:
    """One frame and its fds; None on EOF between frames. Raises ``OSError``/``ValueError``."""
    head, fds, _, _ = socket.recv_fds(sock, _LEN.size, _MAX_FDS)
    if not head:
        for fd in fds:
            os.close(fd)
        return None
    try:
        while len(head) < _LEN.size:
            more = sock.recv(_LEN.size - len(head))
            if not more:
                raise ValueError("control channel closed inside a frame")
            head += more
        (size,) = _LEN.unpack(head)
        if size > _MAX_FRAME:
            raise ValueError(f"control frame of {size} bytes")
        body = bytearray()
        while len(body) < size:
            more = sock.recv(size - len(body))
            if not more:
                raise ValueError("control channel closed inside a frame")
            body += more
        obj = json.loads(body)
        if not isinstance(obj, dict):
            raise ValueError("control frame is not an object")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return obj, list(fds)


@dataclass(frozen=True)
class _ExportDef:
    name: str
    open: Callable[[], BlockDevice]
    description: str
    read_only: bool


class _Worker:
    """The daemon's end of one worker process."""

    def __init__(self, planes: NbdDataPlanes, index: int) -> None:
        self.planes = planes
        self.index = index
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock = ours
        self.lock = threading.Lock()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "storvisor.exports.nbd_worker", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self.reader = threading.Thread(target=self._read, name=f"nbd-plane-{index}", daemon=True)

    def start(self, exports: list[_ExportDef]) -> None:
        for export in exports:
            self.add(export)
        self.reader.start()

    def add(self, export: _ExportDef) -> None:
        with contextlib.suppress(OSError):
            _send(self.sock, self.lock, {"op": "add", "name": export.name,
                                         "description": export.description,
                                         "read_only": export.read_only})  # fmt: skip

    def remove(self, name: str) -> None:
        with contextlib.suppress(OSError):
            _send(self.sock, self.lock, {"op": "remove", "name": name})

    def hand_over(self, conn: socket.socket) -> bool:
        try:
            _send(self.sock, self.lock, {"op": "conn"}, [conn.fileno()])
        except OSError:
            return False
        conn.close()
        return True

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.reader.is_alive() and self.reader is not threading.current_thread():
            self.reader.join(10)
        self.sock.close()

    def _read(self) -> None:
        try:
            while True:
                got = _recv(self.sock)
                if got is None:
                    break
                msg, fds = got
                for fd in fds:
                    os.close(fd)
                if msg.get("op") == "open":
                    threading.Thread(
                        target=self._open, args=(msg,), name="nbd-plane-open", daemon=True
                    ).start()
        except (OSError, ValueError) as e:
            log.warning("NBD data plane %d: control channel failed: %s", self.index, e)
        self.planes._worker_gone(self)

    def _open(self, msg: dict[str, object]) -> None:
        ident = msg.get("id")
        name = str(msg.get("name"))
        export = self.planes._export(name)
        try:
            if export is None:
                raise NotFound(f"no NBD export named {name!r}")
            device = export.open()
            if not isinstance(device, Volume):
                device.close()
                raise IOFailure(f"export {name!r} is not a volume", errno.EINVAL)
            volume = device
        except StorvisorError as e:
            code = e.errno if isinstance(e, IOFailure) else errno.ENOENT
            with contextlib.suppress(OSError):
                _send(self.sock, self.lock, {"op": "opened", "id": ident, "error": str(e),
                                             "errno": code or errno.EIO})  # fmt: skip
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        host = PlaneHost(volume, ours, on_closed=lambda: _close_later(host, volume))
        try:
            host.start()
            backings = volume.backing_fds()
            _send(
                self.sock,
                self.lock,
                {
                    "op": "opened",
                    "id": ident,
                    "cluster_size": volume.cluster_size,
                    "read_only": volume.read_only or export.read_only,
                    "serial": volume.serial,
                    "backings": list(backings),
                },
                [theirs.fileno(), host.map.fd, *backings.values()],
            )
        except OSError:
            host.close()
            volume.close()
        finally:
            theirs.close()


def _close_later(host: PlaneHost, volume: Volume) -> None:
    """The plane's connection ended: close its host and volume handle (not from the host's
    own reader thread, which ``close`` joins)."""

    def close() -> None:
        host.close()
        volume.close()

    threading.Thread(target=close, name="nbd-plane-close", daemon=True).start()


class NbdDataPlanes:
    """The daemon's NBD worker processes: ``hand_over`` gives each an accepted connection
    in turn (see the module docstring)."""

    def __init__(self, processes: int | None = None) -> None:
        self.processes = max(1, processes or os.cpu_count() or 1)
        self._lock = threading.Lock()
        self._exports: dict[str, _ExportDef] = {}
        self._workers: list[_Worker] = []
        self._turn = itertools.count()
        self._closed = False

    def start(self) -> None:
        for index in range(self.processes):
            worker = _Worker(self, index)
            self._workers.append(worker)
            worker.start([])

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [w.proc.pid for w in self._workers]

    def add_export(
        self, name: str, open_volume: Callable[[], BlockDevice], description: str, read_only: bool
    ) -> None:
        """Offer ``name`` to the workers' clients; ``open_volume`` must return ``Volume`` s."""
        export = _ExportDef(name, open_volume, description, read_only)
        with self._lock:
            self._exports[name] = export
            workers = list(self._workers)
        for worker in workers:
            worker.add(export)

    def remove_export(self, name: str) -> None:
        with self._lock:
            self._exports.pop(name, None)
            workers = list(self._workers)
        for worker in workers:
            worker.remove(name)

    def hand_over(self, conn: socket.socket) -> bool:
        """Give ``conn`` to a worker; False (the caller keeps it) if none could take it."""
        with self._lock:
            workers = list(self._workers)
        for _ in range(len(workers)):
            worker = workers[next(self._turn) % len(workers)]
            if worker.proc.poll() is None and worker.hand_over(conn):
                return True
        return False

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers, self._workers = self._workers, []
        for worker in workers:
            worker.stop()

    def _export(self, name: str) -> _ExportDef | None:
        with self._lock:
            if name:
                return self._exports.get(name)
            return next(iter(self._exports.values()), None)

    def _worker_gone(self, worker: _Worker) -> None:
        """A worker's channel closed: unless closing, start a new one in its place."""
        with self._lock:
            if self._closed or worker not in self._workers:
                return
        log.warning("NBD data plane %d exited (status %s); restarting", worker.index,
                    worker.proc.poll())  # fmt: skip
        threading.Thread(target=self._replace, args=(worker,), daemon=True).start()

    def _replace(self, worker: _Worker) -> None:
        worker.stop()
        time.sleep(0.1)
        with self._lock:
            if self._closed or worker not in self._workers:
                return
            exports = list(self._exports.values())
        new = _Worker(self, worker.index)
        with self._lock:
            if self._closed:
                closed = True
            else:
                closed = False
                self._workers[self._workers.index(worker)] = new
        if closed:
            new.stop()
            return
        new.start(exports)


# --------------------------------------------------------------------- the process itself


class _Opener:
    """The worker's side of ``open``: asks the daemon, builds the ``RemoteVolume``."""

    def __init__(self, sock: socket.socket, lock: threading.Lock) -> None:
        self.sock = sock
        self.lock = lock
        self._ids = itertools.count(1)
        self._waits: dict[int, tuple[threading.Event, list[object]]] = {}
        self._waits_lock = threading.Lock()
        self.lost = False

    def open(self, name: str) -> RemoteVolume:
        ident = next(self._ids)
        done: tuple[threading.Event, list[object]] = (threading.Event(), [])
        with self._waits_lock:
            if self.lost:
                raise IOFailure("the daemon is gone", errno.EIO)
            self._waits[ident] = done
        _send(self.sock, self.lock, {"op": "open", "id": ident, "name": name})
        done[0].wait()
        if not done[1]:
            raise IOFailure("the daemon is gone", errno.EIO)
        msg, fds = done[1]
        assert isinstance(msg, dict) and isinstance(fds, list)
        if "error" in msg:
            for fd in fds:
                os.close(fd)
            code = msg.get("errno")
            raise IOFailure(str(msg["error"]), code if isinstance(code, int) else errno.EIO)
        listed = msg["backings"]
        indices = [int(i) for i in listed] if isinstance(listed, list) else []
        channel, map_fd, *backing_fds = fds
        return RemoteVolume(
            socket.socket(fileno=channel),
            map_fd,
            dict(zip(indices, backing_fds, strict=True)),
            int(str(msg["cluster_size"])),
            read_only=bool(msg["read_only"]),
            serial=str(msg["serial"]),
        )

    def answered(self, msg: dict[str, object], fds: list[int]) -> None:
        ident = msg.get("id")
        with self._waits_lock:
            wait = self._waits.pop(ident if isinstance(ident, int) else -1, None)
        if wait is None:
            for fd in fds:
                os.close(fd)
            return
        wait[1].extend([msg, fds])
        wait[0].set()

    def fail_all(self) -> None:
        with self._waits_lock:
            self.lost = True
            waits, self._waits = list(self._waits.values()), {}
        for event, _ in waits:
            event.set()


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the connections the daemon hands over until the control channel closes."""
    from storvisor.exports.nbd import NBDExport, NBDServer  # the data path, loaded here

    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="nbd-plane[%(process)d] %(message)s")
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m storvisor.exports.nbd_worker CONTROL-FD", file=sys.stderr)
        return 2
    control = socket.socket(fileno=int(args[0]))
    lock = threading.Lock()
    opener = _Opener(control, lock)
    server = NBDServer()
    server.start()
    try:
        while True:
            got = _recv(control)
            if got is None:
                break
            msg, fds = got
            op = msg.get("op")
            if op == "conn" and fds:
                for fd in fds[1:]:
                    os.close(fd)
                server.serve_socket(socket.socket(fileno=fds[0]))
            elif op == "opened":
                opener.answered(msg, fds)
            else:
                for fd in fds:
                    os.close(fd)
                name = str(msg.get("name"))
                if op == "add":
                    with contextlib.suppress(StorvisorError):
                        server.add_export(
                            NBDExport(
                                name,
                                functools.partial(opener.open, name),
                                description=str(msg.get("description", "")),
                                read_only=bool(msg.get("read_only")),
                            )
                        )
                elif op == "remove":
                    with contextlib.suppress(StorvisorError):
                        server.remove_export(name)
    except (OSError, ValueError) as e:
        log.error("control channel failed: %s", e)
    # the daemon is gone: end at once, answering nothing more
    opener.fail_all()
    os.kill(os.getpid(), signal.SIGKILL)
    return 1


if __name__ == "__main__":
    sys.exit(main())
