"""Consistency check of a pool's committed metadata (``Pool.fsck``).

It reads the catalog tables, not the in-memory copy, so it sees what a restart would see.
Each physical cluster must be referenced by exactly as many map entries as its refcount says
(always one today: a cluster belongs to one layer); every reference must point inside a
device; every layer, parent, volume top and snapshot layer must exist; layer chains must not
loop; every layer must be needed by a volume, a snapshot or a child layer.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

from storvisor.engine.backing import HEADER_BYTES, Header, split_phys
from storvisor.engine.catalog import ZERO, Catalog
from storvisor.engine.types import FsckReport
from storvisor.errors import CorruptMetadata

_LIMIT = 20  # samples listed per kind of dangling reference


@dataclass(frozen=True)
class Memory:
    """The in-memory metadata of an open pool with nothing pending, to compare with the
    catalog: layer -> parent, layer -> clusters it counts as its own, (layer, vc) -> phys,
    volume -> (size, top), snapshot id -> (volume id, name, layer)."""

    layers: dict[int, int | None]
    owned: dict[int, int]
    maps: dict[tuple[int, int], int]
    volumes: dict[str, tuple[int, int]]
    snapshots: dict[int, tuple[int, str, int]]


def check_pool(
    name: str,
    catalog: Catalog,
    devices: dict[int, int],
    headers: dict[int, tuple[str, int]],
    identity: Header,
    memory: Memory | None = None,
) -> FsckReport:
    """Check ``catalog`` against the devices (index -> data clusters), their headers
    (index -> (path, open fd)) and, if given, the pool's in-memory metadata. Reads only."""
    leaked: list[int] = []
    doubly: list[int] = []
    dangling: list[str] = []
    errors: list[str] = []

    def inside(phys: int) -> bool:
        index, local = split_phys(phys)
        return index in devices and local < devices[index]

    refcounts: dict[int, int] = dict(catalog.query("SELECT phys, refs FROM refcount"))
    references: Counter[int] = Counter()
    bad_values: list[tuple[int, int, int]] = []
    layers: dict[int, int | None] = dict(catalog.query("SELECT id, parent FROM layers"))
    map_layers: set[int] = set()
    for layer, vc, phys in catalog.query("SELECT layer, vc, phys FROM map"):
        map_layers.add(layer)
        if phys >= 0:
            references[phys] += 1
        elif phys != ZERO:
            bad_values.append((layer, vc, phys))
        if vc < 0:
            bad_values.append((layer, vc, phys))

    for layer, vc, phys in bad_values[:_LIMIT]:
        errors.append(f"layer {layer}: invalid map entry {vc} -> {phys}")

    outside = sorted(p for p in references if not inside(p))
    for phys in outside[:_LIMIT]:
        dangling.append(f"cluster {phys} referenced by a map lies beyond the pool's devices")
    if len(outside) > _LIMIT:
        dangling.append(f"... and {len(outside) - _LIMIT} more references beyond the devices")
    for phys, count in sorted(references.items()):
        if inside(phys) and count > refcounts.get(phys, 0):
            doubly.append(phys)
    for phys, refs in sorted(refcounts.items()):
        count = references.get(phys, 0)
        if count == 0:
            leaked.append(phys)
        elif refs > count:
            errors.append(f"cluster {phys}: refcount {refs} but {count} reference(s)")
        if not inside(phys):
            dangling.append(f"cluster {phys} is marked used beyond the pool's devices")

    for layer in sorted(map_layers - layers.keys())[:_LIMIT]:
        dangling.append(f"map entries of missing layer {layer}")
    for layer, parent in sorted(layers.items()):
        if parent is not None and parent not in layers:
            dangling.append(f"layer {layer}: parent layer {parent} is missing")

    tops: dict[int, str] = {}
    for vid, vname, top in catalog.query("SELECT id, name, top FROM volumes"):
        if top not in layers:
            dangling.append(f"volume {vname}: top layer {top} is missing")
        elif top in tops:
            errors.append(f"volumes {tops[top]} and {vname} share top layer {top}")
        tops[top] = vname
        del vid
    volume_ids = {vid for (vid,) in catalog.query("SELECT id FROM volumes")}
    snap_layers: set[int] = set()
    for sname, volume, layer in catalog.query("SELECT name, volume, layer FROM snapshots"):
        if layer not in layers:
            dangling.append(f"snapshot {sname}: layer {layer} is missing")
        if volume not in volume_ids:
            errors.append(f"snapshot {sname} belongs to missing volume {volume}")
        if layer in tops:
            errors.append(f"snapshot {sname} shares writable layer {layer} of {tops[layer]}")
        snap_layers.add(layer)

    children: Counter[int] = Counter(p for p in layers.values() if p is not None)
    for top, vname in tops.items():
        if children[top]:
            errors.append(f"writable top layer {top} of volume {vname} has child layers")
    for layer in sorted(layers):
        if layer not in tops and layer not in snap_layers and not children[layer]:
            errors.append(f"layer {layer} is needed by no volume, snapshot or layer")
        seen = {layer}
        parent = layers[layer]
        while parent is not None and parent in layers:
            if parent in seen:
                errors.append(f"layer {layer}: its chain of parents loops")
                break
            seen.add(parent)
            parent = layers[parent]

    for index, (path, fd) in sorted(headers.items()):
        try:
            found = Header.unpack(os.pread(fd, HEADER_BYTES, 0))
        except (OSError, ValueError, CorruptMetadata) as e:
            errors.append(f"device {index} ({path}): header unreadable: {e}")
            continue
        if found is None or (found.pool_uuid, found.index) != (identity.pool_uuid, index):
            errors.append(f"device {index} ({path}): header does not name this pool and index")

    if memory is not None:
        errors.extend(_compare(catalog, memory, layers))

    return FsckReport(
        pool=name,
        clusters_total=sum(devices.values()),
        clusters_used=len(refcounts),
        leaked=tuple(leaked),
        doubly_owned=tuple(doubly),
        dangling=tuple(dangling),
        errors=tuple(errors),
    )


def _compare(catalog: Catalog, memory: Memory, layers: dict[int, int | None]) -> list[str]:
    """Differences between the catalog and the in-memory metadata, a few samples of each."""
    found: list[str] = []
    if layers != memory.layers:
        found.append("in-memory layers differ from the catalog")
    counted = Counter(layer for (layer, _), phys in memory.maps.items() if phys >= 0)
    for layer, owned in sorted(memory.owned.items()):
        if owned != counted[layer]:
            found.append(f"layer {layer}: counts {owned} clusters but maps {counted[layer]}")
    rows = {(layer, vc): phys for layer, vc, phys in catalog.query("SELECT * FROM map")}
    if rows != memory.maps:
        differ = sorted(
            k for k in rows.keys() | memory.maps.keys() if rows.get(k) != memory.maps.get(k)
        )
        for layer, vc in differ[:_LIMIT]:
            found.append(
                f"layer {layer} cluster {vc}: {memory.maps.get((layer, vc))} in memory, "
                f"{rows.get((layer, vc))} in the catalog"
            )
    volumes = {
        n: (size, top) for n, size, top in catalog.query("SELECT name, size, top FROM volumes")
    }
    if volumes != memory.volumes:
        found.append("in-memory volumes differ from the catalog")
    snapshots = {
        sid: (volume, sname, layer)
        for sid, volume, sname, layer in catalog.query(
            "SELECT id, volume, name, layer FROM snapshots"
        )
    }
    if snapshots != memory.snapshots:
        found.append("in-memory snapshots differ from the catalog")
    return found
