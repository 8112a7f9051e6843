"""The daemon's data-plane processes (see ``exports/dataplane.py``): a fixed set of worker
processes, about one per CPU, that serve NBD connections, the queues of vhost-user-blk
exports and the rings of TCMU backstores, however many exports there are.

Theory of operation
-------------------
``DataPlanes`` starts ``processes`` workers and keeps that many running. Each worker serves
NBD connections (below) and any number of *slots* (``exports/slots.py``: a slot is the part
of one export that runs in one process: a vhost-user-blk export's queues ``i`` with
``i % slots == slot``, or a TCMU backstore's ring).

Placement: an export asks ``place`` for workers for its slots; each goes to the
worker with the least load (queues of the slots it serves plus its open NBD connections),
the slots of one export to distinct workers while there are enough, so that exports come and
go without the processes changing. ``serve_slot`` hands a slot over (``SLOT``: its
configuration and fds), ``drop_slot`` ends it (``DROP``); the worker runs the slot's threads
beside its other slots', so a slot whose device stalls holds only its own threads (its queue
threads, its channel to the daemon), never the worker's control loop or another slot. A
``DROP`` is carried out on a thread of its own for the same reason.

Supervision: when a worker ends (a crash, a kill), a new one is started in its place and
every export that had a slot in it is told (``PlaneTenant.plane_lost``, on a thread of its
own): it drops its remaining slots and places them again, and its front-end reconnects
(vhost-user inflight resubmission) or its ring is served again. Exports with no slot in
that worker never notice.

NBD: the daemon keeps listening on its NBD sockets, but hands every accepted connection,
before the handshake, to one of the workers (in turn). A worker
runs an ``NBDServer`` of its own without listeners; it knows the daemon's exports (the daemon
sends it every export added or removed), negotiates with the client, and when the client
chooses an export asks the daemon to open it: the daemon opens a volume handle, attaches a
``PlaneHost`` to it and passes back the plane's channel, its shared map and the pool's
backing fds, from which the worker builds a ``RemoteVolume``. Reads and in-place writes then
run in the worker, allocations, discards and flushes in the daemon. When the export's device
is a ``ThrottledDevice``, the daemon also passes the volume's QoS block (``engine/qos.py``)
and the worker throttles its ``RemoteVolume`` with it: every connection of the volume, in
every worker, draws from the same buckets. With the export's ``StatsSet``
(``engine/iostats.py``) the daemon opens a statistics block for the connection and passes it
too: the worker counts the connection's requests in it and the daemon reads it, so its
metrics cover every worker. When the connection ends
the worker closes the ``RemoteVolume``; the daemon sees its channel close and closes the
volume handle. Connections of several clients thus run on several cores; multi-conn stays
safe because a flush, wherever it comes from, syncs the whole pool.

Control frames between the daemon and a worker (``protocols/frames.py`` over a ``Link``;
``_Op`` lists them with their fields): daemon to worker ``ADD`` (an export), ``REMOVE``,
``CONN`` (a client socket, as an fd), ``OPENED`` (the answer to ``OPEN``: an errno and a
message, or the fds of a plane), ``SLOT`` and ``DROP`` (a vhost-user-blk slot); worker to
daemon ``OPEN`` (an export, with a request id).

Connections that require TLS (TCP with a TLS context, see ``exports/nbd.py``) are not handed
over: their TLS session lives in the daemon's OpenSSL state, which a file descriptor does not
carry, so the daemon serves them itself.

A worker that dies loses its clients' connections (NBD clients reconnect) and its slots
(their front-ends reconnect once the slots are placed again). A worker whose daemon dies
exits at once (SIGKILL: it completes no request with an error, so a vhost-user front-end
resubmits what was in flight to the next daemon).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
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
from enum import IntEnum
from typing import TYPE_CHECKING, Protocol

from storvisor.engine.device import BlockDevice
from storvisor.engine.iostats import CountedDevice, IoStats, StatsSet
from storvisor.engine.qos import QosBlock, ThrottledDevice
from storvisor.engine.volume import Volume
from storvisor.errors import IOFailure, LocalFailure, NotFound, StorvisorError
from storvisor.exports.dataplane import PlaneHost, RemoteVolume
from storvisor.exports.link import Link
from storvisor.protocols.frames import Frame

if TYPE_CHECKING:
    from storvisor.exports.slots import Slot

log = logging.getLogger(__name__)

_MAX_PAYLOAD = 1 << 20
_MAX_FDS = 200  # SCM_RIGHTS carries at most 253
_INDEX = struct.Struct("<I")


class _Op(IntEnum):
    """Frames of the control link (text is UTF-8)."""

    ADD = 1  # flags READ_ONLY; a = bytes of the name; payload = name + description
    REMOVE = 2  # payload = name
    CONN = 3  # fds = [client socket]
    OPEN = 4  # ident; payload = name
    OPENED = 5  # ident; a = errno, payload = message; or a = 0, flags READ_ONLY,
    # b = cluster size, fds = [channel, map, (QoS block,) (I/O stats block,) backing fds],
    # payload = their device indices (u32 each) + serial
    SLOT = 6  # ident = slot key; payload = the slot's SlotConfig as JSON, its fd fields
    # being positions in fds (exports/slots.py)
    DROP = 7  # ident = slot key


_READ_ONLY = 1
_QOS = 2  # OPENED: the third fd is the volume's QoS block
_STATS = 4  # OPENED: the connection's I/O statistics block follows the QoS block


def _text(data: bytes | bytearray, what: str) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError as e:
        raise LocalFailure(f"{what} is not UTF-8") from e


def _close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)


@dataclass(frozen=True)
class _ExportDef:
    name: str
    open: Callable[[], BlockDevice]
    description: str
    read_only: bool
    stats: StatsSet | None = None


class PlaneTenant(Protocol):
    """What has slots in the workers (a vhost-user-blk export): told when a worker that
    served one of them ended."""

    def plane_lost(self) -> None:
        """A worker serving one of its slots ended (called on a thread of its own)."""


@dataclass(frozen=True)
class _SlotDef:
    worker: _Worker
    tenant: PlaneTenant
    load: int


class _Worker:
    """The daemon's end of one worker process."""

    def __init__(self, planes: DataPlanes, index: int) -> None:
        self.planes = planes
        self.index = index
        self.load = 0
        """Queues of the slots it serves plus its open NBD connections (under the planes'
        lock)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock = ours
        self.link = Link(ours, max_payload=_MAX_PAYLOAD)
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
        name = export.name.encode()
        flags = _READ_ONLY if export.read_only else 0
        with contextlib.suppress(OSError):
            self.link.send(
                _Op.ADD, 0, len(name), 0, name + export.description.encode(), flags=flags
            )

    def remove(self, name: str) -> None:
        with contextlib.suppress(OSError):
            self.link.send(_Op.REMOVE, payload=name.encode())

    def hand_over(self, conn: socket.socket) -> bool:
        try:
            self.link.send(_Op.CONN, fds=[conn.fileno()])
        except OSError:
            return False
        conn.close()
        return True

    def slot(self, key: int, config: bytes, fds: Sequence[int]) -> bool:
        try:
            self.link.send(_Op.SLOT, key, payload=config, fds=fds)
        except OSError:
            return False
        return True

    def drop(self, key: int) -> None:
        with contextlib.suppress(OSError):
            self.link.send(_Op.DROP, key)

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
                frame = self.link.receive()
                if frame is None:
                    break
                _close_fds(frame.fds)
                if frame.op != _Op.OPEN:
                    raise LocalFailure(f"unexpected control frame {frame.op}")
                name = _text(frame.payload, "an export name")
                threading.Thread(
                    target=self._open, args=(frame.ident, name), name="nbd-plane-open", daemon=True
                ).start()
        except (OSError, LocalFailure) as e:
            log.warning("NBD data plane %d: control channel failed: %s", self.index, e)
        self.planes._worker_gone(self)

    def _open(self, ident: int, name: str) -> None:
        export = self.planes._claim(name, self)
        try:
            if export is None:
                raise NotFound(f"no NBD export named {name!r}")
            try:
                device = export.open()
                if isinstance(device, ThrottledDevice):
                    qos: QosBlock | None = device.qos
                    device = device.inner
                else:
                    qos = None
                if not isinstance(device, Volume):
                    device.close()
                    raise IOFailure(f"export {name!r} is not a volume", errno.EINVAL)
            except BaseException:
                self.planes._release(export.name, self)
                raise
            volume = device
        except StorvisorError as e:
            code = e.errno if isinstance(e, IOFailure) else errno.ENOENT
            message = str(e).encode()[:4000]
            with contextlib.suppress(OSError):
                self.link.send(_Op.OPENED, ident, code or errno.EIO, 0, message)
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        stats = export.stats.open() if export.stats is not None else None

        def released() -> None:
            if stats is not None:
                assert export.stats is not None
                export.stats.retire(stats)  # the plane has stopped writing it
            self.planes._release(export.name, self)

        host = PlaneHost(volume, ours, on_closed=lambda: _close_later(host, volume, released))
        try:
            host.start()
            backings = volume.backing_fds()
            indices = b"".join(_INDEX.pack(index) for index in backings)
            flags = _READ_ONLY if volume.read_only or export.read_only else 0
            flags |= _QOS if qos is not None else 0
            flags |= _STATS if stats is not None else 0
            extra_fds = [block.fd for block in (qos, stats) if block is not None]
            self.link.send(
                _Op.OPENED,
                ident,
                0,
                volume.cluster_size,
                indices + volume.serial.encode(),
                flags=flags,
                fds=[theirs.fileno(), host.map.fd, *extra_fds, *backings.values()],
            )
        except OSError:
            host.close()
            volume.close()
            released()
        finally:
            theirs.close()


def _close_later(host: PlaneHost, volume: Volume, released: Callable[[], None]) -> None:
    """The plane's connection ended: close its host and volume handle (not from the host's
    own reader thread, which ``close`` joins), then call ``released``."""

    def close() -> None:
        try:
            host.close()
            volume.close()
        finally:
            released()

    threading.Thread(target=close, name="nbd-plane-close", daemon=True).start()


def default_processes() -> int:
    """The default number of data-plane processes: one per CPU."""
    return os.cpu_count() or 1


class DataPlanes:
    """The daemon's data-plane worker processes (see the module docstring): ``hand_over``
    gives each an accepted NBD connection in turn; ``place``, ``serve_slot`` and
    ``drop_slot`` put vhost-user-blk slots on the least loaded ones."""

    def __init__(self, processes: int | None = None) -> None:
        self.processes = max(1, processes or default_processes())
        self._lock = threading.Lock()
        self._exports: dict[str, _ExportDef] = {}
        self._workers: list[_Worker] = []
        self._turn = itertools.count()
        self._closed = False
        self._planes: dict[str, int] = {}  # export -> volume handles its connections hold
        self._planes_closed = threading.Condition(self._lock)
        self._slots: dict[int, _SlotDef] = {}
        self._keys = itertools.count(1)
        self.restarts = 0
        """Worker processes started again after one ended."""

    def start(self) -> None:
        for index in range(self.processes):
            worker = _Worker(self, index)
            self._workers.append(worker)
            worker.start([])

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [w.proc.pid for w in self._workers]

    def loads(self) -> list[int]:
        """Each worker's load (see ``place``), by index."""
        with self._lock:
            return [w.load for w in self._workers]

    # -- vhost-user-blk slots --

    def place(self, loads: Sequence[int]) -> list[int]:
        """Worker indices for slots carrying ``loads`` (queues), one each: every slot goes,
        heaviest first, to the least loaded worker this call has not used yet (any worker
        once all are used), counting the slots placed before it. Raises ``IOFailure`` when
        the planes are closed."""
        with self._lock:
            if self._closed or not self._workers:
                raise IOFailure("the data planes are stopped", errno.ESHUTDOWN)
            current = [w.load for w in self._workers]
        chosen = [0] * len(loads)
        used: set[int] = set()
        for slot in sorted(range(len(loads)), key=lambda k: -loads[k]):
            free = [i for i in range(len(current)) if i not in used] or list(range(len(current)))
            index = min(free, key=lambda i: (current[i], i))
            chosen[slot] = index
            used.add(index)
            current[index] += loads[slot]
        return chosen

    def serve_slot(
        self, index: int, tenant: PlaneTenant, load: int, config: bytes, fds: Sequence[int]
    ) -> tuple[int, int]:
        """Have worker ``index`` serve a slot (``config``: its ``WorkerConfig`` as JSON, fd
        fields being positions in ``fds``, which stay the caller's). Returns the slot's key
        and the worker's pid. Raises ``IOFailure`` if the worker cannot take it; the slot
        then counts for nothing. A worker that ends later calls ``tenant.plane_lost``."""
        with self._lock:
            if self._closed or not 0 <= index < len(self._workers):
                raise IOFailure("the data planes are stopped", errno.ESHUTDOWN)
            worker = self._workers[index]
            key = next(self._keys)
            self._slots[key] = _SlotDef(worker, tenant, load)
            worker.load += load
        if worker.proc.poll() is None and worker.slot(key, config, fds):
            return key, worker.proc.pid
        self._forget_slot(key)
        raise IOFailure(f"data plane {index} is not running", errno.EIO)

    def drop_slot(self, key: int) -> None:
        """Stop the slot ``key`` (its worker closes its channel once its threads ended);
        no-op for an unknown key (its worker ended)."""
        slot = self._forget_slot(key)
        if slot is not None:
            slot.worker.drop(key)

    def _forget_slot(self, key: int) -> _SlotDef | None:
        with self._lock:
            slot = self._slots.pop(key, None)
            if slot is not None:
                slot.worker.load -= slot.load
            return slot

    def add_export(
        self,
        name: str,
        open_volume: Callable[[], BlockDevice],
        description: str,
        read_only: bool,
        stats: StatsSet | None = None,
    ) -> None:
        """Offer ``name`` to the workers' clients; ``open_volume`` must return ``Volume`` s.
        With ``stats``, each connection counts its requests in a block of that set."""
        export = _ExportDef(name, open_volume, description, read_only, stats)
        with self._lock:
            self._exports[name] = export
            workers = list(self._workers)
        for worker in workers:
            worker.add(export)

    def remove_export(self, name: str, timeout: float = 30.0) -> None:
        """Stop offering ``name`` and end its connections; returns once every volume handle
        they held is closed (so the volume can be rolled back or deleted at once), or logs
        and returns after ``timeout`` seconds."""
        with self._lock:
            self._exports.pop(name, None)
            workers = list(self._workers)
        for worker in workers:
            worker.remove(name)
        with self._lock:
            if not self._planes_closed.wait_for(lambda: not self._planes.get(name), timeout):
                log.error("NBD export %s: its connections did not close in %.0f s", name, timeout)

    def _claim(self, name: str, worker: _Worker) -> _ExportDef | None:
        """The export a connection asks for (the first one for ``""``), counted as held by
        one more connection (of ``worker``) until ``_release``; None if there is none."""
        with self._lock:
            export = self._exports.get(name) if name else next(iter(self._exports.values()), None)
            if export is not None:
                self._planes[export.name] = self._planes.get(export.name, 0) + 1
                worker.load += 1
            return export

    def _release(self, name: str, worker: _Worker) -> None:
        with self._lock:
            worker.load -= 1
            left = self._planes.get(name, 0) - 1
            if left > 0:
                self._planes[name] = left
            else:
                self._planes.pop(name, None)
                self._planes_closed.notify_all()

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
        with self._lock:
            lost = [key for key, slot in self._slots.items() if slot.worker is worker]
        tenants: list[PlaneTenant] = []
        for key in lost:
            slot = self._forget_slot(key)
            if slot is not None and slot.tenant not in tenants:
                tenants.append(slot.tenant)
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
                self.restarts += 1
        if closed:
            new.stop()
            return
        new.start(exports)
        for tenant in tenants:
            threading.Thread(target=tenant.plane_lost, name="plane-lost", daemon=True).start()


