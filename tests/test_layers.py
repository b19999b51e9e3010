"""The package's import graph: packages and shared modules in layers, no
cycle, and no import from a lower layer to a higher one. Every import
statement counts, those under ``TYPE_CHECKING`` and inside functions too.
The layers are the README's (section Layout)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "emq_green"

#: Lowest first. A unit is a module directly in ``emq_green/`` or a whole
#: subpackage. A module may import modules of its own unit or of a lower
#: layer; units that share a layer (the three programs) never import each other.
LAYERS: list[set[str]] = [
    {"__init__", "limits", "protocol", "lifecycle", "lockfile", "web"},  # limits, wire, state,
                                                    # lock files, pages
    {"callables", "settings", "curve", "schedules"},  # policy, settings, keys, schedule
                                                    # bodies: shared by all
    {"jobs", "records"},                            # one job and its record
    {"extensions"},                                 # the contract for the worker's extensions
    {"worker"}, {"router"}, {"client"}, {"scheduler"},  # the programs' parts (siblings)
    {"jobmanager"},                                 # the job manager (EventMQ's API)
    {"cli", "demo"},                                # command lines
]
#: units of one program that must not import one another (same rank in the README)
SIBLINGS = {"worker", "router", "client", "scheduler"}

#: at most this many modules directly in emq_green/ (issue 19)
MAX_TOP_LEVEL_MODULES = 15


def all_modules() -> dict[str, Path]:
    """Dotted name (without ``emq_green.``; ``""`` for the top package) -> file."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def unit_of(module: str) -> str:
    return module.split(".")[0] if module else "__init__"


def rank(unit: str) -> int:
    for i, layer in enumerate(LAYERS):
        if unit in layer:
            return i
    raise AssertionError(f"emq_green.{unit} is in no layer: add it to LAYERS and to the "
                         "README's layout table")


def _resolve(dotted: str, modules: set[str]) -> str | None:
    """The module ``dotted`` names, or the one that defines the name it ends with."""
    parts = dotted.split(".") if dotted else []
    while True:
        name = ".".join(parts)
        if name in modules:
            return name
        if not parts:
            return None
        parts.pop()


def internal_imports(path: Path, module: str, modules: set[str]) -> set[str]:
    """``emq_green`` modules that ``path`` (the module ``module``) imports."""
    is_package = path.name == "__init__.py"
    package = module.split(".") if is_package else module.split(".")[:-1]
    if module == "":
        package = []
    tree = ast.parse(path.read_text(), str(path))
    targets: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                if node.level - 1 > len(package):
                    continue
            elif node.module and node.module.split(".")[0] == "emq_green":
                base = []
            else:
                continue
            mod = node.module or ""
            if not node.level:
                mod = mod.split(".", 1)[1] if "." in mod else ""
            prefix = ".".join([*base, *([mod] if mod else [])])
            for alias in node.names:  # `from . import x`: x may be a module
                candidate = f"{prefix}.{alias.name}" if prefix else alias.name
                targets.append(candidate if candidate in modules else prefix)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "emq_green":
                    targets.append(alias.name.partition(".")[2])
    found = {_resolve(t, modules) for t in targets}
    found.discard(None)
    found.discard(module)
    return found  # type: ignore[return-value]


def graph() -> dict[str, set[str]]:
    modules = all_modules()
    names = set(modules)
    return {m: internal_imports(p, m, names) for m, p in modules.items()}


def test_every_module_has_a_layer():
    for module in graph():
        rank(unit_of(module))


def test_no_import_goes_up_a_layer_or_across_programs():
    wrong = []
    for module, targets in graph().items():
        unit = unit_of(module)
        for target in targets:
            other = unit_of(target)
            if other == unit:
                continue
            if rank(other) > rank(unit):
                wrong.append(f"emq_green.{module} (layer {rank(unit)}) imports "
                             f"emq_green.{target} (layer {rank(other)})")
            elif unit in SIBLINGS and other in SIBLINGS:
                wrong.append(f"emq_green.{module} imports emq_green.{target}: the "
                             f"{unit} and the {other} do not import each other")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_check_sees_every_kind_of_import(tmp_path):
    package = tmp_path / "router"
    package.mkdir()
    source = package / "sample.py"
    source.write_text("from typing import TYPE_CHECKING\n"
                      "if TYPE_CHECKING:\n    from ..jobmanager import JobManager\n"
                      "def f():\n    from . import sockets\n    import emq_green.client\n"
                      "from ..web.pages import page\nfrom emq_green.worker import child\n")
    modules = {"jobmanager", "router", "router.sockets", "router.sample", "client",
               "web", "web.pages", "worker", "worker.child"}
    assert internal_imports(source, "router.sample", modules) == {
        "jobmanager", "router.sockets", "client", "web.pages", "worker.child"}


def test_the_top_level_stays_small():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


#: the largest a class may grow before it is split (issues 12 and 19): raw
#: lines, ``end_lineno - lineno + 1``, docstrings and comments included
MAX_CLASS_LINES = 400


def test_no_class_is_over_the_limit():
    too_big = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_CLASS_LINES:
                    too_big.append(f"{path.relative_to(PACKAGE)}:{node.name}: {lines} lines")
    assert not too_big, "\n".join(too_big)
