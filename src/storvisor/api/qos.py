"""Named QoS specs, the QoS of each volume, their persistence in HOME, and the live buckets.

Theory of operation
-------------------
Like Cinder, storvisor keeps *named* QoS specs (``storvisor qos create gold
total_iops_sec=1000``) and gives each volume either one of them or one-off keys of its own.
Both are kept in ``HOME/qos.json`` (written to a temporary file, fsynced and renamed over the
old one, so a crash leaves the old or the new document): restarting the daemon restores them.

While the daemon runs, every exported volume has one ``QosBlock`` (``engine/qos.py``): the
shared memory every connection, queue and data-plane process serving the volume draws its
tokens from. ``QosManager.block`` creates it when the volume's first export opens a handle and
writes the volume's limits into it; a change of the volume's QoS, of the spec it names, or of
its size (``_per_gb`` keys) rewrites the limits in place, so running exports follow at their
next request.

A volume's QoS names its spec; deleting a spec still named by a volume is refused
(``Conflict``). Deleting a volume forgets its QoS.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from storvisor.api.codec import decode_list, encode, save_json
from storvisor.engine.qos import QosBlock, QosSpec
from storvisor.errors import Conflict, CorruptMetadata, InvalidArgument, NotFound, ProtocolError

QOS_FILE = "qos.json"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True, slots=True)
class QosKey:
    """One QoS key and its value, as text (``"1000"``, ``"1.5"``)."""

    key: str
    value: str


@dataclass(frozen=True, slots=True)
class QosSpecInfo:
    """A named QoS spec."""

    name: str
    keys: tuple[QosKey, ...]


@dataclass(frozen=True, slots=True)
class VolumeQos:
    """The QoS of one volume: the spec it names (``spec``) or its one-off keys; ``keys`` are
    the keys in force either way (none: unlimited)."""

    pool: str
    volume: str
    spec: str | None
    keys: tuple[QosKey, ...]


def _text(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


def _keys(spec: QosSpec) -> tuple[QosKey, ...]:
    return tuple(QosKey(k, _text(v)) for k, v in spec.values)


def parse_keys(keys: Sequence[QosKey]) -> QosSpec:
    """Validate ``keys``; ``InvalidArgument`` naming the key (a key twice included)."""
    seen: dict[str, str] = {}
    for item in keys:
        if item.key in seen:
            raise InvalidArgument(f"QoS key {item.key} given twice")
        seen[item.key] = item.value
    return QosSpec.parse(seen)


def check_qos_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise InvalidArgument(
            f"invalid QoS spec name {name!r}: use letters, digits and . _ - "
            "(up to 64, starting with a letter or digit)"
        )
    return name


@dataclass(frozen=True, slots=True)
class _Document:
    specs: tuple[QosSpecInfo, ...] = ()
    volumes: tuple[VolumeQos, ...] = ()


class QosStore:
    """``HOME/qos.json``. Not thread-safe: the service serialises calls."""

    def __init__(self, home: Path) -> None:
        self._path = home / QOS_FILE

    def load(self) -> tuple[list[QosSpecInfo], list[VolumeQos]]:
        """Raises ``CorruptMetadata`` if the file cannot be parsed."""
        try:
            text = self._path.read_text()
        except FileNotFoundError:
            return [], []
        try:
            doc = json.loads(text)
            specs = decode_list(QosSpecInfo, doc["specs"])
            volumes = decode_list(VolumeQos, doc["volumes"])
            for spec in specs:
                parse_keys(spec.keys)
            for vol in volumes:
                parse_keys(vol.keys)
        except (ValueError, KeyError, TypeError, ProtocolError, InvalidArgument) as e:
            raise CorruptMetadata(f"{self._path}: unreadable QoS definitions: {e}") from e
        return specs, volumes

    def save(self, specs: list[QosSpecInfo], volumes: list[VolumeQos]) -> None:
        """Replace the document atomically (temporary file, fsync, rename, fsync of HOME)."""
        save_json(self._path, {"version": 1, "specs": encode(specs), "volumes": encode(volumes)})


SizeOf = Callable[[str, str], int]
"""``(pool, volume) -> size in bytes`` (raises ``NotFound``)."""


class QosManager:
    """QoS specs, volume QoS and the live ``QosBlock`` of each served volume.

    ``size_of`` gives a volume's size (for ``_per_gb`` keys). Not thread-safe: the service
    serialises calls. Every change is saved before it is applied: when ``save`` fails
    (``OSError``) nothing changed.
    """

    def __init__(self, home: Path, size_of: SizeOf) -> None:
        self._store = QosStore(home)
        specs, volumes = self._store.load()
        self._specs = {s.name: s for s in specs}
        self._volumes = {(v.pool, v.volume): v for v in volumes}
        self._size_of = size_of
        self._blocks: dict[tuple[str, str], QosBlock] = {}

    # -- named specs --

    def create_spec(self, name: str, keys: Sequence[QosKey]) -> QosSpecInfo:
        """``Conflict`` if the name is taken; ``InvalidArgument`` for a bad name or key."""
        check_qos_name(name)
        spec = parse_keys(keys)
        if name in self._specs:
            raise Conflict(f"QoS spec {name!r} already exists")
        info = QosSpecInfo(name, _keys(spec))
        self._save({**self._specs, name: info}, self._volumes)
        self._specs[name] = info
        return info

    def specs(self) -> list[QosSpecInfo]:
        return sorted(self._specs.values(), key=lambda s: s.name)

    def spec(self, name: str) -> QosSpecInfo:
        try:
            return self._specs[name]
        except KeyError:
            raise NotFound(f"no QoS spec named {name!r}") from None

    def delete_spec(self, name: str) -> None:
        """``NotFound``; ``Conflict`` while a volume names it."""
        self.spec(name)
        users = sorted(f"{p}/{v}" for (p, v), q in self._volumes.items() if q.spec == name)
        if users:
            raise Conflict(
                f"QoS spec {name!r} is used by {', '.join(users)}; "
                "set another QoS on them first (volume set-qos)"
            )
        specs = {k: v for k, v in self._specs.items() if k != name}
        self._save(specs, self._volumes)
        self._specs = specs

    # -- volumes --

    def volume(self, pool: str, volume: str) -> VolumeQos:
        """The volume's QoS (the caller checks the volume exists)."""
        found = self._volumes.get((pool, volume))
        if found is None:
            return VolumeQos(pool, volume, None, ())
        if found.spec is not None:
            return VolumeQos(pool, volume, found.spec, self.spec(found.spec).keys)
        return found

    def set_volume(
        self, pool: str, volume: str, *, spec: str | None = None, keys: Sequence[QosKey] = ()
    ) -> VolumeQos:
        """Give the volume the named ``spec``, or the one-off ``keys`` (none: unlimited).
        Applies at once to its running exports. ``NotFound`` for an unknown spec,
        ``InvalidArgument`` for both a spec and keys, or a bad key."""
        if spec is not None and keys:
            raise InvalidArgument("give a QoS spec name or keys, not both")
        if spec is not None:
            self.spec(spec)
            entry: VolumeQos | None = VolumeQos(pool, volume, spec, ())
        else:
            parsed = parse_keys(keys)
            entry = VolumeQos(pool, volume, None, _keys(parsed)) if parsed.values else None
        volumes = {k: v for k, v in self._volumes.items() if k != (pool, volume)}
        if entry is not None:
            volumes[(pool, volume)] = entry
        self._save(self._specs, volumes)
        self._volumes = volumes
        self.refresh(pool, volume)
        return self.volume(pool, volume)

    def forget_volume(self, pool: str, volume: str) -> None:
        """The volume is gone: drop its QoS and its block."""
        if (pool, volume) in self._volumes:
            volumes = {k: v for k, v in self._volumes.items() if k != (pool, volume)}
            self._save(self._specs, volumes)
            self._volumes = volumes
        block = self._blocks.pop((pool, volume), None)
        if block is not None:
            block.close()

    # -- live buckets --

    def block(self, pool: str, volume: str) -> QosBlock:
        """The volume's shared buckets (created with its current limits on first use)."""
        block = self._blocks.get((pool, volume))
        if block is None:
            block = QosBlock(name=f"{pool}-{volume}")
            self._blocks[(pool, volume)] = block
            self.refresh(pool, volume)
        return block

    def refresh(self, pool: str, volume: str) -> None:
        """Rewrite the volume's limits into its block, if it has one (after a change of its
        QoS or its size)."""
        block = self._blocks.get((pool, volume))
        if block is None:
            return
        spec = parse_keys(self.volume(pool, volume).keys)
        block.set_limits(spec.limits(self._size_of(pool, volume)))

    def waited(self) -> list[tuple[str, str, float]]:
        """``(pool, volume, seconds)``: how long requests waited for each volume's tokens, for
        the volumes that have a block (those served since the daemon started)."""
        return [(pool, vol, block.waited) for (pool, vol), block in sorted(self._blocks.items())]

    def close(self) -> None:
        for block in self._blocks.values():
            block.close()
        self._blocks.clear()

    def _save(
        self, specs: dict[str, QosSpecInfo], volumes: dict[tuple[str, str], VolumeQos]
    ) -> None:
        self._store.save(
            sorted(specs.values(), key=lambda s: s.name),
            sorted(volumes.values(), key=lambda v: (v.pool, v.volume)),
        )