# --------------------------------------------------------------------- the process itself


class _Opener:
    """The worker's side of ``OPEN``: asks the daemon, builds the ``RemoteVolume``."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self._ids = itertools.count(1)
        self._waits: dict[int, tuple[threading.Event, list[Frame]]] = {}
        self._waits_lock = threading.Lock()
        self.lost = False

    def open(self, name: str) -> BlockDevice:
        """A ``RemoteVolume``, throttled when the daemon sent a QoS block. Raises
        ``IOFailure`` (the daemon's errno, or EIO once it is gone) or ``LocalFailure`` for an
        answer that breaks the control protocol."""
        ident = next(self._ids) & 0xFFFFFFFF
        done: tuple[threading.Event, list[Frame]] = (threading.Event(), [])
        with self._waits_lock:
            if self.lost:
                raise IOFailure("the daemon is gone", errno.EIO)
            self._waits[ident] = done
        self.link.send(_Op.OPEN, ident, payload=name.encode())
        done[0].wait()
        if not done[1]:
            raise IOFailure("the daemon is gone", errno.EIO)
        frame = done[1][0]
        if frame.a:
            _close_fds(frame.fds)
            raise IOFailure(frame.payload.decode(errors="replace"), frame.a)
        fds = list(frame.fds)
        qos_fd = fds.pop(2) if frame.flags & _QOS and len(fds) > 2 else -1
        if frame.flags & _QOS and qos_fd < 0:
            _close_fds(fds)
            raise LocalFailure("the daemon's answer to OPEN lacks its QoS block")
        stats_fd = fds.pop(2) if frame.flags & _STATS and len(fds) > 2 else -1
        if frame.flags & _STATS and stats_fd < 0:
            _close_fds([*fds, qos_fd] if qos_fd >= 0 else fds)
            raise LocalFailure("the daemon's answer to OPEN lacks its statistics block")
        count = len(fds) - 2
        if count < 0 or len(frame.payload) < count * _INDEX.size:
            _close_fds(frame.fds)
            raise LocalFailure("the daemon's answer to OPEN lacks a plane's fds")
        indices = [index for (index,) in _INDEX.iter_unpack(frame.payload[: count * _INDEX.size])]
        try:
            serial = _text(frame.payload[count * _INDEX.size :], "a serial")
        except LocalFailure:
            _close_fds(frame.fds)
            raise
        channel, map_fd, *backing_fds = fds
        remote = RemoteVolume(
            socket.socket(fileno=channel),
            map_fd,
            dict(zip(indices, backing_fds, strict=True)),
            frame.b,
            read_only=bool(frame.flags & _READ_ONLY),
            serial=serial,
            owns_backings=True,
        )
        device: BlockDevice = remote
        try:
            # each block owns its fd from here on, also when it refuses it
            if qos_fd >= 0:
                fd, qos_fd = qos_fd, -1
                device = ThrottledDevice(remote, QosBlock(fd=fd), owns_qos=True)
            if stats_fd >= 0:
                fd, stats_fd = stats_fd, -1
                device = CountedDevice(device, IoStats(fd=fd), owns_stats=True)
        except StorvisorError:
            _close_fds([fd for fd in (qos_fd, stats_fd) if fd >= 0])
            device.close()
            raise
        return device

    def answered(self, frame: Frame) -> None:
        with self._waits_lock:
            wait = self._waits.pop(frame.ident, None)
        if wait is None:
            _close_fds(frame.fds)
            return
        wait[1].append(frame)
        wait[0].set()

    def fail_all(self) -> None:
        with self._waits_lock:
            self.lost = True
            waits, self._waits = list(self._waits.values()), {}
        for event, _ in waits:
            event.set()


def _start_slot(frame: Frame) -> Slot | None:
    """Serve the slot ``SLOT`` describes (it owns the frame's fds); None if it cannot be
    served: its channel is then closed, which the daemon sees."""
    from storvisor.exports.slots import Slot, SlotConfig  # loaded once needed

    try:
        config = SlotConfig.from_json(_text(frame.payload, "a slot's configuration"))
    except (ValueError, TypeError, KeyError, LocalFailure) as e:
        log.error("slot %d: bad configuration: %s", frame.ident, e)
        _close_fds(frame.fds)
        return None
    try:
        return Slot(config, list(frame.fds))
    except (StorvisorError, OSError, ValueError) as e:
        log.error("%s slot %d did not start: %s", config.kind, frame.ident, e)
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the connections and slots the daemon hands over until the control channel
    closes."""
    from storvisor.exports.nbd import NBDExport, NBDServer  # the data path, loaded here

    args = list(sys.argv[1:] if argv is None else argv)
    # Ctrl-C in the daemon's terminal reaches its whole process group: the daemon stops this
    # process through the control channel, in order
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="data-plane[%(process)d] %(message)s")
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m storvisor.exports.nbd_worker CONTROL-FD", file=sys.stderr)
        return 2
    link = Link(socket.socket(fileno=int(args[0])), max_payload=_MAX_PAYLOAD, max_fds=_MAX_FDS)
    opener = _Opener(link)
    server = NBDServer()
    server.start()
    slots: dict[int, Slot] = {}
    try:
        while True:
            frame = link.receive()
            if frame is None:
                break
            op = frame.op
            if op == _Op.OPENED:
                opener.answered(frame)
                continue
            fds = frame.fds
            if op == _Op.CONN and fds:
                _close_fds(fds[1:])
                server.serve_socket(socket.socket(fileno=fds[0]))
                continue
            if op == _Op.SLOT:
                slot = _start_slot(frame)
                if slot is not None:
                    slots[frame.ident] = slot
                continue
            _close_fds(fds)
            if op == _Op.DROP:
                dropped = slots.pop(frame.ident, None)
                if dropped is not None:  # its threads may be held by a stalled device
                    threading.Thread(target=dropped.close, name="slot-drop", daemon=True).start()
                continue
            if op == _Op.ADD:
                if frame.a > len(frame.payload):
                    raise LocalFailure("ADD: the name is longer than the frame")
                name = _text(frame.payload[: frame.a], "an export name")
                description = _text(frame.payload[frame.a :], "a description")
                with contextlib.suppress(StorvisorError):
                    server.add_export(
                        NBDExport(
                            name,
                            functools.partial(opener.open, name),
                            description=description,
                            read_only=bool(frame.flags & _READ_ONLY),
                        )
                    )
            elif op == _Op.REMOVE:
                with contextlib.suppress(StorvisorError):
                    server.remove_export(_text(frame.payload, "an export name"))
            else:
                raise LocalFailure(f"unexpected control frame {op}")
    except (OSError, LocalFailure) as e:
        log.error("control channel failed: %s", e)
    # the daemon is gone: end at once, answering nothing more
    opener.fail_all()
    os.kill(os.getpid(), signal.SIGKILL)
    return 1


if __name__ == "__main__":
    sys.exit(main())
