"""Fetching an imported S3 pool's objects into its local image while the pool serves.

Theory of operation
-------------------
An import (``engine/object_pool.py``) records which data objects the bucket holds in
``HOME/pools/NAME/hydrate.pending`` and opens the pool at once, over a sparse local image
that holds none of them yet (``engine/object_backing.py``). A ``Hydration`` then makes the
image whole:

* background threads (``FETCH_THREADS``) fetch the objects in order of their index and write
  each into the image;
* a read or write of the image by the pool's process first fetches the objects it touches
  that are still missing, or waits for the thread already fetching one (``ensure``: the
  object router ``_Tracker`` calls it). The background starts no fetch while such a fetch
  runs: a guest's request shares the link with the fetches already under way only. So a
  write never lands in an object that a fetch would then overwrite, and a read never sees
  a hole where the bucket holds data. Data
  planes send their reads and writes to the pool's process meanwhile (``missing``, see
  ``VolumeState.reads_here``);
* an object is *recorded* in the append-only log ``hydrate.done`` only after the image was
  synced with its bytes in it: a sync of the pool records every object fetched before the
  sync began (``fetched``, then ``record``), and the background records its own fetches in
  batches. After a crash, an object the log does not hold is fetched again over whatever its
  local bytes are: a fetch cut short, or writes no flush covered (a flushed write went to an
  object fetched before that flush, so recorded by it);
* when every object is fetched and recorded, ``hydrate.pending`` then ``hydrate.done`` are
  removed, and the pool is told (``on_complete``) that its planes may read the image
  directly again.

Until then, the object backing never compares or uploads an object still missing: the bucket
holds exactly its bytes.

A cache tier reads and writes the image without the router: attaching or opening one first
waits for the whole image (``finish``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import struct
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from storvisor.engine.backing import sync_directory
from storvisor.engine.s3 import Bucket, data_key
from storvisor.errors import CorruptMetadata, IOFailure

log = logging.getLogger(__name__)

PENDING_NAME = "hydrate.pending"
DONE_NAME = "hydrate.done"
FETCH_THREADS = 16
RECORD_EVERY = 32
"""Objects the background fetches between two syncs and records of the image."""
RETRY_DELAY = 1.0
"""Seconds a background thread waits after a failed fetch before the next."""
_RECORD = struct.Struct("<QI")  # object index, CRC-32 of the index's 8 bytes


def prepare(directory: Path, objects: Iterable[int]) -> None:
    """Record that the image in ``directory`` lacks ``objects`` (durable on return)."""
    path = directory / PENDING_NAME
    tmp = directory / (PENDING_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(sorted(objects), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(directory / DONE_NAME)  # a log of an earlier import is not this one's
    sync_directory(directory)


def _record(index: int) -> bytes:
    raw = index.to_bytes(8, "little")
    return _RECORD.pack(index, zlib.crc32(raw))


def _recorded(raw: bytes) -> tuple[set[int], int]:
    """The indexes the log records, and the length of its intact part: the records up to
    the first one a crash left torn (the log is cut there before records are appended)."""
    out: set[int] = set()
    usable = len(raw) - len(raw) % _RECORD.size
    length = 0
    for index, crc in _RECORD.iter_unpack(raw[:usable]):
        if zlib.crc32(index.to_bytes(8, "little")) != crc:
            break
        out.add(index)
        length += _RECORD.size
    return out, length


class Hydration:
    """The objects of ``bucket`` still to fetch into the image ``directory / data_name``
    (module docstring). ``load`` returns None when nothing is left. Thread-safe."""

    def __init__(
        self,
        directory: Path,
        image: Path,
        bucket: Bucket,
        object_size: int,
        missing: set[int],
    ) -> None:
        self._directory = directory
        self._bucket = bucket
        self._object_size = object_size
        try:
            self._fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)  # never routed: not pio's
            self._log = os.open(
                directory / DONE_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        except OSError as e:
            if getattr(self, "_fd", -1) >= 0:
                os.close(self._fd)
            raise IOFailure(f"cannot open {image}: {e.strerror}", e.errno or errno.EIO) from e
        self._cond = threading.Condition()
        self._todo = sorted(missing)  # the background's order; claimed ones are skipped
        self._next = 0
        self._pending = set(missing)  # neither fetched nor being fetched
        self._fetching: set[int] = set()
        self._unrecorded: set[int] = set()  # fetched, not in the log yet
        self._demand = 0  # fetches that requests wait for (the background holds back)
        self._finishing = threading.Lock()  # held by the background thread that completes
        self._record_lock = threading.Lock()  # one sync and append of the log at a time
        self._buffers = threading.local()
        self._fd_users = 0  # threads using the fds (``_open_fds``): ``close`` waits for them
        self.missing = bool(missing)
        """Whether an object is not in the image yet (read without the lock: a hint that
        only ever turns false)."""
        self.total = len(missing)
        self._complete = False
        self._claimed = False  # a thread is completing (``_complete_once``)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.failure: IOFailure | None = None
        """The last failed background fetch (cleared by the next success)."""
        self.on_complete: Callable[[], None] = lambda: None
        """Called once the image is whole, from a thread that holds no lock of the pool's
        (it must take none: ``close`` may wait for that thread under them)."""

    @classmethod
    def load(
        cls, directory: Path, image: Path, bucket: Bucket, object_size: int
    ) -> Hydration | None:
        """The hydration left in ``directory`` (None: the image is whole). Raises
        ``CorruptMetadata``, ``IOFailure``."""
        try:
            raw = (directory / PENDING_NAME).read_text(encoding="utf-8")
        except FileNotFoundError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(directory / DONE_NAME)  # the removal was cut between the two
            return None
        except OSError as e:
            raise IOFailure(f"cannot read {directory / PENDING_NAME}: {e.strerror}") from e
        try:
            listed = json.loads(raw)
            objects = {int(i) for i in listed}
        except (ValueError, TypeError) as e:
            raise CorruptMetadata(f"{directory / PENDING_NAME} is unreadable: {e}") from e
        log_path = directory / DONE_NAME
        try:
            records = log_path.read_bytes()
            done, length = _recorded(records)
            if length < len(records):
                os.truncate(log_path, length)
        except FileNotFoundError:
            done = set()
        except OSError as e:
            raise IOFailure(f"cannot read {log_path}: {e.strerror}") from e
        hydration = cls(directory, image, bucket, object_size, objects - done)
        hydration.total = len(objects)
        return hydration

    @property
    def done(self) -> bool:
        """Every object is fetched and recorded (the files are gone)."""
        return self._complete

    def absent(self) -> set[int]:
        """The objects not in the image (yet, or not whole: being fetched)."""
        with self._cond:
            return self._pending | self._fetching

    @property
    def left(self) -> int:
        """Objects not fetched yet."""
        with self._cond:
            return len(self._pending) + len(self._fetching)

    def start(self) -> None:
        """Start the background fetches (they complete the hydration); idempotent."""
        if self._threads:
            return
        for n in range(FETCH_THREADS):
            thread = threading.Thread(target=self._background, name=f"hydrate-{n}", daemon=True)
            self._threads.append(thread)
            thread.start()

    # ------------------------------------------------------------------------- fetching

    def ensure(self, offset: int, length: int) -> None:
        """Return once the objects holding bytes ``[offset, offset + length)`` of the image
        are in it: fetch those still missing here, wait for those another thread fetches.
        Raises ``IOFailure`` (the fetch failed; the object stays missing)."""
        if not self.missing or length <= 0:
            return
        first = offset // self._object_size
        last = (offset + length - 1) // self._object_size
        wanted = range(first, last + 1)
        while True:
            with self._cond:
                mine = [i for i in wanted if i in self._pending]
                self._pending.difference_update(mine)
                self._fetching.update(mine)
                self._demand += 1
            try:
                for n, index in enumerate(mine):
                    try:
                        self._fetch(index)
                    except BaseException:
                        self._give_back(mine[n:])
                        raise
            finally:
                with self._cond:
                    self._demand -= 1
                    self._cond.notify_all()
            with self._cond:
                while any(i in self._fetching for i in wanted):
                    self._cond.wait()
                if not any(i in self._pending for i in wanted):
                    return  # else another thread's fetch failed: try it here

    def _fetch(self, index: int) -> None:
        """Fetch claimed object ``index`` into the image; mark it fetched."""
        size = self._object_size
        buf = self._buffer()
        found = self._bucket.get_into(data_key(index), buf)
        if found is None:  # deleted since: zeros
            buf[:] = bytes(size)
        length = size if found is None else found[0]
        with self._open_fds() as (fd, _):
            try:
                os.pwrite(fd, buf[:length], index * size)
            except OSError as e:
                raise IOFailure(
                    f"write of the local image: {e.strerror}", e.errno or errno.EIO
                ) from e
        with self._cond:
            self._fetching.discard(index)
            self._unrecorded.add(index)
            if not self._pending and not self._fetching:
                self.missing = False
            self._cond.notify_all()

    def _buffer(self) -> memoryview:
        """This thread's buffer of one object, reused for each fetch (4 MiB allocated for
        each would cost page faults on fresh memory every time)."""
        buf: memoryview | None = getattr(self._buffers, "buf", None)
        if buf is None:
            buf = self._buffers.buf = memoryview(bytearray(self._object_size))
        return buf

    def _give_back(self, indexes: list[int]) -> None:
        with self._cond:
            for index in indexes:
                if index in self._fetching:
                    self._fetching.discard(index)
                    self._pending.add(index)
            self._cond.notify_all()

    def _claim_next(self, *, background: bool = False) -> int | None:
        with self._cond:
            while background and self._demand and not self._stop.is_set():
                self._cond.wait(RETRY_DELAY)
            if self._stop.is_set():
                return None
            while self._next < len(self._todo):
                index = self._todo[self._next]
                self._next += 1
                if index in self._pending:
                    self._pending.discard(index)
                    self._fetching.add(index)
                    return index
            for index in sorted(self._pending):  # given back after a failed fetch
                self._pending.discard(index)
                self._fetching.add(index)
                return index
            return None

    def _background(self) -> None:
        fetched = 0
        while not self._stop.is_set():
            index = self._claim_next(background=True)
            if index is None:
                with self._cond:
                    if not self._pending and not self._fetching:
                        break
                    if not self._pending:  # a request's fetch runs: it may give it back
                        self._cond.wait(RETRY_DELAY)
                continue
            try:
                self._fetch(index)
            except Exception as e:  # the bucket's client may be closed under it
                self._give_back([index])
                if self._stop.is_set():
                    return
                if not isinstance(e, IOFailure):
                    raise
                self.failure = e
                log.warning("%s: fetch of object %d failed: %s", self._directory, index, e)
                self._stop.wait(RETRY_DELAY)
                continue
            self.failure = None
            fetched += 1
            if fetched % RECORD_EVERY == 0:
                self._try_sync_and_record()
        if not self._finishing.acquire(blocking=False):
            return  # another background thread records the last fetches
        while not self._stop.is_set():
            self._try_sync_and_record()
            if self._complete_once():
                return
            self._stop.wait(RETRY_DELAY)  # the image did not sync: again

    def finish(self) -> None:
        """Fetch every missing object (here and in the background, started if it was
        not), sync and record them. Raises ``IOFailure``."""
        self.start()
        while True:
            index = self._claim_next()
            if index is None:
                break
            try:
                self._fetch(index)
            except BaseException:
                self._give_back([index])
                raise
        with self._cond:
            while self._fetching:
                self._cond.wait()
            if self._pending:
                raise IOFailure(f"{self._directory}: objects still missing", errno.EIO)
        self._sync_and_record()
        self._complete_once()

    # ------------------------------------------------------------------------ recording

    def fetched(self) -> set[int]:
        """The objects fetched and not recorded yet: take them before a sync of the image
        begins, ``record`` them once it succeeded."""
        with self._cond:
            return set(self._unrecorded)

    def record(self, indexes: set[int]) -> None:
        """Append ``indexes`` (fetched before a sync of the image that succeeded) to the log,
        durably. Raises ``IOFailure``."""
        if not indexes:
            return
        with self._record_lock:
            with self._cond:
                indexes = indexes & self._unrecorded
            if not indexes:
                return
            try:
                with self._open_fds() as (_, log_fd):
                    os.write(log_fd, b"".join(_record(i) for i in sorted(indexes)))
                    os.fdatasync(log_fd)
            except OSError as e:
                raise IOFailure(
                    f"cannot record fetched objects in {self._directory / DONE_NAME}: {e.strerror}",
                    e.errno or errno.EIO,
                ) from e
            with self._cond:
                self._unrecorded -= indexes

    def _sync_and_record(self) -> None:
        """Sync the image, then record what was fetched before the sync. Raises
        ``IOFailure``."""
        batch = self.fetched()
        if not batch:
            return
        try:
            with self._open_fds() as (fd, _):
                os.fdatasync(fd)
        except OSError as e:
            raise IOFailure(f"sync of the local image: {e.strerror}", e.errno or errno.EIO) from e
        self.record(batch)

    def _try_sync_and_record(self) -> None:
        """``_sync_and_record``; on failure the pool's next sync records them."""
        try:
            self._sync_and_record()
        except IOFailure as e:
            log.warning("%s: cannot record fetched objects: %s", self._directory, e)

    def _complete_once(self) -> bool:
        """Once every object is fetched and recorded, drop the files and tell the pool
        (``on_complete``, once); whether that happened, now or before."""
        with self._cond:
            if self._complete:
                return True
            if self._claimed or self._pending or self._fetching or self._unrecorded:
                return False
            self._claimed = True  # by this thread: ``done`` once the files are gone
        try:
            os.unlink(self._directory / PENDING_NAME)
            sync_directory(self._directory)
            os.unlink(self._directory / DONE_NAME)
        except OSError as e:  # the next open finds everything recorded and completes
            log.warning("%s: cannot remove the hydration's files: %s", self._directory, e)
        with self._cond:
            self._complete = True
        log.info("%s: every object of the bucket is in the local image", self._directory)
        self.on_complete()
        return True

    # ------------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Stop the background and record what was fetched if the image syncs. Fetches
        under way are abandoned (a slow link never holds a close): their objects stay
        missing for the next open."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._try_sync_and_record()
        with self._cond:
            fds, (self._fd, self._log) = (self._fd, self._log), (-1, -1)
            while self._fd_users:  # a write or sync of the image under way
                self._cond.wait()
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    @contextlib.contextmanager
    def _open_fds(self) -> Iterator[tuple[int, int]]:
        """``(image fd, log fd)``, kept open until the block ends. Raises ``IOFailure``
        once closed."""
        with self._cond:
            if self._fd < 0:
                raise IOFailure(f"{self._directory}: the pool closed", errno.ESHUTDOWN)
            self._fd_users += 1
            fds = self._fd, self._log
        try:
            yield fds
        finally:
            with self._cond:
                self._fd_users -= 1
                if not self._fd_users:
                    self._cond.notify_all()
