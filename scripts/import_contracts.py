"""An import-linter contract type for what imports alone cannot show: a package's private
names stay inside it.

``private_names`` (configured in pyproject.toml): each of ``packages`` (e.g.
``storvisor.engine``) owns the names with a leading underscore that its modules bind (a
function, class, module-level name, import alias, or ``self._x`` / ``cls._x`` attribute).
A module outside a package may not

* read or assign an attribute with such a name (``volume._state``) unless its own package
  binds that name too, nor
* import such a name from a module of the package (``from storvisor.engine.sharedmap
  import _EPOCH_SHIFT``).

So what a layer keeps private (the engine's volume state, its shared-map word layout) can
only be reached through its public names. Names are matched by spelling, without type
inference: a name that two packages both bind is not checked between them. Modules in none
of ``packages`` each count as a package of their own. Dunder names (``__x__``) and ``_``
are public.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import grimp
from importlinter import Contract, ContractCheck, fields, output


@dataclass(frozen=True, order=True)
class Reach:
    """One use of a name private to another package."""

    module: str
    line: int
    name: str
    owners: tuple[str, ...]
    imported: bool


class PrivateNamesContract(Contract):
    type_name = "private_names"

    packages = fields.ListField(subfield=fields.StringField())

    def check(self, graph: grimp.ImportGraph, verbose: bool) -> ContractCheck:
        packages: list[str] = list(self.packages)  # type: ignore[call-overload]
        roots = {p.split(".")[0] for p in packages}

        def owner(module: str) -> str:
            for package in packages:
                if module == package or module.startswith(package + "."):
                    return package
            return module

        sources = {}
        for module in sorted(graph.modules):
            found = _source(module) if module.split(".")[0] in roots else None
            if found is not None:
                sources[module] = found
        trees = {m: ast.parse(path.read_text(), str(path)) for m, (path, _) in sources.items()}
        bound: dict[str, set[str]] = {}
        for module, tree in trees.items():
            bound.setdefault(owner(module), set()).update(_bound(tree, roots))
        reaches: list[Reach] = []
        for module, tree in trees.items():
            mine = owner(module)
            own = bound.get(mine, set())
            for line, name in _attributes(tree):
                if name not in own:
                    others = tuple(sorted(o for o, names in bound.items() if name in names))
                    if others:
                        reaches.append(Reach(module, line, name, others, False))
            for line, source, name in _private_imports(tree, module, sources[module][1], roots):
                if owner(source) != mine:
                    reaches.append(Reach(module, line, name, (owner(source),), True))
        output.verbose_print(verbose, f"Checked the private names of {len(trees)} modules.")
        return ContractCheck(kept=not reaches, metadata={"reaches": sorted(reaches)})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for reach in check.metadata["reaches"]:
            how = "imports" if reach.imported else "uses"
            output.print_error(
                f"{reach.module} (l.{reach.line}) {how} {reach.name}, private to "
                + ", ".join(reach.owners),
                bold=False,
            )
        output.new_line()


def _is_private(name: str) -> bool:
    return name.startswith("_") and name.strip("_") != "" and not name.endswith("__")


@functools.cache
def _root_dir(root: str) -> Path | None:
    spec = importlib.util.find_spec(root)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _source(module: str) -> tuple[Path, bool] | None:
    """The file of ``module`` and whether it is a package (None: not a source file)."""
    root, _, rest = module.partition(".")
    top = _root_dir(root)
    if top is None:
        return None
    base = top.joinpath(*rest.split(".")) if rest else top
    if (base / "__init__.py").is_file():
        return base / "__init__.py", True
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py"), False
    return None


def _bound(tree: ast.Module, roots: set[str]) -> set[str]:
    """The private names a module binds (not those it imports from ``roots``)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and _on_self(node):
            names.add(node.attr)
        elif isinstance(node, ast.Import):
            names.update(a.asname for a in node.names if a.asname)
        elif isinstance(node, ast.ImportFrom):
            ours = bool(node.level) or (node.module or "").split(".")[0] in roots
            names.update(a.asname or ("" if ours else a.name) for a in node.names)
    return {n for n in names if _is_private(n)}


def _on_self(node: ast.Attribute) -> bool:
    return isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")


def _attributes(tree: ast.Module) -> list[tuple[int, str]]:
    """Private attributes read, deleted, or assigned on anything but ``self``/``cls``."""
    return [
        (node.lineno, node.attr)
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and _is_private(node.attr)
        and not (isinstance(node.ctx, ast.Store) and _on_self(node))
    ]


def _private_imports(
    tree: ast.Module, module: str, is_package: bool, roots: set[str]
) -> list[tuple[int, str, str]]:
    """``(line, source module, name)`` of each private name imported from ``roots``
    (private modules are left to import-linter's ``private_modules`` contract)."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            parts = module.split(".")
            keep = len(parts) - node.level + (1 if is_package else 0)
            source = ".".join(parts[:keep] + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        if source.split(".")[0] not in roots:
            continue
        for alias in node.names:
            if _is_private(alias.name) and _source(f"{source}.{alias.name}") is None:
                found.append((node.lineno, source, alias.name))
    return found
