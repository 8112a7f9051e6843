"""The copy-on-write layers of a pool: their maps, chains, and the collection of unneeded ones.

A layer maps virtual clusters to physical clusters or to ``ZERO`` (an explicit zero that hides
the parents' data). A chain runs from a volume's top layer through its parents; the first
layer that maps a virtual cluster decides what it reads. Every change made here is recorded in
the ``Batch`` the caller passes (the pool's pending batch), so the catalog follows the memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from storvisor.engine.catalog import ZERO, Batch
from storvisor.errors import CorruptMetadata


@dataclass
class Layer:
    id: int
    parent: int | None
    map: dict[int, int] = field(default_factory=dict)
    owned: int = 0  # entries of ``map`` that are clusters (not ``ZERO``)


class LayerTree:
    """All layers of one pool. Not thread-safe: the pool's lock guards every call."""

    def __init__(self, pool_name: str) -> None:
        self.pool_name = pool_name
        self.layers: dict[int, Layer] = {}

    def __getitem__(self, lid: int) -> Layer:
        return self.layers[lid]

    def load(self, layers: list[tuple[int, int | None]], rows: list[tuple[int, int, int]]) -> None:
        """Fill from catalog rows; map rows of unknown layers are ignored (fsck reports them)."""
        for lid, parent in layers:
            self.layers[lid] = Layer(lid, parent)
        for lid, vc, phys in rows:
            layer = self.layers.get(lid)
            if layer is not None:
                layer.map[vc] = phys
                layer.owned += phys >= 0

    def new(self, batch: Batch, lid: int, parent: int | None) -> int:
        """Create an empty layer ``lid`` over ``parent``."""
        self.layers[lid] = Layer(lid, parent)
        batch.statements.append(("INSERT INTO layers VALUES (?, ?)", (lid, parent)))
        return lid

    def set_entry(self, batch: Batch, lid: int, vc: int, value: int | None) -> None:
        """Map ``vc`` of layer ``lid`` to a cluster, to ``ZERO`` or to nothing (None). A
        cluster it mapped before is released; a new cluster is recorded as allocated."""
        layer = self.layers[lid]
        old = layer.map.get(vc)
        if old is not None and old >= 0:
            layer.owned -= 1
            if old != value:
                batch.frees.append(old)
        if value is None:
            layer.map.pop(vc, None)
        else:
            layer.map[vc] = value
            if value >= 0:
                layer.owned += 1
                if value != old:
                    batch.allocs.append(value)
        batch.maps[(lid, vc)] = value

    def cut(self, batch: Batch, lid: int) -> int | None:
        """Detach layer ``lid`` from its parent (after a flatten copied what it read from
        there); drops its now useless explicit zeros. Returns the former parent."""
        layer = self.layers[lid]
        parent, layer.parent = layer.parent, None
        batch.statements.append(("UPDATE layers SET parent = NULL WHERE id = ?", (lid,)))
        for vc in [vc for vc, phys in layer.map.items() if phys == ZERO]:
            self.set_entry(batch, lid, vc, None)
        return parent

    def chain(self, top: int) -> Iterator[Layer]:
        """The layers from ``top`` down to its base. Raises ``CorruptMetadata`` for a missing
        layer or a loop."""
        seen: set[int] = set()
        lid: int | None = top
        while lid is not None:
            if lid in seen:
                raise CorruptMetadata(f"pool {self.pool_name!r}: layer {lid} is in a cycle")
            seen.add(lid)
            layer = self.layers.get(lid)
            if layer is None:
                raise CorruptMetadata(f"pool {self.pool_name!r}: layer {lid} is missing")
            yield layer
            lid = layer.parent

    def owned(self, lid: int) -> int:
        """Clusters layer ``lid`` maps (its own, not its parents')."""
        return self.layers[lid].owned

    def release(self, batch: Batch, lid: int | None, named: Callable[[int], bool]) -> None:
        """Drop one reference to a layer (a volume's top, a snapshot, a child) and collect what
        is no longer needed. A layer ``named`` (by a volume or snapshot) stays; otherwise one
        nothing depends on is freed (and its parent looked at in turn), one with a single
        child is merged into it, and one with several children stays hidden."""
        while lid is not None:
            if named(lid):
                return
            layer = self.layers[lid]
            children = [c for c in self.layers.values() if c.parent == lid]
            if len(children) > 1:
                return
            if children:
                self._merge_into(batch, layer, children[0])
                return
            batch.frees.extend(phys for phys in layer.map.values() if phys >= 0)
            self._drop(batch, layer)
            lid = layer.parent

    def _merge_into(self, batch: Batch, layer: Layer, child: Layer) -> None:
        for vc, phys in layer.map.items():
            if vc in child.map:
                if phys >= 0:
                    batch.frees.append(phys)  # shadowed by the child
            else:
                child.map[vc] = phys
                child.owned += phys >= 0
                batch.maps[(child.id, vc)] = phys
        child.parent = layer.parent
        batch.statements.append(
            ("UPDATE layers SET parent = ? WHERE id = ?", (child.parent, child.id))
        )
        self._drop(batch, layer)

    def _drop(self, batch: Batch, layer: Layer) -> None:
        for vc in layer.map:
            batch.maps.pop((layer.id, vc), None)
        del self.layers[layer.id]
        batch.statements.append(("DELETE FROM map WHERE layer = ?", (layer.id,)))
        batch.statements.append(("DELETE FROM layers WHERE id = ?", (layer.id,)))
