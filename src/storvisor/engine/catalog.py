"""The SQLite catalog of one pool: devices, layers, cluster maps, refcounts, volumes, snapshots.

Theory of operation
-------------------
The catalog is the durable copy of the pool's metadata; the pool keeps all of it in memory and
records every change in a ``Batch``. ``Catalog.apply`` writes one batch in one transaction
(WAL journal, ``synchronous=FULL``), so a crash leaves either all of a batch or none of it.

Tables::

    meta(key, value)                      uuid, name, cluster_size, format
    devices(idx, path, created)           backing devices; idx is the header's device index
    layers(id, parent)                    a layer is one level of a copy-on-write chain
    map(layer, vc, phys)                  virtual cluster -> physical cluster; phys = -1 is an
                                          explicit zero (hides the parents' data)
    refcount(phys, refs)                  physical clusters in use and how many maps hold each
    volumes(id, name, size, top, origin, origin_snap, serial, created)
    snapshots(id, volume, name, layer, size, created)

A volume's data is its ``top`` layer over the chain of parents; a snapshot freezes a layer.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storvisor.errors import CorruptMetadata, IOFailure

ZERO = -1
"""``map.phys`` value of an explicit zero mapping."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    idx INTEGER PRIMARY KEY, path TEXT NOT NULL, created INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS layers (id INTEGER PRIMARY KEY, parent INTEGER);
CREATE TABLE IF NOT EXISTS map (
    layer INTEGER NOT NULL, vc INTEGER NOT NULL, phys INTEGER NOT NULL,
    PRIMARY KEY (layer, vc)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS refcount (phys INTEGER PRIMARY KEY, refs INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS volumes (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, size INTEGER NOT NULL,
    top INTEGER NOT NULL, origin TEXT, origin_snap INTEGER, serial TEXT NOT NULL,
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY, volume INTEGER NOT NULL, name TEXT NOT NULL,
    layer INTEGER NOT NULL, size INTEGER NOT NULL, created REAL NOT NULL,
    UNIQUE (volume, name));
"""

Row = tuple[Any, ...]


@dataclass
class Batch:
    """Metadata changes not yet committed, in the order they must be applied.

    ``statements`` are catalog rows (volumes, snapshots, layers, devices) as SQL; ``maps``
    holds the final value of each changed map entry (None deletes it); ``allocs`` and
    ``frees`` are physical clusters entering and leaving use.
    """

    statements: list[tuple[str, Row]] = field(default_factory=list)
    maps: dict[tuple[int, int], int | None] = field(default_factory=dict)
    allocs: list[int] = field(default_factory=list)
    frees: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.statements or self.maps or self.allocs or self.frees)

    def absorb(self, newer: Batch) -> None:
        """Append a newer batch to this one (a failed commit is retried with later changes)."""
        self.statements.extend(newer.statements)
        self.maps.update(newer.maps)
        self.allocs.extend(newer.allocs)
        self.frees.extend(newer.frees)


class Catalog:
    """One pool's SQLite database. Not thread-safe: the pool serialises every call."""

    def __init__(self, path: Path) -> None:
        try:
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
        except sqlite3.Error as e:
            raise CorruptMetadata(f"cannot open catalog {path}: {e}") from e
        self.path = path

    @property
    def changes(self) -> int:
        """Rows inserted, updated or deleted through this connection since it was opened."""
        return self._db.total_changes

    def query(self, sql: str, params: Row = ()) -> list[Row]:
        try:
            return self._db.execute(sql, params).fetchall()
        except sqlite3.Error as e:
            raise CorruptMetadata(f"catalog query failed: {e}") from e

    def meta(self) -> dict[str, str]:
        return {k: v for k, v in self.query("SELECT key, value FROM meta")}

    def apply(self, batch: Batch) -> None:
        """Commit ``batch`` in one transaction. Raises ``IOFailure`` and leaves the catalog
        unchanged if the transaction fails."""
        upserts = [(lv[0], lv[1], p) for lv, p in batch.maps.items() if p is not None]
        deletes = [lv for lv, p in batch.maps.items() if p is None]
        try:
            with self._transaction() as db:
                for sql, params in batch.statements:
                    db.execute(sql, params)
                db.executemany("INSERT OR REPLACE INTO map VALUES (?, ?, ?)", upserts)
                db.executemany("DELETE FROM map WHERE layer = ? AND vc = ?", deletes)
                db.executemany(
                    "INSERT OR REPLACE INTO refcount VALUES (?, 1)", [(p,) for p in batch.allocs]
                )
                db.executemany("DELETE FROM refcount WHERE phys = ?", [(p,) for p in batch.frees])
        except sqlite3.Error as e:
            raise IOFailure(f"metadata commit failed: {e}") from e

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()
